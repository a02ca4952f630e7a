"""Each Ray stage called on a hand-built batch, without Ray: real spaCy, real detectors."""
from __future__ import annotations

import io
import struct
import zlib

import pyarrow as pa
import pytest
from PIL import Image

from grounding.boxes import normalize_box
from grounding.detect import DetectorConfig
from grounding.phrases import PhraseConfig
from grounding.world import write_world
from pipeline.download import OPTED_OUT_MESSAGE
from pipeline.stages import (OUTPUT_SCHEMA, WORK_SCHEMA, DetectStage, PhraseStage, admit_downloads, assemble,
                             split_output)


def download_batch(rows):
    """Rows shaped like img2dataset's output (the columns the job reads)."""
    base = {"sample_key": None, "source_shard": "s-00000", "source_row": 0, "url": "http://x/a.jpg", "caption": "",
            "status": "success", "error_message": None, "original_width": None, "original_height": None, "jpg": None}
    return pa.Table.from_pylist([{**base, **r} for r in rows])


def png_claiming(width, height):
    """A valid PNG header (correct CRC) that declares ``width`` x ``height``: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def jpeg(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_admit_downloads_marks_every_failure_kind():
    good = jpeg(40, 30)
    batch = download_batch([
        {"sample_key": "noai", "status": "failed_to_download", "error_message": OPTED_OUT_MESSAGE, "source_row": 5},
        {"sample_key": "ok", "jpg": good, "source_row": 0},
        {"sample_key": "404", "status": "failed_to_download", "error_message": "HTTP Error 404", "source_row": 1},
        {"sample_key": "bomb", "jpg": png_claiming(100_000, 100_000), "source_row": 2},
        {"sample_key": "junk", "jpg": b"<html>not an image</html>", "source_row": 3},
        {"sample_key": "thin", "jpg": jpeg(700, 100), "source_row": 4},
    ])
    out = {r["key"]: r for r in admit_downloads(batch).to_pylist()}
    assert (out["ok"]["stage"], out["ok"]["width"], out["ok"]["height"]) == (None, 40, 30)
    assert out["ok"]["image"] == good
    assert (out["404"]["stage"], out["404"]["reason"], out["404"]["error"]) == ("download", "failed_to_download", "HTTP Error 404")
    assert (out["bomb"]["stage"], out["bomb"]["reason"]) == ("decode", "too_many_pixels")
    assert "10000000000" in out["bomb"]["error"] and out["bomb"]["image"] is None
    assert (out["junk"]["stage"], out["junk"]["reason"]) == ("decode", "corrupt_image")
    assert (out["thin"]["stage"], out["thin"]["reason"]) == ("filter", "aspect_ratio")
    assert (out["noai"]["stage"], out["noai"]["reason"]) == ("download", "opted_out")
    # a lower pixel limit applies before decoding too
    small = {r["key"]: r for r in admit_downloads(batch, max_pixels=1000).to_pylist()}
    assert small["ok"]["reason"] == "too_many_pixels"


@pytest.fixture(scope="module")
def world_files(tmp_path_factory, world):
    return write_world(tmp_path_factory.mktemp("stage_world"), world)


@pytest.fixture(scope="module")
def phrase_stage():
    return PhraseStage(PhraseConfig())


def world_batch(world, n=4, extra=()):
    rows = [{"sample_key": im.key, "caption": im.caption, "jpg": im.jpeg(), "source_row": i}
            for i, im in enumerate(world[:n])]
    return admit_downloads(download_batch(rows + list(extra)))


def test_phrases_then_annotation_boxes_then_records(world, world_files, phrase_stage):
    truncated = world[0].jpeg()[:200]  # header readable, pixels not: fails at full decode
    batch = world_batch(world, 4, extra=[
        {"sample_key": "nophrase", "caption": "Very very quickly!", "jpg": jpeg(50, 50), "source_row": 10},
        {"sample_key": "truncated", "caption": "A red ball and a blue box", "jpg": truncated, "source_row": 11},
    ])
    batch = phrase_stage(batch)
    assert batch.schema.equals(WORK_SCHEMA)
    rows = {r["key"]: r for r in batch.to_pylist()}
    assert (rows["nophrase"]["stage"], rows["nophrase"]["reason"]) == ("phrases", "no_noun_phrases")
    detect = DetectStage(DetectorConfig(backend="annotations", annotations=str(world_files.coco), refs=str(world_files.refs)))
    batch = detect(batch)
    rows = {r["key"]: r for r in batch.to_pylist()}
    assert (rows["truncated"]["stage"], rows["truncated"]["reason"]) == ("decode", "corrupt_image")
    out = assemble(batch, min_boxes=2)
    assert out.schema.equals(OUTPUT_SCHEMA) and out.num_rows == 6
    kept, rejects = split_output(out)
    assert sorted(kept["key"].to_pylist()) == sorted(im.key for im in world[:4])
    assert set(rejects["key"].to_pylist()) == {"nophrase", "truncated"}
    # the annotation detector gives the true boxes: every object's box is in its phrase's answer
    for row in kept.to_pylist():
        im = next(w for w in world if w.key == row["key"])
        truth = {tuple(normalize_box(o.box, im.width, im.height)) for o in im.objects}
        found = {tuple(b) for p in row["phrases"] for b in p["boxes_norm"]}
        assert truth <= found
        assert row["num_boxes"] == len(found) >= 2
        assert row["qa"][0]["task"] == "caption" and row["qa"][1]["question"].startswith("Question: Where is")
        assert all(row["caption"][p["start"]:p["end"]] == p["text"] for p in row["phrases"])


def test_min_boxes_rule_and_expression_inherits_chunk(world, world_files, phrase_stage):
    detect = DetectStage(DetectorConfig(backend="annotations", annotations=str(world_files.coco), refs=str(world_files.refs)))
    batch = detect(phrase_stage(world_batch(world, 3)))
    strict = assemble(batch, min_boxes=99)
    kept, rejects = split_output(strict)
    assert kept.num_rows == 0 and set(rejects["reason"].to_pylist()) == {"too_few_boxes"}
    assert set(rejects["stage"].to_pylist()) == {"filter"}
    kept, _ = split_output(assemble(batch, min_boxes=2))
    for row in kept.to_pylist():
        chunks = [p for p in row["phrases"] if p["kind"] == "chunk"]
        for p in row["phrases"]:
            if p["kind"] == "expression":  # its boxes are those of the chunk it contains
                assert any(c["start"] >= p["start"] and c["end"] <= p["end"] and c["boxes_norm"] == p["boxes_norm"]
                           for c in chunks)


def test_tiny_transformers_detector_stage(world, tmp_path, phrase_stage):
    from grounding.testing import save_tiny_detector

    model = save_tiny_detector(str(tmp_path / "tiny"))
    detect = DetectStage(DetectorConfig(model=model, box_threshold=0.0, text_threshold=0.0, batch_size=2))
    batch = detect(phrase_stage(world_batch(world, 3)))
    rows = batch.to_pylist()
    assert [r["stage"] for r in rows] == [None, None, None]
    for r in rows:
        boxes = [b for p in r["phrases"] for b in p["boxes_norm"]]
        assert boxes and all(len(b) == 4 and 0 <= min(b) and max(b) <= 999 for b in boxes)
