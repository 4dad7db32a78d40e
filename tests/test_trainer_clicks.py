"""The multi-click protocol's parts against hand-made masks with known answers (``trainer.clicks``)."""

from __future__ import annotations

import numpy as np

from trainer.clicks import click_summary, next_click, noc


def test_click_goes_to_the_largest_missed_region_centre():
    gt = np.zeros((40, 60), bool)
    gt[5:16, 5:16] = True  # an 11 x 11 object...
    gt[30:33, 50:53] = True  # ...and a 3 x 3 part of it, both missed
    pred = np.zeros_like(gt)
    pred[20:23, 20:23] = True  # a 3 x 3 spill
    assert next_click(pred, gt) == (10.0, 10.0, 1)  # positive, at the big square's centre


def test_click_goes_to_a_larger_spill_and_none_when_exact():
    gt = np.zeros((40, 60), bool)
    gt[5:8, 5:8] = True
    pred = gt.copy()
    pred[20:31, 30:41] = True  # an 11 x 11 spill outweighs nothing missed
    assert next_click(pred, gt) == (35.0, 25.0, 0)
    assert next_click(gt, gt) is None


def test_click_in_a_ring_is_in_the_ring_not_its_hole():
    """The interior-most pixel of a missed ring lies on the ring, away from both of its edges."""
    yy, xx = np.mgrid[:101, :101]
    r = np.hypot(yy - 50, xx - 50)
    gt = r < 40
    pred = r < 20
    x, y, label = next_click(pred, gt)
    assert label == 1 and gt[int(y), int(x)] and not pred[int(y), int(x)]
    assert 27 <= np.hypot(x - 50, y - 50) <= 33  # the middle of the 20..40 band


def test_noc_counts_interactions_and_caps_failures():
    ious = np.array(
        [
            [0.90, 0.95, 0.95],  # reaches both at the first interaction
            [0.50, 0.86, 0.91],  # 85 % at the 2nd, 90 % at the 3rd
            [0.10, 0.20, 0.30],  # never: counts N + 1 = 3
        ]
    )
    assert noc(ious, 0.85) == (1 + 2 + 3) / 3
    assert noc(ious, 0.90) == (1 + 3 + 3) / 3
    summary = click_summary(ious)
    assert summary["miou"] == [0.5, np.mean([0.95, 0.86, 0.2]), np.mean([0.95, 0.91, 0.3])]
    assert (summary["noc85"], summary["noc90"]) == (2.0, 7 / 3)
