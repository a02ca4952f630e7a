"""Optimisation pieces of a training run: the ``optim`` config section, AdamW over the model's parameter
groups, the learning-rate schedule (linear warmup, cosine decay) and an EMA of the trainable weights."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    """AdamW, schedule, clipping, accumulation and EMA of one run (``TrainConfig.optim``)."""
    max_steps: int = 100                    # length of the schedule
    grad_accum: int = 1                     # micro-steps per optimizer step
    lr: float = 1e-4
    min_lr_ratio: float = 0.1               # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                  # 0: no clipping
    ema_decay: float = 0.0                  # 0: no EMA

    def __post_init__(self):
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr > 0 and 0 <= min_lr_ratio <= 1 required"),
            (0 <= self.warmup_steps <= self.max_steps, "warmup_steps must be in 0..max_steps"),
            (self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"OptimConfig: {msg}")


def build_optimizer(model, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over ``model.param_groups`` (the LM's at ``lm_lr_mult`` x lr); each group remembers its ``base_lr``."""
    groups = model.param_groups(cfg.lr, cfg.weight_decay)
    for g in groups:
        g.setdefault("base_lr", g["lr"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {}))


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer, step: int, cfg: OptimConfig) -> float:
    """Apply the schedule at ``step`` to every group; returns the base learning rate in effect."""
    factor = lr_factor(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return cfg.lr * factor


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """The total gradient norm, clipped to ``max_norm`` (0: measured, not clipped)."""
    params = [p for p in params if p.requires_grad]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))


class EMA:
    """Exponential moving average of the trainable weights, kept in float32."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm start, as timm's ModelEmaV2
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1 - d)
