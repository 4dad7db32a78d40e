"""``embedcache verify``: check a cache's completeness and integrity; every problem found is listed.

Every chunk of every array is read, so every crc32c checksum (``embedcache.store``) is checked; a failing
shard is then read image by image to name the images and the file. A cache with views (``embedcache.views``)
has every view checked: its embeddings, its input-frame masks by the rule, and its original-frame masks and
sizes against the identity's transformed by the view. The signature is checked against what
this embedcache derives from its ``model_type`` (encoder, preprocessing, storage dtype).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedcache import masks as mk
from embedcache.cache import Cache, CacheError, open_cache
from embedcache.prepare import input_frame_form
from embedcache.signature import expected_signature
from embedcache.split import assign_split
from embedcache.store import EMBED_SHAPE, shard_file, shard_slice
from embedcache.views import IDENTITY, VIEWS

__all__ = ["shard_file", "verify"]


def _check_images(c: Cache, problems: list[str]) -> None:
    """Per-image checks beyond ``open_cache``'s structural ones (lengths, sizes, split values)."""
    if tuple(c.embeddings.chunks) != (1, *EMBED_SHAPE):
        problems.append(f"embeddings: chunk shape {c.embeddings.chunks}, expected one image per chunk")
    if c.embeddings.dtype != np.float16:
        problems.append(f"embeddings: dtype {c.embeddings.dtype}, expected float16")
    expected_in = np.array([c.preset.input_hw(int(h), int(w)) for h, w in c.original_size], np.int32)
    expected_in = expected_in.reshape(-1, 2)
    for i in np.flatnonzero((expected_in != c.input_size).any(axis=1))[:10]:
        problems.append(f"image {i} ({c.image_id[i]}): input_size {c.input_size[i]} != {expected_in[i]}")
    ids, counts = np.unique(c.image_id, return_counts=True)
    if (counts > 1).any():
        problems.append(f"image_id: duplicates {ids[counts > 1][:10].tolist()}")
    split_def = c.signature.get("dataset", {}).get("split", {})
    if split_def:
        want = assign_split(list(c.image_id), split_def["val_fraction"], split_def["seed"])
        if not np.array_equal(want, c.split):
            problems.append("split: does not follow the recorded split definition")


def _check_signature(c: Cache, problems: list[str]) -> None:
    """The model-side fields must be exactly those of the recorded ``model_type`` and checkpoint id."""
    sig = c.signature
    try:
        want = expected_signature(sig.get("model_type"), sig.get("checkpoint"))
    except (ValueError, FileNotFoundError) as e:  # an unknown model type, or a checkpoint that is not an id
        problems.append(f"signature: {e}")
        return
    for field, value in want.items():
        if sig.get(field) != value:
            model = sig["model_type"]
            problems.append(
                f"signature: {field} is {sig.get(field)!r}, but model_type {model!r} has {value!r}"
            )


def _check_embeddings(c: Cache, problems: list[str]) -> None:
    s, n = c.images_per_shard, c.num_images
    done = np.asarray(c.group["shard_done"][...])
    for k in range(-(-n // s)):
        if done[k] <= 0:
            problems.append(f"shard {k}: not marked done")
        for v in c.views:  # a shard is done only when every view of it is written
            cv = c.view(v)
            for name, what, array in (
                ("embeddings", "embedding", cv.embeddings),
                ("tap_tokens", "tap tokens", cv.tap_tokens),
            ):
                if array is not None:
                    _check_shard(cv, k, cv.view_prefix + name, _named(cv, what), array, problems)


def _named(c: Cache, what: str) -> str:
    """``what``, with the view named when it is not the identity."""
    return f"{what} (view {c.view_name})" if c.view_prefix else what


def _check_shard(c: Cache, k: int, name: str, what: str, array, problems: list[str]) -> None:
    """Shard ``k`` of the per-image array ``name`` (embeddings, or a partial cache's tap tokens)."""
    sl = shard_slice(k, c.images_per_shard, c.num_images)
    if not shard_file(c.path, k, name).is_file():
        problems.append(f"shard {k} (images {sl.start}..{sl.stop - 1}): {name} shard file missing")
        return
    try:
        block = array[sl]  # decodes every chunk of the shard: checks its and the index's crc32c
    except Exception as e:
        where = f"shard {k} ({shard_file(c.path, k, name)})"
        bad = []
        for i in range(sl.start, sl.stop):
            try:
                array[i]
            except Exception as e_i:
                bad.append(f"image {i} ({type(e_i).__name__}: {e_i})")
        problems.append(f"{where}: unreadable, " + ("; ".join(bad) if bad else f"{type(e).__name__}: {e}"))
        return
    bad = ~np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
    for i in np.flatnonzero(bad):
        problems.append(f"image {sl.start + i} ({c.image_id[sl.start + i]}): non-finite {what} values")
    allzero = ~block.reshape(block.shape[0], -1).any(axis=1)
    for i in np.flatnonzero(allzero):
        problems.append(f"image {sl.start + i} ({c.image_id[sl.start + i]}): {what} is all zeros")


def _check_objects(c: Cache, problems: list[str]) -> None:
    """Every object's masks, areas and input-frame copy against the rule; ``open_cache`` has already
    checked the lengths, the image index, the boxes and the byte counts (``embedcache.structure``)."""
    # an image without objects is valid data (docs/datasets.md), not a problem
    o, m = c.objects, c.num_objects
    for j in range(m):
        box = o.box[j]
        where = _named(c, f"object {j} (image {o.image_index[j]})")
        crop = c.mask_crop(j)
        i = o.image_index[j]
        want_box, want_bits = input_frame_form(crop, box, c.original_size[i], c.input_size[i])
        in_box, in_crop = c.input_mask_crop(j)
        got_bits = np.packbits(in_crop.ravel())
        if tuple(int(v) for v in in_box) != want_box or not np.array_equal(got_bits, want_bits):
            problems.append(f"{where}: stored input-frame mask differs from the rule applied to the original")
        elif int(in_crop.sum()) != o.input_area[j]:
            problems.append(f"{where}: input_area {o.input_area[j]} != {int(in_crop.sum())}")
        if int(crop.sum()) != o.area[j]:
            problems.append(f"{where}: mask area {int(crop.sum())} != stored area {o.area[j]}")
        if not (crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()):
            problems.append(f"{where}: box is not the tight box of its mask")
        if len(problems) > 100:
            problems.append("... stopping after 100 problems")
            return


def _check_ignore(c: Cache, problems: list[str]) -> None:
    """Each image's stored input-frame ignore region against the rule applied to its original-frame one."""
    if c._ignore is None:
        return
    for i in range(c.num_images):
        original = c.ignore_mask(i, "original")
        box = mk.mask_box(original)
        want = np.zeros((c.image_size,) * 2, bool)
        if box is not None:
            x1, y1, x2, y2 = box
            mk.crop_to_input(
                original[y1:y2, x1:x2], box, original.shape, c.input_size[i], side=c.image_size, out=want
            )
        if not np.array_equal(c.ignore_mask(i, "input"), want):
            problems.append(
                _named(c, f"image {i} ({c.image_id[i]})") + ": stored input-frame ignore region differs from "
                "the rule"
            )


def _check_view(c: Cache, v: str, problems: list[str]) -> None:
    """View ``v``'s sizes and original-frame masks and ignore region are the identity's transformed by it
    (``embedcache.views``); its input frames are checked by the same rule as the identity's."""
    cv, view = c.view(v), VIEWS[v]
    want_hw = np.array([view.hw(int(h), int(w)) for h, w in c.original_size]).reshape(-1, 2)
    if not np.array_equal(want_hw, cv.original_size):
        problems.append(f"view {v}: original_size is not the identity's transformed by the view")
        return
    want_in = np.array([c.preset.input_hw(int(h), int(w)) for h, w in want_hw]).reshape(-1, 2)
    if not np.array_equal(want_in, cv.input_size):
        problems.append(f"view {v}: input_size does not follow the preset's rule")
    for j in range(c.num_objects):
        i = c.objects.image_index[j]
        box = view.box(c.objects.box[j], *(int(x) for x in c.original_size[i]))
        if tuple(int(x) for x in cv.objects.box[j]) != box or not np.array_equal(
            view.apply(c.mask_crop(j)), cv.mask_crop(j)
        ):
            problems.append(
                _named(cv, f"object {j} (image {i})") + ": mask is not the identity's transformed"
            )
            if len(problems) > 100:
                return
    for i in range(c.num_images if c._ignore is not None else 0):
        if not np.array_equal(view.apply(c.ignore_mask(i)), cv.ignore_mask(i)):
            problems.append(_named(cv, f"image {i}") + ": ignore region is not the identity's transformed")


def verify(path: str | Path, *, embeddings: bool = True) -> list[str]:
    """All problems found in the cache at ``path`` (empty when it is sound).

    Args:
        embeddings: also read every shard (checks it exists, decodes, is finite and not all zero).
    """
    try:
        c = open_cache(path)
    except CacheError as e:
        return [str(e)]
    problems: list[str] = []
    _check_signature(c, problems)
    _check_images(c, problems)
    if embeddings and not problems:
        _check_embeddings(c, problems)
    try:
        for v in c.views:
            if v != IDENTITY:
                _check_view(c, v, problems)
            _check_objects(c.view(v), problems)
            _check_ignore(c.view(v), problems)
    except CacheError as e:  # the ragged mask arrays are read here, not at open
        problems.append(str(e))
    return problems
