"""Cut a subset of grounding shards into new shards: a SQL filter, or a concept-balanced sample.

The concept-balanced subset follows LLaVA's CC3M filter (595K pre-training pairs): count, for
every concept (the phrases' head noun, or the whole phrase), the images that name it; drop
concepts seen in fewer than ``min_images`` images (LLaVA: fewer than 3); keep every image of a
concept seen in at most ``cap`` images; for a more frequent concept draw ``cap`` of its images
(LLaVA: 100). The subset is the union of what the concepts drew. The draw is one random order of
the images under the seed (``md5(key || ':' || seed)``), shared by all concepts: an image drawn for
one concept tends to be drawn for its others too, so the union stays small. Because the union
counts an image once for each concept it names, a frequent concept can appear in more than ``cap``
kept images through images that rarer concepts drew; with one concept per image the cap is exact.

The selection is plain SQL (:func:`balance_sql`), run by DuckDB on metadata only; the rows are then
copied a source file at a time in file order, image bytes untouched, and written with
:func:`grounding.schema.write_shard` (schema validated, provenance metadata kept). The resolved
config and counts are written next to the shards (``DEST/export.json``), so an export can be
replayed; ``DEST`` is itself an output folder :func:`grounding.query.connect` can open.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa

from grounding.schema import SchemaError, read_metadata, shard_columns_sql, write_shard

CONCEPTS = {
    "head": "p.head",                                  # the phrase's head noun lemma ("ball")
    "phrase": "lower(coalesce(p.prompt, p.text))",     # the whole phrase ("red ball")
}


@dataclass
class ExportConfig:
    """What to export. ``cap=None``: every row passing ``where``; ``cap=N``: the balanced subset."""

    where: str | None = None        # SQL boolean over the shards' columns; None keeps all
    cap: int | None = None          # balanced: at most this many images drawn per concept
    min_images: int = 3             # balanced: concepts in fewer images are dropped
    by: str = "head"                # balanced: "head" (head noun) or "phrase"
    seed: int = 0
    rows_per_shard: int = 1000

    def __post_init__(self):
        if self.where is not None and not self.where.strip():
            raise ValueError("where must be a SQL condition or None")
        if self.cap is not None and self.cap < 1:
            raise ValueError(f"cap must be >= 1, got {self.cap}")
        if self.min_images < 1:
            raise ValueError(f"min_images must be >= 1, got {self.min_images}")
        if self.by not in CONCEPTS:
            raise ValueError(f"by must be one of {sorted(CONCEPTS)}, got {self.by!r}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")

    @property
    def balanced(self) -> bool:
        return self.cap is not None


def llava_balance(seed: int = 0, where: str | None = None) -> ExportConfig:
    """LLaVA's CC3M recipe over head nouns: drop nouns in < 3 images, at most 100 images each."""
    return ExportConfig(where=where, cap=100, min_images=3, by="head", seed=seed)


def _where(cfg: ExportConfig) -> str:
    return f"({cfg.where})" if cfg.where else "true"


def _concepts_cte(cfg: ExportConfig) -> str:
    concept = CONCEPTS[cfg.by]
    return f"""
WITH concepts AS (            -- (image, concept) once per image
    SELECT DISTINCT key, {concept} AS concept
    FROM (SELECT key, unnest(phrases) AS p FROM shards WHERE {_where(cfg)})
    WHERE {concept} IS NOT NULL),
freq AS (                     -- images per concept
    SELECT concept, count(*) AS images FROM concepts GROUP BY concept)"""


def balance_sql(cfg: ExportConfig) -> str:
    """The SQL that selects the balanced subset's keys (parameters ``$cap``, ``$min_images``, ``$seed``)."""
    return _concepts_cte(cfg) + """,
drawn AS (                    -- each kept concept's images in the seed's order
    SELECT key, concept,
           row_number() OVER (PARTITION BY concept ORDER BY md5(key || ':' || $seed), key) AS draw
    FROM concepts JOIN freq USING (concept)
    WHERE freq.images >= $min_images)
SELECT DISTINCT key FROM drawn WHERE draw <= $cap"""


def _keep(con: duckdb.DuckDBPyConnection, cfg: ExportConfig) -> str:
    """The SQL condition selecting the exported rows (the balanced keys go to temp table ``_export_keys``)."""
    con.execute(f"SELECT key FROM shards WHERE {_where(cfg)} LIMIT 0")  # a bad filter fails before any write
    if not cfg.balanced:
        return _where(cfg)
    params = {"cap": cfg.cap, "min_images": cfg.min_images, "seed": str(cfg.seed)}
    con.execute(f"CREATE OR REPLACE TEMP TABLE _export_keys AS {balance_sql(cfg)}", params)
    return f"{_where(cfg)} AND key IN (SELECT key FROM _export_keys)"


def file_batches(con: duckdb.DuckDBPyConnection, files: list[str], keep: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    """The rows passing ``keep``, a source file at a time in file order, every column of the schema
    (a column an older schema version lacks comes as NULL)."""
    for f in files:
        columns = shard_columns_sql(con.sql("SELECT * FROM read_parquet(?) LIMIT 0", params=[f]).columns)
        sql = (f"SELECT * EXCLUDE (file_row_number) FROM (SELECT {columns}, file_row_number "
               f"FROM read_parquet(?, file_row_number = true)) AS shards WHERE {keep} ORDER BY file_row_number")
        for batch in con.sql(sql, params=[f]).to_arrow_reader(batch_size=batch_size):
            if batch.num_rows:
                yield batch


@dataclass
class ExportResult:
    dest: str
    files: list[str]
    images: int
    config: ExportConfig
    source_files: int
    # balanced: each concept kept by the min_images rule -> its images in the subset (a dropped concept that a
    # kept image also names is not listed)
    concepts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"dest": self.dest, "images": self.images, "shards": len(self.files),
                "source_files": self.source_files, "config": asdict(self.config),
                "concepts": len(self.concepts)}


def _common_provenance(files: list[str]) -> dict[str, Any]:
    """The provenance items every source shard agrees on (detector, config hash, ...)."""
    common: dict[str, Any] | None = None
    for f in files:
        try:
            prov = read_metadata(f)["provenance"]
        except (SchemaError, OSError, ValueError):  # a shard without our metadata contributes nothing
            prov = {}
        common = dict(prov) if common is None else {k: v for k, v in common.items() if prov.get(k) == v}
    return common or {}


def export_shards(con: duckdb.DuckDBPyConnection, dest: str | os.PathLike, config: ExportConfig | None = None,
                  *, overwrite: bool = False) -> ExportResult:
    """Write the subset ``config`` selects from ``con``'s ``shards`` view to ``dest/shards/*.parquet``.

    Rows keep the source order (source file, then row). Refuses to add to a folder that already
    holds shards unless ``overwrite`` (which deletes them first).
    """
    cfg = config or ExportConfig()
    keep = _keep(con, cfg)  # a bad filter fails before any write
    out = Path(dest) / "shards"
    files = [r[0] for r in con.execute("SELECT file FROM shard_files").fetchall()]
    if any(Path(f).resolve().parent == out.resolve() for f in files):
        raise ValueError(f"{out} holds the shards being exported: choose another destination")
    existing = sorted(out.glob("*.parquet")) if out.exists() else []
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} shards; pass overwrite=True (--overwrite)")
    for f in existing:
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)

    concepts: dict[str, int] = {}
    provenance = {**_common_provenance(files),
                  "export": {**asdict(cfg), "source": os.path.commonpath(files) if files else None,
                             "source_files": len(files)}}
    written: list[str] = []
    pending: list[pa.RecordBatch] = []
    total = 0

    def flush(final: bool) -> None:
        nonlocal pending
        table = pa.Table.from_batches(pending, schema=pending[0].schema).combine_chunks()
        while table.num_rows >= cfg.rows_per_shard or (final and table.num_rows):
            part, table = table.slice(0, cfg.rows_per_shard), table.slice(cfg.rows_per_shard)
            written.append(write_shard(part, str(out / f"{len(written):05d}.parquet"), provenance=provenance))
        pending = table.to_batches()

    for batch in file_batches(con, files, keep, max(cfg.rows_per_shard, 64)):
        pending.append(batch)
        total += batch.num_rows
        if sum(b.num_rows for b in pending) >= cfg.rows_per_shard:
            flush(final=False)
    if pending:
        flush(final=True)

    if cfg.balanced:  # the concepts the min_images rule kept, each with its images in the subset
        concepts = dict(con.execute(_concepts_cte(cfg) + """
            SELECT concept, count(*) AS images FROM concepts JOIN freq USING (concept)
            WHERE freq.images >= $min_images AND key IN (SELECT key FROM _export_keys)
            GROUP BY concept ORDER BY concept""", {"min_images": cfg.min_images}).fetchall())
        con.execute("DROP TABLE IF EXISTS _export_keys")
    result = ExportResult(dest=str(dest), files=written, images=total, config=cfg,
                          source_files=len(files), concepts=concepts)
    (Path(dest) / "export.json").write_text(json.dumps(
        {**result.summary(), "files": [os.path.basename(f) for f in written], "concepts": concepts,
         "provenance": provenance}, indent=1, default=str))
    return result


def export_converted(con: duckdb.DuckDBPyConnection, dest: str | os.PathLike, fmt: str,
                     config: ExportConfig | None = None, *, overwrite: bool = False):
    """Write the subset ``config`` selects to ``dest`` in ``fmt`` (``coco`` | ``odvg`` | ``grit``,
    see :mod:`grounding.convert`), rows in source order; returns a :class:`grounding.convert.ConvertResult`.
    ``rows_per_shard`` does not apply (each format is one annotation file)."""
    from grounding.convert import convert

    cfg = config or ExportConfig()
    files = [r[0] for r in con.execute("SELECT file FROM shard_files").fetchall()]
    keep = _keep(con, cfg)
    try:
        rows = (row for batch in file_batches(con, files, keep, 256) for row in batch.to_pylist())
        return convert(rows, dest, fmt, overwrite=overwrite,
                       meta={"config": asdict(cfg), "source": os.path.commonpath(files) if files else None,
                             "source_files": len(files)})
    finally:
        con.execute("DROP TABLE IF EXISTS _export_keys")
