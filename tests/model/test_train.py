"""model.train: a few steps learn, exact resume, checkpoint files, safe loading, config and CLI."""
from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
from helpers_train import debug_model_config, make_multibox_shards, make_shards, one_thread, shards8  # noqa: F401
from safetensors.torch import load_file

from model.checkpoint import find_checkpoint, list_checkpoints, load_model_from_checkpoint
from model.optim import OptimConfig, lr_factor
from model.train import config_from_args, main, train
from model.train_config import TrainConfig, debug, stage2


def losses(summary) -> list[float]:
    return [h["loss"] for h in summary["history"]]


def test_a_few_steps_reduce_the_loss(tmp_path, shards8, debug_model_config):
    s = train(debug(out_dir=str(tmp_path), shards=[shards8], max_steps=24, save_every=0, lr=3e-3, warmup_steps=2),
              model_config=debug_model_config)
    frozen = train(debug(out_dir=str(tmp_path / "control"), shards=[shards8], max_steps=24, save_every=0, lr=1e-9,
                         warmup_steps=2), model_config=debug_model_config)        # same batches, weights barely move
    ls, control = losses(s), losses(frozen)
    assert len(ls) == 24 and all(math.isfinite(v) for v in ls)
    # measured (seeds 0-2): the last 4 steps average 0.75-0.79 x the first step's loss; the control stays at ~1.0
    assert sum(ls[-4:]) / 4 < 0.82 * ls[0], ls
    assert sum(ls[-4:]) / 4 < 0.85 * sum(control[-4:]) / 4, (ls, control)
    rec = s["history"][-1]
    assert rec["tokens_per_s"] > 0 and rec["samples_per_s"] > 0 and rec["lr"] == pytest.approx(3e-3 * lr_factor(23, OptimConfig(max_steps=24, lr=3e-3, warmup_steps=2)))
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[-1]["event"] == "end" and sum("loss" in r for r in log) == 24


def test_resume_is_exact(tmp_path, shards8, debug_model_config):
    """2N steps straight == N steps, a fresh process state, resume, N steps: identical losses and weights.
    Also resumed from a checkpoint saved between log steps (save_every 3, log_every 2): same totals."""
    kw = dict(shards=[shards8], max_steps=8, save_every=3, log_every=2, deterministic=True, grad_accum=2,
              ema_decay=0.8, caption_weight=1.0, qa_per_image=2, lr=2e-3)
    straight = train(debug(out_dir=str(tmp_path / "a"), **kw), model_config=debug_model_config)
    first = train(debug(out_dir=str(tmp_path / "b"), stop_after=4, **kw), model_config=debug_model_config)
    mid = train(debug(out_dir=str(tmp_path / "c"), resume=str(tmp_path / "b" / "checkpoints" / "step_00000003"), **kw),
                model_config=debug_model_config)
    torch.manual_seed(12345)                                         # disturb the global RNG: resume must restore it
    second = train(debug(out_dir=str(tmp_path / "b"), **kw), model_config=debug_model_config)
    assert len(losses(first)) == 2 and len(losses(second)) == 2      # logged at steps 2, 4 | 6, 8
    assert losses(first) + losses(second) == losses(straight)        # bit-identical floats
    assert losses(mid) == losses(straight)[1:]                       # steps 4, 6, 8
    a, b, c = (find_checkpoint(str(tmp_path / d)) for d in "abc")
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb, sc = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b, c))
    assert sa["data_states"] == sb["data_states"] == sc["data_states"] and sa["step"] == sb["step"] == sc["step"] == 8
    assert sa["totals"]["samples"] == 8 * 2 * 4                      # steps x grad_accum x batch_size
    assert sb["totals"] == sa["totals"] and sc["totals"] == sa["totals"] and mid["totals"] == sa["totals"]


def test_checkpoints_are_complete_atomic_and_pruned(tmp_path, shards8, debug_model_config):
    s = train(debug(out_dir=str(tmp_path), shards=[shards8], max_steps=6, save_every=2, keep_last=2),
              model_config=debug_model_config)
    ckpts = list_checkpoints(str(tmp_path))
    assert [c.name for c in ckpts] == ["step_00000004", "step_00000006"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    c = ckpts[-1]
    assert {p.name for p in c.iterdir()} == {"model.safetensors", "optimizer.pt", "rng.safetensors", "rng.json",
                                             "trainer_state.json"}
    weights = load_file(str(c / "model.safetensors"))
    trainable = {n for n, p in s["model"].named_parameters() if p.requires_grad}
    assert set(weights) == trainable and all(torch.equal(weights[n], p.detach()) for n, p in s["model"].named_parameters() if n in trainable)
    state = json.loads((c / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["config"]["optim"]["max_steps"] == 6 and state["model_config"]["lm"]
    optim = torch.load(c / "optimizer.pt", weights_only=True)
    assert set(optim["state"]) <= trainable and all(len(g["params"]) for g in optim["param_groups"])


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/_cogvlm_pwned_by_checkpoint",))


def test_loading_never_unpickles(tmp_path, shards8, debug_model_config):
    train(debug(out_dir=str(tmp_path), shards=[shards8], max_steps=1, warmup_steps=0), model_config=debug_model_config)
    ckpt = find_checkpoint(str(tmp_path))
    torch.save({"state": {}, "param_groups": [], "x": Exploit()}, ckpt / "optimizer.pt")
    if os.path.exists("/tmp/_cogvlm_pwned_by_checkpoint"):
        os.remove("/tmp/_cogvlm_pwned_by_checkpoint")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(debug(out_dir=str(tmp_path), shards=[shards8], max_steps=2), model_config=debug_model_config)
    assert not os.path.exists("/tmp/_cogvlm_pwned_by_checkpoint")
    # inference reads safetensors + JSON only: the poisoned optimizer file does not stop it
    model, info = load_model_from_checkpoint(str(tmp_path))
    saved = load_file(str(ckpt / "model.safetensors"))
    assert info == {"path": str(ckpt), "step": 1, "weights": "raw"}
    assert all(torch.equal(dict(model.named_parameters())[k], v) for k, v in saved.items())


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(10, 110))


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(max_steps=0), dict(warmup_steps=500), dict(ema_decay=1.0),
                                 dict(parallel="tp"), dict(stop_after=1000), dict(eval_every=5),
                                 dict(caption_weight=0.0, rec_weight=0.0), dict(qa_per_image=0),
                                 dict(eval_max_new_tokens=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainConfig.from_flat(**bad)


def test_stage2_preset_needs_a_real_model_config():
    with pytest.raises(ValueError, match="--model"):
        stage2()
    cfg = stage2(model="configs/cogvlm.json")
    assert cfg.optim.ema_decay == 0.9999 and cfg.data.caption_weight == cfg.data.rec_weight == 1.0 and cfg.optim.lr == 1e-5


def test_cli_overrides_and_debug_model(tmp_path, shards8):
    cfg = config_from_args(["--preset", "wiring", "--lr", "0.01", "--shards", shards8, "--stop-after", "3",
                            "--model-overrides", '{"shallow": true}', "--progress", "false"])
    assert cfg.optim.lr == 0.01 and cfg.stop_after == 3 and cfg.model_overrides == {"shallow": True}
    assert cfg.optim.max_steps == 1500 and not cfg.progress
    out = tmp_path / "run"
    s = main(["--preset", "debug", "--out-dir", str(out), "--shards", shards8, "--max-steps", "2",
              "--model-overrides", '{"shallow": true}'])
    assert s["step"] == 2 and s["model"].config.shallow
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["shallow"] is True and saved["train"]["optim"]["max_steps"] == 2
    assert (out / "debug_model" / "tiny-llama" / "config.json").exists()
    replay = config_from_args(["--config", str(out / "config.json"), "--max-steps", "5"])   # replay, one override
    assert replay.to_dict() == {**saved["train"], "optim": {**saved["train"]["optim"], "max_steps": 5}}
    with pytest.raises(TypeError, match="no field"):
        debug(learning_rate=1.0)


def test_true_false_flags_take_a_bare_or_a_valued_form(shards8, capsys):
    """``--skip-bad-shards`` alone or ``--skip-bad-shards true|false``: the same form as model.evaluate's."""
    from model.evaluate import build_parser as eval_parser

    base = ["--shards", shards8]
    assert config_from_args(base + ["--skip-bad-shards", "--progress", "off"]).data.skip_bad_shards is True
    assert config_from_args(base + ["--skip-bad-shards", "true"]).data.skip_bad_shards is True
    assert config_from_args(base + ["--skip-bad-shards", "false"]).data.skip_bad_shards is False
    assert config_from_args(base).data.skip_bad_shards is False
    for argv, want in (([], False), (["--skip-bad-shards"], True), (["--skip-bad-shards", "true"], True),
                       (["--skip-bad-shards", "false"], False)):
        assert eval_parser().parse_args(["--checkpoint", "c", *argv]).skip_bad_shards is want
    with pytest.raises(SystemExit):
        config_from_args(base + ["--skip-bad-shards", "maybe"])
    assert "expected true/false, got 'maybe'" in capsys.readouterr().err


def test_init_from_copies_weights_with_a_fresh_optimizer(tmp_path, shards8, debug_model_config):
    first = train(debug(out_dir=str(tmp_path / "s1"), shards=[shards8], max_steps=2, warmup_steps=0),
                  model_config=debug_model_config)
    trained = {n: p.detach().clone() for n, p in first["model"].named_parameters() if p.requires_grad}
    s2 = train(debug(out_dir=str(tmp_path / "s2"), shards=[shards8], max_steps=1, warmup_steps=0, lr=1e-9,
                     init_from=str(tmp_path / "s1")), model_config=debug_model_config)
    after = dict(s2["model"].named_parameters())
    assert all(torch.allclose(after[n], t, atol=1e-6) for n, t in trained.items())   # lr 1e-9: one step moves nothing
    assert json.loads((tmp_path / "s2" / "log.jsonl").read_text().splitlines()[0])["step"] == 0


def test_optimizer_settings_given_on_resume_take_effect_and_are_logged(tmp_path, shards8, debug_model_config, capsys):
    """Resuming with a new --lr (and weight decay, beta2): the optimizer state comes back, the new settings are what
    it uses (the weights barely move at lr 1e-6), and the change is printed and logged in the resume event."""
    kw = dict(shards=[shards8], max_steps=4, warmup_steps=0, min_lr_ratio=1.0, save_every=2)   # a constant lr
    train(debug(out_dir=str(tmp_path), lr=1e-3, stop_after=2, **kw), model_config=debug_model_config)
    capsys.readouterr()
    train(debug(out_dir=str(tmp_path), lr=1e-6, weight_decay=0.2, beta2=0.9, **kw), model_config=debug_model_config)
    step2, step4 = list_checkpoints(str(tmp_path))
    groups = torch.load(step4 / "optimizer.pt", weights_only=True)["param_groups"]
    n = len(groups)
    assert [(g["base_lr"], g["lr"], tuple(g["betas"])) for g in groups] == [(1e-6, 1e-6, (0.9, 0.9))] * n
    assert sorted(g["weight_decay"] for g in groups) == [0.0] * (n - 1) + [0.2]         # none on biases and norms
    before, after = load_file(str(step2 / "model.safetensors")), load_file(str(step4 / "model.safetensors"))
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-5       # 2 steps at 1e-3 move ~2e-3
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    resume = next(r for r in log if r.get("event") == "resume")
    changes = resume["hyperparameter_changes"]
    assert changes["base_lr"] == [[1e-3] * n, [1e-6] * n] and changes["betas"] == [[[0.9, 0.95]] * n, [[0.9, 0.9]] * n]
    assert sorted(changes["weight_decay"][1]) == [0.0] * (n - 1) + [0.2] and "eps" not in changes
    assert [r["lr"] for r in log if "loss" in r] == [1e-3, 1e-3, 1e-6, 1e-6]
    assert "base_lr [0.001" in capsys.readouterr().err


def test_rec_answers_cut_at_max_length_are_logged_and_warned(tmp_path, debug_model_config, capsys):
    shards = make_multibox_shards(tmp_path)
    s = train(debug(out_dir=str(tmp_path / "run"), shards=[shards], max_steps=2, save_every=0, max_length=48),
              model_config=debug_model_config)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert s["answer_cut"] == log[-1]["answer_cut"] == log[-2]["answer_cut"] > 0       # end event, last step
    assert "warning: REC samples cut inside their box answer at --max-length 48" in capsys.readouterr().err
    s = train(debug(out_dir=str(tmp_path / "long"), shards=[shards], max_steps=2, save_every=0, max_length=200),
              model_config=debug_model_config)
    assert s["answer_cut"] == 0 and "warning" not in capsys.readouterr().err


def test_fewer_rows_than_loader_slots_stops_before_anything_is_built(tmp_path):
    from grounding.cli import UsageError

    shards = make_shards(tmp_path, n_images=3, rows_per_shard=3)
    with pytest.raises(UsageError, match=r"the shards hold 3 rows, fewer than the 4 loader slots \(1 ranks x 4 workers\)"):
        main(["--shards", shards, "--num-workers", "4", "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_model_json_naming_a_missing_directory_is_a_usage_error(tmp_path, shards8, monkeypatch):
    """--model cogvlm.json with relative lm/vision: read from the working directory, checked before anything is built
    (a name with one '/', ``org/name``, may be a hub id: left to the hub)."""
    from grounding.cli import UsageError

    (tmp_path / "models" / "lm").mkdir(parents=True)
    (tmp_path / "cogvlm.json").write_text(json.dumps({"lm": "models/lm", "vision": "models/towers/vit"}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=rf"--model cogvlm.json: vision 'models/towers/vit' is no directory .*{tmp_path}"):
        main(["--model", "cogvlm.json", "--shards", shards8, "--out-dir", "run"])
    assert not (tmp_path / "run").exists()
