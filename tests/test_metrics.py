"""device_runtime.core.metrics on 2x2 masks whose answers can be checked by hand."""

import numpy as np
import pytest

from device_runtime.core.metrics import (
    THRESHOLD_GRID, confusion_counts, confusion_counts_over_thresholds, dice, iou, objective, pixel_accuracy,
    pooled_dice, summary)
from device_runtime.core.postprocess import binarize

HALF = ([[1, 1], [0, 0]], [[1, 0], [0, 0]])  # prediction covers the target and one more pixel


@pytest.mark.parametrize(
    "pred, target, expected_dice, expected_iou, expected_pa",
    [
        (*HALF, 2 / 3, 1 / 2, 3 / 4),  # tp 1, fp 1: 2/(2+1), 1/2, 3 of 4 right
        ([[1, 1], [1, 0]], [[1, 1], [0, 1]], 2 / 3, 1 / 2, 1 / 2),  # tp 2, fp 1, fn 1
        ([[1, 0], [0, 0]], [[0, 1], [0, 0]], 0.0, 0.0, 1 / 2),  # disjoint
        ([[1, 0], [1, 0]], [[1, 0], [1, 0]], 1.0, 1.0, 1.0),  # identical
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]], 1.0, 1.0, 1.0),  # both empty: the Kaggle convention
        ([[0, 0], [0, 0]], [[0, 1], [0, 0]], 0.0, 0.0, 3 / 4),  # only the prediction empty
        ([[1, 1], [1, 1]], [[0, 0], [0, 0]], 0.0, 0.0, 0.0),  # only the target empty
    ],
)
def test_metrics_by_hand(pred, target, expected_dice, expected_iou, expected_pa):
    counts = confusion_counts(np.array([pred]), np.array([target]))
    assert dice(counts) == pytest.approx(expected_dice)
    assert iou(counts) == pytest.approx(expected_iou)
    assert pixel_accuracy(counts) == pytest.approx(expected_pa)


def test_counts_of_a_single_image_and_nonzero_is_foreground():
    counts = confusion_counts(np.array([[3, 7], [0, 0]]), np.array([[255, 0], [0, 0]]))
    assert [int(x) for x in counts] == [1, 1, 0, 2]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differs"):
        confusion_counts(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))


@pytest.mark.parametrize(
    "pred, target, mean_dice, expected_pooled",
    [
        # image 1: perfect single pixel (1); image 2: 1 of 3 target pixels found, no fp (2/4): mean 3/4;
        # pooled tp 2, fn 2: 4/6
        ([[[1, 0], [0, 0]], [[1, 0], [0, 0]]], [[[1, 0], [0, 0]], [[1, 1], [1, 0]]], 3 / 4, 2 / 3),
        # image 1 both empty (1), image 2 disjoint (0): mean 1/2, pooled has no special case: 0
        ([[[0, 0], [0, 0]], [[1, 0], [0, 0]]], [[[0, 0], [0, 0]], [[0, 1], [0, 0]]], 1 / 2, 0.0),
    ],
)
def test_pooled_dice_differs_from_mean_dice(pred, target, mean_dice, expected_pooled):
    counts = confusion_counts(np.array(pred), np.array(target))
    assert dice(counts) == pytest.approx(mean_dice)
    assert pooled_dice(counts) == pytest.approx(expected_pooled)


def test_pooled_dice_of_all_empty_is_one():
    counts = confusion_counts(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    assert pooled_dice(counts) == 1.0


@pytest.mark.parametrize("metric", [dice, iou, pixel_accuracy])
def test_reductions(metric):
    counts = confusion_counts(np.array([HALF[0], HALF[1]]), np.array([HALF[1], HALF[1]]))
    per_image = metric(counts, reduction="none")
    assert per_image.shape == (2,)
    assert metric(counts, reduction="mean") == pytest.approx(per_image.mean())
    with pytest.raises(ValueError, match="'none' or 'mean'"):
        metric(counts, reduction="sum")


@pytest.mark.parametrize(
    "weights, expected",
    [
        ((1, 0, 0), 2 / 3),
        ((0, 1, 0), 1 / 2),
        ((0, 0, 1), 3 / 4),
        ((0.5, 0.25, 0.25), 0.5 * 2 / 3 + 0.25 * 1 / 2 + 0.25 * 3 / 4),
        ((1 / 3, 1 / 3, 1 / 3), (2 / 3 + 1 / 2 + 3 / 4) / 3),
    ],
)
def test_objective_weights(weights, expected):
    counts = confusion_counts(np.array([HALF[0]]), np.array([HALF[1]]))
    assert objective(counts, weights) == pytest.approx(expected)


def test_summary_is_plain_numbers():
    result = summary(confusion_counts(np.array([HALF[0]]), np.array([HALF[1]])))
    assert result == pytest.approx({"dice": 2 / 3, "iou": 1 / 2, "pixel_accuracy": 3 / 4, "pooled_dice": 2 / 3,
                                    "images": 1})
    assert all(type(v) in (float, int) for v in result.values())


def test_counts_over_thresholds_by_hand():
    prob = np.array([[[0.2, 0.5], [0.5, 0.9]]])
    target = np.array([[[0, 1], [1, 1]]])
    counts = confusion_counts_over_thresholds(prob, target, np.array([0.2, 0.5, 0.9]))
    # strict ">": at 0.2 the 0.2 pixel is background, at 0.5 both 0.5 pixels are, at 0.9 everything is
    assert counts.tp[:, 0].tolist() == [3, 1, 0]
    assert counts.fp[:, 0].tolist() == [0, 0, 0]
    assert counts.fn[:, 0].tolist() == [0, 2, 3]
    assert counts.tn[:, 0].tolist() == [1, 1, 1]


def _brute_force(prob, target, thresholds):
    # float(t): the device reads T* from JSON as a Python float
    per_threshold = [confusion_counts(binarize(prob, float(t)), target) for t in thresholds]
    return [np.stack([getattr(c, name) for c in per_threshold]) for name in ("tp", "fp", "fn", "tn")]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("on_grid", [False, True])
def test_counts_over_thresholds_equal_the_loop(dtype, on_grid):
    rng = np.random.default_rng(0)
    if on_grid:  # every probability exactly a grid value (or its float32/16 rounding): the strict ">" edge
        prob = rng.choice(THRESHOLD_GRID, size=(3, 8, 8)).astype(dtype)
    else:  # 8-bit probabilities k/255 hit some grid values too (51/255 = 0.2)
        prob = (rng.integers(0, 256, size=(3, 8, 8)) / 255).astype(dtype)
    target = rng.integers(0, 2, size=(3, 8, 8))
    fast = confusion_counts_over_thresholds(prob, target, THRESHOLD_GRID)
    assert fast.tp.shape == (THRESHOLD_GRID.size, 3)
    for got, want in zip(fast, _brute_force(prob, target, THRESHOLD_GRID)):
        np.testing.assert_array_equal(got, want)


def test_binarize_ignores_the_threshold_scalar_type():
    # np.float64(0.14) and 0.14 must give one mask on float32 maps, or a T* from the grid and the same T*
    # read back from JSON would disagree at probabilities equal to float32(0.14)
    prob = np.full((2, 2), 0.14, np.float32)
    assert binarize(prob, THRESHOLD_GRID[13]).sum() == binarize(prob, 0.14).sum() == 0


def test_counts_over_thresholds_rejects_unsorted_thresholds_and_bad_shapes():
    with pytest.raises(ValueError, match="increasing"):
        confusion_counts_over_thresholds(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), np.array([0.5, 0.2]))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        confusion_counts_over_thresholds(np.zeros((2, 2)), np.zeros((2, 2)), THRESHOLD_GRID)


def test_threshold_grid_covers_the_papers_range():
    assert THRESHOLD_GRID[0] == 0.01 and THRESHOLD_GRID[-1] == 0.99 and THRESHOLD_GRID.size == 99
    assert 0.14 in THRESHOLD_GRID.tolist()
