"""Test-split evaluation at T* with the tuned morphology, and the examples figure.

Works on numpy arrays, not models. Masks come from `device_runtime.core.postprocess` and scores from
`device_runtime.core.metrics`, so the numbers are those of the deployed post-processing.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from device_runtime.core.fileio import atomic_path
from device_runtime.core.metrics import confusion_counts, dice, summary
from device_runtime.core.postprocess import Morphology, postprocess_batch
from device_runtime.core.preprocess import to_unit_float

from .tune import check_arrays

GT_COLOUR = np.array([0.0, 0.85, 0.0])  # green: ground truth
PRED_COLOUR = np.array([1.0, 0.0, 1.0])  # magenta: prediction; stays distinct from green for most colour vision


def evaluate_arrays(prob, masks, threshold: float, morphology: Morphology):
    """Metrics of the deployed post-processing (threshold, then morphology) against ground truth.

    Args:
        prob: probabilities; masks: ground truth 0/1.
        threshold: T* from tuning.
        morphology: the tuned clean-up.

    Returns:
        (metrics, per_image_dice, preds): metrics is `metrics.summary` (mean Dice, IoU, pixel accuracy,
        pooled Dice, images) plus "threshold" and "morphology" (its to_dict); per_image_dice is float64;
        preds are the uint8 0/1 masks.

    Shape:
        prob, masks: (N, H, W) -> per_image_dice: (N,), preds: (N, H, W).
    """
    prob, masks = check_arrays(prob, masks)
    if not isinstance(morphology, Morphology):
        raise ValueError(f"morphology must be a Morphology, got {type(morphology).__name__}; "
                         "use Morphology.from_dict for a dict from threshold.json")
    preds = postprocess_batch(prob, float(threshold), morphology)
    counts = confusion_counts(preds, masks)
    metrics = {**summary(counts), "threshold": float(threshold), "morphology": morphology.to_dict()}
    return metrics, dice(counts, reduction="none"), preds.astype(np.uint8, copy=False)


def _pick_rows(per_image_dice: np.ndarray) -> list[tuple[str, int]]:
    """(label, index) of the best, median and worst frame: one row for N = 1, best and worst for N = 2."""
    order = np.argsort(per_image_dice, kind="stable")  # worst first; ties keep the input order
    best, median, worst = int(order[-1]), int(order[(len(order) - 1) // 2]), int(order[0])
    rows = [("best", best)]
    if median not in (best, worst):  # with two frames the "median" is the worst one; don't label it twice
        rows.append(("median", median))
    if worst != best:
        rows.append(("worst", worst))
    return rows


def example_rows(per_image_dice: np.ndarray, masks: np.ndarray, preds: np.ndarray) -> tuple[list[tuple[str, int]], str]:
    """The frames examples.png shows, and its caption. Best, median and worst are chosen among the frames with a
    nerve: a frame without one scores Dice 1 whenever nothing is predicted there, which shows nothing; the
    caption counts those frames (and how many of them stayed empty) instead.

    Shape: per_image_dice (N,); masks, preds (N, H, W).
    """
    has_nerve = masks.reshape(len(masks), -1).any(axis=1)
    with_nerve = np.flatnonzero(has_nerve)
    empty = len(masks) - len(with_nerve)
    if not len(with_nerve):  # nothing to choose among: all frames, as they are
        return _pick_rows(per_image_dice), f"none of the {len(masks)} frames has a nerve"
    rows = [(label, int(with_nerve[i])) for label, i in _pick_rows(per_image_dice[with_nerve])]
    caption = f"best, median and worst of the {len(with_nerve)} frames with a nerve"
    if empty:
        clean = int((~preds[~has_nerve].reshape(empty, -1).any(axis=1)).sum())
        caption += (f"; {empty} frame{'s' if empty > 1 else ''} without one (not shown): nothing predicted on "
                    f"{clean} of {empty}")
    return rows, caption


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Inner boundary of a 0/1 mask, `thickness` pixels wide, as bool."""
    mask = mask.astype(np.uint8)
    eroded = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=thickness, borderValue=1)
    return (mask > 0) & (eroded == 0)


def _overlay(grey: np.ndarray, fill: np.ndarray | None, fill_colour, outline: np.ndarray | None,
             outline_colour) -> np.ndarray:
    """(H, W) grey in [0, 1] -> (H, W, 3) RGB with a translucent fill and an opaque outline."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if fill is not None:
        rgb[fill] = 0.55 * rgb[fill] + 0.45 * fill_colour
    if outline is not None:
        rgb[outline] = outline_colour
    return rgb


def plot_examples(images, masks, preds, per_image_dice, path: str | os.PathLike,
                  names: list[str] | None = None) -> None:
    """examples.png: the best, median and worst frames with a nerve by Dice, one row each (`example_rows`).

    Columns: the frame; the ground truth (green fill and outline); the prediction (magenta fill) with the
    ground-truth outline on top, so misses and false alarms are visible at a glance.

    Args:
        images: frames, floats in [0, 1] or 8/16-bit integers. masks, preds: 0/1 masks.
        per_image_dice: as returned by `evaluate_arrays`.
        path: where the PNG goes; written atomically.
        names: one name per frame for the titles; default the frame's index.

    Shape:
        images, masks, preds: (N, H, W); per_image_dice: (N,); N >= 1.
    """
    images, masks, preds = np.asarray(images), np.asarray(masks), np.asarray(preds)
    per_image_dice = np.asarray(per_image_dice, dtype=np.float64)
    if images.ndim != 3 or len(images) == 0:
        raise ValueError(f"expected images of shape (N, H, W) with N >= 1, got {images.shape}")
    if masks.shape != images.shape or preds.shape != images.shape:
        raise ValueError(f"images {images.shape}, masks {masks.shape} and predictions {preds.shape} must match")
    if per_image_dice.shape != (len(images),):
        raise ValueError(f"per_image_dice has shape {per_image_dice.shape}, expected ({len(images)},)")
    if names is not None and len(names) != len(images):
        raise ValueError(f"got {len(names)} names for {len(images)} images")
    names = [str(n) for n in names] if names is not None else [f"#{i}" for i in range(len(images))]
    # Same figure path as tune.plot_threshold_curve: a bare Figure, no pyplot state (see the comment there).
    from matplotlib.figure import Figure

    rows, caption = example_rows(per_image_dice, masks, preds)
    thickness = max(1, images.shape[1] // 128)  # a 1-pixel line vanishes when 256 px are drawn at 3 inches
    fig = Figure(figsize=(9, 3.1 * len(rows) + 0.4), dpi=100)
    fig.suptitle(caption, fontsize=10)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (label, i), ax_row in zip(rows, axes):
        grey = np.clip(to_unit_float(images[i]), 0.0, 1.0).astype(np.float64)
        gt, pred = masks[i] != 0, preds[i] != 0
        panels = (
            (grey, "frame"),
            (_overlay(grey, gt, GT_COLOUR, _outline(gt, thickness), GT_COLOUR), "ground truth"),
            (_overlay(grey, pred, PRED_COLOUR, _outline(gt, thickness), GT_COLOUR), "prediction"),
        )
        for ax, (picture, caption) in zip(ax_row, panels):
            ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=9)
        ax_row[0].set_title(f"{label}: {names[i]}  Dice {per_image_dice[i]:.3f}", loc="left", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
