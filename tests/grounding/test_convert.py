"""Converters to COCO / ODVG / GRIT, read back by their documented structure (COCO through
pycocotools, the reference reader) and line by line, against the synthetic world's true boxes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from grounding.convert import read_coco, read_grit, write_coco, write_grit, write_odvg
from grounding.query_cli import main
from grounding.records import build_record
from grounding.schema import read_shard, row_to_dict, write_shard
from grounding.testing import oriented_jpeg
from grounding.world import make_world, truth_rows, write_truth_shards

FIELDS = ("key", "url", "caption", "caption_raw", "width", "height", "image", "qa", "grounded_caption", "num_boxes")
PHRASE_FIELDS = ("text", "start", "end", "kind", "boxes_norm", "det_scores")


@pytest.fixture(scope="module")
def world():
    return make_world(6, seed=3, size=(160, 120))


@pytest.fixture(scope="module")
def rows(world):
    return truth_rows(world)


def _close(box, true, w, h):
    """A converted pixel box lies within one normalisation bin (size/1000) of the true box."""
    return all(abs(a - b) <= tol for a, b, tol in zip(box, true, (w / 1000 + 1e-3, h / 1000 + 1e-3) * 2))


def _same_rows(back, rows, with_prompt=True):
    assert len(back) == len(rows)
    for b, r in zip(back, rows):
        assert {k: b[k] for k in FIELDS} == {k: r[k] for k in FIELDS}
        fields = PHRASE_FIELDS + (("prompt", "head") if with_prompt else ())
        assert [{k: p[k] for k in fields} for p in b["phrases"]] == [{k: p[k] for k in fields} for p in r["phrases"]]


def test_coco_reads_back_with_pycocotools_and_round_trips(world, rows, tmp_path):
    result = write_coco(rows, tmp_path / "coco")
    assert (result.images, result.boxes, result.skipped) == (len(world), sum(len(im.objects) for im in world), [])
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted({o.phrase for im in world for o in im.objects})
    for im in world:
        [info] = [i for i in coco.loadImgs(coco.getImgIds()) if i["key"] == im.key]
        with Image.open(tmp_path / "coco" / "images" / info["file_name"]) as pic:
            assert pic.size == (info["width"], info["height"]) == (im.width, im.height)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))
        assert len(anns) == len(im.objects)
        for a, o in zip(anns, im.objects):
            assert coco.loadCats([a["category_id"]])[0]["name"] == o.phrase
            x, y, w, h = a["bbox"]
            assert _close((x, y, x + w, y + h), o.box, im.width, im.height), (a["bbox"], o.box)
            assert a["area"] == pytest.approx(w * h, abs=0.01) and a["iscrowd"] == 0
            (s, e), = a["tokens_positive"]
            assert info["caption"][s:e] == im.caption[o.start:o.end]
    back = list(read_coco(tmp_path / "coco"))
    _same_rows(back, rows)
    write_shard(back, str(tmp_path / "again.parquet"))  # the rebuilt rows pass the shard schema


def test_odvg_lines_follow_open_groundingdino(world, tmp_path):
    result = write_odvg(truth_rows(world), tmp_path / "odvg")
    label_map = json.loads((tmp_path / "odvg" / "label_map.json").read_text())
    assert sorted(map(int, label_map)) == list(range(result.categories)) and result.categories > 0  # from "0"
    lines = (tmp_path / "odvg" / "odvg.jsonl").read_text().splitlines()
    assert len(lines) == len(world)
    for line, im in zip(lines, world):
        d = json.loads(line)
        assert (d["width"], d["height"]) == (im.width, im.height)
        assert Image.open(tmp_path / "odvg" / "images" / d["filename"]).size == (im.width, im.height)
        g = d["grounding"]
        assert g["caption"] == im.caption
        assert [r["phrase"] for r in g["regions"]] == [o.phrase for o in im.objects]
        assert all(_close(r["bbox"], o.box, im.width, im.height) for r, o in zip(g["regions"], im.objects))
        inst = d["detection"]["instances"]
        assert [label_map[str(i["label"])] for i in inst] == [i["category"] for i in inst] == [o.phrase for o in im.objects]


def test_grit_lines_have_spans_and_normalised_boxes_and_round_trip(world, rows, tmp_path):
    write_grit(rows, tmp_path / "grit")
    lines = (tmp_path / "grit" / "grit.jsonl").read_text().splitlines()
    assert len(lines) == len(world)
    for line, im in zip(lines, world):
        d = json.loads(line)
        assert (d["key"], d["caption"], d["ref_exps"]) == (im.key, im.caption, [])
        assert len(d["noun_chunks"]) == len(im.objects)
        for (s, e, x0, y0, x1, y1, score), o in zip(d["noun_chunks"], im.objects):
            assert d["caption"][s:e] == im.caption[o.start:o.end]
            assert all(0 <= v <= 1 for v in (x0, y0, x1, y1)) and score == 1.0
            assert _close((x0 * im.width, y0 * im.height, x1 * im.width, y1 * im.height), o.box, im.width, im.height)
    _same_rows(list(read_grit(tmp_path / "grit")), rows, with_prompt=False)  # GRIT has no prompt / head


def test_undecodable_image_is_skipped_with_its_reason(rows, tmp_path):
    bad = {**rows[0], "key": "broken", "image": b"not an image"}
    result = write_coco([bad, *rows[1:3]], tmp_path / "c")
    assert result.images == 2 and [s["key"] for s in result.skipped] == ["broken"]
    assert json.loads((tmp_path / "c" / "export.json").read_text())["skipped"][0]["reason"] == "unknown_image_format"
    with pytest.raises(FileExistsError):
        write_coco(rows, tmp_path / "c")
    assert write_coco(rows, tmp_path / "c", overwrite=True).images == len(rows)
    assert len(list((tmp_path / "c" / "images").iterdir())) == len(rows)


def test_cli_export_format_with_filter(world, tmp_path, capsys):
    write_truth_shards(world, tmp_path / "shards", rows_per_shard=4)
    want = [row_to_dict(r)["key"] for f in sorted((tmp_path / "shards").glob("*.parquet"))
            for r in read_shard(str(f)) if r.num_boxes >= 3]
    assert 0 < len(want) < len(world)
    for fmt, keys in (("grit", lambda d: [json.loads(l)["key"] for l in (d / "grit.jsonl").read_text().splitlines()]),
                      ("coco", lambda d: [i["key"] for i in json.loads((d / "annotations.json").read_text())["images"]]),
                      ("odvg", lambda d: [Path(json.loads(l)["filename"]).stem for l in (d / "odvg.jsonl").read_text().splitlines()])):
        dest = tmp_path / fmt
        assert main(["export", str(dest), "--data", str(tmp_path / "shards"), "--format", fmt,
                     "--where", "num_boxes >= 3"]) == 0
        assert json.loads(capsys.readouterr().out)["images"] == len(want)
        assert keys(dest) == want
        assert json.loads((dest / "export.json").read_text())["config"]["where"] == "num_boxes >= 3"


def test_coco_export_feeds_the_project_detector_trainer(world, rows, tmp_path):
    """detector/data.py's load_examples reads the export as it is: phrases from the categories,
    pixel boxes within a bin of the world's truth, every image file found."""
    from detector.data import load_examples
    write_coco(rows, tmp_path / "coco")
    examples, skipped = load_examples(str(tmp_path / "coco" / "annotations.json"), str(tmp_path / "coco" / "images"))
    assert skipped == {} and len(examples) == len(world)
    for ex, im in zip(examples, world):
        assert Image.open(ex.image).size == (ex.width, ex.height) == (im.width, im.height)
        assert [ex.phrases[lab] for lab in ex.labels] == [o.phrase for o in im.objects]
        assert all(_close(b, o.box, im.width, im.height) for b, o in zip(ex.boxes, im.objects))


def _oriented_row() -> dict:
    """A row as a shard made before downloads were stored upright holds it: JPEG bytes of 300x200 stored pixels
    with EXIF orientation 6 (displayed 200x300), and the row's width/height/box in the stored frame, where the
    detector saw it (the red block, stored top-left)."""
    phrase = {"text": "a red block", "start": 0, "end": 11, "head": "block", "kind": "chunk", "prompt": "red block",
              "boxes_norm": [[0, 0, 199, 199]], "det_scores": [0.9]}
    row, reason = build_record(key="photo", caption="a red block", image=oriented_jpeg(), width=300, height=200,
                               phrases=[phrase], min_boxes=1)
    assert reason is None
    return row


@pytest.mark.parametrize("fmt", ["coco", "odvg", "grit"])
def test_exif_oriented_image_is_written_untagged_in_the_frame_of_its_boxes(fmt, tmp_path):
    """A loader that ignores EXIF (plain PIL, as torchvision's CocoDetection and Open-GroundingDino do) finds the
    image at the annotation's width/height with the box on the red block, and no tag is left for a loader that
    applies EXIF to turn it away from its box."""
    write = {"coco": write_coco, "odvg": write_odvg, "grit": write_grit}[fmt]
    write([_oriented_row()], tmp_path / fmt)
    if fmt == "coco":
        ann = json.loads((tmp_path / fmt / "annotations.json").read_text())
        info, (x, y, bw, bh) = ann["images"][0], ann["annotations"][0]["bbox"]
        name, size, box = info["file_name"], (info["width"], info["height"]), (x, y, x + bw, y + bh)
    elif fmt == "odvg":
        d = json.loads((tmp_path / fmt / "odvg.jsonl").read_text())
        name, size, box = d["filename"], (d["width"], d["height"]), d["grounding"]["regions"][0]["bbox"]
    else:
        d = json.loads((tmp_path / fmt / "grit.jsonl").read_text())
        x0, y0, x1, y1 = d["noun_chunks"][0][2:6]
        name, size, box = d["file_name"], (d["width"], d["height"]), (x0 * d["width"], y0 * d["height"],
                                                                        x1 * d["width"], y1 * d["height"])
    with Image.open(tmp_path / fmt / "images" / name) as pic:
        assert pic.getexif().get(0x0112) in (None, 1)
        assert pic.size == size == (300, 200)
        rgb = pic.convert("RGB")
    cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
    r, g, b = rgb.getpixel((cx, cy))
    assert r > 180 and g < 80 and b < 80  # the box sits on the red block
