"""Assemble one grounding-shard row from a caption, its boxed phrases and the image.

Pure library code shared by the pipeline (detector boxes) and the synthetic world (true boxes):
REC QA pairs for every phrase with a box, one captioning pair, the grounded caption, and the
``min_boxes`` rule (CogVLM / GRIT keep images with at least two boxes).

The caption a row stores is the cleaned one (:func:`grounding.captions.clean_caption`), and the
phrase spans index it: clean first, extract phrases from the cleaned text, then build the row with
``caption=<cleaned>, caption_raw=<as given>``. A caption that cleaning would still change is refused with
reason ``caption_not_clean`` rather than stored with spans into text nobody reads.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from grounding.boxes import CAPTION_TEMPLATES, format_answer, format_question, grounded_caption
from grounding.captions import clean_caption
from grounding.schema import Phrase, phrase_prompt

REASON_TOO_FEW_BOXES = "too_few_boxes"
REASON_CAPTION_NOT_CLEAN = "caption_not_clean"


def build_record(*, key: str, caption: str, image: bytes, width: int, height: int,
                 phrases: Sequence[Phrase | Mapping[str, Any]], caption_raw: str | None = None,
                 url: str | None = None, min_boxes: int = 2,
                 rec_template: str = "default", caption_template: str = "default",
                 original_width: int | None = None, original_height: int | None = None,
                 source_shard: str | None = None, source_row: int | None = None) -> tuple[dict | None, str | None]:
    """``(row, None)`` for a kept image, ``(None, reason)`` otherwise.

    ``caption`` is the cleaned caption the phrase spans index (``caption_not_clean`` otherwise),
    ``caption_raw`` the source's text. ``phrases`` are :class:`grounding.schema.Phrase` records (or dicts
    with their fields); ``boxes_norm`` in 0..999 of the ``width`` x ``height`` frame. Phrases without a box
    are dropped from the row, which stores the rest as :data:`grounding.schema.PHRASE_TYPE` structs.
    """
    if clean_caption(caption) != caption:
        return None, REASON_CAPTION_NOT_CLEAN
    kept = [p for p in map(Phrase.from_dict, phrases) if p.boxes_norm]
    distinct = {tuple(b) for p in kept for b in p.boxes_norm}
    if len(distinct) < min_boxes:
        return None, REASON_TOO_FEW_BOXES
    cap = CAPTION_TEMPLATES[caption_template]
    qa = [{"task": "caption", "question": cap.question, "answer": cap.answer.format(caption=caption), "phrase_index": None}]
    for i, p in enumerate(kept):
        qa.append({"task": "rec", "question": format_question(phrase_prompt(p), rec_template),
                   "answer": format_answer(p.boxes_norm, rec_template), "phrase_index": i})
    chunks = [(p.start, p.end, p.boxes_norm) for p in kept if p.kind == "chunk"]
    row = {"key": key, "url": url, "caption": caption, "caption_raw": caption_raw, "width": width, "height": height,
           "original_width": original_width, "original_height": original_height, "image": image,
           "phrases": [p.record() for p in kept], "qa": qa, "grounded_caption": grounded_caption(caption, chunks),
           "num_boxes": len(distinct), "source_shard": source_shard, "source_row": source_row}
    return row, None
