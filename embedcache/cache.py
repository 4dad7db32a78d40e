"""Reading a finished cache: ``open_cache(path) -> Cache`` (the API in docs/cache-api-contract.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from embedcache import masks as mk
from embedcache.presets import get_preset
from embedcache.signature import FORMAT_VERSION
from embedcache.store import TAP_ARRAY, read_strings, shard_file, storage_files
from embedcache.structure import structure_problems
from embedcache.views import IDENTITY, cache_views

FRAMES = ("original", "input", "lowres")
VIEW_OWNED = (
    "original_size",
    "input_size",
    "objects/box",
    "objects/input_area",
    "objects/input_box",
    "objects/input_mask_offset",
    "objects/mask_offset",
)
"""Arrays each view stores for itself (``embedcache.views``; besides its masks, ignore region and
embeddings); the rest are the identity's."""


class CacheError(Exception):
    """A cache that is missing, incomplete or invalid; the message names the path."""


@dataclass(frozen=True, kw_only=True)
class Objects:
    """Per-object arrays, all of length M, loaded into memory when the cache is opened."""

    image_index: np.ndarray
    """(M,) int64 image of each object, sorted non-decreasing."""
    box: np.ndarray
    """(M, 4) float32 xyxy in original pixels; x1, y1 inclusive, x2, y2 exclusive (integer-valued)."""
    class_id: np.ndarray
    """(M,) int32."""
    area: np.ndarray
    """(M,) int64 foreground pixels in the original frame."""
    input_area: np.ndarray
    """(M,) int64 foreground pixels in the input frame (0 when a tiny object vanishes in resizing)."""


def read_array(group: zarr.Group, name: str, path: Path, *, every_chunk: bool = True) -> np.ndarray:
    """Array ``name`` (``"objects/box"``) of the cache at ``path``, read whole; ``CacheError`` naming the
    files when one is missing (``every_chunk``: all are written at build time) or fails its checksum or
    decompression."""
    arr = group[name]
    missing = [f for f in storage_files(arr, path / name) if not f.is_file()] if every_chunk else []
    if missing:  # zarr would silently return the fill value
        raise CacheError(
            f"{missing[0]}: chunk file missing ({len(missing)} of array {name}); rebuild the cache"
        )
    try:
        return np.asarray(arr[...])
    except Exception as e:
        raise CacheError(
            f"{path / name}: unreadable ({type(e).__name__}: {e}); a chunk file under it is corrupt, "
            f"`embedcache verify {path}` names it; rebuild the cache"
        ) from e


class Cache:
    """An open, complete cache. Small arrays live in memory; embeddings are read from disk on demand.

    A cache built with ``--views`` holds each image once per view (``embedcache.views``); this object reads
    one of them (``view``, the identity unless it came from ``Cache.view(name)``). The image ids, paths,
    split, object order, classes and original-frame areas are shared by every view."""

    def __init__(self, path: Path, group: zarr.Group, view: str = IDENTITY):
        self.path = path
        self.group = group
        self.signature: dict = dict(group.attrs["signature"])
        self.views: tuple[str, ...] = cache_views(self.signature)
        """The views the cache holds, identity first (``("identity",)`` for a cache built without views)."""
        if view not in self.views:
            raise CacheError(f"{path}: has no view {view!r} (it holds {', '.join(self.views)})")
        self.view_name = view
        # where this view's own arrays live: the top level for the identity, views/<name>/ for the others
        self.view_prefix = "" if view == IDENTITY else f"views/{view}/"
        self._views: dict[str, Cache] = {view: self}
        self.preset = get_preset(self.signature["model_type"])
        """The model preset the cache was built for; its ``image_size`` is the input frame's side."""
        self.image_size = self.preset.image_size
        self.build_report: dict = dict(group.attrs.get("build_report", {}))
        vg = group[self.view_prefix.rstrip("/")] if self.view_prefix else group
        self.embeddings: zarr.Array = vg["embeddings"]
        # a partial cache's (N, 64, 64, C) float16 tokens entering the encoder's last tail_blocks blocks
        self.tap_tokens: zarr.Array | None = vg.get(TAP_ARRAY, None)
        self.tail_blocks = int(self.signature["tap"]["blocks"]) if "tap" in self.signature else 0
        self.num_images = int(self.embeddings.shape[0])
        self.images_per_shard = int(self.embeddings.shards[0])

        def read(name: str, dtype) -> np.ndarray:
            if name in VIEW_OWNED or name.startswith("ignore/"):
                name = self.view_prefix + name
            return read_array(group, name, path).astype(dtype, copy=False)

        self.original_size = read("original_size", np.int32).reshape(-1, 2)
        self.input_size = read("input_size", np.int32).reshape(-1, 2)
        self.image_id, self.image_path, self.split = (
            read_strings(read_array(group, name, path)) for name in ("image_id", "image_path", "split")
        )
        self.objects = Objects(
            image_index=read("objects/image_index", np.int64),
            box=read("objects/box", np.float32).reshape(-1, 4),
            class_id=read("objects/class_id", np.int32),
            area=read("objects/area", np.int64),
            input_area=read("objects/input_area", np.int64),
        )
        self._input_box = read("objects/input_box", np.int64).reshape(-1, 4)
        self._input_offset = read("objects/input_mask_offset", np.int64)
        self.num_objects = int(self.objects.image_index.shape[0])
        self._mask_offset = read("objects/mask_offset", np.int64)
        self._loaded: dict[str, np.ndarray] = {}  # ragged mask bits, loaded on first use
        self._object_start = np.searchsorted(self.objects.image_index, np.arange(self.num_images + 1))
        self.ignore_index: int | None = self.signature.get("dataset", {}).get("ignore_index")
        """The semantic mask value whose pixels are neither trained nor scored (``ignore_mask``), or None."""
        self._ignore: dict[str, np.ndarray] | None = None
        if "ignore" in vg:
            self._ignore = {
                name: read(f"ignore/{name}", np.int64)
                for name in ("box", "mask_offset", "input_box", "input_mask_offset")
            }
        elif self.ignore_index is not None:
            raise CacheError(
                f"{path}: built with --ignore-index {self.ignore_index} by an embedcache that did not keep "
                "the ignore region (its pixels were stored as background); rebuild it with "
                "`embedcache build ... --overwrite`"
            )

    def __repr__(self) -> str:
        s = self.signature
        view = f", view={self.view_name}" if self.view_prefix else ""
        return (
            f"Cache({str(self.path)!r}, {s['model_type']}, N={self.num_images}, M={self.num_objects}{view})"
        )

    def view(self, name: str) -> Cache:
        """The same cache read through view ``name`` (one of ``views``): its embeddings, sizes, boxes and
        masks are those of the transformed image; opened once, then shared."""
        if name not in self._views:
            other = Cache(self.path, self.group, view=name)
            other._views = self._views
            self._views[name] = other
        return self._views[name]

    def read_embeddings(self, idx) -> np.ndarray:
        """``(n, 256, 64, 64)`` float16 embeddings of the image indices ``idx`` (any int sequence)."""
        return self._read_images("embeddings", idx)

    def read_tap(self, idx) -> np.ndarray:
        """``(n, 64, 64, C)`` float16 tap tokens of the image indices ``idx`` (a partial cache only)."""
        if self.tap_tokens is None:
            raise CacheError(
                f"{self.path}: not a partial cache (no tap tokens); rebuild it with --tail-blocks K"
            )
        return self._read_images(TAP_ARRAY, idx)

    def _read_images(self, name: str, idx) -> np.ndarray:
        """Rows ``idx`` of the per-image array ``name``, in the order asked."""
        array = self.group[self.view_prefix + name]
        idx = np.asarray(idx, np.int64).reshape(-1)
        if idx.size == 0:
            return np.zeros((0, *array.shape[1:]), np.float16)
        if idx.min() < 0 or idx.max() >= self.num_images:
            raise IndexError(f"image index out of range 0..{self.num_images - 1}")
        # Contiguous runs as basic slices: zarr 3.1's orthogonal (fancy) selection on a sharded array measured
        # ~25x slower (109 ms vs 4.5 ms per image on isbi2012, docs/cache-format.md).
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        out = np.empty((idx.size, *array.shape[1:]), np.float16)
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        for run in np.split(np.arange(idx.size), breaks):
            a, b = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) + 1
            try:
                block = array[a:b]
            except Exception as e:  # a checksum, shard-index or truncation error from zarr
                raise CacheError(self._bad_images(name, a, b, f"unreadable ({type(e).__name__}: {e})")) from e
            # a never-written (or deleted) chunk reads as the NaN fill value throughout, and training on it is
            # silently wrong; its first value tells (isfinite over all of it measured 1.1 ms per image against
            # 1.4 ms to read one; written values are crc32c-checked and verified finite at build time)
            if np.isnan(block.reshape(block.shape[0], -1)[:, 0]).any():
                raise CacheError(self._bad_images(name, a, b, "missing (read as the NaN fill value)"))
            out[order[run]] = block[sorted_idx[run] - a]
        return out

    def _bad_images(self, name: str, a: int, b: int, what: str) -> str:
        s = self.images_per_shard
        name = self.view_prefix + name
        files = ", ".join(str(shard_file(self.path, k, name)) for k in range(a // s, (b - 1) // s + 1))
        return f"{files}: {name} of images {a}..{b - 1} {what}; run `embedcache verify {self.path}`"

    def image_indices(self, split: str) -> np.ndarray:
        """``(n,)`` int64 indices of the images in ``"train"``, ``"val"`` or ``"all"``."""
        if split == "all":
            return np.arange(self.num_images, dtype=np.int64)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        return np.flatnonzero(self.split == split).astype(np.int64)

    def images_with_objects(self, split: str) -> np.ndarray:
        """``(n,)`` int64 indices of the images of ``split`` (as ``image_indices``) with at least one object
        that has a pixel in the input frame (``objects.input_area > 0``).

        Instance training, validation overlays and the benches skip images without such objects: they have
        nothing to prompt. An object that vanishes at the input size is neither trained nor scored.
        """
        idx = self.image_indices(split)
        kept = np.bincount(self.objects.image_index[self.objects.input_area > 0], minlength=self.num_images)
        return idx[kept[idx] > 0]

    def object_range(self, i: int) -> tuple[int, int]:
        """Objects of image ``i`` are ``start..stop-1``."""
        return int(self._object_start[i]), int(self._object_start[i + 1])

    def _bits(self, name: str = "mask_bits") -> np.ndarray:
        """The whole ragged bit array, read once (isbi2012: 0.5 MB for 3,332 objects)."""
        if name not in self._loaded:
            self._loaded[name] = read_array(
                self.group, f"{self.view_prefix}objects/{name}", self.path
            ).astype(np.uint8)
        return self._loaded[name]

    def input_mask_crop(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Object ``j`` in the input frame: its xyxy box there ``(4,)`` int64 and the bool mask inside it."""
        box = self._input_box[j]
        bits = self._bits("input_mask_bits")[self._input_offset[j] : self._input_offset[j + 1]]
        return box, mk.unpack(bits, box)

    def input_coverage_crop(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Object ``j`` in the coverage frame (``embedcache.masks.input_coverage``): its xyxy box in the input
        frame ``(4,)`` int64 and the uint8 share (in 255ths) of each input pixel there that it covers."""
        i = int(self.objects.image_index[j])
        (r0, r1, c0, c1), q = mk.input_coverage(
            self.mask_crop(j), self.objects.box[j], self.original_size[i], self.input_size[i]
        )
        return np.array([c0, r0, c1, r1], np.int64), q

    def mask_crop(self, j: int) -> np.ndarray:
        """Object ``j``'s mask inside its box: ``(y2 - y1, x2 - x1)`` bool."""
        bits = self._bits()[self._mask_offset[j] : self._mask_offset[j + 1]]
        return mk.unpack(bits, self.objects.box[j])

    def ignore_mask(self, i: int, frame: str = "original") -> np.ndarray:
        """Image ``i``'s ignore region: ``(H, W)`` bool in the ``"original"`` frame, or ``(S, S)`` bool in the
        ``"input"`` frame (by the objects' nearest rule; False in the padding). All False when the image has
        no ignored pixel or the cache no ignore index."""
        if frame not in ("original", "input"):
            raise ValueError(f"frame must be 'original' or 'input', got {frame!r}")
        hw = tuple(int(v) for v in self.original_size[i]) if frame == "original" else (self.image_size,) * 2
        if self._ignore is None:
            return np.zeros(hw, bool)
        prefix = "" if frame == "original" else "input_"
        box, offsets = self._ignore[f"{prefix}box"][i], self._ignore[f"{prefix}mask_offset"]
        name = f"{self.view_prefix}ignore/{prefix}mask_bits"
        if name not in self._loaded:
            self._loaded[name] = read_array(self.group, name, self.path).astype(np.uint8)
        crop = mk.unpack(self._loaded[name][offsets[i] : offsets[i + 1]], box)
        return mk.crop_to_original(crop, box, hw)

    def masks(self, obj_idx, frame: str = "original"):
        """Exact masks of the objects ``obj_idx`` in one frame (rules in ``embedcache.masks``).

        Returns a list of ``(H_i, W_i)`` bool arrays for ``"original"``, an ``(n, S, S)`` bool array
        (S = ``image_size``) for ``"input"`` (False outside ``input_size``) or an ``(n, 256, 256)`` bool array
        for ``"lowres"``.
        """
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        obj_idx = np.asarray(obj_idx, np.int64).reshape(-1)
        if obj_idx.size and (obj_idx.min() < 0 or obj_idx.max() >= self.num_objects):
            raise IndexError(f"object index out of range 0..{self.num_objects - 1}")
        if frame == "original":
            out = []
            for j in obj_idx:
                i = self.objects.image_index[j]
                out.append(
                    mk.crop_to_original(self.mask_crop(j), self.objects.box[j], tuple(self.original_size[i]))
                )
            return out
        side = self.image_size if frame == "input" else mk.LOWRES_SIZE
        out = np.zeros((obj_idx.size, side, side), bool)  # calloc'd: untouched pages cost nothing
        for n, j in enumerate(obj_idx):
            (x1, y1, x2, y2), crop = self.input_mask_crop(j)
            if frame == "input":
                out[n, y1:y2, x1:x2] = crop
            else:
                mk.input_crop_to_lowres((y1, y2, x1, x2), crop, block=self.preset.lowres_block, out=out[n])
        return out


def open_group_checked(path: str | Path) -> zarr.Group:
    """Open ``path`` as an embedcache group (any status); ``CacheError`` when it is not one."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheError(f"{path}: no cache here (no zarr.json)")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as e:
        raise CacheError(f"{path}: not a readable Zarr v3 group ({type(e).__name__}: {e})") from e
    if "signature" not in group.attrs:
        raise CacheError(f"{path}: a Zarr group, but not an embedcache cache (no signature attribute)")
    return group


def open_cache(path: str | Path) -> Cache:
    """Open a complete cache; ``CacheError`` naming the path if it is missing, incomplete or invalid
    (including the structural checks of ``embedcache.structure``)."""
    path = Path(path)
    group = open_group_checked(path)
    version = group.attrs["signature"].get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {version!r}, but this embedcache reads version {FORMAT_VERSION} "
            "(version 3 added chunk checksums); rebuild it with `embedcache build ... --overwrite`"
        )
    status = group.attrs.get("status")
    if status != "complete":
        raise CacheError(
            f"{path}: cache is incomplete (status {status!r}); rerun the same build command to finish it"
        )
    try:
        done = read_array(group, "shard_done", path, every_chunk=False)  # a missing marker reads 0: not done
        if not (done > 0).all():
            missing = np.flatnonzero(done == 0).tolist()
            raise CacheError(
                f"{path}: shards {missing[:10]} are not finished; rerun the build to finish them"
            )
        cache = Cache(path, group)
        for view in cache.views:
            name = cache.view(view).view_prefix + "embeddings"
            gone = [f for f in storage_files(group[name], path / name) if not f.is_file()]
            if gone:  # zarr would read a missing shard as its NaN fill value
                raise CacheError(f"{gone[0]}: shard file missing ({len(gone)} in all); rebuild the cache")
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(f"{path}: invalid cache ({type(e).__name__}: {e})") from e
    problems = [
        f"{view}: {p}" if view != IDENTITY else p
        for view in cache.views
        for p in structure_problems(cache.view(view))
    ]
    if problems:
        raise CacheError(f"{path}: invalid cache structure: {'; '.join(problems)}; rebuild the cache")
    return cache
