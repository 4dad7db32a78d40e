"""``trainer eval``: a run's tuned model and its starting model, on the validation images, in one file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from embedcache import open_cache
from embedcache.signature import check_compatible
from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.data import ImageStore, image_file
from trainer.evaluate import evaluate, evaluate_semantic, predict_objects
from trainer.model import build_start_sam, build_trainable, start_checkpoint, tuned_sam
from trainer.plots import overlay


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
    store = ImageStore(cache, "host", device)
    images = cache.image_indices("val")
    if cfg.run.val_max_images:
        images = images[: cfg.run.val_max_images]
    if cfg.model.task == "semantic":
        metrics = {
            "tuned": evaluate_semantic(tuned, store, images, accelerator, cfg.model.num_classes),
            "start": evaluate_semantic(start, store, images, accelerator, cfg.model.num_classes),
        }
    else:
        metrics = {
            "tuned": evaluate(tuned, store, images, accelerator),
            "start": evaluate(start, store, images, accelerator),
        }
    metrics.update(weights=str(weights), cache=str(cache_path))
    if not accelerator.is_main_process:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / "metrics.json", metrics)
    files = [out / "metrics.json"]
    n = cfg.run.overlays if overlays is None else overlays
    if cfg.model.task == "instance" and n:
        (out / "overlays").mkdir(exist_ok=True)
        shown = [int(i) for i in images if np.subtract(*cache.object_range(int(i))[::-1]) > 0][:n]
        for i in shown:
            lo, hi = cache.object_range(i)
            gt = cache.masks(np.arange(lo, hi), "original")
            path = out / "overlays" / f"{cache.image_id[i]}.png"
            overlay(
                gt,
                predict_objects(start, store, i, "box", device),
                predict_objects(tuned, store, i, "box", device),
                path,
                image_path=image_file(cache, i),
                title=str(cache.image_id[i]),
            )
            files.append(path)
    return {"metrics": metrics, "files": [str(f) for f in files]}
