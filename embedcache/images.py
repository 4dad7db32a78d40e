"""Decoding image and mask files, and the rule that turns any image into the 8-bit RGB SAM expects.

Conversion rule (``to_rgb8``), applied to the pixel data as stored (no EXIF rotation: masks are drawn on the
stored pixel grid, so rotating the image would misalign them):

- Only declared layouts are read as colour (``read_pixels`` returns the layout with the pixels): grey, RGB,
  or either with a declared alpha (Pillow's ``LA``/``RGBA``, a TIFF's ExtraSamples alpha). Anything else
  (``planes``: a 2-channel frame, a stack of TIFF pages, a 4th channel not declared alpha) is refused naming
  the file and its shape, unless ``channels`` (``--channels R,G,B``) names the source channel of R, G and B
  (``map_channels``). A multi-frame GIF/WebP is refused.
- 8-bit RGB: unchanged.
- 8-bit grayscale ``(H, W)`` or ``(H, W, 1)``: the one channel is copied to R, G and B.
- A declared alpha channel is dropped, not composited; the colour channels are kept as stored.
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


LAYOUTS = ("grey", "grey+alpha", "rgb", "rgb+alpha", "planes")
"""What a file declares its channels to be; ``planes`` is anything else (channels or pages with no colour
meaning: a 2-channel microscope frame, a stack of pages, a fourth channel not declared alpha)."""
_PIL_LAYOUTS = {
    "LA": "grey+alpha",
    "La": "grey+alpha",
    "RGB": "rgb",
    "RGBA": "rgb+alpha",
    "RGBa": "rgb+alpha",
}
_TIFF_ALPHA = (1, 2)  # ExtraSamples values: associated and unassociated alpha
_TIFF_RGB = (2, 6)  # Photometric values: RGB, and YCbCr (which tifffile decodes to RGB)


def _tiff_order(shape: tuple[int, ...], axes: str) -> tuple[int, ...] | None:
    """The transpose that makes a 3-D TIFF series channels-last, or None for a 2-D one.

    Samples (``S``) are the declared channel axis. Any other third axis holds pages (planes); it is taken as
    the channel axis too, except when it is the last and short (<= 4) and the first is not: an (H, W, C)
    array saved without a samples declaration, as ``tifffile.imwrite`` does for C = 2."""
    if len(shape) == 2:
        return None
    if len(shape) != 3:
        raise ValueError(f"unsupported TIFF shape {shape} (axes {axes}); save one 2-D image per file")
    c = axes.index("S") if "S" in axes else 2 if shape[2] <= 4 < shape[0] else 0
    return tuple(i for i in range(3) if i != c) + (c,)


def _tiff_layout(tif, channels: int, samples: bool) -> str:
    """The declared layout of a TIFF's first page with ``channels`` channels (``samples``: they are samples
    of one page, not pages)."""
    page = tif.pages[0]
    alpha = bool(page.extrasamples) and page.extrasamples[0] in _TIFF_ALPHA
    if channels == 1:
        return "grey"
    if not samples:
        return "planes"
    if page.photometric in _TIFF_RGB:
        return {3: "rgb", 4: "rgb+alpha" if alpha else "planes"}.get(channels, "planes")
    return "grey+alpha" if channels == 2 and alpha else "planes"


def _tiff_series(tif) -> tuple[tuple[int, ...], str]:
    """Shape and axes of the image a TIFF holds: its one series, or equal 2-D series stacked as pages."""
    series = tif.series
    if len(series) == 1:
        return tuple(series[0].shape), series[0].axes
    if len({(tuple(x.shape), x.axes) for x in series}) == 1 and len(series[0].shape) == 2:
        return (len(series), *series[0].shape), "I" + series[0].axes
    raise ValueError(f"{len(series)} images of different shapes in one file; save one image per file")


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        shape, axes = _tiff_series(tif)
        arr = tif.asarray() if len(tif.series) == 1 else np.stack([x.asarray() for x in tif.series])
        order = _tiff_order(shape, axes)
        if order is None:
            return arr, "grey"
        arr = arr.reshape(shape).transpose(order)
        return arr, _tiff_layout(tif, arr.shape[-1], samples="S" in axes)


def _check_one_frame(frames: int, path: Path) -> None:
    """An animation or a multi-frame stack (GIF, WebP, APNG) is refused: which frame is the image is not
    ours to guess."""
    if frames > 1:
        raise BadInput(path, f"{frames} frames in one file; save the frame to use as its own image")


def read_pixels(path: Path) -> tuple[np.ndarray, str]:
    """Decode an image or mask file exactly as stored (no colour conversion): ``(H, W)`` or ``(H, W, C)``
    and its declared layout (``LAYOUTS``). A PIL palette image gives its palette *indices* ``(H, W)``.
    Raises ``BadInput``."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return _read_tiff(path)
        with Image.open(path) as im:
            _check_one_frame(getattr(im, "n_frames", 1), path)
            im.load()  # decodes fully: a truncated file fails here, not later
            dtype = np.uint16 if im.mode in ("I;16", "I;16B", "I;16L") else None
            return np.array(im, dtype=dtype), _PIL_LAYOUTS.get(im.mode, "grey")
    except BadInput:
        raise
    except Exception as e:  # PIL, tifffile and zlib raise many unrelated types for a bad file
        raise BadInput(path, f"unreadable or truncated file ({type(e).__name__}: {e})") from e


def header_hw(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image or mask file from its header alone (nothing is decoded). Raises ``BadInput``."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape, axes = _tiff_series(tif)
            order = _tiff_order(shape, axes) or (0, 1)
            return int(shape[order[0]]), int(shape[order[1]])
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


def map_channels(
    arr: np.ndarray, layout: str, path: Path | str, channels: tuple[int, int, int] | None
) -> np.ndarray:
    """The colour channels of ``(H, W[, C])`` pixels with a declared ``layout``: ``(H, W)`` grey or
    ``(H, W, 3)`` RGB. A declared alpha is dropped; ``planes`` are refused naming the file and the shape,
    unless ``channels`` picks the source channel of R, G and B."""
    if arr.ndim == 2:
        return arr
    if layout in ("grey+alpha", "rgb+alpha"):
        arr = arr[..., :-1]
    elif layout == "planes":
        if channels is None:
            raise BadInput(
                path,
                f"{arr.shape[-1]} channels or pages (shape {arr.shape} as H, W, C, {arr.dtype}) are neither "
                "grey, RGB nor RGB with a declared alpha; pass --channels R,G,B to say which source channel "
                "each of R, G and B takes (e.g. --channels 0,1,1 or 0,0,0)",
            )
        if max(channels) >= arr.shape[-1]:
            raise BadInput(
                path, f"--channels {channels} asks for channel {max(channels)} of shape {arr.shape}"
            )
        arr = arr[..., list(channels)]
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def to_rgb8(
    arr: np.ndarray,
    path: Path | str = "<array>",
    *,
    layout: str | None = None,
    channels: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Apply the conversion rule: ``(H, W)`` / ``(H, W, C)`` any dtype -> ``(H, W, 3)`` uint8 RGB.

    ``layout`` is what the file declares (``LAYOUTS``); None reads 1 channel as grey, 3 as RGB and anything
    else as ``planes``, which need ``channels`` (``map_channels``)."""
    if layout is None:
        layout = "grey" if arr.ndim == 2 or arr.shape[-1] == 1 else "rgb" if arr.shape[-1] == 3 else "planes"
    arr = map_channels(arr, layout, path, channels)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise BadInput(path, f"unsupported image shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = percentile_scale(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr)


def load_image(path: Path, channels: tuple[int, int, int] | None = None) -> np.ndarray:
    """Read an image file and convert it by the rule: ``(H, W, 3)`` uint8 RGB. Raises ``BadInput``.

    ``channels`` maps a file of undeclared channels (``map_channels``); other files ignore it."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        try:
            with Image.open(path) as im:
                mode, frames = im.mode, getattr(im, "n_frames", 1)
        except Exception as e:
            raise BadInput(path, f"unreadable file ({type(e).__name__}: {e})") from e
        _check_one_frame(frames, path)
        if mode in ("P", "PA"):
            palette = read_palette_image(path)
            return to_rgb8(palette, path, layout="rgb+alpha" if palette.shape[-1] == 4 else "rgb")
        if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            try:
                with Image.open(path) as im:
                    return np.array(im.convert("RGB"))
            except Exception as e:
                raise BadInput(path, f"unreadable or truncated file ({type(e).__name__}: {e})") from e
    arr, layout = read_pixels(path)
    return to_rgb8(arr, path, layout=layout, channels=channels)


def load_mask(path: Path) -> np.ndarray:
    """Read a label/mask file as stored: ``(H, W)`` integer array. Raises ``BadInput``.

    Palette PNGs give their indices (the VOC convention). A declared alpha channel is dropped; a
    multi-channel mask is accepted only when all of its other channels are equal (a grey mask saved as RGB);
    anything else is ambiguous and refused.
    """
    arr, layout = read_pixels(Path(path))
    if arr.ndim == 3:
        if layout in ("grey+alpha", "rgb+alpha"):
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
