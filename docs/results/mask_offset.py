"""Do a model's box masks sit off the ground truth by a fraction of a pixel?

    python docs/results/mask_offset.py CACHE CHECKPOINT IMAGE_NAME [IMAGE_NAME ...]

For the train-split images whose path holds one of the IMAGE_NAMEs (never held-out ones), every object's box
mask is made as ``trainer eval`` makes it, but at twice the original resolution (the logits resized
bilinearly, the ground truth by pixel repetition), and scored against the ground truth moved by -1, 0 and +1
pixels there: -0.5, 0 and +0.5 original pixels along each axis. A model whose masks are centred scores best
unmoved; a model trained on offset targets scores best with the ground truth moved by that offset. Prints the
mean box IoU for the nine moves, over all objects and over the smallest fifth. CHECKPOINT is anything
``trainer eval --checkpoint`` takes. Used for docs/results.md's *Centred targets*.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from embedcache.cache import open_cache
from trainer.data import input_boxes
from trainer.eval_run import _cache_encoder, _checkpoint_model
from trainer.evaluate import postprocess
from trainer.prompts import Prompts

MOVES = (-1, 0, 1)


def box_masks_2x(model, store, cache, image: int) -> np.ndarray:
    """``(n, 2H, 2W)`` bool box masks of the image's objects at twice the original size."""
    start, stop = cache.object_range(image)
    obj = np.arange(start, stop)
    ih, iw = (int(v) for v in cache.input_size[image])
    oh, ow = (int(v) for v in cache.original_size[image])
    emb = model.image_embeddings(store.embeddings(np.array([image])).float())
    n = len(obj)
    prompts = Prompts(
        point_coords=torch.zeros(n, 0, 2),
        point_labels=torch.zeros(n, 0, dtype=torch.long),
        boxes=torch.from_numpy(input_boxes(cache, obj)),
        has_box=torch.ones(n, dtype=torch.bool),
        mask_input=None,
    )
    out = model.decode_prompts(emb, torch.zeros(n, dtype=torch.long), prompts)
    low = out.shown(torch.zeros(n, dtype=torch.bool))[:, None].float()
    return (postprocess(low, (ih, iw), (2 * oh, 2 * ow), cache.image_size)[:, 0] > 0).numpy()


@torch.no_grad()
def main(cache_path: str, checkpoint: str, *names: str) -> None:
    cache = open_cache(cache_path)
    images = [i for i in cache.image_indices("train") if any(n in str(cache.image_path[i]) for n in names)]
    contender, _ = _checkpoint_model(cache, checkpoint, "last", torch.device("cpu"), _cache_encoder(cache))
    model = contender.model.eval()
    ious = {(dy, dx): [] for dy in MOVES for dx in MOVES}
    areas = []
    for i in images:
        start, stop = cache.object_range(i)
        preds = box_masks_2x(model, contender.store, cache, i)
        for pred, gt in zip(preds, cache.masks(np.arange(start, stop), "original")):
            big = np.repeat(np.repeat(gt, 2, 0), 2, 1)
            areas.append(gt.sum())
            for dy, dx in ious:
                moved = np.roll(big, (dy, dx), (0, 1))
                union = (pred | moved).sum()
                ious[dy, dx].append((pred & moved).sum() / union if union else 1.0)
    small = np.array(areas) < np.quantile(areas, 0.2)
    print(f"{checkpoint}: {len(images)} images, {len(areas)} objects; ground truth moved by (rows, columns)")
    for dy in MOVES:
        cells = [f"{dy / 2:+.1f},{dx / 2:+.1f} px: {np.mean(ious[dy, dx]):.4f}" for dx in MOVES]
        cells_small = [f"{np.mean(np.array(ious[dy, dx])[small]):.4f}" for dx in MOVES]
        print("  " + "   ".join(cells) + "   (smallest fifth: " + " ".join(cells_small) + ")")


if __name__ == "__main__":
    main(*sys.argv[1:])
