"""A small annotated dataset that samtune generates itself, for tests, demos and benches.

Two scenes:

- ``shapes`` (tests, benches): a few non-overlapping shapes (ellipses, rectangles, triangles) on a noisy
  textured background. Each shape kind has its own colour, so a class is learnable from appearance.
- ``cells`` (``trainer demo``): a fluorescence-microscopy-like field of cells, each a dim irregular cytoplasm
  around a bright off-centre nucleus; the object is the whole cell (class 1). A box-trained model shown a
  cell's box tends to pick the salient nucleus, so the annotation convention is something tuning must teach.

The sizes vary so that the images have odd aspect ratios. The layout is the folder layout that ``embedcache
build`` reads: ``OUT/images/<stem>.png`` (RGB, 8-bit) and ``OUT/masks/<stem>.png`` (8-bit), where the mask is
an instance map (0 background, 1..K objects) or, with ``kind="semantic"``, a class map (0 background, then
the class ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage

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


def make_cells_image(rng: np.random.Generator, h: int, w: int, n_objects: int) -> tuple[np.ndarray, list]:
    """One ``(h, w, 3)`` uint8 fluorescence-like image of up to ``n_objects`` cells, and its objects, a list
    of ``(1, (h, w) bool mask)`` (the whole cell).

    A cell's outline is a circle whose radius wobbles with three low harmonics; its nucleus is a bright
    ellipse inside it, off centre. Cells keep at least one pixel apart. The image is blurred (the optics),
    then gets a smooth uneven background and pixel noise, and is shown in a green colour map.
    """
    yy, xx = np.mgrid[0:h, 0:w]
    grey = np.full((h, w), rng.uniform(15, 35))
    taken = np.zeros((h, w), bool)
    objects = []
    for _ in range(n_objects * 30):  # rejection sampling for cells that do not touch
        if len(objects) == n_objects:
            break
        r = rng.uniform(0.07, 0.14) * min(h, w)
        cy, cx = rng.uniform(1.4 * r, h - 1.4 * r), rng.uniform(1.4 * r, w - 1.4 * r)
        angle = np.arctan2(yy - cy, xx - cx)
        radius = r + sum(
            r * rng.uniform(0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
        )
        cell = np.hypot(yy - cy, xx - cx) <= radius
        if (cell & ndimage.binary_dilation(taken)).any():
            continue
        taken |= cell
        grey[cell] = rng.uniform(55, 95)
        nr = r * rng.uniform(0.35, 0.5)
        ny, nx = cy + rng.uniform(-0.3, 0.3) * r, cx + rng.uniform(-0.3, 0.3) * r
        nucleus = ((yy - ny) / nr) ** 2 + ((xx - nx) / (nr * rng.uniform(0.7, 1.0))) ** 2 <= 1.0
        grey[nucleus & cell] = rng.uniform(170, 230)
        objects.append((1, cell))
    grey = ndimage.gaussian_filter(grey, 1.5)
    grey += ndimage.gaussian_filter(rng.normal(0, 25, (h, w)), 2) + rng.normal(0, 8, (h, w))
    grey = np.clip(grey, 0, 255)
    image = np.stack([0.3 * grey, grey, 0.5 * grey], axis=-1)
    return image.astype(np.uint8), objects


SCENES = {"shapes": make_image, "cells": make_cells_image}
"""Scene name -> its image generator ``(rng, h, w, n_objects) -> (image, objects)``."""


def make_dataset(
    out: str | Path,
    *,
    n_images: int = 12,
    seed: int = 0,
    min_side: int = 160,
    max_side: int = 320,
    max_objects: int = 6,
    kind: str = "instance",
    scene: Literal["shapes", "cells"] = "shapes",
) -> Path:
    """Write a synthetic dataset in the folder layout and return ``out``.

    Args:
        out: folder to create; ``images/`` and ``masks/`` go inside.
        n_images: number of images (stems ``img000``, ``img001``, ...).
        seed: everything is a function of this seed.
        min_side, max_side: each image's height and width are drawn independently in this range.
        max_objects: each image has 1 to ``max_objects`` shapes.
        kind: ``"instance"`` writes instance maps, ``"semantic"`` class maps (see the module docstring).
        scene: ``"shapes"`` or ``"cells"`` (see the module docstring).
    """
    if kind not in ("instance", "semantic"):
        raise ValueError(f"kind must be 'instance' or 'semantic', got {kind!r}")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {', '.join(SCENES)}, got {scene!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        image, objects = SCENES[scene](rng, h, w, int(rng.integers(1, max_objects + 1)))
        label = np.zeros((h, w), np.uint8)
        for k, (class_id, m) in enumerate(objects, start=1):
            label[m] = class_id if kind == "semantic" else k
        Image.fromarray(image).save(out / "images" / f"img{i:03d}.png")
        Image.fromarray(label).save(out / "masks" / f"img{i:03d}.png")
    return out
