"""Fused 4x bilinear upsample + per-mask losses (focal, BCE, dice, MSE, hard IoU), forward and backward.

The Triton side of ``kernels.mask_losses``, which dispatches here and is the only importer (triton is an
optional dependency). ``kernels.reference.mask_losses_reference`` defines the op; this file computes the same
numbers from the ``(P, h, w)`` low-resolution logits without ever materialising the ``(P, 4h, 4w)`` upsampled
logits or their gradient. See ``docs/kernels.md`` for the derivation. With ``(P, h, w)`` targets (upsample
factor 1) the same kernels skip the upsample: each program reads a plain block of logits and targets, and the
backward writes the per-pixel gradient as it is (``kernels/_tile.py``).

Layout of the work. A 4x ``align_corners=False`` upsample maps high-res row ``y = 4k - 2 + r`` (``r`` in 0..3)
between low-res rows ``k - 1`` and ``k`` with the fixed weights ``(7 - 2r) / 8`` and ``(2r + 1) / 8`` (indices
clamped to ``[0, h - 1]``, which reproduces PyTorch's edge handling exactly). Call the 4 high-res rows that
share ``k`` a row *group*; groups ``k = 0..h`` cover every high-res row once (rows -2, -1, 4h and 4h + 1 fall
outside and are masked). The kernels work on blocks of ``BLOCK x BLOCK`` groups, i.e. ``4 BLOCK x 4 BLOCK``
high-res pixels held as a 4-D ``(BLOCK, 4, BLOCK, 4)`` tile, so the four low-res corners of each group are
loaded once per group, not once per pixel.

- Forward: one program per (mask, block of groups). It interpolates the tile, computes every loss term per
  pixel in float32, and writes 8 partial sums per program to a ``(P, tiles, 8)`` buffer; a torch ``sum`` over
  tiles finishes the reduction (deterministic, no atomics).
- Backward: the adjoint of the upsample sends low-res pixel ``i`` the high-res rows ``4i - 2 .. 4i + 5`` with
  weights ``1, 3, 5, 7, 7, 5, 3, 1`` / 8, i.e. the "down" half of group ``i`` plus the "up" half of group
  ``i + 1``. One program per (mask, block of groups) recomputes the per-pixel gradient of the tile, reduces
  each group to its up/down halves (per axis), and combines group ``i`` with group ``i + 1`` by a register
  gather. The last group of a block only feeds the next block, so blocks overlap by one group (``BLOCK``
  groups produce ``BLOCK - 1`` low-res rows/cols). Every low-res gradient is written by exactly one program:
  no atomics, no full-resolution buffer.

Targets are read as one byte per pixel (bool is viewed as uint8, no copy); they are not bit-packed. With
``SOFT`` the byte is a foreground share in 255ths and the per-pixel terms take the general (soft-target)
formulas; the hard path is unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import check_triton_args, require_launchable
from kernels._tile import load_logits, store_grad, tile, tile_grid, valid_size
from kernels.reference import MaskLosses

__all__ = ["triton_mask_losses"]

# Order of the per-program partial sums in the forward buffer.
_S_FOCAL, _S_CE, _S_MSE, _S_P, _S_T, _S_PT, _S_INTER, _S_UNION = range(8)
_N_SUMS = 8

# (BLOCK, num_warps) per kernel and upsample factor. Not timed on a GPU (none was available); chosen from
# `ptxas -v` for sm_90 on the compiled kernels (fp32 logits). Factor 4: forward BLOCK=16 at 4 warps spills
# (255 registers, 52 B spill stores), BLOCK=16 at 8 warps needs 150 registers, BLOCK=8 at 4 warps 60 and no
# spills. The forward has no overlap between blocks, so the smaller block costs only a larger partial-sum
# buffer (35 KiB per 256x256 mask). The backward recomputes one group in BLOCK of each side, so it keeps
# BLOCK=16 (14% recompute, vs 31% at 8): 116 registers at 8 warps, no spills. Factor 1 has no overlap and no
# stencil: 32x32-pixel tiles (BLOCK=8) at 8 warps need 32 (forward) and 40 (backward) registers, where the
# backward at BLOCK=16 would need 133. `block=` on the public function overrides both, for tests and sweeps.
FWD_CONFIG = {4: (8, 4), 1: (8, 8)}
BWD_CONFIG = {4: (16, 8), 1: (8, 8)}


def _launch_config(config: tuple[int, int], block: int | None) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: the kernel's tuned ``config``, or the ``block=`` override with its warps."""
    return config if block is None else (block, 8 if block >= 16 else 4)


def _valid_count(valid_i32: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(P,)`` float32 number of valid target pixels per mask (``(vh, vw)`` clamped to the frame)."""
    vh = valid_i32[:, 0].clamp(0, height)
    vw = valid_i32[:, 1].clamp(0, width)
    return (vh * vw).to(torch.float32)


@triton.jit
def _load_targets(targets_ptr, pid_p, y, x, inside, h, w, UP: tl.constexpr, SOFT: tl.constexpr):
    """Foreground flags and the float32 target of the tile's pixels, from one byte per pixel (``SOFT``: a
    share in 255ths, foreground from 128)."""
    H = UP * h
    W = UP * w
    t_raw = tl.load(targets_ptr + pid_p.to(tl.int64) * H * W + y * W + x, mask=inside, other=0)
    if SOFT:
        return t_raw >= 128, t_raw.to(tl.float32) * (1.0 / 255.0)
    is_fg = t_raw != 0
    return is_fg, is_fg.to(tl.float32)


@triton.jit
def _pixel_terms(up, is_fg, t, alpha_pos, alpha_neg, GAMMA: tl.constexpr, SOFT: tl.constexpr):
    """Per-pixel pieces of the losses, in float32, shared by the forward and the backward.

    Returns ``(e, inv, p, z, q, ce, q_gamma, a_t)``: ``e = exp(-|up|)``, ``inv = 1 / (1 + e)``,
    ``p = sigmoid(up)``, ``z`` the logit of the true class (hard targets), ``q = 1 - p_t``, ``ce`` the BCE
    with logits, ``q ** GAMMA`` and the focal class weight. With ``SOFT`` targets ``t``: ``p_t = p t +
    (1 - p)(1 - t)``, ``ce = max(up, 0) - t up + log(1 + e)`` and ``a_t`` interpolated by ``t``.
    """
    # Stable sigmoid pieces from one exp: e = exp(-|x|) in (0, 1].
    e = tl.exp(-tl.abs(up))
    inv = 1.0 / (1.0 + e)
    p = tl.where(up >= 0, inv, e * inv)  # sigmoid(up)
    z = tl.where(is_fg, up, -up)  # logit of the true class
    # log1p(e) to full precision (Kahan's trick; Triton has no portable log1p).
    one_e = 1.0 + e
    log1p_e = tl.where(one_e == 1.0, e, tl.log(one_e) * e / tl.where(one_e == 1.0, 1.0, one_e - 1.0))
    if SOFT:
        q = t * tl.where(up >= 0, e * inv, inv) + (1.0 - t) * p  # t (1 - p) + (1 - t) p, no cancellation
        ce = tl.maximum(up, 0.0) - t * up + log1p_e
    else:
        q = tl.where(z >= 0, e * inv, inv)  # 1 - p_t = sigmoid(-z), without the cancellation of 1 - p
        ce = tl.maximum(-z, 0.0) + log1p_e  # BCE with logits = softplus(-z)
    if GAMMA == 2.0:
        q_gamma = q * q
    elif GAMMA == 0.0:
        q_gamma = tl.full(q.shape, 1.0, tl.float32)
    else:
        q_gamma = tl.where(q > 0, tl.exp2(GAMMA * tl.log2(tl.maximum(q, 1e-38))), 0.0)
    if SOFT:  # noqa: SIM108 (a constexpr branch: the hard path is compiled without it)
        a_t = alpha_pos * t + alpha_neg * (1.0 - t)
    else:
        a_t = tl.where(is_fg, alpha_pos, alpha_neg)
    return e, inv, p, z, q, ce, q_gamma, a_t


@triton.jit
def _mask_losses_fwd(
    logits_ptr,  # (P, h, w) float32 / bfloat16
    targets_ptr,  # (P, 4h, 4w) uint8
    valid_ptr,  # (P, 2) int32
    partial_ptr,  # (P, n_tiles, 8) float32 out
    h,
    w,
    n_tiles_w,
    alpha_pos,
    alpha_neg,
    GAMMA: tl.constexpr,
    UP: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFT: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    vh, vw = valid_size(valid_ptr, pid_p, h, w, UP)
    # This tile's target pixels and the logits there, upsampled at UP = 4 (kernels/_tile.py).
    y, x, inside, source = tile(pid_t, n_tiles_w, vh, vw, h, w, UP, BLOCK, False)
    up = load_logits(logits_ptr + pid_p.to(tl.int64) * h * w, source, UP)
    is_fg, t = _load_targets(targets_ptr, pid_p, y, x, inside, h, w, UP, SOFT)
    _e, _inv, p, _z, _q, ce, q_gamma, a_t = _pixel_terms(up, is_fg, t, alpha_pos, alpha_neg, GAMMA, SOFT)
    focal = a_t * q_gamma * ce
    d = p - t
    pred = up > 0

    zero = tl.full(up.shape, 0.0, tl.float32)
    out = partial_ptr + (pid_p.to(tl.int64) * n_tiles + pid_t) * 8
    tl.store(out + 0, tl.sum(tl.where(inside, focal, zero)))
    tl.store(out + 1, tl.sum(tl.where(inside, ce, zero)))
    tl.store(out + 2, tl.sum(tl.where(inside, d * d, zero)))
    tl.store(out + 3, tl.sum(tl.where(inside, p, zero)))
    tl.store(out + 4, tl.sum(tl.where(inside, t, zero)))
    tl.store(out + 5, tl.sum(tl.where(inside, p * t, zero)))
    tl.store(out + 6, tl.sum(tl.where(inside & pred & is_fg, 1.0, zero)))
    tl.store(out + 7, tl.sum(tl.where(inside & (pred | is_fg), 1.0, zero)))


@triton.jit
def _mask_losses_bwd(
    logits_ptr,  # (P, h, w) float32 / bfloat16
    targets_ptr,  # (P, 4h, 4w) uint8
    valid_ptr,  # (P, 2) int32
    coef_ptr,  # (P, 5) float32: focal, bce, mse, dice*t, dice*1 coefficients
    grad_ptr,  # (P, h, w) out, logits' dtype
    h,
    w,
    n_tiles_w,
    alpha_pos,
    alpha_neg,
    GAMMA: tl.constexpr,
    UP: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFT: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_t = tl.program_id(1)
    vh, vw = valid_size(valid_ptr, pid_p, h, w, UP)
    c_focal = tl.load(coef_ptr + 5 * pid_p + 0)
    c_bce = tl.load(coef_ptr + 5 * pid_p + 1)
    c_mse = tl.load(coef_ptr + 5 * pid_p + 2)
    c_dice_t = tl.load(coef_ptr + 5 * pid_p + 3)
    c_dice_1 = tl.load(coef_ptr + 5 * pid_p + 4)

    # At UP = 4, blocks step by BLOCK - 1 groups: the last group of a block only completes the next block's
    # first row. The logits and the per-pixel terms are recomputed exactly as the forward computes them.
    y, x, inside, source = tile(pid_t, n_tiles_w, vh, vw, h, w, UP, BLOCK, True)
    up = load_logits(logits_ptr + pid_p.to(tl.int64) * h * w, source, UP)
    is_fg, t = _load_targets(targets_ptr, pid_p, y, x, inside, h, w, UP, SOFT)
    e, inv, p, z, q, ce, q_gamma, a_t = _pixel_terms(up, is_fg, t, alpha_pos, alpha_neg, GAMMA, SOFT)
    d = p - t  # d bce / dx
    dp = e * inv * inv  # sigmoid'(x) = p (1 - p)
    if SOFT:
        # d focal / dx = a_t (gamma q^(gamma - 1) (dq/dx) ce + q^gamma (p - t)), dq/dx = (1 - 2 t) p (1 - p)
        if GAMMA == 2.0:
            q_gm1 = q
        elif GAMMA == 0.0:
            q_gm1 = tl.full(q.shape, 0.0, tl.float32)  # multiplied by GAMMA = 0
        else:
            q_gm1 = tl.where(q > 0, tl.exp2((GAMMA - 1.0) * tl.log2(tl.maximum(q, 1e-38))), 0.0)
        d_focal = a_t * (GAMMA * q_gm1 * (1.0 - 2.0 * t) * dp * ce + q_gamma * d)
    else:
        p_t = tl.where(z >= 0, inv, e * inv)
        # d focal / dz = -a_t q^gamma (gamma p_t ce + q), and dz/dx = +1 for foreground, -1 for background.
        d_focal_dz = -a_t * q_gamma * (GAMMA * p_t * ce + q)
        d_focal = tl.where(is_fg, d_focal_dz, -d_focal_dz)
    g = c_focal * d_focal + c_bce * d + (2.0 * c_mse * d + c_dice_t * t + c_dice_1) * dp
    g = tl.where(inside, g, 0.0)

    # At UP = 4 the adjoint of the upsample, gathered per block in registers (kernels/_tile.py).
    store_grad(grad_ptr + pid_p.to(tl.int64) * h * w, g, source, h, w, UP, BLOCK)


def _alpha_weights(alpha: float) -> tuple[float, float]:
    # torchvision: alpha < 0 disables the class weighting.
    return (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)


def _launch_fwd(logits, targets_u8, valid_i32, alpha, gamma, factor, block, soft):
    """``(P, h, w)`` logits -> ``(P, 8)`` float32 per-mask sums (see ``_S_*``)."""
    p_count, h, w = logits.shape
    block, warps = _launch_config(FWD_CONFIG[factor], block)
    n_tiles, n_tiles_w = tile_grid(h, w, block, factor, backward=False)
    partial = torch.empty((p_count, n_tiles, _N_SUMS), device=logits.device, dtype=torch.float32)
    if p_count == 0:
        return partial.sum(1)
    a_pos, a_neg = _alpha_weights(alpha)
    _mask_losses_fwd[(p_count, n_tiles)](
        logits,
        targets_u8,
        valid_i32,
        partial,
        h,
        w,
        n_tiles_w,
        a_pos,
        a_neg,
        GAMMA=float(gamma),
        UP=factor,
        BLOCK=block,
        SOFT=soft,
        num_warps=warps,
    )
    return partial.sum(1)


def _launch_bwd(logits, targets_u8, valid_i32, coef, alpha, gamma, factor, block, soft):
    """Per-mask loss coefficients ``(P, 5)`` -> ``(P, h, w)`` gradient in the logits' dtype."""
    p_count, h, w = logits.shape
    grad = torch.empty_like(logits)
    if p_count == 0:
        return grad
    block, warps = _launch_config(BWD_CONFIG[factor], block)
    n_tiles, n_tiles_w = tile_grid(h, w, block, factor, backward=True)
    a_pos, a_neg = _alpha_weights(alpha)
    _mask_losses_bwd[(p_count, n_tiles)](
        logits,
        targets_u8,
        valid_i32,
        coef,
        grad,
        h,
        w,
        n_tiles_w,
        a_pos,
        a_neg,
        GAMMA=float(gamma),
        UP=factor,
        BLOCK=block,
        SOFT=soft,
        num_warps=warps,
    )
    return grad


class _MaskLossesFunction(torch.autograd.Function):
    """Fused forward/backward; saves only the inputs and ``(P, 8)`` sums, never a high-res tensor."""

    @staticmethod
    def forward(ctx, logits, targets_u8, valid_i32, alpha, gamma, factor, block, soft):
        sums = _launch_fwd(logits, targets_u8, valid_i32, alpha, gamma, factor, block, soft)
        n = _valid_count(valid_i32, *targets_u8.shape[1:])
        inv_n = torch.where(n > 0, 1.0 / n.clamp(min=1.0), torch.zeros_like(n))
        focal = sums[:, _S_FOCAL] * inv_n
        bce = sums[:, _S_CE] * inv_n
        mse = sums[:, _S_MSE] * inv_n
        denom = sums[:, _S_P] + sums[:, _S_T] + 1.0
        dice = 1.0 - (2.0 * sums[:, _S_PT] + 1.0) / denom
        union = sums[:, _S_UNION]
        iou = torch.where(union > 0, sums[:, _S_INTER] / union.clamp(min=1.0), torch.ones_like(union))
        ctx.save_for_backward(logits, targets_u8, valid_i32, sums, inv_n)
        ctx.alpha, ctx.gamma, ctx.factor, ctx.block, ctx.soft = alpha, gamma, factor, block, soft
        ctx.mark_non_differentiable(iou)
        return focal, bce, dice, mse, iou

    @staticmethod
    def backward(ctx, g_focal, g_bce, g_dice, g_mse, _g_iou):
        logits, targets_u8, valid_i32, sums, inv_n = ctx.saved_tensors
        # dice = 1 - (2I + 1) / (S + 1) with I = sum p t, S = sum p + sum t, so
        # d dice / d p_i = -2 t_i / (S + 1) + (2I + 1) / (S + 1)^2.
        denom = sums[:, _S_P] + sums[:, _S_T] + 1.0
        dice_t = -2.0 / denom
        dice_1 = (2.0 * sums[:, _S_PT] + 1.0) / (denom * denom)
        coef = torch.stack(
            [g_focal * inv_n, g_bce * inv_n, g_mse * inv_n, g_dice * dice_t, g_dice * dice_1], dim=1
        ).to(torch.float32)
        grad = _launch_bwd(
            logits,
            targets_u8,
            valid_i32,
            coef.contiguous(),
            ctx.alpha,
            ctx.gamma,
            ctx.factor,
            ctx.block,
            ctx.soft,
        )
        return grad, None, None, None, None, None, None, None


def triton_mask_losses(logits, targets, valid_hw, alpha, gamma, factor, block, soft=False) -> MaskLosses:
    """``kernels.mask_losses`` on the Triton kernels, for checked inputs and their upsample ``factor``."""
    require_launchable(logits, targets)  # valid_hw is small and moved to the logits' device below
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    check_triton_args(logits, block)
    targets_u8 = targets.contiguous()
    if targets_u8.dtype == torch.bool:
        targets_u8 = targets_u8.view(torch.uint8)  # same bytes, no copy
    valid_i32 = valid_hw.to(device=logits.device, dtype=torch.int32).contiguous()
    out = _MaskLossesFunction.apply(
        logits.contiguous(), targets_u8, valid_i32, float(alpha), float(gamma), factor, block, bool(soft)
    )
    return MaskLosses(*out)
