"""The shared layout of the learning proofs (benchmarks/learnlib.py): disjoint splits, artefacts built once."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import learnlib  # noqa: E402


def test_build_once_builds_one_complete_copy_under_concurrency(tmp_path):
    """Two variants asking for the same model at once: one builds, the other waits and reads it whole."""
    calls, seen = [], []

    def build(tmp: Path):
        calls.append(tmp)
        tmp.mkdir()
        (tmp / "part1").write_text("a")
        time.sleep(0.2)                       # a reader arriving now must not see a half-written folder
        (tmp / "part2").write_text("b")

    def worker():
        out = learnlib.build_once(tmp_path / "model", build)
        seen.append(sorted(p.name for p in out.iterdir()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert seen == [["part1", "part2"]] * 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_build_once_leaves_nothing_behind_when_the_build_fails(tmp_path):
    def build(tmp: Path):
        tmp.mkdir()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        learnlib.build_once(tmp_path / "model", build)
    assert not (tmp_path / "model").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_proof_data_splits_are_disjoint_and_a_shared_folder_is_refused(tmp_path):
    sizes = {"train": 6, "dev": 3, "test": 3}
    data = learnlib.proof_data(tmp_path, seed=0, sizes=sizes, objects=("multi",))
    keys = {k: learnlib.shard_keys(v) for k, v in data.items()}
    assert [len(keys[f"{s}_multi"]) for s in learnlib.SPLITS] == [6, 3, 3]
    assert not (keys["train_multi"] & keys["dev_multi"] or keys["train_multi"] & keys["test_multi"]
                or keys["dev_multi"] & keys["test_multi"])
    with pytest.raises(ValueError, match="share"):      # e.g. pseudo-label shards made from the test images
        learnlib.proof_data(tmp_path, seed=0, sizes=sizes, objects=("multi",),
                            overrides={"train_multi": data["test_multi"]})


def test_spread_over_seeds():
    s = learnlib.spread([0.5, 0.7, 0.6])
    assert (s["n"], s["mean"], s["min"], s["max"]) == (3, 0.6, 0.5, 0.7)
    assert s["std"] == pytest.approx(0.1)
