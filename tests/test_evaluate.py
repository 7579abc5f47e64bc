"""training.evaluation.evaluate: test metrics of the deployed post-processing, and the examples figure."""

import cv2
import numpy as np
import pytest

from device_runtime.core.postprocess import Morphology
from training.evaluation.evaluate import _pick_rows, evaluate_arrays, plot_examples

# image 0: the prediction covers the one target pixel and one more (Dice 2/3, IoU 1/2, PA 3/4);
# image 1: nothing predicted, nothing there (1, 1, 1)
PROB = np.array([[[0.9, 0.9], [0.1, 0.1]], [[0.1, 0.1], [0.1, 0.1]]], np.float32)
MASKS = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], np.uint8)


def test_evaluate_arrays_by_hand():
    metrics, per_image, preds = evaluate_arrays(PROB, MASKS, 0.5, Morphology())
    assert metrics.pop("morphology") == Morphology().to_dict()
    assert metrics == pytest.approx({
        "dice": (2 / 3 + 1) / 2, "iou": (1 / 2 + 1) / 2, "pixel_accuracy": (3 / 4 + 1) / 2,
        "pooled_dice": 2 / 3, "images": 2, "threshold": 0.5,
    })
    np.testing.assert_allclose(per_image, [2 / 3, 1.0])
    assert preds.dtype == np.uint8
    assert preds.tolist() == [[[1, 1], [0, 0]], [[0, 0], [0, 0]]]


def test_evaluate_arrays_applies_the_morphology():
    prob = np.zeros((1, 8, 8), np.float32)
    prob[0, 2:5, 2:5] = 0.9  # a 9-pixel nerve
    prob[0, 7, 7] = 0.9  # a 1-pixel false alarm
    masks = (prob > 0.5).astype(np.uint8)
    masks[0, 7, 7] = 0
    plain, _, _ = evaluate_arrays(prob, masks, 0.5, Morphology())
    cleaned, per_image, preds = evaluate_arrays(prob, masks, 0.5, Morphology(min_area=2))
    assert plain["dice"] == pytest.approx(18 / 19)
    assert cleaned["dice"] == 1.0 and per_image.tolist() == [1.0] and preds[0, 7, 7] == 0
    assert cleaned["morphology"]["min_area"] == 2


def test_evaluate_arrays_rejects_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        evaluate_arrays(PROB, MASKS, 1.5, Morphology())
    with pytest.raises(ValueError, match="Morphology.from_dict"):
        evaluate_arrays(PROB, MASKS, 0.5, {"open_radius": 1})
    with pytest.raises(ValueError, match="differs"):
        evaluate_arrays(PROB, MASKS[:, :1], 0.5, Morphology())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_arrays(PROB * 4 - 1, MASKS, 0.5, Morphology())


@pytest.mark.parametrize(
    "dice, rows",
    [
        ([0.5], [("best", 0)]),
        ([0.2, 0.9], [("best", 1), ("worst", 0)]),
        ([0.2, 0.9, 0.5], [("best", 1), ("median", 2), ("worst", 0)]),
        ([0.5, 0.9, 0.1, 0.7, 0.3], [("best", 1), ("median", 0), ("worst", 2)]),
        ([1.0, 1.0, 1.0], [("best", 2), ("median", 1), ("worst", 0)]),  # ties keep the input order
    ],
)
def test_pick_rows(dice, rows):
    assert _pick_rows(np.array(dice)) == rows


def test_examples_show_frames_with_a_nerve_and_count_the_empty_ones():
    from training.evaluation.evaluate import example_rows

    masks = np.zeros((5, 8, 8), np.uint8)
    masks[[1, 2, 4], 2:5, 2:5] = 1  # frames 0 and 3 have no nerve
    preds = np.zeros_like(masks)
    preds[3, 0, 0] = 1  # a false alarm on an empty frame
    dice = np.array([1.0, 0.8, 0.3, 0.0, 0.5])
    rows, caption = example_rows(dice, masks, preds)
    assert rows == [("best", 1), ("median", 4), ("worst", 2)]  # frame 0's Dice 1 (empty, nothing predicted) is not best
    assert caption == ("best, median and worst of the 3 frames with a nerve; 2 frames without one (not shown): "
                       "nothing predicted on 1 of 2")
    rows, caption = example_rows(np.ones(2), np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    assert rows == [("best", 1), ("worst", 0)] and caption == "none of the 2 frames has a nerve"


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_examples_png(tmp_path, n):
    rng = np.random.default_rng(n)
    images = rng.random((n, 32, 32)).astype(np.float32)
    masks = np.zeros((n, 32, 32), np.uint8)
    masks[:, 10:20, 10:20] = 1
    preds = np.roll(masks, shift=2, axis=2)
    preds[0] = 0  # one frame with a miss
    per_image = rng.random(n)
    path = tmp_path / "examples.png"
    plot_examples(images, masks, preds, per_image, path, names=[f"frame_{i}" for i in range(n)])
    image = cv2.imread(str(path))
    assert image is not None
    rows = min(n, 3)
    assert image.shape[0] > image.shape[1] * rows / 3 * 0.8  # one row per picked frame
    assert [p.name for p in tmp_path.iterdir()] == ["examples.png"]


def test_examples_with_8_bit_frames_and_no_names(tmp_path):
    images = np.full((2, 16, 16), 128, np.uint8)
    masks = np.zeros((2, 16, 16), np.uint8)
    plot_examples(images, masks, masks, np.ones(2), tmp_path / "examples.png")
    assert cv2.imread(str(tmp_path / "examples.png")) is not None


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(names=["only one"]), "names"),
        (dict(per_image_dice=np.ones(3)), "per_image_dice"),
        (dict(preds=np.zeros((2, 8, 9))), "must match"),
        (dict(images=np.zeros((0, 8, 8)), masks=np.zeros((0, 8, 8)), preds=np.zeros((0, 8, 8))), "N >= 1"),
    ],
)
def test_examples_bad_input(tmp_path, change, match):
    args = dict(images=np.zeros((2, 8, 8)), masks=np.zeros((2, 8, 8)), preds=np.zeros((2, 8, 8)),
                per_image_dice=np.ones(2), path=tmp_path / "examples.png", names=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        plot_examples(**args)
    assert not (tmp_path / "examples.png").exists()
