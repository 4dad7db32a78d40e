"""Build each ``@triton.jit`` kernel when it is first launched, once per mode (compiled or interpreted).

Triton decides at decoration time whether a kernel is compiled or run by its CPU interpreter: ``triton.jit``
reads ``TRITON_INTERPRET`` (``triton.knobs.runtime.interpret``) when it wraps the function. Decorating at
import would tie the mode to whoever imported ``kernels`` first (in a pytest run, usually some other test
module), so the op files keep their kernels as plain functions wrapped in ``LazyKernel``, and the wrapper
decorates them at launch for the mode in force then. Both modes can live in one process: the tests run the
interpreter on CPU tensors and the compiled kernels on CUDA tensors.

Device functions that kernels call are plain functions too, wrapped in ``LazyHelper``: a helper's global name
could only point at one of the two modes, so a kernel (or a helper) is built for a mode over a copy of its
module's globals in which every ``LazyHelper`` it names stands built for that mode (compiled: a
``JITFunction``, which Triton inlines into the kernel as usual; interpreted: the function as the interpreter
rewrites it).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

__all__ = ["LazyHelper", "LazyKernel", "interpreting", "require_launchable"]


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


def _bind(fn: Callable, interpret: bool) -> Callable:
    """``fn`` with the ``LazyHelper`` globals it names replaced by their builds for the mode, or ``fn``."""
    helpers = {}
    for name in fn.__code__.co_names:
        value = fn.__globals__.get(name)
        if isinstance(value, LazyHelper):
            helpers[name] = value.build(interpret)
    if not helpers:
        return fn
    bound = types.FunctionType(fn.__code__, {**fn.__globals__, **helpers}, fn.__name__, fn.__defaults__)
    # Triton reads the signature (constexpr annotations) and the source (found through __code__) from these.
    bound.__annotations__ = fn.__annotations__
    bound.__kwdefaults__ = fn.__kwdefaults__
    bound.__qualname__ = fn.__qualname__
    bound.__module__ = fn.__module__
    bound.__doc__ = fn.__doc__
    return bound


class LazyHelper:
    """A device function called by ``LazyKernel`` kernels (or other helpers), decorated with them per mode."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._built: dict[bool, object] = {}

    def build(self, interpret: bool):
        """The helper as ``@triton.jit`` makes it in that mode, with its own helpers bound the same way."""
        helper = self._built.get(interpret)
        if helper is None:
            bound = _bind(self.fn, interpret)
            # Interpreted: the function as InterpretedFunction rewrites it, called directly. It only runs
            # inside an interpreted kernel launch, which has patched triton.language already, and
            # InterpretedFunction.__call__ would patch it again on every call.
            helper = InterpretedFunction(bound).rewrite() if interpret else JITFunction(bound)
            self._built[interpret] = helper
        return helper

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self.fn.__name__} is a Triton device function: call it from a LazyKernel kernel")


class LazyKernel:
    """A kernel function that is ``triton.jit``-decorated on first launch, once per interpreter mode."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._built: dict[bool, object] = {}

    def __getitem__(self, grid):
        mode = interpreting()
        kernel = self._built.get(mode)
        if kernel is None:
            kernel = self._built[mode] = triton.jit(_bind(self.fn, mode))
        return kernel[grid]

    def jit(self):
        """A compiled-mode ``JITFunction``, whatever the mode (for ahead-of-time compilation checks)."""
        return JITFunction(_bind(self.fn, False))
