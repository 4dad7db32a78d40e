"""COCO-style JSON (``--coco``): images under ``DATA/<file_name>``, objects from polygons or RLE.

Crowd annotations (``iscrowd: 1``) mark regions to ignore, not objects, so they are not stored; their count is
in the build report. Objects keep their ``category_id`` as class id and are ordered by annotation id.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from embedcache.images import IMAGE_SUFFIXES, BadInput
from embedcache.masks import mask_box
from embedcache.readers.base import ImageRecord, ObjectMask, ScanResult, check_nonempty

_DECODE_LOCK = threading.Lock()


def _decode_rle(rle: dict) -> np.ndarray:
    """``pycocotools.mask.decode`` without its numpy-2 DeprecationWarning (pycocotools 2.0.11's Cython passes
    ``copy=False`` to an ``__array__`` that predates numpy 2; harmless, but it is not ours to fix). The lock
    keeps the temporary filter from racing with our other decode threads (catch_warnings is process-global).
    """
    with _DECODE_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword")
        return mask_utils.decode(rle)


def decode_segmentation(segmentation, h: int, w: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed RLE or compressed RLE) -> ``(h, w)`` bool mask."""
    if isinstance(segmentation, list):  # polygons: one RLE per polygon, merged
        if not segmentation or any(len(p) < 6 for p in segmentation):
            raise ValueError("polygon with fewer than 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str | bytes):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        if list(rle["size"]) != [h, w]:
            raise ValueError(f"RLE size {rle['size']} differs from image size {[h, w]}")
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
    return _decode_rle(rle).astype(bool)


class CocoReader:
    """Reads a COCO JSON whose ``file_name`` entries are relative to ``root``."""

    def __init__(self, root: str | Path, coco_json: str | Path):
        self.root = Path(root)
        self.json_path = Path(coco_json)
        if not self.json_path.is_file():
            raise FileNotFoundError(f"{self.json_path}: COCO JSON not found")
        self.crowd_skipped = 0

    def describe(self) -> dict:
        return {"reader": "coco", "mask_kind": "coco", "ignore_index": None}

    def scan(self) -> ScanResult:
        try:
            data = json.loads(self.json_path.read_text())
            images, annotations = data["images"], data.get("annotations", [])
        except Exception as e:
            raise ValueError(f"{self.json_path}: not a COCO JSON ({type(e).__name__}: {e})") from e
        anns_by_image = defaultdict(list)
        for a in sorted(annotations, key=lambda a: a["id"]):
            if a.get("iscrowd", 0):
                self.crowd_skipped += 1
                continue
            anns_by_image[a["image_id"]].append(a)
        bad: list[dict] = []
        id_count = defaultdict(int)
        name_count = defaultdict(int)
        for im in images:
            id_count[im["id"]] += 1
            name_count[im["file_name"]] += 1
        records, files = [], [self.json_path]
        for im in sorted(images, key=lambda im: str(im["id"])):
            path = self.root / im["file_name"]
            if id_count[im["id"]] > 1 or name_count[im["file_name"]] > 1:
                bad.append(
                    {
                        "path": str(path),
                        "reason": f"duplicate COCO image id {im['id']} or file_name in {self.json_path}",
                    }
                )
                continue
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                bad.append({"path": str(path), "reason": "image file missing or of an unsupported type"})
                continue
            files.append(path)
            records.append(
                ImageRecord(
                    image_id=str(im["id"]),
                    image_path=path,
                    annotations=tuple(anns_by_image.get(im["id"], ())),
                    expected_hw=(int(im["height"]), int(im["width"])),
                )
            )
        return ScanResult(records=records, bad=bad, files=sorted(files))

    def read_objects(self, record: ImageRecord, image_hw: tuple[int, int]) -> list[ObjectMask]:
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
        return check_nonempty(objects, record.image_path)
