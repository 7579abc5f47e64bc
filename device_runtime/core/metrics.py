"""Dice, IoU and pixel accuracy from confusion counts (the paper's equations 1-3), in numpy.

First the counts tp, fp, fn, tn per image (and per threshold, vectorised); then every metric is a
one-line function of those counts. When prediction and ground truth are both empty, Dice = IoU = 1 (the
Kaggle 2016 nerve challenge's convention); when exactly one is empty, 0 (that follows from the counts).
Pooled Dice sums the counts over all images first and has no special case.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

THRESHOLD_GRID = np.round(np.arange(1, 100) / 100.0, 2)  # 0.01..0.99: the paper's T* = 0.14 is inside


class Counts(NamedTuple):
    """Confusion counts, each an int64 array of the same shape (..., N) over images."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray


def confusion_counts(pred: np.ndarray, target: np.ndarray) -> Counts:
    """Per-image counts of binary masks.

    Shape:
        pred, target: (N, H, W) or (H, W), any dtype; non-zero is foreground. Returns arrays of shape (N,) or ().
    """
    pred = np.asarray(pred) != 0
    target = np.asarray(target) != 0
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    axes = (-2, -1)
    tp = np.sum(pred & target, axis=axes, dtype=np.int64)
    fp = np.sum(pred & ~target, axis=axes, dtype=np.int64)
    fn = np.sum(~pred & target, axis=axes, dtype=np.int64)
    tn = pred.shape[-1] * pred.shape[-2] - tp - fp - fn
    return Counts(tp, fp, fn, tn)


def confusion_counts_over_thresholds(prob: np.ndarray, target: np.ndarray, thresholds: np.ndarray) -> Counts:
    """Counts of `prob > t` against `target` for every threshold t, without building T masks.

    Each pixel is foreground exactly for the thresholds below its probability, so a histogram of
    probabilities over the sorted thresholds, summed from the top, gives tp and fp for all of them at once.

    Shape:
        prob: (N, H, W) float; target: (N, H, W); thresholds: (T,) increasing. Returns arrays of shape (T, N).
    """
    prob = np.asarray(prob)
    target = np.asarray(target) != 0
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if prob.shape != target.shape or prob.ndim != 3:
        raise ValueError(f"expected prob and target of one shape (N, H, W), got {prob.shape} and {target.shape}")
    if np.any(np.diff(thresholds) <= 0):
        raise ValueError("thresholds must be strictly increasing")
    n_images, n_thresholds = prob.shape[0], thresholds.size
    # Compare in the map's own float type, as `binarize` (prob > float(t)) does: a float32 probability equal to
    # float32(0.14) is not > 0.14 there, but would be > 0.14 here if the search ran in float64.
    dtype = prob.dtype if np.issubdtype(prob.dtype, np.floating) else np.float64
    # bins[i] = number of thresholds strictly below p: the pixel counts as foreground for thresholds[:bins[i]]
    # (casting may merge neighbouring thresholds; searchsorted on a non-decreasing array keeps that rule)
    bins = np.searchsorted(thresholds.astype(dtype), prob.reshape(n_images, -1), side="left")
    flat_target = target.reshape(n_images, -1)
    offsets = (np.arange(n_images) * (n_thresholds + 1))[:, None]
    size = n_images * (n_thresholds + 1)
    pos_hist = np.bincount((bins + offsets)[flat_target], minlength=size).reshape(n_images, -1)
    neg_hist = np.bincount((bins + offsets)[~flat_target], minlength=size).reshape(n_images, -1)
    # foreground at threshold k: pixels whose bin > k, i.e. the reversed cumulative sum from bin k+1
    tp = np.cumsum(pos_hist[:, ::-1], axis=1)[:, ::-1][:, 1:].T
    fp = np.cumsum(neg_hist[:, ::-1], axis=1)[:, ::-1][:, 1:].T
    positives = flat_target.sum(axis=1)
    fn = positives[None, :] - tp
    tn = (flat_target.shape[1] - positives)[None, :] - fp
    return Counts(tp.astype(np.int64), fp.astype(np.int64), fn.astype(np.int64), tn.astype(np.int64))


def _reduce(values: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean(axis=-1)
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


def _ratio_or_one(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, and 1 where the denominator is 0 (both masks empty)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, 1.0)


def dice(c: Counts, reduction: str = "mean") -> np.ndarray:
    return _reduce(_ratio_or_one(2 * c.tp, 2 * c.tp + c.fp + c.fn), reduction)


def iou(c: Counts, reduction: str = "mean") -> np.ndarray:
    return _reduce(_ratio_or_one(c.tp, c.tp + c.fp + c.fn), reduction)


def pixel_accuracy(c: Counts, reduction: str = "mean") -> np.ndarray:
    return _reduce((c.tp + c.tn) / (c.tp + c.fp + c.fn + c.tn), reduction)


def pooled_dice(c: Counts) -> np.ndarray:
    """Dataset-level Dice: counts summed over images (last axis) first."""
    tp, fp, fn = (np.sum(x, axis=-1) for x in (c.tp, c.fp, c.fn))
    return _ratio_or_one(2 * tp, 2 * tp + fp + fn)


def objective(c: Counts, weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)) -> np.ndarray:
    """The paper's equation 4 score: l1 * mean Dice + l2 * mean IoU + l3 * mean pixel accuracy."""
    l1, l2, l3 = weights
    return l1 * dice(c) + l2 * iou(c) + l3 * pixel_accuracy(c)


def summary(c: Counts) -> dict[str, float]:
    """Mean Dice, IoU, pixel accuracy and pooled Dice of per-image counts of shape (N,), as plain floats."""
    return {
        "dice": float(dice(c)),
        "iou": float(iou(c)),
        "pixel_accuracy": float(pixel_accuracy(c)),
        "pooled_dice": float(pooled_dice(c)),
        "images": int(np.size(c.tp)),
    }
