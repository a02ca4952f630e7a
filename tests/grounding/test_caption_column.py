"""The cleaned caption in the shard (spans index it) beside the raw one, and schema-1 shards (no
``caption_raw``) still read by every reader: read_shard, the DuckDB views, export and convert."""
from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from grounding.captions import clean_caption
from grounding.export import ExportConfig, export_converted, export_shards
from grounding.phrases import PhraseExtractor
from grounding.query import connect
from grounding.records import REASON_CAPTION_NOT_CLEAN, build_record
from grounding.schema import (META_VERSION, SCHEMA_VERSION, SchemaError, provenance_metadata, read_metadata, read_shard,
                              to_table, write_shard)

HOSTILE = "&lt;b&gt;Red&lt;/b&gt; square &amp; blue circle \x00\x07"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _row(key: str, caption: str, caption_raw: str | None, phrases) -> dict:
    boxed = [{"text": p.text, "start": p.start, "end": p.end, "head": p.head, "kind": p.kind, "prompt": p.prompt,
              "boxes_norm": [[100 * i, 100 * i, 100 * i + 99, 100 * i + 99]], "det_scores": [0.9]}
             for i, p in enumerate(phrases)]
    row, reason = build_record(key=key, caption=caption, caption_raw=caption_raw, image=_jpeg(), width=64, height=48,
                               phrases=boxed, min_boxes=1)
    assert reason is None
    return row


@pytest.fixture(scope="module")
def extractor():
    return PhraseExtractor()


def _markup(texts) -> list[str]:
    return [t for t in texts if any(m in t for m in ("&lt;", "&amp", "<br>", "\x00", "\x07", "\t"))]


def test_hostile_caption_is_stored_clean_with_spans_into_it(extractor, tmp_path):
    assert clean_caption(HOSTILE) == "Red square & blue circle"  # the caption
    raw = "&lt;b&gt;A red&lt;/b&gt; square &amp;amp; a blue circle\t\x00\x07<br>on a  wooden table"
    clean = clean_caption(raw)
    assert clean == "A red square & a blue circle on a wooden table"
    found = extractor.one(clean)
    chunks = {p.text for p in found.phrases if p.kind == "chunk"}
    assert {"a blue circle", "a wooden table"} <= chunks and not _markup(p.text for p in found.phrases)
    assert _markup(p.text for p in extractor.one(raw).phrases)  # control: parsed raw, phrases carry markup
    write_shard([_row("k", clean, raw, found.phrases)], str(tmp_path / "s.parquet"))
    [row] = read_shard(str(tmp_path / "s.parquet"))
    assert (row.caption, row.caption_raw) == (clean, raw)
    assert row.phrases and all(row.caption[p.start:p.end] == p.text for p in row.phrases)
    assert not _markup([row.grounded_caption] + [q.answer for q in row.qa])
    assert read_metadata(str(tmp_path / "s.parquet"))["schema_version"] == SCHEMA_VERSION == "2"


def test_uncleaned_caption_is_refused_with_its_reason(extractor):
    found = extractor.one(HOSTILE)  # phrases parsed from the raw text: what the issue saw happen
    boxed = [{"text": p.text, "start": p.start, "end": p.end, "head": p.head, "kind": p.kind, "prompt": p.prompt,
              "boxes_norm": [[0, 0, 9, 9]], "det_scores": [0.5]} for p in found.phrases]
    row, reason = build_record(key="k", caption=HOSTILE, image=_jpeg(), width=64, height=48, phrases=boxed, min_boxes=0)
    assert (row, reason) == (None, REASON_CAPTION_NOT_CLEAN)


def _write_v1(row: dict, path) -> None:
    """A shard as schema version 1 wrote it: no caption_raw column, version "1" in the metadata."""
    table = to_table([row]).drop_columns(["caption_raw"])
    meta = provenance_metadata({"detector": "old"})
    meta[META_VERSION] = b"1"
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_schema_1_shards_still_read(extractor, tmp_path):
    clean = "A red ball next to a blue box"
    phrases = extractor.one(clean).phrases
    (tmp_path / "shards").mkdir()
    _write_v1(_row("old", clean, None, phrases), tmp_path / "shards" / "00000.parquet")
    write_shard([_row("new", clean, clean + "  ", phrases)], str(tmp_path / "shards" / "00001.parquet"))
    assert "caption_raw" not in pq.read_schema(tmp_path / "shards" / "00000.parquet").names

    [old] = read_shard(str(tmp_path / "shards" / "00000.parquet"))
    assert (old.key, old.caption, old.caption_raw) == ("old", clean, None)

    con = connect(tmp_path)  # the view unions both layouts by column name
    assert con.sql("SELECT key, caption_raw FROM shards ORDER BY key").fetchall() == [("new", clean + "  "), ("old", None)]
    result = export_shards(con, tmp_path / "subset", ExportConfig(where="caption_raw IS NULL"))
    assert result.images == 1
    [again] = read_shard(result.files[0])  # rewritten in the current layout
    assert (again.key, again.caption_raw, read_metadata(result.files[0])["schema_version"]) == ("old", None, "2")
    export_converted(con, tmp_path / "grit", "grit")
    lines = [json.loads(l) for l in (tmp_path / "grit" / "grit.jsonl").read_text().splitlines()]
    assert [(d["key"], d["caption_raw"]) for d in lines] == [("old", None), ("new", clean + "  ")]

    meta = provenance_metadata({})
    meta[META_VERSION] = b"99"
    pq.write_table(to_table([_row("x", clean, None, phrases)]).replace_schema_metadata(meta), tmp_path / "v99.parquet")
    with pytest.raises(SchemaError, match="schema_version 99"):
        next(read_shard(str(tmp_path / "v99.parquet")))
