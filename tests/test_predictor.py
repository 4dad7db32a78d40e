"""``trainer.predictor.Predictor`` is ``SamPredictor`` for SAM's presets (random weights, synthetic image)."""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything import SamPredictor

from embedcache.models import build_sam
from embedcache.synthetic import make_image
from trainer.predictor import Predictor


def test_predictor_equals_sam_predictor_on_vit_tiny():
    sam = build_sam("vit_tiny", seed=3)
    image, _ = make_image(np.random.default_rng(1), 300, 420, 2)
    ours, theirs = Predictor(sam, "vit_tiny"), SamPredictor(sam)
    ours.set_image(image)
    theirs.set_image(image)
    assert ours.input_size == theirs.input_size and ours.original_size == theirs.original_size
    np.testing.assert_allclose(ours.features.numpy(), theirs.features.numpy(), rtol=0, atol=1e-5)
    prompts = [
        dict(box=np.array([40.0, 30.0, 250.0, 200.0]), multimask_output=False),
        dict(point_coords=np.array([[100.0, 120.0], [300.0, 50.0]]), point_labels=np.array([1, 0])),
    ]
    for kw in prompts:
        m1, iou1, low1 = ours.predict(**kw)
        m2, iou2, low2 = theirs.predict(**kw)
        np.testing.assert_allclose(low1, low2, rtol=0, atol=1e-4)
        np.testing.assert_allclose(iou1, iou2, rtol=0, atol=1e-5)
        assert (m1 != m2).mean() < 1e-4, kw


def test_predictor_needs_an_image_and_an_rgb_uint8_one():
    predictor = Predictor(build_sam("vit_tiny"), "vit_tiny")
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box=np.array([0, 0, 10, 10]))
    with pytest.raises(ValueError, match="uint8"):
        predictor.set_image(np.zeros((10, 10), np.float32))
