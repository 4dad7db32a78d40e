"""COCO-style JSON (``--coco``): images under ``DATA/<file_name>``, objects from polygons or RLE.

Crowd annotations (``iscrowd: 1``) mark regions to ignore, not objects, so they are not stored; their count is
in the build report. ``iscrowd`` must be the integer 0 or 1 (absent means 0); anything else (``"no"``,
``true``, ``1.0``) makes the image a bad item naming the annotation, since a truthy string would otherwise
count as crowd. Objects keep their ``category_id`` as class id and are ordered by annotation id.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import defaultdict
from pathlib import Path, PurePosixPath

import numpy as np
from pycocotools import mask as mask_utils

from embedcache.images import IMAGE_SUFFIXES, BadInput, printable
from embedcache.masks import mask_box
from embedcache.readers.base import (
    ImageObjects,
    ImageRecord,
    ObjectMask,
    ScanResult,
    file_problem,
)

_DECODE_LOCK = threading.Lock()


def _decode_rle(rle: dict) -> np.ndarray:
    """``pycocotools.mask.decode`` without its numpy-2 DeprecationWarning (pycocotools 2.0.11's Cython passes
    ``copy=False`` to an ``__array__`` that predates numpy 2; harmless, but it is not ours to fix). The lock
    keeps the temporary filter from racing with our other decode threads (catch_warnings is process-global).
    """
    with _DECODE_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword")
        return mask_utils.decode(rle)


def rle_string_counts(counts: bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (the format of pycocotools' ``rleFrString``: each
    count in 5-bit groups offset by 48, bit 0x20 = more groups follow, 0x10 of the last group = negative,
    counts from the third on stored as the difference to the count two before). Raises ``ValueError`` on a
    truncated string; pycocotools itself reads past the end and returns a wrong mask."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("compressed RLE ends in the middle of a count (truncated)")
            c = counts[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE holds byte {counts[p]!r}, outside its alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        out.append(x + out[-2] if len(out) > 2 else x)
    return out


def _check_counts(counts: list[int], h: int, w: int) -> None:
    if any(c < 0 for c in counts):
        raise ValueError("RLE holds a negative run length")
    if sum(counts) != h * w:
        raise ValueError(f"RLE run lengths sum to {sum(counts)}, not H*W = {h}*{w} = {h * w}")


def _check_polygon(poly, h: int, w: int) -> None:
    """Finite numbers, at least 3 points, within one image size of the image: pycocotools rasterises each edge
    point by point, so a NaN or huge coordinate asks it for gigabytes (a NaN polygon took 13.7 GB)."""
    if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
        raise ValueError("polygon must be a flat list of at least 3 x, y pairs")
    xy = np.asarray(poly, dtype=np.float64) if all(isinstance(v, int | float) for v in poly) else None
    if xy is None or not np.isfinite(xy).all():
        raise ValueError("polygon coordinates must be finite numbers")
    x, y = xy[0::2], xy[1::2]
    if x.min() < -w or x.max() > 2 * w or y.min() < -h or y.max() > 2 * h:
        raise ValueError(
            f"polygon reaches ({x.min():g}..{x.max():g}, {y.min():g}..{y.max():g}), far outside "
            f"the {w}x{h} image"
        )


def decode_segmentation(segmentation, h: int, w: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed RLE or compressed RLE) -> ``(h, w)`` bool mask.

    Raises ``ValueError`` for anything that does not describe exactly ``h * w`` pixels (see the checks)."""
    if isinstance(segmentation, list):  # polygons: one RLE per polygon, merged
        if not segmentation:
            raise ValueError("empty polygon list")
        for poly in segmentation:
            _check_polygon(poly, h, w)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list | str | bytes):
        if list(segmentation.get("size", ())) != [h, w]:
            raise ValueError(f"RLE size {segmentation.get('size')} differs from image size {[h, w]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) for c in counts):
                raise ValueError("uncompressed RLE counts must be integers")
            _check_counts(counts, h, w)
            rle = mask_utils.frPyObjects(segmentation, h, w)
        else:
            rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            _check_counts(rle_string_counts(rle["counts"]), h, w)
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
    return _decode_rle(rle).astype(bool)


def _image_entry_problem(im) -> str | None:
    """What is wrong with one ``images`` entry, or None."""
    if not isinstance(im, dict):
        return "not an object"
    missing = [k for k in ("id", "file_name", "height", "width") if k not in im]
    if missing:
        return f"no {', '.join(missing)}"
    if not isinstance(im["file_name"], str):
        return f"file_name {im['file_name']!r} is not a string"
    name = PurePosixPath(im["file_name"])
    if name.is_absolute():  # not echoed: a full local path is not to reach the build report
        return "file_name is an absolute path; file names must be relative to the data folder (--data)"
    if not name.parts:
        return "file_name is empty"
    if ".." in name.parts:
        return f"file_name {im['file_name']!r} leaves the data folder (--data); '..' is not allowed"
    for k in ("height", "width"):
        if not isinstance(im[k], int) or im[k] < 1:
            return f"{k} {im[k]!r} is not a positive integer"
    return None


class CocoReader:
    """Reads a COCO JSON whose ``file_name`` entries are relative to ``root``; every one must stay inside
    it (a symlink leading out only with ``allow_outside_symlinks``)."""

    def __init__(self, root: str | Path, coco_json: str | Path, *, allow_outside_symlinks: bool = False):
        self.root = Path(root)
        self.json_path = Path(coco_json)
        self.allow_outside_symlinks = allow_outside_symlinks
        if not self.json_path.is_file():
            raise FileNotFoundError(f"{self.json_path}: COCO JSON not found")
        self.crowd_skipped = 0

    def describe(self) -> dict:
        return {
            "reader": "coco",
            "mask_kind": "coco",
            "ignore_index": None,
            "allow_outside_symlinks": self.allow_outside_symlinks,
        }

    def _file_problem(self, path: Path) -> str | None:
        """Why the image file an entry names cannot be read (``file_problem``, or its name or type), or
        None."""
        if printable(path) != str(path):
            return "file name is not valid UTF-8; rename the file"
        problem = file_problem(self.root, path, allow_outside_symlinks=self.allow_outside_symlinks)
        if problem is None and path.suffix.lower() not in IMAGE_SUFFIXES:
            return f"not a supported image file type ({', '.join(IMAGE_SUFFIXES)})"
        return problem

    def scan(self) -> ScanResult:
        try:
            data = json.loads(self.json_path.read_text())
            images, annotations = data["images"], data.get("annotations", [])
            categories = {c["id"] for c in data["categories"]}
        except Exception as e:
            raise ValueError(f"{self.json_path}: not a COCO JSON ({type(e).__name__}: {e})") from e
        bad: list[dict] = []
        entries = {}  # id -> image entry, the well-formed ones
        id_count, name_count = defaultdict(int), defaultdict(int)
        for n, im in enumerate(images):
            problem = _image_entry_problem(im)
            if problem:
                bad.append({"path": str(self.json_path), "reason": f"images[{n}]: {problem}"})
                continue
            id_count[im["id"]] += 1
            name_count[str(PurePosixPath(im["file_name"]))] += 1
            entries[im["id"]] = im
        anns_by_image = defaultdict(list)
        bad_ann: dict = defaultdict(list)  # image id -> problems of its annotations
        for n, a in enumerate(annotations):
            where = f"annotation {a.get('id', f'#{n}')}" if isinstance(a, dict) else f"annotations[{n}]"
            missing = [k for k in ("id", "image_id", "segmentation") if not isinstance(a, dict) or k not in a]
            if missing:
                bad.append({"path": str(self.json_path), "reason": f"{where}: no {', '.join(missing)}"})
                continue
            if a["image_id"] not in entries:
                bad.append(
                    {
                        "path": str(self.json_path),
                        "reason": f"{where} refers to image_id {a['image_id']!r}, which is not in images",
                    }
                )
                continue
            crowd = a.get("iscrowd", 0)
            if type(crowd) is not int or crowd not in (0, 1):  # bool is an int subclass: refused as well
                bad_ann[a["image_id"]].append(f"{where}: iscrowd {crowd!r} is not the integer 0 or 1")
            elif crowd:
                self.crowd_skipped += 1
                continue
            if "category_id" not in a:
                bad_ann[a["image_id"]].append(f"{where}: no category_id")
            elif a["category_id"] not in categories or a["category_id"] == 0:
                bad_ann[a["image_id"]].append(
                    f"{where}: category_id {a['category_id']!r} is not in categories"
                    + (" (0 is reserved for background)" if a["category_id"] == 0 else "")
                )
            anns_by_image[a["image_id"]].append(a)
        records, files = [], [self.json_path]
        for im in sorted(entries.values(), key=lambda im: str(im["id"])):
            path = self.root / PurePosixPath(im["file_name"])
            if id_count[im["id"]] > 1 or name_count[str(PurePosixPath(im["file_name"]))] > 1:
                bad.append(
                    {
                        "path": printable(path),
                        "reason": f"duplicate COCO image id {im['id']} or file_name in {self.json_path}",
                    }
                )
                continue
            if bad_ann[im["id"]]:
                bad.append(
                    {"path": printable(path), "reason": f"{self.json_path}: " + "; ".join(bad_ann[im["id"]])}
                )
                continue
            if (reason := self._file_problem(path)) is not None:
                bad.append({"path": printable(path), "reason": reason})
                continue
            files.append(path)
            records.append(
                ImageRecord(
                    image_id=str(im["id"]),
                    image_path=path,
                    annotations=tuple(sorted(anns_by_image.get(im["id"], ()), key=lambda a: a["id"])),
                    expected_hw=(im["height"], im["width"]),
                )
            )
        return ScanResult(records=records, bad=bad, files=sorted(files))

    def read_objects(self, record: ImageRecord, image_hw: tuple[int, int]) -> ImageObjects:
        if record.expected_hw != tuple(image_hw):
            raise BadInput(
                record.image_path,
                f"image size {tuple(image_hw)} differs from the COCO entry {record.expected_hw}",
            )
        h, w = image_hw
        objects = []
        for a in record.annotations:
            try:
                mask = decode_segmentation(a["segmentation"], h, w)
            except Exception as e:
                raise BadInput(record.image_path, f"annotation {a.get('id')}: bad segmentation ({e})") from e
            box = mask_box(mask)
            if box is None:
                raise BadInput(record.image_path, f"annotation {a.get('id')}: empty mask")
            x1, y1, x2, y2 = box
            objects.append(
                ObjectMask(class_id=int(a["category_id"]), box=box, crop=mask[y1:y2, x1:x2].copy())
            )
        return ImageObjects(objects=objects)
