"""Comparison helper for the kernel tests: an ``allclose`` that says where and by how much it failed."""

from __future__ import annotations

import torch

__all__ = ["assert_close"]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = ""
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, in float64.

    On failure the message names the worst element (largest excess over its tolerance), both values there, the
    number of failing elements and the largest absolute error, so a failing shape can be reproduced and read.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all() or not torch.isfinite(e).all():
        bad = (~torch.isfinite(a)) | (~torch.isfinite(e))
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: non-finite value at index {idx}: actual {a[idx]}, expected {e[idx]}")
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    excess = err - tol
    if a.numel() == 0 or bool((excess <= 0).all()):
        return
    flat = int(torch.argmax(excess))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    raise AssertionError(
        f"{what}: {int((excess > 0).sum())}/{a.numel()} elements outside atol={atol:g}, rtol={rtol:g}; "
        f"worst at index {idx}: actual {a[idx].item():.9g}, expected {e[idx].item():.9g} "
        f"(abs err {err[idx].item():.3g}, max abs err {err.max().item():.3g}, max |expected| "
        f"{e.abs().max().item():.3g})"
    )
