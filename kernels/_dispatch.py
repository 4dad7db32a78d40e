"""Host-side checks that ``mask_losses`` and ``class_ce`` share: the backend choice and whether the Triton
path can run the given tensors."""

from __future__ import annotations

import torch

try:
    import triton
except ImportError:  # optional: pyproject installs it on Linux only; the torch reference runs everywhere
    triton = None

__all__ = ["HAS_TRITON", "INTERPRETED", "check_triton_args", "require_launchable", "resolve_backend"]

HAS_TRITON = triton is not None

# Triton fixes compiled vs interpreted when ``triton.jit`` wraps a kernel (reading TRITON_INTERPRET), and
# the Triton op files wrap theirs at import, right after importing this module. So the mode is read once,
# here: setting the variable later changes nothing. The interpreter tests set it before pytest starts
# (Makefile). ``triton.knobs`` is new in triton 3.4, pyproject's floor.
INTERPRETED = HAS_TRITON and bool(triton.knobs.runtime.interpret)


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: ``"auto"`` picks Triton for CUDA logits when triton is installed;
    ``"triton"`` without triton, or any other name, raises."""
    if backend == "auto":
        return "triton" if logits.is_cuda and HAS_TRITON else "torch"
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError(
            "backend='triton' needs the triton package (Linux: pip install 'triton>=3.4'); "
            "backend='auto' or 'torch' runs the torch reference without it"
        )
    if backend in ("triton", "torch"):
        return backend
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def require_launchable(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the tensors are on different devices, or on CPU with compiled kernels."""
    devices = {tensor.device for tensor in tensors}
    if len(devices) > 1:
        raise ValueError(
            f"the Triton backend needs all inputs on one device, got {sorted(map(str, devices))}"
        )
    if INTERPRETED:
        return
    for tensor in tensors:
        if not tensor.is_cuda:
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before kernels is imported "
                f"to run the kernels on CPU; got a tensor on {tensor.device}"
            )


def check_triton_args(logits: torch.Tensor, block: int | None) -> None:
    """Raise on logits the kernels do not load, or a ``block=`` override that is not a power of two >= 2."""
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton backend takes float32/bfloat16/float16 logits, got {logits.dtype}")
    if block is not None and (block < 2 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 2, got {block}")
