"""DuckDB views, named reports, subset export, contact sheets and the CLI, on shards whose contents
the tests know exactly (hand-built rows and the synthetic world's true boxes)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grounding.export import ExportConfig, balance_sql, export_shards, llava_balance
from grounding.query import REPORTS, ReadStats, connect, measure_read, records, report, resolve_source, scan_columns
from grounding.query_cli import main
from grounding.records import build_record
from grounding.render import (ContactSheetConfig, contrast_ratio, draw_boxes, phrase_colour, render_contact_sheet,
                              render_rows, sample_keys, text_colour)
from grounding.schema import GROUNDING_SCHEMA, REJECTS_SCHEMA, read_metadata, read_shard, write_shard
from grounding.world import truth_rows, write_truth_shards

REPO = Path(__file__).resolve().parents[2]


def _jpeg(w=40, h=30, colour=(200, 200, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def make_row(key, phrases, source_shard="s0", image=None, w=40, h=30):
    """A row from ``[(text, head, prompt, boxes, scores), ...]``; the caption joins the texts."""
    caption, spans = "", []
    for text, head, prompt, boxes, scores in phrases:
        if caption:
            caption += " and "
        spans.append({"text": text, "start": len(caption), "end": len(caption) + len(text), "head": head,
                      "kind": "chunk", "prompt": prompt, "boxes_norm": boxes, "det_scores": scores})
        caption += text
    row, reason = build_record(key=key, caption=caption, image=image if image is not None else _jpeg(w, h),
                               width=w, height=h, phrases=spans, min_boxes=1, source_shard=source_shard, source_row=0)
    assert reason is None
    return row


# The known shard set. Distinct boxes: k0 2, k1 3, k2 1 (two phrases share one box), k3 2.
KNOWN = [
    ("k0", "s0", [("a red ball", "ball", "red ball", [[0, 0, 499, 499]], [0.95]),
                  ("a blue box", "box", "blue box", [[500, 500, 999, 999]], [0.55])]),
    ("k1", "s0", [("a red ball", "ball", "red ball", [[0, 0, 99, 99], [100, 100, 199, 199]], [0.15, 0.25]),
                  ("a green cone", "cone", "green cone", [[0, 0, 999, 999]], [1.0])]),
    ("k2", "s1", [("a ball", "ball", "ball", [[200, 200, 699, 699]], [0.45]),
                  ("the box", "box", "box", [[200, 200, 699, 699]], [0.35])]),
    ("k3", "s1", [("a yellow kite", "kite", "yellow kite", [[0, 0, 299, 299]], [0.75]),
                  ("a red ball", "ball", "red ball", [[300, 300, 599, 599]], [0.85])]),
]
REJECTS = [("r0", "s0", "download", "http_404", "404 Not Found"), ("r1", "s0", "download", "http_404", "404 again"),
           ("r2", "s0", "filter", "too_few_boxes", "1 box"), ("r3", "s2", "decode", "corrupt_image", "bad jpeg")]


@pytest.fixture(scope="module")
def known_out(tmp_path_factory):
    """A pipeline output folder: shards/00000 (k0, k1), shards/00001 (k2, k3), rejects/00000."""
    out = tmp_path_factory.mktemp("known")
    rows = [make_row(k, ph, src) for k, src, ph in KNOWN]
    prov = {"detector": "hand", "config_hash": "abc"}
    write_shard(rows[:2], str(out / "shards" / "00000.parquet"), provenance={**prov, "source_shard": "s0"})
    write_shard(rows[2:], str(out / "shards" / "00001.parquet"), provenance={**prov, "source_shard": "s1"})
    rejects = [{"key": k, "url": f"http://x/{k}", "caption": "c", "source_shard": s, "source_row": i,
                "stage": st, "reason": r, "error": e} for i, (k, s, st, r, e) in enumerate(REJECTS)]
    write_shard(rejects, str(out / "rejects" / "00000.parquet"), schema=REJECTS_SCHEMA)
    return out


@pytest.fixture
def con(known_out):
    c = connect(known_out)
    yield c
    c.close()


# --- connection ------------------------------------------------------------------------------

def test_connect_sources_agree(known_out):
    """Output folder, shards folder, one file and a glob all open the same rows."""
    def keys(c):
        return [r[0] for r in c.sql("SELECT key FROM shards ORDER BY key").fetchall()]
    assert keys(connect(known_out)) == ["k0", "k1", "k2", "k3"]
    assert keys(connect(known_out / "shards")) == ["k0", "k1", "k2", "k3"]
    assert keys(connect(known_out / "shards" / "00001.parquet")) == ["k2", "k3"]
    assert keys(connect(shards=str(known_out / "shards" / "0000[0].parquet"))) == ["k0", "k1"]
    c = connect(shards=str(known_out / "shards" / "*.parquet"), rejects=str(known_out / "rejects" / "*.parquet"))
    assert c.sql("SELECT count(*) FROM rejects").fetchall()[0][0] == 4
    assert [r[0] for r in c.sql("SELECT file FROM shard_files").fetchall()] == [
        str(known_out / "shards" / "00000.parquet"), str(known_out / "shards" / "00001.parquet")]


def test_missing_rejects_is_an_empty_view_and_bad_paths_fail(known_out, tmp_path, monkeypatch):
    c = connect(known_out / "shards")
    assert c.sql("SELECT count(*) FROM rejects").fetchall()[0][0] == 0
    assert c.sql("SELECT * FROM rejects").columns == REJECTS_SCHEMA.names
    assert records(report(c, "summary"))[0]["rejects"] == 0
    (tmp_path / "run" / "shards").mkdir(parents=True)  # a run that kept nothing
    empty = connect(tmp_path / "run")
    assert empty.sql("SELECT * FROM shards").columns == GROUNDING_SCHEMA.names
    assert records(report(empty, "summary"))[0]["images"] == 0
    with pytest.raises(FileNotFoundError):
        connect(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no grounding shards match"):
        connect(shards=str(tmp_path / "run" / "shards" / "*.parquet"))
    with pytest.raises(FileNotFoundError, match="no grounding shards match"):
        connect(tmp_path / "run" / "shards")  # a shards folder without shards: most likely the wrong folder
    with pytest.raises(FileNotFoundError, match="no rejects shards match"):
        connect(known_out, rejects=str(tmp_path / "nope" / "*.parquet"))
    monkeypatch.delenv("GROUNDING_SHARDS", raising=False)
    with pytest.raises(ValueError, match="GROUNDING_SHARDS"):
        resolve_source()
    monkeypatch.setenv("GROUNDING_SHARDS", str(known_out))
    assert resolve_source().rejects == str(known_out / "rejects" / "*.parquet")


# --- named reports ---------------------------------------------------------------------------

def test_summary(con):
    s = records(report(con, "summary"))[0]
    assert {k: s[k] for k in ("images", "phrases", "boxes", "phrase_boxes", "qa_pairs", "rejects")} == {
        "images": 4, "phrases": 8, "boxes": 8, "phrase_boxes": 9, "qa_pairs": 12, "rejects": 4}
    assert s["share_2plus_boxes"] == pytest.approx(0.75)
    assert s["boxes_per_image"] == pytest.approx(2.0)
    assert s["mean_score"] == pytest.approx(5.3 / 9, abs=1e-6)
    assert s["median_score"] == pytest.approx(0.55, abs=1e-6)
    assert s["min_score"] == pytest.approx(0.15, abs=1e-6)
    assert s["kept_share"] == pytest.approx(0.5)


def test_histograms(con):
    assert [(r["num_boxes"], r["images"], r["share"]) for r in records(report(con, "boxes_per_image"))] == [
        (1, 1, 0.25), (2, 2, 0.5), (3, 1, 0.25)]
    area = records(report(con, "box_area"))
    assert [r["boxes"] for r in area] == [4, 0, 3, 0, 0, 0, 0, 0, 0, 1]
    assert (area[2]["area_from"], area[2]["area_to"]) == (pytest.approx(0.2), pytest.approx(0.3))
    assert [r["boxes"] for r in records(report(con, "box_area", bins=2))] == [7, 1]
    assert [r["boxes"] for r in records(report(con, "scores"))] == [0, 1, 1, 1, 1, 1, 0, 1, 1, 2]
    assert sum(r["share"] for r in records(report(con, "scores"))) == pytest.approx(1.0)


def test_top_heads_and_phrases(con):
    heads = [(r["head"], r["images"], r["phrases"], r["boxes"]) for r in records(report(con, "top_heads"))]
    assert heads == [("ball", 4, 4, 5), ("box", 2, 2, 2), ("cone", 1, 1, 1), ("kite", 1, 1, 1)]
    assert [r["head"] for r in records(report(con, "top_heads", limit=2))] == ["ball", "box"]
    phrases = [(r["phrase"], r["images"]) for r in records(report(con, "top_phrases", limit=3))]
    assert phrases == [("red ball", 3), ("ball", 1), ("blue box", 1)]
    with pytest.raises(ValueError, match="takes"):
        report(con, "summary", limit=3)


def test_reports_count_an_expressions_inherited_boxes_once(tmp_path):
    """A referring expression carries a copy of its head chunk's boxes and scores: summary, scores, top_heads and
    top_phrases count the chunk's boxes once and report the expression apart."""
    caption = "a man riding a horse"
    man, horse = [[0, 0, 499, 999]], [[300, 300, 999, 999]]
    phrases = [{"text": "a man", "start": 0, "end": 5, "head": "man", "kind": "chunk", "prompt": "man",
                "boxes_norm": man, "det_scores": [0.9]},
               {"text": "a horse", "start": 13, "end": 20, "head": "horse", "kind": "chunk", "prompt": "horse",
                "boxes_norm": horse, "det_scores": [0.3]},
               {"text": caption, "start": 0, "end": 20, "head": "man", "kind": "expression", "prompt": "man riding a horse",
                "boxes_norm": man, "det_scores": [0.9]}]  # inherited from "a man"
    row, reason = build_record(key="e0", caption=caption, image=_jpeg(), width=40, height=30, phrases=phrases,
                               min_boxes=1, source_shard="s0", source_row=0)
    assert reason is None
    write_shard([row], str(tmp_path / "shards" / "00000.parquet"), provenance={"detector": "hand"})
    c = connect(tmp_path)
    s = records(report(c, "summary"))[0]
    assert (s["phrases"], s["phrase_boxes"]) == (2, 2)  # the expression's copy of the man's box is not a third
    assert {k: s[k] for k in ("phrases", "expressions", "boxes", "phrase_boxes")} == {
        "phrases": 2, "expressions": 1, "boxes": 2, "phrase_boxes": 2}
    assert s["mean_score"] == pytest.approx(0.6, abs=1e-6)
    assert sum(r["boxes"] for r in records(report(c, "scores"))) == 2
    heads = {r["head"]: (r["phrases"], r["boxes"], r["expressions"]) for r in records(report(c, "top_heads"))}
    assert heads == {"man": (1, 1, 1), "horse": (1, 1, 0)}
    assert {r["phrase"]: r["boxes"] for r in records(report(c, "top_phrases"))} == {"man": 1, "horse": 1}


def test_rejects_and_per_source_shard(con):
    assert [(r["stage"], r["reason"], r["rows"], r["share"], r["example_error"])
            for r in records(report(con, "rejects_by_reason"))] == [
        ("download", "http_404", 2, 0.5, "404 Not Found"), ("decode", "corrupt_image", 1, 0.25, "bad jpeg"),
        ("filter", "too_few_boxes", 1, 0.25, "1 box")]
    assert [(r["source_shard"], r["images"], r["boxes"], r["rejects"], r["kept_share"])
            for r in records(report(con, "per_source_shard"))] == [
        ("s0", 2, 5, 3, 0.4), ("s1", 2, 3, 0, 1.0), ("s2", 0, 0, 1, 0.0)]


def test_rejects_written_under_an_old_reason_name_count_with_the_new_name(known_out, tmp_path):
    """A rejects shard from before the rename (``decode_error``, now ``corrupt_image``) reads under today's name,
    so a folder holding both counts them as one reason."""
    old = [{"key": "r9", "url": "http://x/r9", "caption": "c", "source_shard": "s3", "source_row": 0,
            "stage": "decode", "reason": "decode_error", "error": "OSError: truncated"}]
    out = tmp_path / "mixed"
    (out / "rejects").mkdir(parents=True)
    for f in (known_out / "rejects").glob("*.parquet"):
        (out / "rejects" / f.name).write_bytes(f.read_bytes())
    write_shard(old, str(out / "rejects" / "00001.parquet"), schema=REJECTS_SCHEMA)
    c = connect(out)
    rows = {(r["stage"], r["reason"]): r["rows"] for r in records(report(c, "rejects_by_reason"))}
    assert rows == {("download", "http_404"): 2, ("decode", "corrupt_image"): 2, ("filter", "too_few_boxes"): 1}
    assert c.sql("SELECT count(*) FROM rejects WHERE reason = 'decode_error'").fetchall() == [(0,)]


def test_reports_on_world_truth_match_the_world(world, tmp_path):
    write_truth_shards(world, tmp_path / "shards", rows_per_shard=5)
    c = connect(tmp_path)
    s = records(report(c, "summary"))[0]
    assert s["images"] == len(world)
    assert s["boxes"] == sum(len(im.objects) for im in world)
    assert s["share_2plus_boxes"] == pytest.approx(sum(len(im.objects) >= 2 for im in world) / len(world))
    heads = Counter(o.shape for im in world for o in {o.shape: o for o in im.objects}.values())
    assert {r["head"]: r["images"] for r in records(report(c, "top_heads"))} == dict(heads)


def test_copied_report_sql_gives_the_same_rows(con):
    """What `report NAME --show-sql` prints runs as-is (comments included) with the default parameters."""
    for r in REPORTS.values():
        params = {k: v for k, v in r.params.items() if f"${k}" in r.sql} or None
        assert con.sql(r.text(), params=params).fetchall() == report(con, r.name).fetchall(), r.name


# --- metadata queries leave the image bytes alone --------------------------------------------

def test_metadata_reports_read_no_image_bytes(tmp_path):
    """Shards with 256 KiB of incompressible image bytes per row: the reports read a sliver of them."""
    rows = [make_row(f"big{i}", KNOWN[i % 4][2], image=os.urandom(256 << 10)) for i in range(16)]
    write_shard(rows[:8], str(tmp_path / "shards" / "00000.parquet"), row_group_size=4)
    write_shard(rows[8:], str(tmp_path / "shards" / "00001.parquet"), row_group_size=4)
    image_bytes = 16 * (256 << 10)
    c = connect(tmp_path)
    full = measure_read(c, "SELECT sum(octet_length(image)) FROM shards")
    assert isinstance(full, ReadStats) and full.bytes_read >= image_bytes and full.files == 2
    for r in REPORTS.values():
        params = {k: v for k, v in r.params.items() if f"${k}" in r.sql} or None
        assert "image" not in scan_columns(c, r.sql, params), r.name
        stats = measure_read(c, r.sql, params)
        assert stats.bytes_read < 0.05 * image_bytes, (r.name, stats)
    assert "image" in scan_columns(c, "SELECT key, image FROM shards")


# --- subset export ---------------------------------------------------------------------------

def test_filter_export_keeps_schema_metadata_order_and_bytes(con, known_out, tmp_path):
    res = export_shards(con, tmp_path / "sub", ExportConfig(where="num_boxes >= 2", rows_per_shard=2))
    assert res.images == 3 and [Path(f).name for f in res.files] == ["00000.parquet", "00001.parquet"]
    for f in res.files:
        assert pq.read_schema(f).remove_metadata().equals(GROUNDING_SCHEMA)
        prov = read_metadata(f)["provenance"]
        assert prov["detector"] == "hand" and prov["config_hash"] == "abc" and "source_shard" not in prov
        assert prov["export"]["where"] == "num_boxes >= 2" and prov["export"]["source_files"] == 2
    got = [r for f in res.files for r in read_shard(f)]
    assert [r.key for r in got] == ["k0", "k1", "k3"]
    source = {r.key: r for f in sorted((known_out / "shards").glob("*.parquet")) for r in read_shard(str(f))}
    assert all(r == source[r.key] for r in got)  # every field, image bytes included
    meta = json.loads((tmp_path / "sub" / "export.json").read_text())
    assert meta["images"] == 3 and meta["files"] == ["00000.parquet", "00001.parquet"]
    with pytest.raises(FileExistsError):
        export_shards(con, tmp_path / "sub", ExportConfig(where="num_boxes >= 2"))
    with pytest.raises(duckdb.Error, match="no_such_column"):
        export_shards(con, tmp_path / "bad", ExportConfig(where="no_such_column > 1"))
    assert not (tmp_path / "bad").exists()
    res = export_shards(con, tmp_path / "sub", ExportConfig(where="key = 'k2'"), overwrite=True)
    assert [r[0] for r in connect(tmp_path / "sub").sql("SELECT key FROM shards").fetchall()] == ["k2"]


def test_export_onto_its_own_source_is_refused_and_deletes_nothing(known_out):
    before = sorted(p.name for p in (known_out / "shards").glob("*.parquet"))
    con = connect(known_out)
    with pytest.raises(ValueError, match="holds the shards being exported"):
        export_shards(con, known_out, ExportConfig(where="num_boxes >= 2"), overwrite=True)
    assert sorted(p.name for p in (known_out / "shards").glob("*.parquet")) == before
    assert connect(known_out).sql("SELECT count(*) FROM shards").fetchall() == [(4,)]


def _md5_order(keys, seed):
    return sorted(keys, key=lambda k: (hashlib.md5(f"{k}:{seed}".encode()).hexdigest(), k))


@pytest.fixture(scope="module")
def one_head_out(tmp_path_factory):
    """Rows with one phrase and one box each: cat x7, dog x3, emu x2, fox x5."""
    out = tmp_path_factory.mktemp("heads")
    counts = {"cat": 7, "dog": 3, "emu": 2, "fox": 5}
    rows = [make_row(f"{h}{i}", [(f"a {h}", h, h, [[10 * i, 0, 10 * i + 50, 50]], [0.5])], source_shard=h)
            for h, n in counts.items() for i in range(n)]
    write_shard(rows[:9], str(out / "shards" / "00000.parquet"), provenance={"detector": "hand"})
    write_shard(rows[9:], str(out / "shards" / "00001.parquet"), provenance={"detector": "hand"})
    return out, counts


def test_balanced_export_caps_and_drops(one_head_out, tmp_path):
    out, counts = one_head_out
    c = connect(out)
    cfg = ExportConfig(cap=4, min_images=3, seed=0, rows_per_shard=5)
    res = export_shards(c, tmp_path / "bal", cfg)
    assert res.concepts == {"cat": 4, "dog": 3, "fox": 4}  # emu (2 < 3 images) dropped, cat and fox capped
    assert res.images == 11 and len(res.files) == 3
    sub = connect(tmp_path / "bal")
    assert {r["head"]: r["images"] for r in records(report(sub, "top_heads"))} == {"cat": 4, "dog": 3, "fox": 4}
    kept = {r[0] for r in sub.sql("SELECT key FROM shards").fetchall()}
    for h in ("cat", "fox"):  # the documented draw: the first `cap` images in md5(key:seed) order
        assert {k for k in kept if k.startswith(h)} == set(_md5_order([f"{h}{i}" for i in range(counts[h])], 0)[:4])
    assert read_metadata(res.files[0])["provenance"]["export"]["cap"] == 4


def test_balanced_export_lists_only_the_concepts_it_kept(tmp_path):
    """An image drawn for a kept concept may also name a concept the min_images rule dropped: the export's
    concepts (and export.json's count) list only the kept one."""
    rows = [make_row(f"cat{i}", [("a cat", "cat", "cat", [[0, 0, 500, 500]], [0.5])]) for i in range(3)]
    rows.append(make_row("both", [("a cat", "cat", "cat", [[0, 0, 500, 500]], [0.5]),
                                  ("an emu", "emu", "emu", [[500, 500, 999, 999]], [0.5])]))
    write_shard(rows, str(tmp_path / "src" / "shards" / "00000.parquet"), provenance={"detector": "hand"})
    res = export_shards(connect(tmp_path / "src"), tmp_path / "bal", ExportConfig(cap=10, min_images=3))
    assert res.images == 4 and res.concepts == {"cat": 4}  # emu: 1 image < 3, dropped
    written = json.loads((tmp_path / "bal" / "export.json").read_text())
    assert written["concepts"] == {"cat": 4} and res.summary()["concepts"] == 1


def test_balanced_export_is_deterministic_under_a_seed(one_head_out, tmp_path):
    out, _ = one_head_out
    c = connect(out)

    def keys(seed, name):
        export_shards(c, tmp_path / name, ExportConfig(cap=2, min_images=1, seed=seed))
        return sorted(r[0] for r in connect(tmp_path / name).sql("SELECT key FROM shards").fetchall())
    a, b = keys(0, "a"), keys(0, "b")
    assert a == b and len(a) == 8
    assert len({tuple(keys(s, f"s{s}")) for s in range(1, 5)} | {tuple(a)}) > 1


def test_balanced_union_matches_reference_on_world(world, tmp_path):
    """Several heads per image: the subset is the union of each head's first `cap` draws."""
    write_truth_shards(world, tmp_path / "w" / "shards", rows_per_shard=5)
    c = connect(tmp_path / "w")
    images_of: dict[str, set[str]] = {}
    for row in truth_rows(world):
        for p in row["phrases"]:
            images_of.setdefault(p["head"], set()).add(row["key"])
    for cap, min_images, seed in [(2, 1, 0), (3, 8, 5)]:
        want = set()
        for head, keys in images_of.items():
            if len(keys) >= min_images:
                want |= set(_md5_order(keys, seed)[:cap])
        sel = c.sql(balance_sql(ExportConfig(cap=cap, min_images=min_images, seed=seed)),
                    params={"cap": cap, "min_images": min_images, "seed": str(seed)}).fetchall()
        assert {k for (k,) in sel} == want


def test_export_config_validates():
    for bad in [dict(cap=0), dict(min_images=0), dict(by="noun"), dict(rows_per_shard=0), dict(where=" ")]:
        with pytest.raises(ValueError):
            ExportConfig(**bad)
    assert (llava_balance().cap, llava_balance().min_images) == (100, 3)


# --- pictures --------------------------------------------------------------------------------

def test_labels_are_legible_for_every_hue():
    for i in range(500):
        c = phrase_colour(f"phrase {i}")
        assert contrast_ratio(c, text_colour(c)) >= 4.5, c
    assert phrase_colour("Red Ball ") == phrase_colour("red ball") != phrase_colour("blue box")


def test_boxes_are_drawn_where_they_belong():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    labels = draw_boxes(img, [{"text": "a red ball", "prompt": "red ball", "boxes_norm": [[100, 200, 499, 799]],
                               "det_scores": [0.875]}], font_size=12, line_width=2)
    c = phrase_colour("red ball")
    (lab,) = labels
    assert lab.text == "red ball 0.88" and lab.colour == c
    assert lab.box == pytest.approx((20.1, 20.05, 99.9, 79.95))
    assert img.getpixel((21, 50)) == c          # left edge of the box
    assert img.getpixel((60, 50)) == (255, 255, 255)  # inside stays untouched
    assert lab.tag[3] <= 21 and lab.tag[3] - lab.tag[1] >= 12  # tag sits above the box, at least a font high
    assert img.getpixel((lab.tag[0] + 1, lab.tag[1] + 1)) == c
    long = [{"text": "x", "prompt": "orange ball on a white background", "boxes_norm": [[0, 0, 9, 9], [500, 500, 600, 600]],
             "det_scores": [0.2, 0.9]}]
    (lab,) = draw_boxes(Image.new("RGB", (200, 100)), long, min_score=0.5, max_label_chars=12)
    assert lab.text == "orange ball… 0.90" and lab.box[0] == pytest.approx(100.1)


def test_labels_do_not_cover_each_other():
    img = Image.new("RGB", (200, 200), (255, 255, 255))
    phrases = [{"text": "a", "prompt": "red ball", "boxes_norm": [[100, 300, 400, 600]], "det_scores": [0.9]},
               {"text": "b", "prompt": "blue box", "boxes_norm": [[100, 320, 400, 900]], "det_scores": [0.8]},
               {"text": "c", "prompt": "green kite", "boxes_norm": [[110, 330, 300, 500]], "det_scores": [0.7]}]
    tags = [lab.tag for lab in draw_boxes(img, phrases, font_size=12)]
    for i, a in enumerate(tags):
        assert 0 <= a[0] and 0 <= a[1] and a[2] <= 200 and a[3] <= 200
        for b in tags[i + 1:]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (a, b)


def test_contact_sheet_colours_stable_and_bad_images_are_data(con):
    rows = records(con.sql("SELECT key, caption, image, phrases FROM shards ORDER BY key"))
    rows[2]["image"] = b"not an image"
    cfg = ContactSheetConfig(count=4, columns=2, cell=128, font_size=12)
    sheet = render_rows(rows, cfg)
    assert sheet.keys == ["k0", "k1", "k2", "k3"]
    assert set(sheet.errors) == {"k2"} and "UnidentifiedImageError" in sheet.errors["k2"]
    red = [lab for k in ("k0", "k1", "k3") for lab in sheet.labels[k] if lab.text.startswith("red ball")]
    assert len(red) == 4 and {lab.colour for lab in red} == {phrase_colour("red ball")}
    assert sheet.image.size == (2 * (128 + 8) + 8, 2 * (128 + 16 * 3 + 8) + 8)


def test_sample_keys_seeded_or_by_query(con):
    assert sample_keys(con, count=4, seed=3) == _md5_order(["k0", "k1", "k2", "k3"], 3)
    assert sample_keys(con, where="num_boxes >= 2", count=2, seed=1) == _md5_order(["k0", "k1", "k3"], 1)[:2]
    assert sample_keys(con, sql="SELECT key FROM shards ORDER BY num_boxes DESC, key", count=2) == ["k1", "k0"]
    with pytest.raises(ValueError, match="key"):
        sample_keys(con, sql="SELECT caption FROM shards")
    sheet = render_contact_sheet(con, where="key IN ('k1', 'k3')", config=ContactSheetConfig(count=5, cell=96, font_size=10))
    assert sorted(sheet.keys) == ["k1", "k3"] and not sheet.errors


# --- command line ----------------------------------------------------------------------------

def test_cli_sql_round_trips(known_out, tmp_path, capsys):
    q = "SELECT key, num_boxes, phrases FROM shards ORDER BY key"
    assert main([q, "--data", str(known_out), "-o", str(tmp_path / "r.json")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "r.json").read_text().splitlines()]
    assert [(d["key"], d["num_boxes"]) for d in lines] == [("k0", 2), ("k1", 3), ("k2", 1), ("k3", 2)]
    assert lines[1]["phrases"][0]["boxes_norm"] == [[0, 0, 99, 99], [100, 100, 199, 199]]
    main(["sql", q, "--data", str(known_out), "-o", str(tmp_path / "r.parquet")])
    t = pq.read_table(tmp_path / "r.parquet")
    assert t.column("key").to_pylist() == ["k0", "k1", "k2", "k3"]
    assert t.column("phrases").to_pylist()[2][1]["prompt"] == "box"
    main(["sql", "SELECT key, num_boxes FROM shards ORDER BY key", "--data", str(known_out), "-f", "csv"])
    assert list(csv.reader(io.StringIO(capsys.readouterr().out))) == [
        ["key", "num_boxes"], ["k0", "2"], ["k1", "3"], ["k2", "1"], ["k3", "2"]]
    main(["SELECT count(*) AS n FROM rejects", "--data", str(known_out)])
    out = capsys.readouterr().out
    assert re.search(r"│\s+n\s+│", out) and re.search(r"│\s+4\s+│", out)


def test_cli_reports_export_render(known_out, one_head_out, tmp_path, capsys, monkeypatch):
    main(["reports"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(REPORTS)
    main(["report", "top_heads", "--limit", "2", "-f", "csv", "--data", str(known_out)])
    assert [r[:2] for r in csv.reader(io.StringIO(capsys.readouterr().out))] == [["head", "images"], ["ball", "4"], ["box", "2"]]
    main(["--data", str(known_out), "-f", "csv", "report", "boxes_per_image"])  # options before the command
    assert capsys.readouterr().out.splitlines()[:2] == ["num_boxes,images,share", "1,1,0.25"]
    main(["report", "box_area", "--show-sql"])
    assert capsys.readouterr().out == REPORTS["box_area"].text()
    monkeypatch.setenv("GROUNDING_SHARDS", str(one_head_out[0]))  # --data from the environment
    main(["export", str(tmp_path / "bal"), "--cap", "4", "--min-images", "3", "--seed", "0"])
    assert json.loads(capsys.readouterr().out)["images"] == 11
    assert connect(tmp_path / "bal").sql("SELECT count(*) FROM shards").fetchall()[0][0] == 11
    main(["render", str(tmp_path / "s.png"), "--data", str(known_out), "-n", "3", "--columns", "3", "--cell", "100",
          "--where", "num_boxes >= 2"])
    assert "3 images" in capsys.readouterr().out
    assert Image.open(tmp_path / "s.png").size == (3 * 108 + 8, 100 + 18 * 3 + 8 + 8)


def test_cli_value_options_of_any_command_may_come_before_the_command(known_out, tmp_path, capsys):
    """`--where`, `-n` and the other value options of a command parse before it, as `--data` does."""
    assert main(["--data", str(known_out), "--where", "num_boxes >= 3", "export", str(tmp_path / "w")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1  # only k1 has 3 boxes
    assert main(["--data", str(known_out), "-n", "2", "--where", "num_boxes >= 2", "render", str(tmp_path / "s.png")]) == 0
    assert "2 images" in capsys.readouterr().out
    assert main(["--data", str(known_out), "--limit", "1", "report", "top_heads", "-f", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("ball,4")


def test_cli_errors_are_messages_not_tracebacks(known_out, tmp_path, capsys):
    assert main(["SELECT no_such_column FROM shards", "--data", str(known_out)]) == 2
    assert "no_such_column" in capsys.readouterr().err
    assert main(["report", "summary", "--data", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "sub" / "shards").mkdir(parents=True)
    (tmp_path / "sub" / "shards" / "00000.parquet").write_bytes(b"")
    assert main(["export", str(tmp_path / "sub"), "--data", str(known_out)]) == 2
    assert "FileExistsError" in capsys.readouterr().err


def test_module_entry_point(known_out):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "grounding.query", "SELECT count(*) AS n FROM shards",
                          "--data", str(known_out), "-f", "csv"], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["n", "4"]
