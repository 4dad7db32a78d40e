"""FLOPs of SAM's image encoder per 1024x1024 image, counted and published.

Counting runs the encoder on the meta device under ``torch.utils.flop_counter.FlopCounterMode``, so it costs
no arithmetic and no memory: matrix products and convolutions count ``2 * MACs``; softmax, layer norm and
elementwise ops count nothing, as in the published figures. For vit_b/l/h the count matches the published 0.97
/ 2.99 / 5.96 TFLOP to within 0.2% (``tests/test_bench.py`` checks vit_b); vit_tiny has no published figure,
so its count is what the MFU of vit_tiny rests on.
"""

from __future__ import annotations

from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from embedcache.models import build_sam
from embedcache.presets import get_preset

PUBLISHED_TFLOP = {"vit_b": 0.97, "vit_l": 2.99, "vit_h": 5.96}
"""TFLOP per 1024x1024 image of SAM's encoders, as the issue quotes them."""


@cache
def counted_flops(model_type: str) -> int:
    """FLOPs of one encoder forward on one ``(1, 3, S, S)`` image (S: the preset's input side), counted on the
    meta device."""
    with torch.device("meta"):
        encoder = build_sam(model_type).image_encoder
    side = get_preset(model_type).image_size
    x = torch.empty(1, 3, side, side, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(x)
    return int(counter.get_total_flops())


def encoder_flops(model_type: str) -> int:
    """FLOPs per image used for MFU: the counted figure (which the published ones cross-check)."""
    return counted_flops(model_type)
