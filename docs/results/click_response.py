"""What one corrective click after a box does to a model's mask, by the width of the error it points at.

    python docs/results/click_response.py CACHE CHECKPOINT [SPLIT]

For every object of the SPLIT images (default val), the box mask is made as ``trainer eval`` makes it (round
0), then round 1 is decoded three ways: with ``trainer eval --clicks``'s click (the interior-most pixel of the
largest missed region or spill) and the box mask's logits as the mask prompt, the same click without the mask
prompt, and with a click drawn uniformly from the whole error region (as training draws it, here at the
original size; seeded) and the mask prompt. The width of an error region is twice its largest inscribed
distance, in original pixels (a one-pixel region is 2 wide), of the region ``error_region`` picks. Prints each
way's mean IoU and its change from round 0, over all objects and for the objects whose clicked region is of
each width. CHECKPOINT is anything ``trainer eval --checkpoint`` takes. Used for docs/results.md's *Why
corrective clicks lower the box masks*.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from scipy import ndimage

from embedcache.cache import open_cache
from trainer.clicks import error_region, next_click
from trainer.data import input_boxes
from trainer.eval_run import _cache_encoder, _checkpoint_model
from trainer.evaluate import iou_and_dice, postprocess
from trainer.prompts import Prompts, to_input_frame

WIDTHS = ((2, 4), (4, 8), (8, 16), (16, 1e9))
"""Bins of the clicked error region's width, in original pixels."""


def decode(model, emb, cache, image: int, obj: np.ndarray, clicks, mask) -> tuple[torch.Tensor, np.ndarray]:
    """Box (+ one click per object) masks: ``(n, 1, 256, 256)`` logits and ``(n, H, W)`` bool at the original
    size.

    Args:
        clicks: ``(n, 3)`` x, y (original pixels), label per object, or ``None`` for the box alone.
        mask: ``(n, 1, 256, 256)`` mask-prompt logits or ``None``.
    """
    n = len(obj)
    ih, iw = (int(v) for v in cache.input_size[image])
    oh, ow = (int(v) for v in cache.original_size[image])
    if clicks is None:
        xy, labels = torch.zeros(n, 0, 2), torch.zeros(n, 0, dtype=torch.long)
    else:
        xy = torch.from_numpy(to_input_frame(clicks[:, :2], (oh, ow), (ih, iw))[:, None].astype(np.float32))
        labels = torch.from_numpy(clicks[:, 2:].astype(np.int64))
    prompts = Prompts(
        point_coords=xy,
        point_labels=labels,
        boxes=torch.from_numpy(input_boxes(cache, obj)),
        has_box=torch.ones(n, dtype=torch.bool),
        mask_input=mask,
    )
    out = model.decode_prompts(emb, torch.zeros(n, dtype=torch.long), prompts)
    low = out.shown(torch.zeros(n, dtype=torch.bool))[:, None].float()
    return low, (postprocess(low, (ih, iw), (oh, ow), cache.image_size)[:, 0] > 0).numpy()


def uniform_click(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> tuple[float, float, int]:
    """A click drawn uniformly from the ``(H, W)`` error region: positive on a missed pixel, else negative."""
    ys, xs = np.nonzero(pred ^ gt)
    k = rng.integers(len(ys))
    return float(xs[k]), float(ys[k]), int(gt[ys[k], xs[k]])


def region_width(region: np.ndarray) -> float:
    """Twice the largest inscribed distance of a ``(H, W)`` bool region."""
    return 2 * float(ndimage.distance_transform_edt(np.pad(region, 1)).max())


@torch.no_grad()
def main(cache_path: str, checkpoint: str, split: str = "val") -> None:
    cache = open_cache(cache_path)
    contender, _ = _checkpoint_model(cache, checkpoint, "last", torch.device("cpu"), _cache_encoder(cache))
    model, store = contender.model.eval(), contender.store
    rng = np.random.default_rng(0)
    ways = ("eval click + mask prompt", "eval click, no mask prompt", "uniform click + mask prompt")
    rows = []  # (round-0 IoU, IoU of each way, width)
    for image in cache.images_with_objects(split).tolist():
        start, stop = cache.object_range(image)
        obj = np.arange(start, stop)
        obj = obj[cache.objects.input_area[obj] > 0]
        gts = np.stack(cache.masks(obj, "original"))
        emb = model.image_embeddings(store.embeddings(np.array([image])).float())
        low, preds = decode(model, emb, cache, image, obj, None, None)
        made = [next_click(p, g) for p, g in zip(preds, gts)]
        keep = np.array([c is not None for c in made])  # an exact mask gets no click
        obj, gts, preds, low = obj[keep], gts[keep], preds[keep], low[torch.from_numpy(keep)]
        clicks = np.array([c for c in made if c is not None], np.float64)
        uniform = np.array([uniform_click(p, g, rng) for p, g in zip(preds, gts)], np.float64)
        after = [
            decode(model, emb, cache, image, obj, c, m)[1]
            for c, m in ((clicks, low), (clicks, None), (uniform, low))
        ]
        for j, (p, g) in enumerate(zip(preds, gts)):
            ious = [iou_and_dice(a[j], g)[0] for a in after]
            rows.append((iou_and_dice(p, g)[0], *ious, region_width(error_region(p, g)[0])))
    r = np.array(rows)
    print(f"{checkpoint}: {len(r)} objects of the {split} images; box mask mIoU {r[:, 0].mean():.4f}")
    for k, way in enumerate(ways, 1):
        print(f"  {way}: mIoU {r[:, k].mean():.4f} ({r[:, k].mean() - r[:, 0].mean():+.4f})")
    print("  by the width of the clicked error region (original px): objects, mIoU change of each way")
    for lo, hi in WIDTHS:
        m = (r[:, -1] >= lo) & (r[:, -1] < hi)
        changes = " ".join(f"{(r[m, k] - r[m, 0]).mean():+.4f}" for k in range(1, 4))
        print(f"    [{lo}, {hi if hi < 1e9 else 'inf'}): {m.sum()} objects, {changes}")


if __name__ == "__main__":
    main(*sys.argv[1:])
