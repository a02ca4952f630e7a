"""The ``groundingdino-py`` backend: IDEA-Research's original GroundingDINO code (``groundingdino``).

It cannot live in the main environment: it needs torchvision (which fails at import beside the
torch 2.13 CPU wheel) and transformers < 5 (its BERT wrapper calls ``get_extended_attention_mask``,
gone in 5.x). Build its own environment with ``envs/groundingdino-py/setup.sh`` and run the
pipeline's detection stage from there. Everything around the forward pass (prompt splitting,
token spans, positive-map scores, NMS, top-k) is the same code as the transformers backend
(:mod:`grounding.detect`); only loading, image preprocessing and the forward call differ.

``DetectorConfig.model`` names the model: ``"CONFIG.py::WEIGHTS.pth"`` or a directory holding one
``*.py`` config and one ``*.pth`` checkpoint (e.g. ``GroundingDINO_SwinT_OGC.py`` +
``groundingdino_swint_ogc.pth``). ``DetectorConfig.text_encoder`` points at a local
bert-base-uncased directory (the hub is not reachable from the workers).
"""
from __future__ import annotations

import argparse
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

INSTALL_HINT = (
    "the groundingdino-py backend needs the `groundingdino` package, which cannot share this "
    "environment (it needs torchvision and transformers<5). Build its environment with "
    "`bash envs/groundingdino-py/setup.sh [VENV_DIR]` (see envs/groundingdino-py/requirements.txt), "
    "then run the detection stage with that environment's python; or use backend='transformers'."
)


def resolve_files(model: str) -> tuple[Path, Path]:
    """``"CONFIG.py::WEIGHTS.pth"`` or a directory with one ``*.py`` and one ``*.pth`` -> the two paths."""
    if "::" in model:
        cfg, weights = (Path(p) for p in model.split("::", 1))
    else:
        root = Path(model)
        if not root.is_dir():
            raise FileNotFoundError(f"groundingdino-py: model must be 'CONFIG.py::WEIGHTS.pth' or a directory, got {model!r}")
        cfgs, ckpts = sorted(root.glob("*.py")), sorted(root.glob("*.pth"))
        if len(cfgs) != 1 or len(ckpts) != 1:
            raise FileNotFoundError(f"groundingdino-py: {root} must hold one *.py config and one *.pth checkpoint, "
                                    f"found {[p.name for p in cfgs + ckpts]}")
        cfg, weights = cfgs[0], ckpts[0]
    for p in (cfg, weights):
        if not p.is_file():
            raise FileNotFoundError(f"groundingdino-py: {p} does not exist")
    return cfg, weights


class GroundingDinoPyModel:
    """Loads ``groundingdino``'s model once; ``prepare`` / ``forward`` as :class:`grounding.detect.TransformersModel`."""

    def __init__(self, config, device: str):
        try:
            import groundingdino.datasets.transforms as T
            from groundingdino.models import build_model
            from groundingdino.util.misc import nested_tensor_from_tensor_list
            from groundingdino.util.slconfig import SLConfig
        except ImportError as e:
            raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from e

        cfg_path, weights_path = resolve_files(config.model)
        args = SLConfig.fromfile(str(cfg_path))
        args.device = device
        if config.text_encoder:
            args.text_encoder_type = config.text_encoder
        self.model = build_model(args)
        # IDEA's released .pth files carry their argparse.Namespace beside the weights: allow that
        # one type and nothing else to be unpickled.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(str(weights_path), map_location="cpu", weights_only=True)
        state = checkpoint.get("model", checkpoint)
        state = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in state.items())
        self.model.load_state_dict(state, strict=False)
        self.model.to(device).eval()
        self.device = device
        self.nest = nested_tensor_from_tensor_list
        self.tokenizer = self.model.tokenizer
        self.max_text_len = int(getattr(self.model, "max_text_len", 256))
        short = config.shortest_edge or 800
        self.transform = T.Compose([T.RandomResize([short], max_size=config.longest_edge or 1333), T.ToTensor(),
                                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        digest = hashlib.sha256()
        for p in (cfg_path, weights_path):
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        self.name = "grounding-dino/groundingdino-py"
        self.weights_id = f"{weights_path.resolve()}@sha256:{digest.hexdigest()[:16]}"

    def prepare(self, image: Image.Image) -> torch.Tensor:
        tensor, _ = self.transform(image, None)
        return tensor  # (3, H, W)

    def forward(self, pixels: Sequence[torch.Tensor], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> token probabilities (B, Q, T) and boxes cxcywh relative to each image (B, Q, 4)."""
        # groundingdino reads samples.device before it would nest a list: pad into a NestedTensor here.
        out = self.model(self.nest([p.to(self.device) for p in pixels]), captions=list(prompts))
        return out["pred_logits"].sigmoid(), out["pred_boxes"]
