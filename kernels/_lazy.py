"""Build each ``@triton.jit`` kernel when it is first launched, once per mode (compiled or interpreted).

Triton decides at decoration time whether a kernel is compiled or run by its CPU interpreter: ``triton.jit``
reads ``TRITON_INTERPRET`` (``triton.knobs.runtime.interpret``) when it wraps the function. Decorating at
import would tie the mode to whoever imported ``kernels`` first (in a pytest run, usually some other test
module), so the op files keep their kernels as plain functions wrapped in ``LazyKernel``, and the wrapper
decorates them at launch for the mode in force then. Both modes can live in one process: the tests run the
interpreter on CPU tensors and the compiled kernels on CUDA tensors.

Kernels built this way must be self-contained (no calls to other ``@triton.jit`` helpers), because a helper's
global name could only point at one of the two modes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from triton.runtime.jit import JITFunction

__all__ = ["LazyKernel", "interpreting", "require_launchable"]


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set (read now, not at import)."""
    return bool(triton.knobs.runtime.interpret)


def require_launchable(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the tensors are on different devices, or on CPU outside the interpreter."""
    devices = {tensor.device for tensor in tensors}
    if len(devices) > 1:
        raise ValueError(
            f"the Triton backend needs all inputs on one device, got {sorted(map(str, devices))}"
        )
    if interpreting():
        return
    for tensor in tensors:
        if not tensor.is_cuda:
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on CPU; "
                f"got a tensor on {tensor.device}"
            )


class LazyKernel:
    """A kernel function that is ``triton.jit``-decorated on first launch, once per interpreter mode."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._built: dict[bool, object] = {}

    def __getitem__(self, grid):
        mode = interpreting()
        kernel = self._built.get(mode)
        if kernel is None:
            kernel = self._built[mode] = triton.jit(self.fn)
        return kernel[grid]

    def jit(self):
        """A compiled-mode ``JITFunction``, whatever the mode (for ahead-of-time compilation checks)."""
        return JITFunction(self.fn)
