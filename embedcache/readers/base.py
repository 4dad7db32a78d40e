"""What every dataset reader produces: image records from a scan, and per-image objects with box-cropped
masks.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage

from embedcache.masks import mask_box


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """One image found by a scan, before anything is decoded."""

    image_id: str
    """The id stored in the cache: the file stem, or the COCO image id."""
    image_path: Path
    """The image file."""
    mask_path: Path | None = None
    """The label map (folder layout); None for COCO."""
    annotations: tuple = ()
    """The COCO annotation dicts of this image (COCO only)."""
    expected_hw: tuple[int, int] | None = None
    """(H, W) the annotation says the image has (COCO only)."""


@dataclass(frozen=True, kw_only=True)
class ObjectMask:
    """One object: its class, its tight box and the box-cropped mask."""

    class_id: int
    """Class id (1 for instance and binary masks)."""
    box: tuple[int, int, int, int]
    """(x1, y1, x2, y2) in original pixels; x1, y1 inclusive, x2, y2 exclusive."""
    crop: np.ndarray = field(repr=False)
    """(y2 - y1, x2 - x1) bool: the mask inside the box."""

    @property
    def area(self) -> int:
        """Foreground pixels in the original frame."""
        return int(self.crop.sum())


@dataclass(frozen=True, kw_only=True)
class ImageObjects:
    """What a reader found in one image: its objects, and a note when its mask looks damaged."""

    objects: list[ObjectMask]
    """The objects, in the reader's order."""
    unclean: str | None = None
    """Why the mask's values are not clean (e.g. a binary mask with many grey levels after JPEG), or None.
    The build goes on and lists it in the build report."""
    ignore: ObjectMask | None = None
    """The pixels to neither train nor score (a semantic mask's ``ignore_index``) as one box-cropped mask
    (``class_id`` 0), or None when the image has none."""


@dataclass(frozen=True, kw_only=True)
class ScanResult:
    """The records a scan found, the bad items it already knows of, and every file it looked at."""

    records: list[ImageRecord]
    """Usable-looking records, sorted by image id."""
    bad: list[dict]
    """``{"path": ..., "reason": ...}`` for items the scan itself rejected (duplicates, orphans, ...)."""
    files: list[Path]
    """Every input file, for the dataset fingerprint."""


class Reader(Protocol):
    """A dataset reader: ``scan`` lists the images, ``read_objects`` turns one record into objects."""

    root: Path

    def scan(self) -> ScanResult: ...

    def read_objects(self, record: ImageRecord, image_hw: tuple[int, int]) -> ImageObjects: ...

    def describe(self) -> dict: ...


NOT_REGULAR = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def file_problem(root: Path, path: Path, *, allow_outside_symlinks: bool) -> str | None:
    """Why ``path`` (lexically inside ``root``) must not be read, or None.

    It must exist, resolve inside ``root`` (a symlink leading out is refused unless
    ``allow_outside_symlinks``), and be a regular file: opening a named pipe would block the build for ever.
    The reason never names where a symlink leads, since it may be stored in the build report.
    """
    try:
        real = path.resolve(strict=True)
        mode = os.stat(real).st_mode
    except (OSError, RuntimeError) as e:  # missing, a dangling or looping symlink, no permission
        return f"file missing or unreadable ({type(e).__name__})"
    if not allow_outside_symlinks and not real.is_relative_to(Path(root).resolve()):
        return (
            "a symlink (or inside a linked folder) that leads outside the data folder; copy the file in, or "
            "pass --allow-outside-symlinks to follow such links"
        )
    if not stat.S_ISREG(mode):
        kind = NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        return f"not a regular file ({kind}); only regular files are read"
    return None


def objects_from_labels(labels: np.ndarray, class_id: int = 1) -> list[ObjectMask]:
    """``(H, W)`` int map with 0 background and 1..K consecutive object labels -> K objects in label order."""
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl] == k
        out.append(
            ObjectMask(class_id=class_id, box=(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), crop=crop)
        )
    return out


def region(mask: np.ndarray) -> ObjectMask | None:
    """An ``(H, W)`` bool mask as one box-cropped ``ObjectMask`` of class 0, or None when it is empty."""
    box = mask_box(mask)
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return ObjectMask(class_id=0, box=box, crop=mask[y1:y2, x1:x2].copy())
