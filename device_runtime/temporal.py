"""Temporal stabilisation of a video's masks: a flow-warped running average of the probabilities, with hysteresis.

The network sees each frame alone, so on a live stream a nerve near the threshold appears and vanishes from
frame to frame and its edge jitters with the speckle. Per frame, at the model's resolution (where T* was tuned):

1. change: the normalised correlation of this image and the previous one, both shrunk to 32x32 by area
   averaging (speckle averages out, probe motion of a few pixels hardly matters) with each row's mean removed
   (every ultrasound frame shares the bright skin line and the depth attenuation). Below `reset_below` the
   scene changed (another patient, a preset change): the history is dropped.
2. flow: DIS optical flow (Kroeger et al., "Fast Optical Flow using Dense Inverse Search", ECCV 2016; OpenCV's
   ULTRAFAST preset) from this image back to the previous one; the running average and the previous mask are
   warped along it to the current frame. A pixel whose source lies outside the previous frame has no history
   and takes the current probability.
3. S = alpha * p + (1 - alpha) * warped S: the flow-warped moving average of MCMA (arXiv 2403.03120).
4. hysteresis: a pixel joins the mask when S > t_high and stays in it while S > t_low; then the tuned morphology.

After a reset (the first frame, a new frame size, a cut) the frame is segmented alone: S = p, mask = p > T*
then morphology, exactly what the runtime gives without the filter. With alpha = 1 and t_low = t_high = T*
the filter changes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import cv2
import numpy as np

from .errors import InputError
from .postprocess import Morphology, apply_morphology, postprocess
from .sequence_metrics import mask_change

COARSE = 32  # side of the shrunk images the change is measured on
# DIS reads outside its buffers (a segfault now and then) on images whose pyramid is shallower than its preset's
# finest scale (opencv_contrib#1507; OpenCV's own fix only reselects the scales): the ULTRAFAST preset (8-pixel
# patches, finest scale 2) needs a longer side of at least 91 pixels and a shorter one of at least 32. Smaller
# model inputs are enlarged by a whole factor for the flow, which is then shrunk back.
FLOW_MIN_LONG, FLOW_MIN_SHORT = 96, 32


@dataclass(frozen=True)
class TemporalParams:
    """The filter's settings, stored in the bundle's manifest ("temporal") and tuned by `nerveseg tune-temporal`.

    Attributes:
        enabled: apply the filter (else every frame is segmented alone).
        alpha: weight of the new frame in the running average, in (0, 1]; 1 = no averaging.
        t_high: a pixel joins the mask above this; None = the bundle's T*.
        t_low: a pixel in the mask leaves it below this; None = T*.
        reset_below: drop the history when the coarse correlation of consecutive frames is below this, in [-1, 1].
    """

    enabled: bool = False
    alpha: float = 0.5
    t_high: float | None = None
    t_low: float | None = None
    reset_below: float = 0.5

    def __post_init__(self):
        if not isinstance(self.enabled, (bool, np.bool_)):
            raise InputError(f"temporal enabled must be true or false, got {self.enabled!r}")
        _check_number("alpha", self.alpha, 0.0, 1.0, low_open=True)
        _check_number("reset_below", self.reset_below, -1.0, 1.0)
        for name in ("t_high", "t_low"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), 0.0, 1.0)
        if self.t_high is not None and self.t_low is not None and self.t_low > self.t_high:
            raise InputError(f"temporal t_low ({self.t_low}) must not exceed t_high ({self.t_high})")

    def thresholds(self, threshold: float) -> tuple[float, float]:
        """(t_low, t_high) for a bundle of T* = `threshold`; refused unless t_low <= T* <= t_high, because a
        reset frame is cut at T* and must not hold more (or less) than the filter would keep."""
        low = threshold if self.t_low is None else self.t_low
        high = threshold if self.t_high is None else self.t_high
        if not low <= threshold <= high:
            raise InputError(f"temporal thresholds must enclose T* = {threshold}: got t_low {low}, t_high {high}")
        return float(low), float(high)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "TemporalParams":
        """From a manifest's "temporal" object; missing fields take their defaults (older bundles have none)."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InputError(f"temporal must be an object of settings, got {data!r}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown temporal parameters {sorted(unknown)}")
        return cls(**data)

    def with_overrides(self, **overrides) -> "TemporalParams":
        """These settings with the given ones replaced; None values (a flag not given) leave a setting alone."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _check_number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or not (low < value if low_open else low <= value) or not value <= high or not np.isfinite(value):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InputError(f"temporal {name} must be a number in {interval}, got {value!r}")


class Motion(NamedTuple):
    """How the current frame relates to the previous one.

    similarity: coarse correlation in [-1, 1] (None on the first frame or a new size: nothing to compare).
    map: (h, w, 2) float32 source coordinates in the previous frame for each current pixel (cv2.remap's map),
        or None when there is no flow (first frame, new size, or a similarity below the reset level).
    """

    similarity: float | None
    map: np.ndarray | None


class MotionEstimator:
    """Similarity and backward flow between consecutive model-resolution images (float32 in [0, 1])."""

    def __init__(self):
        self._shape = None

    def _allocate(self, shape: tuple[int, int]) -> None:
        height, width = shape
        self._shape = shape
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
        self._enlarge = max(1, -(-FLOW_MIN_LONG // max(shape)), -(-FLOW_MIN_SHORT // min(shape)))
        if self._enlarge > 1:
            self._large = [np.empty((height * self._enlarge, width * self._enlarge), np.uint8) for _ in range(2)]
        self._grey = [np.empty(shape, np.uint8), np.empty(shape, np.uint8)]  # current, previous (swapped)
        self._coarse = [None, None]
        self._flow = np.empty((height, width, 2), np.float32)
        self._map = np.empty((height, width, 2), np.float32)
        xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        self._grid = np.dstack([xs, ys])

    def __call__(self, image: np.ndarray, reset_below: float = -np.inf) -> Motion:
        """Compare `image` with the previous call's; the flow only when the similarity reaches `reset_below`."""
        first = image.shape != self._shape
        if first:
            self._allocate(image.shape)
        self._grey.reverse()
        current = self._grey[0]
        cv2.convertScaleAbs(image, dst=current, alpha=255.0)  # DIS works on 8-bit images
        self._coarse.reverse()
        self._coarse[0] = _coarse_profile(current)
        if first:
            return Motion(None, None)
        similarity = _correlation(self._coarse[0], self._coarse[1])
        if similarity < reset_below:
            return Motion(similarity, None)
        # calc(I0, I1): I0(x) ~ I1(x + flow(x)), so each current pixel learns where it was in the previous frame
        if self._enlarge == 1:
            self._dis.calc(current, self._grey[1], self._flow)
        else:
            k = self._enlarge
            for small, large in zip(self._grey, self._large):
                cv2.resize(small, large.shape[::-1], dst=large, interpolation=cv2.INTER_LINEAR)
            flow = self._dis.calc(self._large[0], self._large[1], None)
            cv2.resize(flow, self._shape[::-1], dst=self._flow, interpolation=cv2.INTER_AREA)
            self._flow *= np.float32(1 / k)
        cv2.add(self._flow, self._grid, dst=self._map)
        return Motion(similarity, self._map)


def _coarse_profile(grey: np.ndarray) -> np.ndarray:
    """32x32 area average, each row's mean removed: what a cut changes and speckle or a small shift do not."""
    small = cv2.resize(grey, (COARSE, COARSE), interpolation=cv2.INTER_AREA).astype(np.float32)
    return small - small.mean(axis=1, keepdims=True)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised correlation of two zero-mean-row images; two flat images count as alike, one flat as unlike."""
    norm = float(np.sqrt(np.vdot(a, a) * np.vdot(b, b)))
    if norm < 1e-6:
        flat_a, flat_b = np.vdot(a, a) < 1e-6, np.vdot(b, b) < 1e-6
        return 1.0 if flat_a and flat_b else 0.0
    return float(np.vdot(a, b)) / norm


class Step(NamedTuple):
    """The filter's output for one frame (arrays are reused buffers: valid until the next frame)."""

    prob: np.ndarray  # (h, w) float32 stabilised probabilities
    mask: np.ndarray  # (h, w) uint8 0/1: hysteresis, then morphology
    reset: bool  # the frame was segmented alone (first frame, new size, or a cut)
    similarity: float | None


class TemporalFilter:
    """Stateful: feed it the frames of one stream in order.

    Args:
        params: the settings (whether enabled is not looked at here: the caller decides to use the filter).
        threshold: the bundle's T*; morphology: its tuned clean-up.
    """

    def __init__(self, params: TemporalParams, threshold: float, morphology: Morphology):
        self.params, self.threshold, self.morphology = params, float(threshold), morphology
        self.t_low, self.t_high = params.thresholds(self.threshold)
        self.motion = MotionEstimator()
        self._shape = None

    def __call__(self, image: np.ndarray, prob: np.ndarray) -> Step:
        """image: (h, w) float32 model input in [0, 1]; prob: (h, w) float32 network probabilities."""
        if image.shape != prob.shape:
            raise ValueError(f"image shape {image.shape} differs from probability shape {prob.shape}")
        return self.apply(prob, self.motion(image, self.params.reset_below))

    def apply(self, prob: np.ndarray, motion: Motion) -> Step:
        """The filter with the motion given (the tuner computes it once per frame for many settings)."""
        reset = motion.map is None or motion.similarity is None or motion.similarity < self.params.reset_below
        if prob.shape != self._shape:
            self._allocate(prob.shape)
            reset = True
        state, mask = self._state, self._mask  # state channels: running average S, ones, previous mask
        if reset:
            np.copyto(self._prob, prob)
            np.copyto(mask, postprocess(prob, self.threshold, self.morphology))
        else:
            warped = cv2.remap(state, motion.map, None, cv2.INTER_LINEAR, dst=self._warped,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            history, inside, kept = cv2.split(warped)
            # S = alpha p + (1 - alpha) (warped S + (1 - inside) p): where the source fell outside the previous
            # frame (inside < 1) the missing share of history is the current probability
            alpha = np.float32(self.params.alpha)
            np.multiply(inside, np.float32(-(1 - alpha)), out=inside)
            inside += np.float32(1)  # now alpha + (1 - alpha)(1 - inside): the weight of p
            np.multiply(prob, inside, out=self._prob)
            history *= np.float32(1 - alpha)
            self._prob += history
            joined = self._prob > self.t_high
            joined |= (self._prob > self.t_low) & (kept > 0.5)
            np.copyto(mask, apply_morphology(joined.view(np.uint8), self.morphology))
        cv2.merge([self._prob, self._ones, mask.astype(np.float32)], dst=state)
        return Step(self._prob, mask, reset, motion.similarity)

    def _allocate(self, shape: tuple[int, int]) -> None:
        self._shape = shape
        self._prob = np.empty(shape, np.float32)
        self._mask = np.empty(shape, np.uint8)
        self._ones = np.ones(shape, np.float32)
        self._state = np.empty((*shape, 3), np.float32)
        self._warped = np.empty((*shape, 3), np.float32)


class MaskChange:
    """The share of the mask that changed since the previous frame (`sequence_metrics.mask_change`), for the
    per-frame JSON line: what a user watches to see the flicker, with the filter or without. None on the first
    frame and after a change of size."""

    def __init__(self):
        self._previous = None

    def __call__(self, mask: np.ndarray) -> float | None:
        if self._previous is None or self._previous.shape != mask.shape:
            self._previous = mask.copy()  # a copy: the caller's buffer is overwritten by the next frame
            return None
        change = mask_change(self._previous, mask)
        np.copyto(self._previous, mask)
        return round(change, 6)
