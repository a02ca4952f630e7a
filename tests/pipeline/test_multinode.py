"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``, what Ray's own test suite uses):
the job across a head and two workers with a worker removed mid-run, img2dataset's Ray distributor
inside such a cluster, and the example cluster YAML through Ray's own validation."""
from __future__ import annotations

import collections
import copy
import os
import threading

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


def test_a_worker_node_lost_mid_run(cluster, world_server, world, tmp_path):
    """Remove a worker node once shards are being written: the job (or a rerun) ends with exactly the
    clean run's keys, once each, and counts that add up."""
    from pipeline.job import run_job

    c, workers = cluster
    _, files = world_server
    out = tmp_path / "out"
    config = world_job(files, out, phrase_batch_size=1, detect_batch_size=1, max_shards_in_flight=4)
    result: dict = {}

    def run():
        try:
            result["report"] = run_job(config)
        except Exception as e:  # noqa: BLE001 - a lost node may fail a shard past its retries: rerun below
            result["error"] = e

    driver = threading.Thread(target=run)
    driver.start()
    assert wait_for(lambda: (out / "shards").exists() and any(n.endswith(".parquet") for n in os.listdir(out / "shards")),
                    timeout=400, interval=0.05), result
    c.remove_node(workers[0])
    driver.join(timeout=500)
    assert not driver.is_alive()
    done_before_rerun = len(list((out / "shards").glob("*.parquet")))
    report = result.get("report") or run_job(config)
    expected = collections.Counter([im.key for im in world] + list(files.broken_keys))
    keys, names = keys_and_files(out)
    assert keys == expected
    assert all(n.endswith(".parquet") for n in names if not n.split("/")[1].startswith("."))
    c_ = report["counts"]
    assert (c_["input"], c_["kept"], c_["filtered"], c_["failed"], c_["adds_up"]) == (17, 12, 0, 5, True)
    assert report["shards"]["total"] == 9 and done_before_rerun >= 1


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
