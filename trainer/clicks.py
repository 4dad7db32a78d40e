"""Multi-click evaluation: the corrections a user makes, one click per round, and the scores of the rounds.

The protocol (``trainer eval --clicks N``): each object starts once from its box and once from its single
interior point (round 0, exactly today's box and point scores). Each of the N rounds after it adds one
corrective click where the last mask is most wrong: in the largest connected missed region (a positive
click) or the largest connected spill (a negative click), whichever has more pixels, at that region's
interior-most pixel. The previous round's low-res logits are the mask prompt unless turned off. Nothing is
random, so the scores are the same on every run.

NoC@t (the number of clicks to reach IoU t) counts the first prompt as the first interaction: an object
that reaches t at round r took r + 1; one that never does within N rounds counts N + 1, the cap, as the
interactive-segmentation literature counts failures.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from trainer.prompts import farthest_interior_point

NOC_THRESHOLDS = (0.85, 0.90)
"""The IoU targets NoC is reported for (``noc85``, ``noc90``)."""


def error_region(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The error region a corrective click goes to, for a ``(H, W)`` bool prediction of a ``(H, W)`` bool
    target: the largest connected missed region (label 1) or spill (label 0), whichever has more pixels, as a
    ``(H, W)`` bool mask and its label; ``None`` when the prediction is exact. A missed region wins a tie."""
    best = None  # (pixels, region, label)
    for region, label in ((gt & ~pred, 1), (pred & ~gt, 0)):
        if not region.any():
            continue
        parts, _ = ndimage.label(region)
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0  # the background of the labelling
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), parts == k, label)
    return None if best is None else best[1:]


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, int] | None:
    """The corrective click on a ``(H, W)`` bool prediction of a ``(H, W)`` bool target: the interior-most
    pixel of ``error_region``.

    Returns ``(x, y, label)`` in the masks' pixels (label 1 positive in a missed region, 0 negative in a
    spill), or ``None`` when the prediction is exact.
    """
    chosen = error_region(pred, gt)
    if chosen is None:
        return None
    region, label = chosen
    # the distance transform only needs the region's bounding box (one pixel of margin stays outside)
    ys, xs = np.nonzero(region)
    y0, x0 = ys.min(), xs.min()
    x, y = farthest_interior_point(region[y0 : ys.max() + 1, x0 : xs.max() + 1])
    return x + x0, y + y0, label


def noc(ious: np.ndarray, threshold: float) -> float:
    """Mean number of interactions to reach ``threshold`` IoU, from ``(n_objects, N + 1)`` per-round IoUs;
    an object that never reaches it counts ``N + 1``."""
    reached = ious >= threshold
    first = np.where(reached.any(1), reached.argmax(1) + 1, ious.shape[1])
    return float(first.mean()) if len(first) else float("nan")


def click_summary(ious: np.ndarray) -> dict:
    """``{"miou": [round 0, ..., round N], "noc85", "noc90"}`` of ``(n_objects, N + 1)`` per-round IoUs."""
    summary = {"miou": [float(v) for v in ious.mean(0)] if len(ious) else []}
    for t in NOC_THRESHOLDS:
        summary[f"noc{round(t * 100)}"] = noc(ious, t)
    return summary
