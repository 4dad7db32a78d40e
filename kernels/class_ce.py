"""Fused 4x bilinear upsample + per-image mean cross-entropy over C class logits, forward and backward.

``kernels.reference.class_ce_reference`` defines the op. The tiling, the group layout of the 4x upsample and
the gather-based adjoint are the ones of ``kernels/mask_losses.py`` (read its module docstring first), and the
device code for them is shared (``kernels/_tile.py``); here each program also loops over the C classes:

- Forward: one program per (image, block of groups). A loop over classes keeps an online log-sum-exp per
  high-res pixel and picks the labelled class's logit; the program writes ``(sum of CE, count)`` for its tile.
- Backward: one program per (image, overlapping block of groups). A first class loop recomputes the
  log-sum-exp, a second one forms ``softmax_c - [label == c]`` per pixel for class ``c``, takes the adjoint of
  the upsample on the tile and writes the low-res gradient of class ``c``. No atomics, nothing at full
  resolution is stored; the price is ``2 C`` interpolations per pixel in the backward.

Labels are read in their own integer dtype (no copy). Labels outside ``[0, C)`` that are not ``ignore_index``
count as ignored here (the torch reference raises on them instead: a kernel cannot raise without a sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import check_triton_args, require_launchable, resolve_backend
from kernels._tile import group_block, store_adjoint, tile_grid, tile_layout, upsample_tile, valid_size
from kernels.reference import class_ce_reference

__all__ = ["class_ce"]

# (BLOCK, num_warps) per kernel; not timed on a GPU. From `ptxas -v` for sm_90: the forward's class loop keeps
# more live than mask_losses (BLOCK=8: 175 registers at 4 warps, 78 at 8); the backward at BLOCK=16, 8 warps
# uses 122 registers. No spills in either. `block=` overrides both.
FWD_CONFIG = (8, 8)
BWD_CONFIG = (16, 8)


def _launch_config(config: tuple[int, int], block: int | None) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: the kernel's tuned ``config``, or the ``block=`` override with its warps."""
    return config if block is None else (block, 8 if block >= 8 else 4)


@triton.jit
def _load_labels(labels_ptr, pid_b, y, x, inside, C, h, w, ignore_index):
    """The tile's labels (``ignore_index`` outside the valid region) and which pixels count: valid, not
    ignored, and in ``[0, C)``."""
    H = 4 * h
    W = 4 * w
    label = tl.load(labels_ptr + pid_b.to(tl.int64) * H * W + y * W + x, mask=inside, other=ignore_index)
    counted = inside & (label != ignore_index) & (label >= 0) & (label < C)
    return label, counted


@triton.jit
def _log_sum_exp(logits_ptr, pid_b, C, h, w, stencil, label):
    """Online log-sum-exp over the C upsampled class logits of every pixel of the tile, and the labelled
    class's logit (0 where the label is not a class)."""
    run_max = tl.full(label.shape, float("-inf"), tl.float32)
    run_sum = tl.full(label.shape, 0.0, tl.float32)
    picked = tl.full(label.shape, 0.0, tl.float32)
    for c in range(0, C):
        up = upsample_tile(logits_ptr + (pid_b.to(tl.int64) * C + c) * h * w, stencil)
        new_max = tl.maximum(run_max, up)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(up - new_max)
        run_max = new_max
        picked = tl.where(label == c, up, picked)
    return run_max + tl.log(run_sum), picked


@triton.jit
def _class_ce_fwd(
    logits_ptr,  # (B, C, h, w) float32 / bfloat16
    labels_ptr,  # (B, 4h, 4w) integer
    valid_ptr,  # (B, 2) int32
    partial_ptr,  # (B, n_tiles, 2) float32 out: sum of CE, number of counted pixels
    C,
    h,
    w,
    n_tiles_w,
    ignore_index,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    vh, vw = valid_size(valid_ptr, pid_b, h, w)
    kr, kc = group_block(pid_t, n_tiles_w, BLOCK, BLOCK)
    y, x, inside, stencil = tile_layout(kr, kc, vh, vw, h, w)
    label, counted = _load_labels(labels_ptr, pid_b, y, x, inside, C, h, w, ignore_index)
    lse, picked = _log_sum_exp(logits_ptr, pid_b, C, h, w, stencil, label)
    ce = lse - picked
    zero = tl.full(inside.shape, 0.0, tl.float32)
    out = partial_ptr + (pid_b.to(tl.int64) * n_tiles + pid_t) * 2
    tl.store(out + 0, tl.sum(tl.where(counted, ce, zero)))
    tl.store(out + 1, tl.sum(tl.where(counted, 1.0, zero)))


@triton.jit
def _class_ce_bwd(
    logits_ptr,  # (B, C, h, w) float32 / bfloat16
    labels_ptr,  # (B, 4h, 4w) integer
    valid_ptr,  # (B, 2) int32
    coef_ptr,  # (B,) float32: upstream gradient / counted pixels
    grad_ptr,  # (B, C, h, w) out, logits' dtype
    C,
    h,
    w,
    n_tiles_w,
    ignore_index,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    vh, vw = valid_size(valid_ptr, pid_b, h, w)
    coef = tl.load(coef_ptr + pid_b)

    # Overlapping blocks, as in mask_losses: BLOCK groups produce BLOCK - 1 low-res rows/cols.
    kr, kc = group_block(pid_t, n_tiles_w, BLOCK - 1, BLOCK)
    y, x, inside, stencil = tile_layout(kr, kc, vh, vw, h, w)
    label, counted = _load_labels(labels_ptr, pid_b, y, x, inside, C, h, w, ignore_index)
    lse, _picked = _log_sum_exp(logits_ptr, pid_b, C, h, w, stencil, label)

    for c in range(0, C):
        plane = (pid_b.to(tl.int64) * C + c) * h * w
        up = upsample_tile(logits_ptr + plane, stencil)
        g = coef * (tl.exp(up - lse) - (label == c).to(tl.float32))
        g = tl.where(counted, g, 0.0)
        # Adjoint of the upsample (kernels/_tile.py): columns, then rows, combining group k with k + 1.
        store_adjoint(grad_ptr + plane, g, kr, kc, h, w, BLOCK)


class _ClassCEFunction(torch.autograd.Function):
    """Fused forward/backward; saves the inputs and ``(B,)`` counts, never a high-res tensor."""

    @staticmethod
    def forward(ctx, logits, labels, valid_i32, ignore_index, block):
        b, c, h, w = logits.shape
        ctx.ignore_index, ctx.block = ignore_index, block
        block, warps = _launch_config(FWD_CONFIG, block)
        n_tiles, n_tiles_w = tile_grid(h, w, block, overlap=False)
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
        block, warps = _launch_config(BWD_CONFIG, ctx.block)
        grad = torch.empty_like(logits)
        coef = (g_out * inv_count).to(torch.float32).contiguous()
        n_tiles, n_tiles_w = tile_grid(h, w, block, overlap=True)
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
                BLOCK=block,
                num_warps=warps,
            )
        return grad, None, None, None, None


def class_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid_hw: torch.Tensor,
    ignore_index: int = -100,
    backend: str = "auto",
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Per-image mean cross-entropy of the 4x-upsampled class logits against full-resolution labels.

    Equal to ``kernels.reference.class_ce_reference``: bilinear ``align_corners=False`` upsample to ``(4h,
    4w)``, mean of ``logsumexp_c(up) - up[label]`` over the pixels inside ``[:vh, :vw]`` whose label is not
    ``ignore_index``; 0 (and zero gradient) for an image with no such pixel.

    Args:
        logits: ``(B, C, h, w)`` float32 or bfloat16 low-resolution class logits; computed in float32.
        labels: ``(B, 4h, 4w)`` integer labels in ``[0, C)`` or ``ignore_index``.
        valid_hw: ``(B, 2)`` int ``(vh, vw)`` per image, clamped to ``[0, 4h] x [0, 4w]``.
        ignore_index: label value that counts for nothing.
        backend: ``"auto"`` (CUDA tensors to Triton, others to the reference), ``"triton"`` or ``"torch"``.
        block: groups of 4x4 high-res pixels per program side (power of two >= 2) for both kernels; ``None``
            takes ``FWD_CONFIG`` and ``BWD_CONFIG``.

    Returns:
        ``(B,)`` float32 mean cross-entropy per image.
    """
    if resolve_backend(backend, logits) == "torch":
        return class_ce_reference(logits, labels, valid_hw, ignore_index)
    require_launchable(logits, labels)  # valid_hw is small and moved to the logits' device below
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, h, w), got {tuple(logits.shape)}")
    b, c, h, w = logits.shape
    if labels.shape != (b, 4 * h, 4 * w) or labels.is_floating_point():
        want = (b, 4 * h, 4 * w)
        raise ValueError(f"labels must be integer {want}, got {labels.dtype} {tuple(labels.shape)}")
    if valid_hw.shape != (b, 2):
        raise ValueError(f"valid_hw must be {(b, 2)}, got {tuple(valid_hw.shape)}")
    check_triton_args(logits, block)
    valid_i32 = valid_hw.to(device=logits.device, dtype=torch.int32).contiguous()
    return _ClassCEFunction.apply(
        logits.contiguous(), labels.contiguous(), valid_i32, int(ignore_index), block
    )
