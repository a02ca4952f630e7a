"""Test and demo fixtures of the model side: tiny random-init checkpoints written with ``save_pretrained``,
for tests, the training ``debug`` preset and the benchmarks (never used by a real run). Nothing comes from the model hub: the tokenizer is a small byte-level BPE trained
here on synthetic-world text (captions and REC QA strings), digits split one per token so box
coordinates like ``[[012,345,678,901]]`` always tokenize the same way.

Each ``write_*`` function writes one directory that ``from_pretrained`` (and
:class:`model.cogvlm.VisualExpertForCausalLM`) loads back, and returns its path.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
    MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig,
    SiglipVisionModel,
)

from grounding.boxes import format_answer, format_question, prompt_and_target
from grounding.image import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from grounding.world import make_world

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def world_corpus(n_images: int = 200, seed: int = 0) -> list[str]:
    """Captions, REC questions/prompts and box answers of a synthetic world (tokenizer training)."""
    rng = random.Random(seed)
    texts = []
    for im in make_world(n_images, seed=seed):
        texts.append(im.caption)
        for o in im.objects:
            box = tuple(rng.randrange(1000) for _ in range(4))
            box = (min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3]))
            prompt, target = prompt_and_target(format_question(o.phrase), format_answer([box]))
            texts.append(prompt + target)
    return texts


def write_tokenizer(path: str | os.PathLike, vocab_size: int = 384, with_bos_and_pad: bool = True) -> str:
    """A byte-level BPE (digits split individually) saved as a PreTrainedTokenizerFast.

    ``<pad>`` 0, ``<s>`` 1 (BOS), ``</s>`` 2 (EOS), ``<unk>`` 3. No post-processor: encoding never
    adds BOS/EOS by itself; the model's ``tokenize_prompts`` and the trainer add them.
    ``with_bos_and_pad=False`` declares neither BOS nor pad token, as Qwen2's tokenizer.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(world_corpus(), trainer=trainer)
    specials = dict(pad_token="<pad>", bos_token="<s>") if with_bos_and_pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **specials)
    fast.save_pretrained(str(path))
    return str(path)


def _lm_kwargs(vocab_size: int, hidden_size: int, num_layers: int, seed: int, intermediate_size: int | None = None,
               num_heads: int = 4, num_kv_heads: int = 2) -> dict:
    torch.manual_seed(seed)
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                max_position_embeddings=1024, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                eos_token_id=EOS_ID, initializer_range=0.1)


def write_llama(path: str | os.PathLike, vocab_size: int = 384, hidden_size: int = 64, num_layers: int = 2,
                rope_parameters: dict | None = None, tie_word_embeddings: bool = False, seed: int = 0,
                intermediate_size: int | None = None, num_heads: int = 4, num_kv_heads: int = 2) -> str:
    """A small random ``LlamaForCausalLM`` (default: GQA with 4 query heads, 2 KV heads)."""
    kw = _lm_kwargs(vocab_size, hidden_size, num_layers, seed, intermediate_size, num_heads, num_kv_heads)
    if rope_parameters is not None:
        kw["rope_parameters"] = rope_parameters
    LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=tie_word_embeddings)).save_pretrained(str(path))
    return str(path)


def write_qwen2(path: str | os.PathLike, vocab_size: int = 384, hidden_size: int = 64, num_layers: int = 2,
                seed: int = 0) -> str:
    """A tiny ``Qwen2ForCausalLM``: q/k/v biases, tied embeddings, rope theta 1e6, as Qwen2-0.5B."""
    kw = _lm_kwargs(vocab_size, hidden_size, num_layers, seed)
    config = Qwen2Config(**kw, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # HF zero-initialises biases: give them values so a dropped bias shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    return str(path)


def write_mistral(path: str | os.PathLike, vocab_size: int = 384, hidden_size: int = 64, num_layers: int = 2,
                  seed: int = 0) -> str:
    """A tiny ``MistralForCausalLM`` with an explicit ``head_dim`` (not hidden/heads), as Mistral-Nemo."""
    kw = _lm_kwargs(vocab_size, hidden_size, num_layers, seed)
    MistralForCausalLM(MistralConfig(**kw, head_dim=24, sliding_window=None)).save_pretrained(str(path))
    return str(path)


def _write_preprocessor(path: Path, image_size: int, mean, std) -> None:
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(mean), "image_std": list(std), "size": {"height": image_size, "width": image_size}}))


def write_clip_vision(path: str | os.PathLike, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                      num_layers: int = 3, seed: int = 0) -> str:
    """A tiny ``CLIPVisionModel`` (+ preprocessor_config.json with CLIP's mean/std)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                              intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                              num_attention_heads=4, projection_dim=hidden_size)
    CLIPVisionModel(config).save_pretrained(str(path))
    _write_preprocessor(Path(path), image_size, CLIP_MEAN, CLIP_STD)
    return str(path)


def write_siglip_vision(path: str | os.PathLike, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                        num_layers: int = 3, seed: int = 0) -> str:
    """A tiny ``SiglipVisionModel`` (no CLS token; mean/std 0.5)."""
    torch.manual_seed(seed)
    config = SiglipVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                                intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                                num_attention_heads=4)
    SiglipVisionModel(config).save_pretrained(str(path))
    _write_preprocessor(Path(path), image_size, SIGLIP_MEAN, SIGLIP_STD)
    return str(path)


def write_debug_checkpoints(root: str | os.PathLike) -> tuple[str, str]:
    """Tiny Llama (with the world tokenizer) and tiny CLIP under ``root``, unless already there.

    Returns ``(lm_dir, vision_dir)``.
    """
    root = Path(root)
    lm, vision = root / "tiny-llama", root / "tiny-clip"
    if not (lm / "config.json").exists() or not (lm / "tokenizer.json").exists():
        write_tokenizer(lm)
        write_llama(lm)
    if not (vision / "config.json").exists():
        write_clip_vision(vision)
    return str(lm), str(vision)


def write_debug_model(root: str | os.PathLike):
    """Writes the tiny debug checkpoints under ``root`` (unless already there) and returns the
    :class:`model.cogvlm.VisualExpertConfig` that loads them: what ``model="debug"`` trains."""
    from model.cogvlm import VisualExpertConfig

    lm, vision = write_debug_checkpoints(root)
    return VisualExpertConfig(lm=lm, vision=vision)
