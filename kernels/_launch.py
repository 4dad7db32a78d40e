"""Host-side pieces that ``mask_losses`` and ``class_ce`` share: backend choice, the Triton path's argument
checks, launch configs, tile grids and valid-pixel counts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

__all__ = ["check_triton_args", "launch_config", "resolve_backend", "tile_grid", "valid_count"]


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: ``"auto"`` picks Triton for CUDA logits; anything else raises."""
    if backend == "auto":
        return "triton" if logits.is_cuda else "torch"
    if backend in ("triton", "torch"):
        return backend
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def check_triton_args(logits: torch.Tensor, block: int | None) -> None:
    """Raise on logits the kernels do not load, or a ``block=`` override that is not a power of two >= 2."""
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton backend takes float32/bfloat16/float16 logits, got {logits.dtype}")
    if block is not None and (block < 2 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 2, got {block}")


def launch_config(
    config: tuple[int, int], block: int | None, warps_for: Callable[[int], int]
) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: the kernel's tuned ``config``, or ``block`` with the warps the op gives it."""
    return config if block is None else (block, warps_for(block))


def tile_grid(h: int, w: int, block: int, *, overlap: bool) -> tuple[int, int]:
    """``(tiles, tiles per row)`` for ``(h, w)`` logits: forward tiles of ``block`` groups cover groups
    ``0..h`` x ``0..w``; backward tiles (``overlap``) step by ``block - 1`` groups over the ``h x w`` low-res
    pixels they write."""
    if overlap:
        n_tiles_h, n_tiles_w = triton.cdiv(h, block - 1), triton.cdiv(w, block - 1)
    else:
        n_tiles_h, n_tiles_w = triton.cdiv(h + 1, block), triton.cdiv(w + 1, block)
    return n_tiles_h * n_tiles_w, n_tiles_w


def valid_count(valid_i32: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(N,)`` float32 number of valid high-res pixels per row of ``(N, 2)`` sizes (clamped to the frame)."""
    vh = valid_i32[:, 0].clamp(0, 4 * h)
    vw = valid_i32[:, 1].clamp(0, 4 * w)
    return (vh * vw).to(torch.float32)
