"""grounding.audit: hand-built shards with known IoUs against COCO + refs, from Python and the CLI."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from grounding.audit import PhraseAudit, audit, match, summarize, top1_iou
from grounding.query_cli import main as query_main
from grounding.records import build_record
from grounding.schema import write_shard

SIDE = 1000  # boxes_norm == pixels in a 1000 x 1000 frame


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), "white").save(buf, format="PNG")
    return buf.getvalue()


def phrase(prompt, boxes, scores):
    return {"text": prompt, "start": 0, "end": len(prompt), "head": prompt.split()[-1], "kind": "chunk",
            "prompt": prompt, "boxes_norm": boxes, "det_scores": scores}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Image a: 'red ball' exact (0.92), 'blue box' IoU 0.40 (0.62), 'green cone' never asked, 'white
    background' without truth; image b: 'yellow kite' a wrong box (0.82) and the right one (0.35);
    image c: not annotated."""
    root = tmp_path_factory.mktemp("audit")
    rows = []
    for key, phrases in [
        ("a", [phrase("red ball", [[0, 0, 500, 500]], [0.92]), phrase("blue box", [[500, 500, 999, 700]], [0.62]),
               phrase("white background", [[0, 0, 999, 999]], [0.55])]),
        ("b", [phrase("yellow kite", [[600, 600, 800, 800], [200, 200, 400, 400]], [0.82, 0.35])]),
        ("c", [phrase("red ball", [[0, 0, 100, 100]], [0.95])]),
    ]:
        caption = " and ".join(p["text"] for p in phrases)
        for p in phrases:
            p["start"] = caption.index(p["text"])
            p["end"] = p["start"] + len(p["text"])
        row, _ = build_record(key=key, caption=caption, image=png(), width=SIDE, height=SIDE, phrases=phrases,
                              min_boxes=1)
        rows.append(row)
    (root / "shards").mkdir()
    write_shard(rows, str(root / "shards" / "00000.parquet"))
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "key": "a", "width": SIDE, "height": SIDE},
                       {"id": 2, "file_name": "b.jpg", "key": "b", "width": SIDE, "height": SIDE}],
            "categories": [{"id": 1, "name": "ball"}, {"id": 2, "name": "box"}, {"id": 3, "name": "cone"},
                           {"id": 4, "name": "kite"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 500, 500]},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [500, 500, 500, 500]},
                            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [100, 600, 200, 300]},
                            {"id": 4, "image_id": 2, "category_id": 4, "bbox": [200, 200, 200, 200]}]}
    refs = [{"image_id": i, "ann_id": a, "sentences": [{"sent": s}]}
            for i, a, s in [(1, 1, "red ball"), (1, 2, "blue box"), (1, 3, "green cone"), (2, 4, "yellow kite")]]
    (root / "coco.json").write_text(json.dumps(coco))
    (root / "refs.json").write_text(json.dumps(refs))
    return root


def test_known_ious_precision_recall_and_threshold(case):
    rep = audit(str(case), str(case / "coco.json"), str(case / "refs.json"), target_precision=0.9)
    assert rep["counts"] == {"images": 3, "images_without_annotations": 1, "phrases_without_truth": 1,
                             "expressions_without_truth": 0,
                             "boxes_without_truth": 1, "missed_refs": 1}
    ious = {p["phrase"]: p["top1_iou"] for p in rep["per_phrase"]}
    assert ious["red ball"] == pytest.approx(1.0, abs=0.01)
    assert ious["blue box"] == pytest.approx(499 * 200 / 500 ** 2, abs=0.01)   # 0.40: a miss at IoU 0.5
    assert ious["green cone"] == 0.0 and ious["yellow kite"] == 0.0            # never asked; best box wrong
    assert rep["true_boxes"] == 4 and rep["detector_boxes"] == 4 and rep["recall_at_1"] == 0.25
    by_t = {r["threshold"]: r for r in rep["by_threshold"]}
    assert (by_t[0.85]["precision"], by_t[0.85]["recall"]) == (1.0, 0.25)   # only 'red ball' (0.92)
    assert by_t[0.7]["precision"] == 0.5                                     # + the wrong kite box (0.82)
    assert by_t[0.25]["precision"] == 0.5 and by_t[0.25]["recall"] == 0.5    # + blue box (FP), right kite (TP)
    assert rep["threshold_for_target"] == {"threshold": pytest.approx(0.92), "precision": 1.0, "recall": 0.25,
                                           "boxes": 1}
    cal = {tuple(b["bin"]): b for b in rep["calibration"]}
    assert cal[(0.9, 1.0)]["precision"] == 1.0 and cal[(0.8, 0.9)]["precision"] == 0.0
    assert cal[(0.2, 0.3)]["boxes"] == 0 and cal[(0.3, 0.4)]["true_positives"] == 1


def test_lower_target_trades_precision_for_recall(case):
    rep = audit(str(case), str(case / "coco.json"), str(case / "refs.json"), target_precision=0.5)
    assert rep["threshold_for_target"]["threshold"] == pytest.approx(0.35)
    assert rep["threshold_for_target"]["recall"] == 0.5


def test_cli_writes_report_and_calibration_png(case, tmp_path, capsys):
    out, pic = tmp_path / "audit.json", tmp_path / "cal.png"
    rc = query_main(["audit", "--data", str(case), "--annotations", str(case / "coco.json"),
                     "--refs", str(case / "refs.json"), "--png", str(pic), "-o", str(out), "--per-phrase"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["recall_at_1"] == 0.25 and len(rep["per_phrase"]) == 4
    img = Image.open(pic).convert("RGB")
    assert img.width > 900 and (70, 130, 200) in {c for _, c in img.getcolors(1 << 20)}  # the bars are drawn
    rc = query_main(["audit", "--data", str(case), "--annotations", str(tmp_path / "missing.json")])
    assert rc != 0 and "missing.json" in capsys.readouterr().err


def test_match_is_one_to_one_and_best_score_first():
    item = PhraseAudit("k", "p", truth=[(0, 0, 10, 10)], boxes=[(0, 0, 10, 10), (0, 0, 10, 9)], scores=[0.4, 0.7])
    assert match(item) == [False, True]          # the higher score takes the only true box
    assert top1_iou(item) == pytest.approx(0.9)
    both = PhraseAudit("k", "p", truth=[(0, 0, 10, 10), (20, 20, 30, 30)], boxes=[(0, 0, 10, 10), (20, 20, 30, 30)],
                       scores=[0.5, 0.5])
    s = summarize([both], thresholds=[0.5])
    assert s["by_threshold"][0]["precision"] == 1.0 and s["by_threshold"][0]["recall"] == 1.0
    with pytest.raises(ValueError, match="iou"):
        summarize([item], iou=0.0)


def expression_case(root, category_of_man: str):
    """'A man riding a horse' through the real phrase extractor, boxed by a perfect detector."""
    from grounding.boxes import normalize_box
    from grounding.phrases import PhraseExtractor
    from grounding.schema import Phrase, assign_boxes

    w, h = 400, 300
    man, horse = (40, 40, 140, 280), (180, 100, 380, 280)
    caption = "A man riding a horse"
    phrases = [p if isinstance(p, Phrase) else Phrase.from_dict(p) for p in PhraseExtractor()([caption])[0].phrases]
    assert {(p.prompt, p.kind) for p in phrases} >= {("man", "chunk"), ("horse", "chunk"),
                                                      ("man riding a horse", "expression")}
    found = {i: ([list(normalize_box(man if p.head == "man" else horse, w, h))], [0.9])
             for i, p in enumerate(phrases) if p.kind == "chunk"}
    assign_boxes(phrases, found)
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "JPEG")
    row, _ = build_record(key="img1", caption=caption, image=buf.getvalue(), width=w, height=h, phrases=phrases)
    (root / "shards").mkdir()
    write_shard([row], str(root / "shards" / "s0.parquet"))
    coco = {"images": [{"id": 1, "file_name": "img1.jpg", "width": w, "height": h}],
            "categories": [{"id": 1, "name": category_of_man}, {"id": 19, "name": "horse"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [40, 40, 100, 240]},
                            {"id": 2, "image_id": 1, "category_id": 19, "bbox": [180, 100, 200, 180]}]}
    (root / "coco.json").write_text(json.dumps(coco))
    return audit(str(root), str(root / "coco.json"))


def test_an_expression_is_scored_against_its_head_chunks_human_boxes(tmp_path):
    """'man riding a horse' carries the man's boxes: scored against the man, never the horse (its last word)."""
    (tmp_path / "person").mkdir()
    report = expression_case(tmp_path / "person", "person")  # no human box names "man"
    assert report["recall_at_1"] == 1.0
    assert [p["phrase"] for p in report["per_phrase"]] == ["horse"]
    assert report["counts"]["phrases_without_truth"] == 2 and report["counts"]["expressions_without_truth"] == 1
    assert report["true_boxes"] == 1 and report["by_threshold"][0]["precision"] == 1.0
    assert report["by_kind"] == {"chunk": {"phrases": 1, "recall_at_1": 1.0}}
    (tmp_path / "man").mkdir()
    report = expression_case(tmp_path / "man", "man")
    assert report["recall_at_1"] == 1.0
    assert {p["phrase"]: p["top1_iou"] for p in report["per_phrase"]} == pytest.approx(
        {"man": 1.0, "man riding a horse": 1.0, "horse": 1.0}, abs=0.01)  # boxes_norm round to 1/1000
    assert report["counts"]["phrases_without_truth"] == 0
    assert report["by_kind"] == {"chunk": {"phrases": 2, "recall_at_1": 1.0},
                                 "expression": {"phrases": 1, "recall_at_1": 1.0}}


def test_head_chunk_of_shard_phrases():
    from grounding.audit import head_chunk

    def p(text, start, head, kind):
        return {"text": text, "start": start, "end": start + len(text), "head": head, "kind": kind, "prompt": text}

    # "dog and cat and dog in a field": the second 'dog' chunk was merged into the first (same prompt)
    rows = [p("dog", 0, "dog", "chunk"), p("cat", 8, "cat", "chunk"),
            p("dog and cat and dog in a field", 0, "dog", "expression"), p("cat in a box", 8, "cat", "expression"),
            p("bird on a wire", 40, "bird", "expression")]
    assert [head_chunk(rows, i) for i in range(len(rows))] == [0, 1, 0, 1, None]
    rows[2]["start"] = 16  # grown from the repeated mention: found by its prompt
    assert head_chunk(rows, 2) == 0
