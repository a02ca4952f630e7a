"""One command for every GPU figure: detector, feeding the GPU, the job, training, evaluation.

    python benchmarks/gpu_suite.py                     # one H100/H200-class GPU, <= 8 min -> benchmarks/results/gpu.json
    python benchmarks/gpu_suite.py --compile           # + the detector under torch.compile
    python benchmarks/gpu_suite.py --sections feeding  # the CPU part alone (any machine)
    python benchmarks/gpu_suite.py --dry-run           # the same code paths at tiny sizes on CPU, < 1 min (CI)

Sections (``--sections`` picks some; each is a function of :class:`SuiteConfig`):

- **detector**: GroundingDINO-T at real size (default ``GroundingDinoConfig``: Swin-T + BERT-base, random
  weights: the forward cost of the released checkpoint), 800 px shortest edge, one prompt of 16 phrases.
  The GPU side of a detector actor: images already preprocessed (as ``BoxDetector`` prepares them), then
  tokenisation, forward under autocast and the copy of the outputs to the host, in batches. Sides: fp32
  batch 1, bf16 batch 1 / 8 / 32 (+ bf16 compiled with ``--compile``), interleaved round by round; images/s
  and peak memory per side.
- **feeding**: this machine's CPU seconds per image for everything a detector actor needs before its
  forward: JPEG decode, GroundingDINO's preprocessing (resize to 800 px, normalise), the prompt's
  tokenisation, and spaCy phrase extraction of the caption (``PhraseExtractor``, batched as in the job);
  also img2dataset's resize + re-encode, listed apart (the download stage's work). One thread, so
  images/s per core = 1 / CPU seconds; cores one GPU needs = the detector's best images/s / that.
- **job**: the grounding job through its command line (``pipeline.build_grounding.main``) on N synthetic
  images served on 127.0.0.1, with the real-size detector on the GPU, against ``BoxDetector`` alone on the
  same images and prompts (read back from the job's shards) with the same config and batch size. Model
  load is inside both timings (the job loads it in its actor); the job's wall also holds Ray start-up
  and the download stage. Rounds interleaved job / detector-only.
- **training**: a visual-expert model on a Llama-1B-shaped LM (TinyLlama-1.1B's shape) and a
  ViT-L/14-shaped tower at 224 px (256 image tokens), random weights written with ``save_pretrained``,
  fp32 weights + bf16 autocast + fused AdamW over ``param_groups`` (the trainer's recipe), one GPU.
  Stage two (LM frozen, experts trained) and fully unfrozen, each with activation checkpointing off and
  on (interleaved on one model). tokens/s, MFU (FLOPs of one step counted by ``torch.utils.flop_counter``
  without checkpointing, i.e. model FLOPs; the GPU's dense bf16 peak from :data:`PEAK_BF16_TFLOPS` or
  ``--peak-tflops``), peak memory.
- **evaluation**: REC generation (``predict_boxes``: preprocessing, prefill, greedy decoding with the KV
  cache) at batch 32 with the stage-two model: samples/s (every sample decodes the full token budget).

Figures follow ``benchmarks/README.md``: sides interleaved, median and min-max, machine and load
recorded. The JSON is written only here. ``--dry-run`` writes to ``benchmarks/results/gpu_dry_run.json``
(never ``gpu.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.measure import PEAK_BF16_TFLOPS, interleaved, load_now, machine, paired_ratios, spread  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("detector", "feeding", "job", "training", "evaluation")
# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, no sparsity); the first name found in the device name wins
PROMPT_16 = ["red ball", "blue box", "green kite", "yellow star", "white cup", "black hat", "orange chair",
             "purple umbrella", "brown dog", "grey cat", "wooden table", "small boat", "tall tree",
             "person on the left", "car in the background", "sky"]  # ~50 BERT tokens


@dataclass
class SuiteConfig:
    """Sizes of every section; :func:`full` and :func:`dry_run` are the two presets."""
    dry_run: bool = False
    device: str = "cuda"
    sections: tuple[str, ...] = SECTIONS
    image_size: tuple[int, int] = (1024, 768)   # img2dataset's keep_ratio_largest 1024 output of a 4:3 photo
    # detector
    det_images: int = 64                        # per side per round (a multiple of every batch size)
    det_batch_sizes: tuple[int, ...] = (8, 32)  # bf16 batches besides batch 1 (fp32 and bf16)
    det_rounds: int = 3
    det_shortest_edge: int = 800
    det_longest_edge: int = 1333
    compile: bool = False
    # feeding
    feed_images: int = 64
    # job
    job_images: int = 384
    job_batch_size: int = 8
    job_rounds: int = 2
    job_shard_rows: int = 256
    # training
    lm_hidden: int = 2048                       # TinyLlama-1.1B: 22 x 2048, GQA 32/4, 5632 FFN, 32k vocab
    lm_layers: int = 22
    lm_heads: int = 32
    lm_kv_heads: int = 4
    lm_intermediate: int = 5632
    lm_vocab: int = 32000
    vit_hidden: int = 1024                      # CLIP ViT-L/14 at 224 px: 24 x 1024, 16 heads, 4096 FFN
    vit_layers: int = 24
    vit_heads: int = 16
    vit_intermediate: int = 4096
    vit_image_size: int = 224
    vit_patch: int = 14
    train_batch_size: int = 16
    train_text_tokens: int = 64                 # + 256 image tokens per sample
    train_steps: int = 6                        # timed steps per side (after 2 warm-up steps)
    peak_tflops: float | None = None
    # evaluation
    eval_batch_size: int = 32
    eval_new_tokens: int = 24                   # "[[ddd,ddd,ddd,ddd]]" is 19 tokens with one digit per token
    eval_rounds: int = 3
    out: str | None = None

    def __post_init__(self):
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
        for b in (1, *self.det_batch_sizes):
            if self.det_images % b:
                raise ValueError(f"det_images {self.det_images} is not a multiple of batch size {b}")
        if self.device.startswith("cuda") and not torch.cuda.is_available() and set(self.sections) - {"feeding"}:
            raise SystemExit("no CUDA device: run on a GPU machine, or --dry-run (tiny, CPU), or --sections feeding")


def full(**overrides) -> SuiteConfig:
    return SuiteConfig(**overrides)


def dry_run(**overrides) -> SuiteConfig:
    """Tiny sizes on CPU: every code path once, in well under a minute (CI)."""
    return SuiteConfig(**{**dict(
        dry_run=True, device="cpu", image_size=(96, 64), det_images=4, det_batch_sizes=(2, 4), det_rounds=1,
        det_shortest_edge=64, det_longest_edge=96, feed_images=4, job_images=6, job_batch_size=2, job_rounds=1,
        job_shard_rows=8, lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=128, lm_vocab=384,
        vit_hidden=32, vit_layers=2, vit_heads=4, vit_intermediate=64, vit_image_size=32, vit_patch=8,
        train_batch_size=2, train_text_tokens=8, train_steps=1, eval_batch_size=2, eval_new_tokens=4,
        eval_rounds=1), **overrides})


# --- helpers ---------------------------------------------------------------------------------------

def gpu_sync(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.startswith("cuda") else None


def peak_memory_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def tracked(fn: Callable[[], object], device: str, peaks: dict, name: str) -> Callable[[], object]:
    """``fn`` with its peak GPU memory kept in ``peaks[name]`` (max over calls)."""
    def run():
        reset_peak(device)
        fn()
        peaks[name] = max(peaks.get(name) or 0.0, peak_memory_gib(device) or 0.0) if device.startswith("cuda") else None
    return run


def world_images(n: int, size: tuple[int, int], seed: int = 11):
    from grounding.world import make_world
    world = make_world(n, seed=seed, size=tuple(size))
    return world, [im.render() for im in world]


def save_detector(path: str, cfg: SuiteConfig) -> str:
    """GroundingDINO-T at real size (random init) or, for the dry run, the tiny test detector."""
    from grounding.testing import save_tiny_detector, save_tokenizer_and_processor
    if cfg.dry_run:
        return save_tiny_detector(path, shortest_edge=cfg.det_shortest_edge, longest_edge=cfg.det_longest_edge)
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection
    save_tokenizer_and_processor(path, cfg.det_shortest_edge, cfg.det_longest_edge)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(path)
    return path


def rate(n: int, seconds: list[float]) -> dict:
    """items/s from the median seconds, with the range from the slowest and fastest round."""
    s = spread(seconds)
    return {"per_s_median": n / s["median"], "per_s_min": n / s["max"], "per_s_max": n / s["min"],
            "seconds": seconds}


# --- detector --------------------------------------------------------------------------------------

def detector_forward(det, pixels, prompts) -> None:
    """The GPU work of ``BoxDetector`` for one batch: tokenise, forward under autocast, outputs to host."""
    with torch.inference_mode(), torch.autocast(device_type=det.device.split(":")[0],
                                                dtype=det.autocast_dtype or torch.float32,
                                                enabled=det.autocast_dtype is not None):
        probs, boxes = det.model.forward(pixels, prompts)
    probs.float().cpu(), boxes.float().cpu()


def section_detector(cfg: SuiteConfig, tmp: Path) -> dict:
    from grounding.detect import BoxDetector, DetectorConfig
    model_dir = save_detector(str(tmp / "gdino"), cfg)
    _, images = world_images(cfg.det_images, cfg.image_size)
    prompt = " . ".join(PROMPT_16) + " ."
    dets = {dtype: BoxDetector(DetectorConfig(model=model_dir, device=cfg.device, dtype=dtype))
            for dtype in ("fp32", "bf16")}
    params = sum(p.numel() for p in dets["fp32"].model.model.parameters())
    pixels = [dets["fp32"].model.prepare(im.convert("RGB")) for im in images]  # (3, H, W) each, untimed
    prompt_tokens = len(dets["fp32"].model.tokenizer(prompt)["input_ids"])

    def side(dtype: str, bs: int):
        det = dets[dtype]
        return lambda: [detector_forward(det, pixels[s:s + bs], [prompt] * len(pixels[s:s + bs]))
                        for s in range(0, len(pixels), bs)]

    plan = [("fp32", 1), ("bf16", 1)] + [("bf16", b) for b in cfg.det_batch_sizes]
    peaks: dict = {}
    sides = {f"{d}_b{b}": tracked(side(d, b), cfg.device, peaks, f"{d}_b{b}") for d, b in plan}
    compile_s = None
    if cfg.compile:
        import copy
        compiled = copy.copy(dets["bf16"])
        compiled.model = copy.copy(dets["bf16"].model)
        compiled.model.model = torch.compile(dets["bf16"].model.model)
        top = max(cfg.det_batch_sizes)
        t0 = time.perf_counter()
        try:
            detector_forward(compiled, pixels[:top], [prompt] * top)  # compilation, untimed
            compile_s = time.perf_counter() - t0
            sides[f"bf16_b{top}_compiled"] = tracked(
                lambda: [detector_forward(compiled, pixels[s:s + top], [prompt] * top)
                         for s in range(0, len(pixels), top)], cfg.device, peaks, f"bf16_b{top}_compiled")
        except Exception as e:  # noqa: BLE001 - an optional side: record why, keep the rest of the suite
            compile_s = f"failed: {type(e).__name__}: {e}"[:300]
    timing = interleaved(sides, rounds=cfg.det_rounds, warmup=1, sync=gpu_sync(cfg.device))
    per_side = {k: rate(cfg.det_images, v) | {"peak_memory_gib": peaks.get(k)} for k, v in timing["wall"].items()}
    best = max(per_side, key=lambda k: per_side[k]["per_s_median"])
    base = timing["wall"]["fp32_b1"]
    return {
        "model": "GroundingDINO-T (default GroundingDinoConfig, random init)" if not cfg.dry_run else "tiny test detector",
        "parameters": params, "images_per_side": cfg.det_images, "input_size": list(pixels[0].shape[1:]),
        "prompt_phrases": len(PROMPT_16), "prompt_tokens": prompt_tokens, "rounds": cfg.det_rounds,
        "compile_seconds": compile_s, "images_per_s": per_side, "best_side": best,
        "best_images_per_s": per_side[best]["per_s_median"],
        # speed ratio: fp32 batch 1 seconds / this side's seconds, round by round
        "speedup_over_fp32_b1": {k: paired_ratios(base, v) for k, v in timing["wall"].items() if k != "fp32_b1"},
        "target": "bf16 batched >= 3 x fp32 batch 1",
        "what": "GPU work per batch (tokenise, forward under autocast, outputs to host) on images preprocessed "
                "beforehand, as a detector actor does after preprocessing; the CPU side is in 'feeding'",
    }


# --- feeding the GPU -------------------------------------------------------------------------------

def section_feeding(cfg: SuiteConfig, tmp: Path, gpu_images_per_s: float | None) -> dict:
    """Process-CPU seconds per image of each CPU step (one thread), and cores per GPU from them."""
    from transformers import AutoTokenizer

    from grounding.detect import load_image_processor, plan_prompts
    from grounding.testing import save_tokenizer_and_processor
    from grounding.phrases import PhraseConfig, PhraseExtractor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    save_tokenizer_and_processor(str(tmp / "processor"), cfg.det_shortest_edge, cfg.det_longest_edge)
    processor = load_image_processor(str(tmp / "processor"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "processor"))
    extractor = PhraseExtractor(PhraseConfig())
    world, images = world_images(cfg.feed_images, cfg.image_size, seed=5)
    jpegs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)  # img2dataset's encode_quality
        jpegs.append(buf.getvalue())
    captions = [w.caption for w in world]
    n = len(images)
    decoded: list = []
    found: list = []

    def decode():
        decoded.clear()
        for b in jpegs:
            with Image.open(io.BytesIO(b)) as im:
                decoded.append(im.convert("RGB"))

    def preprocess():
        for im in decoded:
            processor(images=[im], return_tensors="pt")

    def spacy_phrases():
        found[:] = extractor(captions)

    def tokenise():
        for res in found:
            distinct = list(dict.fromkeys(p.text.lower() for p in res.phrases)) or ["thing"]
            passes, _ = plan_prompts(distinct, tokenizer, 256)
            tokenizer([p.text for p in passes], padding="longest", return_tensors="pt")

    def resize_encode():  # img2dataset: decode, resize to keep_ratio_largest 1024, re-encode JPEG q95
        for b in jpegs:
            with Image.open(io.BytesIO(b)) as im:
                im = im.convert("RGB")
                scale = 1024 / max(im.size)
                if scale < 1:
                    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
                im.save(io.BytesIO(), format="JPEG", quality=95)

    steps = {"decode": decode, "detector_preprocess": preprocess, "spacy_phrases": spacy_phrases,
             "tokenise_prompts": tokenise, "img2dataset_resize_encode": resize_encode}
    timing = interleaved(steps, rounds=1 if cfg.dry_run else 5, warmup=1)  # sequential order matters only in warm-up
    torch.set_num_threads(threads)
    per_image = {k: statistics.median(v) / n for k, v in timing["cpu"].items()}
    before = ("decode", "detector_preprocess", "spacy_phrases", "tokenise_prompts")
    cpu_s = sum(per_image[k] for k in before)
    with_download = cpu_s + per_image["img2dataset_resize_encode"]
    out = {
        "images": n, "image_size": list(cfg.image_size), "threads": 1,
        "cpu_ms_per_image": {k: round(v * 1e3, 3) for k, v in per_image.items()},
        "cpu_ms_per_image_spread": {k: {x: round(spread(v)[x] / n * 1e3, 3) for x in ("median", "min", "max")}
                                    for k, v in timing["cpu"].items()},
        "images_per_s_per_core": 1 / cpu_s,
        "images_per_s_per_core_with_download_resize": 1 / with_download,
        "gpu_detector_images_per_s": gpu_images_per_s,
        "cores_per_gpu": None if gpu_images_per_s is None else gpu_images_per_s * cpu_s,
        "cores_per_gpu_with_download_resize": None if gpu_images_per_s is None else gpu_images_per_s * with_download,
        "what": "process-CPU seconds (one thread) per image of each step before the detector's forward; "
                "cores_per_gpu = best detector images/s on the GPU x CPU seconds per image (decode, preprocess, "
                "spaCy, tokenise); *_with_download_resize adds img2dataset's resize + re-encode. Excludes Ray's own "
                "overhead and the detector's box selection after the forward.",
    }
    if gpu_images_per_s is None:
        out["cores_per_gpu_why_missing"] = "the detector section did not run here (no GPU figure to divide)"
    return out


# --- the job ---------------------------------------------------------------------------------------

def section_job(cfg: SuiteConfig, tmp: Path) -> dict:
    import pyarrow.parquet as pq

    from grounding.detect import BoxDetector, DetectorConfig
    from grounding.schema import phrase_prompt
    from grounding.world import WorldServer, make_world, write_world
    from pipeline import build_grounding

    model_dir = save_detector(str(tmp / "gdino_job"), cfg)
    root = tmp / "world"
    world = make_world(cfg.job_images, seed=3, size=tuple(cfg.image_size))
    dtype = "bf16" if cfg.device.startswith("cuda") else "fp32"
    counts: dict = {}
    state: dict = {}
    with WorldServer(root, slow_seconds=1) as server:
        files = write_world(root, world, base_url=server.base_url)

        def job():
            out = tmp / f"job_{len(counts)}"
            argv = ["--input", str(files.parquet), "--output", str(out), "--allow-host", "127.0.0.1",
                    "--detector-model", model_dir, "--detector-device", cfg.device, "--detector-dtype", dtype,
                    "--detector-batch-size", str(cfg.job_batch_size), "--ray-detect-batch-size", str(cfg.job_batch_size),
                    "--min-boxes", "0", "--source-shard-rows", str(cfg.job_shard_rows)]
            rc = build_grounding.main(argv)
            table = pq.read_table(str(out / "shards"), columns=["key", "image", "phrases"])
            counts[len(counts)] = table.num_rows
            state.setdefault("argv", argv)
            state.setdefault("rc", rc)
            if "images" not in state:  # the detector-only side's input: the job's own images and prompts
                rows = table.to_pylist()
                state["images"] = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
                state["prompts"] = [list(dict.fromkeys(phrase_prompt(p) for p in r["phrases"]
                                                       if p["kind"] == "chunk")) for r in rows]

        def detector_only():
            det = BoxDetector(DetectorConfig(model=model_dir, device=cfg.device, dtype=dtype,
                                             batch_size=cfg.job_batch_size))
            ims, ps = state["images"], state["prompts"]
            for s in range(0, len(ims), cfg.job_batch_size):
                det(ims[s:s + cfg.job_batch_size], ps[s:s + cfg.job_batch_size])
            if cfg.device.startswith("cuda"):
                del det
                torch.cuda.empty_cache()

        # no warm-up round (a job is minutes): round 0 runs the job first, which also yields detector-only's input
        timing = interleaved({"job": job, "detector_only": detector_only}, rounds=cfg.job_rounds, warmup=0,
                             sync=gpu_sync(cfg.device))
    n = len(state["images"])
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the job boxed a different number of images from round to round: {counts}")
    return {
        "images_in": cfg.job_images, "images_through_detector": n, "batch_size": cfg.job_batch_size, "dtype": dtype,
        "job_command": "python pipeline/build_grounding.py " + " ".join(state["argv"]), "job_exit_code": state["rc"],
        "job_images_per_s": rate(n, timing["wall"]["job"]),
        "detector_only_images_per_s": rate(n, timing["wall"]["detector_only"]),
        # job images/s / detector-only images/s = detector-only seconds / job seconds, round by round
        "ratio": paired_ratios(timing["wall"]["detector_only"], timing["wall"]["job"]),
        "order": timing["order"], "target": ">= 0.9", "warm_up": "none: the first round's job starts cold",
        "what": "job: the whole command (embedded Ray start, img2dataset download from 127.0.0.1, spaCy and "
                "detector actors incl. model load, shard writing); detector-only: BoxDetector load + detection of "
                "the same images (decoded beforehand) with the same prompts, config and batch size",
    }


# --- training and evaluation -----------------------------------------------------------------------

def write_vision_tower(path: Path, cfg: SuiteConfig) -> str:
    """A CLIP vision tower of the given shape (random init) + CLIP's preprocessor config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from grounding.image import CLIP_MEAN, CLIP_STD
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=cfg.vit_image_size, patch_size=cfg.vit_patch, hidden_size=cfg.vit_hidden,
                              intermediate_size=cfg.vit_intermediate, num_hidden_layers=cfg.vit_layers,
                              num_attention_heads=cfg.vit_heads, projection_dim=cfg.vit_hidden)
    CLIPVisionModel(config).save_pretrained(str(path))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
         "size": {"height": cfg.vit_image_size, "width": cfg.vit_image_size}}))
    return str(path)


def write_checkpoints(cfg: SuiteConfig, tmp: Path) -> tuple[str, str]:
    from model import testing as tiny
    lm, vit = tmp / "lm", tmp / "vit"
    if not (lm / "config.json").exists():
        init = torch.device(cfg.device) if cfg.device.startswith("cuda") else torch.device("cpu")
        with init:  # random init on the GPU: seconds, not minutes, for 1B parameters
            tiny.write_tokenizer(lm)
            tiny.write_llama(lm, vocab_size=cfg.lm_vocab, hidden_size=cfg.lm_hidden, num_layers=cfg.lm_layers,
                             intermediate_size=cfg.lm_intermediate, num_heads=cfg.lm_heads,
                             num_kv_heads=cfg.lm_kv_heads)
            write_vision_tower(vit, cfg)
    return str(lm), str(vit)


def build_model(cfg: SuiteConfig, lm: str, vit: str, freeze_lm: bool):
    from model.cogvlm import VisualExpertConfig, VisualExpertForCausalLM
    model = VisualExpertForCausalLM.from_config(VisualExpertConfig(lm=lm, vision=vit, freeze_lm=freeze_lm))
    return model.to(cfg.device)


def peak_tflops(cfg: SuiteConfig) -> tuple[float | None, str]:
    if cfg.peak_tflops:
        return cfg.peak_tflops, "--peak-tflops"
    if not cfg.device.startswith("cuda"):
        return None, "no GPU"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"table entry {key!r} for {name!r}"
    return None, f"{name!r} is not in the table: pass --peak-tflops"


def section_training(cfg: SuiteConfig, tmp: Path) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    lm, vit = write_checkpoints(cfg, tmp)
    gen = torch.Generator().manual_seed(0)
    B, T = cfg.train_batch_size, cfg.train_text_tokens
    ids = torch.randint(4, cfg.lm_vocab, (B, T), generator=gen)
    ids[:, 0] = 1
    pixels = torch.randn(B, 3, cfg.vit_image_size, cfg.vit_image_size, generator=gen)
    ids, pixels = ids.to(cfg.device), pixels.to(cfg.device)
    on_gpu = cfg.device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else (
        lambda: torch.autocast("cpu", enabled=False))
    peak, peak_from = peak_tflops(cfg)
    results = {}
    for setting, freeze_lm in (("stage2_lm_frozen", True), ("lm_unfrozen", False)):
        model = build_model(cfg, lm, vit, freeze_lm).train()
        N = model.num_image_tokens
        opt = torch.optim.AdamW(model.param_groups(lr=1e-5, weight_decay=0.0), lr=1e-5, **({"fused": True} if on_gpu else {}))

        def step():
            with autocast():
                loss = model(ids, pixel_values=pixels, labels=ids, logits_to_keep="labels").loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.config.gradient_checkpointing = False
        with FlopCounterMode(display=False) as fc:
            with autocast():
                loss = model(ids, pixel_values=pixels, labels=ids, logits_to_keep="labels").loss
            loss.backward()
        opt.zero_grad(set_to_none=True)
        flops = fc.get_total_flops()

        def side(ckpt: bool):
            def run():
                model.config.gradient_checkpointing = ckpt
                for _ in range(cfg.train_steps):
                    step()
            return run

        peaks: dict = {}
        timing = interleaved({"no_checkpointing": tracked(side(False), cfg.device, peaks, "no_checkpointing"),
                              "checkpointing": tracked(side(True), cfg.device, peaks, "checkpointing")},
                             rounds=2, warmup=1, sync=gpu_sync(cfg.device))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        res = {"parameters": total, "trainable_parameters": trainable, "tokens_per_step": B * (N + T),
               "flops_per_step": flops}
        for name, secs in timing["wall"].items():
            per_step = [s / cfg.train_steps for s in secs]
            med = statistics.median(per_step)
            res[name] = {"step_seconds": spread(per_step) | {"all": per_step},
                         "tokens_per_s": B * (N + T) / med,
                         "mfu": None if peak is None else flops / med / (peak * 1e12),
                         "peak_memory_gib": peaks.get(name)}
        results[setting] = res
        del model, opt
        if on_gpu:
            torch.cuda.empty_cache()
    return {
        "lm": f"Llama {cfg.lm_layers} x {cfg.lm_hidden}, GQA {cfg.lm_heads}/{cfg.lm_kv_heads}, FFN {cfg.lm_intermediate}, "
              f"vocab {cfg.lm_vocab}", "vision": f"CLIP ViT {cfg.vit_layers} x {cfg.vit_hidden} /{cfg.vit_patch} at "
              f"{cfg.vit_image_size} px (last layer dropped), frozen",
        "batch": f"{B} x ({(cfg.vit_image_size // cfg.vit_patch) ** 2} image + {T} text) tokens",
        "steps_per_round": cfg.train_steps, "rounds": 2, "peak_tflops_bf16": peak, "peak_from": peak_from,
        "recipe": "fp32 weights, bf16 autocast, fused AdamW over model.param_groups, logits only at labelled positions",
        "mfu_flops": "one step's forward + backward FLOPs by torch.utils.flop_counter without checkpointing "
                     "(model FLOPs; recomputation not counted), over median step seconds",
        "settings": results, "target": "MFU >= 45 %",
    }


def section_evaluation(cfg: SuiteConfig, tmp: Path) -> dict:
    lm, vit = write_checkpoints(cfg, tmp)
    model = build_model(cfg, lm, vit, freeze_lm=True).eval()
    world, images = world_images(cfg.eval_batch_size, cfg.image_size, seed=7)
    phrases = [w.objects[0].phrase for w in world]
    on_gpu = cfg.device.startswith("cuda")

    def rec():
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False):
            model.predict_boxes(images, phrases, max_new_tokens=cfg.eval_new_tokens, eos_token_id=-1)

    timing = interleaved({"rec_generate": rec}, rounds=cfg.eval_rounds, warmup=1, sync=gpu_sync(cfg.device))
    del model
    return {"batch_size": cfg.eval_batch_size, "new_tokens": cfg.eval_new_tokens, "rounds": cfg.eval_rounds,
            "samples_per_s": rate(cfg.eval_batch_size, timing["wall"]["rec_generate"]),
            "what": "model.predict_boxes on a batch of images and phrases: preprocessing, prefill of 256 image + prompt "
                    "tokens, greedy decoding with the KV cache, every row decoding all new_tokens (EOS ignored)"}


# --- summary ---------------------------------------------------------------------------------------

def summary_rows(sections: dict) -> list[tuple[str, str]]:
    rows = []
    d = sections.get("detector")
    if d:
        for k, v in d["images_per_s"].items():
            mem = f", {v['peak_memory_gib']} GiB" if v["peak_memory_gib"] is not None else ""
            rows.append((f"detector {k}", f"{v['per_s_median']:.2f} images/s{mem}"))
        for k, v in d["speedup_over_fp32_b1"].items():
            rows.append((f"detector {k} / fp32_b1", f"{v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})"))
    f = sections.get("feeding")
    if f:
        rows.append(("feeding: CPU ms per image", ", ".join(f"{k} {v:.1f}" for k, v in f["cpu_ms_per_image"].items())))
        rows.append(("feeding: images/s per core", f"{f['images_per_s_per_core']:.1f} "
                                                   f"({f['images_per_s_per_core_with_download_resize']:.1f} with resize)"))
        if f["cores_per_gpu"] is not None:
            rows.append(("feeding: cores per GPU", f"{f['cores_per_gpu']:.1f} "
                                                   f"({f['cores_per_gpu_with_download_resize']:.1f} with resize)"))
    j = sections.get("job")
    if j:
        r = j["ratio"]
        rows.append(("job / detector-only", f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}); job "
                                            f"{j['job_images_per_s']['per_s_median']:.2f}, detector "
                                            f"{j['detector_only_images_per_s']['per_s_median']:.2f} images/s"))
    t = sections.get("training")
    if t:
        for setting, res in t["settings"].items():
            for name in ("no_checkpointing", "checkpointing"):
                v = res[name]
                mfu = f", MFU {v['mfu']:.1%}" if v["mfu"] is not None else ""
                mem = f", {v['peak_memory_gib']} GiB" if v["peak_memory_gib"] is not None else ""
                rows.append((f"train {setting} {name}", f"{v['tokens_per_s']:.0f} tokens/s{mfu}{mem}"))
    e = sections.get("evaluation")
    if e:
        rows.append((f"REC generate batch {e['batch_size']}", f"{e['samples_per_s']['per_s_median']:.2f} samples/s"))
    return rows


def run(cfg: SuiteConfig, argv: Sequence[str] | None) -> dict:
    t_start = time.perf_counter()
    info = machine()
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    sections: dict = {}
    seconds: dict = {}
    failed: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        for name in SECTIONS:
            if name not in cfg.sections:
                continue
            t0 = time.perf_counter()
            print(f"[{time.perf_counter() - t_start:6.1f} s] {name} ...", flush=True)
            try:
                if name == "feeding":  # cores per GPU need the detector's GPU rate, measured just before
                    gpu = sections.get("detector", {}).get("best_images_per_s")
                    sections[name] = section_feeding(cfg, Path(tmp), gpu)
                else:
                    sections[name] = {"detector": section_detector, "job": section_job, "training": section_training,
                                      "evaluation": section_evaluation}[name](cfg, Path(tmp))
            except Exception as e:  # noqa: BLE001 - on a briefly lent GPU, keep the other sections' figures
                if cfg.dry_run:
                    raise
                failed[name] = "".join(traceback.format_exception(e))[-2000:]
                print(f"{name} FAILED:\n{failed[name]}", flush=True)
            seconds[name] = round(time.perf_counter() - t0, 1)
            if cfg.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the next section (or the job's Ray actors) gets the whole GPU
    rows = summary_rows(sections)
    width = max(len(k) for k, _ in rows) if rows else 10
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    result = {
        "suite": "gpu", "mode": "dry_run" if cfg.dry_run else "full", "config": dataclasses.asdict(cfg),
        "machine": info, "load_average_at_end": load_now(), "seconds_per_section": seconds,
        "total_seconds": round(time.perf_counter() - t_start, 1), "sections": sections, "failed": failed,
        "not_run": {s: "not selected (--sections)" + ("" if torch.cuda.is_available() else "; this machine has no GPU")
                    for s in SECTIONS if s not in cfg.sections},
        "summary": [{"figure": k, "value": v} for k, v in rows],
        "command": "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(cfg.out or RESULTS / ("gpu_dry_run.json" if cfg.dry_run else "gpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['total_seconds']} s in all; wrote {out}" + (f"; FAILED: {sorted(failed)}" if failed else ""))
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, every code path (CI)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=None)
    ap.add_argument("--device", default=None, help="default cuda (cpu for --dry-run)")
    ap.add_argument("--compile", action="store_true", help="also time the detector under torch.compile")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in (("sections", tuple(args.sections) if args.sections else None),
                                   ("device", args.device), ("peak_tflops", args.peak_tflops),
                                   ("out", args.out)) if v is not None}
    if args.compile:
        overrides["compile"] = True
    if args.sections == ["feeding"] and args.device is None and not torch.cuda.is_available():
        overrides["device"] = "cpu"
    cfg = dry_run(**overrides) if args.dry_run else full(**overrides)
    if not cfg.device.startswith("cuda"):
        torch.set_num_threads(1)  # small CPU models run fastest on one thread (and share the machine)
    torch.manual_seed(0)
    return run(cfg, argv)


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
