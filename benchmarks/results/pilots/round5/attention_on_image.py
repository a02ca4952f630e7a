"""How much attention the answer positions of a trained checkpoint pay to image tokens, per layer and head.

For each checkpoint: 32 one-object REC pairs of DIR (teacher-forced), the share of each head's attention
that the positions predicting answer tokens put on the image tokens (and on BOS), averaged over those
positions. A frozen LM whose answer queries do not attend to the image cannot be steered by it.

    python benchmarks/results/pilots/round5/attention_on_image.py --data DIR --checkpoints CKPT [CKPT ...] --out JSON
"""
import argparse
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import learnlib  # noqa: E402
from grounding.boxes import format_answer  # noqa: E402
from model.checkpoint import load_model_from_checkpoint  # noqa: E402
from model.cogvlm import VisualExpertAttention, rotate_half  # noqa: E402
from model.data import collate, encode_qa  # noqa: E402
from model.evaluate import shard_examples  # noqa: E402


@torch.no_grad()
def attention_on_image(ckpt: str, data: str, n: int = 32) -> dict:
    model, info = load_model_from_checkpoint(ckpt)
    tok = model.tokenizer
    ex = shard_examples([data], limit=n)
    px = model.preprocess([Image.open(io.BytesIO(e.image_bytes)).convert("RGB") for e in ex])
    samples = [{"input_ids": ids, "labels": labels, "pixel_values": p, "task": "rec", "key": e.key}
               for e, p in zip(ex, px)
               for ids, labels, _ in [encode_qa(tok, e.question, format_answer([[round(v) for v in e.boxes[0]]]), 128)]]
    b = collate(samples, tok.pad_token_id)
    per_layer = []

    def hook(mod, args):  # recompute this layer's attention weights from its inputs, as its forward does
        text, vision, batch = args[:3]
        qkv_v = (mod.vision_expert_query_key_value if hasattr(mod, "vision_expert_query_key_value")
                 else mod.language_expert_query_key_value)(vision)
        qkv = batch.merge(mod.language_expert_query_key_value(text), qkv_v)
        B, L, _ = qkv.shape
        hd, H, Hkv = mod.head_dim, mod.num_heads, mod.num_kv_heads
        q, k, _ = qkv.view(B, L, H + 2 * Hkv, hd).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
        q = q * batch.cos + rotate_half(q) * batch.sin
        k = (k * batch.cos + rotate_half(k) * batch.sin).repeat_interleave(H // Hkv, 1)
        mask = batch.attn_mask if batch.attn_mask is not None else torch.ones(L, L, dtype=torch.bool).tril()
        w = ((q @ k.transpose(2, 3)) * mod.scaling).masked_fill(~mask, torch.finfo(q.dtype).min).softmax(-1)
        per_layer.append(((w * batch.vision_token_mask[:, None, None, :]).sum(-1), w[..., 0]))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, VisualExpertAttention)]
    loss = float(model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"], labels=b["labels"]).loss)
    for h in handles:
        h.remove()
    N, lab = model.num_image_tokens, b["labels"]
    rows = [(i, t + N) for i in range(lab.shape[0]) for t in range(1, lab.shape[1] - 1) if lab[i, t + 1] != -100]
    layers = []
    for on_img, bos in per_layer:
        img = torch.stack([on_img[i, :, r] for i, r in rows]).mean(0)
        layers.append({"on_image_per_head": [round(float(x), 3) for x in img],
                       "on_bos_per_head": [round(float(x), 3) for x in torch.stack([bos[i, :, r] for i, r in rows]).mean(0)],
                       "on_image_max_head": round(float(img.max()), 3)})
    return {"checkpoint": ckpt, "step": info["step"], "lm": model.config.lm, "pairs": len(samples),
            "answer_positions": len(rows), "loss": round(loss, 4), "layers": layers}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {**learnlib.run_conditions("results/pilots/round5/attention_on_image.py", sys.argv[1:] if argv is None else argv),
              "runs": [attention_on_image(c, args.data) for c in args.checkpoints]}
    learnlib.write_json(args.out, result)
    for r in result["runs"]:
        print(Path(r["lm"]).name, r["loss"], [l["on_image_max_head"] for l in r["layers"]])
    return result


if __name__ == "__main__":
    main()
