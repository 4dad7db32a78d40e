"""Decoding image and mask files, and the rule that turns any image into the 8-bit RGB SAM expects.

Conversion rule (``to_rgb8``), applied to the pixel data as stored (no EXIF rotation: masks are drawn on the
stored pixel grid, so rotating the image would misalign them):

- 8-bit RGB: unchanged.
- 8-bit grayscale ``(H, W)`` or ``(H, W, 1)``: the one channel is copied to R, G and B.
- Alpha (RGBA, LA): the alpha channel is dropped, not composited; the colour channels are kept as stored.
- Palette (PIL mode ``P``/``PA``): looked up through the palette to RGB(A), then as above.
- Bilevel (mode ``1``): False -> 0, True -> 255.
- Anything that is not 8-bit (16-bit, 32-bit, float; e.g. a uint16 microscope frame whose values span 0..300):
  percentile scaling. ``lo`` and ``hi`` are the 0.5th and 99.5th percentiles of all finite values, taken over
  all channels together so colour balance is kept; ``out = round(clip((x - lo) / (hi - lo), 0, 1) * 255)``.
  A constant image (``hi == lo``) becomes all zeros; non-finite values become 0.

``.tif``/``.tiff`` files are read with tifffile, everything else with Pillow. A truncated or unreadable file
raises ``BadInput`` naming the file. ``check_pixels`` reads only a file's header, so an image or mask over
the pixel budget is refused before it is decoded (a 20000x20000 uint8 TIFF is 479 KB on disk and took 12.8 GB
to build from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif")
PERCENTILES = (0.5, 99.5)  # low/high percentiles of the high-bit-depth rule
DEFAULT_MAX_PIXELS = 64_000_000  # 8000x8000; below Pillow's own bomb warning (89.5 MP), so ours speaks first


def printable(path: str | Path) -> str:
    """``path`` as text that can always be printed and stored as UTF-8: bytes of a file name that are not
    UTF-8 (Python's surrogate escapes) are written as ``\\xNN``."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class BadInput(Exception):
    """A dataset item that cannot be used; ``path`` names the offending file and ``reason`` says why."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{printable(path)}: {reason}")
        self.path = printable(path)
        self.reason = reason


def read_array(path: Path) -> np.ndarray:
    """Decode an image or mask file to a numpy array exactly as stored (no colour conversion).

    Returns ``(H, W)`` or ``(H, W, C)``; a PIL palette image gives its palette *indices* ``(H, W)``.
    """
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            arr = tifffile.imread(path)
            # planar TIFFs store channels first; SAM and PIL want them last
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
                arr = np.moveaxis(arr, 0, -1)
            return arr
        with Image.open(path) as im:
            im.load()  # decodes fully: a truncated file fails here, not later
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.array(im, dtype=np.uint16)
            return np.array(im)
    except Exception as e:  # PIL, tifffile and zlib raise many unrelated types for a bad file
        raise BadInput(path, f"unreadable or truncated file ({type(e).__name__}: {e})") from e


def header_hw(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image or mask file from its header alone (nothing is decoded). Raises ``BadInput``."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
            if len(shape) == 3 and shape[-1] in (1, 2, 3, 4):  # channels last
                shape = shape[:2]
            elif len(shape) == 3 and shape[0] in (1, 3, 4):  # planar
                shape = shape[1:]
            if len(shape) != 2:
                raise ValueError(f"unsupported TIFF shape {shape}")
            return int(shape[0]), int(shape[1])
        with Image.open(path) as im:  # lazy: reads the header only
            return im.height, im.width
    except Image.DecompressionBombError as e:  # Pillow's own refusal, over 179 MP: still a size problem
        raise BadInput(path, f"image too large to decode ({e})") from e
    except Exception as e:
        raise BadInput(path, f"unreadable file ({type(e).__name__}: {e})") from e


def check_pixels(path: Path, max_pixels: int) -> None:
    """Refuse a file whose ``H * W`` exceeds ``max_pixels``, before decoding it. Raises ``BadInput``."""
    h, w = header_hw(Path(path))
    if h * w > max_pixels:
        raise BadInput(
            path,
            f"{w}x{h} pixels ({h * w / 1e6:.1f} MP) exceeds the pixel budget of {max_pixels / 1e6:.1f} MP "
            "(--max-pixels); downscale the image and its mask, or raise the budget",
        )


def read_palette_image(path: Path) -> np.ndarray:
    """Decode a palette image through its palette: ``(H, W, 3)`` or ``(H, W, 4)`` uint8."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB"))
    except Exception as e:
        raise BadInput(path, f"unreadable or truncated file ({type(e).__name__}: {e})") from e


def percentile_scale(x: np.ndarray) -> np.ndarray:
    """The high-bit-depth rule: ``(H, W[, C])`` any dtype -> same shape uint8 (see the module docstring)."""
    x = x.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, np.uint8)
    lo, hi = np.percentile(x[finite], PERCENTILES)
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    y = np.clip((np.where(finite, x, lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(y * 255.0).astype(np.uint8)


def to_rgb8(arr: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
    """Apply the conversion rule: ``(H, W)`` / ``(H, W, C)`` any dtype -> ``(H, W, 3)`` uint8 RGB."""
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # LA / RGBA: drop alpha
        arr = arr[..., :-1]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise BadInput(path, f"unsupported image shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = percentile_scale(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr)


def load_image(path: Path) -> np.ndarray:
    """Read an image file and convert it by the rule: ``(H, W, 3)`` uint8 RGB. Raises ``BadInput``."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        try:
            with Image.open(path) as im:
                mode = im.mode
        except Exception as e:
            raise BadInput(path, f"unreadable file ({type(e).__name__}: {e})") from e
        if mode in ("P", "PA"):
            return to_rgb8(read_palette_image(path), path)
        if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            try:
                with Image.open(path) as im:
                    return np.array(im.convert("RGB"))
            except Exception as e:
                raise BadInput(path, f"unreadable or truncated file ({type(e).__name__}: {e})") from e
    return to_rgb8(read_array(path), path)


def load_mask(path: Path) -> np.ndarray:
    """Read a label/mask file as stored: ``(H, W)`` integer array. Raises ``BadInput``.

    Palette PNGs give their indices (the VOC convention). A multi-channel mask is accepted only when all of
    its colour channels are equal (a grey mask saved as RGB); anything else is ambiguous and refused.
    """
    arr = read_array(Path(path))
    if arr.ndim == 3:
        if arr.shape[-1] in (2, 4):
            arr = arr[..., :-1]
        if not (arr == arr[..., :1]).all():
            raise BadInput(
                path, f"mask has {arr.shape[-1]} different channels; expected a single-channel label map"
            )
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise BadInput(path, f"unsupported mask shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise BadInput(path, f"mask of dtype {arr.dtype} holds non-integer values")
        arr = arr.astype(np.int64)
    return arr
