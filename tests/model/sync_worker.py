"""Run by tests/model/test_ddp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): makes the two ranks
disagree in chosen ways and records what model.distributed.ranks_in_sync says. Writes ``OUT/rank{r}.json``."""
from __future__ import annotations

import json
import os
import sys

import torch

from model.distributed import init_distributed, ranks_in_sync, wrap_parallel


class Block(torch.nn.Module):
    """Named like a transformer layer so wrap_parallel shards it on its own under FSDP."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x):
        return self.fc(x) * self.scale


class DecoderLayer(Block):
    pass


def build(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(DecoderLayer(), torch.nn.Linear(8, 1))


def one_step(model, optimizer, rank: int) -> None:
    torch.manual_seed(100 + rank)                       # different data per rank, as in training
    model(torch.randn(4, 8)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def inner(model):
    return model.module if hasattr(model, "module") else model


def scenario(mode: str, dist, disturb=None) -> dict:
    model, _ = wrap_parallel(build(0), mode, dist)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, dist.rank)
    if disturb is not None and dist.rank == 1:
        disturb(inner(model), optimizer)
    return ranks_in_sync(model, optimizer, dist)


def bump_buffer(m, opt):
    m[0].scale.add_(1e-3)


def bump_step(m, opt):
    p = next(iter(opt.state))
    opt.state[p]["step"] += 1


def bump_weight(m, opt):
    with torch.no_grad():
        w = m[0].fc.weight                                          # (8, 8): each rank holds 4 rows under FSDP
        (w.to_local() if hasattr(w, "to_local") else w).add_(1e-3)   # this rank's copy (FSDP: its shard)


def main(out: str) -> None:
    dist = init_distributed("cpu")
    res = {}
    for mode in ("ddp", "fsdp"):
        res[mode] = {name: scenario(mode, dist, fn) for name, fn in
                     [("same", None), ("buffer", bump_buffer), ("optimizer_step", bump_step), ("weight", bump_weight)]}
    try:                                                # FSDP2 never broadcasts: different builds must be refused
        wrap_parallel(build(dist.rank), "fsdp", dist)
        res["fsdp_different_start"] = "accepted"
    except RuntimeError as e:
        res["fsdp_different_start"] = str(e)
    with open(f"{out}/rank{dist.rank}.json", "w") as f:
        json.dump(res, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # as model/train.py: torch 2.13 + gloo/FSDP on CPU sometimes aborts in interpreter teardown after a clean
    # run ("terminate called without an active exception"); the results are written, so skip that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
