"""GroundingDINO's positive-map method, apart from any model: phrases -> text prompts with each phrase's
token span, and one pass's token probabilities and boxes -> boxes per phrase (steps 1-4 of
:mod:`grounding.detect`'s docstring). Pure functions over tokenizers, tensors and arrays, so every backend
(:class:`grounding.detect.TransformersModel`, :mod:`grounding.detect_gdpy`) shares them and tests run them
without a model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from grounding.boxes import strip_article

if TYPE_CHECKING:
    from grounding.detect import DetectorConfig

TRAILING_PUNCTUATION = ".?!,;:'\" "  # stripped from a phrase's end (with spaces)
SEPARATOR = " . "  # between phrases; the prompt also ends with " ."

Box = tuple[float, float, float, float]


# --- result of one phrase --------------------------------------------------------------------

@dataclass
class PhraseBoxes:
    boxes: list[Box]                  # pixel xyxy, clipped to the image, best first
    scores: list[float]               # the phrase's positive-map score per box (1.0 for annotations)
    error: str | None = None          # set (and boxes empty) when the image or phrase failed


# --- prompts and token spans -----------------------------------------------------------------

def clean_phrase(phrase: str) -> str:
    """"A red ball!" -> "red ball": what the detector is prompted with for a phrase.

    Lower case; trailing punctuation, '.' and '?' anywhere (the model's separators) and runs of spaces
    removed; a leading article (a / an / the) dropped, as the pipeline's ``phrase_prompt`` drops it,
    so the API and CLI box "a red ball" exactly as the pipeline boxes "red ball".
    """
    text = re.sub(r"[.?]", " ", phrase.lower()).strip().rstrip(TRAILING_PUNCTUATION)
    return strip_article(" ".join(text.split()))


@dataclass
class PromptPass:
    """One text prompt for one image: ``text`` and, per phrase, its index and token span."""
    text: str
    phrases: list[int] = field(default_factory=list)              # indices into the distinct phrases
    token_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in input_ids


def token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Token positions ``[i, j)`` whose character offsets overlap ``[start, end)`` (specials skipped)."""
    hit = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not hit:
        raise ValueError(f"no token covers characters {start}..{end}")
    return hit[0], hit[-1] + 1


def plan_prompts(phrases: Sequence[str], tokenizer, max_tokens: int) -> tuple[list[PromptPass], dict[int, str]]:
    """Pack distinct cleaned ``phrases`` into prompts of at most ``max_tokens`` tokens.

    Returns the passes (phrase indices refer to ``phrases``) and ``{index: reason}`` for phrases
    that cannot be prompted (empty, or longer than one pass allows).
    """
    errors: dict[int, str] = {}
    counts = tokenizer(list(phrases), add_special_tokens=False)["input_ids"] if phrases else []
    passes: list[PromptPass] = []
    parts: list[int] = []
    used = 2  # [CLS] ... [SEP]
    for i, (p, ids) in enumerate(zip(phrases, counts)):
        if not p or not ids:  # nothing left, or only characters the tokenizer drops
            errors[i] = "phrase_empty"
            continue
        need = len(ids) + 1  # the phrase and its '.'
        if need + 2 > max_tokens:
            errors[i] = f"phrase_too_long: {len(ids)} tokens, the text encoder takes {max_tokens - 3} per phrase"
            continue
        if used + need > max_tokens:
            passes.append(_build_pass(phrases, parts, tokenizer, max_tokens))
            parts, used = [], 2
        parts.append(i)
        used += need
    if parts:
        passes.append(_build_pass(phrases, parts, tokenizer, max_tokens))
    return passes, errors


def _build_pass(phrases: Sequence[str], parts: list[int], tokenizer, max_tokens: int) -> PromptPass:
    text, chars = "", []
    for i in parts:
        start = len(text)
        text += phrases[i]
        chars.append((start, len(text)))
        text += SEPARATOR
    text = text.rstrip()  # "red ball . blue box ."
    enc = tokenizer(text, return_offsets_mapping=True)
    if len(enc["input_ids"]) > max_tokens:  # counting per phrase must add up; guard anyway
        raise RuntimeError(f"prompt of {len(enc['input_ids'])} tokens exceeds {max_tokens}: {text!r}")
    spans = [token_span(enc["offset_mapping"], s, e) for s, e in chars]
    return PromptPass(text, list(parts), spans)


# --- post-processing -------------------------------------------------------------------------

def box_ious(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy ``box`` (4,) with each of ``others`` (M, 4) -> (M,)."""
    lt = np.maximum(box[:2], others[:, :2])            # (M, 2)
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)      # (M,)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(others) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def suppress_overlaps(boxes, scores, iou: float, groups=None, per_group: int | None = None) -> list[int]:
    """Greedy NMS: indices kept, best score first; a box overlapping a kept one by IoU > ``iou`` goes.

    With ``groups`` (a phrase index per box) and ``per_group``, stops as soon as every group holds
    ``per_group`` kept boxes: later boxes could not be output any more (top-k after NMS). Each box
    is compared with the kept boxes only, so thousands of candidates cost milliseconds.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    kept = np.empty((len(boxes), 4))
    keep: list[int] = []
    need: dict[int, int] = {}
    if groups is not None and per_group is not None:
        groups = np.asarray(groups)
        need = {int(g): per_group for g in np.unique(groups)}
    for i in order:
        if iou < 1.0 and keep and (box_ious(boxes[i], kept[:len(keep)]) > iou).any():  # IoU > 1 never happens
            continue
        kept[len(keep)] = boxes[i]
        keep.append(int(i))
        g = int(groups[i]) if groups is not None else None
        if g in need:
            need[g] -= 1
            if need[g] == 0:
                del need[g]
                if not need:
                    break
    return keep


def select_boxes(candidates: list[tuple[int, Box, float]], num_phrases: int, width: int, height: int,
                 config: DetectorConfig) -> list[PhraseBoxes]:
    """``(phrase, pixel xyxy, score)`` candidates of one image -> boxes per phrase.

    Clip to the image, drop boxes with a side < ``min_box_size`` or area > ``max_area_fraction``,
    class-agnostic NMS across phrases, then ``top_k`` per phrase (best first).
    """
    out = [PhraseBoxes([], []) for _ in range(num_phrases)]
    if not candidates:
        return out
    phrase = np.array([p for p, _, _ in candidates])
    boxes = np.array([b for _, b, _ in candidates], dtype=np.float64).reshape(-1, 4)  # (N, 4)
    scores = np.array([s for _, _, s in candidates], dtype=np.float64)
    x0, x1 = np.sort(np.clip(boxes[:, [0, 2]], 0, width), axis=1).T
    y0, y1 = np.sort(np.clip(boxes[:, [1, 3]], 0, height), axis=1).T
    ok = ((x1 - x0 >= config.min_box_size) & (y1 - y0 >= config.min_box_size)
          & ((x1 - x0) * (y1 - y0) <= config.max_area_fraction * width * height))
    idx = np.flatnonzero(ok)
    clipped = np.stack([x0, y0, x1, y1], axis=1)[idx]
    for i in suppress_overlaps(clipped, scores[idx], config.nms_iou, phrase[idx], config.top_k):  # best first
        p = int(phrase[idx[i]])
        if len(out[p].boxes) < config.top_k:
            out[p].boxes.append(tuple(float(v) for v in clipped[i]))
            out[p].scores.append(float(scores[idx[i]]))
    return out


def phrase_candidates(token_probs: torch.Tensor, boxes_cxcywh: torch.Tensor, prompt: PromptPass,
                      width: int, height: int, box_threshold: float, text_threshold: float
                      ) -> list[tuple[int, Box, float]]:
    """One pass's model output -> ``(phrase, pixel xyxy, score)`` candidates (positive-map method).

    ``token_probs`` (Q, T) are sigmoid logits per query and token position; ``boxes_cxcywh`` (Q, 4)
    are relative to the image. A phrase's score is the mean probability over its token span.
    """
    spans = prompt.token_spans
    positive = torch.zeros(len(spans), token_probs.shape[1], dtype=token_probs.dtype)  # (P, T)
    for k, (s, e) in enumerate(spans):
        positive[k, s:e] = 1.0 / (e - s)
    phrase_scores = token_probs @ positive.T                                          # (Q, P)
    in_phrase = positive.sum(0) > 0                                                    # (T,)
    box_scores = token_probs[:, in_phrase].max(dim=1).values                           # (Q,)
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    xyxy = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                        (cx + w / 2) * width, (cy + h / 2) * height], dim=-1)          # (Q, 4)
    hit = (box_scores > box_threshold)[:, None] & (phrase_scores > text_threshold)     # (Q, P)
    qs, ks = hit.nonzero(as_tuple=True)
    boxes, scores = xyxy[qs].tolist(), phrase_scores[qs, ks].tolist()
    return [(prompt.phrases[k], tuple(b), s) for k, b, s in zip(ks.tolist(), boxes, scores)]
