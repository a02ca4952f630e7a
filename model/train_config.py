"""The configuration of one training run: a :class:`TrainConfig` of run-wide fields and four sections,
each its own dataclass, validated where it is defined: ``data`` (:class:`model.data.DataConfig`), ``optim``
(:class:`model.optim.OptimConfig`), ``eval`` (:class:`EvalConfig`), ``checkpoint``
(:class:`model.checkpoint.CheckpointConfig`).

Every field is also one flat name, used by the presets and the command line (``--lr``, ``--max-steps``,
``--resume``, ``--eval-every``): a section's field keeps its own name, prefixed ``eval_`` for the eval
section (``eval_shards``, ``eval_every``...). :meth:`TrainConfig.from_flat` builds a config from flat names;
:meth:`TrainConfig.to_dict` / :meth:`TrainConfig.from_dict` round-trip the nested form that each run writes
to ``out_dir/config.json``. Presets: :func:`debug` (tests, CPU), :func:`wiring` (the overfit proof),
:func:`stage2` (the paper's second stage).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from model.checkpoint import CheckpointConfig
from model.data import DataConfig
from model.distributed import PARALLEL_MODES
from model.optim import OptimConfig

AUTOCAST_DTYPES = ("bfloat16", "float16", "float32")   # float32: no autocast


@dataclass
class EvalConfig:
    """REC Acc@0.5 on held-out shards during training (every rank its share; EMA weights when kept)."""
    shards: list[str] = field(default_factory=list)
    every: int = 0                          # 0: never
    limit: int = 64
    batch_size: int = 32
    max_new_tokens: int | None = None       # None: the longest true answer, and 3 boxes, fit (model.evaluate.answer_budget)

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if self.every < 0 or self.limit < 1 or self.batch_size < 1:
            raise ValueError("EvalConfig: every >= 0, limit >= 1 and batch_size >= 1 required")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("EvalConfig: max_new_tokens must be >= 1 (or None: fit the answers)")
        if self.every and not self.shards:
            raise ValueError("EvalConfig: eval_every needs eval_shards")


# section name -> (its dataclass, the prefix of its flat names)
SECTIONS = {"data": (DataConfig, ""), "optim": (OptimConfig, ""), "eval": (EvalConfig, "eval_"),
            "checkpoint": (CheckpointConfig, "")}
RUN_OWNED = {("data", "seed"), ("data", "repeat")}   # set by the run: the data order follows its seed, forever


@dataclass
class TrainConfig:
    """One training run: run-wide fields, then the four sections."""
    out_dir: str = "runs/debug"
    model: str = "debug"                    # "debug" (tiny random checkpoints under out_dir) or a JSON file of VisualExpertConfig fields
    model_overrides: dict = field(default_factory=dict)   # VisualExpertConfig fields to change (image_size, freeze_lm, ...)
    seed: int = 0                           # model init, dropout, and the data order
    stop_after: int | None = None           # stop (and checkpoint) at this step without changing the schedule
    device: str = "auto"                    # auto | cpu | cuda[:i]
    autocast_dtype: str = "bfloat16"        # autocast on GPU (never on CPU): bfloat16 | float16 | float32 (off)
    parallel: str = "auto"                  # auto (DDP when distributed) | ddp | fsdp | none
    deterministic: bool = False             # torch.use_deterministic_algorithms: exact replay on CPU
    num_workers: int = 0                    # data loader processes per rank
    log_every: int = 1
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        self.data = dataclasses.replace(self.data, seed=self.seed, repeat=True)
        checks = [
            (self.stop_after is None or 1 <= self.stop_after <= self.optim.max_steps, "stop_after must be in 1..max_steps"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device: auto | cpu | cuda[:i]"),
            (self.autocast_dtype in AUTOCAST_DTYPES, f"autocast_dtype: one of {AUTOCAST_DTYPES}"),
            (self.parallel in PARALLEL_MODES, f"parallel: one of {PARALLEL_MODES}"),
            (self.log_every >= 1 and self.num_workers >= 0, "log_every >= 1 and num_workers >= 0 required"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

    @property
    def stop(self) -> int:
        """The step this invocation stops at."""
        return self.stop_after or self.optim.max_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The nested form :meth:`to_dict` wrote (``config.json``'s ``train``)."""
        d = dict(d)
        sections = {name: kind(**d.pop(name, {})) for name, (kind, _) in SECTIONS.items()}
        return cls(**d, **sections)

    @classmethod
    def from_flat(cls, **flat) -> TrainConfig:
        """A config from flat names (``lr=1e-3, eval_every=50, resume="none"``); an unknown name is an error."""
        names = flat_names()
        unknown = sorted(set(flat) - set(names))
        if unknown:
            raise TypeError(f"TrainConfig has no field(s) {unknown}; known: {sorted(names)}")
        nested: dict = {name: {} for name in SECTIONS}
        top = {}
        for key, value in flat.items():
            section, fname = names[key]
            (nested[section] if section else top)[fname] = value
        return cls.from_dict({**top, **nested})

    def to_flat(self) -> dict:
        d = self.to_dict()
        return {key: (d[section][fname] if section else d[fname]) for key, (section, fname) in flat_names().items()}

    def with_overrides(self, **flat) -> TrainConfig:
        return TrainConfig.from_flat(**{**self.to_flat(), **flat})


def flat_fields() -> list[tuple[str, dataclasses.Field]]:
    """``(flat name, dataclass field)`` for every settable field, run-wide ones first."""
    out = [(f.name, f) for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS]
    for section, (kind, prefix) in SECTIONS.items():
        out += [(prefix + f.name, f) for f in dataclasses.fields(kind) if (section, f.name) not in RUN_OWNED]
    return out


def flat_names() -> dict[str, tuple[str | None, str]]:
    """Flat name -> (section or None, field name in it)."""
    out: dict[str, tuple[str | None, str]] = {f.name: (None, f.name) for f in dataclasses.fields(TrainConfig)
                                              if f.name not in SECTIONS}
    for section, (kind, prefix) in SECTIONS.items():
        for f in dataclasses.fields(kind):
            if (section, f.name) in RUN_OWNED:
                continue
            if prefix + f.name in out:
                raise RuntimeError(f"flat name {prefix + f.name} is defined twice")  # a section grew a clashing field
            out[prefix + f.name] = (section, f.name)
    return out


# --- presets ---------------------------------------------------------------------------------

def debug(**overrides) -> TrainConfig:
    """Tiny and quick on CPU: tests and smoke runs."""
    base = dict(max_steps=20, batch_size=4, lr=1e-3, warmup_steps=2, save_every=10, keep_last=2, max_length=48,
                progress=False)
    return TrainConfig.from_flat(**{**base, **overrides})


def wiring(**overrides) -> TrainConfig:
    """The overfit proof on a few dozen synthetic images: a from-scratch tiny model, LM unfrozen.

    A random, frozen LM is no pretrained LM: in this from-scratch setting the LM must learn the
    answer format too, so it is trained (``freeze_lm=False``) at the full learning rate.
    """
    base = dict(model="debug", max_steps=1500, batch_size=16, lr=2e-3, warmup_steps=50, min_lr_ratio=0.05,
                weight_decay=0.0, grad_clip=1.0, max_length=48, save_every=0, keep_last=1,
                model_overrides={"freeze_lm": False, "lm_lr_mult": 1.0})
    return TrainConfig.from_flat(**{**base, **overrides})


def stage2(**overrides) -> TrainConfig:
    """CogVLM's second stage as the paper sets it (per-GPU batch; scale with ranks and grad_accum).

    Needs ``model``: a JSON file of VisualExpertConfig fields (the real LM and ViT), not the debug one.
    """
    if overrides.get("model", "debug") == "debug":
        raise ValueError("the stage2 preset needs --model CONFIG.json (VisualExpertConfig fields: lm, vision, ...)")
    base = dict(max_steps=60_000, batch_size=16, grad_accum=1, lr=1e-5, warmup_steps=500, min_lr_ratio=0.1,
                weight_decay=0.05, grad_clip=1.0, ema_decay=0.9999, caption_weight=1.0, rec_weight=1.0,
                max_length=256, num_workers=4, save_every=1000, keep_last=3, parallel="auto", progress=True)
    return TrainConfig.from_flat(**{**base, **overrides})


PRESETS = {"debug": debug, "wiring": wiring, "stage2": stage2}
