"""Fused upsample + loss kernels (Triton) and their torch references.

``mask_losses`` and ``class_ce`` dispatch on the tensors: CUDA tensors go to the Triton kernels, everything
else to the plain-torch definitions in ``kernels.reference``. ``backend="triton"`` forces Triton (on CPU only
under ``TRITON_INTERPRET=1``), ``backend="torch"`` forces the reference. Triton is optional (pyproject
installs it on Linux only): without it the package imports, ``auto`` always takes the reference and
``backend="triton"`` raises. ``min_bytes_moved`` gives the bytes
``mask_losses`` must move, for bandwidth figures.
"""

from kernels.class_ce import class_ce
from kernels.mask_losses import MaskLosses, mask_losses, min_bytes_moved

__all__ = ["MaskLosses", "class_ce", "mask_losses", "min_bytes_moved"]
