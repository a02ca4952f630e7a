"""How good are the pseudo-boxes? Detector boxes per phrase scored against human boxes.

The unit is one phrase of one image (:class:`PhraseAudit`): its true boxes, the detector's boxes
(best first) and their scores. From a list of them :func:`summarize` reports

- ``recall_at_1``: share of phrases whose best box has IoU >= ``iou`` with one of its true boxes,
  and the per-phrase IoU of that best box (mean, quartiles);
- precision / recall at IoU >= ``iou`` for boxes scoring >= each threshold: a box is a true
  positive when it matches a not yet matched true box of its phrase (greedy, best score first);
  precision = true positives / boxes kept, recall = matched true boxes / all true boxes;
- per score bin: boxes, true positives and their share (the calibration curve);
- the lowest threshold whose precision reaches ``target_precision``, and the recall there.

Thresholds apply to the phrase score a shard stores in ``det_scores``. For the ``transformers``
backend, keeping boxes scoring above ``t`` from a run at lower thresholds gives exactly the boxes
a run at ``box_threshold = text_threshold = t`` gives (the NMS and top-k are greedy in score
order), so the threshold found here is the one to pass to the detector.

From Python: ``audit("OUT", "coco.json", "refs.json", png="calibration.png")`` (shards of a pipeline
output folder against COCO instances + refs; see :func:`shard_items` for the matching). From the
command line: ``grounding-query audit --data OUT --annotations coco.json --refs refs.json --png cal.png``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from grounding.positive_map import box_ious
from grounding.schema import phrase_prompt

Box = tuple[float, float, float, float]
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


@dataclass
class PhraseAudit:
    key: str                                             # image key
    phrase: str
    truth: list[Box]                                     # pixel xyxy (any frame, same as boxes)
    boxes: list[Box] = field(default_factory=list)       # detector boxes, best first
    scores: list[float] = field(default_factory=list)
    tag: str = ""                                        # optional group ("held_out", "chunk", "expression"...)


def match(item: PhraseAudit, iou: float = 0.5) -> list[bool]:
    """True-positive flag per detector box: greedy, best score first, one true box matched once."""
    if not item.boxes:
        return []
    truth = np.asarray(item.truth, dtype=np.float64).reshape(-1, 4)
    free = np.ones(len(truth), dtype=bool)
    flags = []
    for k in np.argsort(-np.asarray(item.scores), kind="stable"):
        ious = box_ious(np.asarray(item.boxes[k], dtype=np.float64), truth) if len(truth) else np.zeros(0)
        ious = np.where(free, ious, -1.0)
        j = int(np.argmax(ious)) if len(ious) else -1
        hit = j >= 0 and ious[j] >= iou
        if hit:
            free[j] = False
        flags.append((int(k), bool(hit)))
    return [hit for _, hit in sorted(flags)]


def top1_iou(item: PhraseAudit) -> float:
    """IoU of the best-scoring box with the closest true box (0 when there is no box)."""
    if not item.boxes or not item.truth:
        return 0.0
    best = int(np.argmax(item.scores))
    return float(box_ious(np.asarray(item.boxes[best], dtype=np.float64),
                          np.asarray(item.truth, dtype=np.float64).reshape(-1, 4)).max())


def summarize(items: Sequence[PhraseAudit], iou: float = 0.5, thresholds: Sequence[float] = THRESHOLDS,
              bins: int = 10, target_precision: float = 0.9) -> dict:
    """Recall@1, per-phrase IoU, precision/recall per threshold, calibration bins, threshold for a target precision."""
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    with_truth = [it for it in items if it.truth]
    n_truth = sum(len(it.truth) for it in items)
    ious = np.array([top1_iou(it) for it in with_truth])
    scores, hits = [], []
    for it in items:
        scores.extend(it.scores)
        hits.extend(match(it, iou))
    scores_a, hits_a = np.asarray(scores, dtype=np.float64), np.asarray(hits, dtype=bool)

    def at(t: float) -> dict:
        keep = scores_a >= t
        kept, tp = int(keep.sum()), int(hits_a[keep].sum())
        return {"threshold": round(float(t), 4), "boxes": kept, "true_positives": tp,
                "precision": tp / kept if kept else None, "recall": tp / n_truth if n_truth else None}

    table = [at(t) for t in thresholds]
    edges = np.linspace(0.0, 1.0, bins + 1)
    calibration = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (scores_a >= lo) & ((scores_a < hi) if hi < 1.0 else (scores_a <= hi))
        n = int(inside.sum())
        calibration.append({"bin": [round(float(lo), 4), round(float(hi), 4)], "boxes": n,
                            "true_positives": int(hits_a[inside].sum()),
                            "precision": float(hits_a[inside].mean()) if n else None,
                            "mean_score": float(scores_a[inside].mean()) if n else None})
    # the lowest score threshold (among the observed scores) whose precision reaches the target
    reach = None
    if len(scores_a):
        order = np.argsort(-scores_a, kind="stable")
        tp_cum = np.cumsum(hits_a[order])
        prec = tp_cum / np.arange(1, len(order) + 1)
        sorted_scores = scores_a[order]
        # a threshold must keep every box with an equal score: evaluate at the last of each tie
        last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
        ok = np.flatnonzero((prec >= target_precision) & last_of_tie)
        if len(ok):
            i = int(ok[-1])
            reach = {"threshold": float(sorted_scores[i]), "precision": float(prec[i]),
                     "recall": float(tp_cum[i] / n_truth) if n_truth else None, "boxes": i + 1}
    return {
        "phrases": len(items), "phrases_with_truth": len(with_truth), "true_boxes": n_truth,
        "detector_boxes": int(len(scores_a)), "iou": iou,
        "recall_at_1": float((ious >= iou).mean()) if len(ious) else None,
        "top1_iou": ({"mean": float(ious.mean()), "p25": float(np.percentile(ious, 25)),
                      "median": float(np.median(ious)), "p75": float(np.percentile(ious, 75))}
                     if len(ious) else None),
        "by_threshold": table, "calibration": calibration,
        "target_precision": target_precision, "threshold_for_target": reach,
    }


# --- grounding shards against COCO instances + refs --------------------------------------------

def shard_items(rows, annotations: str, refs: str | None = None) -> tuple[list[PhraseAudit], dict[str, int]]:
    """Grounding-shard rows (``key``, ``phrases`` with ``boxes_norm`` / ``det_scores``) -> audit items.

    Human boxes come from COCO instances (+ RefCOCO-style refs), matched to a shard phrase the way
    the ``annotations`` detector backend matches (:class:`grounding.detect.AnnotationIndex`): the
    image by its ``key`` (COCO ``images[].key``, else the ``file_name`` stem); the phrase's
    ``prompt`` (else ``text``) equal to one of the image's ref sentences (lower case, leading
    article dropped) -> that ref's box, else its last word equal to a category name -> every box of
    that category. A referring expression (``kind == "expression"``) that is no ref sentence is
    matched by its head chunk (:func:`head_chunk`), the chunk whose boxes it carries: "man riding a
    horse" gets the man's human boxes, never the horse's. Every shard phrase is audited, so an
    expression's inherited boxes are scored again under it (the shard trains on both pairs). Shard
    boxes (0..999 of the shard's frame) are compared in the COCO image's pixel frame. A ref
    sentence of a kept image that no shard phrase names is added with no detector box (a miss).
    Phrases with no human box (a chunk whose words name no category or ref, such as ``"white
    background"``, and the expressions built on such a chunk) are counted apart and left out of
    precision (nothing says whether their boxes are right). Returns the items and counts:
    ``images``, ``images_without_annotations``, ``phrases_without_truth`` (of them
    ``expressions_without_truth``), ``boxes_without_truth``, ``missed_refs``.
    """
    from grounding.boxes import denormalize_box
    from grounding.detect import AnnotationIndex, normalize_sentence

    index = AnnotationIndex(annotations, refs)
    counts = {"images": 0, "images_without_annotations": 0, "phrases_without_truth": 0,
              "expressions_without_truth": 0, "boxes_without_truth": 0, "missed_refs": 0}
    items: list[PhraseAudit] = []
    for row in rows:
        counts["images"] += 1
        key = str(row["key"])
        info = index.images.get(key)
        if info is None:
            counts["images_without_annotations"] += 1
            continue
        w, h = info["width"], info["height"]
        phrases = list(row["phrases"] or [])
        prompts = [phrase_prompt(p) for p in phrases]
        truths = index.lookup(key, prompts)
        sentences = index.sentences.get(key, {})
        asked = set()
        for i, (p, prompt, truth) in enumerate(zip(phrases, prompts, truths)):
            asked.add(normalize_sentence(prompt))
            boxes = [denormalize_box(b, w, h) for b in p["boxes_norm"]]
            expression = p.get("kind") == "expression"
            if expression and normalize_sentence(prompt) not in sentences:
                head = head_chunk(phrases, i)
                truth = truths[head] if head is not None else None
            if truth is None or not truth.boxes:
                counts["phrases_without_truth"] += 1
                counts["expressions_without_truth"] += expression
                counts["boxes_without_truth"] += len(boxes)
                continue
            items.append(PhraseAudit(key, prompt, list(truth.boxes), boxes, [float(s) for s in p["det_scores"]],
                                     tag="expression" if expression else "chunk"))
        for sentence, ann_ids in index.sentences.get(key, {}).items():
            if sentence not in asked:
                counts["missed_refs"] += 1
                asked.add(sentence)
                truth = index.lookup(key, [sentence])[0]
                items.append(PhraseAudit(key, sentence, list(truth.boxes), tag="missed_ref"))
    return items, counts


def head_chunk(phrases: Sequence[dict], i: int) -> int | None:
    """Index of the chunk whose boxes shard phrase ``i`` carries (``i`` itself for a chunk), else None.

    A shard row keeps no chunk index (:class:`grounding.schema.Phrase`), so it is found as
    :mod:`grounding.phrases` builds an expression: grown rightwards from its head chunk, with that
    chunk's head noun. The chunk with the same head that starts where the expression starts; else
    (an expression of a repeated chunk, whose boxes come from the chunk's first mention) the
    longest chunk with the same head whose prompt the expression's prompt begins with.
    """
    p = phrases[i]
    if p.get("kind") != "expression":
        return i
    chunks = [j for j, q in enumerate(phrases) if q.get("kind") != "expression" and q.get("head") == p.get("head")]
    for j in chunks:
        if phrases[j]["start"] == p["start"]:
            return j
    prompt = phrase_prompt(p).lower()
    prefixed = [j for j in chunks if (prompt + " ").startswith(phrase_prompt(phrases[j]).lower() + " ")]
    return max(prefixed, key=lambda j: len(phrase_prompt(phrases[j]))) if prefixed else None


def audit(data, annotations: str, refs: str | None = None, iou: float = 0.5, target_precision: float = 0.9,
          bins: int = 10, png: str | None = None) -> dict:
    """Audit the grounding shards of ``data`` (a pipeline output folder, shard glob or a DuckDB
    connection with a ``shards`` view) against human boxes; optionally draw the calibration PNG.

    Returns :func:`summarize`'s report plus ``counts`` (see :func:`shard_items`), ``by_kind`` (phrases and
    recall@1 of chunks, expressions and missed refs apart) and ``per_phrase`` (the top-1 IoU of each
    audited phrase).
    """
    from grounding.query import connect

    con = data if hasattr(data, "sql") else connect(data)
    try:
        rows = con.sql("SELECT key, phrases FROM shards ORDER BY key").to_arrow_table().to_pylist()
    finally:
        if con is not data:
            con.close()
    items, counts = shard_items(rows, annotations, refs)
    report = summarize(items, iou=iou, bins=bins, target_precision=target_precision)
    report["counts"] = counts
    # recall@1 of each kind of audited phrase: "chunk", "expression" (scored with its head chunk's human
    # boxes), "missed_ref" (a ref sentence no shard phrase names: 0 by construction)
    report["by_kind"] = {kind: {"phrases": len(sub), "recall_at_1": summarize(sub, iou=iou)["recall_at_1"]}
                         for kind in ("chunk", "expression", "missed_ref")
                         for sub in [[it for it in items if it.tag == kind]] if sub}
    report["per_phrase"] = [{"key": it.key, "phrase": it.phrase, "top1_iou": round(top1_iou(it), 4),
                             "score": max(it.scores) if it.scores else None} for it in items]
    if png:
        draw_calibration(report, png)
        report["png"] = png
    return report


def draw_calibration(report: dict, path: str, size: int = 480) -> str:
    """Calibration picture: precision per score bin (bars, box counts above) against the diagonal,
    and the precision / recall curve over thresholds; the target-precision threshold marked."""
    from PIL import Image, ImageDraw

    pad, gap = 48, 24
    w, h = 2 * size + gap + 2 * pad, size + 2 * pad
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)

    def frame(x0: int, title: str, xlabel: str, ylabel: str):
        d.rectangle([x0, pad, x0 + size, pad + size], outline="black")
        d.text((x0, 8), title, fill="black")
        d.text((x0 + size // 2 - 30, pad + size + 20), xlabel, fill="black")
        d.text((x0 - pad + 4, pad - 14), ylabel, fill="black")
        for k in range(0, 11, 2):
            v = k / 10
            d.text((x0 + int(v * size) - 8, pad + size + 4), f"{v:.1f}", fill="grey")
            d.text((x0 - 26, pad + size - int(v * size) - 6), f"{v:.1f}", fill="grey")
        return lambda x, y: (x0 + x * size, pad + size - y * size)

    at = frame(pad, f"precision per score bin (IoU >= {report['iou']})", "detector score", "precision")
    d.line([at(0, 0), at(1, 1)], fill=(160, 160, 160), width=1)
    for b in report["calibration"]:
        lo, hi = b["bin"]
        if b["precision"] is None:
            continue
        x0, y0 = at(lo, b["precision"])
        x1, y1 = at(hi, 0)
        d.rectangle([x0 + 2, y0, x1 - 2, y1], fill=(70, 130, 200), outline="black")
        d.text((x0 + 3, y0 - 12), str(b["boxes"]), fill="black")
    at2 = frame(pad + size + gap, "precision / recall by threshold", "recall", "precision")
    pts = [(r["recall"], r["precision"]) for r in report["by_threshold"] if r["precision"] is not None and r["recall"] is not None]
    if len(pts) > 1:
        d.line([at2(x, y) for x, y in pts], fill=(200, 80, 40), width=2)
    for r in report["by_threshold"]:
        if r["precision"] is not None and r["recall"] is not None:
            x, y = at2(r["recall"], r["precision"])
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(200, 80, 40))
    reach = report.get("threshold_for_target")
    tp = report["target_precision"]
    y = at2(0, tp)[1]
    d.line([at2(0, tp), at2(1, tp)], fill=(120, 120, 120), width=1)
    note = (f"precision >= {tp}: threshold {reach['threshold']:.3f}, recall {reach['recall']:.2f}" if reach
            else f"precision {tp} not reached")
    d.text((pad + size + gap + 6, y - 14), note, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main_args(p) -> None:
    """The ``grounding-query audit`` flags (besides the shard source flags)."""
    p.add_argument("--annotations", required=True, help="COCO instances JSON with the human boxes")
    p.add_argument("--refs", help="RefCOCO-style refs JSON (phrase sentences -> annotation ids)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU for a box to count as right (default 0.5)")
    p.add_argument("--target-precision", type=float, default=0.9, help="report the threshold reaching it (default 0.9)")
    p.add_argument("--bins", type=int, default=10, help="score bins of the calibration (default 10)")
    p.add_argument("--png", help="write the calibration picture here")
    p.add_argument("--per-phrase", action="store_true", help="include every phrase's top-1 IoU in the JSON")


def run(con, args) -> dict:
    """``grounding-query audit``: the report as JSON on stdout (or ``--output``)."""
    report = audit(con, args.annotations, args.refs, iou=args.iou, target_precision=args.target_precision,
                   bins=args.bins, png=args.png)
    if not args.per_phrase:
        report.pop("per_phrase")
    text = json.dumps(report, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return report
