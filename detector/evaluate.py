"""Held-out phrase grounding of a saved detector, through the project's own :class:`BoxDetector`.

Each held-out image is prompted with its phrases (as the pipeline prompts a caption's phrases);
the detector runs at thresholds 0 so every box comes back with its phrase score, and
:func:`grounding.audit.summarize` gives recall@1 at IoU 0.5 and precision / recall per threshold
(equal to running the detector at ``box_threshold = text_threshold = t``; see grounding.audit).
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image

from detector.data import Example
from grounding.audit import PhraseAudit, summarize
from grounding.detect import BoxDetector, DetectorConfig


def audit_items(model_dir: str, examples: Sequence[Example], batch_size: int = 8, device: str = "cpu",
                tag_phrases: Sequence[str] = ()) -> list[PhraseAudit]:
    """One :class:`PhraseAudit` per phrase of each example (tagged ``held_out`` when in ``tag_phrases``)."""
    detector = BoxDetector(DetectorConfig(model=model_dir, box_threshold=0.0, text_threshold=0.0,
                                          batch_size=batch_size, device=device))
    tagged = set(tag_phrases)
    items = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        images = [Image.open(ex.image).convert("RGB") for ex in chunk]
        results = detector(images, [ex.phrases for ex in chunk])
        for ex, image, res in zip(chunk, images, results):
            sx, sy = image.width / ex.width, image.height / ex.height  # boxes refer to the annotated size
            for k, (phrase, r) in enumerate(zip(ex.phrases, res)):
                truth = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for (x0, y0, x1, y1), lab in zip(ex.boxes, ex.labels)
                         if lab == k]
                items.append(PhraseAudit(key=ex.image, phrase=phrase, truth=truth, boxes=list(r.boxes),
                                         scores=list(r.scores), tag="held_out" if phrase in tagged else ""))
    return items


def evaluate_detector(model_dir: str, examples: Sequence[Example], held_out_phrases: Sequence[str] = (),
                      batch_size: int = 8, device: str = "cpu", target_precision: float = 0.9) -> dict:
    """Recall@1, P/R by threshold on ``examples``; the same on phrases in ``held_out_phrases`` alone."""
    items = audit_items(model_dir, examples, batch_size, device, held_out_phrases)
    out = {"all": summarize(items, target_precision=target_precision)}
    held = [it for it in items if it.tag == "held_out"]
    if held:
        out["held_out_phrases"] = summarize(held, target_precision=target_precision)
    return out
