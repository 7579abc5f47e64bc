"""Probability map -> binary mask (threshold T*, then morphology) and per-frame statistics.

The threshold and morphology tuned on the validation set (`nerveseg tune`) are applied here, by both the
desktop evaluation and the device, so what was tuned is exactly what runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class Morphology:
    """Clean-up after thresholding, in this order, at the model's resolution.

    Attributes:
        open_radius: opening with an elliptical kernel of this radius removes specks (0 = off).
        close_radius: closing bridges small gaps inside a nerve (0 = off).
        min_area: connected components smaller than this many pixels are dropped (0 = off).
        fill_holes: fill background regions that do not touch the image border.
    """

    open_radius: int = 0
    close_radius: int = 0
    min_area: int = 0
    fill_holes: bool = False

    def __post_init__(self):
        for name in ("open_radius", "close_radius", "min_area"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise InputError(f"morphology {name} must be a non-negative integer, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Morphology":
        unknown = set(data) - {"open_radius", "close_radius", "min_area", "fill_holes"}
        if unknown:
            raise InputError(f"unknown morphology parameters {sorted(unknown)}")
        return cls(**data)


def _kernel(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def sigmoid(logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Numerically stable logistic function, float32; written into `out` (float32, same shape) when given.

    The two forms compute the same float32 operations in the same order, so they agree bit for bit.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if out is None:
        return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32, copy=False)
    np.multiply(logits, np.float32(0.5), out=out)
    np.tanh(out, out=out)
    out += np.float32(1.0)
    out *= np.float32(0.5)
    return out


def binarize(prob: np.ndarray, threshold: float) -> np.ndarray:
    """prob > threshold as a uint8 0/1 mask, compared in prob's own float type.

    A Python float takes the array's dtype in the comparison, a NumPy float64 scalar does not; converting
    makes T* from the sweep grid (np.float64) and T* read from JSON (float) give the same mask.
    """
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must lie in [0, 1], got {threshold}")
    return (np.asarray(prob) > threshold).astype(np.uint8)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Set to 1 every background pixel that cannot be reached from the border."""
    # a one-pixel frame of background connects the whole border, so one flood fill from a corner reaches it all
    reached = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(reached, None, (0, 0), 1)
    holes = reached[1:-1, 1:-1] == 0
    return ((mask != 0) | holes).astype(np.uint8)


def remove_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected components smaller than min_area pixels."""
    mask = (np.asarray(mask) != 0).astype(np.uint8)
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    if count <= 2:  # none or one component (the common case): its area is the mask's, no relabelling needed
        return mask if count == 1 or cv2.countNonZero(mask) >= min_area else np.zeros_like(mask)
    keep = np.bincount(labels.ravel(), minlength=count) >= min_area
    keep[0] = False  # label 0 is the background
    return keep[labels].astype(np.uint8)


def apply_morphology(mask: np.ndarray, morphology: Morphology) -> np.ndarray:
    """(H, W) 0/1 mask -> cleaned (H, W) uint8 0/1 mask."""
    out = mask.astype(np.uint8)
    if morphology.open_radius:
        out = cv2.morphologyEx(out, cv2.MORPH_OPEN, _kernel(morphology.open_radius))
    if morphology.close_radius:
        # Pad with background first: cv2's default border counts as foreground in the erosion step, so
        # closing would glue a nerve lying within close_radius of the frame edge onto the edge.
        r = morphology.close_radius
        padded = cv2.copyMakeBorder(out, r, r, r, r, cv2.BORDER_CONSTANT, value=0)
        out = np.ascontiguousarray(cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _kernel(r))[r:-r, r:-r])
    if morphology.min_area:
        out = remove_small_components(out, morphology.min_area)
    if morphology.fill_holes:
        out = fill_holes(out)
    return out


def postprocess(prob: np.ndarray, threshold: float, morphology: Morphology) -> np.ndarray:
    """(H, W) probabilities -> (H, W) uint8 0/1 mask: threshold, then morphology."""
    return apply_morphology(binarize(prob, threshold), morphology)


def postprocess_batch(prob: np.ndarray, threshold: float, morphology: Morphology) -> np.ndarray:
    """(N, H, W) probabilities -> (N, H, W) uint8 masks."""
    return np.stack([postprocess(p, threshold, morphology) for p in prob]) if len(prob) else prob.astype(np.uint8)


def binary_entropy(prob: np.ndarray) -> np.ndarray:
    """Per-pixel entropy of a Bernoulli(prob) in bits: 0 when certain, 1 at prob = 0.5.

    Computed in float32 for a float32 map (the network's output; several times faster per frame on the
    device), else in float64. The clip keeps log2 finite at 0 and 1; 1 - 1e-7 is representable in float32.
    """
    prob = np.asarray(prob)
    dtype = np.float32 if prob.dtype == np.float32 else np.float64
    p = np.clip(prob.astype(dtype, copy=False), dtype(1e-7), dtype(1 - 1e-7))
    q = dtype(1) - p
    entropy = np.log2(p)
    entropy *= p
    log_q = np.log2(q)
    log_q *= q
    entropy += log_q  # in place: a frame-sized temporary fewer per step
    return np.negative(entropy, out=entropy)


def frame_stats(mask: np.ndarray, prob: np.ndarray, pixel_spacing_mm: float | None = None) -> dict:
    """Statistics of one frame's mask.

    Args:
        mask: (H, W) 0/1 mask, at the frame's own size.
        prob: (H, W) probabilities at the same size.
        pixel_spacing_mm: size of one pixel in mm (square pixels); area_mm2 is None without it.

    Returns:
        area_px, area_mm2, centroid [x, y] (None when empty), bbox [x, y, w, h] (None when empty),
        components (8-connected), mean_prob (mean probability inside the mask, None when empty), and
        uncertainty: the mean binary entropy of the probability map in bits (0 = every pixel certain,
        1 = every pixel at 0.5), a frame-level confidence score.
    """
    if mask.shape != prob.shape:
        raise ValueError(f"mask shape {mask.shape} differs from probability shape {prob.shape}")
    return {**mask_geometry(mask, pixel_spacing_mm), **probability_stats(mask, prob)}


def mask_geometry(mask: np.ndarray, pixel_spacing_mm: float | None = None, components: int | None = None) -> dict:
    """The geometric half of `frame_stats`: area_px, area_mm2, centroid, bbox, components of a (H, W) mask.

    `components` may be given when the caller knows it (see `pipeline.Segmenter`); otherwise it is counted.

    OpenCV's counting, row/column sums and bounding box give the same numbers as numpy's nonzero-based ones
    (integer sums, exact in float64) without listing every foreground pixel: on a large frame that is most of
    the cost.
    """
    fg = mask.view(np.uint8) if mask.dtype == np.bool_ else mask
    if fg.dtype != np.uint8:
        fg = (fg != 0).astype(np.uint8)
    area = int(cv2.countNonZero(fg))
    if components is None:
        components = cv2.connectedComponents(fg, connectivity=8)[0] - 1
    stats = {
        "area_px": area,
        "area_mm2": None if pixel_spacing_mm is None else area * float(pixel_spacing_mm) ** 2,
        "centroid": None,
        "bbox": None,
        "components": int(components),
    }
    if area:
        # column and row counts of the foreground: the centroid is their first moment (exact integer sums)
        unit = np.minimum(fg, 1)
        cols = cv2.reduce(unit, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
        rows = cv2.reduce(unit, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
        stats["centroid"] = [float(cols @ np.arange(cols.size)) / area, float(rows @ np.arange(rows.size)) / area]
        stats["bbox"] = [int(v) for v in cv2.boundingRect(fg)]
    return stats


def probability_stats(mask: np.ndarray, prob: np.ndarray, region: np.ndarray | None = None) -> dict:
    """The probabilistic half of `frame_stats`: mean_prob inside the (H, W) mask (None when empty), uncertainty
    (over `region`, a (H, W) uint8 0/1 mask, when given: the ultrasound image without its black border, whose
    certain zeros would otherwise make any frame look confident).

    The device computes these at the model's resolution, where the probabilities live (at the frame's size
    they would only be interpolated), and the geometry at the frame's size.
    """
    if mask.shape != prob.shape:
        raise ValueError(f"mask shape {mask.shape} differs from probability shape {prob.shape}")
    prob = np.asarray(prob)
    if mask.dtype == np.uint8 and prob.dtype in (np.float32, np.float64):
        # OpenCV averages under a mask without copying the selected pixels out (and sums in float64)
        mean_prob = cv2.mean(prob, mask=mask)[0] if cv2.countNonZero(mask) else None
    else:
        fg = mask.astype(bool)
        mean_prob = float(prob[fg].mean()) if fg.any() else None
    entropy = binary_entropy(prob)
    if region is not None and cv2.countNonZero(region):
        uncertainty = cv2.mean(entropy, mask=region)[0]
    else:
        uncertainty = float(entropy.mean(dtype=np.float64))
    return {"mean_prob": mean_prob, "uncertainty": float(uncertainty)}
