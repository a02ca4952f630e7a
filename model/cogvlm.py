"""CogVLM's visual-expert model (arXiv 2311.03079, section 2.1) on any Llama-family causal LM.

A ViT (transformers' CLIP or SigLIP vision tower, last layer and CLS token dropped) encodes the
image; a two-layer SwiGLU adapter maps its patch features to the LM's hidden size; the N image
embeddings are inserted right after each row's BOS. Every decoder layer has a *visual expert*: its
own fused QKV projection, attention output projection and SwiGLU FFN for image tokens, shaped as the
LM's and initialised as copies of them. Image tokens only ever go through the expert weights, text
tokens only through the LM's; attention is shared over the whole sequence with a causal mask (also
between image tokens). Position ids: BOS 0, every image token 1, text continues 2, 3, ... Without an
image the model is exactly the LM (same logits as HF's ``AutoModelForCausalLM``).

Routing. The residual stream is kept as two flat streams for the whole forward pass: text tokens
``(B*T, D)`` and image tokens ``(B*N, D)``. Norms, projections and FFNs run on each stream with its
own weights (so FLOPs equal the plain LM's). Only attention needs the sequence order: per layer one
permutation gather merges the two streams' QKV into ``(B, L, ...)`` and one splits the attention
output back. The permutation is computed once per batch from the attention mask, on device, with
no host sync (the one sync per forward call asks whether the batch has padding at all, to use SDPA's
causal fast path when it has none). ``forward(..., logits_to_keep="labels")`` runs the LM head only
where a next-token label exists (not on the image tokens): same loss, less work. ``shallow=True`` (the BLIP-2/LLaVA-style ablation) has no experts: image tokens go
through the LM's weights and no routing is done at all.

Supported LMs: Llama, Qwen2 (q/k/v biases, tied embeddings), Mistral (explicit ``head_dim``); rope
types default, linear, llama3 and yarn (each tested against HF); ``dynamic`` and ``longrope`` raise. Mistral's sliding window is
not implemented: a sequence longer than the LM's ``sliding_window`` raises instead of silently
differing from the LM. Tokenizer: the LM's own; no image tokens are added to the vocabulary (the
image embeddings are spliced in after BOS). A tokenizer without a BOS token (Qwen2) uses its EOS
token as the sequence start; one without a pad token pads with EOS.

Images are resized straight to ``image_size`` x ``image_size`` (no centre crop, so boxes in
normalised 000-999 coordinates keep referring to the whole image), then normalised with the
tower's mean/std (``preprocessor_config.json`` if present, else CLIP's or SigLIP's defaults).
"""
from __future__ import annotations

import contextlib
import json
import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoTokenizer, CLIPVisionModel, SiglipVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from grounding.boxes import format_question, prompt_and_target, try_parse_boxes
from grounding.image import NORMALIZATION, ImageTransform, decode_image

LM_TYPES = ("llama", "qwen2", "mistral")
VISION_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE_INDEX = -100


@dataclass
class VisualExpertConfig:
    lm: str                            # hub id or local dir of an HF Llama/Qwen2/Mistral causal LM (safetensors)
    vision: str                        # hub id or local dir of a CLIP or SigLIP vision tower (or full CLIP/SigLIP)
    image_size: int | None = None      # None -> the tower's own; 224 / 490 in the paper
    shallow: bool = False              # adapter only, no experts (the ablation the paper argues against)
    freeze_lm: bool = True
    freeze_vision: bool = True
    lm_lr_mult: float = 0.1            # LR multiplier for LM weights when unfrozen (CogVLM SFT: 10%)
    drop_last_vision_layer: bool = True
    attn_implementation: str = "sdpa"  # "sdpa" (torch scaled_dot_product_attention) or "eager"
    dtype: str = "float32"             # weights' dtype: float32 / bfloat16 / float16
    adapter_intermediate_size: int | None = None  # None -> the LM's intermediate_size
    seed: int = 0                      # initialisation of the adapter
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (training only)

    def __post_init__(self):
        if not isinstance(self.lm, str) or not self.lm:
            raise ValueError(f"lm must be a hub id or a directory, got {self.lm!r}")
        if not isinstance(self.vision, str) or not self.vision:
            raise ValueError(f"vision must be a hub id or a directory, got {self.vision!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size <= 0):
            raise ValueError(f"image_size must be a positive int or None, got {self.image_size!r}")
        if not (isinstance(self.lm_lr_mult, (int, float)) and self.lm_lr_mult >= 0):
            raise ValueError(f"lm_lr_mult must be >= 0, got {self.lm_lr_mult!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.adapter_intermediate_size is not None and self.adapter_intermediate_size <= 0:
            raise ValueError(f"adapter_intermediate_size must be positive, got {self.adapter_intermediate_size}")


# --- loading ---------------------------------------------------------------------------------

def is_local_path(name: str) -> bool:
    """A path, not a hub id (``org/name``): absolute, ``./`` or ``../``, or more than one ``/``."""
    return os.path.isabs(name) or name.startswith(".") or name.count("/") > 1


def resolve_dir(name_or_path: str) -> Path:
    """A local directory as is; a hub id (``org/name``) through the hub cache (configs, tokenizer, safetensors).

    A path that is no directory (absolute, ``./...``, or more than one ``/``), or a hub id that cannot be
    fetched (offline, unknown), raises :class:`FileNotFoundError` naming it.
    """
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    if is_local_path(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such model directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except (HFValidationError, OSError) as e:
        raise FileNotFoundError(f"{name_or_path}: not a local directory, and not available from the hub "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


class SafetensorsCheckpoint:
    """Read-on-demand view of ``model.safetensors`` or of the shards named in
    ``model.safetensors.index.json``: ``ckpt[key]`` reads one tensor, so loading a large LM never
    holds a second full copy of it in memory."""

    def __init__(self, directory: Path):
        from safetensors import safe_open
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").exists():
            with safe_open(str(directory / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
        self.weight_map = weight_map
        self.handles = {name: safe_open(str(directory / name), "pt") for name in sorted(set(weight_map.values()))}

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.handles[self.weight_map[key]].get_tensor(key)


# --- LM building blocks (structure of HF's modeling_llama) --------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):  # (..., D)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary position ids, from the LM config's rope settings."""

    def __init__(self, lm_config):
        super().__init__()
        rope = dict(getattr(lm_config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"rope_type {rope_type!r} changes with sequence length and is not supported")
        if rope_type == "default":
            dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // lm_config.num_attention_heads
            base = rope.get("rope_theta", getattr(lm_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](lm_config)
        self.inv_freq = inv_freq.float()  # a plain attribute: stays fp32 under model.to(bfloat16)
        self.attention_scaling = float(scaling)

    @torch.no_grad()
    def forward(self, position_ids, dtype):  # (B, L) -> cos, sin (B, 1, L, hd)
        if self.inv_freq.device != position_ids.device:  # follow the model once, not a copy per call
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, out_size: int | None = None, bias: bool = False):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, out_size or hidden_size, bias=bias)

    def forward(self, x):  # (..., D) -> (..., D_out)
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Permute(torch.autograd.Function):
    """``x.index_select(0, index)`` for a permutation, whose backward is the inverse gather
    (no scatter-add): ``index`` and ``inverse`` are each other's inverse."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass
class RoutedBatch:
    """Per-forward routing and attention state, computed once (no per-layer work or host sync).

    ``merge`` (text (B*T, .), vision (B*N, .)) -> (B, L, .) in sequence order; ``split`` the reverse.
    ``merge_index[c]`` is the row of ``cat(text, vision)`` that goes to flat sequence slot ``c``;
    ``split_index`` is its inverse. Both are None when no routing is needed (no image, or shallow).
    """
    batch_size: int
    length: int                             # L: the new tokens' sequence length
    cos: torch.Tensor                       # (B, 1, L, hd)
    sin: torch.Tensor
    attn_mask: torch.Tensor | None          # (B, 1, L, L_past + L) bool, None -> causal / full
    is_causal: bool
    merge_index: torch.Tensor | None = None  # (B*L,)
    split_index: torch.Tensor | None = None  # (B*L,)
    num_text: int = 0                       # rows of the text stream (B*T)
    label_index: torch.Tensor | None = None  # (B*L,) slot -> row of cat(labels, ignore); also when shallow
    positions: torch.Tensor | None = None    # (B, L) rope position ids
    vision_token_mask: torch.Tensor | None = None  # (B, L) bool, True at image tokens (None: no image)

    def merge(self, text, vision):  # (B*T, C), (B*N, C) -> (B, L, C)
        if self.merge_index is None:
            return text.view(self.batch_size, self.length, -1)
        x = Permute.apply(torch.cat([text, vision], 0), self.merge_index, self.split_index)
        return x.view(self.batch_size, self.length, -1)

    def split(self, x):  # (B, L, C) -> (B*T, C), (B*N, C)
        x = x.reshape(self.batch_size * self.length, -1)
        if self.split_index is None:
            return x, None
        x = Permute.apply(x, self.split_index, self.merge_index)
        text, vision = x.split([self.num_text, x.shape[0] - self.num_text])  # backward: one cat, no zero-fill
        return text, vision


@dataclass
class KVCache:
    """Keys/values per layer (after rope) in sequence order, the key padding mask and next positions."""
    layers: list = field(default_factory=list)   # [(k, v)] each (B, Hkv, L_past, hd)
    key_mask: torch.Tensor | None = None         # (B, L_past) bool
    next_position: torch.Tensor | None = None    # (B,) position id of the next token

    def get_seq_length(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]


class VisualExpertAttention(nn.Module):
    """Shared causal self-attention; QKV and output projections per token type."""

    def __init__(self, lm_config, shallow: bool, attn_implementation: str):
        super().__init__()
        c = lm_config
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.attn_implementation = attn_implementation
        qkv_bias = c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False))
        o_bias = bool(getattr(c, "attention_bias", False))
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.language_expert_query_key_value = nn.Linear(c.hidden_size, qkv_out, bias=qkv_bias)
        self.language_expert_dense = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=o_bias)
        if not shallow:
            self.vision_expert_query_key_value = nn.Linear(c.hidden_size, qkv_out, bias=qkv_bias)
            self.vision_expert_dense = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=o_bias)

    def forward(self, text, vision, batch: RoutedBatch, past: tuple | None):
        # text (B*T, D), vision (B*N, D) | None
        qkv_t = self.language_expert_query_key_value(text)
        qkv_v = None if vision is None else self.vision_expert_query_key_value(vision)
        qkv = batch.merge(qkv_t, qkv_v)  # (B, L, (H + 2 Hkv) hd)
        B, L, _ = qkv.shape
        hd, H, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = qkv.view(B, L, H + 2 * Hkv, hd).transpose(1, 2).split([H, Hkv, Hkv], dim=1)  # (B, h, L, hd)
        q = q * batch.cos + rotate_half(q) * batch.sin
        k = k * batch.cos + rotate_half(k) * batch.sin
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        present = (k, v)
        if self.attn_implementation == "sdpa" and batch.attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=batch.is_causal, scale=self.scaling,
                                                 enable_gqa=H != Hkv)
        else:
            if H != Hkv:
                k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            mask = batch.attn_mask
            if mask is None and batch.is_causal:
                mask = torch.ones(L, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - L)
            if self.attn_implementation == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            else:
                w = (q @ k.transpose(2, 3)) * self.scaling
                if mask is not None:
                    w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
                out = w.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        out = out.transpose(1, 2).reshape(B, L, H * hd)  # (B, L, H hd)
        out_t, out_v = batch.split(out)
        out_t = self.language_expert_dense(out_t)
        out_v = None if out_v is None else self.vision_expert_dense(out_v)
        return out_t, out_v, present


class VisualExpertMLP(nn.Module):
    def __init__(self, lm_config, shallow: bool):
        super().__init__()
        bias = bool(getattr(lm_config, "mlp_bias", False))
        self.language_mlp = SwiGLU(lm_config.hidden_size, lm_config.intermediate_size, bias=bias)
        if not shallow:
            self.vision_mlp = SwiGLU(lm_config.hidden_size, lm_config.intermediate_size, bias=bias)

    def forward(self, text, vision):
        return self.language_mlp(text), None if vision is None else self.vision_mlp(vision)


class VisualExpertDecoderLayer(nn.Module):
    def __init__(self, lm_config, shallow: bool, attn_implementation: str):
        super().__init__()
        self.self_attn = VisualExpertAttention(lm_config, shallow, attn_implementation)
        self.mlp = VisualExpertMLP(lm_config, shallow)
        self.input_layernorm = RMSNorm(lm_config.hidden_size, lm_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(lm_config.hidden_size, lm_config.rms_norm_eps)

    def forward(self, text, vision, batch: RoutedBatch, past=None):
        # text (B*T, D), vision (B*N, D) | None; the norms are shared (CogVLM keeps the LM's)
        a_t, a_v, present = self.self_attn(self.input_layernorm(text),
                                           None if vision is None else self.input_layernorm(vision), batch, past)
        text = text + a_t
        vision = None if vision is None else vision + a_v
        m_t, m_v = self.mlp(self.post_attention_layernorm(text),
                            None if vision is None else self.post_attention_layernorm(vision))
        return text + m_t, None if vision is None else vision + m_v, present


class VisualExpertModel(nn.Module):
    """The decoder: embeddings, layers, final norm (keys mirror HF's ``model.*``)."""

    def __init__(self, lm_config, shallow: bool, attn_implementation: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(lm_config.vocab_size, lm_config.hidden_size)
        self.layers = nn.ModuleList(VisualExpertDecoderLayer(lm_config, shallow, attn_implementation)
                                    for _ in range(lm_config.num_hidden_layers))
        self.norm = RMSNorm(lm_config.hidden_size, lm_config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(lm_config)


# --- vision side -------------------------------------------------------------------------------

class VisionTower(nn.Module):
    """A transformers CLIP/SigLIP vision tower: patch features of the second-to-last layer (the
    last is dropped, as CogVLM does), CLS removed (CLIP), no final layernorm or pooling head."""

    def __init__(self, name_or_path: str, image_size: int | None, drop_last_layer: bool, dtype):
        super().__init__()
        directory = resolve_dir(name_or_path)
        vision_config = AutoConfig.from_pretrained(str(directory))
        kind = VISION_TYPES.get(vision_config.model_type)
        if kind is None:
            raise ValueError(f"vision tower must be CLIP or SigLIP, got model_type {vision_config.model_type!r}")
        cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
        tower = cls.from_pretrained(str(directory), dtype=dtype)
        self.kind = kind
        self.tower_config = tower.config
        if drop_last_layer:
            tower.encoder.layers = tower.encoder.layers[:-1]
        tower.post_layernorm = nn.Identity()
        if hasattr(tower, "head"):
            tower.head = nn.Identity()
        self.tower = tower
        self.image_size = image_size or tower.config.image_size
        self.patch_size = tower.config.patch_size
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.hidden_size = tower.config.hidden_size
        mean, std = NORMALIZATION[kind]
        pre = directory / "preprocessor_config.json"
        if pre.exists():
            p = json.loads(pre.read_text())
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
        self.transform = ImageTransform(int(self.image_size), tuple(mean), tuple(std))  # picklable: loader workers

    def preprocess(self, images) -> torch.Tensor:  # list[PIL] -> (B, 3, S, S) float32
        return self.transform.batch(images)

    def forward(self, pixel_values):  # (B, 3, S, S) -> (B, N, Dv)
        t = self.tower
        interpolate = self.image_size != self.tower_config.image_size
        h = t.embeddings(pixel_values.to(t.embeddings.patch_embedding.weight.dtype), interpolate_pos_encoding=interpolate)
        if self.kind == "clip":
            h = t.pre_layrnorm(h)
        h = t.encoder(inputs_embeds=h).last_hidden_state
        return h[:, 1:] if self.kind == "clip" else h


# --- the model ---------------------------------------------------------------------------------

class VisualExpertForCausalLM(nn.Module):
    """Vision tower + SwiGLU adapter + visual-expert decoder + LM head; see the module docstring."""

    def __init__(self, config: VisualExpertConfig, lm_config, vision: VisionTower, tokenizer, device=None):
        super().__init__()
        if lm_config.model_type not in LM_TYPES:
            raise ValueError(f"LM must be one of {LM_TYPES}, got model_type {lm_config.model_type!r}")
        self.config = config
        self.lm_config = lm_config
        self.tokenizer = tokenizer
        self.vision = vision
        self.num_image_tokens = vision.num_patches
        with torch.device(device) if device is not None else contextlib.nullcontext():  # "meta": from_config loads
            self.adapter = SwiGLU(vision.hidden_size, config.adapter_intermediate_size or lm_config.intermediate_size,
                                  out_size=lm_config.hidden_size)
            self.model = VisualExpertModel(lm_config, config.shallow, config.attn_implementation)
            self.lm_head = nn.Linear(lm_config.hidden_size, lm_config.vocab_size, bias=False)
        if getattr(lm_config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.sliding_window = (getattr(lm_config, "sliding_window", None)
                               if lm_config.model_type == "mistral" or getattr(lm_config, "use_sliding_window", False)
                               else None)
        self.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---- construction ----

    @classmethod
    def from_config(cls, config: VisualExpertConfig) -> "VisualExpertForCausalLM":
        """Load the LM (weights into our layers, experts as copies) and the tower; freeze per config."""
        dtype = DTYPES[config.dtype]
        lm_dir = resolve_dir(config.lm)
        lm_config = AutoConfig.from_pretrained(str(lm_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
        if tokenizer.bos_token is None:
            tokenizer.bos_token = tokenizer.eos_token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        vision = VisionTower(config.vision, config.image_size, config.drop_last_vision_layer, dtype)
        model = cls(config, lm_config, vision, tokenizer, device="meta")  # no random init of LM-sized weights
        for module in (model.adapter, model.model, model.lm_head):
            module.to(dtype).to_empty(device="cpu")  # storage allocated once, in the target dtype
        model.model.rotary_emb = RotaryEmbedding(lm_config)
        if getattr(lm_config, "tie_word_embeddings", False):
            model.lm_head.weight = model.model.embed_tokens.weight
        model.load_lm_state_dict(SafetensorsCheckpoint(lm_dir))
        torch.manual_seed(config.seed)
        model._init_adapter()
        model.to(dtype)
        model.set_trainable()
        return model

    def _init_adapter(self):
        std = getattr(self.lm_config, "initializer_range", 0.02)
        for lin in (self.adapter.gate_up_proj, self.adapter.down_proj):
            nn.init.normal_(lin.weight, 0.0, std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    @torch.no_grad()
    def load_lm_state_dict(self, sd) -> None:
        """HF Llama/Qwen2/Mistral keys -> ours (q/k/v fused, gate/up fused), experts as copies."""
        def take(key):
            if key not in sd:
                raise KeyError(f"LM checkpoint lacks {key!r}")
            return sd[key]

        m = self.model
        m.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
        m.norm.weight.copy_(take("model.norm.weight"))
        if not getattr(self.lm_config, "tie_word_embeddings", False):
            self.lm_head.weight.copy_(take("lm_head.weight"))
        for i, layer in enumerate(m.layers):
            p = f"model.layers.{i}."
            a = layer.self_attn
            qkv_w = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], 0)
            attn = {"language_expert_query_key_value.weight": qkv_w,
                    "language_expert_dense.weight": take(p + "self_attn.o_proj.weight")}
            if a.language_expert_query_key_value.bias is not None:
                attn["language_expert_query_key_value.bias"] = torch.cat(
                    [take(p + f"self_attn.{n}_proj.bias") for n in "qkv"], 0)
            if a.language_expert_dense.bias is not None:
                attn["language_expert_dense.bias"] = take(p + "self_attn.o_proj.bias")
            mlp = {"gate_up_proj.weight": torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0),
                   "down_proj.weight": take(p + "mlp.down_proj.weight")}
            if layer.mlp.language_mlp.down_proj.bias is not None:
                mlp["gate_up_proj.bias"] = torch.cat([take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")], 0)
                mlp["down_proj.bias"] = take(p + "mlp.down_proj.bias")
            for k, v in attn.items():
                a.get_parameter(k).copy_(v)
                if not self.config.shallow:
                    a.get_parameter(k.replace("language_expert", "vision_expert")).copy_(v)
            for k, v in mlp.items():
                layer.mlp.language_mlp.get_parameter(k).copy_(v)
                if not self.config.shallow:
                    layer.mlp.vision_mlp.get_parameter(k).copy_(v)
            layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))

    # ---- parameters ----

    def _is_lm_param(self, name: str) -> bool:
        return name.startswith(("model.", "lm_head.")) and ".vision_" not in name

    def _is_new_param(self, name: str) -> bool:
        return name.startswith("adapter.") or ".vision_" in name

    def set_trainable(self) -> None:
        """Experts + adapter trainable; LM and ViT per ``freeze_lm`` / ``freeze_vision``."""
        for name, p in self.named_parameters():
            if self._is_new_param(name):
                p.requires_grad_(True)
            elif self._is_lm_param(name):
                p.requires_grad_(not self.config.freeze_lm)
            else:  # vision.*
                p.requires_grad_(not self.config.freeze_vision)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: new weights (experts, adapter, unfrozen ViT) at ``lr``, unfrozen LM weights at
        ``lr * lm_lr_mult``; no weight decay on biases and norm weights (1-D tensors)."""
        buckets: dict[tuple[float, float], list] = {}
        names: dict[tuple[float, float], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            group_lr = lr * self.config.lm_lr_mult if self._is_lm_param(name) else lr
            wd = weight_decay if p.ndim >= 2 else 0.0
            buckets.setdefault((group_lr, wd), []).append(p)
            names.setdefault((group_lr, wd), []).append(name)
        return [{"params": ps, "lr": k[0], "weight_decay": k[1], "names": names[k]} for k, ps in buckets.items()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors only (what a stage-two checkpoint must hold), detached, contiguous."""
        return {n: p.detach().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        """``strict``: the keys must be exactly the trainable set; otherwise any subset of the model's
        parameters (e.g. a checkpoint trained with the LM unfrozen, loaded for inference)."""
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        if not strict:
            expected = set(sd) & {n for n, _ in self.named_parameters()} or expected
        missing, unexpected = expected - set(sd), set(sd) - expected
        if missing or unexpected:
            raise KeyError(f"trainable state dict mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        params = dict(self.named_parameters())
        for n, t in sd.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{n}: shape {tuple(t.shape)} != {tuple(params[n].shape)}")
            params[n].copy_(t)

    # ---- inputs ----

    @property
    def image_transform(self) -> ImageTransform:
        """The tower's own PIL -> (3, S, S) transform (picklable: give it to data-loader workers)."""
        return self.vision.transform

    def preprocess(self, images) -> torch.Tensor:
        """PIL images -> (B, 3, S, S) resized (no crop) and normalised for the tower."""
        return self.vision.preprocess(images)

    def encode_images(self, pixel_values) -> torch.Tensor:  # (B, 3, S, S) -> (B, N, D)
        return self.adapter(self.vision(pixel_values.to(self.lm_head.weight.device)))

    def tokenize_prompts(self, prompts: list[str], add_eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``BOS + prompt`` (+ EOS) token ids, left-padded: (input_ids, attention_mask) each (B, T)."""
        rows = [[self.bos_token_id] + self.tokenizer(p, add_special_tokens=False)["input_ids"]
                + ([self.eos_token_id] if add_eos else []) for p in prompts]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        return ids, mask

    # ---- forward ----

    def _prepare(self, input_ids, attention_mask, image_embeds, past: KVCache | None):
        """Streams, routing, positions and masks for one forward call (the only host sync:
        whether the batch has padding, to pick SDPA's causal fast path)."""
        B, T = input_ids.shape
        dev = input_ids.device
        text_mask = (torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None
                     else attention_mask[:, -T:].to(device=dev, dtype=torch.bool))
        text = self.model.embed_tokens(input_ids).reshape(B * T, -1)  # (B*T, D)
        merge_index = split_index = label_index = is_image = None
        vision = None
        if image_embeds is not None:
            image_embeds = image_embeds.to(text.dtype)
            N = image_embeds.shape[1]
            L = T + N
            cols = torch.arange(L, device=dev)
            bos_col = text_mask.int().argmax(1, keepdim=True)  # (B, 1): the first attended token
            is_image = (cols > bos_col) & (cols <= bos_col + N)  # (B, L)
            # text token (b, t) sits at sequence column t (t <= bos) or t + N; image token n at bos + 1 + n
            tcols = torch.arange(T, device=dev)
            text_slot = torch.where(tcols <= bos_col, tcols, tcols + N) + torch.arange(B, device=dev)[:, None] * L
            image_slot = bos_col + 1 + torch.arange(N, device=dev) + torch.arange(B, device=dev)[:, None] * L
            row_to_slot = torch.cat([text_slot.reshape(-1), image_slot.reshape(-1)])  # stream row -> slot
            slot_to_row = torch.empty_like(row_to_slot)
            slot_to_row[row_to_slot] = torch.arange(B * L, device=dev)
            label_index = merge_index = slot_to_row
            split_index = row_to_slot
            key_mask_new = torch.ones(B, L, dtype=torch.bool, device=dev)
            key_mask_new.view(-1)[text_slot.reshape(-1)] = text_mask.reshape(-1)
            text_only_mask = key_mask_new & ~is_image
            positions = torch.where(is_image, 1, text_only_mask.long().cumsum(1) - 1 + (is_image.long().cumsum(1) > 0))
            positions = positions.clamp(min=0)
            if self.config.shallow:
                seq = Permute.apply(torch.cat([text, image_embeds.reshape(B * N, -1)]), merge_index, split_index)
                text, merge_index, split_index = seq, None, None
            else:
                vision = image_embeds.reshape(B * N, -1)
        else:
            L = T
            key_mask_new = text_mask
            positions = key_mask_new.long().cumsum(1) - 1
            if past is not None and past.next_position is not None:
                positions = positions + past.next_position[:, None]
            positions = positions.clamp(min=0)
        past_len = 0 if past is None else past.get_seq_length()
        if self.sliding_window is not None and past_len + L > self.sliding_window:
            raise ValueError(f"sequence of {past_len + L} tokens exceeds the LM's sliding window {self.sliding_window}")
        key_mask = key_mask_new if past is None or past.key_mask is None else torch.cat([past.key_mask, key_mask_new], 1)
        padded = not bool(key_mask.all())  # the one host sync per forward
        if not padded and (past_len == 0 or L == 1):
            attn_mask, is_causal = None, past_len == 0 and L > 1
        else:
            q_idx = torch.arange(L, device=dev)[:, None] + past_len
            k_idx = torch.arange(past_len + L, device=dev)[None, :]
            causal = k_idx <= q_idx  # (L, Lk)
            attn_mask = (causal[None] & key_mask[:, None, :]) | (k_idx == q_idx)[None]  # self always: no NaN rows
            attn_mask, is_causal = attn_mask[:, None], False  # (B, 1, L, Lk)
        cos, sin = self.model.rotary_emb(positions, text.dtype)
        batch = RoutedBatch(B, L, cos, sin, attn_mask, is_causal, merge_index, split_index, num_text=B * T,
                            label_index=label_index, positions=positions, vision_token_mask=is_image)
        next_position = positions.masked_fill(~key_mask_new, -1).max(1).values + 1  # (B,)
        if past is not None and past.next_position is not None:
            next_position = torch.maximum(next_position, past.next_position)
        return text, vision, batch, key_mask, next_position, key_mask_new

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None,
                past_key_values: KVCache | None = None, use_cache: bool = False, image_embeds=None,
                logits_to_keep: str = "all"):
        """See the module docstring. ``image_embeds`` (B, N, D) may replace ``pixel_values``.

        ``logits_to_keep``: "all" -> logits (B, L, V); "last" -> (B, 1, V) at each row's last real token
        (generation's prefill); "labels" -> (M, V) only at the M positions that have a next-token label,
        the same loss without the LM head's work on image and prompt positions (one host sync).
        """
        if logits_to_keep not in ("all", "last", "labels"):
            raise ValueError(f"logits_to_keep must be 'all', 'last' or 'labels', got {logits_to_keep!r}")
        if (labels is None) == (logits_to_keep == "labels") and logits_to_keep != "all":
            raise ValueError(f"logits_to_keep={logits_to_keep!r} " + ("needs labels" if labels is None else
                                                                     "cannot give a loss"))
        if pixel_values is not None and image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        if image_embeds is not None and past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError("images go in the first (prefill) call, not with a non-empty KV cache")
        text, vision, batch, key_mask, next_position, _ = self._prepare(
            input_ids, attention_mask, image_embeds, past_key_values)
        presents = []
        for i, layer in enumerate(self.model.layers):
            past = None if past_key_values is None or not past_key_values.layers else past_key_values.layers[i]
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                text, vision, present = checkpoint(layer, text, vision, batch, past, use_reentrant=False)
            else:
                text, vision, present = layer(text, vision, batch, past)
            if use_cache:
                presents.append(present)
        hidden = batch.merge(self.model.norm(text), None if vision is None else self.model.norm(vision))  # (B, L, D)
        loss = None
        if labels is not None:
            full = self._full_labels(labels.to(hidden.device), batch, image_embeds)  # (B, L)
            shifted = F.pad(full[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # label of each position's next token
            if logits_to_keep == "labels":
                keep = (shifted != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
                hidden, shifted = hidden.flatten(0, 1).index_select(0, keep), shifted.index_select(0, keep)
            logits = self.lm_head(hidden)  # (B, L, V) or (M, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=IGNORE_INDEX)
        else:
            if logits_to_keep == "last":
                last = (key_mask.long() * torch.arange(key_mask.shape[1], device=key_mask.device)).argmax(1)
                last = (last - (key_mask.shape[1] - batch.length)).clamp(min=0)  # column among the new tokens
                hidden = hidden[torch.arange(batch.batch_size, device=hidden.device), last][:, None]  # (B, 1, D)
            logits = self.lm_head(hidden)  # (B, L, V) or (B, 1, V)
        cache = KVCache(presents, key_mask, next_position) if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def _full_labels(self, labels, batch: RoutedBatch, image_embeds):  # (B, T) -> (B, L) with -100 at images
        if image_embeds is None:
            return labels
        B, T = labels.shape
        N = image_embeds.shape[1]
        ignore = torch.full((B * N,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        return torch.cat([labels.reshape(-1), ignore]).index_select(0, batch.label_index).view(B, T + N)

    # ---- generation ----

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None,
                 generator: torch.Generator | None = None, image_embeds=None, all_done=None) -> torch.LongTensor:
        """New tokens only, (B, new); rows that finished are padded with the pad id. KV cache; the
        prompt may be left- or right-padded (each row continues from its last real token).

        ``all_done`` (distributed, e.g. FSDP): this rank's "every row finished" -> whether every rank's rows
        did (model.distributed.all_ranks), so all ranks stop at the same step and make the same forward calls."""
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        dev = self.lm_head.weight.device
        input_ids = input_ids.to(dev)
        B, T = input_ids.shape
        mask = torch.ones(B, T, dtype=torch.long, device=dev) if attention_mask is None else attention_mask.to(dev)
        out = self(input_ids, mask, pixel_values=pixel_values, use_cache=True, image_embeds=image_embeds,
                   logits_to_keep="last")
        cache = out.past_key_values
        logits = out.logits[:, -1]  # (B, V) at each row's last real token
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        new = []
        for step in range(max_new_tokens):
            token = self._choose(logits, do_sample, temperature, top_p, generator)
            token = token.masked_fill(done, self.pad_token_id)
            new.append(token)
            done = done | (token == eos)
            finished = bool(done.all())
            if step == max_new_tokens - 1 or (all_done(finished) if all_done is not None else finished):
                break
            out = self(token[:, None], torch.ones(B, 1, dtype=torch.long, device=dev), past_key_values=cache,
                       use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1]
        return torch.stack(new, 1)

    @staticmethod
    def _choose(logits, do_sample, temperature, top_p, generator):  # (B, V) -> (B,)
        if not do_sample:
            return logits.argmax(-1)
        probs = (logits.float() / temperature).softmax(-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix reaching top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def generate_text(self, images, prompts: list[str], max_new_tokens: int = 32, **kw) -> list[str]:
        """Decoded answers to ``BOS + prompt`` per image (left-padded batch)."""
        ids, mask = self.tokenize_prompts(prompts)
        pixel_values = self.preprocess(images) if images is not None else None
        new = self.generate(ids, mask, pixel_values, max_new_tokens=max_new_tokens, **kw)
        texts = []
        for row in new.tolist():
            if self.eos_token_id in row:
                row = row[:row.index(self.eos_token_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def predict_boxes(self, images, phrases: list[str], template: str = "default", max_new_tokens: int = 32,
                      **kw) -> list[tuple[list[tuple[int, int, int, int]] | None, str | None]]:
        """REC: ``(boxes 0-999 xyxy, None)`` or ``(None, reason)`` per (image, phrase)."""
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrases")
        prompts = [prompt_and_target(format_question(p, template), "")[0] for p in phrases]
        return [try_parse_boxes(t) for t in self.generate_text(images, prompts, max_new_tokens, **kw)]


def main(argv=None) -> list[dict]:
    """``python -m model.cogvlm --lm DIR_OR_ID --vision DIR_OR_ID [--trainable ckpt.safetensors]
    --image a.jpg --phrase "red ball" [--phrase ...]``: REC boxes as JSON lines (0-999 and pixels)."""
    import argparse
    import sys
    from grounding.boxes import denormalize_box

    p = argparse.ArgumentParser(description="Ground phrases in an image with a visual-expert model.")
    p.add_argument("--lm", help="LM hub id or directory (or --debug-root)")
    p.add_argument("--vision", help="CLIP/SigLIP hub id or directory")
    p.add_argument("--debug-root", help="use the tiny debug checkpoints under this directory")
    p.add_argument("--trainable", help="safetensors file from trainable_state_dict() (adapter + experts)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--shallow", action="store_true")
    p.add_argument("--image", required=True)
    p.add_argument("--phrase", action="append", required=True)
    p.add_argument("--template", default="default")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    if args.debug_root:
        from model.testing import write_debug_model
        config = dataclasses.replace(write_debug_model(args.debug_root), shallow=args.shallow, image_size=args.image_size)
    elif args.lm and args.vision:
        config = VisualExpertConfig(lm=args.lm, vision=args.vision, image_size=args.image_size, shallow=args.shallow)
    else:
        p.error("give --lm and --vision, or --debug-root")
    model = VisualExpertForCausalLM.from_config(config).eval()
    if args.trainable:
        from safetensors.torch import load_file
        model.load_trainable_state_dict(load_file(args.trainable), strict=False)
    image = decode_image(args.image)
    rows = []
    answers = model.predict_boxes([image] * len(args.phrase), args.phrase, args.template, args.max_new_tokens)
    for phrase, (boxes, reason) in zip(args.phrase, answers):
        rows.append({"phrase": phrase, "boxes_norm": boxes, "error": reason,
                     "boxes_px": None if boxes is None else [denormalize_box(b, *image.size) for b in boxes]})
        sys.stdout.write(json.dumps(rows[-1]) + "\n")
    return rows


if __name__ == "__main__":
    main()
