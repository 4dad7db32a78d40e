"""The cheap structural checks ``open_cache`` runs on every cache it opens.

They read only what opening has already loaded (the per-image and per-object arrays) and the array shapes
in the metadata, so they cost milliseconds: every length agrees with N images and M objects,
``objects/image_index`` is sorted and in range, every box lies in its image, and every object's mask bytes
fit its box. ``embedcache verify`` adds the expensive checks (every chunk read, every mask re-derived).
"""

from __future__ import annotations

import numpy as np

from embedcache.store import EMBED_SHAPE, num_shards

SPLITS = ("train", "val")


def _lengths(c) -> list[str]:
    """Every per-image array has N rows, every per-object array M, every offset array M + 1."""
    n, m, o = c.num_images, c.num_objects, c.objects
    want = {
        "original_size": (c.original_size, n),
        "input_size": (c.input_size, n),
        "image_id": (c.image_id, n),
        "image_path": (c.image_path, n),
        "split": (c.split, n),
        "objects/box": (o.box, m),
        "objects/class_id": (o.class_id, m),
        "objects/area": (o.area, m),
        "objects/input_area": (o.input_area, m),
        "objects/input_box": (c._input_box, m),
        "objects/mask_offset": (c._mask_offset, m + 1),
        "objects/input_mask_offset": (c._input_offset, m + 1),
    }
    if c._ignore is not None:
        want.update({f"ignore/{name}": (a, n + name.endswith("offset")) for name, a in c._ignore.items()})
    problems = [f"{name}: {len(a)} rows, expected {k}" for name, (a, k) in want.items() if len(a) != k]
    if tuple(c.embeddings.shape[1:]) != EMBED_SHAPE:
        problems.append(f"embeddings: shape {c.embeddings.shape}, expected (N, *{EMBED_SHAPE})")
    if c.tap_tokens is not None and c.tap_tokens.shape[0] != n:
        problems.append(f"tap_tokens: {c.tap_tokens.shape[0]} rows, expected {n}")
    shards = c.group["shard_done"].shape[0]
    if shards != num_shards(n, c.images_per_shard):
        problems.append(f"shard_done: {shards} shards, expected {num_shards(n, c.images_per_shard)}")
    return problems


def _boxes(name: str, box: np.ndarray, hw: np.ndarray, empty_ok: np.ndarray) -> list[str]:
    """``(M, 4)`` xyxy boxes inside their ``(M, 2)`` image sizes, with ``x1 < x2`` and ``y1 < y2``; rows
    flagged in ``empty_ok`` may instead be all zero (an object that vanished in the input frame)."""
    x1, y1, x2, y2 = box.T
    ok = (box == np.round(box)).all(axis=1) & (x1 >= 0) & (x1 < x2) & (x2 <= hw[:, 1])
    ok &= (y1 >= 0) & (y1 < y2) & (y2 <= hw[:, 0])
    ok |= empty_ok & (box == 0).all(axis=1)
    bad = np.flatnonzero(~ok)
    if not bad.size:
        return []
    j = int(bad[0])
    return [f"{name}: {bad.size} box(es) outside their image, e.g. object {j}: {box[j].tolist()}"]


def _mask_bytes(name: str, offsets: np.ndarray, box: np.ndarray, stored: int) -> list[str]:
    """Object j's bytes ``offsets[j]:offsets[j+1]`` are exactly its box's bit-packed size, and the offsets
    end at the ``stored`` length of the bit array."""
    if offsets[0] != 0 or offsets[-1] != stored:
        return [f"{name}: runs from {offsets[0]} to {offsets[-1]}, but the bit array holds {stored} bytes"]
    w = (box[:, 2] - box[:, 0]).astype(np.int64)
    h = (box[:, 3] - box[:, 1]).astype(np.int64)
    bad = np.flatnonzero(np.diff(offsets) != -(-(w * h) // 8))
    if bad.size:
        return [f"{name}: {bad.size} object(s) whose byte count does not fit their box, e.g. object {bad[0]}"]
    return []


def structure_problems(c) -> list[str]:
    """The structural problems of an open ``Cache`` (empty when there are none); see the module docstring."""
    problems = _lengths(c)
    if problems:  # the checks below index one array by another
        return problems
    n, o = c.num_images, c.objects
    index = o.image_index
    if index.size and ((np.diff(index) < 0).any() or index.min() < 0 or index.max() >= n):
        lo, hi = int(index.min()), int(index.max())
        return [f"objects/image_index: not sorted, or outside 0..{n - 1} (holds {lo}..{hi})"]
    if (c.original_size < 1).any() or (c.input_size < 1).any():
        problems.append("original_size/input_size: a side below 1 pixel")
    if not set(c.split.tolist()) <= set(SPLITS):
        problems.append(f"split: values {sorted(set(c.split.tolist()) - set(SPLITS))}, expected train/val")
    problems += _boxes("objects/box", o.box, c.original_size[index], np.zeros(len(index), bool))
    problems += _boxes("objects/input_box", c._input_box, c.input_size[index], o.input_area == 0)
    if problems:
        return problems
    bits = c.group[c.view_prefix + "objects"]
    problems += _mask_bytes("objects/mask_offset", c._mask_offset, o.box, bits["mask_bits"].shape[0])
    problems += _mask_bytes(
        "objects/input_mask_offset", c._input_offset, c._input_box, bits["input_mask_bits"].shape[0]
    )
    if c._ignore is not None:
        problems += _ignore_problems(c)
    return problems


def _ignore_problems(c) -> list[str]:
    """Each image's ignore region (one row per image; all-zero boxes where it has none) lies in its image
    and its bytes fit its box, in both frames."""
    g, bits, problems = c._ignore, c.group[c.view_prefix + "ignore"], []
    for prefix, hw in (("", c.original_size), ("input_", c.input_size)):
        problems += _boxes(f"ignore/{prefix}box", g[f"{prefix}box"], hw, np.ones(len(hw), bool))
        if not problems:
            stored = bits[f"{prefix}mask_bits"].shape[0]
            problems += _mask_bytes(
                f"ignore/{prefix}mask_offset", g[f"{prefix}mask_offset"], g[f"{prefix}box"], stored
            )
    return problems
