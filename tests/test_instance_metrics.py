"""``trainer.instance_metrics`` on hand-made label pairs whose SA at every threshold is known by counting."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.instance_metrics import (
    THRESHOLDS,
    image_scores,
    iou_matrix,
    labels_from_masks,
    mean_scores,
    segmentation_accuracy,
)


def squares(shape=(40, 40), *boxes) -> np.ndarray:
    """Labels with object ``k + 1`` filling ``boxes[k]`` = (y1, x1, y2, x2)."""
    out = np.zeros(shape, np.int32)
    for k, (y1, x1, y2, x2) in enumerate(boxes, 1):
        out[y1:y2, x1:x2] = k
    return out


def test_thresholds_are_050_to_095():
    assert THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_identical_labels_with_other_ids_score_one():
    true = squares((40, 40), (0, 0, 10, 10), (20, 20, 30, 35), (12, 0, 18, 40))
    pred = np.select([true == 1, true == 2, true == 3], [7, 3, 12], 0)  # same objects, other ids
    assert image_scores(pred, true) == {"msa": 1.0, "sa50": 1.0, "sa75": 1.0, "n_pred": 3, "n_true": 3}


def test_a_missed_object_is_a_false_negative_at_every_threshold():
    true = squares((40, 40), (0, 0, 10, 10), (20, 20, 30, 30))
    pred = squares((40, 40), (0, 0, 10, 10))
    # TP 1, FP 0, FN 1 at every threshold: SA = 1 / 2
    assert image_scores(pred, true) == {"msa": 0.5, "sa50": 0.5, "sa75": 0.5, "n_pred": 1, "n_true": 2}


def test_an_iou_of_exactly_060_matches_up_to_060():
    true = squares((40, 40), (0, 0, 10, 10))
    pred = squares((40, 40), (0, 0, 6, 10))  # 60 of 100 pixels, nothing outside: IoU 0.6
    np.testing.assert_array_equal(iou_matrix(pred, true), [[0.6]])
    sa = segmentation_accuracy(iou_matrix(pred, true))
    np.testing.assert_array_equal(sa, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    s = image_scores(pred, true)
    assert (s["sa50"], s["sa75"]) == (1.0, 0.0)
    assert s["msa"] == pytest.approx(0.3)


def test_a_merge_matches_one_true_object_not_two():
    true = squares((40, 40), (0, 0, 10, 10), (0, 10, 10, 20))
    pred = squares((40, 40), (0, 0, 10, 20))  # one object over both: IoU 0.5 with each
    np.testing.assert_array_equal(iou_matrix(pred, true), [[0.5, 0.5]])
    # at 0.50 one pair (TP 1, FP 0, FN 1): 1 / 2; above 0.50 nothing
    s = image_scores(pred, true)
    assert (s["sa50"], s["sa75"]) == (0.5, 0.0)
    assert s["msa"] == pytest.approx(0.05)


def test_a_false_positive_and_a_partial_object():
    true = squares((40, 40), (0, 0, 10, 10), (20, 20, 30, 30))
    # object 1 exact, object 2 at IoU 80 / 100 = 0.8, plus a spurious object
    pred = squares((40, 40), (0, 0, 10, 10), (20, 20, 28, 30), (35, 35, 40, 40))
    sa = segmentation_accuracy(iou_matrix(pred, true))
    # t <= 0.80: TP 2, FP 1, FN 0 -> 2/3; t > 0.80: TP 1, FP 2, FN 1 -> 1/4
    expect = [2 / 3] * 7 + [1 / 4] * 3
    np.testing.assert_allclose(sa, expect)
    assert image_scores(pred, true)["msa"] == pytest.approx(np.mean(expect))


def test_the_assignment_finds_the_pairing_a_greedy_one_misses():
    # pred a overlaps true x (IoU 0.6) and y (0.55); pred b overlaps only x (0.55). Greedy by IoU pairs a-x
    # and leaves b unmatched; the best one-to-one pairing at 0.5 is a-y, b-x (TP 2).
    iou = np.array([[0.6, 0.55], [0.55, 0.0]])
    np.testing.assert_allclose(segmentation_accuracy(iou, (0.5, 0.58)), [1.0, 1 / 3])


def test_nothing_predicted_scores_zero():
    true = squares((20, 20), (0, 0, 5, 5))
    pred = np.zeros_like(true)
    assert image_scores(pred, true) == {"msa": 0.0, "sa50": 0.0, "sa75": 0.0, "n_pred": 0, "n_true": 1}


def test_mean_scores_average_images_and_sum_counts():
    a = {"msa": 1.0, "sa50": 1.0, "sa75": 1.0, "n_pred": 3, "n_true": 3}
    b = {"msa": 0.5, "sa50": 0.0, "sa75": 0.25, "n_pred": 1, "n_true": 2}
    assert mean_scores([a, b]) == {"msa": 0.75, "sa50": 0.5, "sa75": 0.625, "n_pred": 4, "n_true": 5}
    with pytest.raises(ValueError, match="no images"):
        mean_scores([])


def test_labels_from_masks_paints_in_order_and_checks_shapes():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    labels = labels_from_masks([a, b], (4, 4))
    np.testing.assert_array_equal(labels[:, 0], [1, 2, 2, 0])
    assert labels.dtype == np.int32
    with pytest.raises(ValueError, match="mask 0 has shape"):
        labels_from_masks([np.zeros((3, 4), bool)], (4, 4))


def test_bad_label_pairs_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        iou_matrix(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match=">= 0"):
        iou_matrix(-np.ones((4, 4), int), np.zeros((4, 4), int))
