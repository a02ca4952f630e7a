"""DuckDB over grounding shards: a connection with ``shards`` and ``rejects`` views, named reports.

:func:`connect` takes a pipeline output folder (``OUT/shards/*.parquet``, ``OUT/rejects/*.parquet``),
a folder of shards, one shard, or a glob, and returns a plain :class:`duckdb.DuckDBPyConnection`
with three views:

- ``shards``: every grounding shard (:data:`grounding.schema.GROUNDING_SCHEMA`), one row per image;
- ``rejects``: every rejects shard (:data:`grounding.schema.REJECTS_SCHEMA`); empty, with the right
  columns, when the run has no rejects folder;
- ``shard_files``: the shard files (``file``), for jobs that work a file at a time.

The views re-read the glob at every query, so a running pipeline's new shards show up. DuckDB reads
only the Parquet columns a query names: a query that does not name ``image`` reads no image bytes
(:func:`measure_read` shows it, from DuckDB's own file-system log; see ``prefetch`` in :func:`connect`).

The named reports (:data:`REPORTS`) are plain SQL over those views; ``$name`` marks a parameter
(``$limit``, ``$bins``) whose default the report carries. Print one to copy it::

    grounding-query report summary --show-sql

The command line over these (``grounding-query``) is :mod:`grounding.query_cli`.
"""
from __future__ import annotations

import contextlib
import glob as globlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import duckdb
import pyarrow as pa

from grounding.cli import run_cli
from grounding.reasons import RENAMED
from grounding.schema import GROUNDING_SCHEMA, REJECTS_SCHEMA

ENV_DATA = "GROUNDING_SHARDS"
_GLOB_CHARS = set("*?[")


# --- where the shards are --------------------------------------------------------------------

@dataclass(frozen=True)
class ShardSource:
    """The globs behind the views. ``rejects`` is None when there are no rejects shards;
    ``output_folder`` is True when both came from a pipeline output folder, whose ``shards/`` or
    ``rejects/`` may legitimately be empty."""

    shards: str
    rejects: str | None = None
    output_folder: bool = False

    def __post_init__(self):
        if not self.shards:
            raise ValueError("ShardSource needs a shards glob")


def _has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve_source(data: str | os.PathLike | None = None, *, shards: str | None = None,
                   rejects: str | None = None) -> ShardSource:
    """Work out the shard and rejects globs.

    ``data`` is a pipeline output folder (with ``shards/`` and maybe ``rejects/``), a folder of
    shards, one ``.parquet`` file, or a glob; ``shards`` / ``rejects`` are explicit globs that win
    over what ``data`` implies. With neither, ``$GROUNDING_SHARDS`` is used.
    """
    if data is None and shards is None:
        data = os.environ.get(ENV_DATA)
        if not data:
            raise ValueError(f"no shards given: pass data=/shards= (CLI: --data) or set ${ENV_DATA}")
    implied_rejects, output_folder = None, False
    if shards is None:
        d = str(data)
        if _has_glob(d) or _is_remote(d) or d.endswith(".parquet"):
            shards = d
        elif os.path.isdir(d):
            if os.path.isdir(os.path.join(d, "shards")) or os.path.isdir(os.path.join(d, "rejects")):
                shards = os.path.join(d, "shards", "*.parquet")
                implied_rejects = os.path.join(d, "rejects", "*.parquet")
                output_folder = True
            else:
                shards = os.path.join(d, "*.parquet")
        else:
            raise FileNotFoundError(f"{d}: no such folder or shard")
    return ShardSource(shards=str(shards), rejects=str(rejects) if rejects is not None else implied_rejects,
                       output_folder=output_folder)


def _matches(pattern: str) -> bool:
    if _is_remote(pattern):
        return True  # DuckDB resolves remote globs itself
    return bool(globlib.glob(pattern))


# --- the connection --------------------------------------------------------------------------

def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def connect(data: str | os.PathLike | None = None, *, shards: str | None = None, rejects: str | None = None,
            threads: int | None = None, prefetch: bool = False, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with ``shards``, ``rejects`` and ``shard_files`` views (see the module doc).

    An output folder whose ``shards/`` or ``rejects/`` holds no files gives an empty view with the
    schema's columns. An explicit shards glob or file that matches nothing raises
    :class:`FileNotFoundError` (most often a typo).

    ``prefetch=False`` turns DuckDB's Parquet prefetching off. With it on, DuckDB 2.0 reads a fixed
    ~1 MB past each nested column chunk (``phrases``, ``qa``), which pulls the next row group's
    image bytes into metadata queries: on 128 MiB of shards (128 KiB images, row groups of 128)
    the summary report read 8.8 MiB with it on and 0.31 MiB with it off, equally fast from the page
    cache (``benchmarks/bench_query.py``). Turn it on for remote object stores, where fewer, larger
    reads pay.
    """
    src = resolve_source(data, shards=shards, rejects=rejects)
    con = duckdb.connect(database)
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    con.execute(f"SET disable_parquet_prefetching = {'false' if prefetch else 'true'}")
    if _matches(src.shards):
        con.execute(f"CREATE OR REPLACE VIEW shards AS SELECT * FROM read_parquet({_sql_str(src.shards)}, union_by_name = true)")
        con.execute(f"CREATE OR REPLACE VIEW shard_files AS SELECT file FROM glob({_sql_str(src.shards)}) ORDER BY file")
    elif not src.output_folder:
        raise FileNotFoundError(f"no grounding shards match {src.shards}")
    else:
        _empty_view(con, "shards", GROUNDING_SCHEMA)
        con.execute("CREATE OR REPLACE VIEW shard_files AS SELECT NULL::VARCHAR AS file WHERE false")
    if src.rejects is not None and _matches(src.rejects):
        con.execute(f"CREATE OR REPLACE VIEW rejects AS SELECT * REPLACE ({_renamed_reasons_sql()} AS reason) "
                    f"FROM read_parquet({_sql_str(src.rejects)})")
    elif rejects is not None:
        raise FileNotFoundError(f"no rejects shards match {src.rejects}")
    else:
        _empty_view(con, "rejects", REJECTS_SCHEMA)
    return con


def _renamed_reasons_sql() -> str:
    """SQL giving ``reason`` under today's name (grounding.reasons.RENAMED), so older rejects shards count with new ones."""
    cases = " ".join(f"WHEN {_sql_str(a)} THEN {_sql_str(b)}" for a, b in RENAMED.items())
    return f"CASE reason {cases} ELSE reason END" if cases else "reason"


def _empty_view(con: duckdb.DuckDBPyConnection, name: str, schema: pa.Schema) -> None:
    con.register(f"_empty_{name}", schema.empty_table())
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _empty_{name}")


# --- named reports ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Report:
    """A named, documented SQL query over the views; ``$name`` parameters default to ``params``."""

    name: str
    doc: str
    sql: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def bind(self, **overrides: Any) -> dict[str, Any]:
        unknown = set(overrides) - set(self.params)
        if unknown:
            raise ValueError(f"report {self.name!r} takes {sorted(self.params) or 'no parameters'}, not {sorted(unknown)}")
        return {**self.params, **{k: v for k, v in overrides.items() if v is not None}}

    def text(self) -> str:
        """The SQL as a user copies it, with its documentation and parameter defaults on top."""
        head = [f"-- {self.name}: {line}" if i == 0 else f"--   {line}" for i, line in enumerate(self.doc.splitlines())]
        if self.params:
            head.append("-- parameters: " + ", ".join(f"${k} = {v!r}" for k, v in self.params.items()))
        return "\n".join(head) + "\n" + self.sql.strip() + "\n"


# An image's distinct boxes, as the pipeline counts them in `num_boxes`: a box two phrases share counts once.
_DISTINCT_BOXES = """
    SELECT DISTINCT key, box FROM (
        SELECT key, unnest(p.boxes_norm) AS box FROM (SELECT key, unnest(phrases) AS p FROM shards))"""

# A chunk (the detector's phrase) as opposed to a referring expression, which carries a copy of its head
# chunk's boxes and scores: counting both would count those boxes twice.
_IS_CHUNK = "coalesce(p.kind, 'chunk') = 'chunk'"

# Every (chunk, box) pair with its detector score.
_PHRASE_BOXES = """
    SELECT key, p.head AS head, unnest(p.boxes_norm) AS box, unnest(p.det_scores) AS score
    FROM (SELECT key, unnest(phrases) AS p FROM shards)
    WHERE """ + _IS_CHUNK

REPORTS: dict[str, Report] = {r.name: r for r in [
    Report("summary",
           "One row: images, phrases (chunks), expressions (referring expressions: they reuse their chunk's\n"
           "boxes, so they are counted apart and nowhere else), distinct boxes, (chunk, box) pairs, QA pairs,\n"
           "the share of images with >= 2 boxes, mean boxes per image, detector-score mean/median/min over\n"
           "(chunk, box) pairs, rejects, and kept_share = images / (images + rejects), the share of input rows\n"
           "that became training rows.",
           """
WITH img AS (
    SELECT count(*) AS images,
           coalesce(sum(len(list_filter(phrases, lambda p: """ + _IS_CHUNK + """))), 0)::BIGINT AS phrases,
           coalesce(sum(len(list_filter(phrases, lambda p: NOT """ + _IS_CHUNK + """))), 0)::BIGINT AS expressions,
           coalesce(sum(num_boxes), 0)::BIGINT AS boxes,
           coalesce(sum(len(qa)), 0)::BIGINT AS qa_pairs,
           avg((num_boxes >= 2)::INTEGER) AS share_2plus_boxes,
           avg(num_boxes) AS boxes_per_image
    FROM shards),
det AS (
    SELECT count(*) AS phrase_boxes, avg(score) AS mean_score, median(score) AS median_score,
           min(score) AS min_score
    FROM (""" + _PHRASE_BOXES + """)),
rej AS (SELECT count(*) AS rejects FROM rejects)
SELECT images, phrases, expressions, boxes, phrase_boxes, qa_pairs, share_2plus_boxes, boxes_per_image,
       mean_score, median_score, min_score, rejects,
       images / nullif(images + rejects, 0) AS kept_share
FROM img, det, rej"""),
    Report("boxes_per_image",
           "Histogram of distinct boxes per image (`num_boxes`): images and their share per count.",
           """
SELECT num_boxes, count(*) AS images, count(*) / sum(count(*)) OVER () AS share
FROM shards
GROUP BY num_boxes
ORDER BY num_boxes"""),
    Report("box_area",
           "Histogram of box area as a share of the image, (x1-x0)*(y1-y0)/1000^2 in normalised\n"
           "coordinates, over each image's distinct boxes, in $bins equal bins over [0, 1]; empty bins show 0.",
           """
WITH areas AS (
    SELECT (box[3] - box[1])::INTEGER * (box[4] - box[2]) / 1e6 AS area FROM (""" + _DISTINCT_BOXES + """)),
binned AS (
    SELECT least(floor(area * $bins), $bins - 1)::INTEGER AS bin, count(*) AS boxes FROM areas GROUP BY bin)
SELECT b.range::INTEGER AS bin, b.range / $bins AS area_from, (b.range + 1) / $bins AS area_to,
       coalesce(boxes, 0) AS boxes, coalesce(boxes, 0) / nullif(sum(boxes) OVER (), 0) AS share
FROM range($bins) AS b LEFT JOIN binned ON binned.bin = b.range
ORDER BY bin""", {"bins": 10}),
    Report("scores",
           "Histogram of detector scores over (chunk, box) pairs in $bins equal bins over [0, 1]\n"
           "(a score of exactly 1.0 falls in the last bin); empty bins show 0.",
           """
WITH binned AS (
    SELECT least(floor(score * $bins), $bins - 1)::INTEGER AS bin, count(*) AS boxes
    FROM (""" + _PHRASE_BOXES + """)
    GROUP BY bin)
SELECT b.range::INTEGER AS bin, b.range / $bins AS score_from, (b.range + 1) / $bins AS score_to,
       coalesce(boxes, 0) AS boxes, coalesce(boxes, 0) / nullif(sum(boxes) OVER (), 0) AS share
FROM range($bins) AS b LEFT JOIN binned ON binned.bin = b.range
ORDER BY bin""", {"bins": 10}),
    Report("top_heads",
           "The $limit most frequent head nouns: images whose chunks name them, chunks (phrases), their boxes\n"
           "and mean score; apart, the referring expressions with that head (they reuse their chunk's boxes).",
           """
SELECT p.head AS head, count(DISTINCT key) FILTER (WHERE """ + _IS_CHUNK + """) AS images,
       count(*) FILTER (WHERE """ + _IS_CHUNK + """) AS phrases,
       sum(len(p.boxes_norm)) FILTER (WHERE """ + _IS_CHUNK + """)::BIGINT AS boxes,
       avg(list_avg(p.det_scores)) FILTER (WHERE """ + _IS_CHUNK + """) AS mean_score,
       count(*) FILTER (WHERE NOT """ + _IS_CHUNK + """) AS expressions
FROM (SELECT key, unnest(phrases) AS p FROM shards)
WHERE p.head IS NOT NULL
GROUP BY p.head
HAVING count(*) FILTER (WHERE """ + _IS_CHUNK + """) > 0
ORDER BY images DESC, phrases DESC, head
LIMIT $limit""", {"limit": 20}),
    Report("top_phrases",
           "The $limit most frequent chunks (the detector prompt, else the caption text, lower-cased); referring\n"
           "expressions reuse their chunk's boxes and are counted in summary and top_heads.",
           """
SELECT lower(coalesce(p.prompt, p.text)) AS phrase, count(DISTINCT key) AS images, count(*) AS phrases,
       sum(len(p.boxes_norm))::BIGINT AS boxes, avg(list_avg(p.det_scores)) AS mean_score
FROM (SELECT key, unnest(phrases) AS p FROM shards)
WHERE """ + _IS_CHUNK + """
GROUP BY phrase
ORDER BY images DESC, phrases DESC, phrase
LIMIT $limit""", {"limit": 20}),
    Report("rejects_by_reason",
           "Rejected input rows per (stage, reason), their share of all rejects, and one example error.",
           """
SELECT stage, reason, count(*) AS rows, count(*) / sum(count(*)) OVER () AS share,
       min(error) AS example_error
FROM rejects
GROUP BY stage, reason
ORDER BY rows DESC, stage, reason"""),
    Report("per_source_shard",
           "Per input (source) shard: kept images, their boxes, rejected rows and kept_share.",
           """
WITH kept AS (
    SELECT source_shard, count(*) AS images, sum(num_boxes)::BIGINT AS boxes FROM shards GROUP BY source_shard),
rej AS (
    SELECT source_shard, count(*) AS rejects FROM rejects GROUP BY source_shard)
SELECT coalesce(kept.source_shard, rej.source_shard) AS source_shard,
       coalesce(images, 0) AS images, coalesce(boxes, 0) AS boxes, coalesce(rejects, 0) AS rejects,
       coalesce(images, 0) / (coalesce(images, 0) + coalesce(rejects, 0)) AS kept_share
FROM kept FULL OUTER JOIN rej ON kept.source_shard IS NOT DISTINCT FROM rej.source_shard
ORDER BY source_shard NULLS LAST"""),
]}


def report(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> duckdb.DuckDBPyRelation:
    """Run the named report; ``params`` override its defaults (``limit=50``, ``bins=20``).

    Returns a DuckDB relation: ``.fetchall()``, ``.to_arrow_table()``, ``.show()``, ``.df()``.
    """
    if name not in REPORTS:
        raise KeyError(f"unknown report {name!r}; reports: {', '.join(REPORTS)}")
    r = REPORTS[name]
    bound = r.bind(**params)
    used = {k: v for k, v in bound.items() if f"${k}" in r.sql}
    return con.sql(r.sql, params=used or None)


def records(rel: duckdb.DuckDBPyRelation) -> list[dict[str, Any]]:
    """A relation's rows as dicts (column name -> value)."""
    return rel.to_arrow_table().to_pylist()


# --- what a query reads ----------------------------------------------------------------------

@dataclass(frozen=True)
class ReadStats:
    """What one query read from disk, from DuckDB's ``FileSystem`` log."""

    bytes_read: int
    reads: int
    files: int
    seconds: float
    rows: int


def measure_read(con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any] | None = None) -> ReadStats:
    """Run ``sql`` with DuckDB's file-system logging on and sum the bytes it read.

    The proof that a metadata query leaves the image column alone: compare its ``bytes_read`` with
    the shards' size (``grounding-query`` docs and ``benchmarks/bench_query.py``).
    """
    con.execute("CALL enable_logging('FileSystem')")
    try:
        con.execute("CALL truncate_duckdb_logs()")
        t0 = time.perf_counter()
        rows = len(con.sql(sql, params=params).fetchall())
        seconds = time.perf_counter() - t0
    finally:
        con.execute("CALL disable_logging()")
    nbytes = reads = 0
    files = set()
    for (message,) in con.sql("SELECT message FROM duckdb_logs WHERE type = 'FileSystem'").fetchall():
        m = json.loads(message)
        if m.get("op") == "READ":
            nbytes += int(m.get("bytes", 0))
            reads += 1
            files.add(m.get("path"))
    con.execute("CALL truncate_duckdb_logs()")
    return ReadStats(bytes_read=nbytes, reads=reads, files=len(files), seconds=seconds, rows=rows)


def scan_columns(con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any] | None = None) -> set[str]:
    """The shard columns the plan of ``sql`` reads from Parquet (its scans' projections and filters)."""
    plan = json.loads(con.execute("EXPLAIN (FORMAT json) " + sql, params or None).fetchall()[0][1])
    names = set(GROUNDING_SCHEMA.names) | set(REJECTS_SCHEMA.names)
    cols: set[str] = set()
    stack = list(plan)
    while stack:
        node = stack.pop()
        stack.extend(node.get("children", []))
        if "PARQUET" in node.get("name", "").upper():
            text = json.dumps(node.get("extra_info", {}))
            cols.update(c for c in names if re.search(rf"\b{c}\b", text))
    return cols


# --- output ----------------------------------------------------------------------------------

FORMATS = ("table", "csv", "json", "parquet")


def write_result(con: duckdb.DuckDBPyConnection, rel: duckdb.DuckDBPyRelation, fmt: str = "table",
                 output: str | None = None, max_rows: int = 100) -> None:
    """Print ``rel`` as a table, or write it as CSV / NDJSON / Parquet to ``output`` (or stdout).

    Files are written by DuckDB's ``COPY`` so nested columns (phrases, boxes) survive in JSON and
    Parquet; stdout gets the same bytes.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "table":
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rel.show(max_rows=max_rows, max_width=200)
        text = buf.getvalue().rstrip("\n")
        if output:
            Path(output).write_text(text + "\n")
        else:
            print(text)
        return
    if fmt == "parquet" and not output:
        raise ValueError("parquet output needs --output PATH")
    options = {"csv": "FORMAT csv, HEADER true", "json": "FORMAT json", "parquet": "FORMAT parquet"}[fmt]
    view = f"_result_{os.getpid()}_{time.monotonic_ns()}"
    rel.create_view(view, replace=True)
    try:
        if output:
            con.execute(f"COPY (SELECT * FROM {view}) TO {_sql_str(str(output))} ({options})")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, f"result.{fmt}")
                con.execute(f"COPY (SELECT * FROM {view}) TO {_sql_str(path)} ({options})")
                with open(path, encoding="utf-8") as f:
                    shutil.copyfileobj(f, sys.stdout)
    finally:
        con.execute(f"DROP VIEW IF EXISTS {view}")


def check_source(src: ShardSource) -> None:
    """Every file behind the views is a shard of its kind (footers only): else one line naming it."""
    import fsspec

    from grounding.schema import check_shards

    for pattern, schema, flag in ((src.shards, GROUNDING_SCHEMA, "--data/--shards"), (src.rejects, REJECTS_SCHEMA, "--rejects")):
        if pattern is None:
            continue
        fs, p = fsspec.core.url_to_fs(pattern)
        files = fs.glob(p) if _has_glob(p) else ([p] if fs.exists(p) else [])
        check_shards([fs.unstrip_protocol(f) if _is_remote(pattern) else f for f in files], schema, flag=flag)


if __name__ == "__main__":  # python -m grounding.query: the command line (grounding.query_cli)
    from grounding.query_cli import main

    sys.exit(run_cli(main))
