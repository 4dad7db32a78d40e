"""Measure candidate stored mask forms on a dataset: bytes on disk and time to give the ``input`` frame.

``python -m embedcache.mask_formats DATA --mask-kind instance [--model vit_b]`` prints one row per form, in
the input frame of the model's preset (1024 for SAM, 256 for LiteMedSAM). The figures that chose the cache's
form are in docs/cache-format.md. Forms:

- ``crop-bits``: box crop, bit-packed, ragged, zstd (what the cache stores).
- ``crop-bits+input``: the same, plus a second copy already in the input frame (box crop, bit-packed).
- ``coco-rle``: pycocotools compressed RLE of the full original frame, per object.
- ``label-map``: one zstd-compressed label map per image (objects must not overlap).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from numcodecs import Zstd
from pycocotools import mask as mask_utils

from embedcache import masks as mk
from embedcache.prepare import collect_metadata
from embedcache.presets import MODEL_TYPES, get_preset
from embedcache.readers import FolderReader

ZSTD = Zstd(level=0)  # zarr v3's default compressor settings for the cache's small arrays


def _timeit(fn, n: int, repeat: int = 3) -> float:
    """Median seconds per call over ``repeat`` runs of ``fn(k)`` for k in range(n)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for k in range(n):
            fn(k)
        times.append((time.perf_counter() - t) / n)
    return float(np.median(times))


def measure(data: Path, mask_kind: str, model: str = "vit_b") -> list[dict]:
    """One dict per form: total bytes, bytes/object, ms per object for the input and original frames, in the
    input frame of ``model``'s preset."""
    preset = get_preset(model)
    side = preset.image_size
    reader = FolderReader(data, mask_kind=mask_kind)
    scan = reader.scan()
    meta, _ = collect_metadata(
        reader,
        scan.records,
        scan_bad=scan.bad,
        skip_bad=True,
        val_fraction=0,
        seed=0,
        workers=4,
        preset=preset,
    )
    box = meta["objects/box"].astype(np.int64)
    img = meta["objects/image_index"]
    orig = meta["original_size"]
    inp = meta["input_size"]
    off = meta["objects/mask_offset"]
    bits = meta["objects/mask_bits"]
    m = len(box)
    crops = [mk.unpack(bits[off[j] : off[j + 1]], box[j]) for j in range(m)]
    out = np.zeros((side, side), bool)
    rows = []
    fixed = m * (4 * 4 + 8 + 4 + 8 + 8)  # box f32x4, image i64, class i32, area i64, offset i64

    def input_crop_bits(j):
        return mk.crop_to_input(crops[j], box[j], tuple(orig[img[j]]), tuple(inp[img[j]]), side=side)

    # crop-bits
    def read_a(j):
        out[:] = False
        c = mk.unpack(bits[off[j] : off[j + 1]], box[j])
        mk.crop_to_input(c, box[j], tuple(orig[img[j]]), tuple(inp[img[j]]), side=side, out=out)

    def read_a_orig(j):
        mk.crop_to_original(mk.unpack(bits[off[j] : off[j + 1]], box[j]), box[j], tuple(orig[img[j]]))

    size_a = len(ZSTD.encode(bits)) + fixed
    rows.append(
        dict(form="crop-bits", bytes=size_a, input_ms=_timeit(read_a, m), original_ms=_timeit(read_a_orig, m))
    )

    # crop-bits + a stored input-frame copy
    in_boxes, in_bits = [], []
    for j in range(m):
        full = input_crop_bits(j)
        b = mk.mask_box(full) or (0, 0, 1, 1)
        in_boxes.append(b)
        in_bits.append(mk.pack(full, b))
    in_off = np.r_[0, np.cumsum([x.size for x in in_bits])]
    in_cat = np.concatenate(in_bits)

    def read_b(j):
        out[:] = False
        x1, y1, x2, y2 = in_boxes[j]
        out[y1:y2, x1:x2] = mk.unpack(in_cat[in_off[j] : in_off[j + 1]], in_boxes[j])

    size_b = size_a + len(ZSTD.encode(in_cat)) + m * (16 + 8)
    rows.append(
        dict(
            form="crop-bits+input",
            bytes=size_b,
            input_ms=_timeit(read_b, m),
            original_ms=rows[0]["original_ms"],
        )
    )

    # COCO RLE of the full original frame
    rles = []
    for j in range(m):
        h, w = orig[img[j]]
        full = np.zeros((h, w), np.uint8, order="F")
        x1, y1, x2, y2 = box[j]
        full[y1:y2, x1:x2] = crops[j]
        rles.append(mask_utils.encode(full))
    size_c = sum(len(r["counts"]) for r in rles) + fixed

    def read_c_orig(j):
        return mask_utils.decode(rles[j]).astype(bool)

    def read_c(j):
        full = read_c_orig(j)
        h, w = inp[img[j]]
        out[:] = False
        out[:h, :w] = full[np.ix_(mk.nearest_index(full.shape[0], h), mk.nearest_index(full.shape[1], w))]

    rows.append(
        dict(form="coco-rle", bytes=size_c, input_ms=_timeit(read_c, m), original_ms=_timeit(read_c_orig, m))
    )

    # one label map per image
    overlap = False
    maps = []
    obj_label = np.zeros(m, np.int64)
    for i, (h, w) in enumerate(orig):
        lab = np.zeros((h, w), np.uint16)
        for n, j in enumerate(np.flatnonzero(img == i), start=1):
            x1, y1, x2, y2 = box[j]
            overlap |= bool((lab[y1:y2, x1:x2][crops[j]] != 0).any())
            lab[y1:y2, x1:x2][crops[j]] = n
            obj_label[j] = n
        maps.append(ZSTD.encode(lab))
    size_d = sum(len(x) for x in maps) + fixed

    def read_d_orig(j):
        h, w = orig[img[j]]
        lab = np.frombuffer(ZSTD.decode(maps[img[j]]), np.uint16).reshape(h, w)
        return lab == obj_label[j]

    def read_d(j):
        full = read_d_orig(j)
        h, w = inp[img[j]]
        out[:] = False
        out[:h, :w] = full[np.ix_(mk.nearest_index(full.shape[0], h), mk.nearest_index(full.shape[1], w))]

    note = " (objects overlap: lossy)" if overlap else ""
    rows.append(
        dict(
            form="label-map" + note,
            bytes=size_d,
            input_ms=_timeit(read_d, m),
            original_ms=_timeit(read_d_orig, m),
        )
    )
    for r in rows:
        r.update(objects=m, bytes_per_object=r["bytes"] / m)
        r["input_ms"] *= 1e3
        r["original_ms"] *= 1e3
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--mask-kind", default="instance")
    p.add_argument(
        "--model", default="vit_b", choices=MODEL_TYPES, help="preset whose input frame is measured"
    )
    args = p.parse_args(argv)
    rows = measure(args.data, args.mask_kind, args.model)
    print(f"{args.data} ({rows[0]['objects']} objects, {args.model} input frame)")
    print(f"{'form':<20} {'bytes':>10} {'B/object':>9} {'input ms/obj':>13} {'original ms/obj':>16}")
    for r in rows:
        print(
            f"{r['form']:<20} {r['bytes']:>10} {r['bytes_per_object']:>9.1f} {r['input_ms']:>13.3f} "
            f"{r['original_ms']:>16.3f}"
        )


if __name__ == "__main__":
    main()
