"""Perceptual-hash separation and the cost of the partitioned duplicate decision.

- ``separation``: phash Hamming distances between synthetic-world images (320x240) and their
  resized, re-encoded copies (scales 0.5 / 0.73 / 1.5, JPEG quality 60 / 40 / 90), against the
  distances between distinct images, for ``hash_size`` 8 (64 bits) and 16 (256 bits).
- ``partitions``: for ``--n`` records of uniformly random hashes (the best case for band
  partitions; real phash bits are less even), the partitions :func:`grounding.dedup.partition_stats`
  makes and the pair comparisons they cost, per config, against the multi-index estimate
  ``b * n / 2**w`` comparisons per row; and the in-process :func:`find_duplicates` time.
- ``hash_rate``: images hashed per second (sha256 + phash, 320x240 JPEG), median of 3 repeats.

Run: ``.venv/bin/python benchmarks/bench_dedup.py [--images 40] [--n 20000] [--out benchmarks/results/dedup.json]``
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from grounding.dedup import DedupConfig, find_duplicates, hamming, hash_record, laion, order_of, partition_stats  # noqa: E402
from grounding.world import make_world  # noqa: E402

VARIANTS = ((0.5, 60), (0.73, 40), (1.5, 90))


def _jpeg(im: Image.Image, scale: float = 1.0, quality: int = 95) -> bytes:
    if scale != 1.0:
        im = im.resize((int(im.width * scale), int(im.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def separation(pictures: list[Image.Image]) -> dict:
    out = {}
    for cfg in (DedupConfig(), laion()):
        orig = [hash_record(0, i, str(i), _jpeg(p), cfg)["phash"] for i, p in enumerate(pictures)]
        copies = [hamming(h, hash_record(0, 0, "c", _jpeg(p, s, q), cfg)["phash"])
                  for h, p in zip(orig, pictures) for s, q in VARIANTS]
        distinct = [hamming(a, b) for a, b in itertools.combinations(orig, 2)]
        out[f"bits_{cfg.bits}"] = {
            "threshold": cfg.threshold, "copies_max": max(copies), "copies_mean": statistics.mean(copies),
            "distinct_min": min(distinct), "distinct_p01": sorted(distinct)[len(distinct) // 100],
            "copies_within_threshold": sum(d <= cfg.threshold for d in copies) / len(copies),
            "distinct_within_threshold": sum(d <= cfg.threshold for d in distinct), "pairs": len(distinct)}
    return out


def partitions(n: int) -> dict:
    out = {}
    for name, cfg in (("default", DedupConfig()), ("laion", laion())):
        rng = random.Random(0)
        records = [{"order": order_of(0, i), "key": str(i), "sha256": f"{rng.getrandbits(256):064x}",
                    "phash": f"{rng.getrandbits(cfg.bits):0{cfg.bits // 4}x}"} for i in range(n)]
        stats = partition_stats(records, cfg)
        t0 = time.perf_counter()
        dropped = find_duplicates(records, cfg)
        seconds = time.perf_counter() - t0
        b = len(cfg.bands)
        estimate = sum(n * n / 2 / 2 ** w for _, w in cfg.bands)  # pairs sharing a band, summed over bands
        out[name] = {**stats, "config": {"hash_size": cfg.hash_size, "threshold": cfg.threshold, "bands": b},
                     "n": n, "estimated_comparisons": round(estimate), "comparisons_per_row": stats["near_comparisons"] / n,
                     "dropped_random": len(dropped), "find_duplicates_s": round(seconds, 3)}
    return out


def hash_rate(pictures: list[Image.Image], repeats: int = 3) -> dict:
    blobs = [_jpeg(p) for p in pictures]
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, b in enumerate(blobs):
            hash_record(0, i, str(i), b)
        rates.append(len(blobs) / (time.perf_counter() - t0))
    return {"images_per_s_median": round(statistics.median(rates), 1), "min": round(min(rates), 1),
            "max": round(max(rates), 1), "repeats": repeats, "images": len(blobs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dedup.json"))
    args = ap.parse_args(argv)
    pictures = [im.render() for im in make_world(args.images, seed=1, size=(320, 240))]
    result = {"separation": separation(pictures), "partitions": partitions(args.n), "hash_rate": hash_rate(pictures),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
              "note": "shared 2-core machine under other engineers' load: timings are noisy",
              "command": "python benchmarks/bench_dedup.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
