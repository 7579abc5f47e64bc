"""Temporal stabilisation of a video's masks: a flow-warped running average of the probabilities, with hysteresis.

The network sees each frame alone, so on a live stream a nerve near the threshold appears and vanishes from
frame to frame and its edge jitters with the speckle. Per frame, at the model's resolution (where T* was tuned):

1. flow: DIS optical flow (Kroeger et al., "Fast Optical Flow using Dense Inverse Search", ECCV 2016; OpenCV's
   ULTRAFAST preset) from this image back to the previous one; the running average, the previous mask and the
   previous image are warped along it to the current frame. A pixel whose source lies outside the previous
   frame has no history and takes the current probability.
2. change: the normalised correlation of this image and the previous one moved along the flow, both shrunk
   to 32x32 by area averaging (speckle averages out) with each row's mean removed (every ultrasound frame
   shares the bright skin line and the depth attenuation). The flow aligns a moving probe's frames; it cannot
   align another scene (another patient, a preset change), so below `reset_below` the history is dropped.
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
HALVE_FROM = 192  # the flow of larger inputs is measured on the halved image
FLOW_MIN_SIDE = 16  # DIS refuses images under 12 pixels: smaller inputs are enlarged by a whole factor for it


@dataclass(frozen=True)
class TemporalParams:
    """The filter's settings, stored in the bundle's manifest ("temporal") and tuned by `nerveseg tune-temporal`.

    Attributes:
        enabled: apply the filter (else every frame is segmented alone).
        alpha: weight of the new frame in the running average, in (0, 1]; 1 = no averaging.
        t_high: a pixel joins the mask above this; None = the bundle's T*.
        t_low: a pixel in the mask leaves it below this; None = T*.
        reset_below: drop the history when the coarse correlation of the frame and the previous one moved along
            the flow is below this, in [-1, 1].
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
        low, high = self._resolved(threshold)
        if not low <= threshold <= high:
            raise InputError(f"temporal thresholds must enclose T* = {threshold}: got t_low {low}, t_high {high}")
        return float(low), float(high)

    def _resolved(self, threshold: float) -> tuple[float, float]:
        return (threshold if self.t_low is None else self.t_low), (threshold if self.t_high is None else self.t_high)

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

    def describe(self, threshold: float) -> str:
        """One line for people: on or off, and the settings as they apply to a bundle of T* = `threshold`."""
        low, high = self._resolved(threshold)
        return (f"{'on' if self.enabled else 'off'}: alpha {self.alpha}, t_high {high}, t_low {low}, reset below "
                f"{self.reset_below}")

    def with_overrides(self, **overrides) -> "TemporalParams":
        """These settings with the given ones replaced; None values (a flag not given) leave a setting alone."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _check_number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or not (low < value if low_open else low <= value) or not value <= high or not np.isfinite(value):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InputError(f"temporal {name} must be a number in {interval}, got {value!r}")


class MotionEstimator:
    """Backward flow between consecutive model-resolution images (float32 in [0, 1]), as a cv2.remap map.

    Inputs from HALVE_FROM pixels on are halved for the flow (at 320x320 its grid is then 8 input pixels wide,
    enough for a probe's smooth motion, in a quarter of DIS's time at full size; `scripts/temporal_eval.py flow`
    measures its error against the phantom's true motion).

    A flow buffer handed to DIS's calc() is read as the initial flow (OpenCV 5 has no switch for it): an
    uninitialised one sent the patch search outside the image, a segfault now and then. So the buffer is zeroed
    before each call (a zero start gives exactly the flow of no start).
    """

    def __init__(self):
        self._shape = None

    def _allocate(self, shape: tuple[int, int]) -> None:
        height, width = shape
        self._shape = shape
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
        if max(shape) >= HALVE_FROM and min(shape) >= 2 * FLOW_MIN_SIDE:
            self._scale = 0.5
        else:
            self._scale = float(max(1, -(-FLOW_MIN_SIDE // min(shape))))
        work = (int(round(width * self._scale)), int(round(height * self._scale)))  # (width, height)
        self._grey = [np.empty(shape, np.uint8) for _ in range(2)]  # current, previous (swapped each frame)
        self._work = self._grey if self._scale == 1 else [np.empty(work[::-1], np.uint8) for _ in range(2)]
        self._work_flow = np.empty((*work[::-1], 2), np.float32)
        self._flow = np.empty((height, width, 2), np.float32)
        self._map = np.empty((height, width, 2), np.float32)
        xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        self._grid = np.dstack([xs, ys])

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """(h, w, 2) float32: for each pixel of `image`, its source coordinates (x, y) in the previous call's
        image; None on the first call and after a change of size. A buffer: valid until the next call."""
        first = image.shape != self._shape
        if first:
            self._allocate(image.shape)
        self._grey.reverse()
        cv2.convertScaleAbs(image, dst=self._grey[0], alpha=255.0)  # DIS works on 8-bit images
        if self._work is not self._grey:
            self._work.reverse()
            cv2.resize(self._grey[0], self._work[0].shape[::-1], dst=self._work[0],
                       interpolation=cv2.INTER_AREA if self._scale < 1 else cv2.INTER_LINEAR)
        if first:
            return None
        # calc(I0, I1): I0(x) ~ I1(x + flow(x)), so each current pixel learns where it was in the previous frame
        self._work_flow.fill(0)
        self._dis.calc(self._work[0], self._work[1], self._work_flow)
        flow = self._work_flow
        if self._scale != 1:
            flow = cv2.resize(flow, self._shape[::-1], dst=self._flow,
                              interpolation=cv2.INTER_LINEAR if self._scale < 1 else cv2.INTER_AREA)
        return cv2.scaleAdd(flow, 1 / self._scale, self._grid, dst=self._map)  # displacement -> coordinates


def _coarse_profile(image: np.ndarray) -> np.ndarray:
    """32x32 area average, each row's mean removed: what a cut changes and speckle does not."""
    small = cv2.resize(image, (COARSE, COARSE), interpolation=cv2.INTER_AREA).astype(np.float32)
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
    similarity: float | None  # coarse correlation with the previous image moved along the flow (None: none)


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
        return self.apply(image, prob, self.motion(image))

    def apply(self, image: np.ndarray, prob: np.ndarray, flow_map: np.ndarray | None) -> Step:
        """The filter with the flow given (`MotionEstimator`'s map; the tuner measures it once for all settings)."""
        if prob.shape != self._shape:
            self._allocate(prob.shape)
            flow_map = None
        similarity = None
        if flow_map is not None:
            # one remap moves the whole state (running average S, ones, mask, image) to the current frame; the
            # ones become the share of each pixel that had a source in the previous frame
            cv2.remap(self._state, flow_map, None, cv2.INTER_LINEAR, dst=self._warped,
                      borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            history, inside, kept, before = cv2.split(self._warped, self._moved)
            missing = np.subtract(np.float32(1), inside, out=inside)  # share of each pixel with no source
            # the previous image moved onto this one (the current image where nothing came from): still unlike
            # it after the move, the scene has changed
            before += np.multiply(missing, image, out=self._scratch)
            similarity = _correlation(_coarse_profile(before), _coarse_profile(image))
        if similarity is None or similarity < self.params.reset_below:
            np.copyto(self._prob, prob)
            np.copyto(self._mask, postprocess(prob, self.threshold, self.morphology))
        else:
            # S = alpha p + (1 - alpha) (warped S + missing p): where the source fell outside the previous frame
            # the missing share of history is the current probability
            alpha = np.float32(self.params.alpha)
            missing *= np.float32(1 - alpha)
            missing += alpha  # the weight of p
            np.multiply(prob, missing, out=self._prob)  # self._prob is the state's plane S: written in place
            history *= np.float32(1 - alpha)
            self._prob += history
            joined = self._prob > self.t_high
            joined |= (self._prob > self.t_low) & (kept > 0.5)
            np.copyto(self._mask, apply_morphology(joined.view(np.uint8), self.morphology))
        np.copyto(self._planes[2], self._mask)
        np.copyto(self._planes[3], image)
        cv2.merge(self._planes, dst=self._state)
        return Step(self._prob, self._mask, similarity is None or similarity < self.params.reset_below, similarity)

    def _allocate(self, shape: tuple[int, int]) -> None:
        """Every buffer once per frame size (OpenCV's split into new arrays alone costs 1.7 ms at 320x320)."""
        self._shape = shape
        self._planes = [np.empty(shape, np.float32), np.ones(shape, np.float32), np.empty(shape, np.float32),
                        np.empty(shape, np.float32)]  # S, ones, mask, image: merged into the state
        self._prob = self._planes[0]
        self._mask = np.empty(shape, np.uint8)
        self._state = np.empty((*shape, 4), np.float32)
        self._warped = np.empty((*shape, 4), np.float32)
        self._moved = [np.empty(shape, np.float32) for _ in range(4)]
        self._scratch = np.empty(shape, np.float32)


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
