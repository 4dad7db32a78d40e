"""The deterministic image-level train/val split.

Images are ranked by ``sha256(f"{seed}:{image_id}")`` and the ``round(val_fraction * N)`` lowest go to val.
The split therefore depends only on the ids, the seed and the fraction: not on file order, numpy's RNG version
or the machine, and an image keeps its side when unrelated images are added (up to the count changing).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

SPLIT_METHOD = "sha256-rank"


def split_definition(val_fraction: float, seed: int) -> dict:
    """What the signature records to make the split reproducible."""
    return {"method": SPLIT_METHOD, "val_fraction": val_fraction, "seed": seed}


def assign_split(image_ids: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """``(N,)`` str array of ``"train"``/``"val"`` for the ids, by the rule in the module docstring."""
    n = len(image_ids)
    n_val = math.floor(val_fraction * n + 0.5)
    keys = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in image_ids]
    order = sorted(range(n), key=lambda k: (keys[k], image_ids[k]))
    split = np.full(n, "train", dtype=object)
    split[order[:n_val]] = "val"
    return split.astype(str)
