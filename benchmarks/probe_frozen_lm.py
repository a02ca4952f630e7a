"""Does a frozen text LM know, at its answer slots, which thing the question names?

With the LM frozen, a phrase can pick its object only through the attention that the answer positions
pay to image tokens, and their queries are frozen functions of the text. If the phrase is not readable
from the residual stream at the answer slots, no trainable image key can be matched to it: the frozen
LM cannot bind a phrase to an object, whatever the visual expert learns.

This probe reads the residual stream of a text-only LM (``LlamaForCausalLM``, no image) at the answer
digits of ``Question: Where is the {colour} {shape}? Answer: [[x0,y0,x1,y1]]`` texts (random boxes),
averaged over the digit slots, and fits a linear classifier of the phrase's colour per layer
(900 texts fit, 300 scored; chance 1/6). Layer 0 is the embeddings (the slot's own token, no phrase).

    python benchmarks/probe_frozen_lm.py --lm /tmp/lg/models/lm-128x2-pt1500-lr0.003-s1 \
        /tmp/lg/models/lm-128x2-pt3000-lr0.003-lk0.5-s1 ... \
        --steer-data /tmp/lg/data-s1/train_one-4000-w101001 --vit /tmp/lg/models/vit-32p4-64x3-sincos-s1

The LMs are the ones ``learn_generalise.py`` pretrains (the folder name says how: hidden x layers, heads,
steps, lr, ``lk`` lookup share, seed); each one's ``pretrain.json`` is copied into the result.
``--steer-data DIR --vit DIR`` adds a second measure per LM, **steerability**, over ``--steer-seeds``
initialisations: a visual-expert model with that LM frozen is fitted for 300 steps (batch 16, AdamW lr 5e-3)
to the REC pairs of 64 one-object images of DIR, and its loss on them is reported with the real images and
with the images shifted by one (each question paired with another image). A frozen LM that image tokens can steer shows a real-image loss well below the
shifted one; one that keeps its text prior shows both near the start.

Writes ``benchmarks/results/probe_frozen_lm.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import learnlib  # noqa: E402


@torch.no_grad()
def answer_slot_states(lm_dir: str, n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer, the (n, D) residual at the answer digits (mean over slots), and the colour labels."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from grounding.boxes import format_boxes, format_question
    from grounding.world import COLOURS, SHAPES

    tok = AutoTokenizer.from_pretrained(lm_dir)
    lm = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    rng = random.Random(seed)
    per_layer: list[list[torch.Tensor]] = []
    labels = []
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        boxes = format_boxes([[rng.randint(0, 999) for _ in range(4)]])
        ids = [tok.bos_token_id] + tok(f"{format_question(f'{colour} {shape}')} Answer: {boxes}",
                                       add_special_tokens=False)["input_ids"]
        n_answer = len(tok(boxes, add_special_tokens=False)["input_ids"])
        hidden = lm(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        if not per_layer:
            per_layer = [[] for _ in hidden]
        for i, h in enumerate(hidden):  # positions predicting the box tokens: the last n_answer - 1 + "[["
            per_layer[i].append(h[0, -n_answer:-1].mean(0))
        labels.append(list(COLOURS).index(colour))
    return [torch.stack(x) for x in per_layer], torch.tensor(labels)


def linear_probe(x: torch.Tensor, y: torch.Tensor, n_fit: int, seed: int) -> float:
    """Held-out accuracy of a softmax classifier fitted on the first ``n_fit`` rows (standardised)."""
    torch.manual_seed(seed)
    mu, sd = x[:n_fit].mean(0), x[:n_fit].std(0) + 1e-6
    z = (x - mu) / sd
    lin = torch.nn.Linear(z.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(400):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(z[:n_fit]), y[:n_fit]).backward()
        opt.step()
    with torch.no_grad():
        return round(float((lin(z[n_fit:]).argmax(1) == y[n_fit:]).float().mean()), 4)


def steerability(lm_dir: str, vit_dir: str, data_dir: str, steps: int = 300, lr: float = 5e-3, seed: int = 0) -> dict:
    """Fit a frozen-LM visual-expert model to 64 one-object REC pairs; loss with real vs shifted images."""
    import io

    from PIL import Image

    from grounding.boxes import format_answer
    from model.cogvlm import VisualExpertConfig, VisualExpertForCausalLM
    from model.data import collate, encode_qa
    from model.evaluate import shard_examples

    torch.manual_seed(seed)
    model = VisualExpertForCausalLM.from_config(VisualExpertConfig(lm=lm_dir, vision=vit_dir, freeze_lm=True,
                                                                   freeze_vision=True, seed=seed))
    tok = model.tokenizer
    examples = shard_examples([data_dir], limit=64)
    pixels = model.preprocess([Image.open(io.BytesIO(e.image_bytes)).convert("RGB") for e in examples])
    samples = []
    for e, px in zip(examples, pixels):
        ids, labels, _ = encode_qa(tok, e.question, format_answer([[round(v) for v in e.boxes[0]]]), 128)
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": px, "task": "rec", "key": e.key})
    batch = collate(samples, tok.pad_token_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def losses() -> tuple[float, float]:
        with torch.no_grad():
            return tuple(round(float(model(ids, mask, pixel_values=px, labels=labels).loss), 4)
                         for px in (pixels, pixels.roll(1, 0)))

    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start = losses()
    for _ in range(steps):
        pick = torch.randperm(len(samples))[:16]
        model(ids[pick], mask[pick], pixel_values=pixels[pick], labels=labels[pick]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    end = losses()
    return {"steps": steps, "lr": lr, "examples": len(samples), "loss_start": start[0],
            "loss_end_real_images": end[0], "loss_end_shifted_images": end[1],
            "real_below_shifted": round(end[1] - end[0], 4)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", nargs="+", required=True, help="pretrained LM folders (learn_generalise.py's models/lm-*)")
    p.add_argument("--texts", type=int, default=1200)
    p.add_argument("--fit", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steer-data", help="one-object shards folder (e.g. learn_generalise's data-s1/train_one-*)")
    p.add_argument("--steer-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="initialisations of the adapter and experts (and batch order) for the steerability fit")
    p.add_argument("--vit", help="the frozen tower for --steer-data (learn_generalise's models/vit-*)")
    p.add_argument("--out", default=str(learnlib.RESULTS / "probe_frozen_lm.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {**learnlib.run_conditions("probe_frozen_lm.py", sys.argv[1:] if argv is None else argv),
              "what": "linear probe of the question's colour (6 classes, chance 0.167) from the residual stream at "
                      "the answer digits, per layer (0 = embeddings); text only, no image",
              "lms": []}
    for lm_dir in args.lm:
        states, y = answer_slot_states(lm_dir, args.texts, args.seed)
        pre = Path(lm_dir) / "pretrain.json"
        pretrain = {k: v for k, v in json.loads(pre.read_text()).items() if k != "loss_curve"} if pre.exists() else None
        row = {"lm": Path(lm_dir).name, "pretrain": pretrain,
               "colour_probe_by_layer": [linear_probe(x, y, args.fit, args.seed) for x in states]}
        if args.steer_data:
            runs = [steerability(lm_dir, args.vit, args.steer_data, seed=s) for s in args.steer_seeds]
            row["steerability"] = {"seeds": args.steer_seeds, "runs": runs,
                                   "real_below_shifted": learnlib.spread([r["real_below_shifted"] for r in runs])}
        result["lms"].append(row)
        print(row["lm"], row["colour_probe_by_layer"], (row.get("steerability") or {}).get("real_below_shifted"), flush=True)
    learnlib.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
