"""The metadata pass: decode every image and mask once, validate them, and build the per-image and per-object
arrays (everything in the cache but the embeddings).

Every image is decoded in full here, so a truncated file is found before any encoding starts and the image
count N is final before the embeddings array is created. Bad items are collected, not raised one by one, so a
failing build names all of them at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from embedcache import masks as mk
from embedcache.images import DEFAULT_MAX_PIXELS, BadInput, check_pixels, load_image
from embedcache.presets import Preset
from embedcache.readers import ImageRecord, Reader
from embedcache.split import assign_split


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


def _examine(reader: Reader, record: ImageRecord, preset: Preset, max_pixels: int):
    """Decode one image and its objects -> (record, (H, W), objects) or a bad-item dict."""
    try:
        for path in (record.image_path, record.mask_path):
            if path is not None:
                check_pixels(path, max_pixels)  # from the header, before anything is decoded
        image = load_image(record.image_path)
        hw = image.shape[:2]
        if min(preset.input_hw(*hw)) < 1:  # e.g. 1x4000: the encoder cannot take a 0-pixel side
            raise BadInput(
                record.image_path,
                f"{hw[1]}x{hw[0]} pixels resizes to {preset.input_hw(*hw)[::-1]} (WxH) at {preset.name}'s "
                "input size: too thin to encode",
            )
        objects = reader.read_objects(record, hw)
        return record, hw, objects
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
) -> tuple[dict, list[dict]]:
    """Run the metadata pass. Returns ``(meta, skipped)``; raises ``BadDataError`` unless ``skip_bad``.

    ``max_pixels`` bounds ``H * W`` of every image and mask (checked from the file header).

    ``meta`` maps the layout's array names (see ``embedcache.store``) to numpy arrays.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embedcache-meta") as pool:
        results = list(pool.map(lambda r: _examine(reader, r, preset, max_pixels), records))
    bad = list(scan_bad) + [r for r in results if isinstance(r, dict)]
    if bad and not skip_bad:
        raise BadDataError(bad)
    good = [r for r in results if not isinstance(r, dict)]
    if not good:
        raise BadDataError(bad or [{"path": str(reader.root), "reason": "no images found"}])

    root = Path(reader.root).resolve()
    image_id, image_path, original, inputs = [], [], [], []
    obj_image, obj_box, obj_class, obj_area, bits, offsets = [], [], [], [], [], [0]
    in_box, in_area, in_bits, in_offsets = [], [], [], [0]
    for i, (record, hw, objects) in enumerate(good):
        image_id.append(record.image_id)
        p = record.image_path.resolve()
        image_path.append(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p))
        original.append(hw)
        inputs.append(preset.input_hw(*hw))
        for o in objects:
            packed = np.packbits(o.crop.ravel())
            obj_image.append(i)
            obj_box.append(o.box)
            obj_class.append(o.class_id)
            obj_area.append(o.area)
            bits.append(packed)
            offsets.append(offsets[-1] + packed.size)
            # the input-frame copy: derivable, but stored because the trainer reads it every step
            # (docs/cache-format.md: 3-7x faster reads for ~1% more disk)
            box_in, packed_in = input_frame_form(o.crop, o.box, hw, inputs[-1])
            in_box.append(box_in)
            in_area.append(int(np.unpackbits(packed_in).sum()))
            in_bits.append(packed_in)
            in_offsets.append(in_offsets[-1] + packed_in.size)
    meta = {
        "image_id": np.array(image_id, dtype=str),
        "image_path": np.array(image_path, dtype=str),
        "original_size": np.array(original, np.int32).reshape(-1, 2),
        "input_size": np.array(inputs, np.int32).reshape(-1, 2),
        "split": assign_split(image_id, val_fraction, seed),
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
    return meta, bad
