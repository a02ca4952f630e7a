"""Run-wide image dedup after the shard tasks: the same picture kept once, first occurrence wins.

The rule and the partitioning are :mod:`grounding.dedup`'s (exact by sha256, near by phash within
``dedup.threshold`` bits; a row is dropped when an earlier row in (shard index, source_row) order
matches). The steps, none of which sends a row to the driver:

0. each shard task writes ``image_dedup/hashes/<index>.parquet`` (:func:`write_hashes`: order, key,
   sha256, phash, and the reject fields) for its kept rows, before its shard files;
1. **map**, one task per shard (:func:`map_shard`): :func:`grounding.dedup.partition_records` over
   its hashes -> ``image_dedup/map/<index>.parquet``, one row group per bucket (crc32 of the
   partition key modulo the bucket count);
2. **reduce**, one task per bucket (:func:`reduce_bucket`): that bucket's records from every map
   file, grouped by partition, :func:`grounding.dedup.decide_partition` on each ->
   ``image_dedup/drops/<bucket>.parquet`` (shard, order, reason, earlier row), sorted by shard;
3. **apply**, one task per shard (:func:`apply_shard`): its drops from every bucket file, the best
   decision per row; the rows leave the shard and join its rejects (stage ``dedup``), both files
   rewritten atomically with the summary in their provenance recounted.

Apply derives both files from the current ones and the drops (rows in the drop set removed, the
``dedup`` rejects rebuilt from the hashes), so a rerun, or a crash between the two writes, ends in
the same files. Shards without drops are left untouched.
"""
from __future__ import annotations

import zlib

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grounding.dedup import (REASON_DUPLICATE, REASON_NEAR_DUPLICATE, DedupConfig, best_decisions, decide_partition,
                             group_partitions, hash_record, partition_records, shard_row)
from grounding.schema import REJECTS_SCHEMA, read_metadata, read_table, write_shard
from pipeline.dedup import _write
from pipeline.output import Layout, shard_counts
from pipeline.plan import WorkShard

HASHES_SCHEMA = pa.schema([
    pa.field("order", pa.int64()), pa.field("key", pa.string()), pa.field("sha256", pa.string()),
    pa.field("phash", pa.string()), pa.field("url", pa.string()), pa.field("caption", pa.string()),
    pa.field("source_shard", pa.string()), pa.field("source_row", pa.int64()),
])
MAP_SCHEMA = pa.schema([pa.field("bucket", pa.int32()), pa.field("part", pa.string()), pa.field("kind", pa.string()),
                        pa.field("order", pa.int64()), pa.field("key", pa.string()), pa.field("hash", pa.string())])
DROPS_SCHEMA = pa.schema([pa.field("shard", pa.int32()), pa.field("order", pa.int64()), pa.field("reason", pa.string()),
                          pa.field("dup_order", pa.int64()), pa.field("dup_key", pa.string())])
DUP_REASONS = (REASON_DUPLICATE, REASON_NEAR_DUPLICATE)


def _path(layout: Layout, kind: str, index: int) -> str:
    return layout.join("image_dedup", kind, f"{index:08d}.parquet")


def _read(url: str, schema: pa.Schema, filters=None) -> pa.Table:
    fs, p = fsspec.core.url_to_fs(url)
    if not fs.exists(p):   # never "no rows": every step writes its files, empty or not, before the next reads them
        raise FileNotFoundError(f"{url}: missing, so image dedup cannot decide this shard. Each shard task and dedup "
                                "step writes it under --output; on a multi-node cluster that must be one folder "
                                "every node sees (shared, or s3:// / gs://), not a node-local path")
    with fs.open(p, "rb") as f:
        return pq.read_table(f, filters=filters, schema=schema)


def write_hashes(layout: Layout, shard: WorkShard, kept: pa.Table, config: DedupConfig) -> int:
    """Step 0, in the shard task: the hashes of its kept rows (images still in memory)."""
    rows = kept.select(["key", "image", "url", "caption", "source_shard", "source_row"]).to_pylist()
    records = [{**hash_record(shard.index, r["source_row"], r["key"], r["image"], config),
                "url": r["url"], "caption": r["caption"], "source_shard": r["source_shard"], "source_row": r["source_row"]}
               for r in rows]
    _write(pa.Table.from_pylist(records, schema=HASHES_SCHEMA), _path(layout, "hashes", shard.index))
    return len(records)


def map_shard(output: str, index: int, partitions: int, config: DedupConfig) -> int:
    """Step 1: the shard's partition records, bucketed; returns how many it emitted."""
    layout = Layout(output)
    hashes = _read(_path(layout, "hashes", index), HASHES_SCHEMA).select(["order", "key", "sha256", "phash"])
    parts = [{"bucket": zlib.crc32(p["part"].encode()) % partitions, **p}
             for p in partition_records(hashes.to_pylist(), config)]
    table = pa.Table.from_pylist(parts, schema=MAP_SCHEMA).sort_by("bucket")
    groups = [table.filter(pc.equal(table["bucket"], b)) for b in sorted(set(table["bucket"].to_pylist()))]
    _write(table, _path(layout, "map", index), groups or [table])
    return table.num_rows


def reduce_bucket(output: str, bucket: int, num_shards: int, config: DedupConfig) -> int:
    """Step 2: every partition of one bucket decided; returns the drops it found."""
    layout = Layout(output)
    table = pa.concat_tables([_read(_path(layout, "map", i), MAP_SCHEMA, [("bucket", "=", bucket)])
                              for i in range(num_shards)])
    groups = group_partitions(table.drop_columns(["bucket"]).to_pylist())
    drops = [{"shard": shard_row(d["order"])[0], **d} for g in groups.values() for d in decide_partition(g, config)]
    out = pa.Table.from_pylist(drops, schema=DROPS_SCHEMA).sort_by([("shard", "ascending"), ("order", "ascending")])
    _write(out, _path(layout, "drops", bucket))
    return out.num_rows


def apply_shard(output: str, index: int, name: str, partitions: int) -> dict | None:
    """Step 3: drop the shard's duplicates; returns its new counts (:func:`pipeline.output.shard_counts`),
    or None when it has none."""
    layout = Layout(output)
    drops = pa.concat_tables([_read(_path(layout, "drops", b), DROPS_SCHEMA, [("shard", "=", index)])
                              for b in range(partitions)])
    best = best_decisions(drops.to_pylist())
    if not best:
        return None
    hashes = {r["order"]: r for r in _read(_path(layout, "hashes", index), HASHES_SCHEMA).to_pylist()}
    dropped_rows = {hashes[o]["source_row"] for o in best}
    kept = read_table(layout.shard(name))
    rejects = read_table(layout.rejects(name))
    prov = read_metadata(layout.rejects(name))["provenance"]
    kept = kept.filter(pc.invert(pc.is_in(kept["source_row"], pa.array(sorted(dropped_rows), pa.int64()))))
    old = rejects.filter(pc.invert(pc.and_(pc.equal(rejects["stage"], "dedup"),
                                           pc.is_in(rejects["reason"], pa.array(DUP_REASONS)))))
    new = []
    for order, d in sorted(best.items()):
        h = hashes[order]
        ds, dr = shard_row(d["dup_order"])
        new.append({"key": h["key"], "url": h["url"], "caption": h["caption"], "source_shard": h["source_shard"],
                    "source_row": h["source_row"], "stage": "dedup", "reason": d["reason"],
                    "error": f"repeats key {d['dup_key']!r} (shard {ds}, row {dr})"})
    rejects = pa.concat_tables([old.cast(REJECTS_SCHEMA), pa.Table.from_pylist(new, schema=REJECTS_SCHEMA)])
    rejects = rejects.sort_by("source_row")
    counts = shard_counts(kept, rejects)
    summary = {**prov.get("summary", {}), **counts}
    prov = {**prov, "summary": summary, "counts": {k: summary[k] for k in ("input", "kept", "failed", "filtered")}}
    write_shard(kept, layout.shard(name), prov)
    write_shard(rejects, layout.rejects(name), prov, schema=REJECTS_SCHEMA)
    return counts
