"""Shared layout of the learning proofs (``learn_*.py``): splits, seeds, artefacts built once, baselines, JSON.

- **Three disjoint image splits** per seed: ``train`` (fit), ``dev`` (watched while developing: curves,
  any tuning decision) and ``test`` (never looked at before the end; only reported). Each split is its
  own synthetic world (:func:`grounding.world.make_world` with its own world seed), so the image keys of
  the splits cannot overlap; :func:`proof_data` checks it anyway. Any split can be replaced by a folder
  of grounding shards (``overrides``): a proof can train on the pipeline's own pseudo-label shards and
  still be scored on the world's truth.
- **Artefacts built once, race-free** (:func:`build_once`): data folders and pretrained models are
  written to a private temporary name and renamed into place under a file lock, so two variants run in
  parallel never read a half-written model or overwrite each other's files.
- **Seeds and spread** (:func:`spread`): every figure is a list over seeds with mean, sample std,
  min and max.
- **JSON written by the script only** (:func:`write_json`, atomic), with :func:`run_conditions`: the
  command line, git commit (and whether the tree was dirty), machine, load average.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPLITS = ("train", "dev", "test")


# --- conditions and output -------------------------------------------------------------------

def git_commit() -> dict:
    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def run_conditions(script: str, argv: Sequence[str] | None = None, threads: int = 1) -> dict:
    """What a reader needs to replay and judge a run: command, commit, machine, load average."""
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    return {"command": " ".join(["python", f"benchmarks/{script}", *argv]), "git": git_commit(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
                       f"torch {torch.__version__}, {threads} thread(s) per process, "
                       f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def spread(values: Sequence[float]) -> dict:
    """Mean, sample std, min, max over seeds (std 0 for one seed)."""
    v = [float(x) for x in values]
    if not v:
        return {"n": 0}
    return {"n": len(v), "mean": round(statistics.fmean(v), 4),
            "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
            "min": round(min(v), 4), "max": round(max(v), 4), "values": [round(x, 4) for x in v]}


# --- artefacts built once ----------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(path: str | os.PathLike, build: Callable[[Path], object]) -> Path:
    """``build(tmp_dir)`` then rename ``tmp_dir`` -> ``path``, unless ``path`` exists; under a lock.

    Several processes may ask for the same artefact (two variants of one seed): one builds, the others
    wait on the lock and then find it complete. A crash leaves only a private ``.tmp`` folder behind.
    """
    path = Path(path)
    with _locked(path):
        if path.exists():
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return path


# --- data ----------------------------------------------------------------------------------------

def world_seed(seed: int, split: str, objects: str) -> int:
    """Distinct world seeds per (seed, split, one/multi-object): the splits share no image."""
    return 100_000 + 1000 * seed + 10 * SPLITS.index(split) + (1 if objects == "one" else 0)


def write_world_split(out: Path, n_images: int, wseed: int, objects: str) -> None:
    from grounding.world import make_world, write_truth_shards

    lo, hi = (1, 1) if objects == "one" else (2, 4)
    write_truth_shards(make_world(n_images, seed=wseed, min_objects=lo, max_objects=hi), out, rows_per_shard=256)


def proof_data(root: str | os.PathLike, seed: int, sizes: dict[str, int], objects: Sequence[str] = ("one", "multi"),
               overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Shard folders ``{f"{split}_{objects}": dir}`` for one seed, built once under ``root``.

    ``sizes``: images per split (``{"train": 6000, "dev": 100, "test": 100}``). ``overrides`` maps a
    key (``"train_multi"``) to an existing shards folder used instead (e.g. pseudo-label shards).
    """
    root = Path(root)
    out = {}
    for objs in objects:
        for split in SPLITS:
            key = f"{split}_{objs}"
            if overrides and key in overrides:
                out[key] = str(overrides[key])
                continue
            n, ws = sizes[split], world_seed(seed, split, objs)
            path = root / f"data-s{seed}" / f"{key}-{n}-w{ws}"
            build_once(path, lambda tmp, n=n, ws=ws, objs=objs: write_world_split(tmp, n, ws, objs))
            out[key] = str(path)
    check_disjoint(out)
    return out


def shard_keys(folder: str) -> set[str]:
    import pyarrow.parquet as pq

    from model.data import resolve_shards

    keys: set[str] = set()
    for p in resolve_shards([folder]):
        keys.update(pq.read_table(p, columns=["key"]).column("key").to_pylist())
    return keys


def check_disjoint(data: dict[str, str]) -> None:
    """No image key in two splits (train / dev / test), whatever the folders came from."""
    by_split: dict[str, set[str]] = {}
    for key, folder in data.items():
        by_split.setdefault(key.split("_")[0], set()).update(shard_keys(folder))
    for a in SPLITS:
        for b in SPLITS:
            if a < b and by_split.get(a) and by_split.get(b) and by_split[a] & by_split[b]:
                raise ValueError(f"splits {a} and {b} share {len(by_split[a] & by_split[b])} image keys")


# --- the wiring world: answers that depend on the image ------------------------------------------

SAME_KINDS = (("red", "ball"), ("blue", "box"), ("green", "kite"))


def same_objects_world(n_images: int, seed: int = 0, blank: bool = False) -> list:
    """``n_images`` 64x64 images that all hold the same three objects (SAME_KINDS) at fresh, non-overlapping
    places: each question has ``n_images`` different answers, so text alone can learn one box per phrase at
    best. ``blank=True``: the same captions, boxes and QA pairs, every picture a uniform grey (the control)."""
    import random

    from PIL import Image

    from grounding.world import WorldImage, WorldObject

    class BlankImage(WorldImage):
        def render(self) -> Image.Image:
            return Image.new("RGB", (self.width, self.height), (128, 128, 128))

    rng = random.Random(seed)
    world = []
    for i in range(n_images):
        objects: list = []
        while len(objects) < len(SAME_KINDS):
            colour, shape = SAME_KINDS[len(objects)]
            side = rng.randint(14, 24)
            x0, y0 = rng.randint(0, 64 - side), rng.randint(0, 64 - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] <= o.box[0] or o.box[2] <= box[0] or box[3] <= o.box[1] or o.box[3] <= box[1] for o in objects):
                objects.append(WorldObject(shape, colour, box))
        caption = "A red ball, a blue box and a green kite"
        pos = 0
        for o in objects:
            o.start = caption.lower().index(o.named, pos)
            o.end = pos = o.start + len(o.named)
        world.append((BlankImage if blank else WorldImage)(f"w{i:04d}", 64, 64, "white", caption, objects))
    return world


# --- baselines and scoring -------------------------------------------------------------------------

def baselines(train_dirs: Sequence[str], eval_dir: str) -> dict:
    """Acc@0.5 on ``eval_dir``'s REC pairs of (a) the training set's mean box and (b) a random object of
    the same image (expected hit rate = objects matching the truth / objects): what a model scores with
    no image, and with the image but no reading of the phrase."""
    from grounding.boxes import box_iou
    from model.evaluate import score_box, shard_examples, summarize

    train_ex = shard_examples(list(train_dirs))
    held = shard_examples([eval_dir])
    mean = tuple(round(sum(e.boxes[0][i] for e in train_ex) / len(train_ex)) for i in range(4))
    by_key: dict[str, list] = {}
    for e in held:
        by_key.setdefault(e.key, []).append(e.boxes[0])
    rand = sum(sum(box_iou(o, e.boxes[0]) >= 0.5 for o in by_key[e.key]) / len(by_key[e.key]) for e in held) / len(held)
    return {"n": len(held), "mean_box": list(mean),
            "mean_box_acc@0.5": round(summarize([score_box(mean, e) for e in held])["acc@0.5"], 4),
            "random_object_acc@0.5": round(rand, 4)}


def score(model, folder: str, limit: int | None = None, batch_size: int = 64) -> dict:
    """REC Acc@0.5 / mean IoU / parse failures of ``model`` on a shards folder (greedy answers)."""
    from model.evaluate import evaluate_rec, shard_examples

    summary, _ = evaluate_rec(model, shard_examples([folder], limit=limit), batch_size=batch_size)
    return {k: (round(summary[k], 4) if isinstance(summary[k], float) else summary[k])
            for k in ("n", "acc@0.5", "mean_iou", "parse_failures")}


def read_curve(log_path: str | os.PathLike, every: int = 1) -> tuple[list[dict], list[dict]]:
    """``(losses, evals)`` of a trainer's log.jsonl (losses thinned to every ``every``-th record + the last)."""
    losses, evals = [], []
    for line in Path(log_path).read_text().splitlines():
        r = json.loads(line)
        if r.get("event") == "eval":
            evals.append({"step": r["step"], "n": r["n"], "acc@0.5": round(r["acc@0.5"], 4),
                          "mean_iou": round(r["mean_iou"], 4), "parse_failures": r["parse_failures"]})
        elif "loss" in r:
            losses.append({"step": r["step"], "loss": round(r["loss"], 4)})
    return losses[::max(1, every)] + losses[-1:], evals


# --- parallel tasks ----------------------------------------------------------------------------------

def run_tasks(argvs: Sequence[list[str]], jobs: int, logs: Sequence[Path]) -> None:
    """Run ``python argv`` child processes, at most ``jobs`` at once (one thread each); fail loudly."""
    pending = list(zip(argvs, logs))
    running: list[tuple[subprocess.Popen, Path]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            argv, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            running.append((subprocess.Popen([sys.executable, *argv], stdout=open(log, "w"), stderr=subprocess.STDOUT),
                            log))
        time.sleep(2)
        for proc, log in list(running):
            if proc.poll() is not None:
                running.remove((proc, log))
                if proc.returncode != 0:
                    failed.append(f"{log} (exit {proc.returncode})")
    if failed:
        raise RuntimeError("task(s) failed, see " + ", ".join(failed))
