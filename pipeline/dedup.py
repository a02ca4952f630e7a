"""Run-wide URL dedup without a driver-side set: a pre-pass partitioned by URL hash.

The first occurrence of a URL in (file, row) order wins, whatever the cluster layout. The work shards
are cut into map groups of consecutive shards (:func:`map_groups`: at most ``MAX_MAP_FILES`` groups,
so 40,000 shards give 1,000 groups of 40), and every step writes one file per task:

1. **map**, one task per group (:func:`map_group`): read the group's shards, sample, keep the rows that
   pass the cheap pre-filters (:func:`grounding.source.dedup_candidates`), hash each URL (16 bytes of
   BLAKE2b). Rows whose URL occurred earlier *in the group* lose at once (``within/<g>``; for group 0,
   which has no earlier group, these are all its losers: ``losers/0``, so its shards can start before
   the rest of the pass is done); the group's
   first occurrences go to ``map/<g>.parquet`` = (bucket, url_hash, shard, source_row), one row group
   per bucket, so a reducer reads only its own.
2. **reduce**, one task per bucket (:func:`reduce_bucket`): read that bucket from every map file (each
   URL at most once per group), sort by (url_hash, shard, source_row) and write every occurrence but the
   first to ``cross/<bucket>.parquet`` = (shard, source_row), one row group per map group.
3. **gather**, one task per group after the first (:func:`gather_group`): the group's losers from ``within/<g>`` and from
   every ``cross/<bucket>`` (its row group only) -> ``losers/<g>.parquet``, one row group per shard.
4. each shard task reads its own losers from its group's file (:func:`duplicate_rows`): its keep-mask.

Files: 2 x groups + buckets + groups (not shards x buckets); reads: every reducer and every gather opens
groups x buckets footers in all, each task at most ``max(groups, buckets)``. ``dedup/_done.json``
records the plan digest, groups and buckets the pass was made for; a rerun with the same plan skips it.
The driver only submits tasks and receives counts. Cost per million input rows:
``benchmarks/bench_scale.py --only memory`` (``dedup_prepass_seconds_per_million_rows``).
"""
from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grounding.source import FilterConfig, SourceConfig, dedup_candidates, read_source, sample_rows
from pipeline.plan import WorkShard

MAP_SCHEMA = pa.schema([pa.field("bucket", pa.int32()), pa.field("url_hash", pa.binary(16)),
                        pa.field("shard", pa.int32()), pa.field("source_row", pa.int64())])
DUPS_SCHEMA = pa.schema([pa.field("shard", pa.int32()), pa.field("source_row", pa.int64())])


MAX_MAP_FILES = 1024


def default_partitions(num_shards: int) -> int:
    return max(1, min(256, num_shards // 4))


def _write(table: pa.Table, url: str, row_groups: list[pa.Table] | None = None) -> None:
    """Atomic Parquet write; ``row_groups``: write these slices as separate row groups."""
    fs, p = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(p), exist_ok=True)
    tmp = p + ".tmp"
    with fs.open(tmp, "wb") as f, pq.ParquetWriter(f, table.schema) as w:
        for part in row_groups or [table]:
            w.write_table(part)
    fs.mv(tmp, p)


def map_groups(num_shards: int, max_files: int = None) -> list[tuple[int, int]]:
    """The map groups: consecutive shard index ranges [lo, hi), at most ``max_files`` of them."""
    size = -(-num_shards // (max_files or MAX_MAP_FILES)) if num_shards else 1
    return [(lo, min(num_shards, lo + size)) for lo in range(0, num_shards, size)]


def _read(url: str, schema: pa.Schema, filters=None) -> pa.Table:
    fs, p = fsspec.core.url_to_fs(url)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, filters=filters, schema=schema)


def _first_of_each_hash(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Sort by (url_hash, shard, source_row); (first occurrence of each hash, every later one)."""
    table = table.sort_by([("url_hash", "ascending"), ("shard", "ascending"), ("source_row", "ascending")])
    h = table["url_hash"].cast(pa.binary())
    if table.num_rows:
        repeat = pc.equal(h.slice(1), h.slice(0, table.num_rows - 1))
        loser = pa.concat_arrays([pa.array([False]), repeat.combine_chunks()])
    else:
        loser = pa.array([], pa.bool_())
    return table.filter(pc.invert(loser)), table.filter(loser)


def _losers(table: pa.Table) -> pa.Table:
    return table.select(["shard", "source_row"]).cast(DUPS_SCHEMA).sort_by([("shard", "ascending"),
                                                                          ("source_row", "ascending")])


def _split(table: pa.Table, column: str, bounds: list[tuple[int, int]]) -> list[pa.Table]:
    """``table`` (sorted by ``column``) cut into the non-empty slices whose value lies in each [lo, hi)."""
    values = table[column]
    parts = []
    for lo, hi in bounds:
        part = table.filter(pc.and_(pc.greater_equal(values, lo), pc.less(values, hi)))
        if part.num_rows:
            parts.append(part)
    return parts


def map_group(dedup: str, group: int, shards: list[WorkShard], source: SourceConfig, filters: FilterConfig,
              partitions: int) -> tuple[int, int]:
    """Hash one group's candidate URLs; returns (candidates, losers within the group)."""
    parts = []
    for shard in shards:
        rows = sample_rows(read_source(shard.source_file, source, shard.start, shard.stop),
                           source.sample_fraction, source.sample_seed)
        cand = dedup_candidates(rows, filters)
        parts.append(pa.table({"url_hash": cand["url_hash"].cast(pa.binary(16)),
                               "shard": pa.array([shard.index] * cand.num_rows, pa.int32()),
                               "source_row": cand["source_row"]}))
    cand = pa.concat_tables(parts) if parts else MAP_SCHEMA.empty_table().drop_columns(["bucket"])
    first, later = _first_of_each_hash(cand)
    head = pc.binary_slice(first["url_hash"].cast(pa.binary()), 0, 4) if first.num_rows else pa.array([], pa.binary())
    buckets = pa.array([int.from_bytes(h, "big") % partitions for h in head.to_pylist()], pa.int32())
    table = pa.table({"bucket": buckets, "url_hash": first["url_hash"], "shard": first["shard"],
                      "source_row": first["source_row"]}, schema=MAP_SCHEMA).sort_by("bucket")
    _write(table, f"{dedup}/map/{group:08d}.parquet", _split(table, "bucket", [(b, b + 1) for b in range(partitions)]))
    later = _losers(later)
    if group == 0:  # no earlier group: these are final
        lo, hi = shards[0].index, shards[-1].index + 1
        _write(later, f"{dedup}/losers/{group:08d}.parquet", _split(later, "shard", [(i, i + 1) for i in range(lo, hi)]))
    else:
        _write(later, f"{dedup}/within/{group:08d}.parquet")
    return cand.num_rows, later.num_rows


def reduce_bucket(dedup: str, bucket: int, groups: list[tuple[int, int]]) -> int:
    """The cross-group losers of one bucket: every URL hash but its first occurrence in (shard, row) order."""
    table = pa.concat_tables([_read(f"{dedup}/map/{g:08d}.parquet", MAP_SCHEMA, [("bucket", "=", bucket)])
                              for g in range(len(groups))])
    dups = _losers(_first_of_each_hash(table)[1])
    _write(dups, f"{dedup}/cross/{bucket:05d}.parquet", _split(dups, "shard", groups))
    return dups.num_rows


def gather_group(dedup: str, group: int, lo: int, hi: int, partitions: int) -> int:
    """The losers of one group's shards (within the group and across groups) in one file (group >= 1);
    returns their count."""
    within = _read(f"{dedup}/within/{group:08d}.parquet", DUPS_SCHEMA)
    cross = [_read(f"{dedup}/cross/{b:05d}.parquet", DUPS_SCHEMA, [("shard", ">=", lo), ("shard", "<", hi)])
             for b in range(partitions)]
    losers = _losers(pa.concat_tables([within, *cross]))
    _write(losers, f"{dedup}/losers/{group:08d}.parquet", _split(losers, "shard", [(i, i + 1) for i in range(lo, hi)]))
    return losers.num_rows


def group_of(groups: list[tuple[int, int]], shard_index: int) -> int:
    """The map group holding a shard (groups are equal-sized and consecutive)."""
    return shard_index // (groups[0][1] - groups[0][0])


def duplicate_rows(dedup: str, shard_index: int, group: int) -> set[int]:
    """The ``source_row`` numbers of this shard that lose to an earlier occurrence of their URL."""
    t = _read(f"{dedup}/losers/{group:08d}.parquet", DUPS_SCHEMA, [("shard", "=", shard_index)])
    return set(t["source_row"].to_pylist())


def done_marker(dedup: str) -> dict | None:
    fs, p = fsspec.core.url_to_fs(f"{dedup}/_done.json")
    if not fs.exists(p):
        return None
    with fs.open(p, "r") as f:
        return json.load(f)


def mark_done(dedup: str, plan: str, groups: list[tuple[int, int]], partitions: int, candidates: int,
              duplicates: int) -> None:
    fs, p = fsspec.core.url_to_fs(f"{dedup}/_done.json")
    with fs.open(p + ".tmp", "w") as f:
        json.dump({"plan": plan, "groups": [list(g) for g in groups], "partitions": partitions,
                   "candidates": candidates, "duplicates": duplicates}, f)
    fs.mv(p + ".tmp", p)


def clear(dedup: str) -> None:
    fs, p = fsspec.core.url_to_fs(dedup)
    if fs.exists(p):
        fs.rm(p, recursive=True)
