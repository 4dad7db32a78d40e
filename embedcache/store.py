"""The Zarr v3 layout of a cache: array names, chunking, sharding and the per-shard done markers.

::

    X.zarr/                       group; attributes: signature, status, runs, build_report
      embeddings      (N, 256, 64, 64) float16   chunk = 1 image, shard = images_per_shard images, fill NaN
      tap_tokens      (N, 64, 64, C) float16     partial caches only (--tail-blocks k > 0): the tokens
                                                 entering the encoder's last k blocks (embedcache.tap);
                                                 chunked and sharded as embeddings
      original_size   (N, 2) int32               (H, W)
      input_size      (N, 2) int32               (h, w) after resizing the long side to 1024
      image_id        (N,) str                   file stem or COCO image id
      image_path      (N,) str                   source image, relative to the data folder
      split           (N,) str                   "train" | "val"
      shard_done      (S,) int32                 0 = not done, r = finished by build run r; chunk = 1 shard
      shard_seconds   (S,) float32               encode wall time of each shard; chunk = 1 shard
      shard_rank      (S,) int32                 the process (rank) that wrote each shard; chunk = 1 shard
      objects/
        image_index   (M,) int64                 sorted non-decreasing
        box           (M, 4) float32             xyxy original pixels, x2/y2 exclusive (integers)
        class_id      (M,) int32
        area          (M,) int64
        mask_offset   (M + 1,) int64             object j's bytes are mask_bits[off[j]:off[j+1]]
        mask_bits     (B,) uint8                 box-cropped, bit-packed masks (embedcache.masks)
        input_box     (M, 4) int32               tight xyxy box in the 1024 input frame (0s if empty)
        input_area    (M,) int64                 foreground pixels in the input frame
        input_mask_offset (M + 1,) int64         as mask_offset, for the input-frame copy
        input_mask_bits   (B',) uint8            the input-frame masks, box-cropped and bit-packed
      ignore/                     only when the reader has an ignore index (semantic --ignore-index)
        box, mask_offset, mask_bits, input_box, input_mask_offset, input_mask_bits
                                                 each image's ignore region, stored as objects/ stores an
                                                 object's mask, one row per image (N, N + 1 offsets); an
                                                 image without ignored pixels has all-zero boxes, no bytes
      views/<name>/               one group per view other than the identity (--views; embedcache.views):
        embeddings, tap_tokens, original_size, input_size, objects/{box, mask_offset, mask_bits, input_box,
        input_area, input_mask_offset, input_mask_bits}, ignore/...
                                                 as above, for the transformed image; the identity's arrays
                                                 stay at the top level, so readers of views-free caches see
                                                 no difference

Every chunk ends in a crc32c checksum (zarr v3's ``crc32c`` codec, last in each array's codec chain; the
sharding codec checksums each shard's index the same way), so a flipped byte anywhere fails the read that
touches it, and ``embedcache verify`` reads every chunk.

A shard of ``embeddings`` (and of ``tap_tokens``) is one file written whole by one process; ``shard_done[k]``
is set only after that write returns (zarr's LocalStore writes to a temporary file and renames it, so a shard
file is never seen half-written), so a set marker is the only thing a resumed build trusts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from embedcache.models import PROMPT_EMBED_DIM

EMBED_SHAPE = (PROMPT_EMBED_DIM, 64, 64)
TAP_ARRAY = "tap_tokens"
MASK_BITS_CHUNK = 1 << 20  # bytes per chunk of the ragged mask array: ~0.1 ms to decompress, few files
# zarr v3's default compressor (zstd level 0), then a checksum of the compressed bytes: zstd alone does not
# notice every flipped byte
CHECKED = (ZstdCodec(level=0), Crc32cCodec())
# write a chunk even when it equals the fill value, so that a missing file always means a lost file
ALL_CHUNKS = {"write_empty_chunks": True}


def num_shards(n_images: int, images_per_shard: int) -> int:
    return -(-n_images // images_per_shard)


def shard_slice(k: int, images_per_shard: int, n_images: int) -> slice:
    """Image indices of shard ``k``."""
    return slice(k * images_per_shard, min((k + 1) * images_per_shard, n_images))


def _small(group: zarr.Group, name: str, data: np.ndarray) -> None:
    """Write a small array in one chunk (it is always read whole)."""
    chunks = data.shape if data.size else tuple(1 for _ in data.shape)
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype if data.dtype.kind != "U" else str,
        chunks=chunks,
        compressors=CHECKED,
        config=ALL_CHUNKS,
    )
    if data.size:
        arr[...] = data


def _ragged(group: zarr.Group, prefix: str, meta: dict) -> None:
    """Write ``meta``'s ``PREFIX/mask_bits`` and ``PREFIX/input_mask_bits`` in 1 MiB chunks."""
    for name in ("mask_bits", "input_mask_bits"):
        bits = np.asarray(meta[f"{prefix}/{name}"], np.uint8)
        arr = group.create_array(
            name,
            shape=bits.shape,
            dtype=np.uint8,
            chunks=(MASK_BITS_CHUNK,),
            compressors=CHECKED,
            config=ALL_CHUNKS,
        )
        if bits.size:
            arr[:] = bits


def write_metadata(
    group: zarr.Group,
    meta: dict,
    *,
    images_per_shard: int,
    tap_shape: tuple[int, int, int] | None = None,
    views: dict[str, dict] | None = None,
) -> None:
    """Create every array of the layout; fill all but ``embeddings`` (and the markers) from ``meta``.

    ``meta`` holds numpy arrays under the names of the layout (``objects/...`` for the object arrays).
    ``views`` maps each view other than the identity to its own arrays (``embedcache.views.view_metadata``),
    written under ``views/<name>/`` with their own ``embeddings`` (and tap tokens).
    """
    n = len(meta["image_id"])
    for name in ("image_id", "image_path", "split"):
        _small(group, name, np.asarray(meta[name]))
    objects = group.create_group("objects")
    for name in ("image_index", "class_id", "area"):
        _small(objects, name, np.asarray(meta[f"objects/{name}"]))
    _view_arrays(group, meta, n, images_per_shard, tap_shape)
    for name, view_meta in (views or {}).items():
        _view_arrays(
            group.require_group("views").create_group(name), view_meta, n, images_per_shard, tap_shape
        )
    ns = num_shards(n, images_per_shard)
    for name, dtype, fill in (
        ("shard_done", np.int32, 0),
        ("shard_seconds", np.float32, 0.0),
        ("shard_rank", np.int32, -1),
    ):
        group.create_array(name, shape=(ns,), dtype=dtype, chunks=(1,), fill_value=fill, compressors=CHECKED)


def _view_arrays(group: zarr.Group, meta: dict, n: int, s: int, tap_shape) -> None:
    """The arrays one view owns (the identity's at the top level): sizes, object and ignore masks, and the
    empty embeddings (and tap tokens) its shards will fill."""
    for name in ("original_size", "input_size"):
        _small(group, name, np.asarray(meta[name]))
    objects = group.require_group("objects")
    for name in ("box", "mask_offset", "input_box", "input_area", "input_mask_offset"):
        _small(objects, name, np.asarray(meta[f"objects/{name}"]))
    _ragged(objects, "objects", meta)
    if "ignore/box" in meta:
        ignore = group.create_group("ignore")
        for name in ("box", "mask_offset", "input_box", "input_mask_offset"):
            _small(ignore, name, np.asarray(meta[f"ignore/{name}"]))
        _ragged(ignore, "ignore", meta)
    for name, shape in (("embeddings", EMBED_SHAPE), (TAP_ARRAY, tap_shape)):
        if shape is None:  # tap_tokens: partial caches only
            continue
        group.create_array(
            name,
            shape=(n, *shape),
            dtype=np.float16,
            chunks=(1, *shape),  # one image per chunk: any image is readable on its own
            shards=(s, *shape),  # one shard = one writer's unit of work = one file
            # fp16 activations barely compress: raw chunks plus a 4-byte crc32c each
            compressors=Crc32cCodec(),
            fill_value=np.float16("nan"),  # a never-written chunk reads as NaN, which verify catches
        )


def write_shard(
    group: zarr.Group,
    k: int,
    embeddings: np.ndarray,
    *,
    tap: np.ndarray | None = None,
    seconds: float,
    run: int,
    rank: int,
    views: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None,
) -> None:
    """Write shard ``k``'s ``(n, 256, 64, 64)`` float16 embeddings (and a partial cache's ``(n, 64, 64, C)``
    tap tokens) whole, and those of every other view (``views``: name -> (embeddings, tap)), then its done
    marker (last)."""
    for where, (emb, tp) in (
        ("", (embeddings, tap)),
        *((f"views/{v}", et) for v, et in (views or {}).items()),
    ):
        _write_images(group[where] if where else group, k, emb, tp)
    group["shard_seconds"][k] = seconds
    group["shard_rank"][k] = rank
    group["shard_done"][k] = run  # last: only now is the shard trusted


def _write_images(group: zarr.Group, k: int, embeddings: np.ndarray, tap: np.ndarray | None) -> None:
    """Shard ``k`` of one view's embeddings (and tap tokens), each written whole."""
    arr = group["embeddings"]
    sl = shard_slice(k, arr.shards[0], arr.shape[0])
    if embeddings.shape != (sl.stop - sl.start, *EMBED_SHAPE):
        raise ValueError(f"shard {k}: got embeddings of shape {embeddings.shape}")
    if (tap is None) != (TAP_ARRAY not in group) or (tap is not None and tap.shape[0] != sl.stop - sl.start):
        raise ValueError(f"shard {k}: tap tokens {None if tap is None else tap.shape} do not fit this cache")
    arr[sl] = embeddings
    if tap is not None:
        group[TAP_ARRAY][sl] = tap


def storage_files(arr: zarr.Array, folder: Path) -> list[Path]:
    """The files that hold ``arr`` (one per shard when sharded, else one per chunk), in grid order; none
    for an empty array (e.g. no object's mask is left in the input frame)."""
    if not arr.size:
        return []
    block = arr.shards or arr.chunks
    grid = [-(-n // b) for n, b in zip(arr.shape, block)]
    return [Path(folder) / arr.metadata.encode_chunk_key(c) for c in np.ndindex(*grid)]


def shard_file(path: Path, k: int, array: str = "embeddings") -> Path:
    """The file holding shard ``k`` of ``embeddings`` (or ``tap_tokens``; zarr v3 default chunk key encoding
    ``c/k/0/0/0``)."""
    return Path(path) / array / "c" / str(k) / "0" / "0" / "0"


def remove_partial_files(root: Path) -> int:
    """Delete temporary files a killed writer left behind (zarr's ``*.partial``); returns how many."""
    n = 0
    for p in Path(root).rglob("*.partial"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def read_strings(arr: zarr.Array) -> np.ndarray:
    """A string array as a fixed-width numpy ``str`` array (zarr returns numpy's variable-width
    StringDType).
    """
    values = np.asarray(arr[...]).reshape(-1).tolist()
    return np.array(values, dtype=str) if values else np.zeros(0, dtype=str)
