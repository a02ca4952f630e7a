"""Detector throughput: images/s of GroundingDINO-T (default shape) at batch 1 vs larger batches.

No weights can be downloaded here, so the model is the default ``GroundingDinoConfig`` (Swin-T +
BERT-base, ~172 M parameters) with random init, saved with ``save_pretrained`` and loaded through
``BoxDetector`` like real weights: the forward cost is the same as the released checkpoint's. Model
load is outside every timing. Each batch size is one side of the comparison: all sides box the same
images with the same phrases in one process, interleaved round by round (A/B/C, C/B/A, ...; see
``benchmarks/README.md``), after one untimed warm-up round. Ratios are taken round by round (the
sides of a round ran back to back) and reported as median and min-max; wall and process-CPU seconds
are both kept (with one torch thread, CPU seconds barely move with other jobs' load).

    python benchmarks/bench_detect.py             # full: 4 images, batch 1 vs 4, 2 rounds, 800 px (~6-14 min, 2 cores)
    python benchmarks/bench_detect.py --quick     # the same, 1 round (~3-7 min: GroundingDINO-T at 800 px on a CPU
                                                  #   cannot be timed in 2 min; the cost is one forward per image)
    python benchmarks/bench_detect.py --device cuda --dtypes fp32 bf16 --batch-sizes 1 8 32 --images 64 --threads 0
    python benchmarks/bench_detect.py --tiny      # seconds: the tiny test model (smoke run)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.measure import command, interleaved, load_now, machine, paired_ratios, spread, write_result  # noqa: E402
from grounding.detect import BoxDetector, DetectorConfig, resolve_device  # noqa: E402
from grounding.testing import save_tiny_detector, save_tokenizer_and_processor  # noqa: E402
from grounding.world import make_world  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "detect.json"
# Sized for the shared 2-core CPU, where one 800 px image takes 15-50 s at batch 1 (load-dependent).
FULL = dict(images=4, batch_sizes=[1, 4], rounds=2)
QUICK = dict(images=4, batch_sizes=[1, 4], rounds=1)


def save_default_detector(path: str, seed: int = 0) -> str:
    """Random-init GroundingDINO-T (default GroundingDinoConfig) + the offline tokenizer, saved."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    save_tokenizer_and_processor(path)  # 800 / 1333, GroundingDINO's resize
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(path)
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK} instead of {FULL} (same model and resize)")
    ap.add_argument("--images", type=int, default=None, help="images per side per round")
    ap.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--dtypes", nargs="+", default=["auto"], help="fp32 / bf16 / fp16 (GPU) or auto")
    ap.add_argument("--shortest-edge", type=int, default=None)
    ap.add_argument("--longest-edge", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="a saved model dir (default: random-init GroundingDINO-T)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model instead (a smoke run)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    mode = QUICK if args.quick else FULL
    n_images = args.images or mode["images"]
    batch_sizes = args.batch_sizes or mode["batch_sizes"]
    rounds = args.rounds or mode["rounds"]
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    world = make_world(n_images, seed=11, size=tuple(args.image_size))
    images = [im.render() for im in world]
    phrases = [[o.phrase for o in im.objects] + [f"{im.background} background"] for im in world]
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = args.model or (save_tiny_detector(tmp) if args.tiny else save_default_detector(tmp))
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        detectors = {dtype: BoxDetector(DetectorConfig(model=model, device=device, dtype=dtype,
                                                       shortest_edge=args.shortest_edge, longest_edge=args.longest_edge))
                     for dtype in args.dtypes}
        load_s = time.perf_counter() - t0
        params = sum(p.numel() for p in next(iter(detectors.values())).model.model.parameters())

        def side(dtype, bs):
            det = detectors[dtype]

            def run():
                det.config = replace(det.config, batch_size=bs)
                det(images, phrases)
            return run

        sides = {f"{dtype}_b{bs}": side(dtype, bs) for dtype in args.dtypes for bs in batch_sizes}
        for dtype, det in detectors.items():  # warm-up (allocator, lazy init), untimed
            det(images[:1], phrases[:1])
        timing = interleaved(sides, rounds=rounds, warmup=0, sync=sync,
                             on_round=lambda r, name, s: print(f"round {r} {name:>10}: {n_images / s:.3f} images/s",
                                                               flush=True))
    rows, ratios, headline = [], {}, {}
    for dtype in args.dtypes:
        base = f"{dtype}_b{batch_sizes[0]}"
        for bs in batch_sizes:
            name = f"{dtype}_b{bs}"
            wall = spread(timing["wall"][name])
            rows.append({"dtype": dtype, "batch_size": bs, "images_per_s_median": n_images / wall["median"],
                         "s_per_image": {k: wall[k] / n_images for k in ("median", "min", "max")},
                         "rounds_wall_s": timing["wall"][name], "rounds_cpu_s": timing["cpu"][name]})
            if name != base:
                key = f"{name}_over_{base}" if len(args.dtypes) > 1 else f"b{bs}_over_b{batch_sizes[0]}"
                # images/s ratio = base seconds / this side's seconds, round by round
                ratios[key] = {"wall": paired_ratios(timing["wall"][base], timing["wall"][name]),
                               "cpu": paired_ratios(timing["cpu"][base], timing["cpu"][name])}
                headline[key] = ratios[key]["wall"]["median"]
    report = {
        "benchmark": "detect", "mode": "quick" if args.quick else "full",
        "model": "tiny test model" if args.tiny else (args.model or "GroundingDINO-T (default GroundingDinoConfig, random init)"),
        "parameters": params, "device": device, "machine": info, "load_average_at_end": load_now(),
        "images": n_images, "image_size": list(args.image_size), "batch_sizes": batch_sizes, "rounds": rounds,
        "resize": {"shortest_edge": args.shortest_edge or 800, "longest_edge": args.longest_edge or 1333},
        "phrases_per_image": [len(p) for p in phrases], "order": timing["order"],
        "save_s": round(save_s, 2), "load_s": round(load_s, 2), "results": rows, "ratios": ratios,
        "what": "images/s of BoxDetector (preprocessing + forward + box selection) over the same images per side; "
                "ratio = images/s at the larger batch / at batch 1, round by round; model load excluded on every side",
        "note": args.note or ("2-core CPU shared with other engineers' jobs: see load averages; one torch thread so "
                              "that CPU seconds measure this process's work"),
        "command": command("benchmarks/bench_detect.py", argv),
    }
    stored = write_result(args.out, report, args.quick, headline)
    for r in rows:
        print(f"{r['dtype']:>5} batch {r['batch_size']:>3}: {r['images_per_s_median']:.3f} images/s (median of {rounds})")
    for k, v in ratios.items():
        print(f"{k}: {v['wall']['median']:.3f} (min {v['wall']['min']:.3f}, max {v['wall']['max']:.3f}); "
              f"CPU seconds {v['cpu']['median']:.3f}")
    if "quick_vs_full" in stored:
        print("quick vs full:", stored["quick_vs_full"])
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
