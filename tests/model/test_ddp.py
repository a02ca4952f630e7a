"""Distributed training on CPU under torchrun (gloo): DDP ranks stay in sync; FSDP (fully_shard) trains,
checkpoints full weights and resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers_train import make_shards

HERE = os.path.dirname(os.path.abspath(__file__))

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_job(cmd, env, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run a torchrun job in its own process group; a job that hangs is killed whole (workers included) and fails."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung: no exit in {timeout} s, killed; the log's tail:\n{(out or '')[-1500:]}{(err or '')[-1500:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(out, shards, *args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "model.train", "--preset", "debug", "--out-dir", str(out), "--shards", shards,
           "--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--device", "cpu", *args]
    proc = run_job(cmd, ENV)
    assert proc.returncode == 0, f"torchrun {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_process_gloo_ddp_stays_in_sync(tmp_path):
    shards = make_shards(tmp_path, n_images=8, rows_per_shard=2)      # 4 shards: 2 per rank
    out = tmp_path / "run"
    log = torchrun(out, shards, "--eval-shards", shards, "--eval-every", "4", "--eval-limit", "3")
    start, end = log[0], log[-1]
    assert start["world_size"] == 2 and start["parallel"] == "ddp"
    assert [(r["step"], r["n"]) for r in log if r.get("event") == "eval"] == [(4, 3)]   # shares 2 + 1 (+1 copy dropped)
    assert end["event"] == "end" and end["step"] == 4
    assert end["ranks_in_sync"] is True and end["rank_digests"][0] == end["rank_digests"][1]
    assert end["rank_weight_digests"][0] == end["rank_weight_digests"][1]          # DDP: full replicas
    assert sum("loss" in r for r in log) == 4
    state = json.loads(sorted((out / "checkpoints").iterdir())[-1].joinpath("trainer_state.json").read_text())
    r0, r1 = state["data_states"]
    assert r0["num_slots"] == r1["num_slots"] == 2 and r0["batches"] == r1["batches"] == 4
    # each rank read 4 batches x 2 samples from its own 2 shards (4 rows): epoch 0, then all 4 rows of epoch 1
    assert r0["cursors"] == r1["cursors"] == {"0": [1, 4, 0]}


def test_two_process_fsdp_resumes_exactly(tmp_path):
    """With an EMA (the stage2 preset keeps one): its sharded shadow is saved whole and resharded on resume."""
    from safetensors.torch import load_file

    shards = make_shards(tmp_path, n_images=8, rows_per_shard=2)
    flags = ("--parallel", "fsdp", "--deterministic", "true", "--ema-decay", "0.5")
    straight = torchrun(tmp_path / "a", shards, *flags)
    torchrun(tmp_path / "b", shards, *flags, "--stop-after", "2")
    resumed = torchrun(tmp_path / "b", shards, *flags)
    ema_a, ema_b = (load_file(str(tmp_path / d / "checkpoints" / "step_00000004" / "ema.safetensors")) for d in "ab")
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert straight[0]["parallel"] == "fsdp" and straight[-1]["ranks_in_sync"] is True, straight
    shard0, shard1 = straight[-1]["rank_weight_digests"]
    assert shard0 != shard1                    # each rank hashed its own shard (nothing all-gathered)
    a, b = [r["loss"] for r in straight if "loss" in r], [r["loss"] for r in resumed if "loss" in r]
    assert a == b, (a, b)
    assert [r["event"] for r in resumed if "event" in r] == ["start", "end", "resume", "end"]


def test_two_process_fsdp_evaluates_during_training(tmp_path):
    """--eval-every under FSDP: every forward needs both ranks, so both evaluate (a share each, padded to one
    length, generation stopping when both ranks are done) with the EMA weights; rank 0 logs all 5 examples once,
    with the numbers one process computes from the saved EMA weights and the token budget that fits the answers."""
    shards = make_shards(tmp_path, n_images=8, rows_per_shard=2)
    log = torchrun(tmp_path / "run", shards, "--parallel", "fsdp", "--eval-shards", shards, "--eval-every", "2",
                   "--eval-limit", "5", "--eval-batch-size", "2", "--ema-decay", "0.5")
    evals = [r for r in log if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and all(e["n"] == 5 for e in evals), evals
    from model.checkpoint import load_model_from_checkpoint
    from model.evaluate import answer_budget, evaluate_rec, shard_examples

    model, info = load_model_from_checkpoint(str(tmp_path / "run"))
    examples = shard_examples([shards], "eval", 5)
    summary, _ = evaluate_rec(model, examples, batch_size=2)
    assert info["step"] == 4 and info["weights"] == "ema" and summary["max_new_tokens"] == answer_budget(model.tokenizer, examples) > 24
    keys = ("n", "acc@0.5", "parse_failures", "cut_answers", "max_new_tokens")
    assert {k: evals[-1][k] for k in keys} == {k: summary[k] for k in keys}
    assert evals[-1]["mean_iou"] == pytest.approx(summary["mean_iou"], abs=1e-6)


def test_sync_check_sees_ranks_that_disagree(tmp_path):
    """ranks_in_sync must be able to fail: rank 1 changes a buffer, its optimizer step count or its copy of a
    weight after one step. DDP sees all three; FSDP sees the replicated ones (a shard has one owner), and
    refuses at wrap time ranks that built different weights (FSDP2 never broadcasts them)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(HERE, "sync_worker.py"), str(tmp_path)]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([os.getcwd(), ENV.get("PYTHONPATH", "")])}
    proc = run_job(cmd, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1                                                     # every rank reaches the same verdict
    verdict = {mode: {k: v["ranks_in_sync"] for k, v in r0[mode].items()} for mode in ("ddp", "fsdp")}
    assert verdict == {"ddp": {"same": True, "buffer": False, "optimizer_step": False, "weight": False},
                       "fsdp": {"same": True, "buffer": False, "optimizer_step": False, "weight": True}}
    assert r0["fsdp"]["weight"]["rank_weight_digests"] != r0["fsdp"]["same"]["rank_weight_digests"]
    assert "different weights before sharding" in r0["fsdp_different_start"]


def test_torch_floor_is_the_tested_release():
    """pyproject's torch floor is the release this suite runs on: a floor below it would claim untested releases."""
    import re
    from pathlib import Path

    import torch
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    text = (Path(HERE).parents[1] / "pyproject.toml").read_text()
    spec = SpecifierSet(re.search(r'"torch([^"]+)"', text).group(1))
    floor = Version(next(s.version for s in spec if s.operator == ">="))
    running = Version(torch.__version__.split("+")[0])
    assert running in spec and (floor.major, floor.minor) == (running.major, running.minor), (str(spec), str(running))
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401  (needs >= 2.6)
