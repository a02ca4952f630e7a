"""Distributed training: joining the torchrun process group, wrapping the model (DDP or FSDP2), and the
few collectives the trainer needs (gather a Python object, average a float, check ranks agree).

Under ``torchrun`` (``WORLD_SIZE`` > 1) a run uses gloo on CPU and NCCL on GPU. ``parallel="ddp"``
replicates the model (CPU or GPU); ``parallel="fsdp"`` shards every decoder/encoder layer and the root
with ``torch.distributed.fsdp.fully_shard`` (FSDP2, torch >= 2.6). A single process gets the bare model.
"""
from __future__ import annotations

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


# --- are the ranks still in sync? --------------------------------------------------------------

def param_checksum(model) -> list[float]:
    """Sum and sum of squares of the trainable weights (float64): equal on every rank when in sync."""
    with torch.no_grad():
        ps = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()  # FSDP: DTensor shards
              for p in model.parameters() if p.requires_grad]
        return [float(sum(p.sum() for p in ps)), float(sum((p * p).sum() for p in ps))]
