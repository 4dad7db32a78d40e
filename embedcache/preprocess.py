"""SAM's image preprocessing, done exactly as ``SamPredictor.set_image`` does it.

The numpy path of ``ResizeLongestSide.apply_image`` (a PIL resize of the uint8 image so its long side is
1024), then ``Sam.preprocess`` (normalise by SAM's pixel mean/std, pad bottom-right to 1024x1024). The torch
path ``apply_image_torch`` of segment-anything 1.0 is not used: it disagrees with ``apply_image``. The resize
runs in the prefetch threads on uint8 (4x less to move than float); normalise and pad run on the encoder's
device.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from embedcache.models import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD

_RESIZE = ResizeLongestSide(IMAGE_SIZE)

PREPROCESSING = {
    "resize": "segment_anything ResizeLongestSide.apply_image (numpy/PIL path)",
    "long_side": IMAGE_SIZE,
    "pixel_mean": list(PIXEL_MEAN),
    "pixel_std": list(PIXEL_STD),
    "padding": "bottom-right, zeros after normalisation, to 1024x1024",
    "image_conversion": "embedcache.images.to_rgb8 (8-bit RGB; 0.5/99.5 percentile scaling above 8 bits)",
}
"""What the cache signature records about preprocessing."""


def resize_longest_side(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(h, w, 3)`` uint8 with ``max(h, w) == 1024``, as
    ``SamPredictor.set_image``.
    """
    return _RESIZE.apply_image(image)


def to_model_input(resized: list[np.ndarray], sam: Sam, device: torch.device) -> torch.Tensor:
    """Resized uint8 images ``[(h_i, w_i, 3)]`` -> ``(B, 3, 1024, 1024)`` float32 normalised, padded batch."""
    batch = []
    for img in resized:
        t = torch.as_tensor(img, device=device).permute(2, 0, 1).contiguous()[None]
        batch.append(sam.preprocess(t))  # the same call set_torch_image makes
    return torch.cat(batch)
