"""Duplicate images and evaluation overlap: content and perceptual hashes, decided partition by partition.

Two hashes per image:

- ``sha256``: hex SHA-256 of the stored image bytes, what img2dataset writes in its ``sha256``
  column (``hashlib.sha256(img_bytes).hexdigest()``); equal only for identical bytes.
- ``phash``: the DCT perceptual hash of ``imagehash`` (``imagehash.phash``, ``hash_size``² bits,
  stored as its hex string); a resized or re-encoded copy lands within a few bits. On the synthetic
  world (40 images, 320x240; copies resized 0.5x-1.5x and re-encoded as JPEG quality 40-90) copies
  differed by at most 2 of 64 bits and distinct images by at least 16; at 256 bits, 8 and 94
  (``benchmarks/bench_dedup.py`` -> ``benchmarks/results/dedup.json``).

**The rule** (deterministic, first occurrence in input order wins). Every row has an ``order``
(:func:`order_of`: work shard index, row in shard). A row is

- ``duplicate_image`` when an earlier row has the same ``sha256``;
- else ``near_duplicate`` when an earlier row's ``phash`` is within ``threshold`` bits (Hamming).

"Earlier row", not "earlier kept row": the decision for a row depends only on the rows before it
that resemble it, never on what was decided for them, so partitions decide independently and in
any order. On a chain A~B~C where A and C are far apart, C is dropped too (it resembles B); on a
cluster of copies of one picture (the usual case) this equals the greedy sequential rule.

**How the work partitions** (no driver-side set of hashes). Three steps, each a plain function
over rows, so a distributed job maps, shuffles by ``part``, and reduces:

1. map (:func:`partition_records`): each row emits one record for its exact partition,
   ``sha256[:exact_prefix]`` (256 partitions by default), and ``threshold + 1`` records for its
   near partitions, one per band: the ``phash`` bits cut into ``threshold + 1`` contiguous bands,
   the partition being (band index, band bits). By the pigeonhole principle two hashes within
   ``threshold`` bits agree exactly on at least one band, so every near pair meets in some
   partition (multi-index hashing, Norouzi et al. 2012).
2. per partition (:func:`decide_partition`): sort by ``order``; exact partitions compare equal
   ``sha256``; band partitions compare all pairs by Hamming distance (vectorised). Emits one
   decision per dropped row: ``order``, ``reason``, the earlier row it matched.
3. reduce (:func:`drop_masks`): per work shard, one entry per row, the reason or ``None``, taking
   ``duplicate_image`` over ``near_duplicate`` and the earliest match.

**Cost**, for ``n`` rows and ``b = threshold + 1`` bands of ``w_i`` bits: the shuffle carries
``1 + b`` small records per row (order, key and the hash, never pixels); exact
partitions cost O(group) each; a band partition of ``k`` rows costs k²/2 Hamming comparisons, so
with evenly spread bits a row meets ``sum_i n / 2**(w_i + 1)`` others. Default (64 bits,
threshold 4: 5 bands of 12-13 bits): 7.3 comparisons per row at 20,000 rows (measured 7.31 on
random hashes, ``benchmarks/results/dedup.json``), ~3,700 at 10⁷: fine for one run of this
project. At LAION scale use :func:`laion` (256 bits, threshold 8: 9 bands of 28-29 bits): ~26 per
row at 2·10⁹ rows. Real phash bits are less even than random ones, so expect more;
:func:`partition_stats` reports the largest partitions of a sample.

**Evaluation overlap** (:class:`EvalIndex`): evaluation sets are small (COCO val2014 40k images,
Flickr30k 32k), so their hashes are broadcast to every worker and indexed by the same bands; each
row is looked up in ``b`` dicts and compared with the few hashes it meets. A row within
``threshold`` bits of any evaluation image gets reason ``eval_overlap`` naming the set.
``python -m grounding.dedup hash-folder DIR OUT.parquet --name coco_val2014`` precomputes a set's
hash file (:func:`hash_folder`).

**Where it runs**: the pipeline job checks evaluation overlap in each shard task
(``pipeline.stages.EvalOverlapStage``) and runs the three steps as Ray tasks after the last shard
(``pipeline/image_dedup.py``); :func:`filter_shards` (``python -m grounding.dedup filter OUT DEST
--eval coco_val2014=coco.parquet``) applies the same, in one process, to shards built without it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from grounding.image import ImageTooLarge, decode_image

REASON_DUPLICATE = "duplicate_image"
REASON_NEAR_DUPLICATE = "near_duplicate"
REASON_EVAL_OVERLAP = "eval_overlap"
_RANK = {REASON_DUPLICATE: 0, REASON_NEAR_DUPLICATE: 1}
ROW_BITS = 32  # order = shard << ROW_BITS | row

EVAL_HASH_SCHEMA = pa.schema([
    pa.field("eval_set", pa.string(), nullable=False),
    pa.field("file", pa.string(), nullable=False),      # path relative to the hashed folder
    pa.field("sha256", pa.string()),
    pa.field("phash", pa.string()),                     # imagehash hex; null when the file did not decode
    pa.field("error", pa.string()),
])


@dataclass(frozen=True)
class DedupConfig:
    """Perceptual-hash size and the near-duplicate / eval-overlap threshold (bits, Hamming)."""

    hash_size: int = 8        # phash is hash_size x hash_size bits
    threshold: int = 4        # at most this many differing bits = near duplicate / eval overlap
    exact_prefix: int = 2     # hex chars of sha256 picking the exact partition (16**2 = 256)

    def __post_init__(self):
        if self.hash_size < 2:
            raise ValueError(f"hash_size must be >= 2, got {self.hash_size}")
        if not 0 <= self.threshold < self.bits:
            raise ValueError(f"threshold must be in 0..{self.bits - 1}, got {self.threshold}")
        if not 1 <= self.exact_prefix <= 64:
            raise ValueError(f"exact_prefix must be 1..64 hex chars, got {self.exact_prefix}")

    @property
    def bits(self) -> int:
        return self.hash_size * self.hash_size

    @property
    def bands(self) -> list[tuple[int, int]]:
        """``threshold + 1`` contiguous ``(offset, width)`` bit ranges covering the hash."""
        b = self.threshold + 1
        cuts = [round(i * self.bits / b) for i in range(b + 1)]
        return [(cuts[i], cuts[i + 1] - cuts[i]) for i in range(b)]


def laion(threshold: int = 8) -> DedupConfig:
    """LAION-scale preset: 256-bit phash, 9 bands of 28-29 bits (see the module doc's cost)."""
    return DedupConfig(hash_size=16, threshold=threshold)


# --- hashes ----------------------------------------------------------------------------------

def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of the bytes, as img2dataset computes its ``sha256`` column."""
    return hashlib.sha256(data).hexdigest()


def phash_hex(image: bytes | Image.Image, hash_size: int = 8) -> str:
    """``imagehash.phash`` of the image as hex; raises ``ValueError`` for bytes that do not decode
    (or declare more than :data:`grounding.image.MAX_PIXELS` pixels)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            image = decode_image(bytes(image))
        except ImageTooLarge:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"image does not decode: {e}") from e
    return str(imagehash.phash(image, hash_size=hash_size))


def hamming(a: str, b: str) -> int:
    """Differing bits of two hex hashes of one size."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def order_of(shard: int, row: int) -> int:
    """A row's place in the input: work shard index, then row within the shard."""
    if not (0 <= row < 1 << ROW_BITS and shard >= 0):
        raise ValueError(f"shard {shard} / row {row} out of range")
    return shard << ROW_BITS | row


def shard_row(order: int) -> tuple[int, int]:
    return order >> ROW_BITS, order & ((1 << ROW_BITS) - 1)


HASH_SCHEMA = pa.schema([  # one record per row: what the dedup steps read (a pipeline's sidecar file)
    pa.field("order", pa.int64(), nullable=False),
    pa.field("key", pa.string()),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("phash", pa.string()),                     # null: the image did not decode (exact matching only)
])


def hash_record(shard: int, row: int, key: str, image: bytes, config: DedupConfig = DedupConfig(),
                sha256: str | None = None) -> dict:
    """The record the dedup steps read: ``order``, ``key``, ``sha256`` (img2dataset's when given),
    ``phash`` (``None`` when the bytes do not decode: such a row takes part in exact matching only)."""
    try:
        phash = phash_hex(image, config.hash_size)
    except ValueError:
        phash = None
    return {"order": order_of(shard, row), "key": key, "sha256": sha256 or sha256_hex(image), "phash": phash}


def hash_table(shard: int, keys: Sequence[str], images: Sequence[bytes], config: DedupConfig = DedupConfig(),
               sha256: Sequence[str | None] | None = None) -> pa.Table:
    """:data:`HASH_SCHEMA` records of one work shard's rows, in row order (a map step over a batch)."""
    sha = sha256 if sha256 is not None else [None] * len(keys)
    return pa.Table.from_pylist([hash_record(shard, i, k, im, config, h) for i, (k, im, h) in enumerate(zip(keys, images, sha))],
                                schema=HASH_SCHEMA)


def _words(hexes: Sequence[str], bits: int) -> np.ndarray:
    """Hex hashes -> (N, ceil(bits / 64)) uint64 words, for vectorised Hamming distances."""
    n = -(-bits // 64)
    out = np.zeros((len(hexes), n), dtype=np.uint64)
    for i, h in enumerate(hexes):
        v = int(h, 16)
        for j in range(n):
            out[i, j] = (v >> (64 * j)) & 0xFFFFFFFFFFFFFFFF
    return out


def _distances(one: np.ndarray, many: np.ndarray) -> np.ndarray:
    """Hamming distances of one (W,) word row to many (N, W) rows -> (N,)."""
    return np.bitwise_count(many ^ one).sum(axis=1)


# --- step 1: partition -----------------------------------------------------------------------

def band_values(phash: str, config: DedupConfig) -> list[int]:
    v = int(phash, 16)
    return [(v >> off) & ((1 << w) - 1) for off, w in config.bands]


def partition_records(records: Iterable[Mapping[str, Any]], config: DedupConfig = DedupConfig()) -> Iterator[dict]:
    """Map step: per record, ``{"part", "kind", "order", "key", "hash"}`` once for its exact partition
    (``part`` = ``"x"`` + the sha256 prefix) and once per phash band (``part`` = ``"b<band>:<bits hex>"``).
    Records without a phash take part in exact matching only."""
    for r in records:
        yield {"part": "x" + r["sha256"][:config.exact_prefix], "kind": "exact", "order": r["order"],
               "key": r["key"], "hash": r["sha256"]}
        if r.get("phash"):
            for i, v in enumerate(band_values(r["phash"], config)):
                yield {"part": f"b{i}:{v:x}", "kind": "near", "order": r["order"],
                       "key": r["key"], "hash": r["phash"]}


# --- step 2: decide each partition -----------------------------------------------------------

def decide_partition(records: Sequence[Mapping[str, Any]], config: DedupConfig = DedupConfig()) -> list[dict]:
    """Per-partition step: ``{"order", "reason", "dup_order", "dup_key"}`` for every record that has an
    earlier record in this partition with the same sha256 (exact) or within the threshold (near).
    All records of one partition share a ``kind``."""
    rows = sorted(records, key=lambda r: r["order"])
    if not rows:
        return []
    out = []
    if rows[0]["kind"] == "exact":
        first: dict[str, Mapping] = {}
        for r in rows:
            f = first.setdefault(r["hash"], r)
            if f is not r:
                out.append({"order": r["order"], "reason": REASON_DUPLICATE, "dup_order": f["order"], "dup_key": f["key"]})
        return out
    words = _words([r["hash"] for r in rows], config.bits)
    for j in range(1, len(rows)):
        near = np.flatnonzero(_distances(words[j], words[:j]) <= config.threshold)
        if near.size:
            i = int(near[0])  # the earliest earlier match
            out.append({"order": rows[j]["order"], "reason": REASON_NEAR_DUPLICATE,
                        "dup_order": rows[i]["order"], "dup_key": rows[i]["key"]})
    return out


def group_partitions(parts: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """In-process shuffle (what a distributed job's groupby on ``part`` does)."""
    groups: dict[str, list] = {}
    for p in parts:
        groups.setdefault(p["part"], []).append(p)
    return groups


# --- step 3: reduce to per-shard masks ---------------------------------------------------------

def best_decisions(decisions: Iterable[Mapping[str, Any]]) -> dict[int, dict]:
    """One decision per dropped ``order``: ``duplicate_image`` over ``near_duplicate``, then the earliest match."""
    best: dict[int, dict] = {}
    for d in decisions:
        cur = best.get(d["order"])
        if cur is None or (_RANK[d["reason"]], d["dup_order"]) < (_RANK[cur["reason"]], cur["dup_order"]):
            best[d["order"]] = dict(d)
    return best


def drop_masks(decisions: Iterable[Mapping[str, Any]], shard_sizes: Mapping[int, int]) -> dict[int, list[dict | None]]:
    """Reduce step: per work shard, a list with one entry per row: ``None`` (keep) or
    ``{"reason", "error"}`` (drop; ``error`` names the earlier row it repeats)."""
    masks: dict[int, list[dict | None]] = {s: [None] * n for s, n in shard_sizes.items()}
    for order, d in best_decisions(decisions).items():
        shard, row = shard_row(order)
        ds, dr = shard_row(d["dup_order"])
        masks[shard][row] = {"reason": d["reason"],
                             "error": f"repeats key {d['dup_key']!r} (shard {ds}, row {dr})"}
    return masks


def find_duplicates(records: Iterable[Mapping[str, Any]], config: DedupConfig = DedupConfig()) -> dict[int, dict]:
    """The three steps in one process: ``{order: decision}`` for every dropped record."""
    groups = group_partitions(partition_records(records, config))
    return best_decisions(d for g in groups.values() for d in decide_partition(g, config))


def partition_stats(records: Iterable[Mapping[str, Any]], config: DedupConfig = DedupConfig()) -> dict[str, Any]:
    """Sizes of the partitions a sample makes, and the pair comparisons they cost (k² per band partition)."""
    groups = group_partitions(partition_records(records, config))
    near = [len(g) for g in groups.values() if g[0]["kind"] == "near"]
    exact = [len(g) for g in groups.values() if g[0]["kind"] == "exact"]
    return {"exact_partitions": len(exact), "near_partitions": len(near), "largest_near": max(near, default=0),
            "largest_exact": max(exact, default=0), "near_comparisons": sum(k * (k - 1) // 2 for k in near)}


# --- evaluation overlap ------------------------------------------------------------------------

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _hash_files(folder: Path, name: str, config: DedupConfig) -> list[dict]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        data = path.read_bytes()
        row = {"eval_set": name, "file": str(path.relative_to(folder)), "sha256": sha256_hex(data),
               "phash": None, "error": None}
        try:
            row["phash"] = phash_hex(data, config.hash_size)
        except ValueError as e:
            row["error"] = str(e)
        rows.append(row)
    return rows


def hash_folder(folder: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                config: DedupConfig = DedupConfig()) -> dict[str, Any]:
    """Hash every image file under ``folder`` (recursively, by suffix) into the Parquet ``out``
    (:data:`EVAL_HASH_SCHEMA`; ``hash_size`` and the set name in its metadata). A file that does not
    decode is kept with its ``error`` and no phash. Returns counts."""
    folder = Path(folder)
    name = name or folder.name
    rows = _hash_files(folder, name, config)
    table = pa.Table.from_pylist(rows, schema=EVAL_HASH_SCHEMA).replace_schema_metadata(
        {b"grounding.dedup": json.dumps({"eval_set": name, "hash_size": config.hash_size}).encode()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return {"eval_set": name, "files": len(rows), "hashed": sum(r["phash"] is not None for r in rows),
            "errors": sum(r["error"] is not None for r in rows), "out": str(out)}


class EvalIndex:
    """Evaluation-set hashes indexed by phash band, for :meth:`match` per training image.

    Built from hash Parquet files (:func:`hash_folder`, or any Parquet with ``phash`` and optionally
    ``eval_set`` / ``file`` columns) or image folders (hashed on the fly). Small enough to broadcast
    (a hex hash, a set name and a file name per evaluation image).
    """

    def __init__(self, sources: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
                 config: DedupConfig = DedupConfig()):
        self.config = config
        self.sets: list[str] = []
        self.files: list[str] = []
        self.hashes: list[str] = []
        items = sources.items() if isinstance(sources, Mapping) else [(None, s) for s in sources]
        for name, src in items:
            self._add(name, Path(src))
        self.words = _words(self.hashes, config.bits)
        self.bands: list[dict[int, list[int]]] = [{} for _ in config.bands]
        for i, h in enumerate(self.hashes):
            for b, v in enumerate(band_values(h, config)):
                self.bands[b].setdefault(v, []).append(i)

    def _add(self, name: str | None, src: Path) -> None:
        if src.is_dir():
            rows = _hash_files(src, name or src.name, self.config)
        else:
            table = pq.read_table(src)
            if "phash" not in table.column_names:
                raise ValueError(f"{src}: an evaluation hash file needs a 'phash' column, has {table.column_names}")
            meta = json.loads((table.schema.metadata or {}).get(b"grounding.dedup", b"{}"))
            if meta.get("hash_size", self.config.hash_size) != self.config.hash_size:
                raise ValueError(f"{src} holds hash_size {meta['hash_size']} hashes; this index uses {self.config.hash_size}")
            rows = table.to_pylist()
        for r in rows:
            if not r.get("phash"):
                continue
            if len(r["phash"]) * 4 != self.config.bits:
                raise ValueError(f"{src}: phash {r['phash']!r} is not {self.config.bits} bits")
            self.sets.append(name or r.get("eval_set") or src.stem)
            self.files.append(str(r.get("file") or ""))
            self.hashes.append(r["phash"])

    def __len__(self) -> int:
        return len(self.hashes)

    def match(self, phash: str) -> dict | None:
        """The closest evaluation image within the threshold (ties: first indexed), or ``None``:
        ``{"eval_set", "file", "distance"}``."""
        cand = sorted({i for b, v in enumerate(band_values(phash, self.config)) for i in self.bands[b].get(v, ())})
        if not cand:
            return None
        dist = _distances(_words([phash], self.config.bits)[0], self.words[cand])
        k = int(np.argmin(dist))
        if dist[k] > self.config.threshold:
            return None
        i = cand[k]
        return {"eval_set": self.sets[i], "file": self.files[i], "distance": int(dist[k])}

    def flag(self, records: Iterable[Mapping[str, Any]]) -> Iterator[dict | None]:
        """Per record (with ``phash``): ``None``, or ``{"reason": "eval_overlap", "eval_set", "error"}``."""
        for r in records:
            m = self.match(r["phash"]) if r.get("phash") else None
            yield None if m is None else {
                "reason": REASON_EVAL_OVERLAP, "eval_set": m["eval_set"],
                "error": f"{m['eval_set']}: {m['file']} within {m['distance']} bits"}


def parse_eval_sets(items: Iterable[str]) -> dict[str, str]:
    """``["coco_val2014=coco.parquet", "flickr30k=flickr/"]`` -> ``{name: path}``; ``ValueError`` names a bad item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep or not name.strip() or not path.strip() or ":" in name:
            raise ValueError(f"an evaluation set is NAME=PATH (a hash Parquet or an image folder), got {item!r}")
        if name in out:
            raise ValueError(f"evaluation set {name!r} named twice")
        out[name.strip()] = path.strip()
    return out


def eval_set_of(error: str) -> str:
    """The evaluation set an ``eval_overlap`` reject's ``error`` names (:meth:`EvalIndex.flag` writes ``"<set>: ..."``)."""
    return error.split(":", 1)[0]


def count_eval_overlaps(flags: Iterable[Mapping[str, Any] | None]) -> dict[str, int]:
    """Overlaps per evaluation set, for the run report."""
    return dict(sorted(Counter(f["eval_set"] for f in flags if f is not None).items()))


# --- a finished run's shards, in one process ----------------------------------------------------

def filter_shards(data: str | os.PathLike, dest: str | os.PathLike, config: DedupConfig = DedupConfig(),
                  eval_sources: Mapping[str, str | os.PathLike] | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    """Drop duplicates, near-duplicates and evaluation overlaps from finished grounding shards.

    Reads ``data`` (anything :func:`grounding.query.connect` opens) a shard file at a time in file
    order, hashes every image, applies the rule above (duplicates first, then ``eval_overlap`` on
    the rows left), and writes ``dest/shards/<same name>`` (kept rows) and ``dest/rejects/<same
    name>`` (stage ``dedup``, the reason, the earlier row or evaluation image in ``error``), plus
    ``dest/dedup.json`` with counts per reason and per evaluation set (the input run's own rejects
    stay where they are). One process, hashes of every
    row in memory (a few hundred bytes each): for a run's output, not for LAION (the streaming job).
    """
    from grounding.export import file_batches
    from grounding.query import connect
    from grounding.schema import GROUNDING_SCHEMA, REJECTS_SCHEMA, read_metadata, write_shard

    dest = Path(dest)
    old = [f for sub in ("shards", "rejects") for f in (dest / sub).glob("*.parquet")]
    if old and not overwrite:
        raise FileExistsError(f"{dest} already holds shards; pass overwrite=True (--overwrite)")
    index = EvalIndex(eval_sources, config) if eval_sources else None
    con = connect(data)
    try:
        files = [r[0] for r in con.execute("SELECT file FROM shard_files").fetchall()]
        if any(Path(f).resolve().parent == (dest / "shards").resolve() for f in files):
            raise ValueError(f"{dest} holds the shards being filtered: choose another destination")
        for f in old:
            f.unlink()
        records = []
        for s, f in enumerate(files):
            sql = "SELECT key, image FROM read_parquet(?, file_row_number = true) ORDER BY file_row_number"
            rows = con.execute(sql, [f]).fetchall()
            records += hash_table(s, [k for k, _ in rows], [im for _, im in rows], config).to_pylist()
        undecodable = sum(r["phash"] is None for r in records)
        sizes = Counter(shard_row(r["order"])[0] for r in records)
        masks = drop_masks(find_duplicates(records, config).values(), {s: sizes.get(s, 0) for s in range(len(files))})
        if index is not None:
            survivors = [r for r in records if masks[shard_row(r["order"])[0]][shard_row(r["order"])[1]] is None]
            for r, flag in zip(survivors, index.flag(survivors)):
                if flag is not None:
                    s, row = shard_row(r["order"])
                    masks[s][row] = flag
        counts: Counter = Counter()
        for s, f in enumerate(files):
            batches = list(file_batches(con, [f], "true", 1024))
            table = pa.Table.from_batches(batches) if batches else GROUNDING_SCHEMA.empty_table()
            mask = masks[s]
            keep = pa.array([m is None for m in mask], type=pa.bool_())
            prov = {**read_metadata(f)["provenance"], "dedup": {**asdict(config), "eval_sets": sorted(eval_sources or {})}}
            name = Path(f).name
            write_shard(table.filter(keep), str(dest / "shards" / name), provenance=prov)
            meta = table.select(["key", "url", "caption", "source_shard", "source_row"]).to_pylist()
            rejects = [{**meta[i], "stage": "dedup", "reason": m["reason"], "error": m["error"]}
                       for i, m in enumerate(mask) if m is not None]
            counts.update(m["reason"] for m in mask if m is not None)
            write_shard(rejects, str(dest / "rejects" / name), provenance=prov, schema=REJECTS_SCHEMA)
    finally:
        con.close()
    report = {"rows": len(records), "kept": len(records) - sum(counts.values()), "undecodable": undecodable,
              "reasons": dict(sorted(counts.items())),
              "eval_overlap_by_set": count_eval_overlaps(m for ms in masks.values() for m in ms
                                                         if m is not None and m["reason"] == REASON_EVAL_OVERLAP),
              "config": asdict(config), "eval_sets": {k: str(v) for k, v in (eval_sources or {}).items()},
              "source": str(data), "files": len(files)}
    (dest / "dedup.json").write_text(json.dumps(report, indent=1))
    return report


# --- command line ------------------------------------------------------------------------------

def _eval_arg(text: str) -> tuple[str, str]:
    try:
        return next(iter(parse_eval_sets([text]).items()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grounding.dedup", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hash-folder", help="precompute the hash Parquet of an evaluation image folder")
    p.add_argument("folder")
    p.add_argument("out", help="output .parquet")
    p.add_argument("--name", help="evaluation set name (default: the folder's name)")
    p.add_argument("--hash-size", type=int, default=DedupConfig.hash_size, help="phash side (bits = side²; default 8)")
    p = sub.add_parser("filter", help="drop duplicates and evaluation overlaps from a finished run's shards")
    p.add_argument("data", help="pipeline output folder, shards folder or glob")
    p.add_argument("dest", help="output folder: DEST/shards, DEST/rejects, DEST/dedup.json")
    p.add_argument("--eval", type=_eval_arg, action="append", default=[], metavar="NAME=PATH",
                   help="an evaluation set: its hash Parquet (hash-folder) or an image folder; repeatable")
    p.add_argument("--hash-size", type=int, default=DedupConfig.hash_size, help="phash side (bits = side²; default 8)")
    p.add_argument("--threshold", type=int, default=DedupConfig.threshold, help="max differing phash bits (default 4)")
    p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "hash-folder":
            summary = hash_folder(args.folder, args.out, args.name, DedupConfig(hash_size=args.hash_size))
        else:
            summary = filter_shards(args.data, args.dest, DedupConfig(hash_size=args.hash_size, threshold=args.threshold),
                                    dict(args.eval), overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"grounding.dedup: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
