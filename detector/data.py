"""Boxed phrases for detector training: COCO instances (+ RefCOCO-style refs) -> prompts and targets.

Input (the format :func:`grounding.world.write_world` writes, and COCO / RefCOCO's):

- ``coco``: COCO instances JSON; ``images[].file_name`` relative to ``images`` (the directory),
  ``annotations[].bbox`` = ``[x, y, w, h]`` in pixels of ``images[].width`` x ``height``.
- ``refs`` (optional): a list of ``{"image_id", "ann_id", "sentences": [{"sent": "red ball"}, ...]}``;
  each ref makes its first sentence a phrase for its annotation's box. Without refs, each
  annotation's phrase is its category name (all boxes of a category share the phrase).

Each :class:`Example` is one image with its distinct phrases and, per box, the phrase's index.
:class:`Collator` turns examples into the model's inputs: the prompt is the image's phrases (in
a per-step random order) plus up to ``negatives`` phrases of other images (no boxes: the model
learns to leave them unboxed), joined as ``"red ball . blue box ."`` exactly as
:class:`grounding.detect.BoxDetector` prompts; ``class_labels`` are the phrases' positions in the
prompt and boxes are normalised ``(cx, cy, w, h)`` relative to the image.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from grounding.detect import clean_phrase


@dataclass
class Example:
    image: str                                   # image file path
    width: int                                   # the size the boxes refer to
    height: int
    phrases: list[str]                           # distinct cleaned phrases
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # pixel xyxy
    labels: list[int] = field(default_factory=list)                               # phrase index per box


def load_examples(coco: str, images: str, refs: str | None = None,
                  exclude_phrases: Sequence[str] = ()) -> tuple[list[Example], dict[str, int]]:
    """COCO (+ refs) -> examples and ``{reason: count}`` of what was skipped.

    Images holding a phrase in ``exclude_phrases`` are dropped whole (``excluded_phrase``), so
    those phrases are never seen, not even as unlabelled objects; images without a box are dropped
    (``no_boxes``); a box of zero area or outside the image is skipped (``bad_box``).
    """
    data = json.loads(Path(coco).read_text())
    anns_by_image: dict[int, list[dict]] = {}
    ann_by_id = {}
    for a in data["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
        ann_by_id[a["id"]] = a
    categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    phrase_of: dict[int, list[str]] = {}         # ann id -> phrases
    if refs:
        for r in json.loads(Path(refs).read_text()):
            sents = [s.get("sent") or s.get("raw") or "" for s in r.get("sentences", [])]
            sents = [clean_phrase(s) for s in sents if clean_phrase(s)]
            if sents and r["ann_id"] in ann_by_id:
                phrase_of.setdefault(r["ann_id"], []).append(sents[0])
    excluded = {clean_phrase(p) for p in exclude_phrases}
    skipped: dict[str, int] = {}
    examples = []
    for im in data["images"]:
        w, h = im["width"], im["height"]
        phrases: list[str] = []
        boxes, labels = [], []
        for a in anns_by_image.get(im["id"], []):
            names = phrase_of.get(a["id"]) if refs else [clean_phrase(categories.get(a["category_id"], ""))]
            x, y, bw, bh = a["bbox"]
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if x1 <= x0 or y1 <= y0:
                skipped["bad_box"] = skipped.get("bad_box", 0) + 1
                continue
            for name in names or []:
                if not name:
                    continue
                if name not in phrases:
                    phrases.append(name)
                boxes.append((x0, y0, x1, y1))
                labels.append(phrases.index(name))
        if excluded & set(phrases):
            skipped["excluded_phrase"] = skipped.get("excluded_phrase", 0) + 1
            continue
        if not boxes:
            skipped["no_boxes"] = skipped.get("no_boxes", 0) + 1
            continue
        examples.append(Example(str(Path(images) / im["file_name"]), w, h, phrases, boxes, labels))
    return examples, skipped


class Collator:
    """Examples -> the model's batch (``pixel_values``, ``pixel_mask``, text inputs, ``labels``)."""

    def __init__(self, image_processor, tokenizer, max_text_len: int, negatives: int = 0,
                 phrase_pool: Sequence[str] = ()):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.negatives = negatives
        self.phrase_pool = sorted(set(phrase_pool))

    def fits(self, ex: Example) -> bool:
        """Whether the image's own phrases fit the text encoder (``max_text_len`` tokens)."""
        return len(self.tokenizer(" . ".join(ex.phrases) + " .")["input_ids"]) <= self.max_text_len

    def prompt(self, ex: Example, rng: random.Random, negatives: bool = True) -> tuple[str, list[int]]:
        """The prompt and, per phrase of ``ex``, its position in the prompt."""
        order = list(range(len(ex.phrases)))
        rng.shuffle(order)
        parts = [ex.phrases[i] for i in order]
        if negatives and self.negatives and self.phrase_pool:
            own = set(ex.phrases)
            pool = [p for p in rng.sample(self.phrase_pool, min(len(self.phrase_pool), self.negatives + len(own)))
                    if p not in own][:rng.randint(0, self.negatives)]
            for p in pool:  # negatives at random positions, positives keep their relative order
                parts.insert(rng.randint(0, len(parts)), p)
        position = {p: k for k, p in enumerate(parts)}
        return " . ".join(parts) + " .", [position[ex.phrases[i]] for i in range(len(ex.phrases))]

    def __call__(self, examples: Sequence[Example], rng: random.Random) -> dict:
        images = [Image.open(ex.image).convert("RGB") for ex in examples]
        enc = self.image_processor(images=images, return_tensors="pt")
        prompts, labels = [], []
        for ex in examples:
            text, where = self.prompt(ex, rng)
            if len(self.tokenizer(text)["input_ids"]) > self.max_text_len:  # no room for the negatives
                text, where = self.prompt(ex, rng, negatives=False)
            prompts.append(text)
            b = torch.tensor(ex.boxes, dtype=torch.float32).reshape(-1, 4)
            cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / ex.width, (b[:, 1] + b[:, 3]) / 2 / ex.height,
                                  (b[:, 2] - b[:, 0]) / ex.width, (b[:, 3] - b[:, 1]) / ex.height], dim=-1)
            labels.append({"class_labels": torch.tensor([where[k] for k in ex.labels], dtype=torch.long),
                           "boxes": cxcywh})
        text = self.tokenizer(prompts, padding="longest", return_tensors="pt")
        if text["input_ids"].shape[1] > self.max_text_len:  # train() drops such images first
            raise ValueError(f"a prompt exceeds {self.max_text_len} tokens: {max(prompts, key=len)[:200]!r}")
        return {"pixel_values": enc["pixel_values"], "pixel_mask": enc["pixel_mask"], "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"], "token_type_ids": text["token_type_ids"], "labels": labels}


def batches(examples: Sequence[Example], batch_size: int, seed: int, epoch: int, bucket: int = 32) -> list[list[int]]:
    """One epoch's batches of example indices: shuffled by ``(seed, epoch)``, then grouped by aspect
    ratio within windows of ``bucket`` batches so a batch pads little; reproducible for resuming."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    out = []
    window = batch_size * bucket
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda i: examples[i].width / examples[i].height)
        out.extend(chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(out)
    return [b for b in out if len(b) == batch_size] or out
