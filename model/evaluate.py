"""REC evaluation: generate a box for each referring expression and score Acc@0.5.

A prediction is the first box of the first ``[[...]]`` group in the generated answer; it is a hit
when its IoU with a true box of the expression is at least 0.5. An answer that does not parse is a
miss, counted with its reason (``grounding.boxes.try_parse_boxes``).

The token budget (``max_new_tokens``) follows the data: by default it fits the longest true answer of the
examples and any answer of ``MAX_BOXES`` (3, the pipeline's boxes per phrase) boxes, + EOS
(:func:`answer_budget`), so a model that writes a whole multi-box answer is never cut. An answer that still
runs out of tokens (no EOS) is counted (``cut_answers``); it is scored on its first box when that box is
complete (``[[a;b;1`` -> ``a``): what follows cannot change the prediction. A cut answer without a complete
box is a parse failure ``cut at max_new_tokens (...)``; an answer the model ended itself must be well-formed.

Two sources, both as users have them:

- held-out grounding shards (``--shards val=data/val/*.parquet``): every ``rec`` QA pair; the truth
  is the answer's boxes, IoU is computed in the 0..999 frame;
- RefCOCO-format annotations (``--refs refs.json --instances instances.json --images DIR``): one
  example per sentence, the truth is the referred annotation's ``bbox`` (COCO ``[x, y, w, h]``
  pixels), IoU is computed in pixels after mapping the prediction back with ``denormalize_box``.
  The refs must be JSON (the original ``refs(unc).p`` is a pickle: convert it once with code you
  trust; this tool never unpickles).

Generation is batched and greedy (``model.generate``, left-padded prompts, KV cache). The report
(JSON) gives Acc@0.5 overall and per split, parse failures by reason, mean IoU and the per-example
predictions; a PNG shows a few images with the prediction (red) and the truth (green).

    python -m model.evaluate --checkpoint runs/x/checkpoints/step_00002000 \\
        --shards val=data/val/*.parquet --out reports/val.json
    python -m model.evaluate --checkpoint runs/x --refs refcoco/refs.json \\
        --instances refcoco/instances.json --images coco/train2014 --splits val testA testB
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from PIL import Image, ImageDraw

from grounding.boxes import (
    box_iou, denormalize_box, format_answer, format_question, normalize_box, prompt_and_target, try_parse_boxes,
)
from grounding.cli import UsageError, add_bool_flag, run_cli
from grounding.schema import phrase_prompt

THRESHOLD = 0.5
MAX_BOXES = 3   # boxes per phrase a shard holds at most by default (grounding.detect's top_k)


@dataclass
class RecExample:
    """One referring expression: the question asked, the true boxes and the frame they are in."""
    key: str
    split: str
    question: str
    phrase: str
    boxes: list[tuple[float, float, float, float]]  # xyxy: 0..999 ints ("norm") or pixels ("pixel")
    frame: str                                       # "norm" | "pixel"
    width: int
    height: int
    image_bytes: bytes | None = None                 # shards carry the bytes ...
    image_path: str | None = None                    # ... RefCOCO points at a file

    def __post_init__(self):
        if self.frame not in ("norm", "pixel"):
            raise ValueError(f"frame must be 'norm' or 'pixel', got {self.frame!r}")
        if not self.boxes:
            raise ValueError(f"example {self.key!r} has no true box")

    def load_image(self) -> Image.Image:
        from grounding.image import decode_image
        return decode_image(self.image_bytes if self.image_bytes is not None else self.image_path)


@dataclass
class RecResult:
    key: str
    split: str
    phrase: str
    answer: str                              # the generated text
    predicted: list[int] | None              # first parsed box, 0..999
    iou: float
    hit: bool
    parse_failure: str | None = None
    cut: bool = False                        # generation ran out of tokens (no EOS)


# --- scoring ---------------------------------------------------------------------------------

def score_answer(answer: str, example: RecExample, threshold: float = THRESHOLD, cut: bool = False) -> RecResult:
    """Parse the generated ``answer`` and score its first box against the example's truth. ``cut``: the answer
    ran out of tokens; its first box still counts when complete (see the module docstring)."""
    boxes, reason = try_parse_boxes(answer, partial=cut)
    if boxes is None:
        reason = f"cut at max_new_tokens ({reason})" if cut else reason
        return RecResult(example.key, example.split, example.phrase, answer, None, 0.0, False, reason, cut)
    result = score_box(boxes[0], example, threshold, answer)
    result.cut = cut
    return result


def score_box(box: Sequence[int], example: RecExample, threshold: float = THRESHOLD, answer: str = "") -> RecResult:
    """IoU of one predicted 0..999 box with the best-matching true box, in the truth's frame."""
    pred = denormalize_box(box, example.width, example.height) if example.frame == "pixel" else tuple(box)
    iou = max(box_iou(pred, t) for t in example.boxes)
    return RecResult(example.key, example.split, example.phrase, answer, list(box), iou, iou >= threshold)


def summarize(results: Sequence[RecResult]) -> dict:
    """Acc@0.5 overall and per split, parse failures by reason, mean IoU, answers cut by the token budget."""
    def block(rs: Sequence[RecResult]) -> dict:
        n = len(rs)
        return {"n": n, "acc@0.5": sum(r.hit for r in rs) / n if n else 0.0,
                "mean_iou": sum(r.iou for r in rs) / n if n else 0.0,
                "parse_failures": sum(r.parse_failure is not None for r in rs)}
    splits = defaultdict(list)
    for r in results:
        splits[r.split].append(r)
    return {**block(results), "cut_answers": sum(r.cut for r in results),
            "splits": {s: block(rs) for s, rs in sorted(splits.items())},
            "parse_failure_reasons": dict(Counter(r.parse_failure for r in results if r.parse_failure))}


# --- sources ---------------------------------------------------------------------------------

def shard_examples(shards: Sequence[str], split: str = "held_out", limit: int | None = None,
                   skip_bad_shards: bool = False, skipped: Counter | None = None) -> list[RecExample]:
    """Every ``rec`` QA pair of the shards, truth = the answer's boxes (0..999 frame).

    Each file is checked first (:func:`grounding.schema.check_shards`): a bad one stops with its name,
    or with ``skip_bad_shards`` is left out and counted in ``skipped`` (``bad_shard``), as are pairs
    whose true answer does not parse (``bad_truth: reason``): a malformed truth is the shard's
    problem, not the model's.
    """
    from grounding.schema import check_shards
    from model.data import READ_COLUMNS, read_row_group, resolve_shards

    skipped = Counter() if skipped is None else skipped
    columns = READ_COLUMNS + ["phrases"]
    footers, bad = check_shards(resolve_shards(list(shards)), columns=columns, skip_bad=skip_bad_shards)
    if bad:
        skipped["bad_shard"] += len(bad)
    out: list[RecExample] = []
    for path, footer in footers.items():
        for g in range(footer.num_row_groups):
            for row in read_row_group(path, g, columns):
                for q in row["qa"] or []:
                    if q["task"] != "rec":
                        continue
                    boxes, reason = try_parse_boxes(q["answer"] or "")
                    if boxes is None:
                        skipped[f"bad_truth: {reason}"] += 1
                        continue
                    pi, phrases = q.get("phrase_index"), row["phrases"] or []
                    phrase = (phrase_prompt(phrases[pi]) if pi is not None and 0 <= pi < len(phrases)
                              else q["question"])
                    out.append(RecExample(row["key"], split, q["question"], phrase, [tuple(b) for b in boxes],
                                          "norm", row["width"], row["height"], image_bytes=row["image"]))
                    if limit is not None and len(out) >= limit:
                        return out
    return out


def refcoco_examples(refs_path: str, instances_path: str, image_dir: str, splits: Iterable[str] | None = None,
                     template: str = "default", limit: int | None = None) -> list[RecExample]:
    """One example per sentence of RefCOCO-format refs (JSON), truth = the annotation's pixel box.

    Files that are not JSON, or refs that point at no image or annotation, raise :class:`UsageError`
    naming the file and the flag (``--refs`` / ``--instances``)."""
    refs, inst = _read_json(refs_path, "--refs"), _read_json(instances_path, "--instances")
    try:
        images = {im["id"]: im for im in inst["images"]}
        anns = {a["id"]: a for a in inst["annotations"]}
    except (KeyError, TypeError) as e:
        raise UsageError(f"{instances_path}: not COCO instances JSON (images/annotations with ids: {e!r}); "
                         "check --instances") from e
    if not isinstance(refs, list):
        raise UsageError(f"{refs_path}: RefCOCO refs JSON is a list of refs, got {type(refs).__name__}; check --refs")
    wanted = set(splits) if splits else None
    out: list[RecExample] = []
    for ref in refs:
        if wanted is not None and ref.get("split") not in wanted:
            continue
        try:
            im = images[ref["image_id"]]
            x, y, w, h = anns[ref["ann_id"]]["bbox"]
            ref["sentences"][0]["sent"]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UsageError(f"{refs_path}: ref {ref.get('ref_id') if isinstance(ref, dict) else ref!r} does not resolve "
                             f"in {instances_path} ({type(e).__name__}: {e}); check --refs / --instances") from e
        for sent in ref["sentences"]:
            phrase = sent["sent"].strip()
            out.append(RecExample(f"{ref['ref_id']}:{sent.get('sent_id', len(out))}", ref.get("split", "all"),
                                  format_question(phrase, template), phrase, [(x, y, x + w, y + h)], "pixel",
                                  im["width"], im["height"], image_path=os.path.join(image_dir, im["file_name"])))
            if limit is not None and len(out) >= limit:
                return out
    return out


def _read_json(path: str, flag: str):
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e}); check {flag}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not JSON ({e}); check {flag} (the original refs(unc).p pickle must be "
                         "converted to JSON once)") from e


# --- generation ------------------------------------------------------------------------------

def answer_budget(tokenizer, examples: Sequence[RecExample], max_boxes: int = MAX_BOXES) -> int:
    """New tokens a complete answer needs: the longest, in tokens, of each example's true answer and of that
    answer with its last box repeated up to ``max_boxes`` boxes, + 1 for EOS."""
    longest = 0
    for ex in examples:
        boxes = [tuple(b) if ex.frame == "norm" else normalize_box(b, ex.width, ex.height) for b in ex.boxes]
        boxes += [boxes[-1]] * (max_boxes - len(boxes))
        target = prompt_and_target(ex.question, format_answer(boxes))[1]
        longest = max(longest, len(tokenizer(target, add_special_tokens=False)["input_ids"]))
    return longest + 1


def generate_answers(model, examples: Sequence[RecExample], batch_size: int = 16, max_new_tokens: int | None = None,
                     progress: Callable[[int], None] | None = None,
                     all_done: Callable[[bool], bool] | None = None) -> list[tuple[str | None, str | None, bool]]:
    """Greedy answers for the examples, batched: ``[(text, None, cut) | (None, "image: reason", False)]``; ``cut``:
    the answer ran out of tokens. ``max_new_tokens`` None: :func:`answer_budget`.

    ``all_done`` (distributed evaluation): every rank's "all rows finished" -> the verdict of all ranks, so every
    rank makes the same forward calls (FSDP needs each rank in each one); an image that does not load is then
    replaced by a blank one, so no batch is left out on one rank only."""
    import torch

    from model.data import encode_prompt, pad_left

    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    budget = max_new_tokens or answer_budget(tok, examples)
    device = next(model.parameters()).device
    out: list[tuple[str | None, str | None, bool]] = [(None, None, False)] * len(examples)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(examples), batch_size):
            chunk = list(range(s, min(s + batch_size, len(examples))))
            good, images = [], []
            for i in chunk:
                try:
                    images.append(examples[i].load_image())
                    good.append(i)
                except Exception as e:
                    out[i] = (None, f"image: {type(e).__name__}", False)
                    if all_done is not None:
                        images.append(Image.new("RGB", (32, 32)))     # stands in; its answer is not used
            run = chunk if all_done is not None else good
            if run:
                ids, mask = pad_left([encode_prompt(tok, examples[i].question) for i in run], pad_id)
                pixels = model.preprocess(images)
                with torch.no_grad():
                    new = model.generate(ids.to(device), mask.to(device), pixels.to(device),
                                         max_new_tokens=budget, do_sample=False, all_done=all_done)  # (B, new)
                for i, seq in zip(run, new.tolist()):
                    if out[i][1] is None:
                        out[i] = (tok.decode(seq, skip_special_tokens=True), None, tok.eos_token_id not in seq)
            if progress:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return out


def evaluate_rec(model, examples: Sequence[RecExample], batch_size: int = 16, max_new_tokens: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 all_done: Callable[[bool], bool] | None = None) -> tuple[dict, list[RecResult]]:
    """Generate and score: ``(summary, results)``; an image that does not load is a miss with its reason.
    ``max_new_tokens`` None: :func:`answer_budget` (the summary says which was used)."""
    budget = max_new_tokens or answer_budget(model.tokenizer, examples)
    results = []
    for ex, (text, err, cut) in zip(examples, generate_answers(model, examples, batch_size, budget, progress, all_done)):
        if err is not None:
            results.append(RecResult(ex.key, ex.split, ex.phrase, "", None, 0.0, False, err))
        else:
            results.append(score_answer(text, ex, cut=cut))
    return {**summarize(results), "max_new_tokens": budget}, results


# --- pictures --------------------------------------------------------------------------------

def draw_predictions(examples: Sequence[RecExample], results: Sequence[RecResult], path: str,
                     n: int = 8, tile: int = 224, seed: int = 0) -> str:
    """A PNG grid of ``n`` examples: truth in green, prediction in red, phrase and IoU below."""
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    idx = idx[:n]
    cols = min(4, max(len(idx), 1))
    rows = max(1, -(-len(idx) // cols))
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 28)), (255, 255, 255))
    for k, i in enumerate(idx):
        ex, res = examples[i], results[i]
        try:
            img = ex.load_image().resize((tile, tile))
        except Exception:
            img = Image.new("RGB", (tile, tile), (90, 90, 90))
        d = ImageDraw.Draw(img)
        sx, sy = tile / ex.width, tile / ex.height
        for b in ex.boxes:
            px = denormalize_box(b, ex.width, ex.height) if ex.frame == "norm" else b
            d.rectangle([px[0] * sx, px[1] * sy, px[2] * sx, px[3] * sy], outline=(0, 200, 0), width=3)
        if res.predicted is not None:
            px = denormalize_box(res.predicted, ex.width, ex.height)
            d.rectangle([px[0] * sx, px[1] * sy, px[2] * sx, px[3] * sy], outline=(230, 0, 0), width=2)
        x, y = (k % cols) * tile, (k // cols) * (tile + 28)
        sheet.paste(img, (x, y))
        label = f"{ex.phrase[:28]} IoU {res.iou:.2f}" if res.parse_failure is None else f"{ex.phrase[:20]} unparsed"
        ImageDraw.Draw(sheet).text((x + 4, y + tile + 6), label, fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# --- entry point -----------------------------------------------------------------------------

def parse_split_globs(values: Sequence[str]) -> dict[str, list[str]]:
    """``["val=a/*.parquet", "b.parquet"]`` -> ``{"val": ["a/*.parquet"], "held_out": ["b.parquet"]}``."""
    out: dict[str, list[str]] = defaultdict(list)
    for v in values:
        name, sep, pattern = v.partition("=")
        if sep and "/" not in name and name:
            out[name].append(pattern)
        else:
            out["held_out"].append(v)
    return dict(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="EMA weights when the checkpoint has them (auto), or force one")
    p.add_argument("--shards", nargs="*", default=[], help="[split=]glob of held-out grounding shards")
    p.add_argument("--refs", help="RefCOCO-format refs JSON")
    p.add_argument("--instances", help="COCO instances JSON the refs point into")
    p.add_argument("--images", help="folder of the instances' images")
    p.add_argument("--splits", nargs="*", help="RefCOCO splits to evaluate (default: all)")
    p.add_argument("--limit", type=int, help="at most this many examples per source")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: enough for the longest true answer and for {MAX_BOXES} boxes")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", default="rec_eval.json", help="JSON report; the PNG goes beside it")
    p.add_argument("--pictures", type=int, default=8, help="examples drawn in the PNG (0: none)")
    add_bool_flag(p, "--skip-bad-shards", default=False,
                  help="leave out shard files that do not read or are not grounding shards (counted) instead of stopping")
    return p


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from model.checkpoint import load_model_from_checkpoint

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")

    examples: list[RecExample] = []
    skipped: Counter = Counter()
    for split, globs in parse_split_globs(args.shards).items():
        try:
            examples += shard_examples(globs, split, args.limit, args.skip_bad_shards, skipped)
        except FileNotFoundError as e:
            raise UsageError(f"{e}; check --shards") from e
    if args.refs:
        if not (args.instances and args.images):
            raise UsageError("--refs needs --instances and --images")
        examples += refcoco_examples(args.refs, args.instances, args.images, args.splits, limit=args.limit)
    if not examples:
        if skipped:
            raise UsageError("nothing to evaluate: every REC pair of --shards was skipped ("
                             + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()) + ")")
        raise UsageError("nothing to evaluate: give --shards or --refs/--instances/--images")
    try:
        model, info = load_model_from_checkpoint(args.checkpoint, weights=args.weights, device=args.device)
    except OSError as e:       # no checkpoint there, or the model directories its trainer_state.json names are not
        raise UsageError(f"{e}; check --checkpoint (a checkpoint folder or a run folder, whose "
                         "trainer_state.json names the LM and vision directories it was trained from)") from e
    from tqdm import tqdm
    with tqdm(total=len(examples), desc="REC eval", unit="ex") as bar:
        summary, results = evaluate_rec(model, examples, args.batch_size, args.max_new_tokens, bar.update)
    report = {**summary, "checkpoint": info,
              "skipped": {k: v for k, v in skipped.items() if v}, "results": [r.__dict__ for r in results]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.pictures:
        report["picture"] = draw_predictions(examples, results, str(out.with_suffix(".png")), n=args.pictures)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
