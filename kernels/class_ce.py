"""Per-image mean cross-entropy of C class logits upsampled 4x (or not) against labels: the public op.

``class_ce`` checks its inputs and dispatches: the torch reference (``kernels.reference``) or the fused Triton
kernels (``kernels/class_ce_triton.py``).
"""

from __future__ import annotations

import torch

from kernels._dispatch import HAS_TRITON, resolve_backend
from kernels.reference import _check_class_inputs, class_ce_reference

if HAS_TRITON:  # an optional dependency; resolve_backend never picks "triton" without it
    from kernels.class_ce_triton import triton_class_ce

__all__ = ["class_ce"]


def class_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid_hw: torch.Tensor,
    ignore_index: int = -100,
    backend: str = "auto",
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Per-image mean cross-entropy of the class logits, upsampled 4x or not, against the labels.

    Equal to ``kernels.reference.class_ce_reference``: the upsample factor ``f`` is 4 for ``(B, 4h, 4w)``
    labels (bilinear ``align_corners=False``, as ``Sam.postprocess_masks``) and 1 for ``(B, h, w)`` labels;
    then the mean of ``logsumexp_c(x) - x[label]`` over the pixels inside ``[:vh, :vw]`` whose label is not
    ``ignore_index``; 0 (and zero gradient) for an image with no such pixel.

    Args:
        logits: ``(B, C, h, w)`` float32 or bfloat16 low-resolution class logits; computed in float32.
        labels: ``(B, 4h, 4w)`` or ``(B, h, w)`` integer labels in ``[0, C)`` or ``ignore_index``.
        valid_hw: ``(B, 2)`` int ``(vh, vw)`` per image, clamped to ``[0, f h] x [0, f w]``.
        ignore_index: label value that counts for nothing.
        backend: ``"auto"`` (CUDA tensors to Triton when triton is installed, others to the reference),
            ``"triton"`` or ``"torch"``.
        block: a program covers ``4 block x 4 block`` label pixels (power of two >= 2) in both kernels;
            ``None`` takes ``FWD_CONFIG`` and ``BWD_CONFIG`` of ``kernels/class_ce_triton.py``.

    Returns:
        ``(B,)`` float32 mean cross-entropy per image.
    """
    factor = _check_class_inputs(logits, labels, valid_hw)
    if resolve_backend(backend, logits) == "torch":
        return class_ce_reference(logits, labels, valid_hw, ignore_index)
    return triton_class_ce(logits, labels, valid_hw, ignore_index, factor, block)
