"""Dataset readers: the folder layout and COCO JSON."""

from __future__ import annotations

from pathlib import Path

from embedcache.readers.base import ImageObjects, ImageRecord, ObjectMask, Reader, ScanResult
from embedcache.readers.coco import CocoReader
from embedcache.readers.folder import MASK_KINDS, FolderReader

__all__ = [
    "MASK_KINDS",
    "CocoReader",
    "FolderReader",
    "ImageObjects",
    "ImageRecord",
    "ObjectMask",
    "Reader",
    "ScanResult",
    "make_reader",
]


def make_reader(
    data: Path,
    *,
    coco: Path | None,
    mask_kind: str,
    ignore_index: int | None,
    allow_outside_symlinks: bool = False,
) -> Reader:
    """A COCO reader when ``coco`` is given, else the folder reader with ``mask_kind``; either refuses files
    behind symlinks that lead outside ``data`` unless ``allow_outside_symlinks``."""
    if coco is not None:
        return CocoReader(data, coco, allow_outside_symlinks=allow_outside_symlinks)
    return FolderReader(
        data, mask_kind=mask_kind, ignore_index=ignore_index, allow_outside_symlinks=allow_outside_symlinks
    )
