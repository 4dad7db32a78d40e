"""``trainer eval``: a run's tuned model and its starting model, on the validation images, in one file."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from embedcache import open_cache
from embedcache.signature import check_compatible
from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.data import ImageStore
from trainer.model import build_start_sam, build_trainable, start_checkpoint, tuned_sam
from trainer.task import make_task


def eval_run(
    cache_path: str | Path,
    run: str | Path,
    *,
    which: str = "best",
    out: str | Path | None = None,
    overlays: int | None = None,
) -> dict:
    """Write ``OUT/metrics.json`` (``tuned`` and ``start``, per prompt type) and ``OUT/overlays/*.png``.

    Returns ``{"metrics": ..., "files": [...]}`` on the main process, ``{}`` elsewhere.
    """
    run = Path(run)
    out = Path(out) if out else run / "eval"
    weights = ckpt.resolve_weights(run, which)
    cfg = load_config(weights.parent / "config.yaml")
    cache = open_cache(cache_path)
    check_compatible(cache, cfg.model.model_type, start_checkpoint(cfg), init_seed=cfg.model.init_seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    _, tuned = tuned_sam(cfg, weights)
    start = build_trainable(build_start_sam(cfg), cfg).eval()
    tuned.to(device)
    start.to(device)
    store = ImageStore(cache, "host", device, tail_blocks=cfg.model.encoder_tail_blocks)
    images = cache.image_indices("val")
    if cfg.run.val_max_images:
        images = images[: cfg.run.val_max_images]
    task = make_task(cfg)
    metrics = {
        "tuned": task.validate(tuned, store, images, accelerator),
        "start": task.validate(start, store, images, accelerator),
    }
    metrics.update(weights=str(weights), cache=str(cache_path))
    if not accelerator.is_main_process:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / "metrics.json", metrics)
    n = cfg.run.overlays if overlays is None else overlays
    files = [out / "metrics.json", *task.overlays(out / "overlays", store, images, start, tuned, n)]
    return {"metrics": metrics, "files": [str(f) for f in files]}
