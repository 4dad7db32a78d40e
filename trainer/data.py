"""Reading steps from the cache: residency modes, background reader threads, pinned non-blocking copies.

A micro-batch is ``B`` images and up to ``K`` objects of each, all objects concatenated into one ``P``-long
batch with ``image_index`` pointing into the ``B`` embeddings. Images with more than ``K`` objects contribute
a fresh random ``K`` of them each epoch (a pure function of seed, epoch and image); images with fewer
contribute all of theirs, so uneven counts are kept as they are, never truncated to the smallest.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.order import view_of
from trainer.prompts import to_input_frame

EMBEDDING_BYTES = 256 * 64 * 64 * 2  # one float16 embedding


OBJECT_ROWS = (
    "image_index",
    "mask_boxes",
    "boxes",
    "valid_hw",
    "object_ids",
    "masks",
    "target_boxes",
    "targets",
)
"""The ``Batch`` fields with one row per object (``Batch.select``); the crops are concatenated, not rows."""


@dataclass
class Batch:
    """One micro-batch. Object tensors have ``P`` rows, image tensors ``B``."""

    embeddings: torch.Tensor
    """``(B, 256, 64, 64)`` float16 image embeddings, or the ``(B, 64, 64, C)`` tap tokens the model's
    encoder tail turns into them (``ImageStore``)."""
    image_index: torch.Tensor
    """``(P,)`` int64 image of each object, into ``embeddings``."""
    mask_pixels: torch.Tensor
    """``(S,)`` uint8 (0/1): each object's input-frame mask inside its ``mask_boxes`` box, row-major,
    concatenated. S is the summed box area, far below ``P * side**2`` for most objects."""
    mask_boxes: torch.Tensor
    """``(P, 4)`` int64 xyxy boxes of those crops in the input frame (x2, y2 exclusive)."""
    boxes: torch.Tensor
    """``(P, 4)`` float32 tight xyxy boxes in the input frame."""
    valid_hw: torch.Tensor
    """``(P, 2)`` int64 input size (h, w) of each object's image."""
    object_ids: torch.Tensor
    """``(P,)`` int64 object indices in the cache."""
    image_ids: torch.Tensor
    """``(B,)`` int64 image indices in the cache."""
    image_valid_hw: torch.Tensor
    """``(B, 2)`` int64 input size of each image."""
    side: int
    """The preset's square input frame side S in pixels (1024 for SAM, 256 for LiteMedSAM)."""
    labels: torch.Tensor | None = None
    """``(B, S, S)`` int64 class map in the input frame (-100 in the padding and the cache's ignore region);
    semantic task only."""
    masks: torch.Tensor | None = None
    """``(P, S, S)`` bool target masks in the input frame, assembled by ``to`` on the step's device
    from the crops, so only the crops cross the host-device link. ``None`` until then, and for semantic
    batches (their targets are ``labels``)."""
    target_pixels: torch.Tensor | None = None
    """``(S',)`` uint8 coverage crops (``data.targets: coverage``): each object's share of every input pixel
    inside its ``target_boxes`` box, in 255ths (``embedcache.masks.input_coverage``), concatenated as
    ``mask_pixels``. ``None`` for the nearest rule's targets and for semantic batches."""
    target_boxes: torch.Tensor | None = None
    """``(P, 4)`` int64 xyxy boxes of the coverage crops in the input frame (x2, y2 exclusive)."""
    targets: torch.Tensor | None = None
    """``(P, S, S)`` uint8 coverage targets, pasted by ``to`` from the coverage crops as ``masks`` is;
    ``None`` without coverage crops (the loss then reads ``masks``)."""
    views: tuple[str, ...] | None = None
    """The cache view each of the ``B`` images was read in (``embedcache.views``), or None when all are the
    identity. A task that keeps its own per-image targets (not read from the batch) must key them by view."""

    def pin(self) -> Batch:
        """Page-locked copies, so that ``to(device, non_blocking=True)`` overlaps with compute."""
        return Batch(**{f.name: _map(getattr(self, f.name), _pin) for f in fields(self)})

    def to(self, device: torch.device) -> Batch:
        """All tensors on ``device``, copied without blocking the host (from pinned memory), and the
        ``(P, S, S)`` target masks pasted together there from the crops."""
        moved = Batch(
            **{
                f.name: _map(getattr(self, f.name), lambda t: t.to(device, non_blocking=True))
                for f in fields(self)
            }
        )
        if moved.masks is None and moved.labels is None:  # a semantic batch's targets are its labels
            moved.masks = paste_crops(moved.mask_pixels, moved.mask_boxes, moved.side)
        if moved.targets is None and moved.target_pixels is not None:
            moved.targets = paste_crops(moved.target_pixels, moved.target_boxes, moved.side, torch.uint8)
        return moved

    def prompt_masks(self) -> torch.Tensor:
        """``(P, S, S)`` bool: the masks clicks are drawn from and judged against. With coverage targets, the
        input pixels at least half covered, so that a click agrees with the loss's target (an object with no
        such pixel, a sliver the downsizing thins out, keeps its nearest-rule mask); else ``masks``."""
        if self.targets is None:
            return self.masks
        half = self.targets >= 128
        thin = ~half.flatten(1).any(1)
        return torch.where(thin[:, None, None], self.masks, half)

    @property
    def num_objects(self) -> int:
        return int(self.image_index.shape[0])

    def select(self, rows: torch.Tensor) -> Batch:
        """The batch of the objects ``rows`` (``(P',)`` int64 into the ``P`` objects, in that order), their
        crops included; the image tensors are unchanged."""
        picked = {k: getattr(self, k)[rows] for k in OBJECT_ROWS if getattr(self, k) is not None}
        picked["mask_pixels"] = crop_rows(self.mask_pixels, self.mask_boxes, rows)
        if self.target_pixels is not None:
            picked["target_pixels"] = crop_rows(self.target_pixels, self.target_boxes, rows)
        return replace(self, **picked)


def _map(v, fn):
    return fn(v) if isinstance(v, torch.Tensor) else v


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if t.device.type == "cpu" else t  # device-resident embeddings are already there


def crop_rows(pixels: torch.Tensor, boxes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The concatenated crops of the objects ``rows`` (in that order) out of ``(S,)`` concatenated crops
    whose ``(P, 4)`` xyxy ``boxes`` give each crop's size (``Batch.mask_pixels``)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    start = torch.cumsum(area, 0) - area
    n = area[rows]
    # each kept crop's pixels: its start in ``pixels`` plus 0 .. n - 1
    within = torch.arange(int(n.sum()), device=pixels.device)
    within -= torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return pixels[torch.repeat_interleave(start[rows], n) + within]


def paste_crops(
    pixels: torch.Tensor, boxes: torch.Tensor, side: int, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Full masks from crops, on the crops' device.

    Args:
        pixels: ``(S,)`` uint8 crop pixels, object after object, row-major inside each box.
        boxes: ``(P, 4)`` int64 xyxy crop boxes inside a ``side x side`` frame; S = their summed area.
        dtype: ``torch.bool`` (masks: nonzero is True) or ``torch.uint8`` (the pixels' values, coverage).
    Returns:
        ``(P, side, side)`` ``dtype``, the crops at their boxes and 0 elsewhere.

    On CUDA one scatter places every pixel (no per-object launches, no host sync). On the host a loop of
    per-object slice copies is faster: for the demo cache's 53 objects it took 1/12 to 1/15 of the scatter's
    time on the 2-core build machine, and the same time as ``cache.masks(idx, "input")`` (same runs).
    """
    widths = boxes[:, 2] - boxes[:, 0]
    areas = widths * (boxes[:, 3] - boxes[:, 1])
    if pixels.is_cuda:
        out = torch.zeros(boxes.shape[0], side, side, dtype=dtype, device=pixels.device)
        _scatter_crops(out, pixels, boxes, widths, areas)
        return out
    # numpy on the host: calloc'd zeros (pages fault in when first touched, not in a memset up front) and
    # slice copies without torch's per-op overhead.
    dst = np.zeros((boxes.shape[0], side, side), bool if dtype == torch.bool else np.uint8)
    src = pixels.numpy()
    starts = (torch.cumsum(areas, 0) - areas).tolist()
    for k, ((x1, y1, x2, y2), start) in enumerate(zip(boxes.tolist(), starts)):
        dst[k, y1:y2, x1:x2] = src[start : start + (y2 - y1) * (x2 - x1)].reshape(y2 - y1, x2 - x1)
    return torch.from_numpy(dst)


def _scatter_crops(out, pixels, boxes, widths, areas) -> None:
    """``paste_crops``'s device path: each of the S pixels finds its object, row and column arithmetically."""
    p, side = out.shape[0], out.shape[-1]
    obj = torch.repeat_interleave(torch.arange(p, device=pixels.device), areas, output_size=pixels.numel())
    local = torch.arange(pixels.numel(), device=pixels.device) - (torch.cumsum(areas, 0) - areas)[obj]
    w = widths[obj]
    rows = boxes[obj, 1] + torch.div(local, w, rounding_mode="floor")
    cols = boxes[obj, 0] + local.remainder(w)
    out.view(-1)[(obj * side + rows) * side + cols] = pixels.to(out.dtype)


def read_crops(cache, obj_idx: np.ndarray, frame: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """``(S,)`` uint8 crop pixels and ``(n, 4)`` int64 input-frame boxes of objects ``obj_idx``: their bool
    input masks (``frame="input"``) or their coverage (``"coverage"``, ``Cache.input_coverage_crop``)."""
    read = cache.input_mask_crop if frame == "input" else cache.input_coverage_crop
    boxes, crops = [np.zeros((0, 4), np.int64)], [np.zeros(0, np.uint8)]
    for j in obj_idx:
        box, crop = read(int(j))
        boxes.append(np.asarray(box, np.int64)[None])
        crops.append(crop.reshape(-1).view(np.uint8))
    return np.concatenate(crops), np.concatenate(boxes)


def input_boxes(cache, obj_idx: np.ndarray) -> np.ndarray:
    """``(n, 4)`` float32 cache boxes (original pixels) scaled to the input frame, as
    ``ResizeLongestSide.apply_boxes`` scales them for ``SamPredictor``."""
    img = cache.objects.image_index[obj_idx]
    corners = cache.objects.box[obj_idx].reshape(-1, 2, 2)
    scaled = to_input_frame(corners, cache.original_size[img][:, None], cache.input_size[img][:, None])
    return scaled.reshape(-1, 4).astype(np.float32)


def image_file(cache, i: int) -> str:
    """The source image of cache image ``i`` (for overlays), resolved against the build's data folder."""
    path = Path(str(cache.image_path[i]))
    if not path.is_absolute():
        path = Path(str(cache.build_report.get("data", "."))) / path
    return str(path)


def trained_views(cache, cfg: DataConfig) -> tuple[str, ...]:
    """The cache views training reads (``data.views``): all of them, or the identity alone."""
    return cache.views if cfg.views == "all" else cache.views[:1]


def pick_residency(
    cache, positions: np.ndarray, cfg: DataConfig, device: torch.device, *, tail_blocks: int = 0
) -> str:
    """Resolve ``auto``: ``device`` when the images fit in a quarter of free GPU memory, else ``host`` when
    they fit in a quarter of RAM, else ``stream``. An explicit mode is kept; ``device`` on CPU means ``host``.
    """
    if cfg.residency != "auto":
        return "host" if cfg.residency == "device" and device.type != "cuda" else cfg.residency
    # only embeddings (or tap tokens) are kept resident, of every view read; masks are packed bits already
    per_image = int(np.prod(cache.tap_tokens.shape[1:])) * 2 if tail_blocks else EMBEDDING_BYTES
    per_image *= len(trained_views(cache, cfg))
    need = len(positions) * per_image
    if device.type == "cuda" and need < torch.cuda.mem_get_info(device)[0] // 4:
        return "device"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 0
    return "host" if need < ram // 4 else "stream"


class ImageStore:
    """Per-image reads with a residency mode: ``stream`` reads Zarr every time, ``host`` keeps each image's
    embedding in RAM after its first read, ``device`` keeps it on the GPU. Object masks are read from the
    cache's packed in-memory bits either way, unpacked to box crops on the reader threads and pasted into
    full input-frame masks on the step's device (``Batch.to``).

    For a model with an encoder tail of ``tail_blocks`` blocks (``trainer.encoder_tail``) the store reads the
    partial cache's tap tokens instead of the embeddings; the cache must have been built with that many.

    A cache with views (``embedcache.views``) is read in the view asked for each image (the identity unless
    asked: validation always reads the identity)."""

    def __init__(self, cache, residency: str, device: torch.device, *, tail_blocks: int = 0):
        if tail_blocks and cache.tail_blocks != tail_blocks:
            raise ValueError(
                f"{cache.path}: model.encoder_tail_blocks={tail_blocks} needs a cache built with "
                f"--tail-blocks {tail_blocks}; this one has "
                + (f"--tail-blocks {cache.tail_blocks}" if cache.tail_blocks else "no tap tokens")
            )
        self.cache = cache
        self.residency = residency
        self.device = device
        self.tail_blocks = tail_blocks
        self._resident: dict[tuple[str, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    def _read(self, view: str, idx) -> np.ndarray:
        c = self.cache.view(view)
        return c.read_tap(idx) if self.tail_blocks else c.read_embeddings(idx)

    def embeddings(self, idx: np.ndarray, views: list[str] | None = None) -> torch.Tensor:
        """``(n, 256, 64, 64)`` float16 embeddings, or ``(n, 64, 64, C)`` tap tokens with an encoder tail (on
        the GPU in ``device`` mode, else on the host), of image ``idx[b]`` in view ``views[b]`` (None: all in
        the identity)."""
        keys = list(zip(views or [self.cache.views[0]] * len(idx), (int(i) for i in idx)))
        if self.residency == "stream":
            if len({v for v, _ in keys}) <= 1:
                view = keys[0][0] if keys else self.cache.views[0]
                return torch.from_numpy(np.ascontiguousarray(self._read(view, idx)))
            return torch.stack([torch.from_numpy(self._read(v, [i])[0]) for v, i in keys])
        missing = [key for key in dict.fromkeys(keys) if key not in self._resident]
        for view in dict.fromkeys(v for v, _ in missing):
            ids = [i for v, i in missing if v == view]
            read = torch.from_numpy(np.ascontiguousarray(self._read(view, np.asarray(ids))))
            if self.residency == "device":
                read = read.to(self.device)
            with self._lock:
                self._resident.update(zip(((view, i) for i in ids), read))
        return torch.stack([self._resident[key] for key in keys])


def choose_objects(cache, images: np.ndarray, k: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Object indices per image: all of them if at most ``k``, else a random ``k``, fresh each epoch. Objects
    that vanish at the input size (no target pixel, and ``evaluate`` does not score them) are left out."""
    out = []
    for i in images:
        start, stop = cache.object_range(int(i))
        objs = np.arange(start, stop)
        objs = objs[cache.objects.input_area[objs] > 0]
        if len(objs) > k:
            objs = np.sort(np.random.default_rng([seed, epoch, int(i)]).choice(objs, k, replace=False))
        out.append(objs)
    return out


def read_batch(
    store: ImageStore,
    images: np.ndarray,
    k: int,
    seed: int,
    epoch: int,
    *,
    semantic: bool = False,
    views: list[str] | None = None,
    coverage: bool = False,
) -> Batch:
    """Read one micro-batch of the images ``images`` (cache indices), image ``b`` in view ``views[b]`` (None:
    all in the identity); see ``Batch``. A view's embedding, boxes, masks and sizes are all its own. With
    ``coverage`` (an instance batch under ``data.targets: coverage``) the objects' coverage crops too."""
    cache = store.cache
    caches = [cache.view(v) for v in views] if views is not None else [cache] * len(images)
    per_image = [
        choose_objects(c, [i], k if not semantic else 1 << 30, seed, epoch)[0] for c, i in zip(caches, images)
    ]
    obj = np.concatenate(per_image).astype(np.int64)
    image_index = np.repeat(np.arange(len(images)), [len(o) for o in per_image])
    crops = [read_crops(c, o) for c, o in zip(caches, per_image)]
    pixels, mask_boxes = np.concatenate([p for p, _ in crops]), np.concatenate([b for _, b in crops])
    valid = np.stack([c.input_size[i] for c, i in zip(caches, images)]).astype(np.int64).reshape(-1, 2)
    target_pixels = target_boxes = None
    if coverage and not semantic:
        soft = [read_crops(c, o, "coverage") for c, o in zip(caches, per_image)]
        target_pixels = torch.from_numpy(np.concatenate([p for p, _ in soft]))
        target_boxes = torch.from_numpy(np.concatenate([b for _, b in soft]))
    labels = None
    if semantic:
        lab = np.zeros((len(images), cache.image_size, cache.image_size), np.int64)
        for b, j in zip(image_index, obj):
            (x1, y1, x2, y2), crop = caches[b].input_mask_crop(int(j))
            lab[b, y1:y2, x1:x2][crop] = cache.objects.class_id[j]
        for b in range(len(images)):
            lab[b, valid[b, 0] :, :] = -100
            lab[b, :, valid[b, 1] :] = -100
            if cache.ignore_index is not None:  # the dataset's ignore pixels are not background
                lab[b][caches[b].ignore_mask(int(images[b]), "input")] = -100
        labels = torch.from_numpy(lab)
    return Batch(
        embeddings=store.embeddings(images, views),
        image_index=torch.from_numpy(image_index.astype(np.int64)),
        mask_pixels=torch.from_numpy(pixels),
        mask_boxes=torch.from_numpy(mask_boxes),
        boxes=torch.from_numpy(np.concatenate([input_boxes(c, o) for c, o in zip(caches, per_image)])),
        valid_hw=torch.from_numpy(valid[image_index]),
        object_ids=torch.from_numpy(obj),
        image_ids=torch.from_numpy(np.asarray(images, np.int64)),
        image_valid_hw=torch.from_numpy(valid),
        side=cache.image_size,
        labels=labels,
        target_pixels=target_pixels,
        target_boxes=target_boxes,
        views=None if views is None else tuple(views),
    )


class Prefetcher:
    """Reads micro-batches on background threads, ``prefetch`` ahead, and yields them in order.

    ``jobs`` is a list of ``(epoch, images)``; batches come back pinned when ``pin`` (CUDA runs), ready for
    ``Batch.to(device)``'s non-blocking copy.
    """

    def __init__(self, store: ImageStore, jobs, cfg: DataConfig, *, seed: int, semantic: bool, pin: bool):
        self.store, self.jobs, self.cfg = store, iter(jobs), cfg
        self.seed, self.semantic, self.pin = seed, semantic, pin
        self.pool = ThreadPoolExecutor(cfg.readers, thread_name_prefix="trainer-read")
        self.queue: deque = deque()
        for _ in range(cfg.prefetch):
            self._submit()

    def _read(self, epoch: int, images: np.ndarray) -> Batch:
        views = trained_views(self.store.cache, self.cfg)
        # one view per image per epoch (trainer.order.view_of); a cache without views reads the identity
        chosen = (
            [views[view_of(self.seed, epoch, int(i), len(views))] for i in images] if len(views) > 1 else None
        )
        batch = read_batch(
            self.store,
            images,
            max(self.cfg.max_objects, self.cfg.hardest_of),  # data.hardest_of's candidates
            self.seed,
            epoch,
            semantic=self.semantic,
            views=chosen,
            coverage=self.cfg.targets == "coverage",
        )
        # A CUDA run pastes the targets on the GPU after the copy; a host run pastes them here, off the step.
        return batch.pin() if self.pin else batch.to(torch.device("cpu"))

    def _submit(self) -> None:
        job = next(self.jobs, None)
        if job is not None:
            self.queue.append(self.pool.submit(self._read, *job))

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if not self.queue:
            self.close()
            raise StopIteration
        batch = self.queue.popleft().result()
        self._submit()
        return batch

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
