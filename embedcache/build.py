"""``build_cache``: scan, validate and encode a dataset into a cache; resumable and multi-process.

Order of work (rank 0 = the main process; with one process it does everything):

0. rank 0 takes the cache's build lock (``embedcache.lock``) for the whole build: a second writer is refused.
1. rank 0 scans the dataset, fingerprints it and decides: fresh build, resume, nothing to do, or refuse
   (an existing store built from other data/model, unless ``overwrite``). A fresh build runs the metadata pass
   into a hidden sibling folder, writes every array but the embeddings there, marks it ``prepared`` and only
   then renames it to ``out``: ``out`` is never a half-prepared store.
2. every rank encodes the unfinished shards ``k`` with ``k % world_size == rank``, each shard written whole
   and then marked done, so a kill at any moment loses at most the shards in flight.
3. after a barrier, rank 0 checks every shard is marked done and only then writes the build report and
   ``status: complete``. ``open_cache`` refuses anything else.

Any OS error while writing (disk full, read-only folder) is raised as ``CacheWriteError`` naming the path and
what to do; the store is left resumable by the same command.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import zarr

from embedcache.distributed import ProcessContext, process_context
from embedcache.encode import ShardJob, encode_shards
from embedcache.fingerprint import dataset_fingerprint
from embedcache.images import DEFAULT_MAX_PIXELS
from embedcache.lock import CacheLockedError, build_lock
from embedcache.models import MODEL_TYPES, build_sam
from embedcache.prepare import DEFAULT_MIN_OBJECT_AREA, BadDataError, collect_metadata
from embedcache.presets import get_preset
from embedcache.readers import MASK_KINDS, make_reader
from embedcache.signature import expected_signature
from embedcache.split import split_definition
from embedcache.store import (
    read_strings,
    remove_partial_files,
    shard_file,
    shard_slice,
    write_metadata,
    write_shard,
)
from embedcache.tap import tap_description
from embedcache.views import IDENTITY, VIEWS, parse_views, view_metadata

__all__ = [
    "BadDataError",
    "BuildConfig",
    "CacheExistsError",
    "CacheLockedError",
    "CacheWriteError",
    "build_cache",
    "report_warnings",
]

NOTES = (
    "skipped",
    "min_object_area",
    "objects_below_min_area",
    "objects_vanished",
    "images_without_objects",
    "unclean_masks",
)
"""The metadata pass's findings, copied from the prepare report into the build report."""
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CacheExistsError(Exception):
    """``out`` holds something this build must not touch without ``overwrite`` (or at all)."""


class CacheWriteError(RuntimeError):
    """The operating system refused a write of the build (disk full, read-only, no permission)."""

    def __init__(self, out: Path, e: OSError):
        where = e.filename or out
        advice = {
            errno.ENOSPC: "the disk is full; free space and rerun the same command: finished shards are kept",
            errno.EDQUOT: "the disk quota is exhausted; free space and rerun the same command",
            errno.EROFS: f"the file system is read-only; choose a writable --out than {out}",
            errno.EACCES: f"no permission to write there; choose a writable --out than {out}",
            errno.EPERM: f"no permission to write there; choose a writable --out than {out}",
        }.get(e.errno, f"while building {out}; rerun the same command to resume")
        super().__init__(f"{where}: {e.strerror or e} ({advice})")


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Everything ``embedcache build`` needs; the CLI flags map one to one onto these fields."""

    data: Path
    """Dataset folder: ``images/`` + ``masks/`` (folder layout), or the image root that COCO file names are
    relative to."""
    out: Path
    """The cache to write (a ``.zarr`` directory)."""
    model_type: str
    """One of ``embedcache.models.MODEL_TYPES``."""
    checkpoint: Path | str | None = None
    """Weights: a state-dict path or an official name (``embedcache.weights``); None = random init."""
    init_seed: int = 0
    """Seed of the random init when ``checkpoint`` is None (recorded as ``random-init:<seed>``)."""
    mask_kind: str = "instance"
    """Folder layout only: ``instance``, ``binary`` or ``semantic``."""
    ignore_index: int | None = None
    """Semantic masks: label value that belongs to no object (e.g. 255)."""
    coco: Path | None = None
    """COCO JSON with polygon/RLE annotations; replaces the folder layout's masks."""
    allow_outside_symlinks: bool = False
    """Follow symlinks in the data folder that lead outside it. Off: such files are bad items (a dataset
    cannot make the build read, or the cache name, files elsewhere on the machine). Paths that leave the
    folder by name (a COCO ``file_name`` that is absolute or holds '..') are refused either way."""
    val_fraction: float = 0.2
    """Fraction of images in the val split (rounded to a whole number of images)."""
    seed: int = 0
    """Seed of the train/val split."""
    batch_size: int = 4
    """Images per encoder call."""
    device: str = "auto"
    """``auto`` (accelerate's device, else CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """Encoder compute dtype: ``auto`` (bf16 autocast on CUDA, float32 on CPU), ``float32`` or
    ``bfloat16``.
    """
    images_per_shard: int = 8
    """Images per shard (one file, one writer's unit of work): 16 MiB of float16 embeddings at 8."""
    workers: int = 4
    """Threads decoding and resizing images ahead of the encoder."""
    skip_bad: bool = False
    """Leave bad items out (listed in the build report) instead of failing."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest ``H * W`` of an image or mask; bigger files are bad items, refused from their header before
    being decoded."""
    channels: tuple[int, int, int] | None = None
    """The source channel of R, G and B for images whose channels are neither grey, RGB nor RGB with a
    declared alpha (``embedcache.images.map_channels``); None refuses such images. Declared images ignore
    it."""
    min_object_area: int = DEFAULT_MIN_OBJECT_AREA
    """Smallest object kept, in original pixels; smaller ones are dropped and counted in the build report
    (``embedcache.prepare.DEFAULT_MIN_OBJECT_AREA`` says why 10)."""
    overwrite: bool = False
    """Replace an existing cache at ``out`` instead of resuming it or refusing."""
    progress: bool = True
    """Show a tqdm progress bar with images/s."""
    tail_blocks: int = 0
    """A partial cache: also store the tokens entering the encoder's last ``tail_blocks`` blocks
    (``embedcache.tap``), so the trainer can adapt those blocks. 0: embeddings only."""
    views: tuple[str, ...] = (IDENTITY,)
    """Augmentation views encoded per image (``embedcache.views``; ``--views none|flips|d4|hflip,...``),
    identity first; each costs one more encoder pass and one more embedding per image."""

    def __post_init__(self):
        object.__setattr__(self, "views", parse_views(self.views))
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(self.channels))
            if len(self.channels) != 3 or min(self.channels) < 0:
                raise ValueError(f"channels must be three source channels >= 0 (R,G,B), got {self.channels}")
        if self.tail_blocks < 0:
            raise ValueError(f"tail_blocks must be >= 0, got {self.tail_blocks}")
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if self.coco is not None:
            object.__setattr__(self, "coco", Path(self.coco))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {self.mask_kind!r}")
        if self.ignore_index is not None and self.mask_kind != "semantic":
            raise ValueError("ignore_index applies to mask_kind='semantic' only")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(
                f"val_fraction must be in [0, 1] (1: a held-out test cache), got {self.val_fraction}"
            )
        for name in ("batch_size", "images_per_shard", "workers", "max_pixels", "min_object_area"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.data.is_dir():
            raise FileNotFoundError(f"{self.data}: data folder not found")


def _resolve_device(cfg: BuildConfig, ctx: ProcessContext) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = ctx.default_device
    elif cfg.device == "cuda" and ctx.default_device.type == "cuda":
        device = ctx.default_device  # accelerate picked this rank's GPU
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {cfg.device!r} requested but CUDA is not available")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[cfg.dtype]
    return device, dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            if (d := _first_difference(va, vb, f"{prefix}{k}.")) is not None:
                return d
        elif va != vb:
            return f"{prefix}{k}: existing {va!r}, this build {vb!r}"
    return None


def _is_store(out: Path) -> bool:
    """True when ``out`` is an embedcache store (a Zarr group with a signature), complete or not."""
    try:
        return "signature" in zarr.open_group(out, mode="r").attrs
    except Exception:
        return False


def _prepare(
    cfg: BuildConfig, checkpoint, compute_dtype: torch.dtype, world_size: int, device: torch.device
) -> None:
    """Rank 0's step 1 (module docstring): leave ``out`` prepared (or complete) with this build's run
    recorded.
    """
    t0 = time.perf_counter()
    reader = make_reader(
        cfg.data,
        coco=cfg.coco,
        mask_kind=cfg.mask_kind,
        ignore_index=cfg.ignore_index,
        allow_outside_symlinks=cfg.allow_outside_symlinks,
    )
    scan = reader.scan()
    signature = expected_signature(cfg.model_type, checkpoint, init_seed=cfg.init_seed)
    signature.update(
        compute_dtype=_dtype_name(compute_dtype),
        dataset={
            "fingerprint": dataset_fingerprint(cfg.data, scan.files, workers=cfg.workers),
            "num_files": len(scan.files),
            **reader.describe(),
            "skip_bad": cfg.skip_bad,
            "max_pixels": cfg.max_pixels,
            "min_object_area": cfg.min_object_area,
            "channels": cfg.channels,
            "split": split_definition(cfg.val_fraction, cfg.seed),
        },
        layout={"images_per_shard": cfg.images_per_shard},
    )
    tap = _tap_description(cfg)
    if tap is not None:
        signature["tap"] = tap  # a resume with another tap point is refused like any other difference
    if cfg.views != (IDENTITY,):  # absent = identity only, so caches built before views keep their signature
        signature["views"] = list(cfg.views)
    signature = _json_roundtrip(signature)
    out = cfg.out
    staging = out.with_name(f".{out.name}.preparing")  # ours alone: we hold the build lock
    for leftover in (staging, out.with_name(f".{out.name}.replaced")):  # from a killed build
        if leftover.exists():
            shutil.rmtree(leftover)
    fresh = True
    if out.exists():
        if not _is_store(out):
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:
                raise CacheExistsError(
                    f"{out}: exists and is not an embedcache cache; refusing to touch it (remove it yourself)"
                )
        else:
            group = zarr.open_group(out, mode="r+")
            attrs = group.attrs.asdict()
            diff = _first_difference(attrs["signature"], signature)
            if attrs.get("status") not in ("prepared", "complete"):
                pass  # killed during the metadata pass (older builds prepared in place): nothing to keep
            elif diff is not None and not cfg.overwrite:
                raise CacheExistsError(
                    f"{out}: holds a cache built differently ({diff}); pass --overwrite to replace it"
                )
            elif not cfg.overwrite:
                fresh = False
                remove_partial_files(out)
    if fresh:
        try:
            _prepare_staging(cfg, reader, scan, signature, staging, t0)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # nothing of it is worth keeping
            raise
        if out.exists():  # an old cache being overwritten, or a store killed while preparing
            replaced = out.with_name(f".{out.name}.replaced")
            os.rename(out, replaced)
            os.rename(staging, out)
            shutil.rmtree(replaced)
        else:
            os.rename(staging, out)
        group = zarr.open_group(out, mode="r+")
    if group.attrs.get("status") == "complete":
        return  # nothing to do; a finished cache is not touched
    runs = list(group.attrs.get("runs", []))
    runs.append(
        {
            "run": len(runs) + 1,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "world_size": world_size,
            "device": device.type,
            "batch_size": cfg.batch_size,
            "resumed": not fresh,
            "prepare_seconds": round(time.perf_counter() - t0, 3),
        }
    )
    group.attrs.update(runs=runs)


def _prepare_staging(cfg: BuildConfig, reader, scan, signature: dict, staging: Path, t0: float) -> None:
    """The metadata pass into ``staging``, left ``prepared`` (renamed to ``out`` by the caller)."""
    group = zarr.open_group(staging, mode="w")
    group.attrs.put({"signature": signature, "status": "preparing", "runs": []})
    meta, notes = collect_metadata(
        reader,
        scan.records,
        scan_bad=scan.bad,
        skip_bad=cfg.skip_bad,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        workers=cfg.workers,
        preset=get_preset(cfg.model_type),
        max_pixels=cfg.max_pixels,
        min_object_area=cfg.min_object_area,
        channels=cfg.channels,
    )
    tap = signature.get("tap")
    preset = get_preset(cfg.model_type)
    write_metadata(
        group,
        meta,
        images_per_shard=cfg.images_per_shard,
        tap_shape=None if tap is None else tuple(tap["shape"]),
        views={v: view_metadata(meta, VIEWS[v], preset) for v in cfg.views[1:]},
    )
    group.attrs.update(
        status="prepared",
        prepare_report={
            "data": str(cfg.data.resolve()),
            "images_found": len(scan.records) + sum(1 for b in scan.bad),
            **notes,
            "crowd_annotations_ignored": getattr(reader, "crowd_skipped", 0),
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )


def _tap_description(cfg: BuildConfig) -> dict | None:
    """The tap point of a partial cache (``embedcache.tap``), from a weightless copy of the encoder."""
    if cfg.tail_blocks == 0:
        return None
    if get_preset(cfg.model_type).encoder.kind == "tiny_vit":
        encoder = build_sam(cfg.model_type).image_encoder  # small; its init reads tensor values: not on meta
    else:
        with torch.device("meta"):  # shapes only: vit_h's 630M weights neither allocated nor initialised
            encoder = build_sam(cfg.model_type).image_encoder
    try:
        return tap_description(encoder, cfg.tail_blocks)
    except ValueError as e:
        raise ValueError(f"--tail-blocks {cfg.tail_blocks} does not fit model {cfg.model_type}: {e}") from e


def _json_roundtrip(d: dict) -> dict:
    """Normalise tuples to lists etc., exactly as the attributes will read back."""
    import json

    return json.loads(json.dumps(d))


def _finalize(out: Path) -> dict:
    """Rank 0's step 3: verify every shard is done, then write the build report and mark complete."""
    group = zarr.open_group(out, mode="r+")
    attrs = group.attrs.asdict()
    done = np.asarray(group["shard_done"][...])
    if not (done > 0).all():
        missing = np.flatnonzero(done == 0).tolist()
        raise RuntimeError(f"{out}: shards {missing[:10]} are not finished after all processes returned")
    seconds = np.asarray(group["shard_seconds"][...], np.float64)
    n = group["embeddings"].shape[0]
    s = group["embeddings"].shards[0]
    sizes = np.array([shard_slice(k, s, n).stop - shard_slice(k, s, n).start for k in range(done.size)])
    runs = attrs["runs"]
    for r in runs:
        mine = done == r["run"]
        r["shards_encoded"] = int(mine.sum())
        r["images_encoded"] = int(sizes[mine].sum())
        r["encode_seconds_sum"] = round(float(seconds[mine].sum()), 3)
    prep = attrs["prepare_report"]
    report = {
        "num_images": int(n),
        "num_objects": int(group["objects"]["image_index"].shape[0]),
        "num_shards": int(done.size),
        "num_skipped": len(prep["skipped"]),
        **{k: prep[k] for k in NOTES},
        "crowd_annotations_ignored": prep["crowd_annotations_ignored"],
        "data": prep["data"],
        "prepare_seconds": prep["seconds"],
        "encode_seconds_sum": round(float(seconds.sum()), 3),
        "images_per_second": round(float(n / seconds.sum()), 3) if seconds.sum() > 0 else None,
        "runs": runs,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    group.attrs.update(build_report=report, status="complete", runs=runs)
    return report


def report_warnings(report: dict) -> list[str]:
    """The build report's findings a user should read, one line each: objects dropped below
    ``min_object_area``, objects that vanish at the input size, images left without objects, and masks whose
    values are not clean."""
    lines = []
    small, gone = report["objects_below_min_area"], report["objects_vanished"]
    if small["count"]:
        lines.append(
            f"{small['count']} object(s) below --min-object-area {report['min_object_area']} pixels left out "
            f"in {len(small['images'])} image(s) (build_report.objects_below_min_area)"
        )
    if gone["count"]:
        lines.append(
            f"{gone['count']} object(s) in {len(gone['images'])} image(s) vanish at the model's input size: "
            "no pixel of them is left after resizing (build_report.objects_vanished)"
        )
    empty = report.get("images_without_objects", {"count": 0})  # absent from reports of older builds
    if empty["count"]:
        lines.append(
            f"{empty['count']} image(s) have no object (build_report.images_without_objects): kept; "
            "semantic training learns them as background, instance training and scoring skip them"
        )
    lines += [f"{m['path']}: {m['reason']}" for m in report["unclean_masks"]]
    return lines


def build_cache(cfg: BuildConfig) -> dict:
    """Build (or resume, or confirm) the cache ``cfg.out``; returns the build report (see
    docs/cache-format.md).

    Raises ``BadDataError`` listing bad items (unless ``skip_bad``), ``CacheExistsError`` when ``out`` holds a
    different cache (unless ``overwrite``) or something that is not a cache, ``CacheLockedError`` while
    another build writes ``out``, and ``CacheWriteError`` when the OS refuses a write.
    """
    ctx = process_context(cpu=cfg.device == "cpu")
    try:
        if not ctx.is_main:
            return _build(cfg, ctx)
        with build_lock(cfg.out):
            return _build(cfg, ctx)
    except OSError as e:
        if e.errno is None:  # one of ours, e.g. FileNotFoundError("...: checkpoint file not found")
            raise
        raise CacheWriteError(cfg.out, e) from e


def _build(cfg: BuildConfig, ctx: ProcessContext) -> dict:
    """``build_cache`` once the lock is held (rank 0) or not needed (other ranks)."""
    device, compute_dtype = _resolve_device(cfg, ctx)
    from embedcache.weights import resolve_checkpoint

    checkpoint = resolve_checkpoint(cfg.checkpoint) if ctx.is_main else None
    if ctx.is_main:
        _prepare(cfg, checkpoint, compute_dtype, ctx.world_size, device)
    ctx.barrier()
    if not ctx.is_main and cfg.checkpoint is not None:
        checkpoint = resolve_checkpoint(cfg.checkpoint)  # rank 0 has downloaded it by now
    group = zarr.open_group(cfg.out, mode="r+")
    attrs = group.attrs.asdict()
    if attrs["signature"]["compute_dtype"] != _dtype_name(compute_dtype):
        raise RuntimeError(f"rank {ctx.rank}: compute dtype {compute_dtype} differs from rank 0's")
    run = len(attrs["runs"])
    if attrs["status"] != "complete":
        emb = group["embeddings"]
        n, s = emb.shape[0], emb.shards[0]
        done = np.asarray(group["shard_done"][...])
        paths = read_strings(group["image_path"])
        jobs = [
            ShardJob(shard=k, paths=[cfg.data / p for p in paths[shard_slice(k, s, n)]], views=cfg.views)
            for k in range(done.size)
            if k % ctx.world_size == ctx.rank and done[k] == 0
        ]
        if jobs:
            sam = build_sam(cfg.model_type, checkpoint, seed=cfg.init_seed).to(device)

            def write(k: int, outputs: tuple[np.ndarray, ...], seconds: float) -> None:
                # the outputs hold the shard's images view after view (ShardJob.views)
                per_view = [np.split(o, len(cfg.views)) for o in outputs]
                emb_tap = [
                    (e, per_view[1][v] if cfg.tail_blocks else None) for v, e in enumerate(per_view[0])
                ]
                views = dict(zip(cfg.views[1:], emb_tap[1:]))
                try:
                    write_shard(
                        group,
                        k,
                        emb_tap[0][0],
                        tap=emb_tap[0][1],
                        seconds=seconds,
                        run=run,
                        rank=ctx.rank,
                        views=views,
                    )
                except OSError as e:
                    if e.filename is None:  # a failed write() (ENOSPC) names no file; the shard's is the one
                        e.filename = str(shard_file(cfg.out, k))
                    raise

            encode_shards(
                sam,
                get_preset(cfg.model_type),
                jobs,
                write,
                device=device,
                compute_dtype=compute_dtype,
                batch_size=cfg.batch_size,
                workers=cfg.workers,
                progress=cfg.progress,
                desc=f"encode rank {ctx.rank}" if ctx.world_size > 1 else "encode",
                tail_blocks=cfg.tail_blocks,
                channels=cfg.channels,
            )
        ctx.barrier()
        if ctx.is_main:
            _finalize(cfg.out)
        ctx.barrier()
    return dict(zarr.open_group(cfg.out, mode="r").attrs["build_report"])


def default_workers() -> int:
    """Decode threads: 4, or fewer on a small machine."""
    return max(1, min(4, os.cpu_count() or 1))
