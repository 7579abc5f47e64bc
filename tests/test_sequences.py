"""training.data.sequences (videos with a known truth) and device_runtime.core.sequence_metrics, on small hand-checked cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from device_runtime.core.errors import InputError
from device_runtime.core.sequence_metrics import (changed_share, events, flicker, mask_change, move_mask, presence,
                                                  sequence_scores)
from training.data.sequences import (affine, phantom_sequence, pseudo_video, relative_motions, rescale_motions,
                                     smooth_noise)

IDENTITY = np.eye(2, 3)


def shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0, dx], [0, 1.0, dy]])


# ----------------------------------------------------------------------------------------------- metrics


def test_changed_share_and_mask_change_by_hand():
    a = np.zeros((4, 4), np.uint8)
    a[0, :2] = 1
    b = np.zeros((4, 4), np.uint8)
    b[0, 1:3] = 1  # union 3 pixels, 2 of them changed
    assert changed_share(a, b) == (2, 3)
    assert mask_change(a, b) == pytest.approx(2 / 3)
    assert mask_change(a, a) == 0.0 and mask_change(np.zeros_like(a), np.zeros_like(a)) == 0.0
    valid = np.ones_like(a)
    valid[0, 0] = 0  # leave out one of the changed pixels
    assert changed_share(a, b, valid) == (1, 2)


def test_move_mask_shifts_and_marks_where_nothing_came_from():
    mask = np.zeros((4, 5), np.uint8)
    mask[1, 1] = 1
    moved, inside = move_mask(mask, shift(2, 1))
    assert moved[2, 3] == 1 and moved.sum() == 1
    assert inside[:, :2].sum() == 0 and inside[0].sum() == 0 and inside[1:, 2:].all()


def test_flicker_counts_only_what_the_motion_does_not_explain():
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[0, 2:4, 2:4] = 1
    masks[1, 2:4, 3:5] = 1  # moved 1 px right: explained by the motion
    masks[2, 2:4, 3:5] = 1
    masks[2, 4, 3] = 1  # one pixel more: 1 changed of a union of 5
    motions = np.stack([IDENTITY, shift(1, 0), IDENTITY])
    assert flicker(masks, motions) == pytest.approx(1 / (4 + 5))
    still = np.stack([IDENTITY] * 3)
    assert flicker(masks, still) == pytest.approx((4 + 1) / (6 + 5))  # without the motion, the move is change
    assert flicker(np.zeros((3, 8, 8), np.uint8), motions) == 0.0


def test_flicker_leaves_out_pixels_that_entered_the_field():
    masks = np.zeros((2, 6, 6), np.uint8)
    masks[1, :, 0] = 1  # appears in the column that has no source after a 2 px shift right
    assert flicker(masks, np.stack([IDENTITY, shift(2, 0)])) == 0.0


def test_events_and_presence():
    areas = [0, 5, 5, 1, 0, 6, 6, 0]
    masks = np.zeros((len(areas), 4, 4), np.uint8)
    for t, area in enumerate(areas):
        masks[t].flat[:area] = 1
    assert presence(masks, 2).tolist() == [False, True, True, False, False, True, True, False]
    assert events(masks, 2) == (2, 2)
    assert events(masks, 0) == (2, 2)  # min_area 0 means any pixel: the 1-pixel frame counts
    assert events(masks, 6) == (1, 1)


def test_sequence_scores_of_the_truth_itself():
    masks = np.zeros((4, 8, 8), np.uint8)
    for t in range(4):
        masks[t, 2:5, t:t + 3] = 1
    motions = np.stack([IDENTITY] + [shift(1, 0)] * 3)
    scores = sequence_scores(masks, masks, motions, 1)
    assert scores["dice"] == 1.0 and scores["flicker"] == 0.0 and scores["truth_flicker"] == 0.0
    assert scores["appear"] == scores["truth_appear"] == 0 and scores["frames"] == 4
    with pytest.raises(ValueError, match="one 2x3 motion per frame"):
        sequence_scores(masks, masks, motions[:3], 1)


# ----------------------------------------------------------------------------------------------- sequences


def test_motion_algebra():
    a = affine(1.1, 5.0, (3.0, 4.0), (10.0, 2.0))
    assert np.allclose(a @ [3.0, 4.0, 1.0], [10.0, 2.0])  # the source point lands on the target
    placements = np.stack([shift(1, 2), shift(4, 0), a])
    motions = relative_motions(placements)
    assert np.allclose(motions[0], IDENTITY) and np.allclose(motions[1], shift(3, -2))
    point = np.array([5.0, 7.0, 1.0])  # placement t-1, then motion t = placement t
    assert np.allclose(motions[2] @ np.append(placements[1] @ point, 1), a @ point)
    # a 1 px shift between 8x8 frames is a 0.5 px shift between the same frames at 4x4
    assert np.allclose(rescale_motions(np.stack([shift(1, 0)]), (8, 8), (4, 4))[0], shift(0.5, 0))


def test_smooth_noise_is_smooth_and_scaled():
    noise = smooth_noise(np.random.default_rng(0), 200, 10, 2.0)
    assert noise.shape == (200,) and noise.std() == pytest.approx(2.0)
    assert np.abs(np.diff(noise)).mean() < 0.3 * noise.std()  # neighbours close: a slow drift, not jitter


def agreement_after_moving(sequence) -> float:
    """Dice of each mask moved by the recorded motion against the next mask, over the sequence."""
    hits = total = 0
    for t in range(1, len(sequence.masks)):
        moved, inside = move_mask(sequence.masks[t - 1], sequence.motions[t])
        current = sequence.masks[t] * inside
        hits += 2 * int(np.sum(moved & current))
        total += int(moved.sum() + current.sum())
    return hits / max(total, 1)


def test_phantom_sequence_is_deterministic_and_its_mask_moves_with_the_frame():
    first = phantom_sequence(3, 1, frames=12, size=(64, 64))
    again = phantom_sequence(3, 1, frames=12, size=(64, 64))
    other = phantom_sequence(4, 1, frames=12, size=(64, 64))
    assert first.frames.shape == first.masks.shape == (12, 64, 64) and first.motions.shape == (12, 2, 3)
    assert np.array_equal(first.frames, again.frames) and np.array_equal(first.masks, again.masks)
    assert not np.array_equal(first.frames, other.frames)
    assert set(np.unique(first.masks)) <= {0, 1} and first.masks.any()
    assert not np.allclose(first.motions[1:], IDENTITY)  # the probe moves
    assert agreement_after_moving(first) > 0.9  # the recorded motion carries the truth from frame to frame
    # the speckle decorrelates: consecutive frames differ by more than the motion (the recorded motion aligns
    # the tissue, yet the aligned frames are not equal)
    aligned = cv2.warpAffine(first.frames[0], first.motions[1], (64, 64))
    assert np.abs(aligned[16:48, 16:48].astype(int) - first.frames[1][16:48, 16:48]).mean() > 3


def test_some_phantom_nerves_leave_the_field_and_come_back():
    appear_vanish = [events(phantom_sequence(0, i, frames=40, size=(48, 48)).masks, 5) for i in range(4)]
    assert any(a >= 1 and v >= 1 for a, v in appear_vanish)


def test_pseudo_video_moves_frame_and_mask_together():
    image = np.zeros((64, 80), np.uint8)
    cv2.circle(image, (40, 30), 10, 200, -1)
    mask = (image > 0).astype(np.uint8)
    video = pseudo_video(image, mask, np.random.default_rng(0), frames=10, name="disc")
    again = pseudo_video(image, mask, np.random.default_rng(0), frames=10, name="disc")
    assert np.array_equal(video.frames, again.frames) and video.name == "disc"
    assert agreement_after_moving(video) > 0.9
    for frame, truth in zip(video.frames, video.masks):  # the bright disc is where the mask is
        assert frame[truth == 1].mean() > 4 * frame[truth == 0].mean()
    # fresh speckle per frame: inside the disc, consecutive frames aligned by the motion still differ
    aligned = cv2.warpAffine(video.frames[0], video.motions[1], (80, 64))
    inside = cv2.erode(video.masks[1], np.ones((5, 5), np.uint8)) == 1
    assert np.abs(aligned[inside].astype(int) - video.frames[1][inside]).mean() > 10


@pytest.mark.parametrize("call, message", [
    (lambda: phantom_sequence(0, 0, frames=1), "at least 2 frames"),
    (lambda: phantom_sequence(0, 0, frames=4, size=(16, 64)), "at least 32"),
    (lambda: pseudo_video(np.zeros((40, 40), np.uint8), np.zeros((40, 41)), np.random.default_rng(0)), "differ"),
])
def test_bad_arguments(call, message):
    with pytest.raises(InputError, match=message):
        call()
