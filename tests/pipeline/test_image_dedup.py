"""Evaluation overlap and run-wide image dedup in the real job: a served world with an exact copy, a
resized re-encoded copy and an image of a named evaluation set, through Ray, img2dataset and spaCy."""
from __future__ import annotations

import dataclasses
import io
import json
import os

import pyarrow as pa
import pytest
from PIL import Image

from grounding.dedup import DedupConfig, hash_folder
from grounding.schema import read_metadata, read_shard, read_table
from grounding.world import WorldServer, make_world, write_world
from pipeline.job import run_job
from pipeline.stages import WORK_SCHEMA, EvalOverlapStage

from pipeline_helpers import world_job

pytestmark = pytest.mark.timeout(300)


def _resized_jpeg(im, scale: float, quality: int) -> bytes:
    pic = im.render()
    pic = pic.resize((int(pic.width * scale), int(pic.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    pic.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dup_world(tmp_path_factory):
    """6 images, then an exact copy of image 1 and a resized copy of image 2 under new keys and URLs;
    an evaluation folder holding a resized copy of image 4."""
    world = make_world(6, seed=21, size=(200, 160))
    exact = dataclasses.replace(world[1], key="copy_exact")
    near = dataclasses.replace(world[2], key="copy_near")
    root = tmp_path_factory.mktemp("dupworld")
    (root / "images").mkdir()
    (root / "images" / "copy_near.jpg").write_bytes(_resized_jpeg(world[2], 0.6, 60))  # written before write_world
    evals = tmp_path_factory.mktemp("evalset")
    (evals / "val_4.jpg").write_bytes(_resized_jpeg(world[4], 0.8, 70))
    hash_folder(evals, evals / "hashes.parquet", name="coco_val")
    with WorldServer(root) as server:
        files = write_world(root, world + [exact, near], base_url=server.base_url)
        yield world, files, str(evals / "hashes.parquet")


def test_eval_overlap_stage_marks_rows_before_phrases(dup_world):
    world, files, hashes = dup_world
    rows = [{"key": im.key, "url": "u", "caption": im.caption, "source_shard": "s", "source_row": i,
             "image": (files.images / f"{im.key}.jpg").read_bytes(), "width": im.width, "height": im.height,
             "stage": None, "reason": None, "error": None} for i, im in enumerate(world)]
    stage = EvalOverlapStage([f"coco_val={hashes}"], DedupConfig())
    batch = stage(pa.Table.from_pylist(rows, schema=WORK_SCHEMA))
    out = {r["key"]: r for r in batch.to_pylist()}
    flagged = {k: (r["stage"], r["reason"]) for k, r in out.items() if r["reason"]}
    assert flagged == {world[4].key: ("dedup", "eval_overlap")}
    assert out[world[4].key]["error"].startswith("coco_val: val_4.jpg within") and out[world[4].key]["image"] is None


def test_job_drops_duplicates_and_eval_overlap_with_counted_reasons(dup_world, tmp_path, local_ray):
    world, files, hashes = dup_world
    config = dataclasses.replace(world_job(files, tmp_path / "out"), eval_sets=(f"coco_val={hashes}",))
    report = run_job(config)
    c = report["counts"]
    assert (c["input"], c["kept"], c["adds_up"]) == (8, 5, True)
    assert report["filtered_by_reason"] == {"duplicate_image": 1, "eval_overlap": 1, "near_duplicate": 1}
    assert report["eval_overlap_by_set"] == {"coco_val": 1}
    assert report["rejects_by_stage"] == {"dedup": 3}
    assert report["image_dedup"]["drops"] >= 2 and report["image_dedup"]["shards_changed"] == 1
    out = tmp_path / "out"
    kept = sorted(r.key for f in sorted(os.listdir(out / "shards")) for r in read_shard(str(out / "shards" / f)))
    assert kept == sorted(im.key for i, im in enumerate(world) if i != 4)
    rejects = {k: (s, r, e) for f in sorted(os.listdir(out / "rejects"))
               for k, s, r, e in zip(*[read_table(str(out / "rejects" / f))[c].to_pylist()
                                       for c in ("key", "stage", "reason", "error")])}
    assert rejects["copy_exact"][1] == "duplicate_image" and world[1].key in rejects["copy_exact"][2]
    assert rejects["copy_near"][1] == "near_duplicate" and world[2].key in rejects["copy_near"][2]
    # each shard's provenance summary was recounted, so a rerun reports the same and changes nothing
    for f in sorted(os.listdir(out / "rejects")):
        s = read_metadata(str(out / "rejects" / f))["provenance"]["summary"]
        assert s["kept"] + s["filtered"] + s["failed"] == s["input"]
    before = {f: (out / "shards" / f).read_bytes() for f in os.listdir(out / "shards")}
    again = run_job(config)
    assert again["counts"] == c and again["filtered_by_reason"] == report["filtered_by_reason"]
    assert again["eval_overlap_by_set"] == {"coco_val": 1}
    assert {f: (out / "shards" / f).read_bytes() for f in os.listdir(out / "shards")} == before
    assert json.loads((out / "run_report.json").read_text())["eval_overlap_by_set"] == {"coco_val": 1}


def test_a_missing_hash_file_stops_the_image_dedup(tmp_path):
    """A shard whose hash file is not where the dedup steps look (a node-local --output on a multi-node
    cluster) must fail the pass, not silently count as "no images" and let its duplicates through."""
    from pipeline import image_dedup
    from pipeline.output import Layout
    from pipeline.plan import WorkShard
    from pipeline.stages import OUTPUT_SCHEMA

    layout = Layout(str(tmp_path / "out"))
    image_dedup.write_hashes(layout, WorkShard(0, "p-00000", "p.parquet", 0, 4), OUTPUT_SCHEMA.empty_table(),
                             DedupConfig())
    assert image_dedup.map_shard(layout.root, 0, 2, DedupConfig()) == 0   # written, empty: no records
    with pytest.raises(FileNotFoundError, match="every node sees"):
        image_dedup.map_shard(layout.root, 1, 2, DedupConfig())          # shard 1's file is on another node
    with pytest.raises(FileNotFoundError, match="00000001.parquet: missing"):
        image_dedup.reduce_bucket(layout.root, 0, 2, DedupConfig())      # its map file is missing too
