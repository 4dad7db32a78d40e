"""The metadata pass: decode every image and mask once, validate them, and build the per-image and per-object
arrays (everything in the cache but the embeddings).

Every image is decoded in full here, so a truncated file is found before any encoding starts and the image
count N is final before the embeddings array is created. Bad items are collected, not raised one by one, so a
failing build names all of them at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedcache import masks as mk
from embedcache.images import DEFAULT_MAX_PIXELS, BadInput, check_pixels, load_image, printable
from embedcache.presets import Preset
from embedcache.readers import ImageRecord, ObjectMask, Reader
from embedcache.split import assign_split

DEFAULT_MIN_OBJECT_AREA = 10
"""Objects below this many original pixels are dropped and counted in the build report. Measured: a binary
mask of two discs saved as JPEG (quality 50, 75, 90, 95) breaks into 261-403 components, 96-99% of them
under 10 pixels; the smallest real object in the shared data is a 20-pixel isbi2012 cell, and kvasir5's only
object under 10 pixels is a 1-pixel speck. ``--min-object-area 1`` keeps everything."""


class BadDataError(ValueError):
    """The dataset has bad items and ``skip_bad`` is off; the message lists them, one file per line."""

    def __init__(self, bad: list[dict]):
        lines = [f"  {b['path']}: {b['reason']}" for b in bad[:50]]
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        super().__init__(
            f"{len(bad)} bad input item(s); fix them or pass --skip-bad to leave them out:\n"
            + "\n".join(lines)
            + more
        )
        self.bad = bad


@dataclass(frozen=True, kw_only=True)
class Examined:
    """One image that passed the metadata pass's checks."""

    record: ImageRecord
    hw: tuple[int, int]
    """(H, W) of the image as read."""
    objects: list[ObjectMask]
    """Its objects of at least ``min_object_area`` pixels."""
    dropped_small: int
    """Objects left out for being below ``min_object_area``."""
    unclean: str | None
    """The reader's note on a mask whose values are not clean, or None."""
    ignore: ObjectMask | None = None
    """The pixels to neither train nor score (``ImageObjects.ignore``), or None."""


def _examine(
    reader: Reader, record: ImageRecord, preset: Preset, max_pixels: int, min_object_area: int, channels
):
    """Decode one image (``channels``: ``load_image``'s mapping) and its objects -> an ``Examined``, or a
    bad-item dict."""
    try:
        for path in (record.image_path, record.mask_path):
            if path is not None:
                check_pixels(path, max_pixels)  # from the header, before anything is decoded
        image = load_image(record.image_path, channels)
        hw = image.shape[:2]
        if min(preset.input_hw(*hw)) < 1:  # e.g. 1x4000: the encoder cannot take a 0-pixel side
            raise BadInput(
                record.image_path,
                f"{hw[1]}x{hw[0]} pixels resizes to {preset.input_hw(*hw)[::-1]} (WxH) at {preset.name}'s "
                "input size: too thin to encode",
            )
        found = reader.read_objects(record, hw)
        # an image may end up without objects (docs/datasets.md): kept, and listed in the build report
        objects = [o for o in found.objects if o.area >= min_object_area]
        dropped = len(found.objects) - len(objects)
        return Examined(
            record=record,
            hw=hw,
            objects=objects,
            dropped_small=dropped,
            unclean=found.unclean,
            ignore=found.ignore,
        )
    except BadInput as e:
        return {"path": e.path, "reason": e.reason}


def input_frame_form(crop: np.ndarray, box, hw, in_hw) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """An object's input-frame mask in stored form: its tight input-frame box (xyxy; all zero when the object
    vanishes under the nearest rule) and the bit-packed crop inside it."""
    (r0, _, c0, _), small = mk.input_crop(crop, box, hw, in_hw)
    tight = mk.mask_box(small)
    if tight is None:
        return (0, 0, 0, 0), np.zeros(0, np.uint8)
    x1, y1, x2, y2 = tight
    return (x1 + c0, y1 + r0, x2 + c0, y2 + r0), mk.pack(small, tight)


def collect_metadata(
    reader: Reader,
    records: list[ImageRecord],
    *,
    scan_bad: list[dict],
    skip_bad: bool,
    val_fraction: float,
    seed: int,
    workers: int,
    preset: Preset,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_object_area: int = DEFAULT_MIN_OBJECT_AREA,
    channels: tuple[int, int, int] | None = None,
) -> tuple[dict, dict]:
    """Run the metadata pass. Returns ``(meta, report)``; raises ``BadDataError`` unless ``skip_bad``, and
    ``ValueError`` when no image has an object, or every object vanishes at the preset's input size (nothing
    would be left to train on). An image without objects is kept (``images_without_objects``).

    ``max_pixels`` bounds ``H * W`` of every image and mask (checked from the file header);
    ``min_object_area`` is the smallest object kept, in original pixels; ``channels`` maps images whose
    channels are not declared grey or RGB (``embedcache.images.map_channels``).

    ``meta`` maps the layout's array names (see ``embedcache.store``) to numpy arrays; the ``ignore/`` ones
    only when the reader has an ignore index. ``report`` holds
    ``skipped`` (bad items left out), ``min_object_area``, ``objects_below_min_area`` and
    ``objects_vanished`` (``{"count", "images": [{"path", "objects"}]}``), ``images_without_objects``
    (``{"count", "paths"}``, every image the mask or annotations give no object, or whose objects are all
    below ``min_object_area``) and ``unclean_masks`` (``[{"path", "reason"}]``).
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embedcache-meta") as pool:
        results = list(
            pool.map(lambda r: _examine(reader, r, preset, max_pixels, min_object_area, channels), records)
        )
    bad = list(scan_bad) + [r for r in results if isinstance(r, dict)]
    if bad and not skip_bad:
        raise BadDataError(bad)
    good = [r for r in results if not isinstance(r, dict)]
    if not good:
        raise BadDataError(bad or [{"path": str(reader.root), "reason": "no images found"}])
    meta = _arrays(good, Path(reader.root), preset)
    if reader.describe().get("ignore_index") is not None:
        meta.update(_ignore_arrays(good, meta))
    meta["split"] = assign_split(meta["image_id"].tolist(), val_fraction, seed)
    if not len(meta["objects/area"]):
        small = sum(e.dropped_small for e in good)
        raise ValueError(
            f"{reader.root}: none of the {len(good)} image(s) has an object"
            + (f" ({small} object(s) are below --min-object-area {min_object_area} pixels)" if small else "")
            + ", so the cache would hold nothing to train on; check the masks (or --mask-kind, --coco)"
        )
    vanished = _vanished(good, meta)
    if vanished["count"] == len(meta["objects/area"]):
        largest = int(meta["objects/area"].max())
        raise ValueError(
            f"{reader.root}: all {vanished['count']} object(s) vanish at {preset.name}'s input size (the "
            f"largest has {largest} pixels in its image and none in the input frame), so the cache would "
            "hold nothing to train on; crop or tile the images, or use a preset with a larger input"
        )
    report = {
        "skipped": bad,
        "min_object_area": min_object_area,
        "objects_below_min_area": _per_image(
            {e.record.mask_path or e.record.image_path: e.dropped_small for e in good}
        ),
        "objects_vanished": vanished,
        "images_without_objects": _without_objects(good),
        "unclean_masks": [
            {"path": printable(e.record.mask_path or e.record.image_path), "reason": e.unclean}
            for e in good
            if e.unclean is not None
        ],
    }
    return meta, report


def _per_image(counts: dict[Path, int]) -> dict:
    """``{"count": total, "images": [{"path", "objects"}]}`` over the images with a non-zero count."""
    images = [{"path": printable(p), "objects": int(k)} for p, k in counts.items() if k]
    return {"count": sum(i["objects"] for i in images), "images": images}


def _without_objects(good: list[Examined]) -> dict:
    """``{"count", "paths"}`` of the images left without any object (at most 100 paths listed)."""
    paths = [printable(e.record.mask_path or e.record.image_path) for e in good if not e.objects]
    return {"count": len(paths), "paths": paths[:100]}


def _vanished(good: list[Examined], meta: dict) -> dict:
    """The objects with no pixel left in the input frame, per image (``_per_image``)."""
    gone = np.bincount(
        meta["objects/image_index"][meta["objects/input_area"] == 0], minlength=len(good)
    ).tolist()
    return _per_image({e.record.image_path: k for e, k in zip(good, gone)})


def _ignore_arrays(good: list[Examined], meta: dict) -> dict:
    """The ``ignore/`` arrays: each image's ignore region in the original and the input frame, stored as an
    object's mask is (all-zero boxes and no bytes for an image without one)."""
    box, bits, offsets, in_box, in_bits, in_offsets = [], [], [0], [], [], [0]
    for e, in_hw in zip(good, meta["input_size"]):
        if e.ignore is None:
            box_o = box_in = (0, 0, 0, 0)
            packed = packed_in = np.zeros(0, np.uint8)
        else:
            box_o, packed = e.ignore.box, np.packbits(e.ignore.crop.ravel())
            box_in, packed_in = input_frame_form(e.ignore.crop, e.ignore.box, e.hw, tuple(in_hw))
        box.append(box_o)
        bits.append(packed)
        offsets.append(offsets[-1] + packed.size)
        in_box.append(box_in)
        in_bits.append(packed_in)
        in_offsets.append(in_offsets[-1] + packed_in.size)
    return {
        "ignore/box": np.array(box, np.int32).reshape(-1, 4),
        "ignore/mask_offset": np.array(offsets, np.int64),
        "ignore/mask_bits": np.concatenate(bits),
        "ignore/input_box": np.array(in_box, np.int32).reshape(-1, 4),
        "ignore/input_mask_offset": np.array(in_offsets, np.int64),
        "ignore/input_mask_bits": np.concatenate(in_bits),
    }


def _arrays(good: list[Examined], root: Path, preset: Preset) -> dict:
    """Every array of the layout but ``split`` and the embeddings, from the examined images.

    Image paths are stored relative to ``root`` as the dataset names them (the readers keep every record
    inside it), so no local path outside the data folder reaches the cache."""
    image_id, image_path, original, inputs = [], [], [], []
    obj_image, obj_box, obj_class, obj_area, bits, offsets = [], [], [], [], [], [0]
    in_box, in_area, in_bits, in_offsets = [], [], [], [0]
    for i, e in enumerate(good):
        image_id.append(e.record.image_id)
        image_path.append(e.record.image_path.relative_to(root).as_posix())
        original.append(e.hw)
        inputs.append(preset.input_hw(*e.hw))
        for o in e.objects:
            packed = np.packbits(o.crop.ravel())
            obj_image.append(i)
            obj_box.append(o.box)
            obj_class.append(o.class_id)
            obj_area.append(o.area)
            bits.append(packed)
            offsets.append(offsets[-1] + packed.size)
            # the input-frame copy: derivable, but stored because the trainer reads it every step
            # (docs/cache-format.md: 3-7x faster reads for ~1% more disk)
            box_in, packed_in = input_frame_form(o.crop, o.box, e.hw, inputs[-1])
            in_box.append(box_in)
            in_area.append(int(np.unpackbits(packed_in).sum()))
            in_bits.append(packed_in)
            in_offsets.append(in_offsets[-1] + packed_in.size)
    return {
        "image_id": np.array(image_id, dtype=str),
        "image_path": np.array(image_path, dtype=str),
        "original_size": np.array(original, np.int32).reshape(-1, 2),
        "input_size": np.array(inputs, np.int32).reshape(-1, 2),
        "objects/image_index": np.array(obj_image, np.int64),
        "objects/box": np.array(obj_box, np.float32).reshape(-1, 4),
        "objects/class_id": np.array(obj_class, np.int32),
        "objects/area": np.array(obj_area, np.int64),
        "objects/mask_offset": np.array(offsets, np.int64),
        "objects/mask_bits": np.concatenate(bits) if bits else np.zeros(0, np.uint8),
        "objects/input_box": np.array(in_box, np.int32).reshape(-1, 4),
        "objects/input_area": np.array(in_area, np.int64),
        "objects/input_mask_offset": np.array(in_offsets, np.int64),
        "objects/input_mask_bits": np.concatenate(in_bits) if in_bits else np.zeros(0, np.uint8),
    }
