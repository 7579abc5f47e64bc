"""Threshold T* (the paper's equation 4) and morphology, tuned on validation probabilities.

Everything here works on numpy arrays, not models: the caller runs the network over the validation split and
hands over probabilities and masks. Scoring goes through `device_runtime.core.metrics` and masks through
`device_runtime.core.postprocess`, so the tuned values are judged on exactly what the device will compute.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from device_runtime.core.fileio import atomic_path
from device_runtime.core.metrics import (
    THRESHOLD_GRID, Counts, confusion_counts, confusion_counts_over_thresholds, dice, iou, objective, pixel_accuracy,
    pooled_dice, summary)
from device_runtime.core.postprocess import Morphology, postprocess_batch

Weights = tuple[float, float, float]
EQUAL_WEIGHTS: Weights = (1 / 3, 1 / 3, 1 / 3)
# Objective values this close count as a tie: they come from identical counts, up to float rounding.
TIE_TOLERANCE = 1e-12


def check_arrays(prob: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate probabilities and ground truth; return them as arrays.

    Shape:
        prob: (N, H, W) floats in [0, 1]; masks: (N, H, W) with values 0/1 (or bool).

    Raises:
        ValueError: a wrong shape, no images, probabilities outside [0, 1] or NaN, non-binary masks.
    """
    prob, masks = np.asarray(prob), np.asarray(masks)
    if prob.ndim != 3:
        raise ValueError(f"expected probabilities of shape (N, H, W), got {prob.shape}; stack the frames first")
    if prob.shape != masks.shape:
        raise ValueError(f"probability shape {prob.shape} differs from mask shape {masks.shape}")
    if prob.size == 0:
        raise ValueError(f"empty input of shape {prob.shape}: need at least one non-empty image")
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(f"probabilities must be floats in [0, 1], got dtype {prob.dtype}; apply the sigmoid first")
    if not np.all((prob >= 0) & (prob <= 1)):  # also false for NaN
        nan = np.isnan(prob)
        low, high = (prob[~nan].min(), prob[~nan].max()) if not nan.all() else (np.nan, np.nan)
        raise ValueError(f"probabilities must lie in [0, 1], got min {low}, max {high}, {int(nan.sum())} NaN; "
                         "pass sigmoid(logits), not logits")
    if masks.dtype != np.bool_ and np.any((masks != 0) & (masks != 1)):
        found = np.unique(masks)[:6].tolist()
        raise ValueError(f"masks must be 0/1, found values {found}; binarise multi-label masks (mask_label) first")
    return prob, masks


def check_weights(weights) -> Weights:
    """Three finite non-negative weights of (Dice, IoU, pixel accuracy), not all zero."""
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or not all(np.isfinite(w)) or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"weights must be three non-negative numbers (Dice, IoU, PA), not all 0; got {weights}")
    return w


def _scores(counts: Counts, weights: Weights) -> dict[str, np.ndarray]:
    """Mean metrics and the equation-4 objective over the last (image) axis."""
    return {
        "dice": dice(counts),
        "iou": iou(counts),
        "pixel_accuracy": pixel_accuracy(counts),
        "pooled_dice": pooled_dice(counts),
        "objective": objective(counts, weights),
    }


def sweep_thresholds(prob, masks, weights=EQUAL_WEIGHTS, thresholds=THRESHOLD_GRID) -> dict:
    """Mean Dice, IoU, pixel accuracy and the objective at every threshold, and T* (equation 4).

    Tie rule: thresholds whose objective equals the maximum (within 1e-12) form a tie; T* is the middle of
    the run of consecutive tied thresholds that starts at the lowest one (the lower middle for an even run).
    A confident model gives one flat objective over a wide range of T; its middle leaves the most margin
    against the small shifts that INT8 or another device adds, where the lowest threshold would leave none.

    Args:
        prob: validation probabilities. masks: their ground truth.
        weights: (l1, l2, l3) of Dice, IoU, pixel accuracy.
        thresholds: increasing values in [0, 1]; the default grid is 0.01..0.99.

    Returns:
        A JSON-able dict: "thresholds", "dice", "iou", "pixel_accuracy", "pooled_dice", "objective" (lists,
        one value per threshold), "weights", "best_threshold", "best_index".

    Shape:
        prob, masks: (N, H, W); thresholds: (T,).
    """
    prob, masks = check_arrays(prob, masks)
    weights = check_weights(weights)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or thresholds.size == 0 or thresholds.min() < 0 or thresholds.max() > 1:
        raise ValueError(f"thresholds must be a non-empty 1-D sequence in [0, 1], got {np.array2string(thresholds)}")
    scores = _scores(confusion_counts_over_thresholds(prob, masks, thresholds), weights)
    tied = scores["objective"] >= scores["objective"].max() - TIE_TOLERANCE
    first = int(np.argmax(tied))
    run = int(np.argmin(tied[first:])) if not tied[first:].all() else tied.size - first
    best = first + (run - 1) // 2
    return {
        "thresholds": thresholds.tolist(),
        **{name: values.tolist() for name, values in scores.items()},
        "weights": list(weights),
        "best_threshold": float(thresholds[best]),
        "best_index": best,
    }


def default_morphology_grid(height: int, width: int) -> list[Morphology]:
    """96 candidates: open {0,1,2} x close {0,1,2,3} x min_area x fill_holes {no, yes}.

    min_area is {0, 16, 64, 256} pixels at 256x256, scaled with the image area so that it means the same
    fraction of the frame at any resolution (values below 2 pixels are no-ops and are dropped).
    """
    scale = height * width / (256 * 256)
    areas = [0] + sorted({int(round(a * scale)) for a in (16, 64, 256)} - {0, 1})
    grid = itertools.product((0, 1, 2), (0, 1, 2, 3), areas, (False, True))
    return [Morphology(o, c, a, f) for o, c, a, f in grid]


def _simplicity(m: Morphology) -> tuple:
    """Sort key, simplest first: fewer operations, then smaller radii and areas."""
    active = (m.open_radius > 0) + (m.close_radius > 0) + (m.min_area > 0) + bool(m.fill_holes)
    return (active, m.open_radius + m.close_radius, m.min_area, bool(m.fill_holes))


def search_morphology(prob, masks, threshold, weights=EQUAL_WEIGHTS, candidates=None):
    """Choose the morphology that maximises the objective at a fixed threshold.

    No morphology is always a candidate, and among tied candidates the simplest wins (`_simplicity`), so
    clean-up is only switched on when it measurably helps on the validation set.

    Args:
        prob, masks: validation probabilities and ground truth.
        threshold: T*, usually from `sweep_thresholds`.
        weights: (l1, l2, l3) of the objective.
        candidates: Morphology settings to try; default `default_morphology_grid` for the image size.

    Returns:
        (winner, table): the chosen Morphology, and one dict per candidate in the order tried with
        "morphology" (its to_dict), "dice", "iou", "pixel_accuracy", "pooled_dice", "objective".

    Shape:
        prob, masks: (N, H, W).
    """
    prob, masks = check_arrays(prob, masks)
    weights = check_weights(weights)
    if candidates is None:
        candidates = default_morphology_grid(*prob.shape[1:])
    if not all(isinstance(m, Morphology) for m in candidates):
        raise ValueError("candidates must be Morphology instances; build them with Morphology.from_dict")
    candidates = [Morphology()] + [m for m in candidates if m != Morphology()]
    table = []
    for morphology in candidates:
        scores = _scores(confusion_counts(postprocess_batch(prob, threshold, morphology), masks), weights)
        table.append({"morphology": morphology.to_dict(), **{k: float(v) for k, v in scores.items()}})
    best = max(row["objective"] for row in table)
    tied = [m for m, row in zip(candidates, table) if row["objective"] >= best - TIE_TOLERANCE]
    return min(tied, key=_simplicity), table


def _summary_with_objective(prob, masks, threshold, morphology, weights) -> dict:
    counts = confusion_counts(postprocess_batch(prob, threshold, morphology), masks)
    return {**summary(counts), "objective": float(objective(counts, weights))}


def tune(prob, masks, weights=EQUAL_WEIGHTS) -> dict:
    """`nerveseg tune` on arrays: T* by the sweep, then the morphology at T*, then metrics with both.

    T* is chosen on the raw thresholded masks (equation 4 as the paper states it) and the morphology is
    then searched at that T*, not jointly: 99 + 96 evaluations instead of 99 x 96.

    Returns:
        The content of threshold.json: "threshold", "weights", "morphology", "validation" (summary at T*
        with the morphology, plus "objective"), "validation_without_morphology", "sweep", "morphology_search".

    Shape:
        prob, masks: (N, H, W).
    """
    prob, masks = check_arrays(prob, masks)
    weights = check_weights(weights)
    sweep = sweep_thresholds(prob, masks, weights)
    threshold = sweep["best_threshold"]
    morphology, table = search_morphology(prob, masks, threshold, weights)
    return {
        "threshold": threshold,
        "weights": list(weights),
        "morphology": morphology.to_dict(),
        "validation": _summary_with_objective(prob, masks, threshold, morphology, weights),
        "validation_without_morphology": _summary_with_objective(prob, masks, threshold, Morphology(), weights),
        "sweep": sweep,
        "morphology_search": table,
    }


def plot_threshold_curve(sweep: dict, path: str | os.PathLike, title: str = "") -> None:
    """The paper's Figure 1: Dice, IoU and pixel accuracy (objective dashed) against T, with T* marked.

    Args:
        sweep: the dict returned by `sweep_thresholds` (or threshold.json's "sweep").
        path: where the PNG goes; written atomically.
        title: figure title.
    """
    missing = {"thresholds", "dice", "iou", "pixel_accuracy", "objective", "best_index"} - set(sweep)
    if missing:
        raise ValueError(f"sweep lacks {sorted(missing)}; pass the dict returned by sweep_thresholds")
    # A bare Figure renders with Agg and never touches pyplot's global backend or figure registry, so this
    # is safe headless and in a process that has an interactive backend, and leaks no figures.
    from matplotlib.figure import Figure

    t = np.asarray(sweep["thresholds"])
    k = int(sweep["best_index"])
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    for key, label, colour in (("dice", "Dice", "C0"), ("iou", "IoU", "C1"), ("pixel_accuracy", "Pixel accuracy", "C2")):
        ax.plot(t, sweep[key], color=colour, label=label)
    weights = ", ".join(f"{w:.2f}" for w in sweep.get("weights", EQUAL_WEIGHTS))
    ax.plot(t, sweep["objective"], "k--", label=f"objective (weights {weights})")
    ax.axvline(t[k], color="0.4", linewidth=1)
    note = (f"T* = {t[k]:.2f}\nDice {sweep['dice'][k]:.4f}\nIoU {sweep['iou'][k]:.4f}\n"
            f"PA {sweep['pixel_accuracy'][k]:.4f}")
    right = t[k] > (t[0] + t[-1]) / 2  # keep the note inside the axes
    ax.annotate(note, xy=(t[k], sweep["objective"][k]), xytext=(-10 if right else 10, -60),
                textcoords="offset points", ha="right" if right else "left", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    ax.set(xlabel="threshold T", ylabel="score", title=title or "Metrics against threshold (equation 4)",
           xlim=(t[0], t[-1]), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
