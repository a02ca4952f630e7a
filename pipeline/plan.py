"""Planning from metadata only: the driver lists the input files, reads their Parquet footers and cuts
each file into work shards of ``shard_rows`` source rows, named ``<input-stem>-NNNNN``.

A :class:`WorkShard` is a (file, row range) plus its plan index (which is also its img2dataset
download shard id). The plan holds one small record per shard and nothing per row, so the driver's
memory does not grow with the input (400M LAION rows at 10,000 rows per shard: 40,000 records).
Sampling, pre-filters, DNS, dedup and everything after happen on the workers.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass

from grounding.source import SourceConfig, list_sources, source_rows, source_stem


@dataclass(frozen=True)
class WorkShard:
    index: int          # position in the plan: also the download shard id
    name: str           # <input-stem>-NNNNN
    source_file: str
    start: int          # source rows [start, stop) of the file (before sampling)
    stop: int

    @property
    def input_rows(self) -> int:
        return self.stop - self.start


def plan_shards(config: SourceConfig) -> list[WorkShard]:
    """The work shards of the run, in (file, row) order; reads only file listings and footers."""
    files = list_sources(config.paths)
    stems = [source_stem(f) for f in files]
    clash = sorted(s for s, n in Counter(stems).items() if n > 1)
    if clash:
        raise ValueError(f"input files share the name stems {clash}: shard names would collide; rename them")
    remaining = config.limit
    shards: list[WorkShard] = []
    for f, stem in zip(files, stems):
        if remaining == 0:
            break
        n = source_rows(f)
        if remaining is not None:
            n = min(n, remaining)
            remaining -= n
        for i, start in enumerate(range(0, n, config.shard_rows)):
            shards.append(WorkShard(len(shards), f"{stem}-{i:05d}", f, start, min(n, start + config.shard_rows)))
    return shards


def plan_digest(shards: list[WorkShard]) -> str:
    """A digest of the plan (names, files, ranges): the dedup pre-pass is valid for exactly one plan."""
    blob = json.dumps([asdict(s) for s in shards], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def id_digits(shards: list[WorkShard]) -> int:
    """Digits of the download shard ids (img2dataset's ``oom_shard_count``): at least 5."""
    return max(5, len(str(max(len(shards) - 1, 0))))
