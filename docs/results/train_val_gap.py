"""Train/validation gap of a `trainer sweep` run, from `trainer eval --split train` and `--split val`.

    python docs/results/train_val_gap.py CACHE SWEEP_JSON TRAIN_METRICS VAL_METRICS MODEL

The train-split scores are split by image into the images the trial trained on and the images the sweep held
out for its validation (``held_out_images`` in sweep.json); the gap is the trained images' mIoU minus the
cache's held-out (val split) mIoU, for box and point prompts. Used for docs/results.md's views section.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import zarr


def per_image_ious(metrics: str, model: str, prompt: str, image_of: np.ndarray):
    """``(N,)`` IoUs of ``prompt`` masks and the ``(N,)`` cache image index of each object."""
    scores = json.loads(Path(metrics).read_text())[model][prompt]
    return np.array(scores["ious"]), image_of[np.array(scores["object_ids"])]


def main(cache: str, sweep_json: str, train_metrics: str, val_metrics: str, model: str) -> None:
    group = zarr.open_group(cache, mode="r")
    image_of = group["objects"]["image_index"][:]
    names = np.array([str(n) for n in group["image_id"][:]])
    held_out = json.loads(Path(sweep_json).read_text())["held_out_images"]
    for prompt in ("box", "point"):
        ious, image = per_image_ious(train_metrics, model, prompt, image_of)
        sweep_val = np.isin(names[image], held_out)
        test, _ = per_image_ious(val_metrics, model, prompt, image_of)
        trained = ious[~sweep_val].mean()
        print(
            f"{prompt}: trained images {trained:.3f} ({(~sweep_val).sum()} objects), sweep validation "
            f"{ious[sweep_val].mean():.3f} ({sweep_val.sum()}), held out {test.mean():.3f} ({len(test)}); "
            f"gap trained - held out {trained - test.mean():+.3f}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
