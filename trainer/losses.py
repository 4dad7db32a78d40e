"""The named loss terms, computed at the full input resolution (S x S: 1024 for SAM, 256 for LiteMedSAM) by
``kernels``, which upsample SAM's 256x256 logits 4x or not at all to match.

The per-pixel work (4x bilinear upsampling of the ``(256, 256)`` logits and every term) is
``kernels.mask_losses`` and ``kernels.class_ce``: a fused Triton kernel on CUDA, the torch reference
elsewhere. This file only weights and combines the ``(P,)`` per-object terms.

Why ``mse`` is on sigmoid probabilities: the often-copied tutorial loss
``MSE(normalize(threshold(x, 0, 0)), gt)`` has zero gradient. ``threshold(x, 0, 0)`` is ``x`` where
``x > 0`` and a constant 0 elsewhere, and ``normalize`` over SAM's single-mask channel divides each pixel by
its own magnitude, giving exactly 1 where ``x > 0`` and 0 elsewhere: a step function of the logits, flat
almost everywhere. Its gradient is 0 (up to rounding), so such a run never moves the weights it claims to
tune (``test_tutorial_threshold_normalize_mse_has_zero_gradient`` in ``tests/test_trainer_units.py`` shows
it). ``mean((sigmoid(x) - gt) ** 2)`` is the smooth version of the same idea and does train.
"""

from __future__ import annotations

import torch

import kernels
from trainer.config import LossConfig


def instance_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    valid_hw: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The loss of ``P`` objects with ``M`` candidate masks each (M = 1, or 3 for multimask).

    With ``M > 1`` only the candidate with the least mask loss is back-propagated, as SAM does. The IoU head
    is trained on all ``M`` candidates (MSE against each candidate's real IoU), so it learns to rank them,
    which the point evaluation relies on.

    Args:
        logits: ``(P, M, 256, 256)`` low-res mask logits.
        iou_pred: ``(P, M)`` predicted IoU.
        targets: ``(P, S, S)`` bool masks in the input frame.
        valid_hw: ``(P, 2)`` int input size (h, w) of each object's image.

    Returns:
        the scalar loss (mean over objects), a dict of detached per-term means over the chosen masks, and the
        ``(P,)`` index of the chosen candidate.
    """
    p, m, h, w = logits.shape
    flat_targets = (
        targets
        if m == 1
        else targets[:, None].expand(p, m, *targets.shape[1:]).reshape(p * m, *targets.shape[1:])
    )
    terms = kernels.mask_losses(
        logits.reshape(p * m, h, w),
        flat_targets,
        valid_hw.repeat_interleave(m, 0) if m > 1 else valid_hw,
        alpha=cfg.focal_alpha,
        gamma=cfg.focal_gamma,
        backend=cfg.backend,
    )
    per_mask = sum(getattr(cfg, k) * getattr(terms, k).reshape(p, m) for k in ("focal", "dice", "bce", "mse"))
    chosen = per_mask.detach().argmin(1)
    rows = torch.arange(p, device=logits.device)
    real_iou = terms.iou.reshape(p, m).detach()
    iou_head = ((iou_pred.float() - real_iou) ** 2).mean(1)
    loss = (per_mask[rows, chosen] + cfg.iou_head * iou_head).mean()
    logged = {
        k: getattr(terms, k).reshape(p, m)[rows, chosen].detach().mean()
        for k in ("focal", "dice", "bce", "mse")
    }
    logged["iou_head"] = iou_head.detach().mean()
    logged["iou"] = real_iou[rows, chosen].mean()
    return loss, logged, chosen


def semantic_loss(
    logits: torch.Tensor, labels: torch.Tensor, valid_hw: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ce`` (+ ``dice`` on each class's one-vs-rest mask) of ``B`` images with ``C`` classes.

    Args:
        logits: ``(B, C, 256, 256)`` class logits.
        labels: ``(B, S, S)`` int64 class ids in the input frame, -100 where ignored.
        valid_hw: ``(B, 2)`` int input size.
    """
    b, c, h, w = logits.shape
    ce = kernels.class_ce(logits, labels, valid_hw, ignore_index=-100, backend=cfg.backend)
    loss = cfg.ce * ce.mean()
    logged = {"ce": ce.detach().mean()}
    if cfg.dice > 0:
        onehot = labels[:, None] == torch.arange(c, device=labels.device)[None, :, None, None]  # (B, C, H, W)
        terms = kernels.mask_losses(
            logits.reshape(b * c, h, w),
            onehot.reshape(b * c, *labels.shape[1:]),
            valid_hw.repeat_interleave(c, 0),
            backend=cfg.backend,
        )
        loss = loss + cfg.dice * terms.dice.mean()
        logged["dice"] = terms.dice.detach().mean()
        logged["iou"] = terms.iou.mean()
    return loss, logged
