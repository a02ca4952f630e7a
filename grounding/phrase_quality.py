"""Phrase quality against labelled captions: head-noun true/false positives, precision and recall."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from grounding.phrases import CaptionPhrases


def head_counts(results: Sequence[CaptionPhrases], rows: Sequence[dict]) -> dict[str, int]:
    """True/false positives and misses of chunk head lemmas against labelled rows
    (``{"heads": [...], "optional": [...]}``: optional heads count neither way), per caption as sets."""
    tp = fp = fn = 0
    for row, res in zip(rows, results, strict=True):
        pred = {p.head for p in res.phrases if p.kind == "chunk"}
        gold, optional = set(row["heads"]), set(row.get("optional", ()))
        tp += len(pred & gold)
        fp += len(pred - gold - optional)
        fn += len(gold - pred)
    return {"tp": tp, "fp": fp, "fn": fn}


def precision_recall(counts: dict[str, int]) -> tuple[float, float]:
    """Head-noun precision and recall from :func:`head_counts` (1.0 when there is nothing to count)."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return (tp / (tp + fp) if tp + fp else 1.0), (tp / (tp + fn) if tp + fn else 1.0)
