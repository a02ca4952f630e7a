"""model.evaluate: Acc@0.5 on known cases, parse failures, RefCOCO-format input, the CLI report."""
from __future__ import annotations

import json

import pytest
from helpers_train import debug_model, debug_model_config, one_thread, shards8  # noqa: F401
from PIL import Image

from grounding.boxes import format_answer, normalize_box
from grounding.world import make_world, write_world
from model.evaluate import (
    RecExample, draw_predictions, evaluate_rec, main, parse_split_globs, refcoco_examples, score_answer,
    shard_examples, summarize,
)


def example(boxes, frame="norm", width=1000, height=1000, split="val") -> RecExample:
    return RecExample("k", split, "Question: Where is the red ball?", "red ball", boxes, frame, width, height)


def test_predictions_equal_to_the_truth_score_one(shards8):
    examples = shard_examples([shards8])
    assert len(examples) >= 16                                       # 8 images, 2-4 objects each
    results = [score_answer(format_answer([ex.boxes[0]]), ex) for ex in examples]
    summary = summarize(results)
    assert summary["acc@0.5"] == 1.0 and summary["mean_iou"] == 1.0 and summary["parse_failures"] == 0


def test_shifted_box_gives_the_iou_computed_by_hand():
    ex = example([(100, 100, 300, 300)])
    # shifted right by 50: overlap 150 x 200 = 30000, union 40000 + 40000 - 30000 = 50000 -> 0.6, a hit
    r = score_answer("Answer: [[150,100,350,300]]", ex)
    assert r.iou == pytest.approx(0.6) and r.hit
    # shifted right by 100: overlap 100 x 200 = 20000, union 60000 -> 1/3, a miss
    r = score_answer("Answer: [[200,100,400,300]]", ex)
    assert r.iou == pytest.approx(1 / 3) and not r.hit
    summary = summarize([score_answer("[[150,100,350,300]]", ex), score_answer("[[200,100,400,300]]", ex)])
    assert summary["acc@0.5"] == 0.5 and summary["mean_iou"] == pytest.approx((0.6 + 1 / 3) / 2)


def test_unparseable_answers_are_misses_counted_by_reason():
    ex = example([(100, 100, 300, 300)])
    results = [score_answer("the red ball", ex), score_answer("[[100,100,300]]", ex),
               score_answer("[[100,100,300,300]]", ex)]
    s = summarize(results)
    assert s["acc@0.5"] == pytest.approx(1 / 3) and s["parse_failures"] == 2
    assert s["parse_failure_reasons"] == {"no '[[' in output": 1, "a box needs 4 coordinates, got 3": 1}


def test_per_split_accuracy():
    a, b = example([(0, 0, 500, 500)], split="testA"), example([(0, 0, 500, 500)], split="testB")
    s = summarize([score_answer("[[000,000,500,500]]", a), score_answer("[[600,600,900,900]]", b),
                   score_answer("[[000,000,499,499]]", b)])
    assert s["splits"]["testA"]["acc@0.5"] == 1.0 and s["splits"]["testB"]["acc@0.5"] == 0.5
    assert s["splits"]["testB"]["n"] == 2 and s["n"] == 3


def test_refcoco_format_truth_in_pixels(tmp_path):
    world = make_world(5, seed=11)
    files = write_world(tmp_path, world, val_fraction=0.4)
    examples = refcoco_examples(str(files.refs), str(files.coco), str(files.images))
    assert len(examples) == sum(len(w.objects) for w in world)
    assert {e.split for e in examples} == {"train", "val"}
    first = world[0].objects[0]
    assert examples[0].boxes == [tuple(float(v) for v in first.box)] and examples[0].phrase == first.phrase
    assert examples[0].question == f"Question: Where is the {first.phrase}?"
    # the prediction in 0..999 maps back to pixels: a normalised truth scores IoU close to 1
    results = [score_answer(format_answer([normalize_box(e.boxes[0], e.width, e.height)]), e) for e in examples]
    assert all(r.hit and r.iou > 0.95 for r in results)
    only_val = refcoco_examples(str(files.refs), str(files.coco), str(files.images), splits=["val"])
    assert {e.split for e in only_val} == {"val"} and 0 < len(only_val) < len(examples)
    assert isinstance(examples[0].load_image(), Image.Image)


def test_evaluate_rec_runs_generation_and_draws(debug_model, shards8, tmp_path):
    examples = shard_examples([shards8], limit=5)
    examples.append(RecExample("broken", "held_out", "Question: Where is the red ball?", "red ball", [(0, 0, 10, 10)],
                               "norm", 10, 10, image_bytes=b"not an image"))
    summary, results = evaluate_rec(debug_model, examples, batch_size=4, max_new_tokens=6)
    assert summary["n"] == 6 and len(results) == 6
    assert results[-1].parse_failure.startswith("image: ") and not results[-1].hit
    png = draw_predictions(examples, results, str(tmp_path / "p.png"), n=4)
    assert Image.open(png).size == (4 * 224, 224 + 28)


def test_parse_split_globs():
    assert parse_split_globs(["val=a/*.parquet", "b/c.parquet", "val=d.parquet"]) == {
        "val": ["a/*.parquet", "d.parquet"], "held_out": ["b/c.parquet"]}


def test_cli_writes_report_and_picture_from_a_checkpoint(tmp_path, shards8, debug_model_config):
    from model.train import debug, train
    train(debug(out_dir=str(tmp_path / "run"), shards=[shards8], max_steps=2, save_every=0, ema_decay=0.5),
          model_config=debug_model_config)
    out = tmp_path / "report" / "val.json"
    report = main(["--checkpoint", str(tmp_path / "run"), "--shards", f"val={shards8}", "--limit", "4",
                   "--batch-size", "4", "--max-new-tokens", "4", "--out", str(out), "--pictures", "2"])
    saved = json.loads(out.read_text())
    assert saved["n"] == 4 and set(saved["splits"]) == {"val"} and len(saved["results"]) == 4
    assert saved["checkpoint"]["weights"] == "ema" and saved["checkpoint"]["step"] == 2
    assert (tmp_path / "report" / "val.png").exists() and report["acc@0.5"] == saved["acc@0.5"]
