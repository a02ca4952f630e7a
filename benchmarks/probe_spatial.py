"""Diagnosis for the generalisation tier: is *where* the object is present in the image tokens?

Ridge probes from (a) raw pixels, (b) the vision tower's patch features (second-to-last layer, CLS
dropped: what the LM sees before the adapter), (c) the adapter's output, to the box centre of the
only object of one-object synthetic images; fit on training images, scored (R^2 of cx and cy,
Pearson r) on held-out ones. A checkpoint's trained tower is compared with the same config at init.

    .venv/bin/python benchmarks/probe_spatial.py --checkpoint /tmp/lg6/visual_expert-stage1 \\
        --train /tmp/lg6/single --heldout /tmp/lg6/heldout_single
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def main(argv=None) -> dict:
    from model.cogvlm import VisualExpertConfig, VisualExpertForCausalLM
    from model.train import load_model_from_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train = shard_examples([args.train], limit=args.n_train)
    held = shard_examples([args.heldout])
    trained, info = load_model_from_checkpoint(args.checkpoint)
    state = json.loads((Path(info["path"]) / "trainer_state.json").read_text())
    fresh = VisualExpertForCausalLM.from_config(VisualExpertConfig(**state["model_config"])).eval()
    result = {"checkpoint": info, "n_train": len(train), "n_heldout": len(held),
              "trained": probe(trained, train, held), "init": probe(fresh, train, held)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
