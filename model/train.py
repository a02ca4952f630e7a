"""Stage-two training of the visual-expert model on grounding shards (CogVLM's REC + caption mix).

    python -m model.train --preset debug --shards 'data/train/*.parquet' --out-dir runs/debug
    torchrun --nproc-per-node 8 -m model.train --preset stage2 --shards 's3://bucket/grounding/*.parquet' \\
        --out-dir runs/stage2 --model configs/cogvlm.json
    # several nodes (same command on each; a shared file system for --out-dir):
    torchrun --nnodes 4 --node-rank $NODE_RANK --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint $MASTER_HOST:29500 -m model.train --preset stage2 ...

What one run does: AdamW over the model's parameter groups (the LM's at ``lm_lr_mult`` times the
learning rate when it is unfrozen), linear warmup then cosine decay to ``min_lr_ratio``, gradient
clipping, gradient accumulation, bfloat16 autocast on GPU, an optional EMA of the trainable weights
(the paper used one). Logs go to the console (a progress bar) and to ``out_dir/log.jsonl``: loss,
learning rate, gradient norm, tokens/s, samples/s and the data rows skipped (corrupt images...) and the
samples truncated to ``max_length`` (kept, counted apart; ``answer_cut``: the REC ones among them, whose box
answer lost its end, warned about once).

A run whose ``out_dir`` holds a checkpoint resumes from it (``--resume auto``), exactly: with
``--deterministic`` on CPU, 2N steps straight and N steps + resume + N steps log identical losses
(tests/model/test_train.py). The optimizer's moments come back from the checkpoint; its settings (``--lr``,
``--weight-decay``, ``--beta1``/``--beta2``, the schedule) are this command's, and those that differ from the
checkpoint's are printed and logged (``hyperparameter_changes`` in the ``resume`` event). Every rank reads its
own shards (model.data); rank 0 writes logs and checkpoints.

This file is the loop and its command line; the pieces live beside it: model.train_config (the run's
configuration, in sections, and its presets), model.optim (AdamW, schedule, EMA), model.checkpoint (save,
find, resume, load for inference), model.distributed (process group, DDP/FSDP wrapping, sync check).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from grounding.cli import UsageError, add_bool_flag, field_flags, flag_hint, run_cli
from model.checkpoint import find_checkpoint, init_weights, load_checkpoint, resume_path, save_checkpoint
from model.data import GroundingBatches, make_loader
from model.distributed import (
    Dist, all_ranks, gather_objects, init_distributed, mean_across, ranks_in_sync, reshard, unwrap, wrap_parallel,
)
from model.optim import EMA, build_optimizer, clip_gradients, set_lr
from model.train_config import PRESETS, TrainConfig, flat_fields


# --- the run's pieces ------------------------------------------------------------------------

def resolve_model_config(cfg: TrainConfig):
    """The VisualExpertConfig this run trains: the debug preset (written under out_dir) or a JSON file."""
    from model import cogvlm

    if cfg.model == "debug":
        from model.testing import write_debug_model
        mcfg = write_debug_model(os.path.join(cfg.out_dir, "debug_model"))
    else:
        mcfg = cogvlm.VisualExpertConfig(**json.loads(Path(cfg.model).read_text()))
    return dataclasses.replace(mcfg, **cfg.model_overrides) if cfg.model_overrides else mcfg


def absolute_model_paths(mcfg):
    """``lm``/``vision`` that name local directories, made absolute: checkpoints record the resolved paths,
    so evaluation from another working directory finds them (hub ids stay as they are)."""
    paths = {k: os.path.abspath(getattr(mcfg, k)) for k in ("lm", "vision") if os.path.isdir(getattr(mcfg, k, ""))}
    return dataclasses.replace(mcfg, **paths) if paths and dataclasses.is_dataclass(mcfg) else mcfg


def build_model(model_config, seed: int):
    from model.cogvlm import VisualExpertForCausalLM

    torch.manual_seed(seed)
    return VisualExpertForCausalLM.from_config(model_config)


def autocast_context(cfg: TrainConfig, device: torch.device):
    if device.type != "cuda" or cfg.autocast_dtype == "float32":
        return nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, cfg.autocast_dtype))


def set_determinism(deterministic: bool) -> None:
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass
class Progress:
    """Where the run is (saved in every checkpoint): optimizer steps, batches read, each loader worker's
    data cursor, and totals over all ranks (samples, tokens, rows skipped by reason, samples truncated, REC
    samples among them whose box answer was cut: ``answer_cut``)."""
    step: int = 0
    batches: int = 0
    cursors: dict = field(default_factory=dict)
    totals: dict = field(default_factory=lambda: {"samples": 0, "tokens": 0, "skipped": {}, "truncated": 0,
                                                  "answer_cut": 0})

    def count(self, batch: dict, world_size: int) -> None:
        self.batches += 1
        self.cursors[batch["worker"]] = tuple(batch["cursor"])
        for k, v in batch["skipped"].items():
            self.totals["skipped"][k] = self.totals["skipped"].get(k, 0) + v
        self.totals["truncated"] += batch.get("truncated", 0)
        self.totals["answer_cut"] += batch.get("answer_cut", 0)
        self.totals["samples"] += batch["input_ids"].shape[0] * world_size   # every micro-step: exact in checkpoints
        self.totals["tokens"] += int(batch["attention_mask"].sum()) * world_size

    def restore(self, state: dict, rank: int) -> dict:
        """Take a checkpoint's trainer state; returns this rank's data state."""
        ds = state["data_states"][rank]
        self.step, self.batches = state["step"], ds["batches"]
        self.cursors = {int(k): tuple(v) for k, v in ds["cursors"].items()}
        self.totals = {**self.totals, **state.get("totals", {})}   # older checkpoints lack "truncated", "answer_cut"
        return ds


class Throughput:
    """Samples and tokens per second over the window since the last log, minus eval/save pauses."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t, self.samples, self.tokens, self.paused = time.perf_counter(), 0, 0, 0.0

    def add(self, batch: dict) -> None:
        self.samples += batch["input_ids"].shape[0]
        self.tokens += int(batch["attention_mask"].sum())

    def rates(self, world_size: int) -> dict:
        dt = max(time.perf_counter() - self.t - self.paused, 1e-9)
        out = {"samples_per_s": self.samples * world_size / dt, "tokens_per_s": self.tokens * world_size / dt}
        self.reset()
        return out


class JsonlLog:
    def __init__(self, path: Path | None):
        self.path = path
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# --- the loop --------------------------------------------------------------------------------

def train(cfg: TrainConfig, model_config=None, on_eval=None) -> dict:
    """Run (or resume) training; returns a summary (``history``: the logged steps, ``model``: the trained
    model, unwrapped). ``model_config`` (a VisualExpertConfig) replaces ``cfg.model``."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, model_config, on_eval)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(cfg: TrainConfig, model_config, on_eval) -> dict:
    dist = init_distributed(cfg.device)
    set_determinism(cfg.deterministic)
    out = Path(cfg.out_dir)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    if dist.enabled:
        torch.distributed.barrier()
    mcfg = model_config if model_config is not None else (resolve_model_config(cfg) if dist.main else None)
    if model_config is None and dist.enabled:
        mcfg = gather_objects(mcfg, dist)[0]  # rank 0 writes the debug checkpoints once
    mcfg = absolute_model_paths(mcfg)

    # model, optimizer, data
    model = build_model(mcfg, cfg.seed)
    if cfg.checkpoint.init_from:
        init_weights(model, cfg.checkpoint.init_from)
    model.to(dist.device).train()
    preprocess, tokenizer = model.image_transform, model.tokenizer
    amp = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype != "float32" else None
    model, mode = wrap_parallel(model, "ddp" if cfg.parallel == "auto" else cfg.parallel, dist, amp)
    inner = unwrap(model)
    optimizer = build_optimizer(inner, cfg.optim, fused=dist.device.type == "cuda" and mode != "fsdp")
    ema = EMA(inner, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    dataset = GroundingBatches(cfg.data, tokenizer, preprocess, dist.rank, dist.world_size, cfg.num_workers)

    # fresh start or exact resume
    progress = Progress()
    ckpt_path = resume_path(cfg.checkpoint, cfg.out_dir)
    torch.manual_seed(cfg.seed + 1000 + dist.rank)  # dropout etc. differ by rank, replay exactly
    random.seed(cfg.seed + dist.rank)
    changed = {}
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, model, optimizer, ema, dist, mode)
        changed = state["hyperparameter_changes"]           # this run's --lr etc. take effect; say which changed
        dataset.resume(progress.restore(state, dist.rank))
    log = JsonlLog(out / "log.jsonl" if dist.main else None)
    if dist.main:
        (out / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "model": _config_dict(mcfg)}, indent=1))
        if changed:
            print("resume: optimizer settings changed since the checkpoint, the new ones apply: "
                  + "; ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()), file=sys.stderr)
        log.write({"event": "start" if ckpt_path is None else "resume", "step": progress.step,
                   **({"hyperparameter_changes": changed} if ckpt_path is not None else {}),
                   "world_size": dist.world_size, "parallel": mode, "device": str(dist.device),
                   "checkpoint": str(ckpt_path) if ckpt_path else None, "bad_shards": dataset.bad_shards,
                   "trainable_params": sum(p.numel() for p in inner.parameters() if p.requires_grad),
                   "total_params": sum(p.numel() for p in inner.parameters())})

    stop, accum = cfg.stop, cfg.optim.grad_accum
    bar = None
    if dist.main and cfg.progress and progress.step < stop:
        from tqdm import tqdm
        bar = tqdm(total=stop, initial=progress.step, desc="train", unit="step", dynamic_ncols=True)
    history: list[dict] = []
    data_iter = iter(make_loader(dataset, cfg.seed))
    meter, last_eval, warned_cut = Throughput(), None, False
    while progress.step < stop:
        lr = set_lr(optimizer, progress.step, cfg.optim)
        loss_sum = 0.0
        for micro in range(accum):
            batch = next(data_iter)
            progress.count(batch, dist.world_size)
            meter.add(batch)
            sync = micro == accum - 1 or mode != "ddp"     # DDP: all-reduce gradients on the last micro-step only
            with (nullcontext() if sync else model.no_sync()), autocast_context(cfg, dist.device):
                loss = model(**{k: batch[k].to(dist.device)
                                for k in ("input_ids", "attention_mask", "pixel_values", "labels")}).loss / accum
            loss.backward()
            loss_sum += loss.item()
        grad_norm = clip_gradients(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(inner, progress.step)
        progress.step += 1
        step, loss_val = progress.step, mean_across(loss_sum, dist)
        if step % cfg.log_every == 0 or step == stop:
            rec = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": float(grad_norm),
                   **meter.rates(dist.world_size), "skipped": dict(progress.totals["skipped"]),
                   "truncated": progress.totals["truncated"], "answer_cut": progress.totals["answer_cut"]}
            history.append(rec)
            log.write(rec)
            if rec["answer_cut"] and not warned_cut and dist.main:
                warned_cut = True
                print(f"warning: REC samples cut inside their box answer at --max-length {cfg.data.max_length} (no "
                      f"EOS, boxes incomplete; {rec['answer_cut']} so far on this rank, counted as answer_cut in "
                      "log.jsonl): raise --max-length", file=sys.stderr)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        pause_t = time.perf_counter()                # throughput counts training time only
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == stop):
            last_eval = evaluate_during_training(cfg, inner, ema, dist, step, log)
            if on_eval is not None:
                on_eval(step, last_eval)
        if (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0) or step == stop:
            save_checkpoint(cfg.out_dir, step, model, optimizer, ema,
                            {"data_state_local": dataset.state_after(progress.cursors, progress.batches),
                             "totals": progress.totals, "config": cfg.to_dict(), "model_config": _config_dict(mcfg)},
                            cfg.checkpoint.keep_last, dist, mode)
        meter.paused += time.perf_counter() - pause_t
    if bar is not None:
        bar.close()

    totals = progress.totals
    in_sync = ranks_in_sync(model, optimizer, dist)
    summary = {"step": progress.step, "history": history, "last_eval": last_eval, "skipped": totals["skipped"],
               "truncated": totals["truncated"], "answer_cut": totals["answer_cut"], "totals": totals,
               "out_dir": str(out), "model": inner, **in_sync}
    if dist.main:
        log.write({"event": "end", "step": progress.step, "skipped": totals["skipped"], "truncated": totals["truncated"],
                   "answer_cut": totals["answer_cut"], **in_sync})
    return summary


def evaluate_during_training(cfg: TrainConfig, model, ema: EMA | None, dist: Dist, step: int, log: JsonlLog) -> dict:
    """REC Acc@0.5 on ``eval.shards`` (EMA weights when kept). Every rank generates for its share of the examples,
    in lockstep (under FSDP each forward needs every rank: the shares are padded to one length and generation
    stops when every rank's rows are done); rank 0 logs the summary of all results. The same dict on every rank."""
    from model.evaluate import answer_budget, evaluate_rec, shard_examples, summarize

    examples = shard_examples(cfg.eval.shards, "eval", cfg.eval.limit)       # every rank reads the same list
    budget = cfg.eval.max_new_tokens or answer_budget(model.tokenizer, examples)
    mine = examples[dist.rank::dist.world_size]
    share = -(-len(examples) // dist.world_size)                              # ceil: the longest share
    padded = mine + examples[:1] * (share - len(mine))                       # copies, scored and dropped
    backup = None
    if ema is not None:
        backup = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
        model.load_trainable_state_dict({k: v.to(backup[k].dtype) for k, v in ema.shadow.items()})
    sync = (lambda finished: all_ranks(finished, dist)) if dist.enabled else None
    _, results = evaluate_rec(model, padded, batch_size=cfg.eval.batch_size, max_new_tokens=budget, all_done=sync)
    reshard(model)
    if backup is not None:
        model.load_trainable_state_dict(backup)
    summary = summarize([r for rank_results in gather_objects(results[:len(mine)], dist) for r in rank_results])
    result = {k: summary[k] for k in ("n", "acc@0.5", "mean_iou", "parse_failures", "cut_answers")}
    result["max_new_tokens"] = budget
    if dist.main:
        log.write({"event": "eval", "step": step, **result})
    return result


def _config_dict(mcfg) -> dict:
    return dataclasses.asdict(mcfg) if dataclasses.is_dataclass(mcfg) else dict(vars(mcfg))


# --- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """``--preset`` (or ``--config`` of an earlier run), then one ``--name value`` per field
    (flat names, see model.train_config; lists: several values; dicts: JSON)."""
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: debug")
    p.add_argument("--config", default=None, help="replay a run: its out_dir/config.json (flags still override)")
    for name, f in flat_fields():
        flag = "--" + name.replace("_", "-")
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if t.startswith("list"):
            p.add_argument(flag, nargs="*", default=None)
        elif t == "dict":
            p.add_argument(flag, type=json.loads, default=None, help="JSON object")
        elif t == "bool":
            add_bool_flag(p, flag)                      # --flag, or --flag true|false
        elif t.startswith("int"):
            p.add_argument(flag, type=_optional_int if "None" in t else int, default=None)
        elif t == "float":
            p.add_argument(flag, type=float, default=None)
        else:
            p.add_argument(flag, default=None)
    return p


def _optional_int(s: str) -> int | None:
    return None if s.lower() in ("none", "") else int(s)


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags -> a validated :class:`TrainConfig`; a value out of range is a :class:`UsageError` naming its flag."""
    args = vars(build_parser().parse_args(argv))
    preset, config = args.pop("preset"), args.pop("config")
    overrides = {k: v for k, v in args.items() if v is not None}
    if config is not None:
        if preset is not None:
            raise UsageError("give --preset or --config, not both")
        try:
            saved = json.loads(Path(config).read_text())["train"]
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"--config {config}: not a run's config.json ({type(e).__name__}: {e})") from e
    try:
        if config is not None:
            return TrainConfig.from_dict(saved).with_overrides(**overrides)
        return PRESETS[preset or "debug"](**overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(flag_hint(str(e), field_flags([name for name, _ in flat_fields()]))) from e


def check_inputs(cfg: TrainConfig) -> None:
    """What a run would otherwise find wrong only after building its model, or at its first eval: the model
    JSON (and the local LM / vision directories it names), the checkpoint to resume or start from, the training and eval shards (footers only), fewer training
    rows than (rank, loader worker) slots."""
    from grounding.schema import check_shards
    from model.data import READ_COLUMNS, check_slots, resolve_shards

    if not cfg.data.shards:
        raise UsageError("no training data: give --shards GLOB [GLOB ...] (grounding shards, OUT/shards/*.parquet)")
    if cfg.model != "debug" and not Path(cfg.model).is_file():
        raise UsageError(f"--model {cfg.model}: no such file (a JSON of VisualExpertConfig fields, or 'debug')")
    if cfg.model != "debug":
        from model.cogvlm import is_local_path
        try:
            fields = json.loads(Path(cfg.model).read_text())
        except ValueError as e:
            raise UsageError(f"--model {cfg.model}: not JSON ({e})") from e
        for key in ("lm", "vision"):
            value = fields.get(key) if isinstance(fields, dict) else None
            if isinstance(value, str) and is_local_path(value) and not os.path.isdir(value):
                raise UsageError(f"--model {cfg.model}: {key} {value!r} is no directory (a relative path is read "
                                 f"from the working directory, {os.getcwd()})")
    for flag, path in (("--resume", cfg.checkpoint.resume if cfg.checkpoint.resume not in ("auto", "none") else None),
                       ("--init-from", cfg.checkpoint.init_from)):
        if path:
            try:
                find_checkpoint(path)
            except FileNotFoundError as e:
                raise UsageError(f"{e}; check {flag} (a checkpoint folder or a run folder)") from e
    for flag, shards in (("--shards", cfg.data.shards), ("--eval-shards", cfg.eval.shards)):
        try:
            files = resolve_shards(shards)
        except FileNotFoundError as e:
            raise UsageError(f"{e}; check {flag}") from e
        columns = READ_COLUMNS + (["phrases"] if flag == "--eval-shards" else [])
        footers, _ = check_shards(files, columns=columns, skip_bad=cfg.data.skip_bad_shards and flag == "--shards",
                                  flag=flag)
        if flag == "--shards" and sum(f.num_rows for f in footers.values()):    # no rows at all: said when read
            check_slots(sum(f.num_rows for f in footers.values()), int(os.environ.get("WORLD_SIZE", "1")),
                        cfg.num_workers)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = config_from_args(argv)
    check_inputs(cfg)
    finished = False
    try:
        summary = train(cfg)
        finished = True
        return summary
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if finished:  # a rank that failed (bad data in its slot) must exit, not wait in a barrier for the others:
                torch.distributed.barrier()  # torchrun then stops them; no rank tears down while another talks to it
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    code = run_cli(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torch 2.13 + gloo/FSDP on CPU: after a clean run (logs and checkpoints written, process group
        # destroyed) the interpreter's teardown sometimes aborts ("terminate called without an active
        # exception", SIGABRT), failing the torchrun job; skip that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
