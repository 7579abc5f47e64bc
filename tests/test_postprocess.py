"""device_runtime.core.postprocess: threshold, morphology in its documented order, and per-frame statistics."""

import warnings

import numpy as np
import pytest

from device_runtime.core.errors import InputError
from device_runtime.core.postprocess import (
    Morphology, apply_morphology, binarize, binary_entropy, fill_holes, frame_stats, postprocess, postprocess_batch,
    remove_small_components, sigmoid)

# 5x5 square without its corners: unchanged by an opening with the radius-1 kernel (a 3x3 cross)
ROUNDED = np.array(
    [[0, 1, 1, 1, 0],
     [1, 1, 1, 1, 1],
     [1, 1, 1, 1, 1],
     [1, 1, 1, 1, 1],
     [0, 1, 1, 1, 0]], np.uint8)


def place(shape, patch, y, x):
    out = np.zeros(shape, np.uint8)
    out[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
    return out


def test_opening_removes_a_speck_and_keeps_a_rounded_blob():
    blob = place((11, 11), ROUNDED, 1, 1)
    noisy = blob.copy()
    noisy[9, 9] = 1
    np.testing.assert_array_equal(apply_morphology(noisy, Morphology(open_radius=1)), blob)


def test_closing_fills_a_one_pixel_gap():
    mask = place((9, 9), ROUNDED, 2, 2)
    mask[4, 4] = 0  # a 1-pixel gap inside the blob
    np.testing.assert_array_equal(apply_morphology(mask, Morphology(close_radius=1)), place((9, 9), ROUNDED, 2, 2))


def test_closing_does_not_glue_a_blob_to_the_frame_edge():
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 3:10] = 1  # three pixels from the left edge
    np.testing.assert_array_equal(apply_morphology(mask, Morphology(close_radius=3)), mask)


def test_closing_keeps_a_blob_that_touches_the_edge():
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 0:10] = 1
    np.testing.assert_array_equal(apply_morphology(mask, Morphology(close_radius=2)), mask)


@pytest.mark.parametrize("min_area, kept", [(0, 13), (3, 13), (4, 10), (10, 10), (11, 0)])
def test_min_area(min_area, kept):
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 0:3] = 1  # 3 pixels
    mask[4:6, 2:7] = 1  # 10 pixels
    assert apply_morphology(mask, Morphology(min_area=min_area)).sum() == kept


def test_small_components_are_8_connected():
    diagonal = np.eye(3, dtype=np.uint8)  # one component of 3 pixels under 8-connectivity
    assert remove_small_components(diagonal, 3).sum() == 3


def test_fill_holes_fills_an_enclosed_hole():
    ring = np.zeros((7, 7), np.uint8)
    ring[1:6, 1:6] = 1
    ring[2:5, 2:5] = 0
    filled = np.zeros((7, 7), np.uint8)
    filled[1:6, 1:6] = 1
    np.testing.assert_array_equal(fill_holes(ring), filled)


def test_fill_holes_leaves_a_notch_that_touches_the_border():
    notched = np.zeros((7, 7), np.uint8)
    notched[0:5, 0:5] = 1
    notched[0:3, 2] = 0  # open to the top edge
    np.testing.assert_array_equal(fill_holes(notched), notched)


@pytest.mark.parametrize(
    "morphology",
    [
        # a 3x3 square with a diagonal spur (10 pixels): opening first leaves a 5-pixel plus, which
        # min_area 10 then drops; the other order would keep the plus
        Morphology(open_radius=1, min_area=10),
        # a ring of 8 pixels: min_area 9 first drops it; filling first would make 9 pixels and keep it
        Morphology(min_area=9, fill_holes=True),
    ],
)
def test_order_open_close_min_area_fill(morphology):
    if morphology.open_radius:
        mask = place((9, 9), np.ones((3, 3), np.uint8), 3, 3)
        mask[6, 6] = 1
    else:
        mask = place((9, 9), np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], np.uint8), 3, 3)
    assert apply_morphology(mask, morphology).sum() == 0


def test_no_morphology_is_the_identity():
    mask = np.random.default_rng(0).integers(0, 2, (8, 8)).astype(np.uint8)
    np.testing.assert_array_equal(apply_morphology(mask, Morphology()), mask)


@pytest.mark.parametrize(
    "kwargs",
    [{"open_radius": -1}, {"close_radius": -2}, {"min_area": -5}, {"open_radius": 1.5}, {"min_area": "16"}],
)
def test_morphology_validation(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        Morphology(**kwargs)


def test_morphology_dict_round_trip_and_unknown_key():
    m = Morphology(open_radius=1, close_radius=2, min_area=16, fill_holes=True)
    assert Morphology.from_dict(m.to_dict()) == m
    with pytest.raises(InputError, match="dilate"):
        Morphology.from_dict({"open_radius": 1, "dilate": 2})


@pytest.mark.parametrize("threshold, expected", [(0.5, [0, 0, 1]), (0.49, [0, 1, 1]), (0.0, [1, 1, 1]), (1.0, [0, 0, 0])])
def test_binarize_is_strict(threshold, expected):
    prob = np.array([0.49, 0.5, 0.51])
    out = binarize(prob, threshold)
    assert out.dtype == np.uint8 and out.tolist() == expected


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_binarize_threshold_range(threshold):
    with pytest.raises(InputError, match="threshold"):
        binarize(np.zeros(3), threshold)


def test_postprocess_and_batch():
    prob = np.zeros((2, 11, 11), np.float32)
    prob[:, 1:6, 1:6] = ROUNDED * 0.8
    prob[0, 9, 9] = 0.9  # a speck in the first frame
    morphology = Morphology(open_radius=1)
    batch = postprocess_batch(prob, 0.5, morphology)
    assert batch.shape == (2, 11, 11) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], batch[1])
    np.testing.assert_array_equal(batch[0], postprocess(prob[0], 0.5, morphology))
    assert postprocess_batch(np.zeros((0, 4, 4), np.float32), 0.5, morphology).shape == (0, 4, 4)


def test_sigmoid_is_stable():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning either
        out = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    assert out.dtype == np.float32
    assert out.tolist() == [0.0, 0.5, 1.0]


def test_binary_entropy():
    assert binary_entropy(np.array([0.5]))[0] == pytest.approx(1.0)
    assert binary_entropy(np.array([0.0, 1.0])).max() < 1e-5


def test_frame_stats_of_a_rectangle_and_a_speck():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 2:5] = 1  # x 2..4, y 1..2: 6 pixels
    mask[5, 7] = 1  # a second component
    prob = np.where(mask == 1, 0.8, 0.1)
    stats = frame_stats(mask, prob, pixel_spacing_mm=0.1)
    assert stats["area_px"] == 7
    assert stats["area_mm2"] == pytest.approx(0.07)
    assert stats["centroid"] == pytest.approx([(2 + 3 + 4 + 2 + 3 + 4 + 7) / 7, (1 + 1 + 1 + 2 + 2 + 2 + 5) / 7])
    assert stats["bbox"] == [2, 1, 6, 5]  # [x, y, w, h] of both components together
    assert stats["components"] == 2
    assert stats["mean_prob"] == pytest.approx(0.8)


def test_frame_stats_of_one_rectangle():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 2:5] = 1
    stats = frame_stats(mask, np.full(mask.shape, 0.5))
    assert stats["centroid"] == pytest.approx([3.0, 1.5])
    assert stats["bbox"] == [2, 1, 3, 2]
    assert stats["area_mm2"] is None
    assert stats["uncertainty"] == pytest.approx(1.0)  # every pixel at 0.5


def test_frame_stats_of_an_empty_certain_frame():
    stats = frame_stats(np.zeros((4, 4), np.uint8), np.zeros((4, 4)))
    assert stats["area_px"] == 0 and stats["components"] == 0
    assert stats["centroid"] is None and stats["bbox"] is None and stats["mean_prob"] is None
    assert stats["uncertainty"] == pytest.approx(0.0, abs=1e-5)


def test_frame_stats_shape_mismatch():
    with pytest.raises(ValueError, match="differs"):
        frame_stats(np.zeros((4, 4)), np.zeros((4, 5)))
