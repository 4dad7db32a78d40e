"""The tiles that ``mask_losses`` and ``class_ce`` share.

The launch grid (host side), and the Triton device functions (inlined into the kernels) that give a program
its target pixels, the logits there and the store of their gradient, for an upsample factor ``UP`` of 4
(SAM: 256 logits, 1024 targets) or 1 (targets at the logits' resolution, e.g. LiteMedSAM's 256 input).

Factor 4: the layout (high-res row ``y = 4k - 2 + r``, groups of 4 rows/cols, ``(BLOCK, 4, BLOCK, 4)``
tiles, the overlapping backward blocks and the gather-based adjoint) is described in
``kernels/mask_losses_triton.py``'s module docstring and in ``docs/kernels.md``. Factor 1: a tile is a plain
``(4 BLOCK, 4 BLOCK)`` block of pixels (the same target area as at factor 4); the logits are loaded as they
are and the gradient is stored as it is: no stencil, no adjoint, no overlap.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load_logits", "store_grad", "tile", "tile_grid", "valid_size"]


def tile_grid(h: int, w: int, block: int, factor: int, *, backward: bool) -> tuple[int, int]:
    """``(tiles, tiles per row)`` of the launch grid for ``(h, w)`` logits.

    Factor 4: forward tiles of ``block`` groups cover groups ``0..h`` x ``0..w``; backward tiles step by
    ``block - 1`` groups over the ``h x w`` low-res pixels they write. Factor 1: tiles of ``4 block`` pixels
    side cover the ``h x w`` pixels, forward and backward alike.
    """
    if factor == 1:
        side = 4 * block
        n_tiles_h, n_tiles_w = triton.cdiv(h, side), triton.cdiv(w, side)
    elif backward:
        n_tiles_h, n_tiles_w = triton.cdiv(h, block - 1), triton.cdiv(w, block - 1)
    else:
        n_tiles_h, n_tiles_w = triton.cdiv(h + 1, block), triton.cdiv(w + 1, block)
    return n_tiles_h * n_tiles_w, n_tiles_w


@triton.jit
def valid_size(valid_ptr, row, h, w, UP: tl.constexpr):
    """``(vh, vw)`` of row ``row`` of the ``(N, 2)`` int32 sizes, clamped to the ``UP h x UP w`` frame."""
    vh = tl.minimum(tl.maximum(tl.load(valid_ptr + 2 * row), 0), UP * h)
    vw = tl.minimum(tl.maximum(tl.load(valid_ptr + 2 * row + 1), 0), UP * w)
    return vh, vw


@triton.jit
def tile(pid_t, n_tiles_w, vh, vw, h, w, UP: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    """The target pixels of tile ``pid_t`` and where their logits come from.

    Returns ``(y, x, inside, source)``: the rows ``y`` and cols ``x`` in the target frame (broadcastable
    pieces of a ``(BLOCK, 4, BLOCK, 4)`` tile at factor 4, a ``(4 BLOCK, 4 BLOCK)`` one at factor 1), which of
    them lie inside ``[:vh, :vw]``, and ``source`` for ``load_logits`` and ``store_grad``. At factor 4 the
    backward tiles (``BACKWARD``) start every ``BLOCK - 1`` groups and overlap by one.
    """
    if UP == 4:
        if BACKWARD:
            kr, kc = group_block(pid_t, n_tiles_w, BLOCK - 1, BLOCK)
        else:
            kr, kc = group_block(pid_t, n_tiles_w, BLOCK, BLOCK)
        y, x, inside, stencil = tile_layout(kr, kc, vh, vw, h, w)
        source = (stencil, kr, kc)
    else:
        y = (pid_t // n_tiles_w) * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)[:, None]
        x = (pid_t % n_tiles_w) * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)[None, :]
        inside = (y < vh) & (x < vw)
        # Offsets into an (h, w) plane, the pixels to read, and the pixels whose gradient to write.
        source = (y * w + x, inside, (y < h) & (x < w))
    return y, x, inside, source


@triton.jit
def load_logits(plane_ptr, source, UP: tl.constexpr):
    """The float32 logits of the tile's pixels from the ``(h, w)`` plane at ``plane_ptr``: upsampled at factor
    4, read as they are at factor 1 (0 outside the valid region)."""
    if UP == 4:
        stencil, _kr, _kc = source
        logits = upsample_tile(plane_ptr, stencil)
    else:
        offsets, inside, _in_plane = source
        logits = tl.load(plane_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    return logits


@triton.jit
def store_grad(plane_ptr, g, source, h, w, UP: tl.constexpr, BLOCK: tl.constexpr):
    """Store the gradient with respect to the ``(h, w)`` plane at ``plane_ptr``, in its dtype, from ``g``, the
    float32 gradient with respect to the tile's pixels (zero outside the valid region): the adjoint of the
    upsample at factor 4, ``g`` itself at factor 1."""
    if UP == 4:
        _stencil, kr, kc = source
        store_adjoint(plane_ptr, g, kr, kc, h, w, BLOCK)
    else:
        offsets, _inside, in_plane = source
        tl.store(plane_ptr + offsets, g.to(plane_ptr.dtype.element_ty), mask=in_plane)


@triton.jit
def group_block(pid_t, n_tiles_w, STEP: tl.constexpr, BLOCK: tl.constexpr):
    """Group rows ``kr`` and cols ``kc``, ``(BLOCK,)`` each, of tile ``pid_t``; tiles start every ``STEP``
    groups (``BLOCK`` forward, ``BLOCK - 1`` for the overlapping backward blocks)."""
    kr = (pid_t // n_tiles_w) * STEP + tl.arange(0, BLOCK)
    kc = (pid_t % n_tiles_w) * STEP + tl.arange(0, BLOCK)
    return kr, kc


@triton.jit
def tile_layout(kr, kc, vh, vw, h, w):
    """The ``(BLOCK, 4, BLOCK, 4)`` tile of groups ``kr x kc``: its pixels and its upsample stencil.

    Returns ``(y, x, inside, stencil)``: the high-res rows ``y`` and cols ``x`` (broadcastable 4-D pieces),
    which pixels lie inside ``[:vh, :vw]``, and for ``upsample_tile`` the tuple
    ``stencil = (offsets, group_ok, weights)``: the rows and cols of every group's 4 low-res corners as
    offsets into an ``(h, w)`` plane, ``(r_lo * w, r_hi * w, c_lo, c_hi)`` (clamped to the plane, which
    reproduces PyTorch's edge handling), whether the group has a pixel inside ``[:vh, :vw]``, and the weights
    ``(y lo, y hi, x lo, x hi)``: ``(7 - 2r) / 8`` and ``(2r + 1) / 8`` per axis, exact in any float format.
    """
    r = tl.arange(0, 4)
    kr4 = kr[:, None, None, None]
    kc4 = kc[None, None, :, None]
    ry = r[None, :, None, None]
    rx = r[None, None, None, :]
    y = 4 * kr4 - 2 + ry
    x = 4 * kc4 - 2 + rx
    inside = (y >= 0) & (y < vh) & (x >= 0) & (x < vw)

    r_lo = tl.minimum(tl.maximum(kr4 - 1, 0), h - 1)
    r_hi = tl.minimum(kr4, h - 1)
    c_lo = tl.minimum(tl.maximum(kc4 - 1, 0), w - 1)
    c_hi = tl.minimum(kc4, w - 1)
    group_ok = (4 * kr4 - 2 < vh) & (4 * kc4 - 2 < vw)
    offsets = (r_lo * w, r_hi * w, c_lo, c_hi)
    wy_hi = (2 * ry + 1).to(tl.float32) * 0.125
    wx_hi = (2 * rx + 1).to(tl.float32) * 0.125
    return y, x, inside, (offsets, group_ok, (1.0 - wy_hi, wy_hi, 1.0 - wx_hi, wx_hi))


@triton.jit
def upsample_tile(plane_ptr, stencil):
    """The float32 ``(BLOCK, 4, BLOCK, 4)`` upsampled tile of the ``(h, w)`` plane at ``plane_ptr``: the four
    low-res corners of each group are loaded once and weighted (``stencil`` from ``tile_layout``)."""
    offsets, group_ok, weights = stencil
    row_lo, row_hi, c_lo, c_hi = offsets
    wy_lo, wy_hi, wx_lo, wx_hi = weights
    l00 = tl.load(plane_ptr + row_lo + c_lo, mask=group_ok, other=0.0).to(tl.float32)
    l01 = tl.load(plane_ptr + row_lo + c_hi, mask=group_ok, other=0.0).to(tl.float32)
    l10 = tl.load(plane_ptr + row_hi + c_lo, mask=group_ok, other=0.0).to(tl.float32)
    l11 = tl.load(plane_ptr + row_hi + c_hi, mask=group_ok, other=0.0).to(tl.float32)
    return wy_lo * (wx_lo * l00 + wx_hi * l01) + wy_hi * (wx_lo * l10 + wx_hi * l11)


@triton.jit
def store_adjoint(plane_ptr, g, kr, kc, h, w, BLOCK: tl.constexpr):
    """Adjoint of the upsample: from ``g``, the float32 ``(BLOCK, 4, BLOCK, 4)`` gradient with respect to the
    tile's pixels (zero outside the valid region), store the gradient of low-res pixels ``kr[:-1] x kc[:-1]``
    into the ``(h, w)`` plane at ``plane_ptr``, in its dtype.

    Columns first: each group's 4 columns split into the part that goes to low-res col ``k - 1`` ("lo",
    weights ``(7 - 2r) / 8``) and the part that goes to col ``k`` ("hi", weights ``(2r + 1) / 8``); low-res
    col ``j = kc`` receives hi(k=j) + lo(k=j+1), combined by a register gather; col 0 also gets lo(0) and col
    ``w - 1`` also hi(w) (the clamps). Then rows, the same way. The last group of the block only completes the
    one before it, so it is not stored (the next block, which starts there, stores it).
    """
    r = tl.arange(0, 4)
    w_hi_1 = (2 * r + 1).to(tl.float32) * 0.125
    w_lo_1 = 1.0 - w_hi_1
    col_lo = tl.sum(g * w_lo_1[None, None, None, :], 3)  # (BLOCK, 4, BLOCK)
    col_hi = tl.sum(g * w_hi_1[None, None, None, :], 3)
    a = tl.arange(0, BLOCK)
    j3 = kc[None, None, :]
    nxt3 = tl.minimum(a + 1, BLOCK - 1)[None, None, :] + tl.full((BLOCK, 4, BLOCK), 0, tl.int32)
    col_lo_next = tl.gather(col_lo, nxt3, 2)
    col_hi_next = tl.gather(col_hi, nxt3, 2)
    cols = col_hi + col_lo_next + tl.where(j3 == 0, col_lo, 0.0) + tl.where(j3 == w - 1, col_hi_next, 0.0)

    row_lo = tl.sum(cols * w_lo_1[None, :, None], 1)  # (BLOCK, BLOCK)
    row_hi = tl.sum(cols * w_hi_1[None, :, None], 1)
    i2 = kr[:, None]
    nxt2 = tl.minimum(a + 1, BLOCK - 1)[:, None] + tl.full((BLOCK, BLOCK), 0, tl.int32)
    row_lo_next = tl.gather(row_lo, nxt2, 0)
    row_hi_next = tl.gather(row_hi, nxt2, 0)
    grad = row_hi + row_lo_next + tl.where(i2 == 0, row_lo, 0.0) + tl.where(i2 == h - 1, row_hi_next, 0.0)

    j2 = kc[None, :]
    keep = (a[:, None] < BLOCK - 1) & (a[None, :] < BLOCK - 1) & (i2 < h) & (j2 < w)
    tl.store(plane_ptr + i2 * w + j2, grad.to(plane_ptr.dtype.element_ty), mask=keep)
