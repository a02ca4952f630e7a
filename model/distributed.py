"""Distributed training: joining the torchrun process group, wrapping the model (DDP or FSDP2), and the
few collectives the trainer needs (gather a Python object, average a float, check ranks agree).

Under ``torchrun`` (``WORLD_SIZE`` > 1) a run uses gloo on CPU and NCCL on GPU. ``parallel="ddp"``
replicates the model (CPU or GPU); ``parallel="fsdp"`` shards every decoder/encoder layer and the root
with ``torch.distributed.fsdp.fully_shard`` (FSDP2, torch >= 2.6). A single process gets the bare model.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

PARALLEL_MODES = ("auto", "ddp", "fsdp", "none")


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 when not distributed)."""
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
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
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


def all_ranks(flag: bool, dist: Dist) -> bool:
    """True when ``flag`` is true on every rank (a collective: every rank calls it)."""
    if not dist.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=dist.device if dist.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def unwrap(model):
    """The model inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return model.module if hasattr(model, "module") else model


def wrap_parallel(model, parallel: str, dist: Dist, autocast_dtype: torch.dtype | None = None):
    """``(model, mode)``: DDP (CPU or GPU) or FSDP2 when distributed, the bare model otherwise.

    ``autocast_dtype`` (GPU only): FSDP computes in it and reduces gradients in float32.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if not dist.enabled or parallel == "none":
        return model, "none"
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        start = gather_objects(weights_digest(model), dist)
        if len(set(start)) > 1:
            raise RuntimeError(f"ranks built different weights before sharding (digests {start}): FSDP would "
                               "keep a slice of each rank's own model; build every rank with the same seed and weights")
        kw = {}
        if autocast_dtype is not None and dist.device.type == "cuda":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
        for layer in [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model, "fsdp"
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False), "ddp"


def reshard(model) -> None:
    """Shard FSDP2 modules' parameters again after forwards with no backward (evaluation): FSDP2 leaves the root's
    unsharded then, as plain tensors, where loading weights or saving expects the sharded DTensors. No-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# --- are the ranks still in sync? --------------------------------------------------------------
# Each rank hashes what it holds itself (no collective touches the tensors), then the short digests are
# gathered and compared. Under DDP every rank holds every trainable weight, so all of them must agree.
# Under FSDP each shard has one owner (nothing to compare it with: its digest is reported, and differs
# by rank); what must agree there is the replicated state: unsharded parameters, buffers, the optimizer's
# step counts and learning rates. FSDP2 never broadcasts weights, so wrap_parallel also checks that every
# rank built the same weights before they are sharded (else each rank would keep a slice of its own model).

def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.to_local() if hasattr(t, "to_local") else t                 # DTensor: this rank's shard, no gather
    h.update(name.encode())
    h.update(t.detach().float().cpu().contiguous().numpy().tobytes())


def weights_digest(model) -> str:
    """sha256 of this rank's trainable weights (its shards under FSDP)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in unwrap(model).named_parameters():
            if p.requires_grad:
                _hash_tensor(h, name, p)
    return h.hexdigest()


def replica_digest(model, optimizer) -> str:
    """sha256 of the state every rank must hold identically: trainable weights that are not sharded (all
    of them under DDP), buffers, and the optimizer's step count and learning rate per parameter."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in unwrap(model).named_parameters():
            if p.requires_grad and not hasattr(p, "to_local"):
                _hash_tensor(h, name, p)
        for name, b in unwrap(model).named_buffers():
            _hash_tensor(h, name, b)
    for g in optimizer.param_groups:
        h.update(repr(g["lr"]).encode())
        for p in g["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if step is not None:
                _hash_tensor(h, "step", torch.as_tensor(step))
    return h.hexdigest()


def ranks_in_sync(model, optimizer, dist: Dist) -> dict:
    """``{"ranks_in_sync": bool, "rank_digests": [...], "rank_weight_digests": [...]}``, the same on every rank.

    ``rank_digests`` (compared): :func:`replica_digest` per rank. ``rank_weight_digests`` (reported):
    :func:`weights_digest` per rank: equal under DDP, one per shard under FSDP.
    """
    digests = gather_objects(replica_digest(model, optimizer), dist)
    return {"ranks_in_sync": all(d == digests[0] for d in digests), "rank_digests": digests,
            "rank_weight_digests": gather_objects(weights_digest(model), dist)}
