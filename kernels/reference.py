"""Plain-torch references for the fused kernels: these functions *define* the ops, and the tests trust them.

Both ops take SAM's low-resolution ``(h, w)`` logits, bring them to the targets' frame, keep the valid
(unpadded) top-left region of each mask or image, and compute losses there. The upsample factor ``f`` comes
from the targets' shape:

- ``f = 4``: targets ``(4h, 4w)``, SAM's case (256 logits, 1024 input). The logits are upsampled the way
  ``Sam.postprocess_masks`` does (``F.interpolate(..., mode="bilinear", align_corners=False)``). These
  references materialise the upsampled ``(P, 4h, 4w)`` tensor (and autograd keeps it, and its gradient, for
  the backward); the Triton ops in ``mask_losses.py`` and ``class_ce.py`` compute the same numbers without it.
- ``f = 1``: targets ``(h, w)``, a model whose input frame is its logits' (LiteMedSAM: 256 input, 256 logits).
  The logits are used as they are.

Conventions shared with the Triton ops:

- ``valid_hw[i] = (vh, vw)`` is clamped to ``[0, f h] x [0, f w]``; the valid region is ``[:vh, :vw]``.
- An empty valid region (``vh == 0`` or ``vw == 0``) gives ``focal = bce = mse = dice = 0`` and ``iou = 1``,
  with zero gradient: a mean over no pixels is taken as 0, and the dice and IoU formulas give 0 and 1 by
  themselves.
- Targets are binary: any nonzero value of a ``bool``/``uint8`` target counts as foreground.
- Losses are computed, and returned, in float32 for float32 and bfloat16 logits (float64 stays float64, which
  the gradient checks use).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "FACTORS",
    "MaskLosses",
    "upsample_factor",
    "upsample",
    "valid_mask",
    "mask_losses_reference",
    "class_ce_reference",
    "sigmoid_focal_loss",
]


class MaskLosses(NamedTuple):
    """Per-mask losses, each a ``(P,)`` float tensor. ``iou`` carries no gradient."""

    focal: torch.Tensor
    """Sigmoid focal loss (torchvision's definition), mean over the valid pixels."""
    bce: torch.Tensor
    """Binary cross-entropy with logits, mean over the valid pixels."""
    dice: torch.Tensor
    """``1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)`` over the valid pixels, ``p = sigmoid(up)``."""
    mse: torch.Tensor
    """Mean of ``(sigmoid(up) - t) ** 2`` over the valid pixels (SAM's IoU-head target uses this shape)."""
    iou: torch.Tensor
    """Hard IoU of ``up > 0`` against ``t`` over the valid pixels; 1 when the union is empty."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are promoted: the losses are sums over up to a million pixels per mask.
    return torch.float64 if dtype == torch.float64 else torch.float32


FACTORS = (1, 4)
"""The upsample factors from the logits to the targets that the ops implement."""


def upsample_factor(logits_hw: tuple[int, int], frame: tuple[int, ...], what: str) -> int:
    """The factor from ``(h, w)`` logits to a target frame ending in ``(4h, 4w)`` (4) or ``(h, w)`` (1).

    Raises ``ValueError`` naming ``what`` and both accepted shapes for anything else.
    """
    h, w = logits_hw
    for factor in FACTORS:
        if tuple(frame[-2:]) == (factor * h, factor * w):
            return factor
    raise ValueError(
        f"{what} must end in ({4 * h}, {4 * w}) (the logits' 4x upsample, SAM's input frame) or ({h}, {w}) "
        f"(the logits' own resolution) for ({h}, {w}) logits, got {tuple(frame)}"
    )


def upsample(logits: torch.Tensor, factor: int) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N, C, f h, f w)``: bilinear for ``f = 4`` (the first half of
    ``Sam.postprocess_masks``), the logits themselves for ``f = 1``."""
    if factor == 1:
        return logits
    n, c, h, w = logits.shape
    return F.interpolate(logits, (factor * h, factor * w), mode="bilinear", align_corners=False)


def valid_mask(valid_hw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(P, 2)`` int valid sizes -> ``(P, height, width)`` bool, True on ``[:vh, :vw]`` (sizes clamped)."""
    vh = valid_hw[:, 0].clamp(0, height)
    vw = valid_hw[:, 1].clamp(0, width)
    rows = torch.arange(height, device=valid_hw.device)
    cols = torch.arange(width, device=valid_hw.device)
    return (rows[None, :, None] < vh[:, None, None]) & (cols[None, None, :] < vw[:, None, None])


def sigmoid_focal_loss(x: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Elementwise sigmoid focal loss, as ``torchvision.ops.sigmoid_focal_loss(reduction="none")`` defines it.

    ``alpha < 0`` switches the class weighting off, as in torchvision.
    """
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def mask_losses_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid_hw: torch.Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    soft: bool = False,
) -> MaskLosses:
    """The definition of ``kernels.mask_losses``.

    Args:
        logits: ``(P, h, w)`` float32, bfloat16 or float64 low-resolution mask logits.
        targets: ``(P, 4h, 4w)`` (upsample factor 4) or ``(P, h, w)`` (factor 1) bool or uint8 ground truth
            in the model's input frame (nonzero = foreground); with ``soft``, uint8 foreground shares in
            255ths (the target of pixel i is ``targets[i] / 255``; ``iou`` counts ``>= 128`` as foreground).
        valid_hw: ``(P, 2)`` int, the valid size ``(vh, vw)`` of each mask's input frame, before padding.
        alpha, gamma: the focal loss parameters (torchvision's meaning; with soft targets its formula as
            written, ``p_t = p t + (1 - p)(1 - t)``).

    Returns:
        ``MaskLosses`` of ``(P,)`` tensors in float32 (float64 for float64 logits).
    """
    factor = _check_mask_inputs(logits, targets, valid_hw, soft)
    valid_hw = valid_hw.to(logits.device)  # callers often keep the sizes on the host
    x = upsample(logits.to(_compute_dtype(logits.dtype))[:, None], factor)[:, 0]  # (P, f h, f w)
    fg = (targets >= 128) if soft else (targets != 0)
    t = targets.to(x.dtype) / 255 if soft else fg.to(x.dtype)
    valid = valid_mask(valid_hw, *x.shape[1:]).to(x.dtype)
    n = valid.sum((1, 2))
    inv_n = torch.where(n > 0, 1 / n.clamp(min=1), torch.zeros_like(n))

    def mean(v: torch.Tensor) -> torch.Tensor:
        return (v * valid).sum((1, 2)) * inv_n

    p = torch.sigmoid(x)
    focal = mean(sigmoid_focal_loss(x, t, alpha, gamma))
    bce = mean(F.binary_cross_entropy_with_logits(x, t, reduction="none"))
    mse = mean((p - t) ** 2)
    inter = (p * t * valid).sum((1, 2))
    total = ((p + t) * valid).sum((1, 2))
    dice = 1 - (2 * inter + 1) / (total + 1)
    with torch.no_grad():
        pred = (x > 0).to(x.dtype)
        hard_t = fg.to(x.dtype)
        hard_inter = (pred * hard_t * valid).sum((1, 2))
        hard_union = (torch.maximum(pred, hard_t) * valid).sum((1, 2))
        iou = torch.where(hard_union > 0, hard_inter / hard_union.clamp(min=1), torch.ones_like(hard_union))
    return MaskLosses(focal, bce, dice, mse, iou)


def class_ce_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid_hw: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The definition of ``kernels.class_ce``: per-image mean cross-entropy over the (upsampled) class logits.

    Args:
        logits: ``(B, C, h, w)`` float32, bfloat16 or float64 low-resolution class logits.
        labels: ``(B, 4h, 4w)`` (upsample factor 4) or ``(B, h, w)`` (factor 1) integer class ids in
            ``[0, C)`` or ``ignore_index``.
        valid_hw: ``(B, 2)`` int valid size of each image's input frame.
        ignore_index: label value that contributes nothing.

    Returns:
        ``(B,)`` float32 (float64 for float64 logits): the mean cross-entropy over the pixels of each image
        that are valid and not ignored; 0 for an image with no such pixel (``F.cross_entropy`` would give
        NaN).

    Raises:
        ValueError: on a label outside ``[0, C)`` that is not ``ignore_index`` (the Triton op ignores such
            labels, since it cannot raise without a device sync).
    """
    factor = _check_class_inputs(logits, labels, valid_hw)
    c = logits.shape[1]
    labels = labels.long()
    counted = valid_mask(valid_hw.to(labels.device), *labels.shape[1:]) & (labels != ignore_index)
    bad = counted & ((labels < 0) | (labels >= c))
    if bool(bad.any()):
        raise ValueError(f"labels outside [0, {c}) other than ignore_index={ignore_index}")
    x = upsample(logits.to(_compute_dtype(logits.dtype)), factor)  # (B, C, f h, f w)
    safe = torch.where(counted, labels, torch.zeros_like(labels))
    ce = F.cross_entropy(x, safe, reduction="none")  # (B, f h, f w)
    counted = counted.to(x.dtype)
    n = counted.sum((1, 2))
    return (ce * counted).sum((1, 2)) / n.clamp(min=1)


def _check_mask_inputs(
    logits: torch.Tensor, targets: torch.Tensor, valid_hw: torch.Tensor, soft: bool = False
) -> int:
    """Raise a ``ValueError`` on inputs ``mask_losses`` does not take; return the upsample factor."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (P, h, w), got {tuple(logits.shape)}")
    p_count, h, w = logits.shape
    if targets.dim() != 3 or targets.shape[0] != p_count:
        raise ValueError(f"targets must be ({p_count}, H, W) for {p_count} masks, got {tuple(targets.shape)}")
    factor = upsample_factor((h, w), targets.shape, "targets")
    if targets.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"targets must be bool or uint8, got {targets.dtype}")
    if soft and targets.dtype != torch.uint8:
        raise ValueError(f"soft targets are uint8 shares in 255ths, got {targets.dtype}")
    if valid_hw.shape != (p_count, 2) or valid_hw.is_floating_point():
        raise ValueError(
            f"valid_hw must be an int ({p_count}, 2) tensor, got {valid_hw.dtype} {tuple(valid_hw.shape)}"
        )
    return factor


def _check_class_inputs(logits: torch.Tensor, labels: torch.Tensor, valid_hw: torch.Tensor) -> int:
    """Raise a ``ValueError`` on inputs ``class_ce`` does not take; return the upsample factor."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, h, w), got {tuple(logits.shape)}")
    b, _, h, w = logits.shape
    if labels.dim() != 3 or labels.shape[0] != b or labels.is_floating_point():
        raise ValueError(f"labels must be integer ({b}, H, W), got {labels.dtype} {tuple(labels.shape)}")
    factor = upsample_factor((h, w), labels.shape, "labels")
    if valid_hw.shape != (b, 2) or valid_hw.is_floating_point():
        raise ValueError(
            f"valid_hw must be an int ({b}, 2) tensor, got {valid_hw.dtype} {tuple(valid_hw.shape)}"
        )
    return factor
