"""Helpers the kernel test files share: an ``allclose`` that says where and by how much it failed, the
gradient comparison, the tolerances, seeds, valid-size builders and the sm_90 ahead-of-time compile check."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

__all__ = [
    "BF16",
    "FACTORS",
    "FP32",
    "GPU_DTYPES",
    "assert_close",
    "assert_grad_close",
    "compile_sm90",
    "check_sm90",
    "fresh_seed",
    "unsaturated_grad_scale",
    "valid_rows",
]

SEED_VARIABLE = "SAMTUNE_TEST_SEED"

# (atol, rtol) of the Triton ops against the reference: float32 logits, and bfloat16 logits.
FP32 = pytest.param((1e-6, 1e-4), id="atol=1e-06,rtol=1e-04")
BF16 = pytest.param((1e-2, 1e-2), id="atol=1e-02,rtol=1e-02")
# The upsample factors from the logits to the targets: (4h, 4w) targets (SAM) and (h, w) ones (LiteMedSAM,
# whose logits are its input frame).
FACTORS = pytest.mark.parametrize("factor", [4, 1], ids=["x4", "x1"])
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


def valid_rows(
    kind: str, count: int, height: int, width: int, mixed: Callable[[], tuple[list, int]]
) -> list[tuple[int, int]]:
    """``count`` valid sizes ``(vh, vw)`` of one kind in a ``height x width`` frame.

    The kinds: ``full``, a single ``row``, a single ``col``, or ``mixed``, where ``mixed()`` gives
    ``(cycle, start)`` and the sizes go round ``cycle`` from ``start``. ``mixed`` is called only for that
    kind, so the others draw nothing from the caller's generator.
    """
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
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float,
    rtol: float,
    what: str = "",
    scale: float | None = None,
) -> None:
    """``assert_close`` for gradients with ``atol`` taken relative to a gradient scale.

    Means over N pixels make gradients O(1/N), so the absolute floor is ``atol * scale + 1e-12``; ``scale``
    defaults to the largest expected gradient.
    """
    if scale is None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, atol=atol * scale + 1e-12, rtol=rtol, what=what)


def unsaturated_grad_scale(weights: torch.Tensor, valid_hw: torch.Tensor, factor: int) -> float:
    """The largest gradient a logit can get from an image or mask whose pixels are not saturated:
    ``factor**2`` target pixels' worth of its ``(N,)`` upstream ``weights`` over its valid pixel count
    (``valid_hw`` is ``(N, 2)``), the largest over the N.

    A float32 reference that forms ``p - t`` from a probability near 1 resolves it only to an absolute 2^-24,
    so a confident logit's tiny gradient carries that absolute error: the gradient floor of a comparison with
    such a reference is taken against this size, not the largest expected gradient.
    """
    pixels = valid_hw.clamp(min=0).prod(dim=1).clamp(min=1).to(weights.dtype)
    return float((weights * factor**2 / pixels).max())


class Sm90Build(NamedTuple):
    """A kernel compiled for sm_90: its PTX and what ``ptxas -v`` reports for it."""

    ptx: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes


def compile_sm90(kernel, signature: dict, constexprs: dict, num_warps: int) -> Sm90Build:
    """Compile a ``@triton.jit`` kernel ahead of time for sm_90, without a GPU, and run ``ptxas -v`` on it.

    Compiling (not interpreting) catches what the interpreter lets through. ``ptxas`` is Triton's bundled one,
    run with the flags Triton passes it (``-lineinfo --regAllocOptLevel=2 --gpu-name=sm_90a``), so the
    register count is the one the kernel launches with. Skips the calling test when this Triton build has no
    NVIDIA backend, or when ``TRITON_INTERPRET`` is set (the kernels are interpreted functions then).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    if triton.knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET is set: the kernels were built for the interpreter")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a"]
        cmd = [ptxas, *flags, source, "-o", f"{source}.o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise AssertionError(f"unexpected ptxas -v output:\n{log}")
    return Sm90Build(ptx, int(registers.group(1)), int(spills.group(1)), int(spills.group(2)))


# Argument types of the kernels, by parameter name, for compiling them without a launch. ``logits_ptr`` and
# ``grad_ptr`` take the logits' dtype; any other scalar that is not a constexpr is an int32.
_ARG_TYPES = {
    "targets_ptr": "*u8",
    "labels_ptr": "*i64",
    "valid_ptr": "*i32",
    "partial_ptr": "*fp32",
    "coef_ptr": "*fp32",
    "alpha_pos": "fp32",
    "alpha_neg": "fp32",
}


def check_sm90(kernel, logits_dtype: str, constexprs: dict, num_warps: int) -> Sm90Build:
    """Compile ``kernel`` for sm_90 with ``logits_dtype`` (``"fp32"``, ``"bf16"``) logits and assert that it
    uses no atomics (the kernels are deterministic by design) and spills no registers."""
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in ("logits_ptr", "grad_ptr"):
            signature[param.name] = f"*{logits_dtype}"
        else:
            signature[param.name] = _ARG_TYPES.get(param.name, "i32")
    build = compile_sm90(kernel, signature, constexprs, num_warps)
    print(f"{kernel.__name__} {logits_dtype} {constexprs} {num_warps} warps: {build.registers} registers")
    assert "atom" not in build.ptx, f"{kernel.__name__}: the kernels are meant to be free of atomics"
    spills = (build.spill_stores, build.spill_loads)
    assert spills == (0, 0), f"{kernel.__name__}: {build.registers} registers, spills (st, ld) {spills} bytes"
    return build
