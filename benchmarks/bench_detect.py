"""Detector throughput: images/s of GroundingDINO-T (default shape) at batch 1 vs larger batches.

No weights can be downloaded here, so the model is the default ``GroundingDinoConfig`` (Swin-T +
BERT-base, ~172 M parameters) with random init, saved with ``save_pretrained`` and loaded through
``BoxDetector`` like real weights: the forward cost is the same as the released checkpoint's.
Every batch size runs on the same images in one process, interleaved over ``--repeats`` rounds
(order reversed every other round; the best round counts), so the ratios are measured side by side. Speed depends on the resize (``--shortest-edge``,
default 800 as GroundingDINO): a 2-core CPU takes ~10 s per image at 800.

    python benchmarks/bench_detect.py                          # default shape, CPU, batch 1/2/4
    python benchmarks/bench_detect.py --shortest-edge 480 --longest-edge 800 --batch-sizes 1 2 4 8
    python benchmarks/bench_detect.py --device cuda --dtypes fp32 bf16 --batch-sizes 1 8 32 --images 64
    python benchmarks/bench_detect.py --tiny                   # seconds: the tiny test model
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from grounding.detect import (BoxDetector, DetectorConfig, resolve_device, save_tiny_detector,
                              save_tokenizer_and_processor)
from grounding.world import make_world

RESULTS = Path(__file__).parent / "results" / "detect.json"


def save_default_detector(path: str, seed: int = 0) -> str:
    """Random-init GroundingDINO-T (default GroundingDinoConfig) + the offline tokenizer, saved."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    save_tokenizer_and_processor(path)  # 800 / 1333, GroundingDINO's resize
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4, help="images per timed round (a multiple of every batch size)")
    ap.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dtypes", nargs="+", default=["auto"], help="fp32 / bf16 / fp16 (GPU) or auto")
    ap.add_argument("--shortest-edge", type=int, default=None)
    ap.add_argument("--longest-edge", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="a saved model dir (default: random-init GroundingDINO-T)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model instead (a smoke run)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)

    world = make_world(args.images, seed=11, size=tuple(args.image_size))
    images = [im.render() for im in world]
    phrases = [[o.phrase for o in im.objects] + [f"{im.background} background"] for im in world]
    device = resolve_device(args.device)
    load_avg = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = args.model or (save_tiny_detector(tmp) if args.tiny else save_default_detector(tmp))
        save_s = time.perf_counter() - t0
        detectors = {}
        for dtype in args.dtypes:
            for bs in args.batch_sizes:
                t0 = time.perf_counter()
                detectors[dtype, bs] = BoxDetector(DetectorConfig(
                    model=model, batch_size=bs, device=device, dtype=dtype,
                    shortest_edge=args.shortest_edge, longest_edge=args.longest_edge))
                load_s = time.perf_counter() - t0
        params = sum(p.numel() for p in next(iter(detectors.values())).model.model.parameters())
        first = next(iter(detectors.values()))
        first(images[:1], phrases[:1])  # warm-up (allocator, lazy init)
        seconds: dict[tuple[str, int], list[float]] = {k: [] for k in detectors}
        for round_ in range(args.repeats):
            # alternate the order every round, so a drifting machine load favours no batch size
            for key, det in (list(detectors.items()) if round_ % 2 == 0 else list(detectors.items())[::-1]):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for s in range(0, len(images), key[1]):
                    det(images[s:s + key[1]], phrases[s:s + key[1]])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[key].append(time.perf_counter() - t0)
                print(f"{key[0]:>5} batch {key[1]:>3}: {len(images) / seconds[key][-1]:.3f} images/s", flush=True)
    rows = []
    for (dtype, bs), times in seconds.items():
        best = min(times)
        rows.append({"dtype": dtype, "batch_size": bs, "images_per_s": round(len(images) / best, 4),
                     "s_per_image": round(best / len(images), 3), "rounds_s": [round(t, 3) for t in times]})
    by_dtype = {}
    for dtype in args.dtypes:
        mine = [r for r in rows if r["dtype"] == dtype]
        one = next((r for r in mine if r["batch_size"] == 1), None)
        top = max(mine, key=lambda r: r["images_per_s"])
        by_dtype[dtype] = {"batch1_images_per_s": one and one["images_per_s"], "best_batch_size": top["batch_size"],
                           "best_images_per_s": top["images_per_s"],
                           "best_over_batch1": one and round(top["images_per_s"] / one["images_per_s"], 3)}
    report = {
        "benchmark": "detect", "model": "tiny test model" if args.tiny else (args.model or "GroundingDINO-T (default GroundingDinoConfig, random init)"),
        "parameters": params, "device": device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "images": len(images), "image_size": list(args.image_size),
        "resize": {"shortest_edge": args.shortest_edge or 800, "longest_edge": args.longest_edge or 1333},
        "phrases_per_image": [len(p) for p in phrases], "repeats": args.repeats,
        "save_s": round(save_s, 2), "load_s": round(load_s, 2), "load_average_at_start": [round(v, 2) for v in load_avg],
        "results": rows, "summary": by_dtype,
        "gpu": "not measured: no GPU on this machine" if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "note": args.note, "command": "python benchmarks/bench_detect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else {}
    runs = runs if isinstance(runs, dict) and "runs" in runs else {"runs": []}
    runs["runs"] = [r for r in runs["runs"] if r.get("command") != report["command"]] + [report]
    out.write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps(by_dtype, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
