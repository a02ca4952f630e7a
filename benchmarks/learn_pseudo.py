"""The pseudo-label tax: REC learned from the pipeline's own shards vs from truth boxes, same budget.

Issue 13, item 4. The truth arm is the generalisation proof itself (``learn_generalise.json``: per seed,
stage one on one-object truth, stage two on the world's truth boxes). The pseudo arm repeats it with the
**same config read from that JSON** (seeds, steps, learning rate, model sizes, splits, the same pretrained
LM and tower), changing one thing: stage two trains on the shards that the real pipeline wrote for the
same training images with the trained demo detector (``benchmarks/pseudo_shards.py``: img2dataset,
spaCy phrases, GroundingDINO boxes, the >= 2-box filter). Both arms are scored on the same dev and test
splits of human (world) truth.

    python benchmarks/pseudo_shards.py --seeds 0 1 2 --train-images 4000 --out-root /tmp/pseudo_shards   # once
    python benchmarks/learn_pseudo.py --truth benchmarks/results/learn_truth_unfrozen.json \
        --train-shards '/tmp/pseudo_shards/s{seed}/shards'

Writes ``benchmarks/results/learn_pseudo.json``: per seed the truth-trained and pseudo-trained test
Acc@0.5 (visual expert), their mean and spread, and the ratio pseudo / truth (target >= 0.9).

Stage one (one-object images) is truth in both arms: the pipeline's >= 2-box filter drops one-object
images by design, so it cannot make that data; the comparison is about the grounding data of stage two.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learnlib  # noqa: E402

# learn_generalise flags taken from the truth arm's recorded config (argparse dest -> flag)
SHARED = ("seeds", "jobs", "train_images", "dev_images", "test_images", "pretrain_steps", "pretrain_lr", "pretrain_lookup",
          "freeze_lm", "freeze_vision", "stage1_steps", "stage2_steps", "batch_size", "lr", "caption_weight",
          "qa_per_image", "max_length", "image_size", "patch_size", "lm_hidden", "lm_layers", "vision_hidden",
          "vision_layers", "sincos_positions", "eval_every", "dev_eval_limit", "threads", "device", "work")


def pseudo_argv(config: dict, train_shards: str, out: str) -> list[str]:
    """learn_generalise's command line for the pseudo arm: the truth arm's config, the visual expert only,
    stage two on ``train_shards``."""
    argv = []
    for key in SHARED:
        value = config[key]
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, bool):
            argv += [flag, str(value).lower()]
        else:
            argv += [flag, str(value)]
    return argv + ["--variants", "visual_expert", "--train-shards", train_shards, "--out", out]


def tax(truth: dict, pseudo: dict) -> dict:
    """Per-seed test (and dev) Acc@0.5 of both arms, mean/spread, and pseudo / truth."""
    def by_seed(result: dict, split: str) -> dict[int, float]:
        return {r["seed"]: r[split]["acc@0.5"] for r in result["runs"] if r["variant"] == "visual_expert"}

    out = {}
    for split in ("dev", "test"):
        t, p = by_seed(truth, split), by_seed(pseudo, split)
        seeds = sorted(set(t) & set(p))
        ratio = (sum(p[s] for s in seeds) / sum(t[s] for s in seeds)) if seeds and sum(t[s] for s in seeds) else None
        out[split] = {"seeds": seeds, "truth_trained": learnlib.spread([t[s] for s in seeds]),
                      "pseudo_trained": learnlib.spread([p[s] for s in seeds]),
                      "pseudo_over_truth": None if ratio is None else round(ratio, 4),
                      "per_seed_ratio": {str(s): (round(p[s] / t[s], 4) if t[s] else None) for s in seeds}}
    out["target"] = {"pseudo_over_truth_test_ge_0.9": bool(out["test"]["pseudo_over_truth"] is not None
                                                           and out["test"]["pseudo_over_truth"] >= 0.9)}
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--truth", default=str(learnlib.RESULTS / "learn_generalise.json"),
                    help="the truth arm: a learn_generalise.py result (its config is reused)")
    ap.add_argument("--train-shards", required=True, help="pseudo-label shards, '{seed}' replaced by the seed")
    ap.add_argument("--out", default=str(learnlib.RESULTS / "learn_pseudo.json"))
    ap.add_argument("--arm-out", default=None, help="the pseudo arm's own learn_generalise JSON "
                                                     "(default: <out stem>_arm.json beside --out)")
    ap.add_argument("--from-tasks", metavar="RUN_ID", help="collect an interrupted pseudo arm (see learn_generalise)")
    args = ap.parse_args(argv)

    import learn_generalise

    truth = json.loads(Path(args.truth).read_text())
    arm_out = args.arm_out or str(Path(args.out).with_name(Path(args.out).stem + "_arm.json"))
    conditions = learnlib.run_conditions("learn_pseudo.py", argv)
    arm_argv = pseudo_argv(truth["config"], args.train_shards, arm_out)
    if args.from_tasks:
        arm_argv += ["--from-tasks", args.from_tasks]
    pseudo = learn_generalise.main(arm_argv)
    result = {"tier": "pseudo_label_tax", **conditions, "truth_json": str(args.truth),
              "truth_command": truth.get("command"), "truth_git": truth.get("git"),
              "pseudo_arm_json": arm_out, "pseudo_arm_command": "python benchmarks/learn_generalise.py " + " ".join(arm_argv),
              "train_shards": args.train_shards, "summary": tax(truth, pseudo),
              "baselines": pseudo["baselines"],
              "note": "Same config, seeds, splits, pretrained LM and tower in both arms; only stage two's training "
                      "shards differ (world truth vs the pipeline's pseudo-labels of the same images). Scored on "
                      "world truth. Stage one (one-object truth) is shared: the >= 2-box filter makes no one-object data."}
    learnlib.write_json(args.out, result)
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
