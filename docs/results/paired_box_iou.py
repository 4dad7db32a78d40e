"""Paired box-IoU differences between models that `trainer eval` scored on the same cache split.

    python docs/results/paired_box_iou.py CACHE BASE=METRICS:MODEL OTHER=METRICS:MODEL [...]

Each later model is compared with the first, cell by cell (the same object ids): the mean difference, a 95 %
interval from a two-level bootstrap (images resampled, then cells within each chosen image, because cells of
one image are not independent), the share of cells better / worse by more than 0.01 IoU, and the mean
difference on each image. Used for docs/results.md's encoder-adaptation table on isbi2012.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import zarr


def box_ious(spec: str) -> tuple[str, dict[int, float]]:
    """``NAME=metrics.json:MODEL`` -> (NAME, {object id: box IoU})."""
    name, rest = spec.split("=", 1)
    path, model = rest.rsplit(":", 1)
    box = json.loads(Path(path).read_text())[model]["box"]
    return name, dict(zip(box["object_ids"], box["ious"]))


def bootstrap_mean(diff: np.ndarray, image: np.ndarray, rng: np.random.Generator, rounds: int = 2000):
    """95 % interval of the mean of the ``(N,)`` differences, resampling images, then cells in each."""
    images = np.unique(image)
    cells = {i: diff[image == i] for i in images}
    means = [
        np.concatenate([rng.choice(cells[i], len(cells[i])) for i in rng.choice(images, len(images))]).mean()
        for _ in range(rounds)
    ]
    return np.percentile(means, [2.5, 97.5])


def main(cache: str, base_spec: str, *specs: str) -> None:
    image_of = zarr.open_group(cache, mode="r")["objects"]["image_index"][:]
    base_name, base = box_ious(base_spec)
    ids = np.array(sorted(base))
    image = image_of[ids]
    rng = np.random.default_rng(0)
    for spec in specs:
        name, other = box_ious(spec)
        if set(other) != set(base):
            raise SystemExit(f"{spec}: not scored on the same objects as {base_spec}")
        diff = np.array([other[i] - base[i] for i in ids])
        lo, hi = bootstrap_mean(diff, image, rng)
        per_image = " ".join(f"{diff[image == i].mean():+.3f}" for i in np.unique(image))
        print(
            f"{name} - {base_name}: {diff.mean():+.4f} (95% CI {lo:+.4f} .. {hi:+.4f}); cells better / worse "
            f"by > 0.01: {(diff > 0.01).mean():.0%} / {(diff < -0.01).mean():.0%}; per image: {per_image}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
