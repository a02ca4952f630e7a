"""The box text format shared by the pipeline and the model (CogVLM's convention).

Rule, pixel ``xyxy`` -> integers 000-999, for an image of ``width`` x ``height`` pixels::

    x_norm = clamp(floor(x * 1000 / width), 0, 999)      (y likewise with height)

then the corners are ordered so that x0 <= x1 and y0 <= y1. Each coordinate is written with three
digits; one box is ``[[x0,y0,x1,y1]]`` and several boxes of one phrase ``[[a;b;...]]``, each of
``a``, ``b`` being four comma-separated coordinates. The inverse maps a normalised integer ``v`` to
the centre of its bin, ``(v + 0.5) * size / 1000`` pixels, so a round trip moves a corner by at most
half a bin (``size / 2000`` pixels).

The REC question/answer templates live here too, so training prompts and shard QA pairs agree.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

NORM = 1000  # number of bins per axis: coordinates are 0..NORM-1

Box = tuple[float, float, float, float]
NormBox = tuple[int, int, int, int]


class BoxParseError(ValueError):
    """Raised when model output is not a well-formed box string; ``reason`` says why."""

    def __init__(self, reason: str, text: str):
        super().__init__(f"{reason}: {text[:80]!r}")
        self.reason = reason
        self.text = text


def _norm_coord(v: float, size: int) -> int:
    if not math.isfinite(v):
        raise ValueError(f"box coordinate must be finite, got {v}")
    return min(max(math.floor(v * NORM / size), 0), NORM - 1)


def normalize_box(box: Sequence[float], width: int, height: int) -> NormBox:
    """Pixel ``xyxy`` -> integer ``xyxy`` in 0..999 (floor, clamp, corners ordered)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates, got {len(box)}")
    x0, y0, x1, y1 = (_norm_coord(box[0], width), _norm_coord(box[1], height),
                      _norm_coord(box[2], width), _norm_coord(box[3], height))
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def denormalize_box(box: Sequence[int], width: int, height: int) -> Box:
    """Integer 0..999 ``xyxy`` -> pixel ``xyxy`` at the centre of each bin."""
    x0, y0, x1, y1 = box
    sx, sy = width / NORM, height / NORM
    return ((x0 + 0.5) * sx, (y0 + 0.5) * sy, (x1 + 0.5) * sx, (y1 + 0.5) * sy)


def format_boxes(boxes: Iterable[Sequence[int]]) -> str:
    """``[[x0,y0,x1,y1;...]]`` with three digits per coordinate."""
    parts = []
    for b in boxes:
        if len(b) != 4 or any(not (0 <= int(v) < NORM) or int(v) != v for v in b):
            raise ValueError(f"normalised box must be 4 integers in 0..{NORM - 1}, got {tuple(b)}")
        parts.append(",".join(f"{int(v):03d}" for v in b))
    if not parts:
        raise ValueError("format_boxes needs at least one box")
    return "[[" + ";".join(parts) + "]]"


_COORD = r"\d{3}"
_BOX = rf"{_COORD},{_COORD},{_COORD},{_COORD}"
_BOXES_RE = re.compile(rf"\[\[({_BOX}(?:;{_BOX})*)\]\]")


def parse_boxes(text: str, partial: bool = False) -> list[NormBox]:
    """The boxes of the first ``[[...]]`` group in ``text``; raises :class:`BoxParseError`.

    Accepts surrounding text ("Answer: [[...]]") and spaces inside the brackets; rejects wrong
    digit counts, a coordinate count other than four, and boxes whose corners are out of order.
    ``partial``: ``text`` was cut off (a generation that ran out of tokens), so a group without ``]]``
    gives its complete boxes (``[[a;b;1`` -> ``[a, b]``); a group cut before its first box ends is
    still an error.
    """
    if not isinstance(text, str):
        raise BoxParseError("not a string", repr(text))
    if "[[" not in text:
        raise BoxParseError("no '[[' in output", text)
    start = text.index("[[")
    end = text.find("]]", start)
    if end >= 0:
        group = re.sub(r"\s+", "", text[start:end + 2])
    else:
        parts = re.sub(r"\s+", "", text[start + 2:]).split(";")
        parts[-1] = parts[-1].removesuffix("]")                     # cut between the two closing brackets
        if re.fullmatch(_BOX, parts[-1]) is None:
            parts = parts[:-1]                                       # the box being written when the text stopped
        if not partial or not parts:
            raise BoxParseError("unterminated box group (no ']]')", text)
        group = "[[" + ";".join(parts) + "]]"
    m = _BOXES_RE.fullmatch(group)
    if m is None:
        inner = group[2:-2]
        for part in inner.split(";"):
            coords = part.split(",")
            if len(coords) != 4:
                raise BoxParseError(f"a box needs 4 coordinates, got {len(coords)}", text)
            if not all(re.fullmatch(r"\d{3}", c) for c in coords):
                raise BoxParseError("coordinates must be three digits 000-999", text)
        raise BoxParseError("malformed box group", text)
    boxes = []
    for part in m.group(1).split(";"):
        x0, y0, x1, y1 = (int(c) for c in part.split(","))
        if x0 > x1 or y0 > y1:
            raise BoxParseError("box corners out of order (need x0<=x1, y0<=y1)", text)
        boxes.append((x0, y0, x1, y1))
    return boxes


def try_parse_boxes(text: str, partial: bool = False) -> tuple[list[NormBox] | None, str | None]:
    """``(boxes, None)`` or ``(None, reason)``: the form evaluation code wants (``partial``: see :func:`parse_boxes`)."""
    try:
        return parse_boxes(text, partial), None
    except BoxParseError as e:
        return None, e.reason


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``xyxy`` boxes (any frame, as long as both share it)."""
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(ix1 - ix0, 0.0) * max(iy1 - iy0, 0.0)
    area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


# --- question / answer templates -------------------------------------------------------------

@dataclass(frozen=True)
class QATemplate:
    question: str  # contains {phrase}
    answer: str    # contains {boxes}


REC_TEMPLATES: dict[str, QATemplate] = {
    "default": QATemplate("Question: Where is the {phrase}?", "Answer: {boxes}"),
    "grounding": QATemplate("Question: Give the bounding box of the {phrase}.", "Answer: {boxes}"),
    "locate": QATemplate("Question: Locate the {phrase} in the image.", "Answer: {boxes}"),
}
CAPTION_TEMPLATES: dict[str, QATemplate] = {
    "default": QATemplate("Question: Describe the image.", "Answer: {caption}"),
    "short": QATemplate("Question: What is in the image?", "Answer: {caption}"),
}


def format_question(phrase: str, template: str = "default") -> str:
    """``Question: Where is the {phrase}?`` (a leading article of ``phrase`` is dropped)."""
    return REC_TEMPLATES[template].question.format(phrase=strip_article(phrase))


def format_answer(boxes: Iterable[Sequence[int]], template: str = "default") -> str:
    return REC_TEMPLATES[template].answer.format(boxes=format_boxes(boxes))


def strip_article(phrase: str) -> str:
    """"the red ball" -> "red ball", so "Where is the {phrase}?" never reads "the the"."""
    return re.sub(r"^(?:the|a|an)\s+", "", phrase.strip(), flags=re.IGNORECASE)


def grounded_caption(caption: str, spans: Iterable[tuple[int, int, Sequence[Sequence[int]]]]) -> str:
    """Insert ``[[...]]`` after each grounded span: ``"a dog [[..]] on a mat [[..]]"``.

    ``spans`` are ``(start, end, norm_boxes)`` in caption character offsets; overlapping spans keep
    the first (by start, longest first) so the caption text is never altered.
    """
    out, pos = [], 0
    for start, end, boxes in sorted(spans, key=lambda s: (s[0], -s[1])):
        if start < pos or not boxes:
            continue
        out.append(caption[pos:end])
        out.append(" " + format_boxes(boxes))
        pos = end
    out.append(caption[pos:])
    return "".join(out)


ANSWER_PREFIX = "Answer:"


def prompt_and_target(question: str, answer: str) -> tuple[str, str]:
    """Split a QA pair into the model prompt and the supervised target.

    ``("Question: Where is the dog?", "Answer: [[...]]")`` -> ``("Question: Where is the dog? Answer:",
    " [[...]]")``. Training puts the loss only on the target (plus EOS); generation feeds the prompt.
    """
    body = answer[len(ANSWER_PREFIX):] if answer.startswith(ANSWER_PREFIX) else answer
    return f"{question} {ANSWER_PREFIX}", " " + body.strip()
