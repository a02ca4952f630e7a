"""Diagnosis for the generalisation tier: is *where* the object is present in the image tokens?

Ridge probes from (a) raw pixels, (b) the vision tower's patch features (second-to-last layer, CLS
dropped: what the LM sees before the adapter), (c) the adapter's output, to the box centre of the
only object of one-object synthetic images; fit on training images, scored (R^2 of cx and cy,
Pearson r) on held-out ones. A checkpoint's trained tower is compared with the same config at init.

    python benchmarks/probe_spatial.py --towers --lm LM_DIR --train ONE_OBJECT_SHARDS --heldout ONE_OBJECT_SHARDS \\
        [--checkpoint RUN/stage1 ...]

Writes ``benchmarks/results/probe_spatial.json`` (``--out``) with the run conditions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from model.evaluate import shard_examples  # noqa: E402


def centres(examples) -> torch.Tensor:  # (n, 2) in 0..1
    return torch.tensor([[(e.boxes[0][0] + e.boxes[0][2]) / 2000, (e.boxes[0][1] + e.boxes[0][3]) / 2000]
                         for e in examples])


@torch.no_grad()
def features(model, examples, batch: int = 64) -> dict[str, torch.Tensor]:
    """Flattened features (the probe knows each token's slot) and, per image, the one token of the
    patch under the object's centre (``*_token``: what the LM can use, since all image tokens share
    one position id and attention is blind to their order)."""
    out = {"pixels": [], "tower": [], "adapter": [], "tower_token": [], "adapter_token": []}
    grid = model.vision.image_size // model.vision.patch_size
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        px = model.preprocess([e.load_image() for e in chunk])
        tw = model.vision(px)  # (B, N, Dv)
        ad = model.adapter(tw)  # (B, N, D)
        c = centres(chunk)
        idx = (c[:, 1] * grid).long().clamp(max=grid - 1) * grid + (c[:, 0] * grid).long().clamp(max=grid - 1)
        rows = torch.arange(len(chunk))
        out["pixels"].append(px.flatten(1))
        out["tower"].append(tw.flatten(1))
        out["adapter"].append(ad.flatten(1))
        out["tower_token"].append(tw[rows, idx])
        out["adapter_token"].append(ad[rows, idx])
    return {k: torch.cat(v) for k, v in out.items()}


def ridge_score(xtr, ytr, xte, yte, lam: float) -> dict:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ym = ytr.mean(0)
    a = xtr.T @ xtr + lam * torch.eye(xtr.shape[1])
    w = torch.linalg.solve(a, xtr.T @ (ytr - ym))
    pred = xte @ w + ym
    r2 = 1 - ((pred - yte) ** 2).sum(0) / ((yte - yte.mean(0)) ** 2).sum(0)
    r = [float(torch.corrcoef(torch.stack([pred[:, j], yte[:, j]]))[0, 1]) for j in range(2)]
    return {"r2_cx": round(float(r2[0]), 3), "r2_cy": round(float(r2[1]), 3), "r_cx": round(r[0], 3), "r_cy": round(r[1], 3)}


def probe(model, train, held) -> dict:
    ftr, fte = features(model, train), features(model, held)
    ytr, yte = centres(train), centres(held)
    res = {}
    for k in ftr:
        best = max((ridge_score(ftr[k].double(), ytr.double(), fte[k].double(), yte.double(), lam) | {"lambda": lam}
                    for lam in (1.0, 10.0, 100.0, 1000.0)), key=lambda d: d["r2_cx"] + d["r2_cy"])
        res[k] = best
    return res


def make_towers(root: Path, image_size: int, patch_size: int, hidden: int, layers: int, seed: int) -> dict[str, str]:
    """The two towers the proofs compare, written once: a random tiny CLIP as initialised, and the same with
    2-D sin/cos position embeddings at unit scale (what learn_generalise.py uses)."""
    import learnlib
    from learn_generalise import set_sincos_positions
    from model.testing import write_clip_vision

    out = {}
    for name in ("default", "sincos"):
        def build(tmp, name=name):
            write_clip_vision(tmp, image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                              num_layers=layers, seed=seed)
            if name == "sincos":
                set_sincos_positions(tmp / "model.safetensors", image_size // patch_size)
        out[name] = str(learnlib.build_once(root / f"vit-{image_size}p{patch_size}-{hidden}x{layers}-{name}-s{seed}", build))
    return out


def main(argv=None) -> dict:
    """Probe checkpoints (trained vs the same config at init) and/or fresh towers (``--towers``)."""
    import learnlib
    from model.cogvlm import VisualExpertConfig, VisualExpertForCausalLM
    from model.checkpoint import load_model_from_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="*", default=[], help="trained runs (their stage-1 folders)")
    p.add_argument("--towers", action="store_true", help="also probe a fresh default and a sin/cos tower at init")
    p.add_argument("--lm", help="the LM dir the fresh towers are paired with (their adapter is probed too)")
    p.add_argument("--train", required=True, help="one-object shards the probes are fit on")
    p.add_argument("--heldout", required=True, help="one-object shards they are scored on")
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--work", default="/tmp/probe_spatial")
    p.add_argument("--out", default=str(learnlib.RESULTS / "probe_spatial.json"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train = shard_examples([args.train], limit=args.n_train)
    held = shard_examples([args.heldout])
    result = {**learnlib.run_conditions("probe_spatial.py", argv), "n_train": len(train), "n_heldout": len(held),
              "what": "ridge probes (lambda picked among 1..1000) from image features to the centre of the only object; "
                      "r = Pearson r of predicted vs true centre x / y on held-out one-object images. pixels / tower / "
                      "adapter see all tokens flattened (they know each token's slot); *_token see only the token "
                      "under the object's centre: what the LM can use, since all image tokens share one rope position.",
              "checkpoints": {}, "towers_at_init": {}}
    for ck in args.checkpoint:
        trained, info = load_model_from_checkpoint(ck)
        state = json.loads((Path(info["path"]) / "trainer_state.json").read_text())
        fresh = VisualExpertForCausalLM.from_config(VisualExpertConfig(**state["model_config"])).eval()
        result["checkpoints"][ck] = {"checkpoint": info, "model_config": state["model_config"],
                                     "trained": probe(trained, train, held), "init": probe(fresh, train, held)}
    if args.towers:
        if not args.lm:
            p.error("--towers needs --lm")
        towers = make_towers(Path(args.work), args.image_size, args.patch_size, args.vision_hidden, args.vision_layers,
                             args.seed)
        for name, tower in towers.items():
            model = VisualExpertForCausalLM.from_config(VisualExpertConfig(lm=args.lm, vision=tower, seed=args.seed)).eval()
            result["towers_at_init"][name] = probe(model, train, held)
    learnlib.write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
