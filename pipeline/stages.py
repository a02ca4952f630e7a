"""The job's stages as plain callables over a ``pyarrow.Table`` batch; no Ray here.

Every stage maps a batch of :data:`WORK_SCHEMA` rows to a batch of the same rows (the last one to
:data:`OUTPUT_SCHEMA`). A row that fails or is filtered keeps flowing with ``stage``/``reason``/
``error`` set and is skipped by the later stages, so each input row comes out exactly once:

    admit_downloads (function) -> PhraseStage (class: spaCy once) -> DetectStage (class: detector
    once) -> assemble (function: REC QA pairs, min-boxes rule)

:mod:`pipeline.worker` calls them on one work shard at a time (timing each) inside a Ray task; the
detect stage runs in a detector actor pool (:mod:`pipeline.job`), which sets every Ray resource.
Reject reasons and whether they count as filtered or failed: :mod:`grounding.reasons`.
"""
from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from grounding.boxes import normalize_box
from grounding.captions import clean_caption
from grounding.image import MAX_PIXELS, ImageTooLarge, decode_image, image_header
from grounding.dedup import DedupConfig, EvalIndex, parse_eval_sets, phash_hex
from grounding.records import REASON_TOO_FEW_BOXES, build_record
from grounding.schema import (GROUNDING_SCHEMA, PHRASE_TYPE, REJECTS_SCHEMA, Phrase, assign_boxes, detection_targets,
                              phrase_prompt)
from pipeline.download import AREA_TOO_LARGE_MESSAGE, OPTED_OUT_MESSAGE

# a phrase between the stages: grounding.schema.Phrase as an Arrow struct (the shard's fields + its chunk)
WORK_PHRASE_TYPE = pa.struct([f.with_nullable(True) for f in PHRASE_TYPE] + [pa.field("chunk", pa.int32())])

_STATUS = [pa.field("stage", pa.string()), pa.field("reason", pa.string()), pa.field("error", pa.string())]

WORK_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("caption_raw", pa.string()),     # the source's text; `caption` is cleaned before phrases
    pa.field("source_shard", pa.string()),
    pa.field("source_row", pa.int64()),
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),            # the stored image's size: the frame of the boxes
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("phrases", pa.list_(WORK_PHRASE_TYPE)),
    *_STATUS,
])
OUTPUT_SCHEMA = pa.schema([f.with_nullable(True) for f in GROUNDING_SCHEMA] + _STATUS)


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def _fail(row: dict, stage: str, reason: str, error: str | None = None) -> dict:
    row.update(stage=stage, reason=reason, error=(error or None) and str(error)[:500])
    return row


# --- 1. downloads in, cheap image checks --------------------------------------------------------

def admit_downloads(batch: pa.Table, max_pixels: int = MAX_PIXELS, min_aspect: float = 1 / 6,
                    max_aspect: float = 6.0) -> pa.Table:
    """img2dataset rows -> :data:`WORK_SCHEMA`: failed downloads marked, image headers checked."""
    out = []
    for d in batch.to_pylist():
        row = {"key": d["sample_key"], "url": d["url"], "caption": d["caption"], "source_shard": d["source_shard"],
               "source_row": d["source_row"], "image": d.get("jpg"), "width": None, "height": None,
               "original_width": d.get("original_width"), "original_height": d.get("original_height"),
               "phrases": None, "stage": None, "reason": None, "error": None}
        out.append(row)
        if d.get("status") != "success" or not row["image"]:
            reason = ("opted_out" if d.get("error_message") == OPTED_OUT_MESSAGE else
                      "too_many_pixels" if d.get("error_message") == AREA_TOO_LARGE_MESSAGE else
                      d.get("status") or "failed_to_download")   # img2dataset's status
            _fail(row, "download", reason, d.get("error_message"))
            row["image"] = None
            continue
        try:
            w, h = image_header(row["image"], max_pixels)
        except ImageTooLarge as e:
            _fail(row, "decode", "too_many_pixels", str(e))
            row["image"] = None
            continue
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds; a bad image is data
            _fail(row, "decode", "corrupt_image", f"{type(e).__name__}: {e}")
            row["image"] = None
            continue
        row["width"], row["height"] = w, h
        if not (min_aspect <= w / h <= max_aspect):
            _fail(row, "filter", "aspect_ratio", f"{w}x{h}")
            row["image"] = None
    return _table(out, WORK_SCHEMA)


# --- 1b. evaluation overlap ------------------------------------------------------------------------

class EvalOverlapStage:
    """Rows whose image lies within the phash threshold of an image of a named evaluation set leave
    with ``eval_overlap`` (stage ``dedup``, the set and file in ``error``) before any phrase or box
    work. The sets' hashes are indexed once per worker process (:class:`grounding.dedup.EvalIndex`)."""

    def __init__(self, eval_sets: Sequence[str], config: DedupConfig):
        self.config = config
        self.index = EvalIndex(parse_eval_sets(eval_sets), config)

    def _phash(self, image: bytes) -> str | None:
        try:
            return phash_hex(image, self.config.hash_size)
        except ValueError:  # the decode stage reports it
            return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["stage"] is None and r["image"]]
        for r, flag in zip(todo, self.index.flag({"phash": self._phash(r["image"])} for r in todo)):
            if flag is not None:
                _fail(r, "dedup", "eval_overlap", flag["error"])
                r["image"] = None
        return _table(rows, WORK_SCHEMA)


# --- 2. noun phrases ------------------------------------------------------------------------------

class PhraseStage:
    """spaCy noun phrases per caption; the pipeline is loaded once per actor."""

    def __init__(self, config=None):
        from grounding.phrases import PhraseConfig, PhraseExtractor

        self.extractor = PhraseExtractor(config or PhraseConfig())

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["stage"] is None]
        for r in todo:  # phrases and every span index the cleaned caption; the shard keeps both
            r["caption_raw"] = r["caption"]
            if isinstance(r["caption"], str):
                r["caption"] = clean_caption(r["caption"])
        try:
            results = self.extractor([r["caption"] for r in todo]) if todo else []
        except Exception:  # noqa: BLE001 - isolate the caption that breaks the batch
            results = []
            for r in todo:
                try:
                    results.append(self.extractor([r["caption"]])[0])
                except Exception as e1:  # noqa: BLE001
                    results.append(e1)
        for r, res in zip(todo, results):
            if isinstance(res, Exception):
                _fail(r, "phrases", "phrase_error", f"{type(res).__name__}: {res}")
            elif not res.phrases:
                _fail(r, "phrases", res.reason or "no_noun_phrases")
            else:
                r["phrases"] = [p.to_dict() for p in res.phrases]
        return _table(rows, WORK_SCHEMA)


# --- 3. boxes -------------------------------------------------------------------------------------

class DetectStage:
    """Boxes for each row's phrases; the detector (or annotation index) is loaded once per actor."""

    def __init__(self, config=None, max_pixels: int = MAX_PIXELS):
        from grounding.detect import BoxDetector

        self.detector = BoxDetector(config)
        self.max_pixels = max_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        from grounding.detect import image_error   # loaded with the detector in __init__

        rows = batch.to_pylist()
        attempted = [r for r in rows if r["stage"] is None]
        todo, images, prompts = [], [], []
        for r in attempted:
            try:
                image = decode_image(r["image"], self.max_pixels)
            except Exception as e:  # noqa: BLE001
                _fail(r, "decode", "corrupt_image", f"{type(e).__name__}: {e}")
                r["image"] = None
                continue
            phrases = [Phrase.from_dict(p) for p in r["phrases"]]
            idx = detection_targets(phrases)
            todo.append((r, phrases, idx))
            images.append(image)
            prompts.append([phrase_prompt(phrases[i]) for i in idx])
        try:
            results = self.detector(images, prompts, keys=[r["key"] for r, _, _ in todo]) if todo else []
        except Exception as e:  # noqa: BLE001 - the detector isolates images itself; this is a last guard
            results = [e] * len(todo)
        for (r, phrases, idx), image, res in zip(todo, images, results):
            if isinstance(res, Exception):
                _fail(r, "detect", "detect_error", f"{type(res).__name__}: {res}")
                continue
            err = image_error(res)
            if err is not None:
                _fail(r, "detect", err.split(":", 1)[0].strip() or "detect_error", err)
                continue
            w, h = image.size
            found = {}
            for i, pb in zip(idx, res):
                found[i] = ([list(normalize_box(b, w, h)) for b in pb.boxes], [float(s) for s in pb.scores])
            assign_boxes(phrases, found)
            r["phrases"] = [p.to_dict() for p in phrases]
        return _table(rows, WORK_SCHEMA)


# --- 4. records -------------------------------------------------------------------------------------

def assemble(batch: pa.Table, min_boxes: int = 2, rec_template: str = "default",
             caption_template: str = "default") -> pa.Table:
    """Work rows -> :data:`OUTPUT_SCHEMA`: a grounding row, or a reject (``too_few_boxes`` and earlier ones)."""
    out = []
    for r in batch.to_pylist():
        status = {"stage": r["stage"], "reason": r["reason"], "error": r["error"]}
        if r["stage"] is None:
            phrases = [Phrase.from_dict(p) for p in r["phrases"]]
            record, reason = build_record(
                key=r["key"], caption=r["caption"], caption_raw=r["caption_raw"], image=r["image"],
                width=r["width"], height=r["height"],
                phrases=phrases, url=r["url"], min_boxes=min_boxes, rec_template=rec_template,
                caption_template=caption_template, original_width=r["original_width"],
                original_height=r["original_height"], source_shard=r["source_shard"], source_row=r["source_row"])
            if record is not None:
                out.append({**record, **status})
                continue
            nboxes = len({tuple(b) for p in phrases for b in p.boxes_norm})
            status = {"stage": "filter", "reason": reason,
                      "error": f"{nboxes} distinct boxes < {min_boxes}" if reason == REASON_TOO_FEW_BOXES else None}
        out.append({"key": r["key"], "url": r["url"], "caption": r["caption"], "source_shard": r["source_shard"],
                    "source_row": r["source_row"], **status})
    return _table(out, OUTPUT_SCHEMA)


def split_output(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """An :data:`OUTPUT_SCHEMA` table -> (kept rows as GROUNDING_SCHEMA, rejects as REJECTS_SCHEMA)."""
    import pyarrow.compute as pc

    ok = pc.is_null(table["stage"])
    kept = table.filter(ok).select(GROUNDING_SCHEMA.names).cast(GROUNDING_SCHEMA)
    rejects = table.filter(pc.invert(ok)).select(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA)
    return kept, rejects
