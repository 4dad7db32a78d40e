"""The folder layout: ``DATA/images/<stem>.<ext>`` with ``DATA/masks/<stem>.<png|tif|...>`` label maps.

Mask kinds:

- ``instance``: 0 is background, every other value is one object (values need not be consecutive).
- ``binary``: every non-zero pixel is foreground; each 4-connected component is one object.
- ``semantic``: values are class ids (0 background); each class's 4-connected components are objects that keep
  the class id. Pixels equal to ``ignore_index`` belong to no object; they are kept as the image's ignore
  region (``ImageObjects.ignore``), which the trainer neither trains on nor scores.

Objects are ordered by instance value, by raster order of components (binary) or by class then raster order.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from embedcache.images import IMAGE_SUFFIXES, MASK_SUFFIXES, BadInput, load_mask, printable
from embedcache.readers.base import (
    ImageObjects,
    ImageRecord,
    ScanResult,
    file_problem,
    objects_from_labels,
    region,
)

MASK_KINDS = ("instance", "binary", "semantic")


def _by_stem(folder: Path, suffixes: tuple[str, ...], what: str, bad: list[dict], usable) -> dict[str, Path]:
    """Map stem -> file for the supported files in ``folder``; duplicates, unsupported files and files
    ``usable`` refuses (it returns a reason or None) go to ``bad``.
    """
    found: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if printable(p.name) != p.name:  # the cache stores names as UTF-8 text
            bad.append({"path": printable(p), "reason": "file name is not valid UTF-8; rename the file"})
            continue
        if (problem := usable(p)) is not None:
            bad.append({"path": str(p), "reason": problem})
            continue
        if p.suffix.lower() not in suffixes:
            bad.append(
                {"path": str(p), "reason": f"not a supported {what} file type ({', '.join(suffixes)})"}
            )
            continue
        found[p.stem].append(p)
    out = {}
    for stem, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            bad.extend({"path": str(p), "reason": f"duplicate {what} stem {stem!r} ({names})"} for p in paths)
        else:
            out[stem] = paths[0]
    return out


def _binary_unclean(labels: np.ndarray) -> str | None:
    """Why a binary mask's values are not clean (more than one foreground value, as JPEG leaves around
    every edge), or None for 0 plus one foreground value (0/1, 0/255)."""
    foreground = np.unique(labels[labels != 0])
    if foreground.size <= 1:
        return None
    shown = ", ".join(str(v) for v in foreground[:5]) + (", ..." if foreground.size > 5 else "")
    return (
        f"binary mask holds {foreground.size} foreground values ({shown}), expected one (1 or 255); a mask "
        "saved as JPEG is damaged at every edge: re-export it losslessly (PNG)"
    )


class FolderReader:
    """Reads the folder layout with one of the mask kinds in the module docstring."""

    def __init__(
        self,
        root: str | Path,
        *,
        mask_kind: str = "instance",
        ignore_index: int | None = None,
        allow_outside_symlinks: bool = False,
    ):
        if mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
        self.root = Path(root)
        self.mask_kind = mask_kind
        self.ignore_index = ignore_index
        self.allow_outside_symlinks = allow_outside_symlinks
        for sub in ("images", "masks"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(
                    f"{self.root / sub}: folder not found (expected DATA/images and DATA/masks)"
                )

    def describe(self) -> dict:
        """The reader's settings, recorded in the cache signature."""
        return {
            "reader": "folder",
            "mask_kind": self.mask_kind,
            "ignore_index": self.ignore_index,
            "allow_outside_symlinks": self.allow_outside_symlinks,
        }

    def _problem(self, path: Path) -> str | None:
        """Why a file in images/ or masks/ must not be read (``file_problem``), or None."""
        return file_problem(self.root, path, allow_outside_symlinks=self.allow_outside_symlinks)

    def scan(self) -> ScanResult:
        bad: list[dict] = []
        images = _by_stem(self.root / "images", IMAGE_SUFFIXES, "image", bad, self._problem)
        masks = _by_stem(self.root / "masks", MASK_SUFFIXES, "mask", bad, self._problem)
        records = []
        for stem in sorted(images):
            if stem not in masks:
                bad.append({"path": str(images[stem]), "reason": f"image without a mask (no masks/{stem}.*)"})
                continue
            records.append(ImageRecord(image_id=stem, image_path=images[stem], mask_path=masks[stem]))
        bad.extend(
            {"path": str(masks[s]), "reason": f"mask without an image (no images/{s}.*)"}
            for s in sorted(set(masks) - set(images))
        )
        # fingerprinted: every readable file in images/ and masks/, never one behind a refused symlink
        files = sorted(
            p for d in ("images", "masks") for p in (self.root / d).iterdir() if self._problem(p) is None
        )
        return ScanResult(records=records, bad=bad, files=files)

    def read_objects(self, record: ImageRecord, image_hw: tuple[int, int]) -> ImageObjects:
        labels = load_mask(record.mask_path)
        if labels.shape != tuple(image_hw):
            raise BadInput(
                record.mask_path,
                f"mask size {labels.shape} differs from image size {tuple(image_hw)} ({record.image_path})",
            )
        negative = labels < 0
        if self.ignore_index is not None:
            negative &= labels != self.ignore_index
        # e.g. -1 in an int16 map: instance relabelling would make the background an object
        if negative.any():
            raise BadInput(
                record.mask_path,
                f"mask holds negative labels (min {int(labels[negative].min())}); labels must be >= 0, "
                "0 being background",
            )
        unclean, ignore = None, None
        if self.mask_kind == "instance":
            values, inverse = np.unique(labels, return_inverse=True)
            # relabel to 0..K so find_objects needs no table as large as the largest id
            inverse = inverse.reshape(labels.shape) + (0 if values[0] == 0 else 1)
            objects = objects_from_labels(inverse.astype(np.int64))
        elif self.mask_kind == "binary":
            components, _ = ndimage.label(labels != 0)
            objects = objects_from_labels(components)
            unclean = _binary_unclean(labels)
        else:
            objects = []
            for c in np.unique(labels):
                if c == 0 or (self.ignore_index is not None and c == self.ignore_index):
                    continue
                components, _ = ndimage.label(labels == c)
                objects.extend(objects_from_labels(components, class_id=int(c)))
            if self.ignore_index is not None:
                ignore = region(labels == self.ignore_index)
        return ImageObjects(objects=objects, unclean=unclean, ignore=ignore)
