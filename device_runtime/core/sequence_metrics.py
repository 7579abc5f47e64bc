"""Metrics of a segmented video against a moving truth: mean Dice, flicker, appear/vanish events. numpy + OpenCV.

There are no labelled ultrasound videos here, so sequences are made with a known truth and a known motion
(`training.data.sequences`): each frame t has an affine map from the previous frame's pixels to its own.

- Mean Dice: per frame (both empty = 1, as `metrics.dice`), averaged over the frames.
- Flicker: the share of mask pixels that change between consecutive frames beyond what the true motion
  explains: the previous mask is moved by the true motion, then |M_t xor moved M_t-1| / |M_t or moved M_t-1|,
  summed over the sequence before dividing (a frame with a tiny mask does not dominate). Pixels that entered
  the field this frame (no source in the previous one) are left out. The truth's own flicker (resampling at
  its edge) is the floor a perfect segmenter would reach.
- Events: the nerve is present when the mask holds at least `min_area` pixels; an appear event is a frame
  where it is present and was not in the previous one, a vanish event the reverse.
"""

from __future__ import annotations

import cv2
import numpy as np

from .metrics import confusion_counts, dice


def changed_share(previous: np.ndarray, current: np.ndarray, valid: np.ndarray | None = None) -> tuple[int, int]:
    """(changed, union) pixel counts of two (h, w) 0/1 masks, only where `valid` (if given) is non-zero."""
    previous, current = _as_u8(previous), _as_u8(current)
    changed = cv2.bitwise_xor(previous, current)
    union = cv2.bitwise_or(previous, current)
    if valid is not None:
        valid = _as_u8(valid)
        changed = cv2.bitwise_and(changed, valid)
        union = cv2.bitwise_and(union, valid)
    return cv2.countNonZero(changed), cv2.countNonZero(union)


def mask_change(previous: np.ndarray, current: np.ndarray) -> float:
    """The share of the mask that changed: |previous xor current| / |previous or current| (0 when both empty)."""
    changed, union = changed_share(previous, current)
    return changed / union if union else 0.0


def _as_u8(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask.view(np.uint8)
    return mask if mask.dtype == np.uint8 else (mask != 0).astype(np.uint8)


def move_mask(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (h, w) mask moved by a 2x3 affine (source pixels -> destination pixels), nearest neighbour, and the
    0/1 map of destination pixels whose source lies inside the frame."""
    height, width = mask.shape
    moved = cv2.warpAffine(_as_u8(mask), np.asarray(affine, np.float64), (width, height), flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inside = cv2.warpAffine(np.ones((height, width), np.uint8), np.asarray(affine, np.float64), (width, height),
                            flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return moved, inside


def flicker_counts(masks: np.ndarray, motions: np.ndarray) -> tuple[int, int]:
    """(changed, union) summed over consecutive pairs of a (T, h, w) mask sequence.

    Args:
        masks: (T, h, w) 0/1.
        motions: (T, 2, 3): motions[t] maps frame t-1's pixels to frame t's (motions[0] is not used).
    """
    changed = union = 0
    for t in range(1, len(masks)):
        moved, inside = move_mask(masks[t - 1], motions[t])
        c, u = changed_share(moved, masks[t], inside)
        changed, union = changed + c, union + u
    return changed, union


def flicker(masks: np.ndarray, motions: np.ndarray) -> float:
    """Share of mask pixels changed beyond the true motion over a (T, h, w) sequence (0 when never any mask)."""
    changed, union = flicker_counts(masks, motions)
    return changed / union if union else 0.0


def presence(masks: np.ndarray, min_area: int) -> np.ndarray:
    """(T,) bool: the mask of each frame holds at least `min_area` pixels (at least one when min_area is 0)."""
    areas = np.count_nonzero(np.asarray(masks).reshape(len(masks), -1), axis=1)
    return areas >= max(int(min_area), 1)


def events(masks: np.ndarray, min_area: int) -> tuple[int, int]:
    """(appear, vanish) event counts of a (T, h, w) mask sequence."""
    present = presence(masks, min_area)
    return int(np.sum(present[1:] & ~present[:-1])), int(np.sum(~present[1:] & present[:-1]))


def sequence_scores(pred: np.ndarray, truth: np.ndarray, motions: np.ndarray, min_area: int) -> dict:
    """Mean Dice, flicker (and the truth's), appear/vanish events (and the truth's) of one sequence.

    Shape:
        pred, truth: (T, h, w) 0/1; motions: (T, 2, 3) as in `flicker_counts`.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"expected prediction and truth of one shape (T, h, w), got {pred.shape} and {truth.shape}")
    if np.shape(motions) != (len(pred), 2, 3):
        raise ValueError(f"expected one 2x3 motion per frame, shape {(len(pred), 2, 3)}, got {np.shape(motions)}")
    appear, vanish = events(pred, min_area)
    truth_appear, truth_vanish = events(truth, min_area)
    return {
        "frames": int(len(pred)),
        "dice": float(dice(confusion_counts(pred, truth))),
        "flicker": flicker(pred, motions),
        "truth_flicker": flicker(truth, motions),
        "appear": appear,
        "vanish": vanish,
        "truth_appear": truth_appear,
        "truth_vanish": truth_vanish,
    }
