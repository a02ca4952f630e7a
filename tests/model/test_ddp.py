"""Distributed training on CPU under torchrun (gloo): DDP ranks stay in sync; FSDP (fully_shard) trains,
checkpoints full weights and resumes exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers_train import make_shards

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def torchrun(out, shards, *args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "model.train", "--preset", "debug", "--out-dir", str(out), "--shards", shards,
           "--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--device", "cpu", *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_process_gloo_ddp_stays_in_sync(tmp_path):
    shards = make_shards(tmp_path, n_images=8, rows_per_shard=2)      # 4 shards: 2 per rank
    out = tmp_path / "run"
    log = torchrun(out, shards)
    start, end = log[0], log[-1]
    assert start["world_size"] == 2 and start["parallel"] == "ddp"
    assert end["event"] == "end" and end["step"] == 4
    assert end["ranks_in_sync"] is True and end["rank_checksums"][0] == end["rank_checksums"][1]
    assert sum("loss" in r for r in log) == 4
    state = json.loads(sorted((out / "checkpoints").iterdir())[-1].joinpath("trainer_state.json").read_text())
    r0, r1 = state["data_states"]
    assert r0["num_slots"] == r1["num_slots"] == 2 and r0["batches"] == r1["batches"] == 4
    # each rank read 4 batches x 2 samples from its own 2 shards (4 rows): epoch 0, then all 4 rows of epoch 1
    assert r0["cursors"] == r1["cursors"] == {"0": [1, 4, 0]}


def test_two_process_fsdp_resumes_exactly(tmp_path):
    shards = make_shards(tmp_path, n_images=8, rows_per_shard=2)
    straight = torchrun(tmp_path / "a", shards, "--parallel", "fsdp", "--deterministic", "true")
    torchrun(tmp_path / "b", shards, "--parallel", "fsdp", "--deterministic", "true", "--stop-after", "2")
    resumed = torchrun(tmp_path / "b", shards, "--parallel", "fsdp", "--deterministic", "true")
    assert straight[0]["parallel"] == "fsdp" and straight[-1]["ranks_in_sync"] is True, straight
    a, b = [r["loss"] for r in straight if "loss" in r], [r["loss"] for r in resumed if "loss" in r]
    assert a == b, (a, b)
    assert [r["event"] for r in resumed if "event" in r] == ["start", "end", "resume", "end"]
