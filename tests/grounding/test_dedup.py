"""Duplicate, near-duplicate and evaluation-overlap decisions on real images made with PIL, and the
partitioned decision checked against a brute-force reference of the same rule."""
from __future__ import annotations

import io
import json
import pickle
import random

import pyarrow.parquet as pq
import pytest
from PIL import Image

from grounding.dedup import (DedupConfig, EvalIndex, count_eval_overlaps, decide_partition, drop_masks, find_duplicates,
                             group_partitions, hamming, hash_folder, hash_record, laion, main, order_of,
                             partition_records, sha256_hex)
from grounding.world import make_world


def _copy(image: Image.Image, scale: float, quality: int) -> bytes:
    """A resized, re-encoded copy: the usual web duplicate."""
    im = image.resize((int(image.width * scale), int(image.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures():
    return [im.render() for im in make_world(10, seed=11, size=(320, 240))]


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_exact_and_near_copies_are_caught_distinct_images_kept(pictures):
    a, b, c, d, e = (_jpeg(p) for p in pictures[:5])
    shards = [  # (key, bytes) per work shard, in input order
        [("a", a), ("b", b), ("a-again", a), ("a-small", _copy(pictures[0], 0.5, 60))],
        [("c", c), ("b-big", _copy(pictures[1], 1.5, 40)), ("d", d), ("b-copy", b), ("e", e)],
    ]
    records = [hash_record(s, r, key, data) for s, rows in enumerate(shards) for r, (key, data) in enumerate(rows)]
    masks = drop_masks(find_duplicates(records).values(), {s: len(rows) for s, rows in enumerate(shards)})
    got = {shards[s][r][0]: (m["reason"], m["error"]) if m else None for s, ms in masks.items() for r, m in enumerate(ms)}
    assert {k: v and v[0] for k, v in got.items()} == {
        "a": None, "b": None, "a-again": "duplicate_image", "a-small": "near_duplicate",
        "c": None, "b-big": "near_duplicate", "d": None, "b-copy": "duplicate_image", "e": None}
    assert got["a-small"][1] == "repeats key 'a' (shard 0, row 0)"
    assert got["b-copy"][1] == "repeats key 'b' (shard 0, row 1)"
    assert records[0]["sha256"] == sha256_hex(a)  # the img2dataset definition


def test_first_occurrence_in_input_order_wins(pictures):
    small, orig = _copy(pictures[2], 0.5, 60), _jpeg(pictures[2])
    recs = [hash_record(0, 0, "small", small), hash_record(0, 1, "orig", orig)]
    for order in (recs, recs[::-1]):  # the order rows arrive in does not matter, their `order` does
        dropped = find_duplicates(order)
        assert [(d["order"], d["dup_key"]) for d in dropped.values()] == [(order_of(0, 1), "small")]


def _brute_force(records, config):
    """The rule, row by row: exact if an earlier row has the same sha256, else near if within the threshold."""
    out = {}
    rows = sorted(records, key=lambda r: r["order"])
    for j, r in enumerate(rows):
        same = [p for p in rows[:j] if p["sha256"] == r["sha256"]]
        near = [p for p in rows[:j] if hamming(p["phash"], r["phash"]) <= config.threshold]
        if same:
            out[r["order"]] = ("duplicate_image", same[0]["key"])
        elif near:
            out[r["order"]] = ("near_duplicate", near[0]["key"])
    return out


@pytest.mark.parametrize("config", [DedupConfig(), DedupConfig(threshold=0), DedupConfig(threshold=7), laion()])
def test_partitioned_decision_equals_brute_force(config):
    rng = random.Random(config.threshold)
    records = []
    for i in range(300):
        if records and rng.random() < 0.5:  # a variant of an earlier hash, up to threshold + 2 bits away
            base = rng.choice(records)
            v = int(base["phash"], 16)
            for bit in rng.sample(range(config.bits), rng.randint(0, config.threshold + 2)):
                v ^= 1 << bit
            sha = base["sha256"] if rng.random() < 0.2 else f"{rng.getrandbits(256):064x}"
        else:
            v, sha = rng.getrandbits(config.bits), f"{rng.getrandbits(256):064x}"
        records.append({"order": order_of(rng.randint(0, 3), i), "key": f"k{i}", "sha256": sha,
                        "phash": f"{v:0{config.bits // 4}x}"})
    want = _brute_force(records, config)
    assert sum(r == "near_duplicate" for r, _ in want.values()) > 20  # the test exercises near pairs
    # distributed: two map workers, partitions decided one by one in a shuffled order, decisions merged
    parts = list(partition_records(records[:150], config)) + list(partition_records(records[150:], config))
    groups = list(group_partitions(parts).values())
    rng.shuffle(groups)
    decided = [d for g in groups for d in decide_partition(g, config)]
    masks = drop_masks(decided, {s: 300 for s in range(4)})
    got = {order_of(s, r): m for s, ms in masks.items() for r, m in enumerate(ms) if m}
    assert {o: m["reason"] for o, m in got.items()} == {o: r for o, (r, _) in want.items()}
    assert {o: (d["reason"], d["dup_key"]) for o, d in find_duplicates(records, config).items()} == want


def test_eval_overlap_by_set_from_hash_files(pictures, tmp_path, capsys):
    for name, pics in (("coco_val", pictures[:3]), ("flickr", pictures[3:5])):
        folder = tmp_path / name / "images"
        folder.mkdir(parents=True)
        for i, p in enumerate(pics):
            p.save(folder / f"{name}_{i}.png")
        (folder / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["hash-folder", str(tmp_path / "coco_val" / "images"), str(tmp_path / "coco.parquet"), "--name", "coco_val"]) == 0
    assert json.loads(capsys.readouterr().out) == {"eval_set": "coco_val", "files": 4, "hashed": 3, "errors": 1,
                                                   "out": str(tmp_path / "coco.parquet")}
    table = pq.read_table(tmp_path / "coco.parquet").to_pylist()
    assert [r["file"] for r in table if r["error"]] == ["broken.jpg"]
    hash_folder(tmp_path / "flickr" / "images", tmp_path / "flickr.parquet", name="flickr")

    index = EvalIndex([tmp_path / "coco.parquet", tmp_path / "flickr.parquet"])
    assert len(index) == 5
    train = [("coco-copy", _copy(pictures[1], 0.6, 50)), ("new-1", _jpeg(pictures[6])),
             ("flickr-copy", _copy(pictures[4], 1.3, 70)), ("new-2", _jpeg(pictures[7])),
             ("coco-exact", _jpeg(pictures[0])), ("new-3", _jpeg(pictures[8]))]
    flags = list(index.flag(hash_record(0, i, k, data) for i, (k, data) in enumerate(train)))
    assert [(f["reason"], f["eval_set"]) if f else None for f in flags] == [
        ("eval_overlap", "coco_val"), None, ("eval_overlap", "flickr"), None, ("eval_overlap", "coco_val"), None]
    assert flags[0]["error"].startswith("coco_val: coco_val_1.png within")
    assert count_eval_overlaps(flags) == {"coco_val": 2, "flickr": 1}
    # a folder works as a source too, named by the mapping
    assert EvalIndex({"refcoco": tmp_path / "coco_val" / "images"}).match(hash_record(0, 0, "x", train[0][1])["phash"])["eval_set"] == "refcoco"
    with pytest.raises(ValueError, match="hash_size 8"):
        EvalIndex([tmp_path / "coco.parquet"], laion())
    shipped = pickle.loads(pickle.dumps(index))  # what a distributed job broadcasts to its workers
    assert [shipped.match(hash_record(0, i, k, d)["phash"]) for i, (k, d) in enumerate(train)] == \
        [index.match(hash_record(0, i, k, d)["phash"]) for i, (k, d) in enumerate(train)]


def test_config_validates_and_bands_cover_the_hash():
    assert DedupConfig().bands == [(0, 13), (13, 13), (13 * 2, 12), (38, 13), (51, 13)]
    assert sum(w for _, w in laion().bands) == 256 and len(laion().bands) == 9
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=64)
    with pytest.raises(ValueError, match="hash_size"):
        DedupConfig(hash_size=1)
    assert main(["hash-folder", "/nonexistent/folder", "/tmp/x.parquet"]) == 2


def test_filter_shards_end_to_end_with_reasons_and_eval_counts(tmp_path, capsys):
    """A run's output folder with copies in it: the filtered shards keep first occurrences, the
    rejects say why, DuckDB's rejects_by_reason report counts them, dedup.json counts per eval set."""
    from grounding.query import connect, records, report
    from grounding.schema import read_shard, write_shard
    from grounding.world import truth_rows

    world = make_world(8, seed=5, size=(200, 150))
    rows = truth_rows(world)
    small = {**rows[1], "key": "w1-small", "image": _copy(world[1].render(), 0.5, 60)}
    exact = {**rows[0], "key": "w0-again"}
    write_shard(rows[:4], str(tmp_path / "run" / "shards" / "00000.parquet"))
    write_shard([exact, rows[4], small, rows[5], rows[6], rows[7]], str(tmp_path / "run" / "shards" / "00001.parquet"))
    write_shard([], str(tmp_path / "run" / "shards" / "00002.parquet"))  # a work shard that kept nothing
    (tmp_path / "coco").mkdir()
    world[5].render().resize((150, 112)).save(tmp_path / "coco" / "val_5.jpg", quality=70)
    hash_folder(tmp_path / "coco", tmp_path / "coco.parquet", name="coco_val2014")
    (tmp_path / "flickr").mkdir()
    world[7].render().save(tmp_path / "flickr" / "f7.png")

    assert main(["filter", str(tmp_path / "run"), str(tmp_path / "out"), "--eval", f"coco_val2014={tmp_path / 'coco.parquet'}",
                 "--eval", f"flickr30k={tmp_path / 'flickr'}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reasons"] == {"duplicate_image": 1, "eval_overlap": 2, "near_duplicate": 1}
    assert summary["eval_overlap_by_set"] == {"coco_val2014": 1, "flickr30k": 1}
    assert (summary["rows"], summary["kept"]) == (10, 6)
    kept = [r.key for f in sorted((tmp_path / "out" / "shards").glob("*.parquet")) for r in read_shard(str(f))]
    assert kept == [rows[i]["key"] for i in (0, 1, 2, 3, 4, 6)]
    assert sorted(f.name for f in (tmp_path / "out" / "shards").iterdir()) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    con = connect(tmp_path / "out")
    by_reason = {(r["stage"], r["reason"]): r["rows"] for r in records(report(con, "rejects_by_reason"))}
    assert by_reason == {("dedup", "duplicate_image"): 1, ("dedup", "near_duplicate"): 1, ("dedup", "eval_overlap"): 2}
    errors = dict(con.sql("SELECT key, error FROM rejects ORDER BY key").fetchall())
    assert errors["w0-again"] == f"repeats key {rows[0]['key']!r} (shard 0, row 0)"
    assert errors[rows[5]["key"]].startswith("coco_val2014: val_5.jpg within")
    with pytest.raises(FileExistsError):
        from grounding.dedup import filter_shards
        filter_shards(tmp_path / "run", tmp_path / "out")
