"""detector.train: a short run on a tiny world learns, resumes exactly, and saves what BoxDetector loads."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from detector.data import load_examples
from detector.evaluate import evaluate_detector
from grounding.cli import run_cli
from detector.train import DataConfig, TrainConfig, build_model, main, parse_config, save_model
from grounding.detect import BoxDetector, DetectorConfig


def argv(train, val, out, *extra):
    return ["--coco", str(train.coco), "--refs", str(train.refs), "--images", str(train.images),
            "--val-coco", str(val.coco), "--val-refs", str(val.refs), "--val-images", str(val.images),
            "--output", str(out), "--shortest-edge", "96", "--longest-edge", "96", "--batch-size", "4",
            "--log-every", "10", *extra]


@pytest.fixture(scope="module")
def trained(small_world, tmp_path_factory):
    """250 steps from scratch through the CLI (a few seconds of CPU time)."""
    train, val = small_world
    out = tmp_path_factory.mktemp("det-run")
    assert main(argv(train, val, out, "--steps", "250", "--eval-every", "125", "--optim-warmup-steps", "20",
                     "--optim-lr", "1e-3", "--negatives", "1")) == 0
    return out


def test_short_run_lowers_loss_and_beats_random_weights(trained, small_world, tmp_path):
    _, val = small_world
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.2 * losses[0], losses
    val_examples, _ = load_examples(str(val.coco), str(val.images), str(val.refs))
    cfg = parse_config(argv(*small_world, tmp_path / "random"))
    model, tok, proc = build_model(cfg, tmp_path / "random")
    save_model(model, tok, proc, tmp_path / "random" / "model")
    random_ev = evaluate_detector(str(tmp_path / "random" / "model"), val_examples)["all"]
    trained_ev = evaluate_detector(str(trained / "model"), val_examples)["all"]
    # held-out images: the trained boxes overlap their phrases' objects far better than random ones
    assert trained_ev["top1_iou"]["mean"] > random_ev["top1_iou"]["mean"] + 0.15, (trained_ev, random_ev)
    assert trained_ev["recall_at_1"] > random_ev["recall_at_1"]


def test_run_writes_config_log_checkpoint_and_evals(trained):
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["steps"] == 250 and cfg["data"]["shortest_edge"] == 96 and cfg["optim"]["lr"] == 1e-3
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [125, 250]
    assert 0.0 <= evals[-1]["all"]["recall_at_1"] <= 1.0 and evals[-1]["all"]["by_threshold"]
    assert log[-1]["event"] == "end" and log[-1]["step"] == 250 and log[-1]["ended_by"] == "steps"
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert state["step"] == 250 and not (trained / "checkpoint.pt.tmp").exists()


def test_saved_model_loads_in_box_detector_unchanged(trained, small_world):
    _, val = small_world
    det = BoxDetector(DetectorConfig(model=str(trained / "model"), box_threshold=0.0, text_threshold=0.0))
    ex = load_examples(str(val.coco), str(val.images), str(val.refs))[0][0]
    out = det([Image.open(ex.image)], [ex.phrases])[0]
    assert len(out) == len(ex.phrases) and all(p.boxes and p.error is None for p in out)
    assert det.model.image_processor.size["longest_edge"] == 96   # the training size travels with the weights


def test_resume_continues_exactly(small_world, tmp_path):
    """3 steps, stop, 3 more from the checkpoint == 6 steps straight (constant lr, same data order)."""
    flags = ["--optim-warmup-steps", "0", "--optim-min-lr-ratio", "1.0", "--save-every", "1", "--eval-every", "0"]
    assert main(argv(*small_world, tmp_path / "straight", "--steps", "6", *flags)) == 0
    assert main(argv(*small_world, tmp_path / "resumed", "--steps", "3", *flags)) == 0
    assert main(argv(*small_world, tmp_path / "resumed", "--steps", "6", *flags)) == 0
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    starts = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in starts if r.get("event") == "start"] == [0, 3]


def test_resume_under_a_changed_config_is_refused_before_anything_is_written(small_world, tmp_path, capsys):
    out = tmp_path / "run"
    cosine = ["--optim-warmup-steps", "0", "--save-every", "1", "--eval-every", "0"]
    assert main(argv(*small_world, out, "--steps", "2", *cosine)) == 0
    before = {f: (out / f).read_bytes() for f in ("config.json", "checkpoint.pt", "log.jsonl")}
    for extra, keys in [(["--model-d-model", "64"], ["model.d_model"]),
                        (["--optim-lr", "1e-3", "--batch-size", "2"], ["batch_size", "optim.lr"]),
                        (["--steps", "4"], ["steps"])]:  # a cosine schedule: the length shapes the lr
        capsys.readouterr()
        assert run_cli(main, argv(*small_world, out, "--steps", "2", *cosine, *extra)) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "trained with another config" in err, err
        named = err.split("(", 1)[1].split(")", 1)[0]
        assert [d.split()[0] for d in named.split(", ")] == keys, err
        assert {f: (out / f).read_bytes() for f in before} == before  # config.json still describes the checkpoint
    # the cadence may change: the resume runs and config.json says what the second part used
    assert main(argv(*small_world, out, "--steps", "2", *cosine, "--log-every", "1", "--eval-every", "2")) == 0
    assert json.loads((out / "config.json").read_text())["log_every"] == 1


def test_bad_config_is_a_clear_error(small_world, tmp_path, capsys):
    assert run_cli(main, argv(*small_world, tmp_path / "bad", "--steps", "0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: steps") and "(flag --steps" in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="negatives"):
        DataConfig(coco="c.json", images="i", negatives=-1)
    with pytest.raises(ValueError, match="coco"):
        TrainConfig()


def test_prompts_never_truncate_phrases(small_world, tmp_path):
    import random

    from detector.data import Collator, Example

    cfg = parse_config(argv(*small_world, tmp_path / "p"))
    _, tok, proc = build_model(cfg, tmp_path / "p")
    ex = Example(str(next(small_world[0].images.iterdir())), 96, 96, ["red ball", "blue box"], [(0, 0, 9, 9)], [1])
    collate = Collator(proc, tok, max_text_len=9, negatives=3, phrase_pool=["green cone", "orange kite", "red ball"])
    assert collate.fits(ex)                              # [CLS] red ball . blue box . [SEP]
    batch = collate([ex], random.Random(0))              # the negatives do not fit: left out, nothing cut
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True).count(".") == 2
    assert Collator(proc, tok, max_text_len=8).fits(ex) and not Collator(proc, tok, max_text_len=7).fits(ex)
