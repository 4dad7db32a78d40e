"""The encoder pass over a list of shards: prefetch threads decode and resize, the encoder runs batched, a
writer thread writes finished shards.

Overlap: a thread pool keeps ``lookahead`` images decoded and resized ahead of the encoder (PIL and numpy
release the GIL), the encoder runs on the calling thread, and one writer thread turns finished shards into
files, so disk and decode time hide behind the encoder. On CUDA the batch runs in bf16 autocast and its
float16 result is copied into pinned memory without a sync; the writer waits on a CUDA event. On CPU
everything stays float32, which is what ``SamPredictor.set_image`` computes, and the result is rounded to
float16 once.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam
from tqdm import tqdm

from embedcache.images import BadInput, load_image
from embedcache.preprocess import resize, to_model_input
from embedcache.presets import Preset
from embedcache.tap import encode_with_tap
from embedcache.views import IDENTITY, VIEWS

EXIT_AFTER_SHARDS_ENV = "EMBEDCACHE_TEST_EXIT_AFTER_SHARDS"
"""Test hook: a process that has written this many shards in this run dies with ``os._exit(75)`` at once, as a
kill would leave it (no cleanup, no finalisation)."""


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """One shard to encode."""

    shard: int
    """Shard index."""
    paths: list[Path]
    """Its images, in cache order."""
    views: tuple[str, ...] = (IDENTITY,)
    """The views to encode (``embedcache.views``): the shard's outputs hold every image of the first view,
    then every image of the next."""


def _load(path: Path, preset: Preset, channels: tuple[int, int, int] | None, view: str) -> np.ndarray:
    """Prefetch work: file -> ``(h, w, 3)`` uint8 in the preset's input frame, the image transformed by
    ``view`` first (``channels``: ``load_image``'s mapping). Raises ``BadInput`` naming the file."""
    try:
        return resize(VIEWS[view].apply(load_image(path, channels)), preset)
    except BadInput:
        raise
    except Exception as e:  # e.g. the file changed since the metadata pass checked it
        raise BadInput(path, f"cannot be resized for the encoder ({type(e).__name__}: {e})") from e


class _ShardWriter:
    """A thread that gathers each shard's batches and hands the whole shard to ``write``."""

    def __init__(self, write: Callable[[int, tuple[np.ndarray, ...], float], None]):
        self.write = write
        self.q: queue.Queue = queue.Queue(maxsize=2)  # bounds memory to ~2 shards in flight
        self.error: BaseException | None = None
        self.written = 0
        self.exit_after = int(os.environ.get(EXIT_AFTER_SHARDS_ENV, "0") or 0)
        self.thread = threading.Thread(target=self._run, name="embedcache-writer", daemon=True)
        self.thread.start()

    def put(self, shard: int, parts: list, seconds: float) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((shard, parts, seconds))

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure so put() never blocks forever
            shard, parts, seconds = item
            try:
                for _, event in parts:
                    if event is not None:
                        event.synchronize()
                outputs = zip(*(hosts for hosts, _ in parts))  # per output: its batches, in order
                self.write(shard, tuple(np.concatenate([h.numpy() for h in o]) for o in outputs), seconds)
                self.written += 1
                if self.exit_after and self.written >= self.exit_after:
                    os._exit(75)
            except BaseException as e:  # re-raised on the encoding thread
                self.error = e

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def encode_shards(
    sam: Sam,
    preset: Preset,
    jobs: list[ShardJob],
    write: Callable[[int, tuple[np.ndarray, ...], float], None],
    *,
    device: torch.device,
    compute_dtype: torch.dtype,
    batch_size: int,
    workers: int,
    progress: bool,
    desc: str = "encode",
    tail_blocks: int = 0,
    channels: tuple[int, int, int] | None = None,
) -> dict:
    """Encode every job's images and call ``write(shard, outputs, seconds)`` once per shard.

    ``outputs`` is ``((n, 256, 64, 64) float16 embeddings,)``, plus the ``(n, 64, 64, C)`` float16 tokens
    entering the last ``tail_blocks`` encoder blocks when ``tail_blocks > 0`` (``embedcache.tap``); with
    ``V`` views n is ``V`` times the shard's images, view after view (``ShardJob.views``).
    ``channels`` maps images of undeclared channels as the metadata pass did (``embedcache.images``).

    Batches never cross a shard boundary, so a shard's values do not depend on which other shards a run
    encodes (resumed and uninterrupted builds are bit-identical). Returns ``{"images", "seconds"}``.
    """
    work = [[(p, v) for v in job.views for p in job.paths] for job in jobs]
    items = [item for job in work for item in job]
    lookahead = max(2 * batch_size, workers * 2)
    autocast = (
        torch.autocast(device_type=device.type, dtype=compute_dtype)
        if compute_dtype != torch.float32
        else nullcontext()
    )
    cuda = device.type == "cuda"
    t_start = time.perf_counter()
    bar = tqdm(total=len(items), unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embedcache-decode") as pool:
        pending: deque = deque()
        it = iter(items)

        def refill() -> None:
            while len(pending) < lookahead and (item := next(it, None)) is not None:
                pending.append(pool.submit(_load, item[0], preset, channels, item[1]))

        refill()
        writer = _ShardWriter(write)
        try:
            for job, job_items in zip(jobs, work):
                t_shard = time.perf_counter()
                parts = []
                for b0 in range(0, len(job_items), batch_size):
                    n = min(batch_size, len(job_items) - b0)
                    images = [pending.popleft().result() for _ in range(n)]
                    refill()
                    try:
                        with torch.inference_mode(), autocast:
                            x = to_model_input(images, preset, device)
                            if tail_blocks:
                                ys = encode_with_tap(sam.image_encoder, x, tail_blocks)
                            else:
                                ys = (sam.image_encoder(x),)
                            ys = tuple(y.to(torch.float16) for y in ys)
                    except RuntimeError as e:  # name the images; the traceback alone names none
                        names = ", ".join(f"{p} ({v})" for p, v in job_items[b0 : b0 + n])
                        raise RuntimeError(f"encoding {names} (shard {job.shard}) failed: {e}") from e
                    if cuda:
                        hosts = tuple(torch.empty(y.shape, dtype=torch.float16, pin_memory=True) for y in ys)
                        for host, y in zip(hosts, ys):
                            host.copy_(y, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record()
                        parts.append((hosts, event))
                    else:
                        parts.append((ys, None))
                    bar.update(n)
                writer.put(job.shard, parts, time.perf_counter() - t_shard)
        finally:
            for f in pending:
                f.cancel()
            writer.close()
            bar.close()
    return {"images": len(items), "seconds": time.perf_counter() - t_start}
