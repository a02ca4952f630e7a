"""Can the frozen gist LM's box code be written from a box's coordinates? (no image involved)

A small MLP maps a box's four coordinates (0..1) to K soft tokens placed where image tokens sit (position 1,
between BOS and the text); the LM is frozen; only the MLP trains, teacher-forced on ``Question: Where is the
{phrase}? Answer: [[x0,y0,x1,y1]]`` of the training split's one-object pairs. Scored by greedy decoding on pairs
never trained on (the dev split's 2-4-object pairs, one box each), Acc@0.5 against the box. Control: the
same with each question given another pair's coordinates (the prior the LM keeps without information).

If the real arm generalises, the LM's code is a smooth enough function of position for a small network, and
what stage 1 lacks is the visual side; if it does not, the code itself is what image tokens cannot reach.

    python benchmarks/results/pilots/round5/code_from_coordinates.py --lm LM_DIR --train TRAIN_ONE --heldout DEV_MULTI --out JSON
"""
import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

import learnlib  # noqa: E402
from grounding.boxes import box_iou, format_answer, parse_boxes  # noqa: E402
from model.data import encode_qa  # noqa: E402
from model.evaluate import shard_examples  # noqa: E402


def pairs_of(folder: str, limit: int | None = None) -> list[tuple[str, tuple[float, ...]]]:
    return [(e.question, tuple(e.boxes[0])) for e in shard_examples([folder], limit=limit)]


def run_arm(lm, tok, train, heldout, shuffled: bool, k: int, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    D = lm.config.hidden_size
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256), torch.nn.SiLU(),
                              torch.nn.Linear(256, k * D))
    emb = lm.get_input_embeddings()
    coords = [tuple(v / 999 for v in box) for _, box in train]
    if shuffled:
        coords = rng.sample(coords, len(coords))
    encoded = [encode_qa(tok, q, format_answer([[round(v) for v in box]]), 64)[:2] for q, box in train]

    def forward(idx: list[int], with_labels: bool = True):
        rows = [encoded[i] for i in idx]
        T = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), T), tok.pad_token_id)
        labels = torch.full((len(rows), T), -100)
        for j, (r, lab) in enumerate(rows):
            ids[j, :len(r)], labels[j, :len(r)] = torch.tensor(r), torch.tensor(lab)
        soft = mlp(torch.tensor([coords[i] for i in idx])).view(len(idx), k, D)
        x = emb(ids)
        x = torch.cat([x[:, :1], soft, x[:, 1:]], 1)
        pos = torch.cat([torch.zeros(len(idx), 1), torch.ones(len(idx), k), torch.arange(2, T + 1).expand(len(idx), -1)], 1).long()
        mask = torch.cat([torch.ones(len(idx), 1 + k), (ids[:, 1:] != tok.pad_token_id).float()], 1)
        lab = torch.cat([labels[:, :1], torch.full((len(idx), k), -100), labels[:, 1:]], 1)
        return lm(inputs_embeds=x, position_ids=pos, attention_mask=mask, labels=lab).loss

    opt = torch.optim.AdamW(mlp.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / steps))
        loss = forward(rng.sample(range(len(train)), 32))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))

    @torch.no_grad()
    def greedy(question: str, box: tuple[float, ...]) -> str:
        prompt = [tok.bos_token_id] + tok(f"{question} Answer:", add_special_tokens=False)["input_ids"]
        soft = mlp(torch.tensor([[v / 999 for v in box]])).view(1, k, D)
        out: list[int] = []
        for _ in range(24):
            ids = torch.tensor([prompt + out])
            x = emb(ids)
            x = torch.cat([x[:, :1], soft, x[:, 1:]], 1)
            pos = torch.cat([torch.zeros(1, 1), torch.ones(1, k), torch.arange(2, ids.shape[1] + 1)[None]], 1).long()
            nxt = int(lm(inputs_embeds=x, position_ids=pos).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
        return tok.decode(out)

    def acc(pairs) -> dict:
        hits, ious = 0, []
        for q, box in pairs:
            try:
                pred = parse_boxes(greedy(q, box))[0]
                iou = box_iou(tuple(pred), box)
            except ValueError:
                iou = 0.0
            ious.append(iou)
            hits += iou >= 0.5
        return {"n": len(pairs), "acc@0.5": round(hits / len(pairs), 4), "mean_iou": round(sum(ious) / len(ious), 4)}

    mlp.eval()
    return {"shuffled_coordinates": shuffled, "soft_tokens": k, "steps": steps, "seed": seed,
            "train_loss_first_last_100": [round(sum(losses[:100]) / 100, 4), round(sum(losses[-100:]) / 100, 4)],
            "train_subset": acc(train[:100]), "heldout": acc(heldout)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", required=True)
    p.add_argument("--train", required=True, help="one-object shards (learn_generalise's train_one)")
    p.add_argument("--heldout", required=True, help="shards never trained on (learn_generalise's dev_multi)")
    p.add_argument("--soft-tokens", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.lm)
    lm = LlamaForCausalLM.from_pretrained(args.lm).eval()
    for prm in lm.parameters():
        prm.requires_grad_(False)
    train, heldout = pairs_of(args.train), pairs_of(args.heldout)
    result = {**learnlib.run_conditions("results/pilots/round5/code_from_coordinates.py",
                                        sys.argv[1:] if argv is None else argv),
              "lm": Path(args.lm).name, "train_pairs": len(train),
              "arms": [run_arm(lm, tok, train, heldout, shuffled, args.soft_tokens, args.steps, args.seed)
                       for shuffled in (False, True)]}
    learnlib.write_json(args.out, result)
    for a in result["arms"]:
        print(a)
    return result


if __name__ == "__main__":
    main()
