"""Open-vocabulary boxes for noun phrases: GroundingDINO (transformers / groundingdino-py) or annotations.

One :class:`BoxDetector` loads its model once and maps a batch of images, each with its phrases,
to boxes per phrase::

    det = BoxDetector(DetectorConfig(model="IDEA-Research/grounding-dino-tiny"))
    out = det([image], [["red ball", "blue box"]])      # out[image][phrase] -> PhraseBoxes

How a phrase gets its boxes (the positive-map method of GroundingDINO, not decoded-text labels):

1. Phrases are cleaned (lower case, no '.'/'?', which are the model's phrase separators), repeated
   phrases are detected once, and the distinct ones are joined into prompts
   ``"red ball . blue box ."``. A prompt that would exceed the text encoder's limit
   (``max_text_len``, 256 tokens with [CLS]/[SEP]) is split into several passes over the same
   image; a phrase too long for one pass on its own gets an error, never a silent truncation.
2. Each phrase's token span is found from its character span in the prompt via the tokenizer's
   offsets. The model gives, per query box, a probability per token (sigmoid of the logits);
   a phrase's score for a box is the mean probability over the phrase's tokens.
3. A query is kept when its best token probability over the prompt's phrases exceeds
   ``box_threshold``, and is a candidate for every phrase whose score exceeds ``text_threshold``.
4. Candidates are clipped to the image, dropped when a side is shorter than ``min_box_size`` or the
   area exceeds ``max_area_fraction`` of the image, then class-agnostic NMS across all phrases of
   the image (IoU > ``nms_iou`` suppressed; GRIT) keeps one phrase per region, and each phrase keeps
   its ``top_k`` best boxes. ``PhraseBoxes.scores`` are those phrase scores, best first.

Errors are data: an image that cannot be converted, preprocessed or run gets, for each of its
phrases, ``PhraseBoxes(boxes=[], scores=[], error="<reason>")``; the rest of the batch is
unaffected. :func:`image_error` returns an image's reason (or ``None``). Only caller bugs (lists of
different lengths, a missing ``keys`` argument for the annotation backend) raise.

Backends: ``transformers`` (default, ``GroundingDinoForObjectDetection`` from a hub id or a local
directory), ``groundingdino-py`` (the original IDEA code, separate environment:
:mod:`grounding.detect_gdpy`, ``envs/groundingdino-py/``) and ``annotations`` (COCO instances /
RefCOCO refs: true boxes through the same interface).

Prompts, token spans and box selection (steps 1-4, model-free) are :mod:`grounding.positive_map`; the
command line (``python -m grounding.detect IMAGE --phrases ...``) is :mod:`grounding.detect_cli`.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from grounding.boxes import strip_article
from grounding.cli import run_cli
from grounding.positive_map import PhraseBoxes, PromptPass, clean_phrase, phrase_candidates, plan_prompts, select_boxes

BACKENDS = ("transformers", "groundingdino-py", "annotations")
DTYPES = ("auto", "float32", "bfloat16", "float16")   # torch's names, as model.cogvlm and model.train_config use
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}   # accepted, stored as torch's name
# bert-base-uncased ids that GroundingDINO's modeling code hard-codes: [CLS], [SEP], '.', '?'.
BERT_SPECIAL_IDS = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}


@dataclass
class DetectorConfig:
    backend: str = "transformers"           # "transformers" | "groundingdino-py" | "annotations"
    model: str = "IDEA-Research/grounding-dino-tiny"  # hub id or local dir; groundingdino-py: "CONFIG.py::WEIGHTS.pth" or a dir with both
    box_threshold: float = 0.35             # GroundingDINO's defaults
    text_threshold: float = 0.25
    nms_iou: float = 0.5                    # class-agnostic NMS across phrases (GRIT); 1.0 turns it off
    top_k: int = 3                          # boxes kept per phrase
    min_box_size: float = 4.0               # pixels, both sides
    max_area_fraction: float = 0.95         # a box covering the whole image is rarely a grounding
    batch_size: int = 4                     # (image, prompt) passes per forward
    device: str = "auto"                    # "auto" -> cuda if available else cpu
    dtype: str = "auto"                     # auto: float32 on CPU, bfloat16 autocast on GPU
    annotations: str | None = None          # COCO instances JSON (annotations backend)
    refs: str | None = None                 # RefCOCO-style refs JSON (sentences -> ann ids)
    shortest_edge: int | None = None        # resize override; None keeps the processor's (800 / 1333)
    longest_edge: int | None = None
    max_text_tokens: int | None = None      # cap below the model's max_text_len (forces more passes)
    text_encoder: str | None = None         # groundingdino-py: local BERT dir (text_encoder_type)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("box_threshold", "text_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.min_box_size < 0:
            raise ValueError(f"min_box_size must be >= 0, got {self.min_box_size}")
        if not 0.0 < self.max_area_fraction <= 1.0:
            raise ValueError(f"max_area_fraction must be in (0, 1], got {self.max_area_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {self.device!r}")
        if self.max_text_tokens is not None and self.max_text_tokens < 4:
            raise ValueError(f"max_text_tokens must be >= 4 ([CLS] word . [SEP]), got {self.max_text_tokens}")
        for name in ("shortest_edge", "longest_edge"):
            v = getattr(self, name)
            if v is not None and v < 32:
                raise ValueError(f"{name} must be >= 32 pixels, got {v}")
        if self.backend == "annotations" and not self.annotations:
            raise ValueError("the annotations backend needs annotations= (COCO JSON with the boxes refs point at)")


# --- results ---------------------------------------------------------------------------------

def image_error(result: Sequence[PhraseBoxes]) -> str | None:
    """The failure reason of one image's result (``None`` when it was detected)."""
    errors = {p.error for p in result if p.error}
    phrase_only = {e for e in errors if e.startswith("phrase_")}
    return next(iter(sorted(errors - phrase_only)), None)


# --- the detector ----------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype | None:
    """The autocast dtype (``None``: plain float32)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype == "float16" and not device.startswith("cuda"):
        raise ValueError("dtype='float16' needs a CUDA device; use float32 (or bfloat16) on CPU")
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class BoxDetector:
    """Boxes for phrases; loads the model (or annotation index) once in ``__init__``.

    ``detector(images, phrases, keys=None) -> [image][phrase] PhraseBoxes``. ``name`` and
    ``weights_id`` identify the detector in shard provenance.
    """

    def __init__(self, config: DetectorConfig | None = None):
        self.config = config = config or DetectorConfig()
        if config.backend == "annotations":
            self.index = AnnotationIndex(config.annotations, config.refs)
            self.model = None
            self.name = "annotations"
            self.weights_id = self.index.source_id
            return
        self.device = resolve_device(config.device)
        self.autocast_dtype = resolve_dtype(config.dtype, self.device)
        if config.backend == "groundingdino-py":
            from grounding.detect_gdpy import GroundingDinoPyModel
            self.model = GroundingDinoPyModel(config, self.device)
        else:
            self.model = TransformersModel(config, self.device)
        self.name = self.model.name
        self.weights_id = self.model.weights_id
        limit = self.model.max_text_len
        self.max_tokens = min(limit, config.max_text_tokens) if config.max_text_tokens else limit

    def __call__(self, images: Sequence[Image.Image | None], phrases: Sequence[Sequence[str]],
                 keys: Sequence[str] | None = None) -> list[list[PhraseBoxes]]:
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrase lists")
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        if self.model is None:
            if keys is None:
                raise ValueError("the annotations backend needs keys= (one per image)")
            return [self.index.lookup(k, ps, im) for im, ps, k in zip(images, phrases, keys)]
        return self._detect(images, phrases)

    def _detect(self, images, phrases) -> list[list[PhraseBoxes]]:
        cfg = self.config
        results: list[list[PhraseBoxes] | None] = [None] * len(images)
        work: list[tuple[int, Any, PromptPass]] = []  # (image index, pixel tensor, prompt)
        plans: dict[int, tuple[list[str], list[str], dict[int, str]]] = {}
        for i, (image, ps) in enumerate(zip(images, phrases)):
            if not ps:
                results[i] = []
                continue
            try:
                if image is None:
                    raise ValueError("no image")
                rgb = image.convert("RGB")
                pixels = self.model.prepare(rgb)
            except Exception as e:  # noqa: BLE001 - a bad image is data, not a crash
                results[i] = [PhraseBoxes([], [], f"image_preprocess_failed: {type(e).__name__}: {e}"[:300]) for _ in ps]
                continue
            try:
                cleaned = [clean_phrase(str(p)) for p in ps]
                distinct = list(dict.fromkeys(cleaned))  # a repeated phrase is detected once
                passes, errors = plan_prompts(distinct, self.model.tokenizer, self.max_tokens)
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer whose pieces do not add up
                results[i] = [PhraseBoxes([], [], f"prompt_failed: {type(e).__name__}: {e}"[:300]) for _ in ps]
                continue
            plans[i] = (cleaned, distinct, errors)
            work.extend((i, pixels, p) for p in passes)
        outputs = self._run(work)
        candidates: dict[int, list] = {}
        failed: dict[int, str] = {}
        for (i, _, prompt), out in zip(work, outputs):
            if isinstance(out, str):
                failed[i] = out
                continue
            w, h = images[i].size
            candidates.setdefault(i, []).extend(
                phrase_candidates(out[0], out[1], prompt, w, h, cfg.box_threshold, cfg.text_threshold))
        for i, ps in enumerate(phrases):
            if results[i] is not None:
                continue
            cleaned, distinct, errors = plans[i]
            if i in failed:
                results[i] = [PhraseBoxes([], [], failed[i]) for _ in ps]
                continue
            w, h = images[i].size
            per_distinct = select_boxes(candidates.get(i, []), len(distinct), w, h, cfg)
            for k, reason in errors.items():
                per_distinct[k].error = reason
            where = {p: k for k, p in enumerate(distinct)}
            results[i] = [PhraseBoxes(list(per_distinct[where[c]].boxes), list(per_distinct[where[c]].scores),
                                      per_distinct[where[c]].error) for c in cleaned]
        return results  # type: ignore[return-value]

    def _run(self, work) -> list[tuple[torch.Tensor, torch.Tensor] | str]:
        """Forward passes in chunks of at most ``batch_size``; a failing chunk is retried item by item.

        A chunk holds only passes whose preprocessed image tensors have the same shape: padding a
        smaller image to its neighbour's size changes its Swin features and so its boxes, which
        would make an image's boxes depend on the images batched with it. Grouped this way no image
        is padded, and the batch size changes only speed. Results come back in ``work`` order.
        """
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for j, (_, pixels, _) in enumerate(work):
            by_shape.setdefault(tuple(pixels.shape), []).append(j)
        chunks = [group[s:s + self.config.batch_size] for group in by_shape.values()
                  for s in range(0, len(group), self.config.batch_size)]
        out: list = [None] * len(work)
        for chunk in chunks:
            try:
                results = self._forward([work[j] for j in chunk])
            except Exception:  # noqa: BLE001
                results = []
                for j in chunk:
                    try:
                        results.extend(self._forward([work[j]]))
                    except Exception as e:  # noqa: BLE001
                        results.append(f"detector_failed: {type(e).__name__}: {e}"[:300])
            for j, r in zip(chunk, results):
                out[j] = r
        return out

    def _forward(self, chunk) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with torch.inference_mode(), torch.autocast(
                device_type=self.device.split(":")[0], dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None):
            probs, boxes = self.model.forward([c[1] for c in chunk], [c[2].text for c in chunk])
        probs, boxes = probs.float().cpu(), boxes.float().cpu()  # (B, Q, T), (B, Q, 4)
        return [(probs[b], boxes[b]) for b in range(len(chunk))]


def pad_images(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H_i, W_i) tensors -> zero-padded (B, 3, H, W) and pixel mask (B, H, W) (1 = image)."""
    h = max(t.shape[1] for t in tensors)
    w = max(t.shape[2] for t in tensors)
    pixels = tensors[0].new_zeros((len(tensors), 3, h, w))
    mask = torch.zeros((len(tensors), h, w), dtype=torch.long)
    for b, t in enumerate(tensors):
        pixels[b, :, :t.shape[1], :t.shape[2]] = t
        mask[b, :t.shape[1], :t.shape[2]] = 1
    return pixels, mask


def weights_digest(path: Path) -> str:
    """sha256 (first 16 hex) over a local model directory's config and weight files."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".pth", ".py")
                   and p.is_file())
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class TransformersModel:
    """transformers' GroundingDinoForObjectDetection with its image processor and tokenizer."""

    def __init__(self, config: DetectorConfig, device: str):
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection

        self.model = GroundingDinoForObjectDetection.from_pretrained(config.model).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{config.model}: need a fast tokenizer (tokenizer.json) for character offsets")
        ids = self.tokenizer.convert_tokens_to_ids(list(BERT_SPECIAL_IDS))
        if ids != list(BERT_SPECIAL_IDS.values()):
            raise ValueError(f"{config.model}: tokenizer maps [CLS], [SEP], '.', '?' to {ids}; GroundingDINO "
                             f"hard-codes {list(BERT_SPECIAL_IDS.values())} (bert-base-uncased)")
        self.image_processor = load_image_processor(config.model)
        if config.shortest_edge or config.longest_edge:
            size = dict(self.image_processor.size)
            size["shortest_edge"] = config.shortest_edge or size.get("shortest_edge", 800)
            size["longest_edge"] = config.longest_edge or size.get("longest_edge", 1333)
            self.image_processor.size = type(self.image_processor.size)(**size) if not isinstance(
                self.image_processor.size, dict) else size
        self.device = device
        self.max_text_len = int(self.model.config.max_text_len)
        self.name = "grounding-dino/transformers"
        local = Path(config.model)
        self.weights_id = (f"{local.resolve()}@sha256:{weights_digest(local)}" if local.is_dir()
                           else f"{config.model}@{getattr(self.model.config, '_commit_hash', None) or 'hub'}")

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB -> normalised (3, H, W) at the processor's size."""
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def forward(self, pixels: Sequence[torch.Tensor], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> token probabilities (B, Q, T) and boxes cxcywh relative to each image (B, Q, 4)."""
        pixel_values, pixel_mask = pad_images(pixels)
        text = self.tokenizer(list(prompts), padding="longest", return_tensors="pt")
        out = self.model(pixel_values=pixel_values.to(self.device), pixel_mask=pixel_mask.to(self.device),
                         input_ids=text["input_ids"].to(self.device),
                         attention_mask=text["attention_mask"].to(self.device),
                         token_type_ids=text["token_type_ids"].to(self.device))
        return out.logits.sigmoid(), out.pred_boxes


def load_image_processor(model: str):
    """The saved image processor; the PIL one when the torchvision-backed one cannot load."""
    from transformers import AutoImageProcessor
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    try:
        return AutoImageProcessor.from_pretrained(model)
    except Exception:  # noqa: BLE001 - e.g. the fast processor without torchvision
        return GroundingDinoImageProcessorPil.from_pretrained(model)


# --- annotations backend ---------------------------------------------------------------------

def normalize_sentence(text: str) -> str:
    """"The Red  ball." -> "red ball": lower case, leading article and end punctuation dropped."""
    return strip_article(" ".join(text.lower().strip().rstrip(".?!").split()))


class AnnotationIndex:
    """COCO instances (+ RefCOCO refs) indexed by image key, answering phrases with true boxes.

    An image's key is its ``"key"`` field, else its ``file_name`` stem. A phrase matches, in order:
    a ref sentence of the image (normalised: lower case, leading article stripped) -> that ref's
    box; else its head noun (last word) equal to a category name -> every box of that category.
    Boxes are scaled from the annotated size to the given image's size, clipped, scored 1.0; no
    thresholds, NMS or top-k apply (the annotations are the truth).
    """

    def __init__(self, annotations: str, refs: str | None = None):
        coco = json.loads(Path(annotations).read_text())
        self.images: dict[str, dict] = {}
        by_id: dict[int, str] = {}
        for im in coco["images"]:
            key = str(im.get("key") or Path(im["file_name"]).stem)
            self.images[key] = im
            by_id[im["id"]] = key
        self.categories = {c["id"]: c["name"].lower() for c in coco.get("categories", [])}
        self.anns: dict[str, list[dict]] = {}
        self.ann_by_id: dict[int, dict] = {}
        for a in coco["annotations"]:
            self.anns.setdefault(by_id[a["image_id"]], []).append(a)
            self.ann_by_id[a["id"]] = a
        self.sentences: dict[str, dict[str, list[int]]] = {}  # key -> sentence -> ann ids
        for r in json.loads(Path(refs).read_text()) if refs else []:
            key = by_id.get(r["image_id"])
            if key is None:
                continue
            for s in r.get("sentences", []):
                for text in {s.get("sent", ""), s.get("raw", "")} - {""}:
                    ids = self.sentences.setdefault(key, {}).setdefault(normalize_sentence(text), [])
                    if r["ann_id"] not in ids:
                        ids.append(r["ann_id"])
        digest = hashlib.sha256(Path(annotations).read_bytes() + (Path(refs).read_bytes() if refs else b""))
        self.source_id = f"{Path(annotations).name}{'+' + Path(refs).name if refs else ''}@sha256:{digest.hexdigest()[:16]}"

    def lookup(self, key: str, phrases: Sequence[str], image: Image.Image | None = None) -> list[PhraseBoxes]:
        info = self.images.get(str(key))
        if info is None:
            return [PhraseBoxes([], [], f"no_annotations: key {key!r} not in the COCO file") for _ in phrases]
        aw, ah = info["width"], info["height"]
        w, h = image.size if image is not None else (aw, ah)
        sentences = self.sentences.get(str(key), {})
        out = []
        for phrase in phrases:
            norm = normalize_sentence(phrase)
            if norm in sentences:
                anns = [self.ann_by_id[a] for a in sentences[norm]]
            else:
                head = norm.split()[-1] if norm else ""
                anns = [a for a in self.anns.get(str(key), []) if self.categories.get(a["category_id"]) == head]
            boxes = []
            for a in anns:
                x, y, bw, bh = a["bbox"]
                sx, sy = w / aw, h / ah
                boxes.append((min(max(x * sx, 0.0), w), min(max(y * sy, 0.0), h),
                              min(max((x + bw) * sx, 0.0), w), min(max((y + bh) * sy, 0.0), h)))
            out.append(PhraseBoxes(boxes, [1.0] * len(boxes)))
        return out


if __name__ == "__main__":  # python -m grounding.detect: the command line (grounding.detect_cli)
    from grounding.detect_cli import main

    sys.exit(run_cli(main))
