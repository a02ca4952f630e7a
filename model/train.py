"""Stage-two training of the visual-expert model on grounding shards (CogVLM's REC + caption mix).

    python -m model.train --preset debug --shards 'data/train/*.parquet' --out-dir runs/debug
    torchrun --nproc-per-node 8 -m model.train --preset stage2 --shards 's3://bucket/grounding/*.parquet' \\
        --out-dir runs/stage2 --model configs/cogvlm.json
    # several nodes (same command on each; a shared file system for --out-dir):
    torchrun --nnodes 4 --node-rank $NODE_RANK --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint $MASTER_HOST:29500 -m model.train --preset stage2 ...

What one run does: AdamW over the model's parameter groups (the LM's at ``lm_lr_mult`` times the
learning rate when it is unfrozen), linear warmup then cosine decay to ``min_lr_ratio``, gradient
clipping, gradient accumulation, bf16 autocast on GPU, an optional EMA of the trainable weights
(the paper used one). Logs go to the console (a progress bar) and to ``out_dir/log.jsonl``: loss,
learning rate, gradient norm, tokens/s, samples/s and the data rows skipped (corrupt images...) and the
samples truncated to ``max_length`` (kept, counted apart).

Checkpoints (``out_dir/checkpoints/step_NNNNNNNN/``) hold the trainable weights and the EMA in
safetensors, the optimizer state (``torch.save``; read back with ``weights_only=True``), every
rank's RNG states and data position, and the resolved config; each is written to a temporary folder
and renamed into place, and only the last ``keep_last`` are kept. A run whose ``out_dir`` holds a
checkpoint resumes from it (``--resume auto``), exactly: with ``--deterministic`` on CPU, 2N steps
straight and N steps + resume + N steps log identical losses (tests/model/test_train.py).

Distributed: under ``torchrun`` the run uses DDP (gloo on CPU, NCCL on GPU) or, with
``--parallel fsdp`` on GPUs, FSDP (``torch.distributed.fsdp.fully_shard``). Every rank reads its own
shards (model.data); rank 0 writes logs and checkpoints.
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
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.data import DataConfig, GroundingBatches, ImagePreprocessor, make_loader

CKPT_PREFIX = "step_"


# --- configuration ---------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """One training run. Presets: :func:`debug` (tests, CPU), :func:`wiring` (the overfit proof), :func:`stage2`."""
    out_dir: str = "runs/debug"
    shards: list[str] = field(default_factory=list)
    model: str = "debug"                    # "debug" (tiny random checkpoints under out_dir) or a JSON file of VisualExpertConfig fields
    model_overrides: dict = field(default_factory=dict)   # VisualExpertConfig fields to change (image_size, freeze_lm, ...)
    # optimisation
    max_steps: int = 100                    # length of the schedule
    stop_after: int | None = None           # stop (and checkpoint) at this step without changing the schedule
    batch_size: int = 8                     # per rank and micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1               # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                  # 0: no clipping
    ema_decay: float = 0.0                  # 0: no EMA
    # data
    caption_weight: float = 0.0
    rec_weight: float = 1.0
    qa_per_image: int = 1
    pack_qa: bool = False                   # the image's QA pairs in one sequence (one image pass for several answers)
    max_length: int = 64
    num_workers: int = 0
    # evaluation during training (REC Acc@0.5 on held-out shards, rank 0)
    eval_shards: list[str] = field(default_factory=list)
    eval_every: int = 0                     # 0: never
    eval_limit: int = 64
    eval_batch_size: int = 32
    # runtime
    seed: int = 0
    device: str = "auto"                    # auto | cpu | cuda
    bf16: bool = True                       # autocast to bfloat16 on GPU (never on CPU)
    parallel: str = "auto"                  # auto (DDP when distributed) | ddp | fsdp | none
    deterministic: bool = False             # torch.use_deterministic_algorithms: exact replay on CPU
    log_every: int = 1
    save_every: int = 100                   # also saved at the last step; 0: only at the end
    keep_last: int = 3
    resume: str = "auto"                    # auto (latest in out_dir) | none | a checkpoint folder
    init_from: str | None = None            # start from these weights (a checkpoint or run folder), fresh optimizer/data: stage 1 -> stage 2
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if isinstance(self.eval_shards, str):
            self.eval_shards = [self.eval_shards]
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.stop_after is None or 1 <= self.stop_after <= self.max_steps, "stop_after must be in 1..max_steps"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr > 0 and 0 <= min_lr_ratio <= 1 required"),
            (0 <= self.warmup_steps <= self.max_steps, "warmup_steps must be in 0..max_steps"),
            (self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device: auto | cpu | cuda[:i]"),
            (self.parallel in ("auto", "ddp", "fsdp", "none"), "parallel: auto | ddp | fsdp | none"),
            (self.keep_last >= 1 and self.save_every >= 0 and self.log_every >= 1, "keep_last/log_every >= 1, save_every >= 0"),
            (self.eval_every == 0 or self.eval_shards, "eval_every needs eval_shards"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")
        self.data_config()  # validates the data fields too

    def data_config(self) -> DataConfig:
        return DataConfig(shards=list(self.shards), batch_size=self.batch_size, caption_weight=self.caption_weight,
                          rec_weight=self.rec_weight, qa_per_image=self.qa_per_image, pack_qa=self.pack_qa,
                          max_length=self.max_length,
                          seed=self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def debug(**overrides) -> TrainConfig:
    """Tiny and quick on CPU: tests and smoke runs."""
    base = dict(max_steps=20, batch_size=4, lr=1e-3, warmup_steps=2, save_every=10, keep_last=2, max_length=48,
                progress=False)
    return TrainConfig(**{**base, **overrides})


def wiring(**overrides) -> TrainConfig:
    """The overfit proof on a few dozen synthetic images: a from-scratch tiny model, LM unfrozen.

    A random, frozen LM is no pretrained LM: in this from-scratch setting the LM must learn the
    answer format too, so it is trained (``freeze_lm=False``) at the full learning rate.
    """
    base = dict(model="debug", max_steps=1500, batch_size=16, lr=2e-3, warmup_steps=50, min_lr_ratio=0.05,
                weight_decay=0.0, grad_clip=1.0, max_length=48, save_every=0, keep_last=1,
                model_overrides={"freeze_lm": False, "lm_lr_mult": 1.0})
    return TrainConfig(**{**base, **overrides})


def stage2(**overrides) -> TrainConfig:
    """CogVLM's second stage as the paper sets it (per-GPU batch; scale with ranks and grad_accum).

    Needs ``model``: a JSON file of VisualExpertConfig fields (the real LM and ViT), not the debug one.
    """
    if overrides.get("model", "debug") == "debug":
        raise ValueError("the stage2 preset needs --model CONFIG.json (VisualExpertConfig fields: lm, vision, ...)")
    base = dict(max_steps=60_000, batch_size=16, grad_accum=1, lr=1e-5, warmup_steps=500, min_lr_ratio=0.1,
                weight_decay=0.05, grad_clip=1.0, ema_decay=0.9999, caption_weight=1.0, rec_weight=1.0,
                max_length=256, num_workers=4, save_every=1000, keep_last=3, parallel="auto", progress=True)
    return TrainConfig(**{**base, **overrides})


PRESETS = {"debug": debug, "wiring": wiring, "stage2": stage2}


# --- distributed -----------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device(device if ":" in device else f"cuda:{local}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def gather_objects(obj: Any, dist: Dist) -> list[Any]:
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def mean_across(value: float, dist: Dist) -> float:
    if not dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dist.device if dist.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t)
    return t.item() / dist.world_size


# --- model -----------------------------------------------------------------------------------

def resolve_model_config(cfg: TrainConfig):
    """The VisualExpertConfig this run trains: the debug preset (written under out_dir) or a JSON file."""
    from model import cogvlm

    if cfg.model == "debug":
        mcfg = cogvlm.debug(os.path.join(cfg.out_dir, "debug_model"))
    else:
        mcfg = cogvlm.VisualExpertConfig(**json.loads(Path(cfg.model).read_text()))
    return dataclasses.replace(mcfg, **cfg.model_overrides) if cfg.model_overrides else mcfg


def build_model(model_config, seed: int):
    from model.cogvlm import VisualExpertForCausalLM

    torch.manual_seed(seed)
    return VisualExpertForCausalLM.from_config(model_config)


def image_preprocessor(model) -> ImagePreprocessor:
    """The data-side twin of ``model.preprocess`` (picklable for loader workers)."""
    v = model.vision
    return ImagePreprocessor(int(v.image_size), tuple(v.mean.flatten().tolist()), tuple(v.std.flatten().tolist()))


def init_weights(model, path: str) -> int:
    """Copy a checkpoint's weights (EMA when it has them) into ``model``; any parameter, frozen or not.

    Returns how many tensors were loaded; a name the model lacks or a wrong shape is an error.
    """
    ckpt = find_checkpoint(path)
    f = ckpt / "ema.safetensors" if (ckpt / "ema.safetensors").exists() else ckpt / "model.safetensors"
    weights = load_file(str(f))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise KeyError(f"{f} holds tensors this model lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, t in weights.items():
            if params[name].shape != t.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(params[name].shape)}")
            params[name].copy_(t)
    return len(weights)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def wrap_parallel(model, cfg: TrainConfig, dist: Dist):
    """DDP (CPU or GPU) or FSDP (GPU) when distributed; the bare model otherwise."""
    if not dist.enabled or cfg.parallel == "none":
        return model, "none"
    mode = cfg.parallel
    if mode == "auto":
        mode = "ddp"
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        gpu_bf16 = cfg.bf16 and dist.device.type == "cuda"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu_bf16 else None
        layers = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]
        for layer in layers:
            fully_shard(layer, **({"mp_policy": mp} if mp else {}))
        fully_shard(model, **({"mp_policy": mp} if mp else {}))
        return model, "fsdp"
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False), "ddp"


class EMA:
    """Exponential moving average of the trainable weights, kept in float32."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm start, as timm's ModelEmaV2
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1 - d)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# --- checkpoints -----------------------------------------------------------------------------

def list_checkpoints(out_dir: str) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
                  and (p / "trainer_state.json").exists())


def find_checkpoint(path: str) -> Path:
    """A checkpoint folder, or a run folder's latest checkpoint."""
    p = Path(path)
    if (p / "trainer_state.json").exists():
        return p
    found = list_checkpoints(str(p))
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path}")
    return found[-1]


def rng_state() -> dict:
    state = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _jsonable(x):
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(out_dir: str, step: int, model, optimizer, ema: EMA | None, state: dict, keep_last: int,
                    dist: Dist, mode: str) -> Path | None:
    """Every rank calls this; rank 0 writes ``checkpoints/step_N`` atomically and prunes old ones."""
    weights, optim = trainable_and_optimizer_state(model, optimizer, mode)
    rngs = gather_objects({k: (v if not isinstance(v, torch.Tensor) else v.clone()) for k, v in rng_state().items()}, dist)
    data_states = gather_objects(state.pop("data_state_local"), dist)
    if not dist.main:
        return None
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        torch.save(optim, tmp / "optimizer.pt")
        rng_tensors, rng_json = {}, []
        for r, s in enumerate(rngs):
            rng_tensors[f"rank{r}.torch"] = s["torch"]
            if "cuda" in s:
                rng_tensors[f"rank{r}.cuda"] = s["cuda"]
            rng_json.append({"python": s["python"], "numpy": s["numpy"]})
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "rng.json").write_text(json.dumps(rng_json))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "data_states": data_states}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def trainable_and_optimizer_state(model, optimizer, mode: str) -> tuple[dict, dict]:
    """Full (unsharded) trainable weights and optimizer state, keyed by parameter name."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        full = get_model_state_dict(model, options=opts)
        return {k: v for k, v in full.items() if k in names}, get_optimizer_state_dict(model, optimizer, options=opts)
    inner = unwrap(model)
    return inner.trainable_state_dict(), optimizer_state_by_name(inner, optimizer)


def _param_index_names(model, optimizer, sd: dict) -> dict[int, str]:
    """Optimizer state-dict parameter index -> the parameter's name in ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {i: names[id(p)] for group, sd_group in zip(optimizer.param_groups, sd["param_groups"])
            for p, i in zip(group["params"], sd_group["params"])}


def optimizer_state_by_name(model, optimizer) -> dict:
    """The optimizer state with parameter names instead of positions (robust to group order)."""
    sd = optimizer.state_dict()
    index_to_name = _param_index_names(model, optimizer, sd)
    return {"state": {index_to_name[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state_by_name(model, optimizer, saved: dict) -> None:
    sd = optimizer.state_dict()
    name_of = _param_index_names(model, optimizer, sd)
    index_of = {n: i for i, n in name_of.items()}
    if len(saved["param_groups"]) != len(sd["param_groups"]):
        raise ValueError("checkpoint optimizer has a different number of parameter groups")
    groups = []
    for g_saved, g_now in zip(saved["param_groups"], sd["param_groups"]):
        if sorted(g_saved["params"]) != sorted(name_of[i] for i in g_now["params"]):
            raise ValueError("checkpoint optimizer groups hold other parameters than this model's")
        groups.append({**g_saved, "params": g_now["params"]})
    state = {index_of[n]: s for n, s in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint(path: Path, model, optimizer, ema: EMA | None, dist: Dist, mode: str) -> dict:
    """Restore weights, optimizer, EMA and this rank's RNG; returns the trainer state (step, data...)."""
    state = json.loads((path / "trainer_state.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=opts)
        set_optimizer_state_dict(model, optimizer, optim, options=opts)
    else:
        inner = unwrap(model)
        inner.load_trainable_state_dict(weights)
        load_optimizer_state_by_name(inner, optimizer, optim)
    if ema is not None:
        ema_path = path / "ema.safetensors"
        if ema_path.exists():
            ema.shadow = load_file(str(ema_path))
    rng_tensors = load_file(str(path / "rng.safetensors"))
    rng_json = json.loads((path / "rng.json").read_text())
    if len(rng_json) == dist.world_size:
        r = dist.rank
        set_rng_state({**rng_json[r], "torch": rng_tensors[f"rank{r}.torch"],
                       **({"cuda": rng_tensors[f"rank{r}.cuda"]} if f"rank{r}.cuda" in rng_tensors else {})})
    return state


def load_model_from_checkpoint(path: str, weights: str = "auto", device: str = "cpu"):
    """Rebuild the model a checkpoint was trained from and load its trainable (or EMA) weights.

    Returns ``(model, info)``; nothing is unpickled (safetensors and JSON only).
    """
    from model import cogvlm

    ckpt = find_checkpoint(path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    mcfg = cogvlm.VisualExpertConfig(**state["model_config"])
    model = cogvlm.VisualExpertForCausalLM.from_config(mcfg)
    use_ema = (ckpt / "ema.safetensors").exists() if weights == "auto" else weights == "ema"
    f = ckpt / ("ema.safetensors" if use_ema else "model.safetensors")
    if not f.exists():
        raise FileNotFoundError(f"{f} not found (this checkpoint has no EMA weights?)")
    model.load_trainable_state_dict(load_file(str(f)))
    model.to(device).eval()
    return model, {"path": str(ckpt), "step": state["step"], "weights": "ema" if use_ema else "raw"}


# --- the loop --------------------------------------------------------------------------------

def set_determinism(cfg: TrainConfig) -> None:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class JsonlLog:
    def __init__(self, path: Path | None):
        self.path = path
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


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
    set_determinism(cfg)
    out = Path(cfg.out_dir)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    if dist.enabled:
        torch.distributed.barrier()
    mcfg = model_config if model_config is not None else (resolve_model_config(cfg) if dist.main else None)
    if model_config is None and dist.enabled:
        mcfg = gather_objects(mcfg, dist)[0]  # rank 0 writes the debug checkpoints once
    model = build_model(mcfg, cfg.seed)
    if cfg.init_from:
        init_weights(model, cfg.init_from)
    model.to(dist.device)
    model.train()
    preprocess = image_preprocessor(model)
    tokenizer = model.tokenizer
    model, mode = wrap_parallel(model, cfg, dist)
    inner = unwrap(model)
    groups = inner.param_groups(cfg.lr, cfg.weight_decay)
    for g in groups:
        g.setdefault("base_lr", g["lr"])
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  **({"fused": True} if dist.device.type == "cuda" and mode != "fsdp" else {}))
    ema = EMA(inner, cfg.ema_decay) if cfg.ema_decay > 0 else None

    dataset = GroundingBatches(cfg.data_config(), tokenizer, preprocess, dist.rank, dist.world_size, cfg.num_workers)
    step, batches, cursors = 0, 0, {}
    totals = {"samples": 0, "tokens": 0, "skipped": {}, "truncated": 0}
    ckpt_path = None
    if cfg.resume == "auto":
        found = list_checkpoints(cfg.out_dir)
        ckpt_path = found[-1] if found else None
    elif cfg.resume != "none":
        ckpt_path = find_checkpoint(cfg.resume)
    torch.manual_seed(cfg.seed + 1000 + dist.rank)  # dropout etc. differ by rank, replay exactly
    random.seed(cfg.seed + dist.rank)
    if ckpt_path is not None:
        st = load_checkpoint(ckpt_path, model, optimizer, ema, dist, mode)
        step = st["step"]
        ds = st["data_states"][dist.rank]
        dataset.resume(ds)
        batches, cursors = ds["batches"], {int(k): tuple(v) for k, v in ds["cursors"].items()}
        totals = {**totals, **st.get("totals", {})}   # older checkpoints lack "truncated"
    log = JsonlLog(out / "log.jsonl" if dist.main else None)
    if dist.main:
        (out / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "model": _config_dict(mcfg)}, indent=1))
        log.write({"event": "start" if ckpt_path is None else "resume", "step": step, "world_size": dist.world_size,
                   "parallel": mode, "device": str(dist.device), "checkpoint": str(ckpt_path) if ckpt_path else None,
                   "trainable_params": sum(p.numel() for p in inner.parameters() if p.requires_grad),
                   "total_params": sum(p.numel() for p in inner.parameters())})

    stop = cfg.stop_after or cfg.max_steps
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and dist.device.type == "cuda" else nullcontext())
    bar = None
    if dist.main and cfg.progress and step < stop:
        from tqdm import tqdm
        bar = tqdm(total=stop, initial=step, desc="train", unit="step", dynamic_ncols=True)
    history: list[dict] = []
    data_iter = iter(make_loader(dataset, cfg.seed))
    window_t, window_samples, window_tokens = time.perf_counter(), 0, 0
    paused = 0.0                                     # eval/save seconds inside the window: not training time
    last_eval = None
    while step < stop:
        factor = lr_factor(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            batch = next(data_iter)
            batches += 1
            cursors[batch["worker"]] = tuple(batch["cursor"])
            for k, v in batch["skipped"].items():
                totals["skipped"][k] = totals["skipped"].get(k, 0) + v
            totals["truncated"] += batch.get("truncated", 0)
            sync = micro == cfg.grad_accum - 1 or mode != "ddp"
            with (nullcontext() if sync else model.no_sync()), autocast:
                out_ = model(input_ids=batch["input_ids"].to(dist.device),
                             attention_mask=batch["attention_mask"].to(dist.device),
                             pixel_values=batch["pixel_values"].to(dist.device),
                             labels=batch["labels"].to(dist.device))
                loss = out_.loss / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
            n_samples = batch["input_ids"].shape[0]
            n_tokens = int(batch["attention_mask"].sum())
            window_samples += n_samples
            window_tokens += n_tokens
            totals["samples"] += n_samples * dist.world_size   # every step, so a checkpoint's totals are exact
            totals["tokens"] += n_tokens * dist.world_size
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(inner, step)
        step += 1
        loss_val = mean_across(loss_sum, dist)
        if step % cfg.log_every == 0 or step == stop:
            dt = max(time.perf_counter() - window_t - paused, 1e-9)
            rec = {"step": step, "loss": loss_val, "lr": cfg.lr * factor, "grad_norm": float(grad_norm),
                   "samples_per_s": window_samples * dist.world_size / dt,
                   "tokens_per_s": window_tokens * dist.world_size / dt, "skipped": dict(totals["skipped"]),
                   "truncated": totals["truncated"]}
            window_t, window_samples, window_tokens, paused = time.perf_counter(), 0, 0, 0.0
            history.append(rec)
            log.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        pause_t = time.perf_counter()                # throughput counts training time only
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == stop):
            last_eval = evaluate_during_training(cfg, inner, ema, dist, step, log)
            if on_eval is not None and last_eval is not None:
                on_eval(step, last_eval)
        if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
            local = dataset.state_after(cursors, batches)
            save_checkpoint(cfg.out_dir, step, model, optimizer, ema,
                            {"data_state_local": local, "totals": totals, "config": cfg.to_dict(),
                             "model_config": _config_dict(mcfg)}, cfg.keep_last, dist, mode)
        paused += time.perf_counter() - pause_t
    if bar is not None:
        bar.close()
    summary = {"step": step, "history": history, "last_eval": last_eval, "skipped": totals["skipped"],
               "truncated": totals["truncated"], "totals": totals,
               "out_dir": str(out), "model": inner}
    checksums = gather_objects(param_checksum(inner), dist)
    summary["ranks_in_sync"] = all(c == checksums[0] for c in checksums)
    if dist.main:
        log.write({"event": "end", "step": step, "skipped": totals["skipped"], "truncated": totals["truncated"],
                   "ranks_in_sync": summary["ranks_in_sync"],
                   "rank_checksums": checksums})
    return summary


def param_checksum(model) -> list[float]:
    """Sum and sum of squares of the trainable weights (float64): equal on every rank when in sync."""
    with torch.no_grad():
        ps = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()  # FSDP: DTensor shards
              for p in model.parameters() if p.requires_grad]
        return [float(sum(p.sum() for p in ps)), float(sum((p * p).sum() for p in ps))]


def evaluate_during_training(cfg: TrainConfig, model, ema: EMA | None, dist: Dist, step: int, log: JsonlLog) -> dict | None:
    """REC Acc@0.5 on ``eval_shards`` (rank 0; EMA weights when kept); the others wait."""
    result = None
    if dist.main:
        from model.evaluate import evaluate_rec, shard_examples

        examples = shard_examples(cfg.eval_shards, "eval", cfg.eval_limit)
        backup = None
        if ema is not None:
            backup = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
            model.load_trainable_state_dict({k: v.to(backup[k].dtype) for k, v in ema.shadow.items()})
        summary, _ = evaluate_rec(model, examples, batch_size=cfg.eval_batch_size)
        if backup is not None:
            model.load_trainable_state_dict(backup)
        result = {k: summary[k] for k in ("n", "acc@0.5", "mean_iou", "parse_failures")}
        log.write({"event": "eval", "step": step, **result})
    if dist.enabled:
        torch.distributed.barrier()
    return result


def _config_dict(mcfg) -> dict:
    return dataclasses.asdict(mcfg) if dataclasses.is_dataclass(mcfg) else dict(vars(mcfg))


# --- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """``--preset`` then one ``--field value`` per TrainConfig field (lists: several values; dicts: JSON)."""
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="debug")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        t = str(f.type)
        if t.startswith("list"):
            p.add_argument(flag, nargs="*", default=None)
        elif t == "dict":
            p.add_argument(flag, type=json.loads, default=None, help="JSON object")
        elif t == "bool":
            p.add_argument(flag, type=_bool, default=None, metavar="{true,false}")
        elif t.startswith("int"):
            p.add_argument(flag, type=_optional_int if "None" in t else int, default=None)
        elif t == "float":
            p.add_argument(flag, type=float, default=None)
        else:
            p.add_argument(flag, default=None)
    return p


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _optional_int(s: str) -> int | None:
    return None if s.lower() in ("none", "") else int(s)


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    preset = PRESETS[args.pop("preset")]
    return preset(**{k: v for k, v in args.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = config_from_args(argv)
    try:
        return train(cfg)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank tears down while another still talks to it
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torch 2.13 + gloo/FSDP on CPU: after a clean run (logs and checkpoints written, process group
        # destroyed) the interpreter's teardown sometimes aborts ("terminate called without an active
        # exception", SIGABRT), failing the torchrun job; skip that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
