"""Fused 4x bilinear upsample + per-image mean cross-entropy over C class logits, forward and backward.

The Triton side of ``kernels.class_ce``, which dispatches here and is the only importer (triton is an optional
dependency). ``kernels.reference.class_ce_reference`` defines the op. The tiling, the group layout of the 4x
upsample and the gather-based adjoint are the ones of ``kernels/mask_losses_triton.py`` (read its module
docstring first), and the device code for them is shared (``kernels/_tile.py``); here each program also loops
over the C classes:

- Forward: one program per (image, block of groups). A loop over classes keeps an online log-sum-exp per
  high-res pixel and picks the labelled class's logit; the program writes ``(sum of CE, count)`` for its tile.
- Backward: one program per (image, overlapping block of groups). A first class loop recomputes the
  softmax statistics, a second one forms ``softmax_c - [label == c]`` per pixel for class ``c`` (for the
  labelled class as minus the other classes' share, so confident pixels keep their precision), takes the
  adjoint of the upsample on the tile and writes the low-res gradient of class ``c``. No atomics, nothing at
  full resolution is stored; the price is ``2 C`` interpolations per pixel in the backward.

With ``(B, h, w)`` labels (upsample factor 1) the same kernels read the logits and write their gradient as
they are, on plain pixel blocks (``kernels/_tile.py``).

Labels are read in their own integer dtype (no copy). Labels outside ``[0, C)`` that are not ``ignore_index``
count as ignored here (the torch reference raises on them instead: a kernel cannot raise without a sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import check_triton_args, require_launchable
from kernels._tile import load_logits, store_grad, tile, tile_grid, valid_size

__all__ = ["triton_class_ce"]

# (BLOCK, num_warps) per kernel and upsample factor; not timed on a GPU. From `ptxas -v` for sm_90 (fp32
# logits): at factor 4 the forward's class loop keeps more live than mask_losses (BLOCK=8: 175 registers at 4
# warps, 78 at 8); the backward at BLOCK=16, 8 warps uses 161 (122 before it kept the other classes' sum for
# a precise labelled-class gradient). At factor 1, 32x32-pixel tiles (BLOCK=8) at 8 warps use 40 (forward)
# and 72 (backward). No spills in any. `block=` overrides both.
FWD_CONFIG = {4: (8, 8), 1: (8, 8)}
BWD_CONFIG = {4: (16, 8), 1: (8, 8)}


def _launch_config(config: tuple[int, int], block: int | None) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: the kernel's tuned ``config``, or the ``block=`` override with its warps."""
    return config if block is None else (block, 8 if block >= 8 else 4)


@triton.jit
def _load_labels(labels_ptr, pid_b, y, x, inside, C, h, w, ignore_index, UP: tl.constexpr):
    """The tile's labels (``ignore_index`` outside the valid region) and which pixels count.

    A pixel counts when it is valid, its label is not ``ignore_index``, and the label is in ``[0, C)``.
    """
    H = UP * h
    W = UP * w
    label = tl.load(labels_ptr + pid_b.to(tl.int64) * H * W + y * W + x, mask=inside, other=ignore_index)
    counted = inside & (label != ignore_index) & (label >= 0) & (label < C)
    return label, counted


@triton.jit
def _softmax_stats(logits_ptr, pid_b, C, h, w, source, label, UP: tl.constexpr):
    """Online softmax statistics over the C class logits (upsampled at ``UP = 4``) of every pixel of the tile:
    the running max ``m``, ``sum_c exp(x_c - m)``, the same sum without the labelled class, and the labelled
    class's logit (0 where the label is not a class).

    The sum without the labelled class gives ``1 - softmax_label`` without cancelling near 1: a confident
    pixel's gradient keeps its relative precision (``exp(x - lse) - 1`` would lose it to the rounding of lse).
    """
    run_max = tl.full(label.shape, float("-inf"), tl.float32)
    run_sum = tl.full(label.shape, 0.0, tl.float32)
    other_sum = tl.full(label.shape, 0.0, tl.float32)
    picked = tl.full(label.shape, 0.0, tl.float32)
    for c in range(0, C):
        up = load_logits(logits_ptr + (pid_b.to(tl.int64) * C + c) * h * w, source, UP)
        new_max = tl.maximum(run_max, up)
        rescale = tl.exp(run_max - new_max)
        term = tl.exp(up - new_max)
        run_sum = run_sum * rescale + term
        other_sum = other_sum * rescale + tl.where(label == c, 0.0, term)
        run_max = new_max
        picked = tl.where(label == c, up, picked)
    return run_max, run_sum, other_sum, picked


@triton.jit
def _class_ce_fwd(
    logits_ptr,  # (B, C, h, w) float32 / bfloat16
    labels_ptr,  # (B, UP h, UP w) integer
    valid_ptr,  # (B, 2) int32
    partial_ptr,  # (B, n_tiles, 2) float32 out: sum of CE, number of counted pixels
    C,
    h,
    w,
    n_tiles_w,
    ignore_index,
    UP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    vh, vw = valid_size(valid_ptr, pid_b, h, w, UP)
    y, x, inside, source = tile(pid_t, n_tiles_w, vh, vw, h, w, UP, BLOCK, False)
    label, counted = _load_labels(labels_ptr, pid_b, y, x, inside, C, h, w, ignore_index, UP)
    run_max, run_sum, _other_sum, picked = _softmax_stats(logits_ptr, pid_b, C, h, w, source, label, UP)
    ce = run_max + tl.log(run_sum) - picked
    zero = tl.full(inside.shape, 0.0, tl.float32)
    out = partial_ptr + (pid_b.to(tl.int64) * n_tiles + pid_t) * 2
    tl.store(out + 0, tl.sum(tl.where(counted, ce, zero)))
    tl.store(out + 1, tl.sum(tl.where(counted, 1.0, zero)))


@triton.jit
def _class_ce_bwd(
    logits_ptr,  # (B, C, h, w) float32 / bfloat16
    labels_ptr,  # (B, UP h, UP w) integer
    valid_ptr,  # (B, 2) int32
    coef_ptr,  # (B,) float32: upstream gradient / counted pixels
    grad_ptr,  # (B, C, h, w) out, logits' dtype
    C,
    h,
    w,
    n_tiles_w,
    ignore_index,
    UP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    vh, vw = valid_size(valid_ptr, pid_b, h, w, UP)
    coef = tl.load(coef_ptr + pid_b)

    # At UP = 4, overlapping blocks as in mask_losses: BLOCK groups produce BLOCK - 1 low-res rows/cols.
    y, x, inside, source = tile(pid_t, n_tiles_w, vh, vw, h, w, UP, BLOCK, True)
    label, counted = _load_labels(labels_ptr, pid_b, y, x, inside, C, h, w, ignore_index, UP)
    run_max, run_sum, other_sum, _picked = _softmax_stats(logits_ptr, pid_b, C, h, w, source, label, UP)
    inv_sum = 1.0 / run_sum

    for c in range(0, C):
        plane = (pid_b.to(tl.int64) * C + c) * h * w
        up = load_logits(logits_ptr + plane, source, UP)
        # softmax_c - [label == c]; for the labelled class, minus the other classes' share.
        g = coef * tl.where(label == c, -other_sum, tl.exp(up - run_max)) * inv_sum
        g = tl.where(counted, g, 0.0)
        # At UP = 4 the adjoint of the upsample (kernels/_tile.py): columns, then rows, group k with k + 1.
        store_grad(grad_ptr + plane, g, source, h, w, UP, BLOCK)


class _ClassCEFunction(torch.autograd.Function):
    """Fused forward/backward; saves the inputs and ``(B,)`` counts, never a high-res tensor."""

    @staticmethod
    def forward(ctx, logits, labels, valid_i32, ignore_index, factor, block):
        b, c, h, w = logits.shape
        ctx.ignore_index, ctx.factor, ctx.block = ignore_index, factor, block
        block, warps = _launch_config(FWD_CONFIG[factor], block)
        n_tiles, n_tiles_w = tile_grid(h, w, block, factor, backward=False)
        partial = torch.empty((b, n_tiles, 2), device=logits.device, dtype=torch.float32)
        if b > 0:
            _class_ce_fwd[(b, n_tiles)](
                logits,
                labels,
                valid_i32,
                partial,
                c,
                h,
                w,
                n_tiles_w,
                ignore_index,
                UP=factor,
                BLOCK=block,
                num_warps=warps,
            )
        sums = partial.sum(1)
        count = sums[:, 1]
        inv_count = torch.where(count > 0, 1.0 / count.clamp(min=1.0), torch.zeros_like(count))
        ctx.save_for_backward(logits, labels, valid_i32, inv_count)
        return sums[:, 0] * inv_count

    @staticmethod
    def backward(ctx, g_out):
        logits, labels, valid_i32, inv_count = ctx.saved_tensors
        b, c, h, w = logits.shape
        block, warps = _launch_config(BWD_CONFIG[ctx.factor], ctx.block)
        grad = torch.empty_like(logits)
        coef = (g_out * inv_count).to(torch.float32).contiguous()
        n_tiles, n_tiles_w = tile_grid(h, w, block, ctx.factor, backward=True)
        if b > 0:
            _class_ce_bwd[(b, n_tiles)](
                logits,
                labels,
                valid_i32,
                coef,
                grad,
                c,
                h,
                w,
                n_tiles_w,
                ctx.ignore_index,
                UP=ctx.factor,
                BLOCK=block,
                num_warps=warps,
            )
        return grad, None, None, None, None, None


def triton_class_ce(logits, labels, valid_hw, ignore_index, factor, block) -> torch.Tensor:
    """``kernels.class_ce`` on the Triton kernels, for checked inputs and their upsample ``factor``."""
    require_launchable(logits, labels)  # valid_hw is small and moved to the logits' device below
    check_triton_args(logits, block)
    valid_i32 = valid_hw.to(device=logits.device, dtype=torch.int32).contiguous()
    return _ClassCEFunction.apply(
        logits.contiguous(), labels.contiguous(), valid_i32, int(ignore_index), factor, block
    )
