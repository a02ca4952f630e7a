"""Forward+backward speed of the visual-expert model against the plain LM and HF's LlamaForCausalLM.

Measured side by side in one run, interleaved (a, b, c, ..., then reversed every round; one untimed
warm-up round; see ``benchmarks/README.md``); each ratio is taken round by round and reported as median
and min-max, from wall seconds and from this process's CPU seconds (one torch thread: the figure least
moved by other jobs on a shared CPU):
  (a) the visual-expert model (experts + LM, all weights trainable) on 256 image + 64 text tokens,
  (b) the same code and LM without experts (``shallow=True``) on the same 320 positions,
  (c) HF ``LlamaForCausalLM`` (SDPA), text only, on 320 tokens.
Image embeddings are fed directly (the vision tower is outside the comparison; it is frozen and
the same for every variant). Also: the stage-two default (LM frozen) for (a) and (b), forward FLOPs
of each variant (``torch.utils.flop_counter``), and greedy decode speed with the KV cache.

    .venv/bin/python benchmarks/bench_model.py                      # CPU preset, 8 rounds (about 3-4 min)
    .venv/bin/python benchmarks/bench_model.py --quick              # 3 rounds, 3 decode rounds (about 1.5 min)
    .venv/bin/python benchmarks/bench_model.py --preset 1b --device cuda --dtype bfloat16   # GPU: MFU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from benchmarks.measure import PEAK_BF16_TFLOPS, interleaved, load_now, machine, paired_ratios, spread, write_result  # noqa: E402
from model import testing as tiny  # noqa: E402
from model.cogvlm import DTYPES, VisualExpertConfig, VisualExpertForCausalLM  # noqa: E402



@dataclass
class BenchConfig:
    preset: str = "cpu"
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_layers: int = 6
    num_heads: int = 12
    num_kv_heads: int = 4
    vocab_size: int = 32000
    image_tokens: int = 256           # 224 px / patch 14, as CLIP ViT-L/14 at the paper's 224
    text_tokens: int = 64
    batch_size: int = 1
    repeats: int = 8                  # timed interleaved rounds of fwd+bwd (after one warm-up round)
    decode_repeats: int = 6           # timed interleaved rounds of greedy decoding (after one warm-up)
    quick: bool = False               # --quick: 3 + 3 rounds (same sizes), for a <= 2 min check
    threads: int = 1                  # torch threads; 1 on the shared 2-core CPU (contention skews 2-thread runs)
    decode_tokens: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    peak_tflops: float | None = None  # for MFU on a GPU; None -> looked up from the device name
    out: str = "benchmarks/results/model.json"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if int(self.image_tokens ** 0.5) ** 2 != self.image_tokens:
            raise ValueError(f"image_tokens must be a square (a patch grid), got {self.image_tokens}")
        if self.repeats < 1 or self.decode_repeats < 1:
            raise ValueError("repeats and decode_repeats must be >= 1 (a warm-up round runs before them)")


def preset(name: str) -> dict:
    """``cpu``: a ~60 M-parameter Llama (6 x 768, GQA 12/4, 32k vocab); ``1b``: TinyLlama-1.1B's shape."""
    if name == "cpu":
        return {}
    if name == "1b":
        return dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                    batch_size=8, repeats=10)
    raise ValueError(f"unknown preset {name!r} (cpu, 1b)")


def write_checkpoints(cfg: BenchConfig, root: Path) -> tuple[str, str]:
    lm = root / "lm"
    tiny.write_tokenizer(lm)
    tiny.write_llama(lm, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                     intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
    grid = int(cfg.image_tokens ** 0.5)
    vision = tiny.write_clip_vision(root / "vit", image_size=14 * grid, patch_size=14)
    return str(lm), str(vision)


RATIOS = {"a_over_b": ("a_visual_expert", "b_plain_lm"), "b_over_c": ("b_plain_lm", "c_hf_llama"),
          "a_over_b_lm_frozen": ("a_visual_expert_lm_frozen", "b_plain_lm_lm_frozen"),
          "a_labels_logits_over_c": ("a_visual_expert_labels_logits", "c_hf_llama")}  # time ratios: lower = faster


def ratios(seconds: dict) -> dict:
    """Time ratios (numerator's seconds / denominator's), round by round: median, min-max, quartiles."""
    return {k: paired_ratios(seconds[a], seconds[b]) for k, (a, b) in RATIOS.items()}


def sync_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    for f in dataclasses.fields(BenchConfig):
        if isinstance(f.default, bool):
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", default=None)
        elif f.name != "preset":
            p.add_argument("--" + f.name.replace("_", "-"), type=float if f.name == "peak_tflops" else type(f.default)
                           if f.default is not None else str, default=None)
    args = vars(p.parse_args(argv))
    name = args.pop("preset")
    quick = dict(repeats=3, decode_repeats=3) if args.get("quick") else {}
    cfg = BenchConfig(preset=name, **(preset(name) | quick | {k: v for k, v in args.items() if v is not None}))
    info = machine()
    torch.manual_seed(0)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dtype, dev = DTYPES[cfg.dtype], cfg.device
    B, N, T = cfg.batch_size, cfg.image_tokens, cfg.text_tokens
    L = N + T

    with tempfile.TemporaryDirectory() as tmp:
        lm_dir, vit_dir = write_checkpoints(cfg, Path(tmp))

        def ours(**kw):
            return VisualExpertForCausalLM.from_config(
                VisualExpertConfig(lm=lm_dir, vision=vit_dir, dtype=cfg.dtype, **kw)).to(dev).train()

        models = {
            "a_visual_expert": ours(freeze_lm=False),
            "b_plain_lm": ours(freeze_lm=False, shallow=True),
            "c_hf_llama": AutoModelForCausalLM.from_pretrained(lm_dir, dtype=dtype, attn_implementation="sdpa").to(dev).train(),
            "a_visual_expert_lm_frozen": ours(),
            "b_plain_lm_lm_frozen": ours(shallow=True),
        }
        models["a_visual_expert_labels_logits"] = models["a_visual_expert"]  # same weights, LM head on labels only
        assert models["a_visual_expert"].num_image_tokens == N
        n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}

    ids = torch.randint(4, 300, (B, T), device=dev)
    ids[:, 0] = 1
    hf_ids = torch.randint(4, 300, (B, L), device=dev)
    hf_ids[:, 0] = 1
    embeds = torch.randn(B, N, cfg.hidden_size, device=dev, dtype=dtype)

    def step_fn(name):
        m = models[name]
        if name.startswith("c_"):
            return lambda: m(input_ids=hf_ids, labels=hf_ids).loss
        e = embeds.detach().requires_grad_(True)  # as if coming out of the (trainable) adapter
        keep = "labels" if name.endswith("_labels_logits") else "all"
        return lambda: m(ids, image_embeds=e, labels=ids, logits_to_keep=keep).loss

    flops_fwd = {}
    for name in models:
        fn = step_fn(name)
        with FlopCounterMode(display=False) as fc:
            fn()  # the graph is dropped unused
        flops_fwd[name] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        step_fn("a_visual_expert")().backward()
    flops_step_a = fc.get_total_flops()

    def step(name):
        m, fn = models[name], step_fn(name)

        def run():
            m.zero_grad(set_to_none=True)
            fn().backward()
        return run

    sync = (lambda: sync_device(dev)) if dev.startswith("cuda") else None
    timing = interleaved({name: step(name) for name in models}, rounds=cfg.repeats, warmup=1, sync=sync)
    times, cpu_times = timing["wall"], timing["cpu"]
    med = {k: statistics.median(v) for k, v in times.items()}

    with torch.no_grad():
        ours_m, hf_m = models["a_visual_expert"].eval(), models["c_hf_llama"].eval()
        decode_timing = interleaved({
            "ours": lambda: ours_m.generate(ids[:1], image_embeds=embeds[:1], max_new_tokens=cfg.decode_tokens,
                                            eos_token_id=-1),
            "hf": lambda: hf_m.generate(hf_ids[:1], attention_mask=torch.ones_like(hf_ids[:1]),
                                        max_new_tokens=cfg.decode_tokens, min_new_tokens=cfg.decode_tokens,
                                        do_sample=False, pad_token_id=0),
        }, rounds=cfg.decode_repeats, warmup=1, sync=sync)
    decode = {"a_visual_expert_tokens_per_s": cfg.decode_tokens / statistics.median(decode_timing["wall"]["ours"]),
              "c_hf_llama_tokens_per_s": cfg.decode_tokens / statistics.median(decode_timing["wall"]["hf"]),
              # speed ratio ours / HF = HF seconds / our seconds, round by round
              "ours_over_hf_speed_wall": paired_ratios(decode_timing["wall"]["hf"], decode_timing["wall"]["ours"]),
              "ours_over_hf_speed_cpu": paired_ratios(decode_timing["cpu"]["hf"], decode_timing["cpu"]["ours"]),
              "seconds_wall": decode_timing["wall"], "seconds_cpu": decode_timing["cpu"],
              "what": f"prefill + {cfg.decode_tokens} greedy tokens with the KV cache, batch 1; prompt {N} image + "
                      f"{T} text tokens (ours), {L} text tokens (HF generate); tokens/s from median wall seconds"}

    on_gpu = dev.startswith("cuda")
    gpu = {"measured": False, "why": "no GPU was lent to this task; run with --preset 1b --device cuda --dtype bfloat16"}
    if on_gpu:
        gpu_name = torch.cuda.get_device_name()
        peak = cfg.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)
        gpu = {"measured": True, "device_name": gpu_name, "peak_tflops": peak,
               "a_tokens_per_s": B * L / med["a_visual_expert"],
               "a_mfu": None if peak is None else flops_step_a / med["a_visual_expert"] / (peak * 1e12),
               "mfu_flops": "forward+backward FLOPs of (a) counted by torch.utils.flop_counter, median step time"}
    wall_ratios, cpu_ratios = ratios(times), ratios(cpu_times)
    chosen = wall_ratios if on_gpu else cpu_ratios  # CPU seconds on a shared CPU; wall on a GPU
    headline = {k: v["median"] for k, v in chosen.items() if k in ("a_over_b", "b_over_c")}
    headline["decode_ours_over_hf"] = decode["ours_over_hf_speed_wall" if on_gpu else "ours_over_hf_speed_cpu"]["median"]
    result = {
        "benchmark": "model", "mode": "quick" if cfg.quick else "full", "config": dataclasses.asdict(cfg),
        "sequence": f"batch {B} x ({N} image + {T} text) tokens, forward+backward, all weights trainable unless *_lm_frozen",
        "machine": info | {"device": torch.cuda.get_device_name() if on_gpu else "cpu"},
        "load_average_at_end": load_now(), "params": n_params, "order": timing["order"],
        "seconds_wall": {k: spread(v) | {"all": v} for k, v in times.items()},
        "seconds_cpu": {k: spread(v) | {"all": v} for k, v in cpu_times.items()},
        "tokens_per_s_median": {k: B * L / v for k, v in med.items()},
        "ratios_wall": wall_ratios, "ratios_cpu_seconds": cpu_ratios,
        "headline_from": "wall seconds" if on_gpu else "process CPU seconds (one thread)",
        "targets": {"a_over_b": "<= 1.15", "b_over_c": "<= 1.0"},
        "flops_forward": flops_fwd, "flops_forward_equal": len({flops_fwd[k] for k in
                                                                 ("a_visual_expert", "b_plain_lm", "c_hf_llama")}) == 1,
        "flops_step_a": flops_step_a,
        "decode": decode, "gpu": gpu,
        "note": "CPU timings on a 2-core machine shared with other engineers' jobs (load averages recorded): wall "
                "seconds are noisy. Sides are interleaved, order reversed every round, one warm-up round untimed; "
                "ratios are time ratios (lower = faster) taken round by round, median and min-max; on CPU the "
                "headline uses this process's CPU seconds (one torch thread), the figure least moved by other "
                "jobs. a_over_b_lm_frozen compares unequal work on purpose: with the LM frozen, (a) still computes "
                "its experts' weight gradients while (b) computes none (its only trainable part, the adapter, is "
                "outside the timing). a_visual_expert_labels_logits is (a) with logits_to_keep='labels' (LM head "
                "only at the labelled positions, not the 256 image ones): same loss and gradients, less work.",
        "command": "python benchmarks/bench_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    stored = write_result(cfg.out, result, cfg.quick, headline)
    print(json.dumps({"ratios_wall": {k: {x: v[x] for x in ("median", "min", "max")} for k, v in wall_ratios.items()},
                      "ratios_cpu_seconds": {k: {x: v[x] for x in ("median", "min", "max")} for k, v in cpu_ratios.items()},
                      "decode": {k: v for k, v in decode.items() if "seconds" not in k}, "headline": headline,
                      "quick_vs_full": stored.get("quick_vs_full"), "gpu": gpu}, indent=1))
    return result


if __name__ == "__main__":
    main()
