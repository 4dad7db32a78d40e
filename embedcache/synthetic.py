"""A small annotated dataset that samtune generates itself, for tests, demos and benches.

Each image holds a few non-overlapping shapes (ellipses, rectangles, triangles) on a noisy textured
background. Each shape kind has its own colour, so a class is learnable from appearance, and the sizes vary so
that the images have odd aspect ratios. The layout is the folder layout that ``embedcache build`` reads:
``OUT/images/<stem>.png`` (RGB, 8-bit) and ``OUT/masks/<stem>.png`` (8-bit), where the mask is an instance map
(0 background, 1..K objects) or, with ``kind="semantic"``, a class map (0 background, 1..3 shape kind).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SHAPE_COLOURS = {1: (220, 90, 60), 2: (70, 180, 90), 3: (80, 110, 230)}  # class id -> RGB, per shape kind


def _shape_mask(rng: np.random.Generator, h: int, w: int, kind: int) -> np.ndarray:
    """One random shape of the given kind as a ``(h, w)`` bool mask, fully inside the image."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = rng.uniform(0.08, 0.2) * min(h, w)
    cy, cx = rng.uniform(r + 1, h - r - 1), rng.uniform(r + 1, w - r - 1)
    if kind == 1:  # ellipse
        ay, ax = r, r * rng.uniform(0.5, 1.0)
        return ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0
    if kind == 2:  # axis-aligned rectangle
        return (np.abs(yy - cy) <= r * 0.8) & (np.abs(xx - cx) <= r * rng.uniform(0.4, 0.9))
    # upward triangle: below the apex, inside two slanted edges
    dy = yy - (cy - r)
    return (dy >= 0) & (yy <= cy + r) & (np.abs(xx - cx) <= dy * 0.6)


def make_image(rng: np.random.Generator, h: int, w: int, n_objects: int) -> tuple[np.ndarray, list]:
    """One synthetic ``(h, w, 3)`` uint8 image and its objects, a list of ``(class_id, (h, w) bool mask)``."""
    base = rng.integers(90, 140)
    image = np.clip(base + rng.normal(0, 12, size=(h, w, 1)) + rng.normal(0, 6, size=(h, w, 3)), 0, 255)
    taken = np.zeros((h, w), bool)
    objects = []
    for _ in range(n_objects * 20):  # rejection sampling for non-overlapping shapes
        if len(objects) == n_objects:
            break
        kind = int(rng.integers(1, 4))
        m = _shape_mask(rng, h, w, kind)
        if m.sum() < 16 or (m & taken).any():
            continue
        taken |= m
        colour = np.array(SHAPE_COLOURS[kind], float) + rng.normal(0, 10, size=3)
        image[m] = 0.75 * colour + 0.25 * image[m]
        objects.append((kind, m))
    return image.astype(np.uint8), objects


def make_dataset(
    out: str | Path,
    *,
    n_images: int = 12,
    seed: int = 0,
    min_side: int = 160,
    max_side: int = 320,
    max_objects: int = 6,
    kind: str = "instance",
) -> Path:
    """Write a synthetic dataset in the folder layout and return ``out``.

    Args:
        out: folder to create; ``images/`` and ``masks/`` go inside.
        n_images: number of images (stems ``img000``, ``img001``, ...).
        seed: everything is a function of this seed.
        min_side, max_side: each image's height and width are drawn independently in this range.
        max_objects: each image has 1 to ``max_objects`` shapes.
        kind: ``"instance"`` writes instance maps, ``"semantic"`` class maps (see the module docstring).
    """
    if kind not in ("instance", "semantic"):
        raise ValueError(f"kind must be 'instance' or 'semantic', got {kind!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        image, objects = make_image(rng, h, w, int(rng.integers(1, max_objects + 1)))
        label = np.zeros((h, w), np.uint8)
        for k, (class_id, m) in enumerate(objects, start=1):
            label[m] = class_id if kind == "semantic" else k
        Image.fromarray(image).save(out / "images" / f"img{i:03d}.png")
        Image.fromarray(label).save(out / "masks" / f"img{i:03d}.png")
    return out
