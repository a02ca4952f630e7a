"""The whole job on the served test world with a real local Ray, img2dataset and spaCy.

Annotation boxes (the world's truth) make the kept count exact: all 12 images have >= 2 objects;
the 5 broken URLs fail at download.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from grounding.boxes import normalize_box
from grounding.detect import DetectorConfig
from grounding.schema import GROUNDING_SCHEMA, REJECTS_SCHEMA, read_metadata, read_shard, read_table
from pipeline.build_grounding import config_from_args, main
from pipeline.config import config_hash
from pipeline.job import run_job

from pipeline_helpers import kill_tree, python_cmd, wait_for, world_job, world_job_argv

pytestmark = pytest.mark.timeout(300)


def output_keys(out) -> collections.Counter:
    keys = collections.Counter()
    for sub in ("shards", "rejects"):
        for name in sorted(os.listdir(os.path.join(out, sub))):
            if name.endswith(".parquet"):
                keys.update(read_table(os.path.join(out, sub, name), columns=["key"])["key"].to_pylist())
    return keys


def shard_files(out) -> dict[str, bytes]:
    files = {}
    for sub in ("shards", "rejects"):
        for name in sorted(os.listdir(os.path.join(out, sub))):
            with open(os.path.join(out, sub, name), "rb") as f:
                files[f"{sub}/{name}"] = f.read()
    return files


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, world_server, local_ray):
    _, files = world_server
    out = tmp_path_factory.mktemp("clean") / "out"
    report = run_job(world_job(files, out))
    return out, report


def test_every_row_is_kept_filtered_or_failed_once(clean_run, world_server, world):
    out, report = clean_run
    _, files = world_server
    c = report["counts"]
    assert (c["input"], c["kept"], c["filtered"], c["failed"], c["adds_up"]) == (17, 12, 0, 5, True)
    assert report["failed_by_reason"] == {"failed_to_download": 3, "failed_to_resize": 2}  # 404 x2 + slow; corrupt, html
    assert report["rejects_by_stage"] == {"download": 5}
    assert report["kept_with_2plus_boxes_share"] == 1.0
    t = report["timings_seconds"]  # the first shard's timeline; the warm-up gate opened once the detector loaded
    assert 0 <= t["first_shard_started"] <= t["first_shard_written"] <= t["total"] and "warmup_gate_opened" in t
    assert report["shards"]["total"] == 9 and report["shards"]["names"][0] == "laion-00000"
    keys = output_keys(out)
    assert sorted(keys) == sorted([im.key for im in world] + list(files.broken_keys)) and set(keys.values()) == {1}
    # the report on disk, the resolved config beside it
    assert json.loads((out / "run_report.json").read_text())["counts"] == c
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config_hash"] == report["config_hash"] and cfg["detector"]["backend"] == "annotations"
    # rows carry the served image, its size and the true boxes
    by_key = {im.key: im for im in world}
    rows = [r for name in sorted(os.listdir(out / "shards")) for r in read_shard(str(out / "shards" / name))]
    assert len(rows) == 12
    for r in rows:
        im = by_key[r.key]
        assert (r.width, r.height) == (im.width, im.height) and r.image == (files.images / f"{im.key}.jpg").read_bytes()
        truth = {tuple(normalize_box(o.box, im.width, im.height)) for o in im.objects}
        assert truth <= {tuple(b) for p in r.phrases for b in p.boxes_norm}
    # rejects are queryable rows with stage and reason
    rejects = [row for name in sorted(os.listdir(out / "rejects")) for row in read_table(str(out / "rejects" / name)).to_pylist()]
    assert {r["key"]: r["reason"] for r in rejects} == {
        "broken_missing_0": "failed_to_download", "broken_missing_1": "failed_to_download",
        "broken_slow_0": "failed_to_download", "broken_corrupt_0": "failed_to_resize", "broken_notimage_0": "failed_to_resize"}
    meta = read_metadata(str(out / "shards" / "laion-00000.parquet"))["provenance"]
    assert meta["config_hash"] == report["config_hash"] and meta["source_shard"] == "laion-00000"
    assert meta["detector"] == "annotations" and meta["detector_weights"].startswith("coco.json@sha256:")
    assert meta["counts"]["input"] == 2 and meta["package_version"]
    assert pq.read_schema(out / "shards" / "laion-00000.parquet").remove_metadata().equals(GROUNDING_SCHEMA.remove_metadata())
    assert pq.read_schema(out / "rejects" / "laion-00000.parquet").remove_metadata().equals(REJECTS_SCHEMA.remove_metadata())


def test_rerun_skips_finished_shards_and_refuses_another_config(clean_run, world_server):
    out, report = clean_run
    _, files = world_server
    before = shard_files(out)
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in before}
    again = run_job(world_job(files, out))
    assert again["shards"] == {**report["shards"], "written_this_run": 0, "skipped_finished": 9}
    assert again["counts"] == report["counts"]
    assert shard_files(out) == before and {p: os.stat(out / p).st_mtime_ns for p in before} == mtimes
    # half done (killed between a shard's two writes): that shard is redone whole, the rest skipped
    os.remove(out / "rejects" / "laion-00003.parquet")
    half = run_job(world_job(files, out))
    assert (half["shards"]["written_this_run"], half["shards"]["skipped_finished"]) == (1, 8)
    assert shard_files(out) == before and half["counts"] == report["counts"]
    assert main(["--config", str(out / "config.json")]) == 0  # the resolved config replays the run
    assert json.loads((out / "run_report.json").read_text())["shards"]["skipped_finished"] == 9
    assert shard_files(out) == before
    with pytest.raises(ValueError, match="another config"):
        run_job(replace(world_job(files, out), min_boxes=3))


def test_cluster_shape_does_not_change_names_or_contents(clean_run, world_server, tmp_path):
    out, report = clean_run
    _, files = world_server
    other = tmp_path / "shape"
    shutil.copytree(out / "downloads", other / "downloads")  # same downloads: only the execution differs
    config = world_job(files, other, max_shards_in_flight=1, detect_actors=2, detect_cpus=0.25, phrase_batch_size=1,
                       detect_batch_size=3, dedup_partitions=3)
    assert config_hash(config) == report["config_hash"]
    second = run_job(config)
    assert second["shards"]["written_this_run"] == 9
    assert shard_files(other) == shard_files(out)  # byte-identical shards and rejects


def test_cli_matches_the_config_api(world_server, tmp_path):
    _, files = world_server
    argv = world_job_argv(files, tmp_path / "o") + ["--ray-max-shards-in-flight", "5", "--filters-max-punsafe", "0.3"]
    config = config_from_args(argv)
    assert config.ray.max_shards_in_flight == 5 and config.filters.max_punsafe == 0.3
    assert config.detector.backend == "annotations" and config.filters.allow_hosts == ["127.0.0.1"]
    assert config_hash(config_from_args(world_job_argv(files, tmp_path / "o"))) == config_hash(world_job(files, tmp_path / "o"))
    with pytest.raises(ValueError, match="no input"):
        config_from_args(["--output", str(tmp_path / "x")])
    sample = config_from_args(["--sample", "--detector", "annotations", "--output", str(tmp_path / "s")])
    assert sample.detector.annotations == str(tmp_path / "s" / "sample" / "coco.json")
    assert sample.source.shard_rows == 16 and sample.ray.detect_cpus == 0.5


def test_killed_job_resumes_to_the_clean_result(clean_run, world_server, tmp_path):
    """SIGKILL the driver (and its Ray) mid-run, rerun the same command: same key multiset, no partial files."""
    out, _ = clean_run
    _, files = world_server
    killed = tmp_path / "killed"
    shutil.copytree(out / "downloads", killed / "downloads")
    argv = world_job_argv(files, killed) + ["--ray-phrase-batch-size", "1", "--ray-detect-batch-size", "1"]
    env = dict(os.environ, RAY_ADDRESS="")  # its own embedded Ray, killed with it
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(python_cmd(*argv), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen_partial = []

    def first_shard_finished():
        """A shard's rejects file (written after its grounding shard) exists; nothing partial is visible."""
        names = {}
        for sub in ("shards", "rejects"):
            d = killed / sub
            names[sub] = [n for n in os.listdir(d) if n.endswith(".parquet")] if d.exists() else []
            for n in names[sub]:  # anything visible under a shard name must be a complete Parquet file
                try:
                    pq.read_metadata(d / n)
                except Exception as e:  # noqa: BLE001
                    seen_partial.append((n, repr(e)))
        return names["rejects"]

    try:
        assert wait_for(first_shard_finished, timeout=200, interval=0.01), (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        kill_tree(proc)
        log.close()
    assert not seen_partial
    assert not (killed / "run_report.json").exists()  # it died before the end
    done_at_kill = len(list((killed / "shards").glob("*.parquet")))
    assert done_at_kill < 9, "the kill came after the last shard; nothing was resumed"
    for path in (killed / "shards").glob("*.parquet"):
        pq.read_metadata(path)
    assert main(world_job_argv(files, killed)) == 0
    report = json.loads((killed / "run_report.json").read_text())
    assert report["shards"]["skipped_finished"] >= 1 and report["counts"]["adds_up"]
    assert output_keys(killed) == output_keys(out)
    assert not list((killed / "shards").glob(".*.tmp")) and not list((killed / "rejects").glob(".*.tmp"))


def test_limit_and_fraction_plan_and_a_fully_filtered_run(tmp_path, local_ray):
    """Planning reads footers only and is deterministic; a run whose rows all fail the pre-filters downloads nothing."""
    import pyarrow as pa

    from grounding.source import FilterConfig, SourceConfig
    from pipeline.config import JobConfig
    from pipeline.plan import plan_shards

    rows = [{"URL": f"http://169.254.169.254/{i}.jpg", "TEXT": f"a red ball and a blue box {i}", "key": f"k{i:02d}"}
            for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows[:20]), tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(rows[20:]), tmp_path / "b.parquet")
    source = SourceConfig(paths=[str(tmp_path / "*.parquet")], shard_rows=4, limit=23)
    config = JobConfig(output=str(tmp_path / "out"), source=source, filters=FilterConfig())
    shards = plan_shards(source)
    assert [s.name for s in shards] == [f"a-{i:05d}" for i in range(5)] + ["b-00000"]
    assert [(s.start, s.stop) for s in shards][-2:] == [(16, 20), (0, 3)] and sum(s.input_rows for s in shards) == 23
    report = run_job(config)
    assert report["counts"] == {"input": 23, "kept": 0, "filtered": 23, "failed": 0, "adds_up": True}
    assert report["filtered_by_reason"] == {"private_host": 23}
    assert not (tmp_path / "out" / "downloads").exists()
    assert sorted(os.listdir(tmp_path / "out" / "rejects")) == [f"{s.name}.parquet" for s in shards]
    # sampling happens in the shard tasks, by the key hash: exactly the rows sample_rows picks from each file
    from grounding.source import read_source, sample_rows

    half = run_job(replace(config, output=str(tmp_path / "half"), source=replace(source, limit=None, sample_fraction=0.5)))
    picked = [k for f in ("a", "b") for k in sample_rows(read_source(str(tmp_path / f"{f}.parquet"), source), 0.5)["key"].to_pylist()]
    assert sorted(output_keys(tmp_path / "half")) == sorted(picked) and 5 <= len(picked) <= 25
    assert half["counts"]["input"] == len(picked)


def test_duplicate_urls_first_occurrence_in_file_row_order_wins(tmp_path, local_ray):
    """Run-wide dedup across shards and files, the same whatever the number of hash partitions."""
    import pyarrow as pa

    from grounding.source import FilterConfig, SourceConfig
    from pipeline.config import JobConfig, RayConfig
    from pipeline.download import DownloadConfig

    def url(u):
        return f"http://127.0.0.1:9/{u}.jpg"  # nothing listens: a fast failed_to_download

    a = ["u1", "u2", "u1", "u4", "u5"]
    b = ["u2", "u3", "u1", "u3"]
    for name, urls in (("a", a), ("b", b)):
        pq.write_table(pa.Table.from_pylist([{"URL": url(u), "TEXT": f"a red ball number {i}", "key": f"{name}{i}"}
                                             for i, u in enumerate(urls)]), tmp_path / f"{name}.parquet")
    # a4 is filtered before dedup (short caption): it never wins against a later u5
    pq.write_table(pa.Table.from_pylist([{"URL": url("u5"), "TEXT": "x", "key": "c0"},
                                         {"URL": url("u5"), "TEXT": "a blue box", "key": "c1"}]), tmp_path / "c.parquet")
    reasons = {}
    for partitions in (1, 3):
        config = JobConfig(output=str(tmp_path / f"out{partitions}"),
                           source=SourceConfig(paths=[str(tmp_path / "*.parquet")], shard_rows=2),
                           filters=FilterConfig(allow_hosts=["127.0.0.1"]), download=DownloadConfig(threads=4, timeout=2),
                           detector=DetectorConfig(backend="annotations", annotations=str(tmp_path / "none.json")),
                           ray=RayConfig(dedup_partitions=partitions))
        (tmp_path / "none.json").write_text('{"images": [], "annotations": [], "categories": []}')
        report = run_job(config)
        assert report["counts"]["adds_up"] and report["dedup"]["partitions"] == partitions
        rejects = [r for n in sorted(os.listdir(tmp_path / f"out{partitions}" / "rejects"))
                   for r in read_table(str(tmp_path / f"out{partitions}" / "rejects" / n)).to_pylist()]
        reasons[partitions] = {r["key"]: r["reason"] for r in rejects}
    assert reasons[1] == reasons[3]
    dups = sorted(k for k, r in reasons[1].items() if r == "duplicate_url")
    assert dups == ["a2", "b0", "b2", "b3", "c1"]
    assert reasons[1]["c0"] == "short_caption" and reasons[1]["a4"] == "failed_to_download"
