"""Image preprocessing per preset, done exactly as each preset's upstream inference path does it.

Two halves, so the expensive one runs in the prefetch threads on uint8 (4x less to move than float):

- ``resize(image, preset)`` (prefetch threads): ``(H, W, 3)`` uint8 -> ``(h, w, 3)`` uint8 in the input frame.
  ``longest_side_pil`` is the numpy path of SAM's ``ResizeLongestSide.apply_image`` (what
  ``SamPredictor.set_image`` calls; its torch path ``apply_image_torch`` disagrees with it and is not used).
  ``longest_side_cv2_area`` is LiteMedSAM's ``cv2.resize(..., INTER_AREA)`` to the same size.
  ``square_skimage_cubic`` is MedSAM's ``skimage.transform.resize`` to the full square, cast to uint8.
- ``to_model_input(resized, preset, device)`` (encoder device): normalise and pad bottom-right with zeros
  to ``(B, 3, S, S)`` float32. ``mean_std`` is ``Sam.preprocess``'s arithmetic; ``min_max`` scales each
  image by its own minimum and maximum over all channels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from embedcache.presets import Preset


def resize(image: np.ndarray, preset: Preset) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(h, w, 3)`` uint8 with ``(h, w) == preset.input_hw(H, W)``."""
    h, w = preset.input_hw(*image.shape[:2])
    if preset.resize == "longest_side_pil":
        return ResizeLongestSide(preset.image_size).apply_image(image)
    if preset.resize == "longest_side_cv2_area":
        import cv2

        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    from skimage.transform import resize as sk_resize

    out = sk_resize(image, (h, w), order=3, preserve_range=True, anti_aliasing=True)
    return out.astype(np.uint8)  # MedSAM truncates, it does not round


def to_model_input(resized: list[np.ndarray], preset: Preset, device: torch.device) -> torch.Tensor:
    """Resized uint8 images ``[(h_i, w_i, 3)]`` -> ``(B, 3, S, S)`` float32 normalised, zero-padded batch."""
    s = preset.image_size
    batch = []
    for img in resized:
        x = torch.as_tensor(img, device=device).permute(2, 0, 1).float()
        if preset.normalize == "mean_std":
            mean = torch.tensor(preset.pixel_mean, device=device).view(3, 1, 1)
            std = torch.tensor(preset.pixel_std, device=device).view(3, 1, 1)
            x = (x - mean) / std
        else:
            lo, hi = x.min(), x.max()
            x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
        batch.append(F.pad(x, (0, s - x.shape[-1], 0, s - x.shape[-2]))[None])
    return torch.cat(batch)
