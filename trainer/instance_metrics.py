"""Instance segmentation scores: segmentation accuracy at IoU thresholds, as micro-sam and StarDist report it.

At a threshold ``t``, predicted and true objects are matched one to one so that as many pairs as possible have
IoU >= t (an assignment problem: one predicted object may not match two true ones). With TP such pairs,
FP = n_pred - TP and FN = n_true - TP, the segmentation accuracy is ``SA(t) = TP / (TP + FP + FN)``, and 0
when TP is 0. mSA is the mean of SA over ``t = 0.50, 0.55, ..., 0.95``; SA50 and SA75 are two of its terms.

This is ``elf.evaluation.mean_segmentation_accuracy``, which micro-sam's evaluation calls once per image and
then averages over images (StarDist's ``matching`` counts TP the same way). Both compare IoU with ``>=``, so
a pair at exactly IoU 0.5 is a match at 0.5; so does this file. Label 0 is background in both images.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
"""The IoU thresholds mSA averages over: 0.50, 0.55, ..., 0.95."""


def iou_matrix(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """``(n_pred, n_true)`` float64 IoU of every predicted object with every true one.

    Args:
        pred: ``(H, W)`` integer labels, 0 background; the ids need not be consecutive.
        true: ``(H, W)`` integer labels of the same shape.
    Rows and columns follow the sorted nonzero ids of ``pred`` and ``true``.
    """
    if pred.shape != true.shape:
        raise ValueError(f"predicted labels {pred.shape} and true labels {true.shape} differ in shape")
    if min(pred.min(initial=0), true.min(initial=0)) < 0:
        raise ValueError("labels must be >= 0 (0 is background)")
    # each image's ids -> 0 (background), 1..n; one bincount over the pairs gives every intersection
    p_ids, p = np.unique(pred, return_inverse=True)
    t_ids, t = np.unique(true, return_inverse=True)
    p = p.ravel() + (p_ids[0] != 0)  # without background, id k sits at k + 1 after the shift
    t = t.ravel() + (t_ids[0] != 0)
    n_p, n_t = int(np.count_nonzero(p_ids)) + 1, int(np.count_nonzero(t_ids)) + 1
    inter = np.bincount(p * n_t + t, minlength=n_p * n_t).reshape(n_p, n_t).astype(np.float64)
    area_p, area_t = inter.sum(1, keepdims=True), inter.sum(0, keepdims=True)  # background overlap counts
    inter, area_p, area_t = inter[1:, 1:], area_p[1:], area_t[:, 1:]
    union = area_p + area_t - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def true_positives(iou: np.ndarray, threshold: float) -> int:
    """The most one-to-one pairs with IoU >= ``threshold`` in an ``(n_pred, n_true)`` IoU matrix."""
    ok = iou >= threshold
    if not ok.any():
        return 0
    rows, cols = linear_sum_assignment(ok.astype(np.float64), maximize=True)
    return int(ok[rows, cols].sum())


def segmentation_accuracy(iou: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    """``(T,)`` SA at each threshold from an ``(n_pred, n_true)`` IoU matrix."""
    n_pred, n_true = iou.shape
    tp = np.array([true_positives(iou, t) for t in thresholds], np.float64)
    union = n_pred + n_true - tp  # TP + FP + FN
    return np.divide(tp, union, out=np.zeros_like(tp), where=tp > 0)


def image_scores(pred: np.ndarray, true: np.ndarray) -> dict:
    """``{"msa", "sa50", "sa75", "n_pred", "n_true"}`` of one ``(H, W)`` predicted label image against the
    true one."""
    iou = iou_matrix(pred, true)
    sa = segmentation_accuracy(iou)
    return {
        "msa": float(sa.mean()),
        "sa50": float(sa[THRESHOLDS.index(0.5)]),
        "sa75": float(sa[THRESHOLDS.index(0.75)]),
        "n_pred": int(iou.shape[0]),
        "n_true": int(iou.shape[1]),
    }


def mean_scores(per_image: list[dict]) -> dict:
    """The mean ``msa``, ``sa50`` and ``sa75`` over images (micro-sam's aggregate), and the summed counts."""
    if not per_image:
        raise ValueError("no images to score")
    out = {k: float(np.mean([s[k] for s in per_image])) for k in ("msa", "sa50", "sa75")}
    out |= {k: int(sum(s[k] for s in per_image)) for k in ("n_pred", "n_true")}
    return out


def labels_from_masks(masks: list[np.ndarray] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` int32 labels 1..n from ``n`` bool masks of ``shape``, painted in order: where masks
    overlap, the later one wins (a cache built from a label image has no overlaps)."""
    labels = np.zeros(shape, np.int32)
    for k, m in enumerate(masks, 1):
        if m.shape != tuple(shape):
            raise ValueError(f"mask {k - 1} has shape {m.shape}, expected {tuple(shape)}")
        labels[m] = k
    return labels
