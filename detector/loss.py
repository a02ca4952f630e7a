"""GroundingDINO's training loss with two upstream defects fixed (transformers 5.24).

:func:`detection_loss` is the one entry point: ``loss, parts = detection_loss(model, batch)``.
It runs the model with ``labels=`` (decoder + auxiliary losses through :func:`decoder_loss`,
installed as the model's ``loss_function``) and adds :func:`encoder_proposal_loss`.

Defect 1 — wrong token targets for every image after the first in a batch.
    ``GroundingDinoImageLoss._get_target_classes_one_hot`` concatenates the per-image label maps
    (one row per phrase of the prompt) and indexes them with ``class_labels``; image ``i``'s labels
    must be offset by the number of phrases of images ``0..i-1``. Upstream offsets them by
    ``len(label_maps[i])``, image ``i``'s *own* phrase count, so from the second image on (the
    third, when the first two have equal counts) the focal loss is taught another image's tokens.
    Fix: :class:`FixedImageLoss` offsets by the running total.

Defect 2 — the two-stage encoder proposals are never trained.
    With ``two_stage`` the model picks its ``num_queries`` initial boxes as the top-scoring encoder
    proposals (``enc_output`` -> ``enc_output_norm`` -> ``encoder_output_class_embed`` /
    ``encoder_output_bbox_embed``). Upstream's ``*_enc`` loss is computed on
    ``encoder_pred_boxes`` / ``encoder_logits``, which the model builds from *detached* tensors, so
    ``enc_output``, ``enc_output_norm`` and ``encoder_output_bbox_embed`` get no gradient and the
    proposals stay at their random initialisation. Fix (as in the original GroundingDINO and
    two-stage Deformable DETR): :func:`encoder_proposal_loss` takes the same top-k proposals from
    the model's gradient-carrying ``enc_outputs_class`` / ``enc_outputs_coord_logits`` and applies
    the matched focal + L1 + GIoU loss to them; :func:`decoder_loss` drops upstream's
    gradient-less ``*_enc`` terms.
"""
from __future__ import annotations

import torch
from transformers.loss.loss_for_object_detection import _set_aux_loss
from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

LOSS_WEIGHTS = ("loss_ce", "loss_bbox", "loss_giou")


class FixedImageLoss(GroundingDinoImageLoss):
    """``GroundingDinoImageLoss`` whose one-hot targets offset image i's labels by images 0..i-1 (defect 1)."""

    def _get_target_classes_one_hot(self, outputs, targets, indices):
        logits = outputs["logits"]                                                # (B, Q, T)
        sizes = [len(m) for m in outputs["label_maps"]]                           # phrases per image
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        class_labels = torch.cat([t["class_labels"][j] + off for t, (_, j), off in zip(targets, indices, offsets)])
        label_maps = torch.cat(outputs["label_maps"], dim=0)                       # (sum P_i, T)
        idx = self._get_source_permutation_idx(indices)
        onehot = torch.zeros_like(logits, dtype=torch.long)
        onehot[idx] = label_maps[class_labels].to(torch.long)
        return onehot


def make_criterion(config) -> FixedImageLoss:
    matcher = GroundingDinoHungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost,
                                            giou_cost=config.giou_cost)
    return FixedImageLoss(matcher=matcher, focal_alpha=config.focal_alpha, losses=["labels", "boxes", "cardinality"])


def loss_weights(config) -> dict[str, float]:
    return {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}


def decoder_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask, outputs_class=None,
                 outputs_coord=None, encoder_logits=None, encoder_pred_boxes=None):
    """Upstream ``GroundingDinoForObjectDetectionLoss`` (same signature) with :class:`FixedImageLoss`
    and without its gradient-less ``*_enc`` terms (see :func:`encoder_proposal_loss`)."""
    criterion = make_criterion(config).to(device)
    outputs = {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps, "text_mask": text_mask}
    aux = None
    if config.auxiliary_loss:
        aux = _set_aux_loss(outputs_class, outputs_coord)
        for a in aux:
            a["label_maps"], a["text_mask"] = label_maps, text_mask
        outputs["auxiliary_outputs"] = aux
    parts = criterion(outputs, labels)
    base = loss_weights(config)
    weights = dict(base)
    if config.auxiliary_loss:
        for i in range(config.decoder_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    loss = sum(parts[k] * weights[k] for k in parts if k in weights)
    return loss, parts, aux


def encoder_proposal_loss(outputs, labels, config, input_ids, attention_mask):
    """Matched loss on the top-``num_queries`` encoder proposals, with their gradient (defect 2).

    ``outputs`` is the model's output (``enc_outputs_class`` (B, S, T), ``enc_outputs_coord_logits``
    (B, S, 4)); the proposals are chosen as the model chooses them (top-k of the best token logit).
    Returns ``(loss, parts)`` with parts named ``*_enc``.
    """
    cls = outputs.enc_outputs_class                                               # (B, S, T)
    coords = outputs.enc_outputs_coord_logits                                     # (B, S, 4)
    topk = torch.topk(cls.max(-1).values, config.num_queries, dim=1).indices      # (B, Q)
    logits = torch.gather(cls, 1, topk[..., None].expand(-1, -1, cls.shape[-1]))  # (B, Q, T)
    boxes = torch.gather(coords, 1, topk[..., None].expand(-1, -1, 4)).sigmoid()  # (B, Q, 4)
    criterion = make_criterion(config).to(logits.device)
    parts = criterion({"logits": logits, "pred_boxes": boxes, "label_maps": build_label_maps(logits, input_ids),
                       "text_mask": build_text_mask(logits, attention_mask)}, labels)
    weights = loss_weights(config)
    loss = sum(parts[k] * weights[k] for k in weights)
    return loss, {f"{k}_enc": v for k, v in parts.items()}


def install(model) -> None:
    """Make ``model(..., labels=...)`` use :func:`decoder_loss` (defect 1 fixed, no ``*_enc`` terms)."""
    model.loss_function = decoder_loss


def detection_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Total training loss of ``model`` on a collated ``batch`` (both defects fixed) and its parts."""
    install(model)
    out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"], labels=batch["labels"])
    loss, parts = out.loss, dict(out.loss_dict)
    if model.config.two_stage:
        enc_loss, enc_parts = encoder_proposal_loss(out, batch["labels"], model.config, batch["input_ids"],
                                                    batch["attention_mask"])
        loss = loss + enc_loss
        parts.update(enc_parts)
    return loss, {k: float(v.detach()) for k, v in parts.items()}
