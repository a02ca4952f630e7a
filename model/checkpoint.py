"""Checkpoints of a training run: where they live, what they hold, how a run saves, finds and resumes them.

``out_dir/checkpoints/step_NNNNNNNN/`` holds the trainable weights (``model.safetensors``) and the EMA
(``ema.safetensors``), the optimizer state keyed by parameter name (``optimizer.pt``: ``torch.save``, read
back with ``weights_only=True``, so loading never unpickles code), every rank's RNG states
(``rng.safetensors`` + ``rng.json``), and ``trainer_state.json`` (step, every rank's data position, totals,
the resolved run and model configs). Each is written to a temporary folder and renamed into place; only the
last ``keep_last`` are kept. :func:`load_model_from_checkpoint` rebuilds a trained model for inference.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.distributed import Dist, gather_objects, unwrap
from model.optim import EMA

CKPT_PREFIX = "step_"


@dataclass
class CheckpointConfig:
    """When a run saves, how many it keeps, what it resumes or starts from (``TrainConfig.checkpoint``)."""
    save_every: int = 100                   # also saved at the last step; 0: only at the end
    keep_last: int = 3
    resume: str = "auto"                    # auto (latest in out_dir) | none | a checkpoint folder
    init_from: str | None = None            # start from these weights (a checkpoint or run folder), fresh optimizer/data: stage 1 -> stage 2

    def __post_init__(self):
        if self.keep_last < 1 or self.save_every < 0:
            raise ValueError("CheckpointConfig: keep_last must be >= 1 and save_every >= 0")


def resume_path(cfg: CheckpointConfig, out_dir: str) -> Path | None:
    """The checkpoint this run resumes from: the latest in ``out_dir`` (``auto``), none, or the one named."""
    if cfg.resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    return None if cfg.resume == "none" else find_checkpoint(cfg.resume)


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
    ema_weights = full_tensors(ema.shadow, keep=dist.main) if ema is not None else None  # FSDP: every rank gathers
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
        if ema_weights is not None:
            save_file(ema_weights, str(tmp / "ema.safetensors"))
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


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; sharded DTensors (FSDP: the EMA's shadow) gathered whole first (a collective: every
    rank calls it). ``keep=False`` (the ranks that do not write): join the gathers, copy nothing, return {}."""
    out = {}
    for k, v in tensors.items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        if keep:
            out[k] = v.detach().cpu().contiguous()
    return out


def load_ema(ema: EMA, saved: dict[str, torch.Tensor]) -> None:
    """Saved (whole, CPU) EMA tensors in place of the shadow: on its device, and sharded as it is under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    live = ema.shadow
    ema.shadow = {k: (distribute_tensor(v.to(live[k].dtype), live[k].device_mesh, live[k].placements)
                      if isinstance(live.get(k), DTensor) else v.to(live[k].device) if k in live else v)
                  for k, v in saved.items()}


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


HYPERPARAMETERS = ("base_lr", "weight_decay", "betas", "eps")   # logged when a resumed run changes them


def keep_hyperparameters(optimizer, fresh: list[dict]) -> dict:
    """After loading a checkpoint's optimizer state, put back this run's group settings ``fresh`` (everything but
    ``params``: learning rate, weight decay, betas...), so flags given on resume take effect; returns
    ``{key: [saved per group, now per group]}`` for the :data:`HYPERPARAMETERS` that changed."""
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (betas: a tuple, a list in JSON)
    changed = {}
    for key in HYPERPARAMETERS:
        saved, now = [plain(g.get(key)) for g in optimizer.param_groups], [plain(f.get(key)) for f in fresh]
        if saved != now:
            changed[key] = [saved, now]
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
    return changed


def load_checkpoint(path: Path, model, optimizer, ema: EMA | None, dist: Dist, mode: str) -> dict:
    """Restore weights, optimizer state, EMA and this rank's RNG; returns the trainer state (step, data...) with
    ``hyperparameter_changes``: the optimizer keeps this run's learning rate, weight decay and betas (what the
    command line says now), and the ones that differ from the checkpoint's are listed there."""
    state = json.loads((path / "trainer_state.json").read_text())
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
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
    state["hyperparameter_changes"] = keep_hyperparameters(optimizer, fresh)
    if ema is not None:
        ema_path = path / "ema.safetensors"
        if ema_path.exists():
            load_ema(ema, load_file(str(ema_path)))
    rng_tensors = load_file(str(path / "rng.safetensors"))
    rng_json = json.loads((path / "rng.json").read_text())
    if len(rng_json) == dist.world_size:
        r = dist.rank
        set_rng_state({**rng_json[r], "torch": rng_tensors[f"rank{r}.torch"],
                       **({"cuda": rng_tensors[f"rank{r}.cuda"]} if f"rank{r}.cuda" in rng_tensors else {})})
    return state


def init_weights(model, path: str) -> int:
    """Copy a checkpoint's weights (EMA when it has them) into ``model``; any parameter, frozen or not.

    Returns how many tensors were loaded; a name the model lacks or a wrong shape is an error.
    """
    ckpt = find_checkpoint(path)
    f = ckpt / "ema.safetensors" if (ckpt / "ema.safetensors").exists() else ckpt / "model.safetensors"
    weights = load_file(str(f))
    model.load_trainable_state_dict(weights, strict=False)
    return len(weights)


def locate_model_dir(name: str, ckpt: Path) -> str:
    """A checkpoint's ``lm``/``vision``: as recorded, or, for a relative path recorded by an older run (relative
    to the working directory it trained in), the same path under the nearest folder above ``ckpt`` that holds it."""
    if os.path.isabs(name) or os.path.isdir(name):
        return name
    for parent in Path(ckpt).resolve().parents:
        if (parent / name).is_dir():
            return str(parent / name)
    return name                                     # a hub id, or a path resolve_dir will report as missing


def load_model_from_checkpoint(path: str, weights: str = "auto", device: str = "cpu"):
    """Rebuild the model a checkpoint was trained from and load its trainable (or EMA) weights.

    Returns ``(model, info)``; nothing is unpickled (safetensors and JSON only). A model directory that is
    not there (moved, or another machine) is a :class:`FileNotFoundError` naming it.
    """
    from model import cogvlm

    ckpt = find_checkpoint(path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    mcfg = cogvlm.VisualExpertConfig(**{**state["model_config"], **{k: locate_model_dir(state["model_config"][k], ckpt)
                                                                     for k in ("lm", "vision")}})
    model = cogvlm.VisualExpertForCausalLM.from_config(mcfg)
    use_ema = (ckpt / "ema.safetensors").exists() if weights == "auto" else weights == "ema"
    f = ckpt / ("ema.safetensors" if use_ema else "model.safetensors")
    if not f.exists():
        raise FileNotFoundError(f"{f} not found (this checkpoint has no EMA weights?)")
    model.load_trainable_state_dict(load_file(str(f)))
    model.to(device).eval()
    return model, {"path": str(ckpt), "step": state["step"], "weights": "ema" if use_ema else "raw"}
