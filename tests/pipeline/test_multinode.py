"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``, what Ray's own test suite uses):
the job across a head and two workers with a worker removed mid-run, img2dataset's Ray distributor
inside such a cluster, and the example cluster YAML through Ray's own validation."""
from __future__ import annotations

import collections
import copy
import os
import threading

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from grounding.schema import read_table

from pipeline_helpers import REPO, wait_for, world_job

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes of one CPU each; the test process is the driver."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def keys_and_files(out) -> tuple[collections.Counter, list[str]]:
    keys, names = collections.Counter(), []
    for sub in ("shards", "rejects"):
        for name in sorted(os.listdir(out / sub)):
            names.append(f"{sub}/{name}")
            if name.endswith(".parquet"):
                pq.read_metadata(out / sub / name)  # every visible file is a complete Parquet file
                keys.update(read_table(str(out / sub / name), columns=["key"])["key"].to_pylist())
    return keys, names


def running_on(node) -> collections.Counter:
    """The Ray tasks and actors running in one node's worker processes, by their process titles."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    titles = collections.Counter()
    for p in raylet.children(recursive=True):
        try:
            titles[(p.cmdline() or [""])[0]] += 1
        except psutil.Error:
            pass
    return titles


def test_a_worker_node_lost_mid_run(cluster, world_server, world, tmp_path):
    """Remove a worker node while a shard task runs on it: the same run retries the lost shard task
    elsewhere (and restarts the detector actor if it was there) and ends with exactly the clean run's
    keys, once each, and counts that add up -- no rerun."""
    from pipeline.job import run_job

    c, workers = cluster
    _, files = world_server
    out = tmp_path / "out"
    config = world_job(files, out, phrase_batch_size=1, detect_batch_size=1, max_shards_in_flight=4)
    result: dict = {}

    def run():
        try:
            result["report"] = run_job(config)
        except Exception as e:  # noqa: BLE001 - asserted below: the run must not fail
            result["error"] = e

    driver = threading.Thread(target=run)
    driver.start()
    victim: dict = {}

    def a_worker_runs_a_shard() -> bool:
        if not driver.is_alive():
            return True   # ended before: asserted below
        for node in workers:
            tasks = running_on(node)
            if tasks["ray::process_shard"]:
                victim.update(node=node, tasks=tasks)
                return True
        return False

    assert wait_for(a_worker_runs_a_shard, timeout=400, interval=0.05), result
    assert victim, f"the run ended before a worker node ran a shard task: {result}"
    c.remove_node(victim["node"])
    driver.join(timeout=500)
    assert not driver.is_alive()
    assert "error" not in result, f"the run failed on losing a node running {dict(victim['tasks'])}: {result}"
    report = result["report"]
    expected = collections.Counter([im.key for im in world] + list(files.broken_keys))
    keys, names = keys_and_files(out)
    assert keys == expected
    assert all(n.endswith(".parquet") for n in names if not n.split("/")[1].startswith("."))
    c_ = report["counts"]
    assert (c_["input"], c_["kept"], c_["filtered"], c_["failed"], c_["adds_up"]) == (17, 12, 0, 5, True)
    assert report["shards"]["total"] == 9


def test_the_output_must_be_visible_from_every_node(cluster, tmp_path):
    """A shared folder passes the probe on every alive node; an output the nodes' processes cannot see
    (``memory://`` lives in the driver's process, as a node-local disk lives on one node) is refused
    before any work, naming the nodes."""
    import ray

    from grounding.cli import UsageError
    from grounding.source import SourceConfig
    from pipeline.config import JobConfig
    from pipeline.job import check_output_shared, run_job, unshared_output_error
    from pipeline.output import Layout

    alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    assert check_output_shared(Layout(str(tmp_path / "shared"))) == {n: True for n in alive}
    assert not [p for p in (tmp_path / "shared").iterdir()]   # the probe file is removed
    with pytest.raises(UsageError, match=f"not visible from {len(alive)} of {len(alive)} Ray nodes"):
        run_job(JobConfig(output="memory://grounding-out", source=SourceConfig(paths=[str(tmp_path / "in.parquet")])))
    message = unshared_output_error("/local/out", {"a" * 56: True, "b" * 56: False, "c" * 56: True})
    assert "not visible from 1 of 3 Ray nodes (bbbbbbbbbbbb)" in message and "s3://" in message
    assert unshared_output_error("/local/out", {"a" * 56: True}) is None


def test_img2dataset_ray_distributor_in_a_cluster(cluster, world_server, tmp_path):
    """img2dataset's own ``distributor="ray"`` path: its shards as Ray tasks on the cluster's nodes."""
    from img2dataset import download

    _, files = world_server
    out = tmp_path / "i2d"
    download(url_list=str(files.parquet), input_format="parquet", url_col="URL", caption_col="TEXT",
             output_format="parquet", output_folder=str(out), processes_count=1, thread_count=4, distributor="ray",
             number_sample_per_shard=4, timeout=2, resize_mode="no", enable_wandb=False)
    stats = sorted(out.glob("*_stats.json"))
    assert len(stats) == 5  # 17 rows, 4 per shard
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p, columns=["key", "status"]).to_pylist()]
    statuses = collections.Counter(r["status"] for r in rows)
    assert statuses["success"] == 12 and sum(statuses.values()) == 17


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    with open(os.path.join(REPO, "pipeline", "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    validate_config(fillout_defaults(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(Exception, match="is not of type 'integer'"):
        validate_config(fillout_defaults(broken))
