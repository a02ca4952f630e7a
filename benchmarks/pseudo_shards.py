"""Pseudo-label shards for the learning proof: the real pipeline boxes the proof's own training images.

    python benchmarks/pseudo_shards.py --seeds 0 1 2 --train-images 4000 --out-root /tmp/pseudo_shards

Per seed ``s`` it rebuilds the world the generalisation proof trains stage two on
(``make_world(N, seed=learnlib.world_seed(s, "train", "multi"), min_objects=2, max_objects=4)``: the same
images, captions and keys as ``learnlib.write_world_split``'s truth shards), serves it on 127.0.0.1 as a
LAION-style Parquet, and runs the real job on it (``pipeline/build_grounding.py``: embedded Ray,
img2dataset, spaCy phrases, ``assets/demo_detector`` at its documented thresholds, >= 2 boxes per kept
image) into ``OUT_ROOT/s<seed>`` (shards in ``OUT_ROOT/s<seed>/shards``; written under a temporary name, renamed when complete). Then it checks
that every kept image is the world's image (same key, same size, pixels within JPEG re-encoding noise),
that the shards load with :mod:`model.data`, and audits the pseudo-boxes against the world's truth
(:func:`grounding.audit.audit`). ``learn_generalise.py --train-shards OUT_ROOT/s<seed>/shards`` trains on them.

Writes ``benchmarks/results/pseudo_shards.json``: per seed the input and kept images, the >= 2-box
share, QA pairs, the audit (recall@1, precision / recall at IoU 0.5 at the job's threshold), wall time;
the command, machine and load.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import learnlib  # noqa: E402

# the pixels of a kept image may differ from the world's JPEG by re-encoding only (img2dataset
# decodes and encodes again at quality 95): mean absolute difference per channel, 0..255
MAX_PIXEL_DIFF = 2.0


def world_for(seed: int, n_images: int) -> list:
    """The proof's ``train_multi`` world of ``seed`` (see ``learnlib.write_world_split``)."""
    from grounding.world import make_world

    return make_world(n_images, seed=learnlib.world_seed(seed, "train", "multi"), min_objects=2, max_objects=4)


def check_images(shards: str, world: list) -> dict:
    """Every shard row is a world image: known key, same size, pixels equal up to JPEG re-encoding."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from model.data import resolve_shards

    by_key = {im.key: im for im in world}
    n, worst, diffs = 0, 0.0, []
    for path in resolve_shards([shards]):
        for row in pq.read_table(path, columns=["key", "image", "width", "height"]).to_pylist():
            im = by_key.get(row["key"])
            if im is None:
                raise ValueError(f"{path}: key {row['key']!r} is not an image of the world")
            got = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), dtype=np.float32)
            want = np.asarray(Image.open(io.BytesIO(im.jpeg())).convert("RGB"), dtype=np.float32)
            if got.shape != want.shape or (row["width"], row["height"]) != (im.width, im.height):
                raise ValueError(f"key {row['key']}: shard image {got.shape[1]}x{got.shape[0]} "
                                 f"(row {row['width']}x{row['height']}), world {im.width}x{im.height}")
            d = float(np.abs(got - want).mean())
            if d > MAX_PIXEL_DIFF:
                raise ValueError(f"key {row['key']}: pixels differ from the world's by {d:.2f} on average")
            worst, n = max(worst, d), n + 1
            diffs.append(d)
    sizes = sorted({(im.width, im.height) for im in world})
    return {"rows": n, "mean_abs_pixel_diff_max": round(worst, 3),
            "mean_abs_pixel_diff_mean": round(sum(diffs) / len(diffs), 3) if diffs else None,
            "image_sizes_px": {"min_side": min(min(s) for s in sizes), "max_side": max(max(s) for s in sizes)}}


def load_check(shards: str) -> dict:
    """The shards read the way the trainer and the proof read them (:mod:`model.data`, schema checked)."""
    from collections import Counter

    from model.data import READ_COLUMNS, read_row_group, resolve_shards, row_group_sizes
    from model.evaluate import shard_examples

    paths = resolve_shards([shards])
    rows = qa = 0
    for p in paths:
        for g in range(len(row_group_sizes(p))):
            for row in read_row_group(p, g, READ_COLUMNS):
                rows += 1
                qa += len(row["qa"] or [])
    skipped: Counter = Counter()
    rec = shard_examples([shards], skipped=skipped)
    return {"files": len(paths), "rows": rows, "qa_pairs": qa, "rec_pairs": len(rec), "skipped": dict(skipped)}


def check_disjoint_from_proof(shards: str, seed: int, dev_images: int = 100, test_images: int = 100) -> bool:
    """``learnlib.check_disjoint`` over these shards as ``train_multi`` and the proof's dev / test worlds
    (keys made the same way as the proof's, without writing its folders)."""
    from grounding.world import make_world

    keys = learnlib.shard_keys(shards)
    for split, n in (("dev", dev_images), ("test", test_images)):
        for objs in ("one", "multi"):
            held = {im.key for im in make_world(n, seed=learnlib.world_seed(seed, split, objs))}
            if keys & held:
                raise ValueError(f"seed {seed}: {len(keys & held)} pseudo-shard keys are in {split}_{objs}")
    return True


def build_seed(seed: int, n_images: int, out_root: str | os.PathLike, work_root: str | os.PathLike,
               model: str | None = None, shard_rows: int = 250, extra_args: list[str] | None = None) -> dict:
    """Pseudo-label shards of seed ``seed``'s ``train_multi`` world in ``out_root/s<seed>``; returns its figures.

    Skips the job when ``out_root/s<seed>`` exists (complete: it is renamed into place only at the end).
    """
    from grounding.audit import audit
    from grounding.world import WorldServer, write_world
    from pipeline.build_grounding import main as build
    from pipeline.sample import DEMO_THRESHOLD, demo_detector

    det = demo_detector()
    model = model or det.model
    out = Path(out_root) / f"s{seed}"
    work = Path(work_root) / f"s{seed}"
    world = world_for(seed, n_images)
    t0 = time.time()
    ran = not out.exists()
    if ran:
        tmp = Path(out_root) / f".s{seed}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        with WorldServer(work / "world") as server:
            files = write_world(work / "world", world, base_url=server.base_url)
            argv = ["--input", str(files.parquet), "--output", str(tmp), "--shard-rows", str(shard_rows),
                    "--allow-host", "127.0.0.1", "--download-threads", "16",
                    "--detector", "transformers", "--detector-model", str(model),
                    "--detector-box-threshold", str(DEMO_THRESHOLD), "--detector-text-threshold", str(DEMO_THRESHOLD),
                    *(extra_args or [])]
            rc = build(argv)
        if rc != 0:
            raise RuntimeError(f"seed {seed}: the job exited {rc}; see {tmp}")
        job = {"job_argv": argv, "job_rc": rc, "job_wall_seconds": round(time.time() - t0, 1),
               "job_date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "job_load_average_after": [round(x, 2) for x in os.getloadavg()]}
        (tmp / "pseudo_job.json").write_text(json.dumps(job, indent=1))  # kept with the folder: a rerun reports it
        tmp.rename(out)
    else:
        files = write_world(work / "world", world)  # COCO + refs for the audit (images are rewritten only if absent)
    job = json.loads((out / "pseudo_job.json").read_text())
    run = json.loads((out / "run_report.json").read_text())
    if run["counts"]["input"] != n_images:
        raise ValueError(f"{out} was built from {run['counts']['input']} images, not {n_images}: remove it to rebuild")
    shards = str(out / "shards")  # the job's grounding shards (its other folders: downloads, rejects, dedup)
    images = check_images(shards, world)
    loaded = load_check(shards)
    report = audit(shards, str(files.coco), str(files.refs), png=str(work / "calibration.png"))
    wall = time.time() - t0
    # the labels the proof trains on: phrases with a human box that the shards box (a miss has no score)
    labelled = [p for p in report["per_phrase"] if p["score"] is not None]
    right = sum(p["top1_iou"] >= report["iou"] for p in labelled)
    at_job = next(r for r in report["by_threshold"] if abs(r["threshold"] - DEMO_THRESHOLD) < 1e-6)
    return {
        "seed": seed, "world_seed": learnlib.world_seed(seed, "train", "multi"), "shards": shards,
        "job_ran_now": ran, "job_seconds": run["timings_seconds"]["total"],
        "job_rows_per_second": run["throughput"]["job_rows_per_second"],
        "wall_seconds_this_call": round(wall, 1), **job,
        "input_images": n_images, "world_objects": sum(len(im.objects) for im in world),
        "counts": run["counts"], "kept_images": run["counts"]["kept"],
        "kept_with_2plus_boxes_share": run["kept_with_2plus_boxes_share"],
        "qa_pairs": loaded["qa_pairs"], "rec_pairs": loaded["rec_pairs"], "shard_files": loaded["files"],
        "load_skipped": loaded["skipped"], "keys_disjoint_from_dev_test": check_disjoint_from_proof(shards, seed),
        "images_match_world": images,
        "audit": {"detector_threshold": DEMO_THRESHOLD, "iou": report["iou"], "recall_at_1": report["recall_at_1"],
                  "precision": at_job["precision"], "recall": at_job["recall"], "boxes": at_job["boxes"],
                  "true_boxes": report["true_boxes"], "phrases": report["phrases"],
                  "top1_iou": report["top1_iou"], "counts": report["counts"],
                  "threshold_for_precision_0.9": report["threshold_for_target"],
                  "boxed_phrases_with_truth": len(labelled),
                  "boxed_phrases_best_box_right": right,
                  "boxed_phrases_best_box_right_share": round(right / len(labelled), 4) if labelled else None},
    }


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-images", type=int, default=4000, help="as learn_generalise.py's --train-images")
    ap.add_argument("--out-root", default="/tmp/pseudo_shards", help="shards go to OUT_ROOT/s<seed>")
    ap.add_argument("--work", default="/tmp/pseudo_shards_work", help="served world images, COCO, refs")
    ap.add_argument("--model", default=None, help="detector folder (default: assets/demo_detector)")
    ap.add_argument("--json", default=str(learnlib.RESULTS / "pseudo_shards.json"))
    args = ap.parse_args(argv)
    conditions = learnlib.run_conditions("pseudo_shards.py", argv)
    seeds = []
    for s in args.seeds:
        r = build_seed(s, args.train_images, args.out_root, args.work, model=args.model)
        r["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        seeds.append(r)
        print(json.dumps({k: r[k] for k in ("seed", "shards", "job_seconds", "kept_images", "qa_pairs")}
                         | {"recall_at_1": r["audit"]["recall_at_1"]}), flush=True)
        result = {**conditions, "train_shards_template": str(Path(args.out_root) / "s{seed}" / "shards"),
                  "seeds": seeds, "note": "one job per seed, run one after another on a 2-core machine shared with "
                  "other jobs (see the load averages); the audit's recall is over kept images' objects"}
        learnlib.write_json(args.json, result)  # after every seed: a finished seed is reported even if a later one fails
    return result


if __name__ == "__main__":
    main()
