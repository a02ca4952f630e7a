"""The grounding shard schema, defined once. Every writer validates against it; readers use it.

A grounding shard is a Parquet file with one row per kept image (:data:`GROUNDING_SCHEMA`); a
rejects shard has one row per input row that was filtered or failed (:data:`REJECTS_SCHEMA`).
Both carry ``grounding.schema_version`` and ``grounding.provenance`` (JSON: source shard, config
hash, detector name and weights, package version) in the Parquet key-value metadata.

Boxes are stored normalised (``boxes_norm``: integers 0..999, the rule in :mod:`grounding.boxes`)
in the frame of the stored image, whose size is ``width`` x ``height``.

``caption`` is the cleaned caption (:func:`grounding.captions.clean_caption`) that every phrase
span indexes; ``caption_raw`` the caption as the source gave it (nullable). Schema versions:
``"1"`` had no ``caption_raw``; ``"2"`` added it. Readers take both (:data:`READABLE_VERSIONS`):
:func:`read_shard` gives old rows ``caption_raw=None``, :func:`shard_columns_sql` selects NULL for
the missing column, and :func:`grounding.query.connect` unions shards by column name.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from grounding.boxes import NORM
from grounding.cli import UsageError

SCHEMA_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # "1": no caption_raw column
ROW_GROUP_SIZE = 128  # image bytes dominate: keep row groups to a few MB-hundreds of MB
META_VERSION = b"grounding.schema_version"
META_PROVENANCE = b"grounding.provenance"

PHRASE_TYPE = pa.struct([
    pa.field("text", pa.string(), nullable=False),       # the caption slice caption[start:end]
    pa.field("start", pa.int32(), nullable=False),       # char offsets in the caption
    pa.field("end", pa.int32(), nullable=False),
    pa.field("head", pa.string()),                       # head noun lemma
    pa.field("kind", pa.string(), nullable=False),       # "chunk" | "expression"
    pa.field("prompt", pa.string()),                     # what the detector was asked ("red ball")
    pa.field("boxes_norm", pa.list_(pa.list_(pa.int16())), nullable=False),  # [[x0,y0,x1,y1],...] 0..999
    pa.field("det_scores", pa.list_(pa.float32()), nullable=False),          # one per box
])
QA_TYPE = pa.struct([
    pa.field("task", pa.string(), nullable=False),       # "rec" | "caption"
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("phrase_index", pa.int32()),                # index into `phrases` (null for captions)
])

GROUNDING_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string(), nullable=False),    # cleaned: the text every phrase span indexes
    pa.field("caption_raw", pa.string()),                # as the source gave it (null in v1 shards)
    pa.field("width", pa.int32(), nullable=False),       # size of `image`: the frame of the boxes
    pa.field("height", pa.int32(), nullable=False),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("image", pa.binary(), nullable=False),      # encoded bytes (JPEG/PNG/WebP)
    pa.field("phrases", pa.list_(PHRASE_TYPE), nullable=False),
    pa.field("qa", pa.list_(QA_TYPE), nullable=False),
    pa.field("grounded_caption", pa.string(), nullable=False),
    pa.field("num_boxes", pa.int32(), nullable=False),   # distinct boxes over all phrases
    pa.field("source_shard", pa.string()),
    pa.field("source_row", pa.int64()),
])

REJECTS_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("source_shard", pa.string()),
    pa.field("source_row", pa.int64()),
    pa.field("stage", pa.string(), nullable=False),      # prefilter | download | decode | phrases | detect | filter
    pa.field("reason", pa.string(), nullable=False),     # short category, e.g. "too_few_boxes"
    pa.field("error", pa.string()),                      # detail: the exception text, the value that failed
])

GROUNDING_COLUMNS = GROUNDING_SCHEMA.names
METADATA_COLUMNS = [c for c in GROUNDING_COLUMNS if c != "image"]  # what a query reads without pixels


class SchemaError(ValueError):
    pass


class ShardError(SchemaError, UsageError):
    """A file that cannot be read as a shard of the wanted schema; the message names the file and what is wrong."""


# --- typed rows ------------------------------------------------------------------------------

@dataclass
class Phrase:
    """One referring phrase of a caption, the one record from extraction to the shard.

    :class:`grounding.phrases.PhraseExtractor` makes it (span, head, kind, prompt, ``chunk``), the detect
    stage fills ``boxes_norm`` / ``det_scores`` (:func:`assign_boxes`), :func:`grounding.records.build_record`
    writes it as a :data:`PHRASE_TYPE` struct (:meth:`record`: every field but ``chunk``, which indexes the
    extractor's phrase list and means nothing once phrases without boxes are dropped).
    """
    text: str          # == caption[start:end]
    start: int
    end: int
    head: str | None = None        # head noun lemma (lower case)
    kind: str = "chunk"            # "chunk" | "expression"
    prompt: str | None = None      # detector prompt ("red ball"); None: the text
    chunk: int | None = None       # index (same phrase list) of the head chunk whose boxes it takes; a chunk: itself
    boxes_norm: list[list[int]] = field(default_factory=list)
    det_scores: list[float] = field(default_factory=list)

    def to_dict(self, boxes: bool = True) -> dict:
        """Every field (``boxes=False``: without ``boxes_norm`` / ``det_scores``, as the extractor's JSON lines)."""
        d = {"text": self.text, "start": self.start, "end": self.end, "head": self.head, "kind": self.kind,
             "prompt": self.prompt, "chunk": self.chunk}
        if boxes:
            d["boxes_norm"], d["det_scores"] = self.boxes_norm, self.det_scores
        return d

    def record(self) -> dict:
        """The shard's :data:`PHRASE_TYPE` fields."""
        return {"text": self.text, "start": self.start, "end": self.end, "head": self.head, "kind": self.kind,
                "prompt": self.prompt, "boxes_norm": self.boxes_norm, "det_scores": self.det_scores}

    @classmethod
    def from_dict(cls, d: "Phrase | Mapping[str, Any]") -> "Phrase":
        """A phrase from a dict with these fields (a shard row's has no ``chunk``; missing boxes are empty)."""
        if isinstance(d, Phrase):
            return d
        return cls(d["text"], d["start"], d["end"], d.get("head"), d.get("kind") or "chunk", d.get("prompt"),
                   d.get("chunk"), list(d.get("boxes_norm") or []), list(d.get("det_scores") or []))


# --- rules over a row's phrase list (Phrase records, or dicts with their fields) ------------------

def _field(phrase: "Phrase | Mapping[str, Any]", name: str) -> Any:
    return phrase.get(name) if isinstance(phrase, Mapping) else getattr(phrase, name, None)


def phrase_prompt(phrase: "Phrase | Mapping[str, Any]") -> str:
    """What the detector and the REC question name: the phrase's prompt, else its text."""
    return _field(phrase, "prompt") or _field(phrase, "text")


def source_chunk(phrases: Sequence["Phrase | Mapping[str, Any]"], i: int) -> int:
    """The phrase whose boxes phrase ``i`` takes: an expression inherits its head chunk's, a chunk its own."""
    c = _field(phrases[i], "chunk")
    if _field(phrases[i], "kind") == "expression" and isinstance(c, int) and 0 <= c < len(phrases) and c != i:
        return c
    return i


def detection_targets(phrases: Sequence["Phrase | Mapping[str, Any]"]) -> list[int]:
    """Indices of the phrases the detector is asked about (the others inherit, :func:`source_chunk`)."""
    return [i for i in range(len(phrases)) if source_chunk(phrases, i) == i]


def assign_boxes(phrases: Sequence[Phrase], found: Mapping[int, tuple[list[list[int]], list[float]]]) -> None:
    """Give every phrase the boxes and scores its source chunk was found with (``found``: detection target
    index -> ``(boxes_norm, det_scores)``): an expression takes its chunk's boxes; unfound phrases get none."""
    for i, p in enumerate(phrases):
        p.boxes_norm, p.det_scores = found.get(source_chunk(phrases, i), ([], []))


@dataclass
class QAPair:
    task: str
    question: str
    answer: str
    phrase_index: int | None = None


@dataclass
class GroundingRow:
    key: str
    url: str | None
    caption: str
    width: int
    height: int
    image: bytes
    phrases: list[Phrase]
    qa: list[QAPair]
    grounded_caption: str
    num_boxes: int
    original_width: int | None = None
    original_height: int | None = None
    source_shard: str | None = None
    source_row: int | None = None
    caption_raw: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GroundingRow":
        d = dict(d)
        d["phrases"] = [Phrase.from_dict(p) for p in d["phrases"]]
        d["qa"] = [QAPair(**q) for q in d["qa"]]
        return cls(**{k: d.get(k) for k in GROUNDING_COLUMNS})


def row_to_dict(row: GroundingRow | Mapping[str, Any]) -> dict:
    if isinstance(row, GroundingRow):
        d = dict(row.__dict__)
        d["phrases"] = [p.record() for p in row.phrases]
        d["qa"] = [dict(q.__dict__) for q in row.qa]
        return d
    return dict(row)


# --- validation ------------------------------------------------------------------------------

def validate_rows(rows: Iterable[Mapping[str, Any]]) -> None:
    """Semantic checks the Arrow types cannot express; raises :class:`SchemaError` naming the row."""
    for i, r in enumerate(rows):
        where = f"row {i} (key={r.get('key')!r})"
        cap = r["caption"]
        for j, p in enumerate(r["phrases"]):
            if not (0 <= p["start"] <= p["end"] <= len(cap)) or cap[p["start"]:p["end"]] != p["text"]:
                raise SchemaError(f"{where}: phrase {j} span [{p['start']},{p['end']}) does not match its text {p['text']!r}")
            if p["kind"] not in ("chunk", "expression"):
                raise SchemaError(f"{where}: phrase {j} kind must be 'chunk' or 'expression', got {p['kind']!r}")
            if len(p["boxes_norm"]) != len(p["det_scores"]):
                raise SchemaError(f"{where}: phrase {j} has {len(p['boxes_norm'])} boxes but {len(p['det_scores'])} scores")
            for b in p["boxes_norm"]:
                if len(b) != 4 or not all(0 <= v < NORM for v in b) or b[0] > b[2] or b[1] > b[3]:
                    raise SchemaError(f"{where}: phrase {j} box {b} is not 4 ordered integers in 0..{NORM - 1}")
        for q in r["qa"]:
            pi = q.get("phrase_index")
            if pi is not None and not (0 <= pi < len(r["phrases"])):
                raise SchemaError(f"{where}: qa phrase_index {pi} out of range")
        if r["width"] <= 0 or r["height"] <= 0:
            raise SchemaError(f"{where}: image size must be positive")


def to_table(rows: Iterable[GroundingRow | Mapping[str, Any]], schema: pa.Schema = GROUNDING_SCHEMA) -> pa.Table:
    """Rows (dicts or :class:`GroundingRow`) -> a validated Arrow table of ``schema``."""
    dicts = [row_to_dict(r) for r in rows]
    missing = [c for c in schema.names if dicts and any(c not in d for d in dicts[:1])]
    if missing and schema is GROUNDING_SCHEMA:
        optional = {"original_width", "original_height", "source_shard", "source_row", "url", "caption_raw"}
        hard = [c for c in missing if c not in optional]
        if hard:
            raise SchemaError(f"rows lack required columns {hard}")
    try:
        table = pa.Table.from_pylist(dicts, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SchemaError(f"rows do not fit the schema: {e}") from e
    if schema is GROUNDING_SCHEMA:
        validate_rows(dicts)
    return table


def check_table(table: pa.Table, schema: pa.Schema = GROUNDING_SCHEMA) -> pa.Table:
    """Cast ``table`` to ``schema`` (same column names required) and validate it."""
    if table.schema.names != schema.names:
        raise SchemaError(f"columns {table.schema.names} differ from the schema's {schema.names}")
    try:
        table = table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise SchemaError(f"table does not fit the schema: {e}") from e
    for f in schema:
        if not f.nullable and table[f.name].null_count:
            raise SchemaError(f"column {f.name!r} has {table[f.name].null_count} nulls but is not nullable")
    if schema.equals(GROUNDING_SCHEMA):
        validate_rows(table.drop_columns(["image"]).to_pylist())
    return table


def _compatible(actual: pa.DataType, wanted: pa.DataType) -> bool:
    """Can a reader of ``wanted`` use a column of type ``actual``? Integer widths, large/small strings,
    binaries and lists are interchangeable; nullability is ignored; a struct may carry extra fields."""
    for group in (pa.types.is_integer, pa.types.is_floating):
        if group(wanted):
            return group(actual)
    for a, b in ((pa.string(), pa.large_string()), (pa.binary(), pa.large_binary())):
        if wanted in (a, b):
            return actual in (a, b)
    if pa.types.is_list(wanted) or pa.types.is_large_list(wanted):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _compatible(actual.value_type,
                                                                                           wanted.value_type)
    if pa.types.is_struct(wanted):
        if not pa.types.is_struct(actual):
            return False
        have = {actual.field(i).name: actual.field(i).type for i in range(actual.num_fields)}
        return all(f.name in have and _compatible(have[f.name], f.type) for f in wanted)
    return actual.equals(wanted)


def read_footer(path: str, flag: str = "--shards") -> pq.FileMetaData:
    """The Parquet footer of ``path``, or :class:`ShardError` naming the file when it is truncated, not
    Parquet at all, or unreadable (``flag``: the option that named it)."""
    try:
        fs, p = fsspec.core.url_to_fs(path)
        with fs.open(p, "rb") as f:
            return pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowException) as e:  # ArrowInvalid: truncated or not Parquet at all
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ShardError(f"{path}: not a readable Parquet file ({detail}); remove it from {flag}") from e


def check_shard(path: str, schema: pa.Schema = GROUNDING_SCHEMA, columns: Iterable[str] | None = None,
                flag: str = "--shards") -> pq.FileMetaData:
    """Check one file before any row is read; return its Parquet footer (row group sizes, ...).

    Raises :class:`ShardError`, one line naming the file, when it does not open as Parquet
    (truncated, not Parquet, unreadable), is a rejects shard where a grounding shard is wanted,
    lacks a column of ``columns`` (default: the schema's non-nullable ones; an older version may lack a
    nullable one) or holds a column of the wrong type, or carries a ``schema_version`` this code does not
    read (:data:`READABLE_VERSIONS`). Only the footer is read.
    """
    meta = read_footer(path, flag)
    arrow = meta.schema.to_arrow_schema()
    names = set(arrow.names)
    wanted = list(columns) if columns is not None else [f.name for f in schema if not f.nullable]
    if schema is not REJECTS_SCHEMA and {"stage", "reason"} <= names and not {"qa", "image"} & names:
        raise ShardError(f"{path}: is a rejects shard (rows the pipeline dropped, with stage/reason), not a grounding "
                         f"shard; give OUT/shards/*.parquet to {flag}, not OUT/rejects/")
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ShardError(f"{path}: not a grounding shard: missing column(s) {', '.join(missing)} "
                         f"(it has {', '.join(arrow.names) or 'no columns'}); check {flag}")
    for c in [c for c in schema.names if c in names]:
        if not _compatible(arrow.field(c).type, schema.field(c).type):
            raise ShardError(f"{path}: column {c!r} is {arrow.field(c).type}, the shard schema has "
                             f"{schema.field(c).type}; check {flag}")
    version = (meta.metadata or {}).get(META_VERSION)
    if version is not None:
        v = version.decode(errors="replace")
        if v not in READABLE_VERSIONS:
            newer = "newer than" if v.isdigit() and int(v) > int(SCHEMA_VERSION) else "not one"
            raise ShardError(f"{path}: schema_version {v!r} is {newer} this code reads ({', '.join(READABLE_VERSIONS)}); "
                             "update the code or give shards of a version it reads")
    return meta


def check_shards(paths: Iterable[str], schema: pa.Schema = GROUNDING_SCHEMA, columns: Iterable[str] | None = None,
                 skip_bad: bool = False, flag: str = "--shards") -> tuple[dict[str, pq.FileMetaData], dict[str, str]]:
    """:func:`check_shard` over many files: ``({path: footer} of the good ones, {path: what is wrong})``.

    Without ``skip_bad`` the first bad file raises; with it, bad files are left out and reported,
    and only a list with no good file at all raises.
    """
    good, bad = {}, {}
    columns = list(columns) if columns is not None else None
    for path in paths:
        try:
            good[path] = check_shard(path, schema, columns, flag)
        except ShardError as e:
            if not skip_bad:
                raise
            bad[path] = str(e)
    if not good and bad:
        raise ShardError(f"none of the {len(bad)} file(s) given is a readable shard; the first: {next(iter(bad.values()))}")
    return good, bad


# --- writing and reading ---------------------------------------------------------------------

def provenance_metadata(provenance: Mapping[str, Any] | None) -> dict[bytes, bytes]:
    return {META_VERSION: SCHEMA_VERSION.encode(),
            META_PROVENANCE: json.dumps(dict(provenance or {}), sort_keys=True, default=str).encode()}


def write_shard(table_or_rows: pa.Table | Iterable, path: str, provenance: Mapping[str, Any] | None = None,
                schema: pa.Schema = GROUNDING_SCHEMA, row_group_size: int = ROW_GROUP_SIZE) -> str:
    """Validate and write one shard atomically: a temporary name in the same folder, then rename.

    A reader (or a rerun deciding what is finished) never sees a partial file under ``path``.
    ``path`` may be any fsspec URL; returns it.
    """
    table = table_or_rows if isinstance(table_or_rows, pa.Table) else to_table(table_or_rows, schema)
    table = check_table(table, schema)
    table = table.replace_schema_metadata(provenance_metadata(provenance))
    fs, p = fsspec.core.url_to_fs(path)
    parent = os.path.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(p)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size, compression="zstd")
        fs.mv(tmp, p)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return path


def read_metadata(path: str) -> dict[str, Any]:
    """``{"schema_version": ..., "provenance": {...}}`` of a shard."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    if META_VERSION not in meta:
        raise SchemaError(f"{path} is not a grounding shard (no {META_VERSION.decode()} metadata)")
    return {"schema_version": meta[META_VERSION].decode(),
            "provenance": json.loads(meta.get(META_PROVENANCE, b"{}"))}


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns)


def shard_columns_sql(names: Iterable[str]) -> str:
    """A SELECT list of every :data:`GROUNDING_SCHEMA` column over a shard whose columns are ``names``:
    a nullable column an older schema version lacks is selected as a typed NULL."""
    have = set(names)
    out = []
    for f in GROUNDING_SCHEMA:
        if f.name in have:
            out.append(f.name)
        elif f.nullable:
            out.append(f"NULL::{_DUCKDB_TYPES[f.type]} AS {f.name}")
        else:
            raise SchemaError(f"shard lacks required column {f.name!r}")
    return ", ".join(out)


_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT"}


def read_shard(path: str) -> Iterator[GroundingRow]:
    """Typed rows of one grounding shard (any of :data:`READABLE_VERSIONS`), a row group at a time."""
    version = read_metadata(path)["schema_version"]
    if version not in READABLE_VERSIONS:
        raise SchemaError(f"{path} has schema_version {version}, this code reads {', '.join(READABLE_VERSIONS)}")
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        for i in range(pf.num_row_groups):
            for d in pf.read_row_group(i).to_pylist():
                yield GroundingRow.from_dict(d)
