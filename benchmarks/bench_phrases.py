"""Phrase extraction throughput on 10,000 LAION-like captions: per-caption ``nlp(text)`` vs batched.

Modes, measured side by side in one run on the same captions:

- ``naive_per_caption``: what a notebook does: the full pipeline (NER included), one ``nlp(text)``
  per caption, then ``doc.noun_chunks`` (no cleaning, no filtering, no expressions);
- ``per_caption``: :meth:`PhraseExtractor.one`, the full extraction with one ``nlp(text)`` call a
  caption (same components, same filters as the batched path: only batching differs);
- ``batched``: :meth:`PhraseExtractor.__call__`, one ``nlp.pipe`` pass (``batch_size``);
- ``batched_n_process_2``: the same with two worker processes (needs two idle cores to pay).

Run: ``.venv/bin/python benchmarks/bench_phrases.py [--n 10000] [--out benchmarks/results/phrases.json]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grounding.phrases import PhraseConfig, PhraseExtractor  # noqa: E402

PEOPLE = ["young woman", "man", "little girl", "boy", "senior couple", "businessman", "chef", "nurse", "bride",
          "teenager", "family", "group of friends", "doctor", "woman", "construction worker", "student"]
ANIMALS = ["golden retriever puppy", "cat", "horse", "red fox", "parrot", "elephant", "dog", "cow", "squirrel",
           "lion", "owl", "two ducks", "kitten", "zebra", "bee"]
OBJECTS = ["cup of coffee", "laptop", "red umbrella", "bicycle", "smartphone", "book", "guitar", "backpack",
           "wooden chair", "vase of flowers", "teddy bear", "basket of apples", "hat", "camera", "glass of wine",
           "ball", "kite", "lamp", "sofa", "car"]
PLACES = ["on the beach", "in a park", "in a modern kitchen", "on a wooden table", "in the snow", "at sunset",
          "in the office", "on a city street", "in a field of flowers", "on a white background", "in the forest",
          "next to a window", "in a cafe", "on the grass", "in a studio"]
VERBS = ["holding", "playing with", "looking at", "sitting next to", "carrying", "reading", "walking with",
         "riding", "eating", "standing near"]
PRODUCTS = ["Women's Summer Floral Maxi Dress with Pockets", "Men's Leather Wallet RFID Blocking Brown",
            "Stainless Steel Water Bottle 750ml", "Nike Air Max 90 Mens Running Shoes", "Ceramic Coffee Mug Set of 4",
            "Wireless Bluetooth Earbuds with Charging Case", "Vintage Wooden Rocking Chair", "Kids Toy Train Set"]
BOILER = ["stock photo", "Royalty Free Stock Photo", "free shipping", "Stock Photo - ", "| Shutterstock",
          "- Dreamstime", "vector illustration", "HD wallpaper", "Close-up of"]
NOISE = ["https://cdn.example.com/img/{n}.jpg", "IMG_{n}.JPG", "Frau mit Hund im Park", "東京タワーの夜景",
         "Happy Birthday! Best wishes", "Only ${n}.99 - 2 pack", "", "Salt &amp; pepper", "😀😀 so cute!!!"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """LAION-like captions: scenes, people, animals, products, boilerplate, lists and some junk."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        subj = rng.choice(PEOPLE + ANIMALS)
        if r < 0.35:
            c = f"{subj} {rng.choice(VERBS)} a {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        elif r < 0.5:
            objs = rng.sample(OBJECTS, rng.randint(2, 4))
            c = ", ".join(f"a {o}" for o in objs[:-1]) + f" and a {objs[-1]} {rng.choice(PLACES)}"
        elif r < 0.65:
            c = rng.choice(PRODUCTS) + rng.choice(["", " - Size 10", ", Free Shipping", " Black", " | eBay"])
        elif r < 0.85:
            b = rng.choice(BOILER)
            body = f"{subj} {rng.choice(PLACES)}"
            c = f"{b} {body}" if b.endswith(("-", "of")) else f"{body}, {b}"
        elif r < 0.95:
            c = f"{subj.capitalize()} {rng.choice(PLACES)}"
        else:
            c = rng.choice(NOISE).format(n=rng.randint(1, 99999))
        out.append(c[:1].upper() + c[1:])
    return out


def timed(fn, captions):
    t = time.perf_counter()
    results = fn(captions)
    return time.perf_counter() - t, results


def count_phrases(results) -> int:
    return sum(len(r.phrases) for r in results)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--skip-multiprocess", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "phrases.json"))
    args = ap.parse_args(argv)

    import spacy

    captions = make_captions(args.n)
    mean_len = sum(map(len, captions)) / len(captions)
    config = PhraseConfig(batch_size=args.batch_size)
    ex = PhraseExtractor(config)
    ex(captions[:200])  # warm up (first-call allocations)
    modes: dict[str, dict] = {}

    def record(name, seconds, n_phrases=None, **extra):
        modes[name] = {"seconds": round(seconds, 3), "captions_per_s": round(len(captions) / seconds, 1),
                       **({"phrases": n_phrases, "phrases_per_s": round(n_phrases / seconds, 1)}
                          if n_phrases is not None else {}), **extra}
        print(f"{name:>22}: {seconds:7.2f} s  {len(captions) / seconds:8.1f} captions/s"
              + (f"  {n_phrases / seconds:8.1f} phrases/s" if n_phrases is not None else ""), flush=True)

    # (a) per caption, same extraction
    s, res_one = timed(lambda cs: [ex.one(c) for c in cs], captions)
    record("per_caption", s, count_phrases(res_one), components=ex.nlp.pipe_names)
    # (b) batched
    s, res_batch = timed(ex, captions)
    record("batched", s, count_phrases(res_batch), batch_size=config.batch_size)
    same = [r.to_dict() for r in res_one] == [r.to_dict() for r in res_batch]
    # naive baseline: full pipeline, nlp(text) per caption, noun chunks only
    nlp_full = spacy.load(config.model)
    s, chunks = timed(lambda cs: [[c.text for c in nlp_full(t).noun_chunks] for t in cs], captions)
    record("naive_per_caption", s, sum(map(len, chunks)), components=nlp_full.pipe_names,
           note="full pipeline incl. NER, raw noun chunks: no cleaning, filtering or expressions")
    if not args.skip_multiprocess:
        ex2 = PhraseExtractor(PhraseConfig(batch_size=args.batch_size, n_process=2))
        s, res_mp = timed(ex2, captions)
        record("batched_n_process_2", s, count_phrases(res_mp), batch_size=args.batch_size, n_process=2,
               same_results_as_batched=[r.to_dict() for r in res_mp] == [r.to_dict() for r in res_batch])

    reasons: dict[str, int] = {}
    for r in res_batch:
        reasons[r.reason or "ok"] = reasons.get(r.reason or "ok", 0) + 1
    result = {
        "benchmark": "phrases",
        "captions": len(captions), "mean_caption_chars": round(mean_len, 1),
        "model": config.model, "spacy": spacy.__version__,
        "modes": modes,
        "speedup_batched_vs_per_caption": round(modes["per_caption"]["seconds"] / modes["batched"]["seconds"], 2),
        "speedup_batched_vs_naive_per_caption": round(modes["naive_per_caption"]["seconds"] / modes["batched"]["seconds"], 2),
        "batched_equals_per_caption": same,
        "phrases_per_caption": round(count_phrases(res_batch) / len(captions), 2),
        "chunks_per_caption": round(sum(p.kind == "chunk" for r in res_batch for p in r.phrases) / len(captions), 2),
        "reasons": reasons,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": "python benchmarks/bench_phrases.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": ("Measured on a shared 2-core machine while other engineers ran tests: absolute figures are noisy "
                 "(ratios are side by side in one run). n_process=2 only pays with two idle cores."),
    }
    for k in ("speedup_batched_vs_per_caption", "speedup_batched_vs_naive_per_caption", "batched_equals_per_caption"):
        print(f"{k}: {result[k]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)
    return result


if __name__ == "__main__":
    main()
