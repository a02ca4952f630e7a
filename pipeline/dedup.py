"""Run-wide URL dedup without a driver-side set: a pre-pass partitioned by URL hash.

The first occurrence of a URL in (file, row) order wins, whatever the cluster layout:

1. **map**, one task per work shard (:func:`map_shard`): read the shard's rows, sample, keep the
   rows that pass the cheap pre-filters (:func:`grounding.source.dedup_candidates`), hash each URL
   (16 bytes of BLAKE2b) and write ``dedup/map/<index>.parquet`` = (bucket, url_hash, shard index,
   source_row), sorted by bucket (one row group per bucket: a reducer reads only its own).
2. **reduce**, one task per bucket (:func:`reduce_bucket`): read that bucket from every map file,
   sort by (url_hash, shard index, source_row) and write the losers, every row but the first of
   each hash, to ``dedup/dups/<bucket>.parquet`` = (shard index, source_row), sorted by shard.
3. each shard task reads its own losers from every bucket file (:func:`duplicate_rows`, row groups
   skipped by their statistics): the keep-mask of its rows.

``dedup/_done.json`` records the plan digest the pass was made for; a rerun with the same plan
skips it. The driver only submits tasks and receives counts. Cost: every candidate row is read
once more than without dedup and moved once as 36 bytes; ``benchmarks/bench_scale.py`` measures
the seconds per million input rows.
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


def default_partitions(num_shards: int) -> int:
    return max(1, min(256, num_shards // 4))


def _write(table: pa.Table, url: str, row_groups: list[pa.Table] | None = None) -> None:
    """Atomic Parquet write; ``row_groups``: write these slices as separate row groups."""
    fs, p = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(p), exist_ok=True)
    tmp = p + ".tmp"
    with fs.open(tmp, "wb") as f, pq.ParquetWriter(f, table.schema) as w:
        for part in row_groups if row_groups is not None else [table]:
            w.write_table(part)
    fs.mv(tmp, p)


def map_shard(dedup: str, shard: WorkShard, source: SourceConfig, filters: FilterConfig, partitions: int) -> int:
    """Hash the URLs of one work shard's candidate rows into ``partitions`` buckets; returns their count."""
    rows = sample_rows(read_source(shard.source_file, source, shard.start, shard.stop),
                       source.sample_fraction, source.sample_seed)
    cand = dedup_candidates(rows, filters)
    head = pc.binary_slice(cand["url_hash"].cast(pa.binary()), 0, 4) if cand.num_rows else pa.array([], pa.binary())
    buckets = [int.from_bytes(h, "big") % partitions for h in head.to_pylist()]
    table = pa.table({"bucket": pa.array(buckets, pa.int32()), "url_hash": cand["url_hash"],
                      "shard": pa.array([shard.index] * cand.num_rows, pa.int32()),
                      "source_row": cand["source_row"]}, schema=MAP_SCHEMA).sort_by("bucket")
    parts = [table.filter(pc.equal(table["bucket"], b)) for b in sorted(set(buckets))]
    _write(table, f"{dedup}/map/{shard.index:08d}.parquet", parts or [table])
    return cand.num_rows


def reduce_bucket(dedup: str, bucket: int, num_shards: int) -> int:
    """The losers of one bucket: every row whose URL hash occurred earlier in (shard, row) order."""
    parts = []
    for i in range(num_shards):
        fs, p = fsspec.core.url_to_fs(f"{dedup}/map/{i:08d}.parquet")
        with fs.open(p, "rb") as f:
            parts.append(pq.read_table(f, filters=[("bucket", "=", bucket)], schema=MAP_SCHEMA))
    table = pa.concat_tables(parts).sort_by([("url_hash", "ascending"), ("shard", "ascending"),
                                            ("source_row", "ascending")])
    h = table["url_hash"].cast(pa.binary())
    if table.num_rows:
        repeat = pc.equal(h.slice(1), h.slice(0, table.num_rows - 1))
        loser = pa.concat_arrays([pa.array([False]), repeat.combine_chunks()])
    else:
        loser = pa.array([], pa.bool_())
    dups = table.filter(loser).select(["shard", "source_row"]).cast(DUPS_SCHEMA).sort_by("shard")
    _write(dups, f"{dedup}/dups/{bucket:05d}.parquet")
    return dups.num_rows


def duplicate_rows(dedup: str, shard_index: int, partitions: int) -> set[int]:
    """The ``source_row`` numbers of this shard that lose to an earlier occurrence of their URL."""
    out: set[int] = set()
    for b in range(partitions):
        fs, p = fsspec.core.url_to_fs(f"{dedup}/dups/{b:05d}.parquet")
        with fs.open(p, "rb") as f:
            t = pq.read_table(f, filters=[("shard", "=", shard_index)], schema=DUPS_SCHEMA)
        out.update(t["source_row"].to_pylist())
    return out


def done_marker(dedup: str) -> dict | None:
    fs, p = fsspec.core.url_to_fs(f"{dedup}/_done.json")
    if not fs.exists(p):
        return None
    with fs.open(p, "r") as f:
        return json.load(f)


def mark_done(dedup: str, plan: str, partitions: int, candidates: int, duplicates: int) -> None:
    fs, p = fsspec.core.url_to_fs(f"{dedup}/_done.json")
    with fs.open(p + ".tmp", "w") as f:
        json.dump({"plan": plan, "partitions": partitions, "candidates": candidates, "duplicates": duplicates}, f)
    fs.mv(p + ".tmp", p)


def clear(dedup: str) -> None:
    fs, p = fsspec.core.url_to_fs(dedup)
    if fs.exists(p):
        fs.rm(p, recursive=True)
