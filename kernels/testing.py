"""Helpers for the kernel tests: an ``allclose`` that says where and by how much it failed, the gradient
comparison, the tolerances, seeds, the interpreter switch and valid-size builders the op test files share.

Test-only (it imports pytest); ``import kernels`` does not load it."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

__all__ = [
    "BF16",
    "FP32",
    "GPU_DTYPES",
    "assert_close",
    "assert_grad_close",
    "fresh_seed",
    "use_interpreter",
    "valid_rows",
]

SEED_VARIABLE = "SAMTUNE_TEST_SEED"

# (atol, rtol) of the Triton ops against the reference: float32 logits, and bfloat16 logits.
FP32 = pytest.param((1e-6, 1e-4), id="atol=1e-06,rtol=1e-04")
BF16 = pytest.param((1e-2, 1e-2), id="atol=1e-02,rtol=1e-02")
# ("dtype,tol") cases of the GPU full-size tests.
GPU_DTYPES = [
    pytest.param(torch.float32, FP32.values[0], id="fp32-" + FP32.id),
    pytest.param(torch.bfloat16, BF16.values[0], id="bf16-" + BF16.id),
]


def fresh_seed() -> int:
    """A fresh random seed, or ``SAMTUNE_TEST_SEED`` when set; printed so that ``-rA``/failures show it."""
    value = int(os.environ.get(SEED_VARIABLE, int.from_bytes(os.urandom(4), "little")))
    print(f"{SEED_VARIABLE}={value}")
    return value


def use_interpreter(monkeypatch) -> None:
    """Run Triton kernels through Triton's CPU interpreter until ``monkeypatch`` undoes it (one test).

    ``kernels`` decorates its kernels at launch time for the mode in force (see ``kernels/_lazy.py``), so the
    variable works no matter which module imported ``kernels`` first.
    """
    from kernels._lazy import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting()


def valid_rows(
    kind: str, count: int, height: int, width: int, mixed: Callable[[], tuple[list, int]]
) -> list[tuple[int, int]]:
    """``count`` valid sizes ``(vh, vw)`` of one kind in a ``height x width`` frame: ``full``, a single
    ``row``, a single ``col``, or ``mixed``: ``mixed()`` gives ``(cycle, start)`` and the sizes go round
    ``cycle`` from ``start`` (called only for ``mixed``, so other kinds draw nothing from the caller's
    generator)."""
    if kind == "full":
        return [(height, width)] * count
    if kind == "row":
        return [(1, width)] * count
    if kind == "col":
        return [(height, 1)] * count
    if kind == "mixed":
        cycle, start = mixed()
        return [cycle[(start + i) % len(cycle)] for i in range(count)]
    raise ValueError(kind)


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


def assert_grad_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = ""
) -> None:
    """``assert_close`` for gradients with ``atol`` taken relative to the largest expected gradient.

    Means over N pixels make gradients O(1/N), so the absolute floor is ``atol * max|expected| + 1e-12``.
    """
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, atol=atol * scale + 1e-12, rtol=rtol, what=what)


def compile_sm90_ptx(kernel, signature: dict, constexprs: dict, num_warps: int) -> str:
    """PTX of a ``kernels`` kernel compiled ahead of time for sm_90, without a GPU.

    Compiling (not interpreting) catches what the interpreter lets through. Skips the calling test when this
    Triton build has no NVIDIA backend, or when ``TRITON_INTERPRET`` was set for the whole process (then
    triton.language's own helpers are interpreted and cannot be compiled).
    """
    import pytest
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    if triton.knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET was set process-wide: triton.language's own helpers are interpreted")
    src = ASTSource(fn=kernel.jit(), signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    return compiled.asm["ptx"]
