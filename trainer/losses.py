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
from kernels.reference import upsample, upsample_factor, valid_mask
from trainer.config import LossConfig

IGNORE = -100
"""The label of pixels that count for nothing in the semantic loss: the padding and the cache's ignore
region (``trainer.data.read_batch``)."""


def instance_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    valid_hw: torch.Tensor,
    cfg: LossConfig,
    multimask: torch.Tensor,
    weight: torch.Tensor | None = None,
    soft: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``P`` objects of one prompting round, on the outputs each object's prompt uses.

    An object with ``multimask`` (a single-point prompt) is scored on SAM's three multimask outputs 1..3 and
    only the one with the least mask loss is back-propagated, as SAM does for ambiguous prompts; every other
    object (a box, several clicks) is scored on the single-mask output 0, the one it uses at inference. The
    IoU head is trained on every scored output (MSE against its real IoU), so it learns to rank the three.

    Args:
        logits: ``(P, 4, 256, 256)`` low-res mask logits (SAM's output 0 and multimask outputs 1..3).
        iou_pred: ``(P, 4)`` predicted IoU.
        targets: ``(P, S, S)`` bool masks in the input frame, or with ``soft`` uint8 coverage in 255ths
            (``data.targets: coverage``; ``kernels.mask_losses``' soft targets).
        valid_hw: ``(P, 2)`` int input size (h, w) of each object's image.
        multimask: ``(P,)`` bool, the objects scored on outputs 1..3.
        weight: ``(P,)`` float factor on each object's loss (None: all 1).

    Returns:
        the scalar loss (the mean over objects of the weighted loss) and a dict of detached per-term means
        over the chosen masks.
    """
    p, _, h, w = logits.shape
    dev = logits.device
    single = torch.nonzero(~multimask).flatten()
    multi = torch.nonzero(multimask).flatten()
    # the scored (object, output) pairs: output 0 of single-mask objects, outputs 1..3 of multimask ones
    rows = torch.cat([single, multi.repeat_interleave(3)])
    cols = torch.cat([torch.zeros_like(single), torch.arange(1, 4, device=dev).repeat(multi.numel())])
    terms = kernels.mask_losses(
        logits[rows, cols],
        targets[rows],
        valid_hw[rows],
        alpha=cfg.focal_alpha,
        gamma=cfg.focal_gamma,
        backend=cfg.backend,
        soft=soft,
    )
    per_mask = sum(getattr(cfg, k) * getattr(terms, k) for k in ("focal", "dice", "bce", "mse"))
    # (P, 4) with inf where an output is not scored, so the least loss per object is a row's argmin
    table = torch.full((p, 4), float("inf"), device=dev).index_put((rows, cols), per_mask)
    chosen = table.detach().argmin(1)
    objects = torch.arange(p, device=dev)
    pick = torch.full((p, 4), -1, dtype=torch.long, device=dev)
    pick[rows, cols] = torch.arange(rows.numel(), device=dev)
    picked = pick[objects, chosen]  # each object's chosen pair, into rows/cols
    real_iou = terms.iou.detach()
    squared = (iou_pred[rows, cols].float() - real_iou) ** 2
    iou_head = torch.zeros(p, device=dev).index_add(0, rows, squared) / torch.bincount(rows, minlength=p)
    per_object = table[objects, chosen] + cfg.iou_head * iou_head
    loss = (per_object if weight is None else per_object * weight).mean()
    logged = {k: getattr(terms, k)[picked].detach().mean() for k in ("focal", "dice", "bce", "mse")}
    logged["iou_head"] = iou_head.detach().mean()
    logged["iou"] = real_iou[picked].mean()
    return loss, logged


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
    ce = kernels.class_ce(logits, labels, valid_hw, ignore_index=IGNORE, backend=cfg.backend)
    loss = cfg.ce * ce.mean()
    logged = {"ce": ce.detach().mean()}
    if cfg.dice > 0:
        onehot = labels[:, None] == torch.arange(c, device=labels.device)[None, :, None, None]  # (B, C, H, W)
        onehot = onehot.reshape(b * c, *labels.shape[1:])
        counted = labels != IGNORE  # the padding and the cache's ignore region
        # the kernel counts its valid rectangle: ignored pixels inside it need the masked torch path (one host
        # sync to choose; it materialises the (B C, S, S) upsampled logits, so it is taken only when needed)
        if bool((~counted & valid_mask(valid_hw.to(labels.device), *labels.shape[1:])).any()):
            dice, iou = masked_dice(logits.reshape(b * c, h, w), onehot, counted.repeat_interleave(c, 0))
        else:
            terms = kernels.mask_losses(
                logits.reshape(b * c, h, w), onehot, valid_hw.repeat_interleave(c, 0), backend=cfg.backend
            )
            dice, iou = terms.dice, terms.iou
        loss = loss + cfg.dice * dice.mean()
        logged["dice"] = dice.detach().mean()
        logged["iou"] = iou.mean()
    return loss, logged


def masked_dice(
    logits: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.mask_losses``' soft dice and hard IoU over an arbitrary set of pixels, not a rectangle.

    Args:
        logits: ``(N, h, w)`` low-resolution logits.
        targets: ``(N, S, S)`` bool targets (S = 4h or h, as ``mask_losses``).
        counted: ``(N, S, S)`` bool, the pixels that count; the others get no loss and no gradient.
    Returns:
        ``(N,)`` float32 dice loss (with ``mask_losses``' +1 smoothing) and ``(N,)`` hard IoU (1 on an empty
        union).
    """
    factor = upsample_factor(tuple(logits.shape[-2:]), tuple(targets.shape), "targets")
    x = upsample(logits.float()[:, None], factor)[:, 0]
    t = targets & counted
    p = torch.sigmoid(x) * counted
    dice = 1 - (2 * (p * t).sum((1, 2)) + 1) / ((p + t).sum((1, 2)) + 1)
    with torch.no_grad():
        pred = (x > 0) & counted
        union = (pred | t).sum((1, 2))
        iou = torch.where(union > 0, (pred & t).sum((1, 2)) / union.clamp(min=1), 1.0)
    return dice, iou
