"""Train (or fine-tune) transformers' GroundingDINO on boxed phrases (COCO instances + refs).

    python -m detector.train --coco world/coco.json --refs world/refs.json --images world/images \\
        --val-coco val/coco.json --val-refs val/refs.json --val-images val/images --output runs/det

Writes under ``--output``:

- ``config.json``: the resolved :class:`TrainConfig` (replay a run with ``--config``);
- ``log.jsonl``: one line per ``log_every`` steps (loss and its parts, lr, seconds/step) and one per
  evaluation (``"eval"``: validation recall@1 and precision / recall by threshold);
- ``checkpoint.pt``: model, optimiser, schedule and step, written atomically (temporary file, then
  rename) every ``save_every`` steps; a rerun with the same ``--output`` resumes from it, and is refused
  (one line naming the keys, nothing written) when its config differs in anything but
  :data:`RESUMABLE_CHANGES` (where it runs, logging / saving / evaluation cadence, the held-out set; the
  steps and time budgets only under a constant learning rate, ``optim.min_lr_ratio = 1``);
- ``model/``: ``save_pretrained`` weights with tokenizer and image processor, the directory
  :class:`grounding.detect.BoxDetector` (``--detector-model`` of the pipeline) loads unchanged.

The loss is transformers' GroundingDINO loss with two upstream defects fixed (:mod:`detector.loss`).
From scratch (``model.init = None``) the model is the tiny preset of :mod:`grounding.testing`
with the offline tokenizer; ``model.init = DIR`` fine-tunes a saved GroundingDINO (e.g. a
``grounding-dino-tiny`` snapshot) with its own tokenizer and processor.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from detector.data import Collator, Example, batches, load_examples
from detector.evaluate import evaluate_detector
from detector.loss import detection_loss
from grounding.cli import UsageError, apply_flags, field_flags, flag_hint, run_cli


@dataclass
class DataConfig:
    coco: str = ""                         # COCO instances JSON (training)
    images: str = ""                       # directory the COCO file_names are relative to
    refs: str | None = None                # RefCOCO-style refs (phrases); None: category names
    val_coco: str | None = None            # held-out set for evaluation during training
    val_images: str | None = None
    val_refs: str | None = None
    val_limit: int = 200                   # held-out images evaluated (first N)
    exclude_phrases: list[str] = field(default_factory=list)  # images holding them are not trained on
    negatives: int = 2                     # up to N absent phrases added to each prompt
    shortest_edge: int = 128               # image size (from-scratch models; fine-tuning keeps the processor's)
    longest_edge: int = 256

    def __post_init__(self):
        if self.negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {self.negatives}")
        if self.val_limit < 1:
            raise ValueError(f"val_limit must be >= 1, got {self.val_limit}")
        if self.shortest_edge < 32 or self.longest_edge < self.shortest_edge:
            raise ValueError(f"need 32 <= shortest_edge <= longest_edge, got {self.shortest_edge}, {self.longest_edge}")


@dataclass
class ModelConfig:
    init: str | None = None                # saved GroundingDINO dir to fine-tune; None: tiny preset from scratch
    d_model: int = 32                      # tiny preset sizes (ignored with init)
    num_queries: int = 20
    max_text_len: int = 256
    auxiliary_loss: bool = True

    def __post_init__(self):
        if self.d_model < 8 or self.num_queries < 1:
            raise ValueError(f"d_model must be >= 8 and num_queries >= 1, got {self.d_model}, {self.num_queries}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05             # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.lr <= 0 or self.grad_clip <= 0 or self.warmup_steps < 0:
            raise ValueError("lr and grad_clip must be > 0, warmup_steps >= 0")


@dataclass
class TrainConfig:
    output: str = "runs/detector"
    steps: int = 5000
    batch_size: int = 8
    seed: int = 0
    threads: int = 1                       # torch threads (1 is fastest for this model on a small CPU)
    device: str = "cpu"
    log_every: int = 50
    eval_every: int = 1000                 # 0: only at the end
    save_every: int = 500
    max_minutes: float | None = None       # training-time budget: the schedule ends at steps or here, first reached
    budget_clock: str = "cpu"              # "cpu": this process's CPU time (robust to a shared machine) | "wall"
    max_wall_minutes: float | None = None  # a second budget on wall-clock training time (a loaded machine)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError(f"steps, batch_size and threads must be >= 1, got {self.steps}, {self.batch_size}, {self.threads}")
        if self.save_every < 1 or self.log_every < 1 or self.eval_every < 0:
            raise ValueError("save_every and log_every must be >= 1, eval_every >= 0")
        if self.budget_clock not in ("cpu", "wall"):
            raise ValueError(f"budget_clock must be 'cpu' or 'wall', got {self.budget_clock!r}")
        if not self.data.coco or not self.data.images:
            raise ValueError("data.coco and data.images are required (--coco, --images)")


# --- model -----------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, workdir: Path):
    """-> (model, tokenizer, image_processor); the processor files are saved in ``workdir/model``."""
    from transformers import AutoTokenizer, GroundingDinoForObjectDetection

    from grounding.detect import load_image_processor
    from grounding.testing import save_tokenizer_and_processor, tiny_detector_config

    if cfg.model.init:
        model = GroundingDinoForObjectDetection.from_pretrained(cfg.model.init)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.init)
        processor = load_image_processor(cfg.model.init)
        model.config.auxiliary_loss = cfg.model.auxiliary_loss
        return model, tokenizer, processor
    target = workdir / "model"
    save_tokenizer_and_processor(str(target), cfg.data.shortest_edge, cfg.data.longest_edge)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    processor = load_image_processor(str(target))
    mc = tiny_detector_config(len(tokenizer), cfg.model.max_text_len)
    mc.d_model, mc.num_queries, mc.auxiliary_loss = cfg.model.d_model, cfg.model.num_queries, cfg.model.auxiliary_loss
    torch.manual_seed(cfg.seed)
    return GroundingDinoForObjectDetection(mc), tokenizer, processor


def save_model(model, tokenizer, processor, path: Path) -> None:
    """``save_pretrained`` model + tokenizer + processor into ``path`` atomically (temp dir, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def progress(step: int, seconds: float, wall: float, cfg: TrainConfig) -> float:
    """Share of the run done: steps, training seconds under ``max_minutes`` or wall seconds under
    ``max_wall_minutes``, whichever is furthest.

    When a time budget binds, the cosine still reaches its end; when none binds the run is a
    deterministic function of the step."""
    done = step / cfg.steps
    if cfg.max_minutes:
        done = max(done, seconds / (60 * cfg.max_minutes))
    if cfg.max_wall_minutes:
        done = max(done, wall / (60 * cfg.max_wall_minutes))
    return min(1.0, done)


def lr_at(step: int, done: float, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine over the run's progress ``done`` (0..1)."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = min(1.0, done)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# --- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(path: Path, model, optimizer, step: int, seconds: float, wall: float, cfg: TrainConfig) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "train_seconds": seconds, "wall_seconds": wall, "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, tmp)
    os.replace(tmp, path)


# Settings a resume may change: where and how fast it runs, how often it logs, saves and evaluates, and
# the held-out set it is evaluated on. Everything else (data, model, optimiser, seed, batch size, and the
# steps and time budgets that shape the cosine schedule) decides the weights: a change mid-run would
# leave a checkpoint that no single config.json describes.
RESUMABLE_CHANGES = frozenset({"output", "threads", "device", "log_every", "eval_every", "save_every",
                               "data.val_coco", "data.val_images", "data.val_refs", "data.val_limit"})
# The run's length may change too when the learning rate does not depend on it (optim.min_lr_ratio == 1:
# warmup, then constant): resuming 3 steps to 6 then equals 6 steps straight.
SCHEDULE_LENGTH = frozenset({"steps", "max_minutes", "max_wall_minutes", "budget_clock"})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(saved: dict, cfg: TrainConfig, where: Path) -> None:
    """Refuse (:class:`UsageError`, one line naming the keys) a resume whose config differs from the
    checkpoint's in anything but :data:`RESUMABLE_CHANGES` (and :data:`SCHEDULE_LENGTH` under a constant lr)."""
    old, new = _flat(saved), _flat(json.loads(json.dumps(asdict(cfg))))
    allowed = RESUMABLE_CHANGES | (SCHEDULE_LENGTH if cfg.optim.min_lr_ratio == 1.0 else frozenset())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in allowed)
    if changed:
        diffs = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise UsageError(f"{where} was trained with another config ({diffs}); resume with --config "
                         f"{where.parent / 'config.json'} (only where it runs, the log / save / eval cadence and "
                         f"the held-out set may change; the length too under a constant lr) or use a new --output")


def load_checkpoint(state: dict, model, optimizer) -> tuple[int, float, float]:
    """Restore ``model``, ``optimizer`` and the RNG from a checkpoint's ``state``; -> (step, training seconds,
    wall seconds so far)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if "torch_rng" in state:  # dropout draws continue as in an uninterrupted run
        torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state["train_seconds"]), float(state["wall_seconds"])


# --- the loop --------------------------------------------------------------------------------

def load_data(cfg: TrainConfig) -> tuple[list[Example], list[Example], dict]:
    """Training and held-out examples; a file that is not COCO / refs JSON is a :class:`UsageError` naming its flags."""
    d = cfg.data
    train, skipped = _examples(d.coco, d.images, d.refs, d.exclude_phrases, "--coco / --refs")
    if not train:
        raise UsageError(f"{d.coco}: no trainable image (skipped: {skipped}); check --coco, --refs and --exclude-phrases")
    val: list[Example] = []
    if d.val_coco:
        val, _ = _examples(d.val_coco, d.val_images or d.images, d.val_refs, (), "--val-coco / --val-refs")
        val = val[:d.val_limit]
    return train, val, skipped


def _examples(coco: str, images: str, refs: str | None, exclude: Sequence[str], flags: str) -> tuple[list[Example], dict]:
    try:
        return load_examples(coco, images, refs, exclude)
    except (OSError, ValueError, KeyError, TypeError) as e:  # no such file, not JSON, not COCO's fields
        raise UsageError(f"{coco}{' / ' + refs if refs else ''}: not COCO instances (and RefCOCO refs) JSON "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); check {flags}") from e


def evaluate(cfg: TrainConfig, model_dir: Path, val: Sequence[Example]) -> dict:
    ev = evaluate_detector(str(model_dir), val, held_out_phrases=cfg.data.exclude_phrases, device=cfg.device)
    keep = ("recall_at_1", "top1_iou", "by_threshold", "threshold_for_target")
    return {name: {k: v for k, v in s.items() if k in keep} for name, s in ev.items()}


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the final evaluation (``{}`` without a validation set)."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True) if ckpt.exists() else None
    if state is not None:
        check_resume(state["config"], cfg, ckpt)  # before anything under --output is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    train_set, val_set, skipped = load_data(cfg)
    model, tokenizer, processor = build_model(cfg, out)
    model.to(cfg.device).train()
    collate = Collator(processor, tokenizer, model.config.max_text_len, cfg.data.negatives,
                       [p for ex in train_set for p in ex.phrases])
    fitting = [ex for ex in train_set if collate.fits(ex)]
    if len(fitting) < len(train_set):  # never truncated: a cut prompt would point labels at missing phrases
        skipped["prompt_too_long"] = len(train_set) - len(fitting)
        train_set = fitting
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr)
    step, seconds, wall = load_checkpoint(state, model, optimizer) if state is not None else (0, 0.0, 0.0)
    del state
    log = open(out / "log.jsonl", "a")
    write = lambda rec: (log.write(json.dumps(rec) + "\n"), log.flush())  # noqa: E731
    write({"event": "start", "step": step, "train_images": len(train_set), "val_images": len(val_set),
           "skipped": skipped, "parameters": sum(p.numel() for p in model.parameters()), "time": time.time()})
    epochs: dict[int, list[list[int]]] = {}
    per_epoch = len(batches(train_set, cfg.batch_size, cfg.seed, 0))
    clock = time.process_time if cfg.budget_clock == "cpu" else time.monotonic
    window, window_s, wall_s, sums = 0, 0.0, 0.0, {}
    result: dict = {}
    while progress(step, seconds, wall, cfg) < 1.0:
        t0, w0 = clock(), time.monotonic()
        epoch, pos = divmod(step, per_epoch)
        if epoch not in epochs:
            epochs.clear()
            epochs[epoch] = batches(train_set, cfg.batch_size, cfg.seed, epoch)
        batch_idx = epochs[epoch][pos]
        rng = random.Random(cfg.seed * 1_000_003 + step)
        batch = collate([train_set[i] for i in batch_idx], rng)
        batch = {k: (v.to(cfg.device) if torch.is_tensor(v) else
                     [{kk: vv.to(cfg.device) for kk, vv in t.items()} for t in v] if k == "labels" else v)
                 for k, v in batch.items()}
        lr = lr_at(step, progress(step, seconds, wall, cfg), cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss, parts = detection_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        step += 1
        window += 1
        seconds += clock() - t0
        window_s += clock() - t0
        wall_s += time.monotonic() - w0
        wall += time.monotonic() - w0
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc", "loss_giou_enc"):
            if k in parts:
                sums[k] = sums.get(k, 0.0) + parts[k]
        last = progress(step, seconds, wall, cfg) >= 1.0
        if step % cfg.log_every == 0 or last:
            write({"step": step, "lr": lr, "grad_norm": float(grad_norm), "sec_per_step": window_s / window,
                   "wall_sec_per_step": wall_s / window, "train_seconds": seconds,
                   **{k: v / window for k, v in sums.items()}})
            window, window_s, wall_s, sums = 0, 0.0, 0.0, {}
        if step % cfg.save_every == 0 or last:
            save_checkpoint(ckpt, model, optimizer, step, seconds, wall, cfg)
        if last or (cfg.eval_every and step % cfg.eval_every == 0):
            save_model(model, tokenizer, processor, out / "model")
            if val_set:
                t0 = time.monotonic()
                result = evaluate(cfg, out / "model", val_set)
                write({"event": "eval", "step": step, "eval_seconds": time.monotonic() - t0, **result})
                model.train()
    ended_by = ("steps" if step >= cfg.steps else f"max_minutes={cfg.max_minutes}"
                if cfg.max_minutes and seconds >= 60 * cfg.max_minutes else f"max_wall_minutes={cfg.max_wall_minutes}")
    write({"event": "end", "step": step, "train_seconds": seconds, "wall_seconds": wall, "ended_by": ended_by})
    log.close()
    return result


# --- command line ----------------------------------------------------------------------------

def _flags(ap: argparse.ArgumentParser, cls, prefix: str = "", dest_prefix: str = "") -> None:
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):  # a nested section: its own flags
            continue
        name, dest = f"--{prefix}{f.name.replace('_', '-')}", f"{dest_prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, bool):
            ap.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, list):
            ap.add_argument(name, dest=dest, nargs="*", default=None, metavar=f.name.upper())
        else:
            kind = {"max_minutes": float, "max_wall_minutes": float}.get(f.name, type(default) if default is not None else str)
            ap.add_argument(name, dest=dest, type=kind, default=None, metavar=f.name.upper())


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags (``--steps``, ``--coco`` (data), ``--model-init``, ``--optim-lr``...) over ``--config FILE``."""
    ap = argparse.ArgumentParser(prog="detector.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a JSON config (as OUTPUT/config.json); flags override it")
    _flags(ap, TrainConfig)
    _flags(ap, DataConfig, "", "data.")
    _flags(ap, ModelConfig, "model-", "model.")
    _flags(ap, OptimConfig, "optim-", "optim.")
    args = vars(ap.parse_args(argv))
    config = args.pop("config", None)
    try:
        base = json.loads(Path(config).read_text()) if config else {}
    except (OSError, ValueError) as e:
        raise UsageError(f"--config {config}: not a JSON config ({type(e).__name__}: {e})") from e
    if not isinstance(base, dict):
        raise UsageError(f"--config {config}: a JSON object of config fields, got {type(base).__name__}")
    for section in ("data", "model", "optim"):
        base.setdefault(section, {})
    apply_flags(base, args)
    try:
        return TrainConfig(**{k: v for k, v in base.items() if k not in ("data", "model", "optim")},
                           data=DataConfig(**base["data"]), model=ModelConfig(**base["model"]),
                           optim=OptimConfig(**base["optim"]))
    except (ValueError, TypeError) as e:  # a value out of range, an unknown field in --config
        raise UsageError(flag_hint(str(e), _config_flags())) from e


def _config_flags() -> dict[str, str]:
    """Config field name -> its flag (sections as :func:`parse_config` spells them)."""
    names = lambda cls: [f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.default_factory)]  # noqa: E731
    return {**field_flags(names(ModelConfig), "model-"), **field_flags(names(OptimConfig), "optim-"),
            **field_flags(names(DataConfig)), **field_flags(names(TrainConfig))}


def main(argv: Sequence[str] | None = None) -> int:
    """Train; a mistake in the flags or input files raises :class:`UsageError` (``run_cli``: one line, exit 2)."""
    cfg = parse_config(argv)
    result = train(cfg)
    print(json.dumps({"output": cfg.output, "model": str(Path(cfg.output) / "model"), "eval": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
