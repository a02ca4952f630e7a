"""model.evaluate: Acc@0.5 on known cases, parse failures, RefCOCO-format input, the CLI report."""
from __future__ import annotations

import json

import pytest
import torch
from helpers_train import debug_model, debug_model_config, make_multibox_shards, one_thread, shards8  # noqa: F401
from PIL import Image

from grounding.boxes import format_answer, normalize_box, prompt_and_target
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


class TruthModel(torch.nn.Module):
    """The best a trained model can do: answers each question (in the order asked) with ``answers``' text and EOS,
    cut at ``max_new_tokens`` exactly as ``model.generate`` cuts (rows padded to the longest). Everything else
    (token budget, decoding, parsing, scoring) is the evaluator's own path."""

    def __init__(self, model, answers: list[str]):
        super().__init__()
        self.inner, self.tokenizer, self.answers = model, model.tokenizer, iter(answers)

    def preprocess(self, images):
        return self.inner.preprocess(images)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens=32, **kw):
        tok = self.tokenizer
        rows = [(tok(next(self.answers), add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max_new_tokens]
                for _ in range(input_ids.shape[0])]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])


def multibox_truth(tmp_path):
    examples = shard_examples([make_multibox_shards(tmp_path)])
    assert len(examples) >= 12 and all(len(e.boxes) == 3 for e in examples)
    return examples, [prompt_and_target(e.question, format_answer(e.boxes))[1] for e in examples]


def test_perfect_multi_box_answers_score_one_within_the_default_token_budget(tmp_path, debug_model):
    """Shards hold up to 3 boxes per phrase ``[[a;b;c]]`` (~18 tokens a box): the default budget fits the longest
    true answer and EOS, so a model that writes the whole truth scores 1.0 (a fixed 24 cut them mid-box)."""
    examples, truth = multibox_truth(tmp_path)
    tok = debug_model.tokenizer
    summary, results = evaluate_rec(TruthModel(debug_model, truth), examples, batch_size=4)
    assert summary["acc@0.5"] == 1.0 and summary["parse_failures"] == 0 and summary["cut_answers"] == 0
    assert summary["max_new_tokens"] == max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in truth) + 1 > 24
    assert all(r.predicted == list(e.boxes[0]) for r, e in zip(results, examples))


def test_an_answer_cut_by_the_budget_is_counted_and_scored_on_its_complete_first_box(tmp_path, debug_model):
    examples, truth = multibox_truth(tmp_path)
    summary, results = evaluate_rec(TruthModel(debug_model, truth), examples, batch_size=4, max_new_tokens=24)
    assert summary["cut_answers"] == len(examples) and summary["acc@0.5"] == 1.0 and summary["max_new_tokens"] == 24
    assert all(";" in r.answer and not r.answer.endswith("]]") for r in results)      # cut inside the second box
    summary, _ = evaluate_rec(TruthModel(debug_model, truth), examples, batch_size=4, max_new_tokens=10)
    assert summary["acc@0.5"] == 0.0 and summary["parse_failure_reasons"] == {
        "cut at max_new_tokens (unterminated box group (no ']]'))": len(examples)}
    # an answer the model ended itself (EOS) must be well-formed: the same text is a miss
    ex = examples[0]
    assert score_answer(results[0].answer, ex).parse_failure == "unterminated box group (no ']]')"


def test_parse_split_globs():
    assert parse_split_globs(["val=a/*.parquet", "b/c.parquet", "val=d.parquet"]) == {
        "val": ["a/*.parquet", "d.parquet"], "held_out": ["b/c.parquet"]}


def test_cli_writes_report_and_picture_from_a_checkpoint(tmp_path, shards8, debug_model_config):
    from model.train import train
    from model.train_config import debug
    train(debug(out_dir=str(tmp_path / "run"), shards=[shards8], max_steps=2, save_every=0, ema_decay=0.5),
          model_config=debug_model_config)
    out = tmp_path / "report" / "val.json"
    report = main(["--checkpoint", str(tmp_path / "run"), "--shards", f"val={shards8}", "--limit", "4",
                   "--batch-size", "4", "--max-new-tokens", "4", "--out", str(out), "--pictures", "2"])
    saved = json.loads(out.read_text())
    assert saved["n"] == 4 and set(saved["splits"]) == {"val"} and len(saved["results"]) == 4
    assert saved["checkpoint"]["weights"] == "ema" and saved["checkpoint"]["step"] == 2
    assert (tmp_path / "report" / "val.png").exists() and report["acc@0.5"] == saved["acc@0.5"]


def test_a_run_trained_in_one_directory_evaluates_from_another(tmp_path, shards8, monkeypatch, capsys):
    """The README trains with a relative --out-dir: the checkpoint records the model directories resolved, so
    evaluation from another working directory finds them; a checkpoint of an older run (paths relative to where it
    trained) finds them above itself; a directory that is gone is a one-line usage error, not a traceback."""
    import os
    import shutil

    from grounding.cli import run_cli
    from model.checkpoint import find_checkpoint
    from model.train import train
    from model.train_config import debug

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    train(debug(out_dir="runs/x", shards=[shards8], max_steps=1, warmup_steps=0, save_every=0))
    state_file = find_checkpoint(str(tmp_path / "a" / "runs" / "x")) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["model_config"]["lm"] == str(tmp_path / "a" / "runs" / "x" / "debug_model" / "tiny-llama")
    assert os.path.isabs(state["model_config"]["vision"])
    monkeypatch.chdir(tmp_path / "b")
    args = ["--checkpoint", str(tmp_path / "a" / "runs" / "x"), "--shards", shards8, "--limit", "2",
            "--batch-size", "2", "--max-new-tokens", "2", "--out", "e.json", "--pictures", "0", "--device", "cpu"]
    assert main(args)["n"] == 2
    state["model_config"].update(lm="runs/x/debug_model/tiny-llama", vision="runs/x/debug_model/tiny-clip")
    state_file.write_text(json.dumps(state))
    assert main(args)["n"] == 2
    shutil.move(tmp_path / "a" / "runs" / "x" / "debug_model", tmp_path / "moved")
    capsys.readouterr()
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs/x/debug_model/tiny-llama: no such model directory; check --checkpoint"), err
    assert "Traceback" not in err


# --- the RefCOCO command line, end to end ------------------------------------------------------

CONSTANT = [100, 200, 300, 400]   # the one answer the checkpoint below learns to give


@pytest.fixture(scope="module")
def constant_checkpoint(tmp_path_factory, debug_model_config):
    """A checkpoint that answers every question with ``[[100,200,300,400]]``: its shards' REC answers
    all hold that box, so its predictions are known and the Acc@0.5 of any truth can be worked out by hand."""
    import dataclasses

    import torch

    from grounding.schema import write_shard
    from grounding.world import truth_rows
    from model.train import train
    from model.train_config import wiring

    root = tmp_path_factory.mktemp("constant")
    rows = truth_rows(make_world(16, seed=31))
    for r in rows:
        r["qa"] = [{**q, "answer": format_answer([CONSTANT])} for q in r["qa"] if q["task"] == "rec"]
    write_shard(rows, str(root / "shards" / "00000.parquet"))
    mcfg = dataclasses.replace(debug_model_config, freeze_lm=False, lm_lr_mult=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                 # module fixture: set up before the one_thread fixture
    try:
        train(wiring(out_dir=str(root / "run"), shards=[str(root / "shards")], max_steps=100, batch_size=8, lr=3e-3,
                     warmup_steps=5, log_every=100, progress=False), model_config=mcfg)
    finally:
        torch.set_num_threads(threads)
    return str(root / "run")


def write_refcoco(root, world, designed: list[tuple[tuple[str, str], list[float]]]):
    """The world's objects as RefCOCO refs (``refs(unc)`` converted to JSON: ``sent_ids``, ``sentences`` with
    ``tokens``/``raw``/``sent``/``sent_id``, COCO-style ids and file names) and COCO instances; plus ``designed``
    refs on the first image, ``((sentence, sentence), [x, y, w, h])``. Returns (refs, instances, images)."""
    images_dir = root / "train2014"
    images_dir.mkdir(parents=True)
    images, anns, refs = [], [], []

    def add_ref(image_id, file_name, bbox, sentences, split, category_id):
        ann_id = 1719310 + len(anns)
        anns.append({"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
                     "area": bbox[2] * bbox[3], "iscrowd": 0, "segmentation": [[bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1],
                                                                               bbox[0] + bbox[2], bbox[1] + bbox[3]]]})
        first = sum(len(r["sentences"]) for r in refs)
        sents = [{"tokens": s.split(), "raw": s.capitalize(), "sent_id": first + k, "sent": s} for k, s in enumerate(sentences)]
        refs.append({"sent_ids": [s["sent_id"] for s in sents], "file_name": f"{file_name[:-4]}_{ann_id}.jpg",
                     "ann_id": ann_id, "ref_id": len(refs), "image_id": image_id, "split": split,
                     "sentences": sents, "category_id": category_id})

    for i, im in enumerate(world):
        image_id = 581857 + 7 * i
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        (images_dir / file_name).write_bytes(im.jpeg())
        images.append({"id": image_id, "file_name": file_name, "height": im.height, "width": im.width, "license": 1})
        for o in im.objects:
            x0, y0, x1, y1 = o.box
            add_ref(image_id, file_name, [x0, y0, x1 - x0, y1 - y0], [o.phrase], "testB" if i % 3 else "train", 1)
        if i == 0:
            for sentences, bbox in designed:
                add_ref(image_id, file_name, bbox, list(sentences), "testA", 1)
    instances = {"info": {"description": "test world"}, "images": images, "annotations": anns,
                 "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}]}
    (root / "refs.json").write_text(json.dumps(refs))
    (root / "instances.json").write_text(json.dumps(instances))
    return root / "refs.json", root / "instances.json", images_dir


def hand_iou(pred_norm, truth_xywh, width, height) -> float:
    """IoU worked out here, apart from grounding.boxes: a 0..999 coordinate is the centre of its bin."""
    px0, py0, px1, py1 = [(v + 0.5) * (width if k % 2 == 0 else height) / 1000 for k, v in enumerate(pred_norm)]
    tx0, ty0, tx1, ty1 = truth_xywh[0], truth_xywh[1], truth_xywh[0] + truth_xywh[2], truth_xywh[1] + truth_xywh[3]
    inter = max(0.0, min(px1, tx1) - max(px0, tx0)) * max(0.0, min(py1, ty1) - max(py0, ty0))
    return inter / ((px1 - px0) * (py1 - py0) + truth_xywh[2] * truth_xywh[3] - inter)


def test_refcoco_cli_end_to_end_matches_a_hand_computed_acc(constant_checkpoint, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    world = make_world(6, seed=41, size=(200, 100))
    # On a 200 x 100 image the answer [[100,200,300,400]] is the pixel box (20.1, 20.05)-(60.1, 40.05), 40 x 20.
    designed = [
        (("red ball", "green ball"), [20, 20, 40, 20]),    # overlap 39.9 x 19.95 = 796.005, union 803.995: IoU 0.990, hit
        (("blue box", "purple box"), [30, 20, 40, 20]),    # overlap 30.1 x 19.95 = 600.495, union 999.505: IoU 0.601, hit
        (("orange kite", "red kite"), [40, 20, 40, 20]),   # overlap 20.1 x 19.95 = 400.995, union 1199.005: IoU 0.334, miss
        (("yellow cone", "blue cone"), [150, 70, 40, 20]),  # no overlap: IoU 0, miss
    ]
    refs, instances, images = write_refcoco(tmp_path, world, designed)
    out = tmp_path / "report" / "refcoco.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "model.evaluate", "--checkpoint", constant_checkpoint, "--refs", str(refs),
                           "--instances", str(instances), "--images", str(images), "--splits", "testA", "testB",
                           "--device", "cpu", "--batch-size", "8", "--out", str(out), "--pictures", "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (tmp_path / "report" / "refcoco.png").exists()

    # the checkpoint answers its one box everywhere (else nothing below is known by hand)
    assert [r["predicted"] for r in report["results"]] == [CONSTANT] * len(report["results"]), \
        [r["answer"] for r in report["results"]][:5]
    # testA: the designed refs, two sentences each: 2 hits of 4 refs -> 4 of 8 sentences
    test_a = [r for r in report["results"] if r["split"] == "testA"]
    assert [round(r["iou"], 3) for r in test_a] == [0.990, 0.990, 0.601, 0.601, 0.334, 0.334, 0.0, 0.0]
    assert report["splits"]["testA"] == {"n": 8, "acc@0.5": 0.5, "mean_iou": pytest.approx((0.99005 + 0.60079 + 0.33444) / 4,
                                                                                             abs=1e-4), "parse_failures": 0}
    # testB: the world's own objects, scored by hand against the constant answer; "train" refs left out
    truth = [(o.box, im) for i, im in enumerate(world) for o in im.objects if i % 3]
    hand = [hand_iou(CONSTANT, [x0, y0, x1 - x0, y1 - y0], im.width, im.height) for (x0, y0, x1, y1), im in truth]
    test_b = [r for r in report["results"] if r["split"] == "testB"]
    assert len(test_b) == len(hand) and [r["iou"] for r in test_b] == pytest.approx(hand)
    hits = 4 + sum(v >= 0.5 for v in hand)
    assert report["n"] == 8 + len(hand) and report["acc@0.5"] == pytest.approx(hits / report["n"])
    assert report["splits"]["testB"]["acc@0.5"] == pytest.approx(sum(v >= 0.5 for v in hand) / len(hand))
