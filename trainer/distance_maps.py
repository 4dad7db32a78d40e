"""The three maps of an automatic instance segmentation (AIS) head, as micro-sam's AIS decoder predicts them:
targets from instance labels, and instances from predicted maps by seeded watershed.

The maps, per pixel of an ``(H, W)`` image:

- **foreground**: 1 inside any object, 0 outside;
- **centre distance**: the Euclidean distance to the object's centre divided by the largest such distance in
  the object, so 0 at the centre and 1 at the object's farthest pixel;
- **boundary distance**: 1 minus the distance to the object's boundary divided by its largest value in the
  object, so 0 at the object's deepest pixel and near 1 on its boundary.

Both distances are 1 outside objects, as far as they go: the smoothing before seeding then raises them near
an edge instead of lowering them, which would make a ring of false seeds along every object's rim.

The centre is the object's pixel farthest from its boundary (``trainer.prompts.farthest_interior_point``'s
rule), which lies inside the object even when its centroid does not. Both distances are small only in each
object's core, so where they are both below 0.5 (and the foreground above 0.5) there is one seed per object,
even for touching objects; the watershed on the boundary distance then grows each seed to the object's edge
inside the foreground (``torch_em.util.segmentation.watershed_from_center_and_boundary_distances``, which
micro-sam's AIS calls, does the same with vigra's smoothing).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed


def distance_targets(labels: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` float32 foreground, centre distance and boundary distance of ``(H, W)`` int labels
    (0 background; touching objects keep their own distances: another object's pixel is boundary). Each
    object costs one distance transform of its bounding box."""
    if labels.ndim != 2:
        raise ValueError(f"expected (H, W) labels, got shape {labels.shape}")
    out = np.ones((3, *labels.shape), np.float32)
    out[0] = labels > 0
    for k, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None:  # an id not present
            continue
        # one pixel of margin, so that the crop's edge counts as outside the object
        y0, x0 = max(box[0].start - 1, 0), max(box[1].start - 1, 0)
        y1, x1 = box[0].stop + 1, box[1].stop + 1
        obj = np.pad(labels[y0:y1, x0:x1] == k, 1)
        inside = ndimage.distance_transform_edt(obj)
        cy, cx = np.unravel_index(np.argmax(inside), inside.shape)
        yy, xx = np.nonzero(obj)
        centre = np.hypot(yy - cy, xx - cx)
        depth = inside[yy, xx]
        sy, sx = yy - 1 + y0, xx - 1 + x0  # back to image pixels (the pad added one)
        out[1, sy, sx] = centre / max(centre.max(), 1e-6)
        out[2, sy, sx] = 1.0 - depth / depth.max()
    return out


def seeded_watershed(
    foreground: np.ndarray,
    centre_distance: np.ndarray,
    boundary_distance: np.ndarray,
    *,
    foreground_threshold: float = 0.5,
    centre_threshold: float = 0.5,
    boundary_threshold: float = 0.5,
    smoothing: float = 1.6,
    min_size: int = 0,
) -> np.ndarray:
    """``(H, W)`` int32 instance labels 1..n from the three predicted ``(H, W)`` maps.

    Seeds are the connected regions where the smoothed centre and boundary distances are both below their
    thresholds, inside the foreground (``foreground > foreground_threshold``); the watershed floods the
    smoothed boundary distance from them within the foreground. Objects under ``min_size`` pixels are dropped,
    and the rest numbered 1..n.
    """
    centre = ndimage.gaussian_filter(centre_distance.astype(np.float32), smoothing)
    boundary = ndimage.gaussian_filter(boundary_distance.astype(np.float32), smoothing)
    mask = foreground > foreground_threshold
    seeds, _ = ndimage.label((centre < centre_threshold) & (boundary < boundary_threshold) & mask)
    labels = watershed(boundary, markers=seeds, mask=mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    ids = np.zeros(len(sizes), np.int32)
    ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return ids[labels]
