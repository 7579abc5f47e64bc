"""training.evaluation.tune: T* by equation 4 and the morphology search, on probability maps built by hand."""

import json

import cv2
import numpy as np
import pytest

from device_runtime.core.metrics import THRESHOLD_GRID
from device_runtime.core.postprocess import Morphology, apply_morphology
from training.evaluation.evaluate import evaluate_arrays
from training.evaluation.tune import (
    default_morphology_grid, plot_threshold_curve, search_morphology, sweep_thresholds, tune)


def disc(size=32, radius=6):
    """A disc that an opening with radius 1 leaves unchanged, so speck removal can restore it exactly."""
    yy, xx = np.mgrid[:size, :size]
    shape = ((yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= radius**2).astype(np.uint8)
    return apply_morphology(shape, Morphology(open_radius=1))


def test_separable_maps_give_a_perfect_plateau():
    masks = np.stack([disc(), np.zeros((32, 32), np.uint8)])
    prob = np.where(masks == 1, 0.3, 0.1).astype(np.float32)
    sweep = sweep_thresholds(prob, masks)
    # every T in 0.10..0.29 separates 0.3 from 0.1 (0.1 > 0.10 is false); T* is the middle of that run
    assert 0.10 <= sweep["best_threshold"] <= 0.29
    assert sweep["best_threshold"] == pytest.approx(0.19)
    assert sweep["objective"][sweep["best_index"]] == pytest.approx(1.0)
    assert sweep["thresholds"][sweep["best_index"]] == sweep["best_threshold"]


# One 2x2 image, target = the top-left pixel, probabilities [[0.4, 0.4], [0.4, 0.0]]:
#   T < 0.4: three pixels predicted, tp 1 fp 2 -> Dice 1/2, IoU 1/3, PA 1/2 (objective 4/9 with equal weights)
#   T >= 0.4: nothing predicted            -> Dice 0,   IoU 0,   PA 3/4 (objective 1/4)
TRADE_OFF_PROB = np.array([[[0.4, 0.4], [0.4, 0.0]]])
TRADE_OFF_MASK = np.array([[[1, 0], [0, 0]]])


@pytest.mark.parametrize(
    "weights, best, objective",
    [
        ((1 / 3, 1 / 3, 1 / 3), 0.20, 4 / 9),  # middle of 0.01..0.39
        ((1, 0, 0), 0.20, 1 / 2),  # Dice alone: same side
        ((0, 0, 1), 0.69, 3 / 4),  # pixel accuracy alone prefers predicting nothing: middle of 0.40..0.99
        ((0.1, 0.1, 0.8), 0.69, 0.8 * 3 / 4),  # 0.6 beats 0.1/2 + 0.1/3 + 0.8/2 = 0.483
    ],
)
def test_weights_change_the_choice(weights, best, objective):
    sweep = sweep_thresholds(TRADE_OFF_PROB, TRADE_OFF_MASK, weights)
    assert sweep["best_threshold"] == pytest.approx(best)
    assert sweep["objective"][sweep["best_index"]] == pytest.approx(objective)
    assert sweep["weights"] == pytest.approx(list(weights))


def test_sweep_values_by_hand():
    sweep = sweep_thresholds(TRADE_OFF_PROB, TRADE_OFF_MASK)
    low, high = THRESHOLD_GRID.tolist().index(0.39), THRESHOLD_GRID.tolist().index(0.4)
    assert [sweep[k][low] for k in ("dice", "iou", "pixel_accuracy", "pooled_dice")] == pytest.approx(
        [1 / 2, 1 / 3, 1 / 2, 1 / 2])
    assert [sweep[k][high] for k in ("dice", "iou", "pixel_accuracy", "pooled_dice")] == pytest.approx(
        [0, 0, 3 / 4, 0])


def test_sweep_is_json_and_agrees_with_the_deployed_path():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 2, (3, 16, 16))
    prob = (rng.integers(0, 256, (3, 16, 16)) / 255).astype(np.float32)  # lands exactly on some grid values
    sweep = json.loads(json.dumps(sweep_thresholds(prob, masks)))
    assert len(sweep["thresholds"]) == len(sweep["objective"]) == 99
    for k in (0, 19, 50, 98):
        metrics, _, _ = evaluate_arrays(prob, masks, sweep["thresholds"][k], Morphology())
        for name in ("dice", "iou", "pixel_accuracy", "pooled_dice"):
            assert sweep[name][k] == pytest.approx(metrics[name], abs=1e-12)


def test_custom_thresholds():
    sweep = sweep_thresholds(TRADE_OFF_PROB, TRADE_OFF_MASK, thresholds=[0.1, 0.5])
    assert sweep["thresholds"] == [0.1, 0.5] and sweep["best_threshold"] == 0.1


def speckled(size=32):
    """Two frames of a disc with specks, isolated and touching the disc (min_area cannot remove those)."""
    gt = disc(size)
    prob = np.where(gt == 1, 0.9, 0.05)
    for y, x in [(16, 23), (9, 16), (3, 3), (28, 5), (5, 27)]:
        prob[y, x] = 0.9
    return np.stack([prob, prob]).astype(np.float32), np.stack([gt, gt])


def test_morphology_search_picks_opening_on_speck_noise():
    prob, masks = speckled()
    winner, table = search_morphology(prob, masks, 0.5)
    assert winner == Morphology(open_radius=1)  # the simplest of the candidates that score 1
    assert table[0]["morphology"] == Morphology().to_dict()
    assert max(row["objective"] for row in table) == pytest.approx(1.0)
    assert table[0]["objective"] < 1.0


def test_morphology_search_keeps_clean_predictions_as_they_are():
    masks = np.stack([disc(), np.zeros((32, 32), np.uint8)])
    prob = np.where(masks == 1, 0.9, 0.05).astype(np.float32)
    winner, table = search_morphology(prob, masks, 0.5)
    assert winner == Morphology()
    assert len(table) == len(default_morphology_grid(32, 32))  # "none" is in the grid, and tried once
    assert {"dice", "iou", "pixel_accuracy", "pooled_dice", "objective"} <= set(table[0])


def test_morphology_search_with_given_candidates_always_tries_none():
    prob, masks = speckled()
    winner, table = search_morphology(prob, masks, 0.5, candidates=[Morphology(close_radius=1)])
    assert [row["morphology"] for row in table] == [Morphology().to_dict(), Morphology(close_radius=1).to_dict()]
    assert winner == Morphology()  # closing does not remove specks: no gain, so the simpler one
    with pytest.raises(ValueError, match="Morphology"):
        search_morphology(prob, masks, 0.5, candidates=[{"open_radius": 1}])


@pytest.mark.parametrize("size, areas", [(256, [0, 16, 64, 256]), (512, [0, 64, 256, 1024]), (32, [0, 4])])
def test_default_grid_scales_min_area_with_the_image(size, areas):
    grid = default_morphology_grid(size, size)
    assert sorted({m.min_area for m in grid}) == areas
    assert len(grid) == 3 * 4 * len(areas) * 2 and grid[0] == Morphology()


def test_tune_returns_threshold_json():
    prob, masks = speckled()
    result = json.loads(json.dumps(tune(prob, masks)))
    assert set(result) == {"threshold", "weights", "morphology", "validation", "validation_without_morphology",
                           "sweep", "morphology_search"}
    assert 0.05 <= result["threshold"] < 0.9
    assert Morphology.from_dict(result["morphology"]) == Morphology(open_radius=1)
    assert result["validation"]["dice"] == pytest.approx(1.0)
    best = result["sweep"]["best_index"]
    for name in ("dice", "iou", "pixel_accuracy", "pooled_dice", "objective"):
        assert result["validation_without_morphology"][name] == pytest.approx(result["sweep"][name][best])
    assert result["validation"]["objective"] > result["validation_without_morphology"]["objective"]


@pytest.mark.parametrize(
    "prob, masks, match",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "differs"),
        (np.zeros((4, 4)), np.zeros((4, 4)), r"\(N, H, W\)"),
        (np.zeros((0, 4, 4)), np.zeros((0, 4, 4)), "empty"),
        (np.full((1, 2, 2), 1.5), np.zeros((1, 2, 2)), r"\[0, 1\]"),
        (np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)), "NaN"),
        (np.zeros((1, 2, 2), np.uint8), np.zeros((1, 2, 2)), "dtype uint8"),
        (np.zeros((1, 2, 2)), np.full((1, 2, 2), 255), "0/1"),
    ],
)
def test_bad_input_is_named(prob, masks, match):
    with pytest.raises(ValueError, match=match):
        sweep_thresholds(prob, masks)
    with pytest.raises(ValueError, match=match):
        tune(prob, masks)


@pytest.mark.parametrize("weights", [(1, 1), (-1, 1, 1), (0, 0, 0), (1, float("nan"), 1)])
def test_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        sweep_thresholds(TRADE_OFF_PROB, TRADE_OFF_MASK, weights)


def test_bad_thresholds():
    with pytest.raises(ValueError, match="thresholds"):
        sweep_thresholds(TRADE_OFF_PROB, TRADE_OFF_MASK, thresholds=[0.5, 1.5])


def test_threshold_curve_is_a_png(tmp_path):
    prob, masks = speckled()
    path = tmp_path / "plots" / "threshold_curve.png"
    plot_threshold_curve(sweep_thresholds(prob, masks), path, title="speckled disc")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["threshold_curve.png"]  # no temporary left behind


def test_threshold_curve_needs_a_sweep(tmp_path):
    with pytest.raises(ValueError, match="sweep_thresholds"):
        plot_threshold_curve({"thresholds": [0.5]}, tmp_path / "curve.png")
