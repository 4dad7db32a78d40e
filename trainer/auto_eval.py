"""``trainer eval --auto amg``: prompt-free instance segmentation of cache images, scored per instance.

Each image's labels are made from its cached embedding (``trainer.amg``) and scored against the cache's
objects painted into one label image (``trainer.instance_metrics``): mSA over IoU 0.50-0.95, SA50, SA75,
averaged over images as micro-sam does, and the predicted and true object counts summed. Only images with
objects are scored (an image with neither true nor predicted objects would score 0 by that definition).

With ``sweep`` each image is decoded once and re-scored at every threshold pair of ``trainer.amg.SWEEP``;
the headline scores stay those of the settings asked for, since picking thresholds on the images scored
would flatter them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from trainer.amg import AmgConfig, grid_candidates, select, sweep_configs, to_labels
from trainer.data import ImageStore, image_file
from trainer.decoder import PromptedDecoder
from trainer.instance_metrics import image_scores, labels_from_masks, mean_scores
from trainer.plots import instance_overlay

SCORES = ("msa", "sa50", "sa75", "n_pred", "n_true")
"""The keys of ``metrics.json``'s ``auto`` entry besides ``method`` (and ``sweep``, ``amg``)."""


def true_labels(cache, image: int) -> np.ndarray:
    """``(H, W)`` int32 labels of a cache image's objects at its original size."""
    lo, hi = cache.object_range(image)
    return labels_from_masks(cache.masks(np.arange(lo, hi), "original"), tuple(cache.original_size[image]))


@torch.no_grad()
def evaluate_amg(
    model: PromptedDecoder,
    store: ImageStore,
    images: np.ndarray,
    accelerator,
    cfg: AmgConfig,
    *,
    sweep: bool = False,
    keep: int = 0,
) -> tuple[dict, dict[int, np.ndarray]]:
    """AMG of ``model`` on the cache images ``images`` with ``cfg``, scored per instance.

    Returns:
        ``{"method": "amg", "msa", "sa50", "sa75", "n_pred", "n_true", "n_images", "amg": cfg's fields}``
        (with ``sweep``, also ``"sweep"``: one such row per threshold pair, with its two thresholds), equal
        on every process; and the ``(H, W)`` int32 labels of the first ``keep`` scored images this process
        made (for overlays).
    """
    was_training = model.training
    model.eval()
    cache = store.cache
    configs = [cfg, *(sweep_configs(cfg) if sweep else [])]
    floor = (min(c.pred_iou_thresh for c in configs), min(c.stability_score_thresh for c in configs))
    scored = np.intersect1d(images, cache.images_with_objects("all"))
    shown = set(scored[:keep].tolist())
    records, kept = [], {}
    for image in scored[accelerator.process_index :: accelerator.num_processes].tolist():
        hw = tuple(int(v) for v in cache.original_size[image])
        input_hw = tuple(int(v) for v in cache.input_size[image])
        emb = store.embeddings(np.array([image]))
        candidates = grid_candidates(model, emb, input_hw, hw, cache.image_size, cfg, floor=floor)
        truth = true_labels(cache, image)
        row = []
        for c in configs:
            labels = to_labels(select(candidates, c), hw)
            row.append(image_scores(labels, truth))
            if c is cfg and image in shown:
                kept[image] = labels
        records.append((image, row))
    model.train(was_training)
    gathered = accelerator.gather_for_metrics(records, use_gather_object=True)
    rows = [r for _, r in sorted(dict(gathered).items())]  # each image once, in cache order
    result = {"method": "amg", **mean_scores([r[0] for r in rows]), "n_images": len(rows), "amg": asdict(cfg)}
    if sweep:
        result["sweep"] = [
            {
                "pred_iou_thresh": c.pred_iou_thresh,
                "stability_score_thresh": c.stability_score_thresh,
                **mean_scores([r[k] for r in rows]),
            }
            for k, c in enumerate(configs[1:], 1)
        ]
    return result, kept


def auto_table(metrics: dict[str, dict]) -> str:
    """Markdown: one row per model with automatic scores (empty when none has them), then each model's
    threshold sweep when there is one."""
    scored = {label: m["auto"] for label, m in metrics.items() if isinstance(m, dict) and "auto" in m}
    if not scored:
        return ""
    head = ["model", "method", "mSA", "SA50", "SA75", "predicted", "true"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, a in scored.items():
        cells = [label, a["method"], *(f"{a[k]:.3f}" for k in SCORES[:3]), str(a["n_pred"]), str(a["n_true"])]
        lines.append("| " + " | ".join(cells) + " |")
    for label, a in scored.items():
        if "sweep" not in a:
            continue
        lines += ["", f"AMG threshold sweep, {label} (one decoding per image, re-scored):", ""]
        lines += ["| pred IoU > | stability >= | mSA | SA50 | SA75 | predicted |", "|---" * 6 + "|"]
        for r in a["sweep"]:
            lines.append(
                f"| {r['pred_iou_thresh']} | {r['stability_score_thresh']} | {r['msa']:.3f} | "
                f"{r['sa50']:.3f} | {r['sa75']:.3f} | {r['n_pred']} |"
            )
    return "\n".join(lines) + "\n"


def auto_overlays(folder: Path, cache, labels: dict[str, dict[int, np.ndarray]]) -> list[Path]:
    """One PNG per image: the image, its true instances and each model's, coloured by instance.

    ``labels`` maps each model label to ``{cache image: (H, W) int32 labels}``; an image is drawn when every
    model has labels for it."""
    common = sorted(set.intersection(*(set(v) for v in labels.values()))) if labels else []
    if common:
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in common:
        truth = true_labels(cache, i)
        preds = {name: per_image[i] for name, per_image in labels.items()}
        scores = {name: image_scores(p, truth)["msa"] for name, p in preds.items()}
        path = folder / f"{cache.image_id[i]}.png"
        instance_overlay(
            truth,
            preds,
            path,
            image_path=image_file(cache, i),
            channels=cache.signature["dataset"].get("channels"),
            title=str(cache.image_id[i]),
            scores=scores,
        )
        written.append(path)
    return written
