"""Grounding shards to the formats other tools read (COCO, ODVG, GRIT), and back where they allow.

Each converter writes a folder ``DEST`` with ``images/`` (every row's image bytes, named after its key)
and one annotation file, streaming rows (only COCO keeps its metadata, never pixels,
in memory until the end). Boxes leave the shard's 0..999 grid by :func:`grounding.boxes.denormalize_box`
(the centre of each bin) and come back by :func:`grounding.boxes.normalize_box`, so a round trip
returns the same ``boxes_norm``.

- ``coco``: ``DEST/annotations.json``, COCO detection ("instances") JSON
  (https://cocodataset.org/#format-data): ``images`` (``id``, ``file_name`` relative to
  ``DEST/images``, ``width``, ``height``), ``categories`` (one per distinct phrase prompt, lower
  case, ids from 1 in first-seen order, ``supercategory`` the head noun) and ``annotations``, one
  per box, ``bbox`` pixel ``[x, y, w, h]``, ``area``, ``iscrowd`` 0. Extra fields keep what a
  grounding trainer needs and what makes the way back possible: the image's ``key``,
  ``caption`` and ``caption_raw``; the annotation's detector ``score``, phrase ``kind`` and
  ``tokens_positive`` (``[[start, end]]``, the char span in the caption, as MDETR's / GLIP's
  COCO-style grounding annotations carry it).
  :func:`read_coco` rebuilds shard rows.
- ``odvg``: ``DEST/odvg.jsonl`` plus ``DEST/label_map.json``, the ODVG layout Open-GroundingDino
  trains on (github.com/longzw1997/Open-GroundingDino, ``data_format.md`` and ``datasets/odvg.py``):
  one JSON object per image, ``filename``, ``height``, ``width``, a ``grounding`` field
  (``caption`` and ``regions`` of pixel ``[x1, y1, x2, y2]`` ``bbox`` + ``phrase``, the phrase
  prompt) for its visual-grounding mode, and a ``detection`` field (``instances`` of ``bbox``,
  ``label``, ``category``) with the ``label_map`` (``{"0": name, ...}``, indices from 0) for its
  detection mode. One-way: regions carry no char span, so the caption spans cannot be rebuilt.
- ``grit``: ``DEST/grit.jsonl``, the GRIT-20M layout Kosmos-2 released (huggingface.co/datasets/
  zzliang/GRIT, read the same way by Open-GroundingDino's ``tools/grit2odvg.py``): ``key``,
  ``url``, ``caption``, ``width``, ``height``, ``noun_chunks`` and ``ref_exps``, each a list of
  ``[start, end, x0, y0, x1, y1, score]`` (char span in the caption, box normalised to 0..1, one
  entry per box). Our ``chunk`` phrases go to ``noun_chunks``, ``expression`` phrases to
  ``ref_exps``; ``file_name`` (under ``DEST/images``) and ``caption_raw`` are added. :func:`read_grit` rebuilds rows.

Image files are in the frame of the boxes and of ``width`` / ``height``: the stored frame
(:mod:`grounding.image`). Bytes are copied unchanged, except those of an image carrying an EXIF orientation
tag (a shard made before downloads were stored upright): the tag is dropped and the pixels kept as stored
(:func:`grounding.image.untagged_bytes`), since the row's boxes are in the stored frame, so consumers that apply
EXIF (detectron2, mmcv) and those that ignore it (plain PIL, torchvision's CocoDetection, Open-GroundingDino)
read the image in the frame of its boxes alike.

A row whose image bytes no image library can name a format for is skipped, and listed with its
reason in ``DEST/export.json`` (``skipped``) and in :class:`ConvertResult`.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from PIL import Image, UnidentifiedImageError

from grounding.boxes import NORM, denormalize_box, normalize_box
from grounding.image import untagged_bytes
from grounding.records import build_record
from grounding.schema import phrase_prompt

FORMATS = ("coco", "odvg", "grit")
ANNOTATION_FILES = {"coco": "annotations.json", "odvg": "odvg.jsonl", "grit": "grit.jsonl"}
IMAGES = "images"
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
REASON_UNKNOWN_IMAGE = "unknown_image_format"


@dataclass
class ConvertResult:
    dest: str
    format: str
    images: int = 0
    boxes: int = 0
    categories: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"key", "reason", "error"}

    def summary(self) -> dict[str, Any]:
        return {"dest": self.dest, "format": self.format, "images": self.images, "boxes": self.boxes,
                "categories": self.categories, "skipped": len(self.skipped)}


# --- shared pieces ---------------------------------------------------------------------------

def phrase_name(phrase: Mapping[str, Any]) -> str:
    """The category / region name of a phrase: its detector prompt, else its text, lower case."""
    return " ".join(str(phrase_prompt(phrase)).lower().split())


def _pixel_box(box: list[int], width: int, height: int) -> list[float]:
    return [round(v, 3) for v in denormalize_box(box, width, height)]


class _ImageFolder:
    """Writes each row's image bytes to ``DEST/images/<key><ext>``, one unique file name per row."""

    def __init__(self, dest: Path):
        self.dir = dest / IMAGES
        self.dir.mkdir(parents=True, exist_ok=True)
        self.used: set[str] = set()

    def write(self, key: str, data: bytes) -> str:
        """The file name (relative to ``images/``) of the image, untagged; raises ``ValueError``
        for bytes of no known format (or an EXIF-oriented image that does not decode)."""
        try:
            data = untagged_bytes(data)  # a re-encoded MPO is a JPEG: name it after the bytes written
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"image bytes are not a known image format (or do not decode): {e}") from e
        ext = EXTENSIONS.get(fmt or "", "." + (fmt or "img").lower())
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(key))[:120] or "image"
        name, n = stem + ext, 1
        while name in self.used:
            n += 1
            name = f"{stem}-{n}{ext}"
        self.used.add(name)
        (self.dir / name).write_bytes(data)
        return name


def _prepare(dest: str | os.PathLike, fmt: str, overwrite: bool) -> Path:
    dest = Path(dest)
    ann = dest / ANNOTATION_FILES[fmt]
    if (ann.exists() or (dest / IMAGES).exists()) and not overwrite:
        raise FileExistsError(f"{dest} already holds an export ({fmt}); pass overwrite=True (--overwrite)")
    if (dest / IMAGES).exists():
        shutil.rmtree(dest / IMAGES)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _atomic_text(path: Path, write: Callable[[io.TextIOBase], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _finish(result: ConvertResult, dest: Path, extra: Mapping[str, Any] | None = None) -> ConvertResult:
    (dest / "export.json").write_text(json.dumps(
        {**result.summary(), **(extra or {}), "skipped": result.skipped}, indent=1, default=str))
    return result


def _images(rows: Iterable[Mapping[str, Any]], folder: _ImageFolder,
            result: ConvertResult) -> Iterator[tuple[Mapping[str, Any], str]]:
    """``(row, file_name)`` for every row whose image could be written; the rest go to ``skipped``."""
    for row in rows:
        try:
            name = folder.write(row["key"], row["image"])
        except ValueError as e:
            result.skipped.append({"key": str(row["key"]), "reason": REASON_UNKNOWN_IMAGE, "error": str(e)})
            continue
        result.images += 1
        yield row, name


# --- COCO ------------------------------------------------------------------------------------

def write_coco(rows: Iterable[Mapping[str, Any]], dest: str | os.PathLike, *, overwrite: bool = False,
               meta: Mapping[str, Any] | None = None) -> ConvertResult:
    """COCO detection JSON + images folder (see the module doc). ``rows`` are shard rows (dicts)."""
    dest = _prepare(dest, "coco", overwrite)
    result = ConvertResult(str(dest), "coco")
    images, annotations, categories = [], [], {}
    for row, name in _images(rows, _ImageFolder(dest), result):
        image_id = len(images) + 1
        w, h = row["width"], row["height"]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h, "key": row["key"],
                       "caption": row["caption"], "caption_raw": row.get("caption_raw"), "url": row.get("url")})
        for p in row["phrases"]:
            cname = phrase_name(p)
            if cname not in categories:
                categories[cname] = {"id": len(categories) + 1, "name": cname, "supercategory": p.get("head") or cname}
            for box, score in zip(p["boxes_norm"], p["det_scores"]):
                x0, y0, x1, y1 = _pixel_box(box, w, h)
                bw, bh = round(x1 - x0, 3), round(y1 - y0, 3)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": categories[cname]["id"], "bbox": [x0, y0, bw, bh],
                                    "area": round(bw * bh, 3), "iscrowd": 0, "score": float(score),
                                    "tokens_positive": [[p["start"], p["end"]]], "kind": p["kind"]})
    result.boxes, result.categories = len(annotations), len(categories)
    coco = {"info": {"description": "grounding shards exported by grounding.convert"},
            "images": images, "annotations": annotations, "categories": list(categories.values())}
    _atomic_text(dest / ANNOTATION_FILES["coco"], lambda f: json.dump(coco, f))
    return _finish(result, dest, meta)


def read_coco(path: str | os.PathLike, images: str | os.PathLike | None = None) -> Iterator[dict]:
    """Shard rows from a :func:`write_coco` export (``DEST`` or its ``annotations.json``).

    Annotations of one image sharing a char span (``tokens_positive``) and category become one
    phrase with several boxes, in file order; its ``prompt`` is the category name (lower case), its
    ``head`` the supercategory. Needs the ``caption`` / ``tokens_positive`` extras; plain COCO (no
    captions) raises ``ValueError`` naming the image.
    """
    path = Path(path)
    ann_path = path / ANNOTATION_FILES["coco"] if path.is_dir() else path
    image_dir = Path(images) if images else ann_path.parent / IMAGES
    coco = json.loads(ann_path.read_text(encoding="utf-8"))
    cats = {c["id"]: c for c in coco["categories"]}
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for im in coco["images"]:
        if "caption" not in im:
            raise ValueError(f"image {im['id']} ({im['file_name']}) has no caption: not a grounding COCO file")
        w, h, caption = im["width"], im["height"], im["caption"]
        phrases: dict[tuple, dict] = {}
        for a in by_image.get(im["id"], []):
            if not a.get("tokens_positive"):
                raise ValueError(f"annotation {a['id']} has no tokens_positive span")
            (start, end), cat = a["tokens_positive"][0], cats[a["category_id"]]
            p = phrases.setdefault((start, end, a["category_id"]), {
                "text": caption[start:end], "start": start, "end": end, "head": cat.get("supercategory"),
                "kind": a.get("kind", "chunk"), "prompt": cat["name"], "boxes_norm": [], "det_scores": []})
            x, y, bw, bh = a["bbox"]
            p["boxes_norm"].append(list(normalize_box((x, y, x + bw, y + bh), w, h)))
            p["det_scores"].append(float(a.get("score", 1.0)))
        yield _row(im.get("key") or Path(im["file_name"]).stem, caption, (image_dir / im["file_name"]).read_bytes(),
                   w, h, list(phrases.values()), im.get("url"), im.get("caption_raw"))


def _row(key, caption, image, width, height, phrases, url, caption_raw) -> dict:
    row, reason = build_record(key=str(key), caption=caption, image=image, width=width, height=height,
                               phrases=phrases, url=url, min_boxes=1, caption_raw=caption_raw)
    if row is None:
        raise ValueError(f"{key}: cannot rebuild a shard row ({reason})")
    return row


# --- ODVG ------------------------------------------------------------------------------------

def write_odvg(rows: Iterable[Mapping[str, Any]], dest: str | os.PathLike, *, overwrite: bool = False,
               meta: Mapping[str, Any] | None = None) -> ConvertResult:
    """ODVG JSONL + ``label_map.json`` + images folder (see the module doc)."""
    dest = _prepare(dest, "odvg", overwrite)
    result = ConvertResult(str(dest), "odvg")
    labels: dict[str, int] = {}

    def write(f) -> None:
        for row, name in _images(rows, _ImageFolder(dest), result):
            w, h = row["width"], row["height"]
            regions, instances = [], []
            for p in row["phrases"]:
                cname = phrase_name(p)
                label = labels.setdefault(cname, len(labels))
                for box in p["boxes_norm"]:
                    bbox = _pixel_box(box, w, h)
                    regions.append({"bbox": bbox, "phrase": cname})
                    instances.append({"bbox": bbox, "label": label, "category": cname})
            result.boxes += len(regions)
            f.write(json.dumps({"filename": name, "height": h, "width": w,
                                "detection": {"instances": instances},
                                "grounding": {"caption": row["caption"], "regions": regions}}) + "\n")

    _atomic_text(dest / ANNOTATION_FILES["odvg"], write)
    result.categories = len(labels)
    (dest / "label_map.json").write_text(json.dumps({str(i): name for name, i in labels.items()}, indent=1))
    return _finish(result, dest, meta)


# --- GRIT ------------------------------------------------------------------------------------

def _grit_box(box: list[int]) -> list[float]:
    return [(v + 0.5) / NORM for v in box]  # the bin centre, as denormalize_box does in pixels


def write_grit(rows: Iterable[Mapping[str, Any]], dest: str | os.PathLike, *, overwrite: bool = False,
               meta: Mapping[str, Any] | None = None) -> ConvertResult:
    """Kosmos-2 GRIT JSONL + images folder (see the module doc)."""
    dest = _prepare(dest, "grit", overwrite)
    result = ConvertResult(str(dest), "grit")

    def write(f) -> None:
        for row, name in _images(rows, _ImageFolder(dest), result):
            spans: dict[str, list] = {"chunk": [], "expression": []}
            for p in row["phrases"]:
                for box, score in zip(p["boxes_norm"], p["det_scores"]):
                    spans[p["kind"]].append([p["start"], p["end"], *_grit_box(box), float(score)])
            result.boxes += len(spans["chunk"]) + len(spans["expression"])
            f.write(json.dumps({"key": row["key"], "url": row.get("url"), "caption": row["caption"],
                                "caption_raw": row.get("caption_raw"), "width": row["width"], "height": row["height"], "file_name": name,
                                "noun_chunks": spans["chunk"], "ref_exps": spans["expression"]}) + "\n")

    _atomic_text(dest / ANNOTATION_FILES["grit"], write)
    return _finish(result, dest, meta)


def read_grit(path: str | os.PathLike, images: str | os.PathLike | None = None) -> Iterator[dict]:
    """Shard rows from GRIT JSONL (``DEST`` or the ``.jsonl``); entries sharing a span and list
    become one phrase with several boxes. Images: ``file_name``, else ``<key>.jpg``, under ``images``."""
    path = Path(path)
    jsonl = path / ANNOTATION_FILES["grit"] if path.is_dir() else path
    image_dir = Path(images) if images else jsonl.parent / IMAGES
    with open(jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            d = json.loads(line)
            caption = d["caption"]
            phrases: dict[tuple, dict] = {}
            for kind, entries in (("chunk", d.get("noun_chunks") or []), ("expression", d.get("ref_exps") or [])):
                for e in entries:
                    if len(e) < 6:
                        raise ValueError(f"{jsonl}:{n}: a GRIT span needs [start, end, x0, y0, x1, y1(, score)], got {e}")
                    start, end = int(e[0]), int(e[1])
                    p = phrases.setdefault((kind, start, end), {
                        "text": caption[start:end], "start": start, "end": end, "head": None, "kind": kind,
                        "prompt": None, "boxes_norm": [], "det_scores": []})
                    x0, y0, x1, y1 = e[2:6]
                    p["boxes_norm"].append(list(normalize_box((x0 * NORM, y0 * NORM, x1 * NORM, y1 * NORM), NORM, NORM)))
                    p["det_scores"].append(float(e[6]) if len(e) > 6 else 1.0)
            name = d.get("file_name") or f"{d['key']}.jpg"
            yield _row(d["key"], caption, (image_dir / name).read_bytes(), d["width"], d["height"],
                       list(phrases.values()), d.get("url"), d.get("caption_raw"))


WRITERS: dict[str, Callable[..., ConvertResult]] = {"coco": write_coco, "odvg": write_odvg, "grit": write_grit}
READERS: dict[str, Callable[..., Iterator[dict]]] = {"coco": read_coco, "grit": read_grit}


def convert(rows: Iterable[Mapping[str, Any]], dest: str | os.PathLike, fmt: str, *,
            overwrite: bool = False, meta: Mapping[str, Any] | None = None) -> ConvertResult:
    """Write ``rows`` (shard rows as dicts) to ``dest`` in ``fmt`` (``coco`` | ``odvg`` | ``grit``);
    ``meta`` goes into ``DEST/export.json`` beside the counts."""
    if fmt not in WRITERS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return WRITERS[fmt](rows, dest, overwrite=overwrite, meta=meta)
