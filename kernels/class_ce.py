"""Fused 4x bilinear upsample + per-image mean cross-entropy over C class logits, forward and backward.

``kernels.reference.class_ce_reference`` defines the op. The tiling, the group layout of the 4x upsample and
the gather-based adjoint are the ones of ``kernels/mask_losses.py`` (read its module docstring first); here
each
program also loops over the C classes:

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

from kernels._lazy import LazyKernel, require_launchable
from kernels.reference import class_ce_reference

__all__ = ["class_ce"]

# (BLOCK, num_warps) per kernel; not timed on a GPU. From `ptxas -v` for sm_90: the forward's class loop keeps
# more live than mask_losses (BLOCK=8: 175 registers at 4 warps, 78 at 8); the backward at BLOCK=16, 8 warps
# uses 122 registers. No spills in either. `block=` overrides both.
FWD_CONFIG = (8, 8)
BWD_CONFIG = (16, 8)


def _warps_for(block: int) -> int:
    return 8 if block >= 8 else 4


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
    H = 4 * h
    W = 4 * w
    vh = tl.minimum(tl.maximum(tl.load(valid_ptr + 2 * pid_b), 0), H)
    vw = tl.minimum(tl.maximum(tl.load(valid_ptr + 2 * pid_b + 1), 0), W)

    kr = (pid_t // n_tiles_w) * BLOCK + tl.arange(0, BLOCK)
    kc = (pid_t % n_tiles_w) * BLOCK + tl.arange(0, BLOCK)
    r = tl.arange(0, 4)
    kr4 = kr[:, None, None, None]
    kc4 = kc[None, None, :, None]
    ry = r[None, :, None, None]
    rx = r[None, None, None, :]
    y = 4 * kr4 - 2 + ry
    x = 4 * kc4 - 2 + rx
    inside = (y >= 0) & (y < vh) & (x >= 0) & (x < vw)
    label = tl.load(labels_ptr + pid_b.to(tl.int64) * H * W + y * W + x, mask=inside, other=ignore_index)
    counted = inside & (label != ignore_index) & (label >= 0) & (label < C)

    r_lo = tl.minimum(tl.maximum(kr4 - 1, 0), h - 1)
    r_hi = tl.minimum(kr4, h - 1)
    c_lo = tl.minimum(tl.maximum(kc4 - 1, 0), w - 1)
    c_hi = tl.minimum(kc4, w - 1)
    group_ok = (4 * kr4 - 2 < vh) & (4 * kc4 - 2 < vw)
    wy_hi = (2 * ry + 1).to(tl.float32) * 0.125
    wy_lo = 1.0 - wy_hi
    wx_hi = (2 * rx + 1).to(tl.float32) * 0.125
    wx_lo = 1.0 - wx_hi

    run_max = tl.full(inside.shape, float("-inf"), tl.float32)
    run_sum = tl.full(inside.shape, 0.0, tl.float32)
    picked = tl.full(inside.shape, 0.0, tl.float32)
    for c in range(0, C):
        base = logits_ptr + (pid_b.to(tl.int64) * C + c) * h * w
        l00 = tl.load(base + r_lo * w + c_lo, mask=group_ok, other=0.0).to(tl.float32)
        l01 = tl.load(base + r_lo * w + c_hi, mask=group_ok, other=0.0).to(tl.float32)
        l10 = tl.load(base + r_hi * w + c_lo, mask=group_ok, other=0.0).to(tl.float32)
        l11 = tl.load(base + r_hi * w + c_hi, mask=group_ok, other=0.0).to(tl.float32)
        up = wy_lo * (wx_lo * l00 + wx_hi * l01) + wy_hi * (wx_lo * l10 + wx_hi * l11)
        new_max = tl.maximum(run_max, up)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(up - new_max)
        run_max = new_max
        picked = tl.where(label == c, up, picked)
    ce = run_max + tl.log(run_sum) - picked
    zero = tl.full(inside.shape, 0.0, tl.float32)
    out = partial_ptr + (pid_b.to(tl.int64) * n_tiles + pid_t) * 2
    # tl.reduce with Triton's sum combiner, not tl.sum: see the comment in mask_losses.py.
    tl.store(out + 0, tl.reduce(tl.where(counted, ce, zero), None, tl.standard._sum_combine))
    tl.store(out + 1, tl.reduce(tl.where(counted, 1.0, zero), None, tl.standard._sum_combine))


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
    H = 4 * h
    W = 4 * w
    vh = tl.minimum(tl.maximum(tl.load(valid_ptr + 2 * pid_b), 0), H)
    vw = tl.minimum(tl.maximum(tl.load(valid_ptr + 2 * pid_b + 1), 0), W)
    coef = tl.load(coef_ptr + pid_b)

    # Overlapping blocks, as in mask_losses: BLOCK groups produce BLOCK - 1 low-res rows/cols.
    kr = (pid_t // n_tiles_w) * (BLOCK - 1) + tl.arange(0, BLOCK)
    kc = (pid_t % n_tiles_w) * (BLOCK - 1) + tl.arange(0, BLOCK)
    r = tl.arange(0, 4)
    kr4 = kr[:, None, None, None]
    kc4 = kc[None, None, :, None]
    ry = r[None, :, None, None]
    rx = r[None, None, None, :]
    y = 4 * kr4 - 2 + ry
    x = 4 * kc4 - 2 + rx
    inside = (y >= 0) & (y < vh) & (x >= 0) & (x < vw)
    label = tl.load(labels_ptr + pid_b.to(tl.int64) * H * W + y * W + x, mask=inside, other=ignore_index)
    counted = inside & (label != ignore_index) & (label >= 0) & (label < C)

    r_lo = tl.minimum(tl.maximum(kr4 - 1, 0), h - 1)
    r_hi = tl.minimum(kr4, h - 1)
    c_lo = tl.minimum(tl.maximum(kc4 - 1, 0), w - 1)
    c_hi = tl.minimum(kc4, w - 1)
    group_ok = (4 * kr4 - 2 < vh) & (4 * kc4 - 2 < vw)
    wy_hi = (2 * ry + 1).to(tl.float32) * 0.125
    wy_lo = 1.0 - wy_hi
    wx_hi = (2 * rx + 1).to(tl.float32) * 0.125
    wx_lo = 1.0 - wx_hi

    run_max = tl.full(inside.shape, float("-inf"), tl.float32)
    run_sum = tl.full(inside.shape, 0.0, tl.float32)
    for c in range(0, C):
        base = logits_ptr + (pid_b.to(tl.int64) * C + c) * h * w
        l00 = tl.load(base + r_lo * w + c_lo, mask=group_ok, other=0.0).to(tl.float32)
        l01 = tl.load(base + r_lo * w + c_hi, mask=group_ok, other=0.0).to(tl.float32)
        l10 = tl.load(base + r_hi * w + c_lo, mask=group_ok, other=0.0).to(tl.float32)
        l11 = tl.load(base + r_hi * w + c_hi, mask=group_ok, other=0.0).to(tl.float32)
        up = wy_lo * (wx_lo * l00 + wx_hi * l01) + wy_hi * (wx_lo * l10 + wx_hi * l11)
        new_max = tl.maximum(run_max, up)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(up - new_max)
        run_max = new_max
    lse = run_max + tl.log(run_sum)

    a = tl.arange(0, BLOCK)
    w_hi_1 = (2 * r + 1).to(tl.float32) * 0.125
    w_lo_1 = 1.0 - w_hi_1
    j3 = kc[None, None, :]
    nxt3 = tl.minimum(a + 1, BLOCK - 1)[None, None, :] + tl.full((BLOCK, 4, BLOCK), 0, tl.int32)
    i2 = kr[:, None]
    j2 = kc[None, :]
    nxt2 = tl.minimum(a + 1, BLOCK - 1)[:, None] + tl.full((BLOCK, BLOCK), 0, tl.int32)
    keep = (a[:, None] < BLOCK - 1) & (a[None, :] < BLOCK - 1) & (i2 < h) & (j2 < w)
    for c in range(0, C):
        base = logits_ptr + (pid_b.to(tl.int64) * C + c) * h * w
        l00 = tl.load(base + r_lo * w + c_lo, mask=group_ok, other=0.0).to(tl.float32)
        l01 = tl.load(base + r_lo * w + c_hi, mask=group_ok, other=0.0).to(tl.float32)
        l10 = tl.load(base + r_hi * w + c_lo, mask=group_ok, other=0.0).to(tl.float32)
        l11 = tl.load(base + r_hi * w + c_hi, mask=group_ok, other=0.0).to(tl.float32)
        up = wy_lo * (wx_lo * l00 + wx_hi * l01) + wy_hi * (wx_lo * l10 + wx_hi * l11)
        g = coef * (tl.exp(up - lse) - (label == c).to(tl.float32))
        g = tl.where(counted, g, 0.0)
        # Adjoint of the upsample (see mask_losses.py): columns, then rows, each combining group k with k + 1.
        col_lo = tl.reduce(g * w_lo_1[None, None, None, :], 3, tl.standard._sum_combine)
        col_hi = tl.reduce(g * w_hi_1[None, None, None, :], 3, tl.standard._sum_combine)
        col_lo_next = tl.gather(col_lo, nxt3, 2)
        col_hi_next = tl.gather(col_hi, nxt3, 2)
        cols = col_hi + col_lo_next + tl.where(j3 == 0, col_lo, 0.0) + tl.where(j3 == w - 1, col_hi_next, 0.0)
        row_lo = tl.reduce(cols * w_lo_1[None, :, None], 1, tl.standard._sum_combine)
        row_hi = tl.reduce(cols * w_hi_1[None, :, None], 1, tl.standard._sum_combine)
        row_lo_next = tl.gather(row_lo, nxt2, 0)
        row_hi_next = tl.gather(row_hi, nxt2, 0)
        grad = row_hi + row_lo_next + tl.where(i2 == 0, row_lo, 0.0) + tl.where(i2 == h - 1, row_hi_next, 0.0)
        out = grad_ptr + (pid_b.to(tl.int64) * C + c) * h * w + i2 * w + j2
        tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=keep)


_fwd_kernel = LazyKernel(_class_ce_fwd)
_bwd_kernel = LazyKernel(_class_ce_bwd)


def _valid_count(valid_i32: torch.Tensor, h: int, w: int) -> torch.Tensor:
    vh = valid_i32[:, 0].clamp(0, 4 * h)
    vw = valid_i32[:, 1].clamp(0, 4 * w)
    return (vh * vw).to(torch.float32)


class _ClassCEFunction(torch.autograd.Function):
    """Fused forward/backward; saves the inputs and ``(B,)`` counts, never a high-res tensor."""

    @staticmethod
    def forward(ctx, logits, labels, valid_i32, ignore_index, block):
        b, c, h, w = logits.shape
        ctx.ignore_index, ctx.block = ignore_index, block
        block, warps = FWD_CONFIG if block is None else (block, _warps_for(block))
        n_tiles_w = triton.cdiv(w + 1, block)
        n_tiles = triton.cdiv(h + 1, block) * n_tiles_w
        partial = torch.empty((b, n_tiles, 2), device=logits.device, dtype=torch.float32)
        if b > 0:
            _fwd_kernel[(b, n_tiles)](
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
        block, warps = BWD_CONFIG if ctx.block is None else (ctx.block, _warps_for(ctx.block))
        grad = torch.empty_like(logits)
        coef = (g_out * inv_count).to(torch.float32).contiguous()
        n_tiles_w = triton.cdiv(w, block - 1)
        n_tiles = triton.cdiv(h, block - 1) * n_tiles_w
        if b > 0:
            _bwd_kernel[(b, n_tiles)](
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
    if backend == "auto":
        backend = "triton" if logits.is_cuda else "torch"
    if backend == "torch":
        return class_ce_reference(logits, labels, valid_hw, ignore_index)
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    require_launchable(logits, labels)  # valid_hw is small and moved to the logits' device below
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, h, w), got {tuple(logits.shape)}")
    b, c, h, w = logits.shape
    if labels.shape != (b, 4 * h, 4 * w) or labels.is_floating_point():
        want = (b, 4 * h, 4 * w)
        raise ValueError(f"labels must be integer {want}, got {labels.dtype} {tuple(labels.shape)}")
    if valid_hw.shape != (b, 2):
        raise ValueError(f"valid_hw must be {(b, 2)}, got {tuple(valid_hw.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton backend takes float32/bfloat16/float16 logits, got {logits.dtype}")
    if block is not None and (block < 2 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 2, got {block}")
    valid_i32 = valid_hw.to(device=logits.device, dtype=torch.int32).contiguous()
    return _ClassCEFunction.apply(
        logits.contiguous(), labels.contiguous(), valid_i32, int(ignore_index), block
    )
