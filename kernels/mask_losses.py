"""Per-mask losses of low-resolution logits upsampled 4x (or not) against their targets: the public op.

``mask_losses`` checks its inputs and dispatches: the torch reference (``kernels.reference``) or the fused
Triton kernels (``kernels/mask_losses_triton.py``, whose module docstring has the layout of the work).
``min_bytes_moved`` gives the bandwidth floor of the fused op.
"""

from __future__ import annotations

import torch

from kernels._dispatch import HAS_TRITON, resolve_backend
from kernels.reference import MaskLosses, _check_mask_inputs, mask_losses_reference

if HAS_TRITON:  # an optional dependency; resolve_backend never picks "triton" without it
    from kernels.mask_losses_triton import triton_mask_losses

__all__ = ["mask_losses", "min_bytes_moved", "MaskLosses"]


def mask_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid_hw: torch.Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    backend: str = "auto",
    block: int | None = None,
    soft: bool = False,
) -> MaskLosses:
    """Per-mask focal, BCE, dice, MSE and hard IoU of the logits, upsampled 4x or not, against the targets.

    Equal to ``kernels.reference.mask_losses_reference``, which defines it: the upsample factor ``f`` is 4
    for ``(P, 4h, 4w)`` targets (SAM: 256 logits, 1024 input; bilinear ``align_corners=False``, as
    ``Sam.postprocess_masks``) and 1 for ``(P, h, w)`` targets (LiteMedSAM: the logits are the input frame);
    then crop to ``[:vh, :vw]`` per mask and take means over the valid pixels. An empty valid region gives 0
    for every loss, 1 for ``iou``, and zero gradient.

    Args:
        logits: ``(P, h, w)`` float32 or bfloat16 low-resolution logits (e.g. ``(P, 256, 256)`` from SAM's
            decoder). The Triton path computes in float32 whatever the input dtype; the gradient comes back in
            the input dtype.
        targets: ``(P, 4h, 4w)`` or ``(P, h, w)`` bool or uint8 targets in the model's input frame; nonzero is
            foreground. Read as one byte per pixel (not bit-packed). With ``soft``: uint8 foreground shares
            in 255ths (``trainer``'s coverage targets), the target of a pixel being ``value / 255``; ``iou``
            then counts ``value >= 128`` as foreground.
        valid_hw: ``(P, 2)`` int ``(vh, vw)`` per mask, clamped to ``[0, f h] x [0, f w]``.
        alpha: focal class weight of the foreground (``< 0`` disables it, as in torchvision).
        gamma: focal exponent, ``>= 0``. Each distinct value compiles its own kernel (it is a ``constexpr``).
        backend: ``"auto"`` sends CUDA tensors to Triton (when triton is installed) and everything else to
            the torch reference; ``"triton"`` forces Triton (on CPU only under ``TRITON_INTERPRET=1``);
            ``"torch"`` forces the reference.
        block: a program covers ``4 block x 4 block`` target pixels (``block`` a power of two >= 2; at
            ``f = 4``, ``block x block`` groups of 4x4 pixels) in both kernels; ``None`` takes
            ``FWD_CONFIG`` and ``BWD_CONFIG`` of ``kernels/mask_losses_triton.py``.
        soft: read ``targets`` as shares in 255ths (above) rather than as foreground flags.

    Returns:
        ``MaskLosses(focal, bce, dice, mse, iou)``, each a ``(P,)`` float32 tensor.
    """
    factor = _check_mask_inputs(logits, targets, valid_hw, soft)
    if resolve_backend(backend, logits) == "torch":
        return mask_losses_reference(logits, targets, valid_hw, alpha=alpha, gamma=gamma, soft=soft)
    return triton_mask_losses(logits, targets, valid_hw, alpha, gamma, factor, block, soft)


def min_bytes_moved(
    p_count: int,
    h: int,
    w: int,
    dtype: torch.dtype = torch.float32,
    *,
    backward: bool = True,
    factor: int = 4,
) -> int:
    """Bytes the fused op must move to or from device memory for ``(P, h, w)`` logits (the bandwidth floor).

    Forward: read the logits (``P h w`` elements) and the ``(P, f h, f w)`` targets (``f^2 P h w`` bytes,
    one byte per pixel). Backward: read both again and write the gradient (``P h w`` elements). Per-mask
    scalars and the partial-sum buffer (8 floats per tile) are left out. With float32 logits that is
    ``44 P h w`` bytes for forward + backward at ``f = 4`` (``20 P h w`` forward only; the targets
    dominate), and ``14 P h w`` at ``f = 1``: the bytes of any fused elementwise loss with a backward.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    lowres = p_count * h * w
    target = factor * factor * lowres
    fwd = lowres * elem + target
    if not backward:
        return fwd
    return fwd + lowres * elem + target + lowres * elem
