"""detector.loss: each upstream defect is shown on transformers' own loss, and fixed."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss

from detector.data import Collator, load_examples
from detector.loss import FixedImageLoss, detection_loss
from detector.train import DataConfig, TrainConfig, build_model


def one_hot_case():
    """Three images with 2, 3 and 1 phrases; each phrase owns distinct token positions."""
    T, Q = 12, 4
    label_maps = (torch.eye(T, dtype=torch.long)[[1, 2]], torch.eye(T, dtype=torch.long)[[4, 5, 6]],
                  torch.eye(T, dtype=torch.long)[[8]])
    targets = [{"class_labels": torch.tensor([1, 0])}, {"class_labels": torch.tensor([2])},
               {"class_labels": torch.tensor([0])}]
    indices = [(torch.tensor([0, 3]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0])),
               (torch.tensor([1]), torch.tensor([0]))]
    expected = torch.zeros(3, Q, T, dtype=torch.long)
    expected[0, 0, 2] = expected[0, 3, 1] = 1   # image 0: query 0 -> phrase 1 (token 2), query 3 -> phrase 0
    expected[1, 2, 6] = 1                       # image 1: query 2 -> its phrase 2 (token 6)
    expected[2, 1, 8] = 1                       # image 2: query 1 -> its phrase 0 (token 8)
    return {"logits": torch.zeros(3, Q, T), "label_maps": label_maps}, targets, indices, expected


def criterion(cls):
    return cls(matcher=GroundingDinoHungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2), focal_alpha=0.25,
               losses=["labels", "boxes"])


def test_defect1_upstream_gives_later_images_other_images_tokens():
    outputs, targets, indices, expected = one_hot_case()
    upstream = criterion(GroundingDinoImageLoss)._get_target_classes_one_hot(outputs, targets, indices)
    assert torch.equal(upstream[0], expected[0])          # the first image is right ...
    assert not torch.equal(upstream[1:], expected[1:])    # ... the others are taught wrong tokens (defect)
    assert upstream[2, 1, 8] == 0 and upstream[2, 1].sum() == 1  # image 2's query points at image 0's phrase


def test_defect1_fixed_offsets_by_earlier_images():
    outputs, targets, indices, expected = one_hot_case()
    fixed = criterion(FixedImageLoss)._get_target_classes_one_hot(outputs, targets, indices)
    assert torch.equal(fixed, expected)


@pytest.fixture(scope="module")
def tiny_batch(small_world, tmp_path_factory):
    train, _ = small_world
    cfg = TrainConfig(output=str(tmp_path_factory.mktemp("loss-run")), data=DataConfig(
        coco=str(train.coco), refs=str(train.refs), images=str(train.images), shortest_edge=96, longest_edge=96))
    examples, _ = load_examples(cfg.data.coco, cfg.data.images, cfg.data.refs)
    model, tok, proc = build_model(cfg, Path(cfg.output))
    batch = Collator(proc, tok, model.config.max_text_len)(examples[:3], random.Random(0))
    return cfg, batch


ENCODER_PROPOSAL = ("model.enc_output.weight", "model.enc_output_norm.weight", "model.encoder_output_bbox_embed")


def encoder_grads(model) -> dict[str, float]:
    """Summed |grad| per encoder-proposal module (the box MLP's last layer starts at zero, as in
    DETR, so at initialisation only that layer of it can receive gradient)."""
    out = dict.fromkeys(ENCODER_PROPOSAL, 0.0)
    for name, p in model.named_parameters():
        for prefix in ENCODER_PROPOSAL:
            if name.startswith(prefix) and p.grad is not None:
                out[prefix] += float(p.grad.abs().sum())
    return out


def test_defect2_upstream_leaves_encoder_proposals_untrained(tiny_batch):
    cfg, batch = tiny_batch
    model, _, _ = build_model(cfg, Path(cfg.output))
    out = model(**{k: v for k, v in batch.items()})     # transformers' own loss
    out.loss.backward()
    grads = encoder_grads(model)
    assert all(g == 0.0 for g in grads.values()), grads  # the defect


def test_defect2_fixed_encoder_proposals_get_gradient(tiny_batch):
    cfg, batch = tiny_batch
    model, _, _ = build_model(cfg, Path(cfg.output))
    loss, parts = detection_loss(model, batch)
    loss.backward()
    grads = encoder_grads(model)
    assert all(g > 0.0 for g in grads.values()), grads
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(parts)
    assert torch.isfinite(loss)
