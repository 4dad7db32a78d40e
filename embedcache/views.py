"""Cached augmentation views: exact geometric transforms of an image, encoded once each at build time.

A view is one element of the dihedral group D4 acting on the image as read (the original frame), before SAM's
resize and bottom-right padding, so every view is an ordinary image to the encoder: its content starts at the
top-left and its own input size follows the preset's rule (a 90-degree turn swaps H and W). Its objects are
the identity's objects transformed with it:

- original frame: the box crop is transformed as the image is (exact: a permutation of pixels), and the box
  is mapped to its image under the transform;
- input frame: re-derived from that original-frame crop by the same nearest rule as any image
  (``embedcache.masks``). The rule is not flip-equivariant (ties round one way), so the input frame of a
  view is *not* the flipped input frame of the identity, and is stored per view.

The object count, order, classes and original-frame areas are those of the identity. A view is written as
``(transpose, flip_rows, flip_cols)`` applied in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedcache import masks as mk
from embedcache.presets import Preset

IDENTITY = "identity"


@dataclass(frozen=True)
class View:
    """One D4 transform of an ``(H, W, ...)`` array: transpose first (when set), then flip rows, then
    columns."""

    name: str
    transpose: bool
    flip_rows: bool
    flip_cols: bool

    def apply(self, a: np.ndarray) -> np.ndarray:
        """``(H, W, ...)`` -> ``(H', W', ...)`` (``(W, H, ...)`` when the view transposes), contiguous."""
        if self.transpose:
            a = a.swapaxes(0, 1)
        if self.flip_rows:
            a = a[::-1]
        if self.flip_cols:
            a = a[:, ::-1]
        return np.ascontiguousarray(a)

    def hw(self, h: int, w: int) -> tuple[int, int]:
        """Size ``(H', W')`` of the transformed ``(H, W)`` image."""
        return (w, h) if self.transpose else (h, w)

    def box(self, box, h: int, w: int) -> tuple[int, int, int, int]:
        """xyxy box (x2, y2 exclusive) in an ``(H, W)`` image -> the box of the same pixels in the view."""
        x1, y1, x2, y2 = (int(v) for v in box)
        if self.transpose:
            x1, y1, x2, y2, h, w = y1, x1, y2, x2, w, h
        if self.flip_rows:
            y1, y2 = h - y2, h - y1
        if self.flip_cols:
            x1, x2 = w - x2, w - x1
        return x1, y1, x2, y2


VIEWS = {
    v.name: v
    for v in (
        View(IDENTITY, False, False, False),
        View("hflip", False, False, True),
        View("vflip", False, True, False),
        View("rot180", False, True, True),
        View("transpose", True, False, False),
        View("rot90", True, True, False),  # np.rot90(a, 1): counter-clockwise
        View("rot270", True, False, True),  # np.rot90(a, -1): clockwise
        View("antitranspose", True, True, True),
    )
}
PRESETS = {"none": (IDENTITY,), "flips": (IDENTITY, "hflip", "vflip"), "d4": tuple(VIEWS)}
"""``--views`` names: ``d4`` is the whole group (the 4 rotations and the 4 reflections)."""


def parse_views(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``none`` | ``flips`` | ``d4`` | a comma list of view names -> the views, identity first, each once."""
    if isinstance(spec, str):
        names = PRESETS.get(spec) or tuple(s.strip() for s in spec.split(",") if s.strip())
    else:
        names = tuple(spec)
    unknown = [n for n in names if n not in VIEWS]
    if unknown:
        raise ValueError(
            f"unknown view(s) {unknown}: use none, flips, d4 or a comma list of {', '.join(VIEWS)}"
        )
    return (IDENTITY, *dict.fromkeys(n for n in names if n != IDENTITY))


def cache_views(signature: dict) -> tuple[str, ...]:
    """The views a cache holds, identity first; caches built before views hold the identity only."""
    return tuple(signature.get("views", (IDENTITY,)))


def _ragged(prefix: str, crops, boxes, hws, in_hws) -> dict:
    """A ragged mask group's arrays (``objects/`` or ``ignore/``) from view-frame crops and boxes; an empty
    crop (``None``) is stored as the all-zero box without bytes, as the identity stores it."""
    box, bits, offsets, in_box, in_area, in_bits, in_offsets = [], [], [0], [], [], [], [0]
    for crop, b, hw, in_hw in zip(crops, boxes, hws, in_hws):
        if crop is None:
            b_in, packed, packed_in = (0, 0, 0, 0), np.zeros(0, np.uint8), np.zeros(0, np.uint8)
        else:
            packed = np.packbits(crop.ravel())
            (r0, _, c0, _), small = mk.input_crop(crop, b, hw, in_hw)
            tight = mk.mask_box(small)
            if tight is None:
                b_in, packed_in = (0, 0, 0, 0), np.zeros(0, np.uint8)
            else:
                x1, y1, x2, y2 = tight
                b_in, packed_in = (x1 + c0, y1 + r0, x2 + c0, y2 + r0), mk.pack(small, tight)
        box.append(b)
        bits.append(packed)
        offsets.append(offsets[-1] + packed.size)
        in_box.append(b_in)
        in_area.append(int(np.unpackbits(packed_in).sum()))
        in_bits.append(packed_in)
        in_offsets.append(in_offsets[-1] + packed_in.size)
    out = {
        f"{prefix}/box": np.array(box, np.float32 if prefix == "objects" else np.int32).reshape(-1, 4),
        f"{prefix}/mask_offset": np.array(offsets, np.int64),
        f"{prefix}/mask_bits": np.concatenate(bits) if bits else np.zeros(0, np.uint8),
        f"{prefix}/input_box": np.array(in_box, np.int32).reshape(-1, 4),
        f"{prefix}/input_mask_offset": np.array(in_offsets, np.int64),
        f"{prefix}/input_mask_bits": np.concatenate(in_bits) if in_bits else np.zeros(0, np.uint8),
    }
    if prefix == "objects":
        out["objects/input_area"] = np.array(in_area, np.int64)
    return out


VIEW_ARRAYS = ("original_size", "input_size")
"""Per-image arrays a view stores itself (with its ``objects/`` and ``ignore/`` mask arrays and embeddings);
``image_id``, ``image_path``, ``split`` and ``objects/{image_index, class_id, area}`` are the identity's."""


def view_metadata(meta: dict, view: View, preset: Preset) -> dict:
    """The arrays of ``view`` (``VIEW_ARRAYS`` and the ``objects/`` and ``ignore/`` mask arrays, named as in
    the identity's ``meta``) from the identity's metadata ``meta``."""
    hw = meta["original_size"].reshape(-1, 2)
    vhw = np.array([view.hw(int(h), int(w)) for h, w in hw], np.int32).reshape(-1, 2)
    in_hw = np.array([preset.input_hw(int(h), int(w)) for h, w in vhw], np.int32).reshape(-1, 2)
    out = {"original_size": vhw, "input_size": in_hw}
    for prefix, image_of in (
        ("objects", meta["objects/image_index"]),
        ("ignore", np.arange(len(hw))),
    ):
        if f"{prefix}/box" not in meta:
            continue
        crops, boxes = [], []
        for j, i in enumerate(image_of):
            b = meta[f"{prefix}/box"][j]
            off = meta[f"{prefix}/mask_offset"]
            if not np.any(b):  # an image without an ignore region
                crops.append(None)
                boxes.append((0, 0, 0, 0))
                continue
            crop = mk.unpack(meta[f"{prefix}/mask_bits"][off[j] : off[j + 1]], b)
            crops.append(view.apply(crop))
            boxes.append(view.box(b, int(hw[i, 0]), int(hw[i, 1])))
        out.update(_ragged(prefix, crops, boxes, vhw[image_of], in_hw[image_of]))
    return out
