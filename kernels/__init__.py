"""Fused upsample + loss kernels (Triton) and their torch references.

``mask_losses`` and ``class_ce`` dispatch on the tensors: CUDA tensors go to the Triton kernels, everything
else to the plain-torch definitions in ``kernels.reference``. ``backend="triton"`` forces Triton (on CPU only
under ``TRITON_INTERPRET=1``), ``backend="torch"`` forces the reference.
"""

from kernels.mask_losses import MaskLosses, mask_losses, min_bytes_moved

__all__ = ["MaskLosses", "mask_losses", "min_bytes_moved"]
