"""Head-noun precision and recall of the phrase extractor on every labelled caption set.

Sets (``tests/grounding/data/``):

- ``labelled_captions.jsonl`` / ``labelled_captions_heldout.jsonl``: clean descriptive captions (the
  first tuned on, the second held out);
- ``noisy_captions_tuning.jsonl`` / ``noisy_captions_heldout.jsonl``: noisy web alt-text (product titles,
  stock and news captions, markup, long and tricky captions; ``kind`` per row), split by a hash of the
  caption before any tuning (``README.md`` beside them has the labelling rules). Only the tuning part was
  looked at while fixing the extractor.

Captions go through :func:`grounding.captions.clean_caption` first, as the pipeline does; ``--raw`` scores
the raw captions instead (the extractor cleans its own copy; the figures should match closely).

Run: ``python benchmarks/eval_phrases.py [--out benchmarks/results/phrases_quality.json] [--show-errors]``
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grounding.captions import clean_caption  # noqa: E402
from grounding.phrase_quality import head_counts, precision_recall  # noqa: E402
from grounding.phrases import PhraseConfig, PhraseExtractor  # noqa: E402

DATA = ROOT / "tests" / "grounding" / "data"
SETS = {"clean_dev": "labelled_captions.jsonl", "clean_heldout": "labelled_captions_heldout.jsonl",
        "noisy_tuning": "noisy_captions_tuning.jsonl", "noisy_heldout": "noisy_captions_heldout.jsonl"}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def figures(counts: dict[str, int], n: int) -> dict:
    p, r = precision_recall(counts)
    return {"captions": n, "precision": round(p, 3), "recall": round(r, 3), **counts}


def evaluate(extractor: PhraseExtractor, rows: list[dict], raw: bool = False) -> tuple[dict, list]:
    results = extractor([r["caption"] if raw else clean_caption(r["caption"]) for r in rows])
    out = figures(head_counts(results, rows), len(rows))
    by_kind = defaultdict(list)
    for row, res in zip(rows, results):
        by_kind[row.get("kind", "clean")].append((row, res))
    if len(by_kind) > 1:
        out["by_kind"] = {k: figures(head_counts([x[1] for x in v], [x[0] for x in v]), len(v))
                          for k, v in sorted(by_kind.items())}
    errors = []
    for row, res in zip(rows, results):
        pred = {p.head for p in res.phrases if p.kind == "chunk"}
        gold, opt = set(row["heads"]), set(row.get("optional", ()))
        fp, fn = sorted(pred - gold - opt), sorted(gold - pred)
        if fp or fn:
            errors.append({"caption": row["caption"], "kind": row.get("kind"), "false": fp, "missed": fn,
                           "prompts": [p.prompt for p in res.phrases if p.kind == "chunk"]})
    return out, errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "phrases_quality.json"))
    ap.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    ap.add_argument("--raw", action="store_true", help="score raw captions (no clean_caption first)")
    ap.add_argument("--no-ner", action="store_true", help="ablation: PhraseConfig(ner=False)")
    ap.add_argument("--no-frame", action="store_true", help="ablation: PhraseConfig(sentence_frame=False)")
    ap.add_argument("--show-errors", nargs="*", default=None, metavar="SET",
                    help="print the wrong captions of these sets (never look at the held-out ones while tuning)")
    args = ap.parse_args(argv)
    import spacy

    config = PhraseConfig(ner=not args.no_ner, sentence_frame=not args.no_frame)
    extractor = PhraseExtractor(config)
    report = {"benchmark": "phrases_quality", "model": config.model, "spacy": spacy.__version__,
              "components": list(extractor.nlp.pipe_names), "ner": config.ner, "sentence_frame": config.sentence_frame, "input": "raw" if args.raw else "clean_caption",
              "python": platform.python_version(),
              "command": "python benchmarks/eval_phrases.py" + (" --raw" if args.raw else "") + (" --no-ner" if args.no_ner else "")
                          + (" --no-frame" if args.no_frame else ""),
              "sets": {}}
    for name in args.sets:
        fig, errors = evaluate(extractor, read_rows(DATA / SETS[name]), raw=args.raw)
        report["sets"][name] = {"file": f"tests/grounding/data/{SETS[name]}", **fig}
        print(f"{name:14s} n={fig['captions']:4d}  P {fig['precision']:.3f}  R {fig['recall']:.3f}")
        for kind, kf in fig.get("by_kind", {}).items():
            print(f"    {kind:10s} n={kf['captions']:3d}  P {kf['precision']:.3f}  R {kf['recall']:.3f}")
        if args.show_errors is not None and name in args.show_errors:
            for e in errors:
                print("   ", json.dumps(e, ensure_ascii=False))
    if args.out and args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
