"""``trainer.distance_maps``: the AIS head's targets, and seeded watershed splitting touching discs that a
threshold of the foreground cannot."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from trainer.distance_maps import distance_targets, seeded_watershed
from trainer.instance_metrics import image_scores


def discs(shape, *circles) -> np.ndarray:
    """Labels with disc ``k + 1`` at ``circles[k]`` = (y, x, r); a later disc covers an earlier one."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for k, (y, x, r) in enumerate(circles, 1):
        out[(yy - y) ** 2 + (xx - x) ** 2 <= r**2] = k
    return out


def test_targets_of_one_disc():
    labels = discs((40, 40), (20, 18, 9))
    fg, centre, boundary = distance_targets(labels)
    np.testing.assert_array_equal(fg, labels > 0)
    assert centre[20, 18] == 0 and boundary[20, 18] == 0  # the deepest pixel is the centre
    inside = labels > 0
    assert centre[inside].max() == pytest.approx(1.0) and boundary[inside].min() == 0
    assert (centre[~inside] == 1).all() and (boundary[~inside] == 1).all()
    assert boundary[20, 18 + 9] > 0.85  # an edge pixel: depth 1 of a maximum of 10


def test_touching_discs_are_split_by_the_watershed():
    labels = discs((64, 80), (32, 26, 14), (32, 52, 14), (10, 70, 6))  # the first two touch
    assert ndimage.label(labels > 0)[1] == 2  # thresholding the foreground finds the two as one
    fg, centre, boundary = distance_targets(labels)
    found = seeded_watershed(fg, centre, boundary)
    assert found.dtype == np.int32 and found.max() == 3
    s = image_scores(found, labels)
    assert (s["n_pred"], s["sa50"]) == (3, 1.0)
    assert s["sa75"] == 1.0, s


def test_min_size_drops_small_objects_and_renumbers():
    labels = discs((40, 40), (10, 10, 2), (25, 25, 8))
    found = seeded_watershed(*distance_targets(labels), smoothing=0.5, min_size=30)
    assert sorted(np.unique(found).tolist()) == [0, 1]
    assert (found[labels == 2] == 1).mean() > 0.9


def test_targets_need_a_2d_label_image():
    with pytest.raises(ValueError, match=r"\(H, W\) labels"):
        distance_targets(np.zeros((2, 4, 4), np.int32))
