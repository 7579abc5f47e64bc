"""Frame -> mask and statistics: preprocess, infer, sigmoid, threshold T*, morphology, resize, stats.

Threshold and morphology run at the model's resolution, as they were tuned; the mask is then resized to the
frame's own size with nearest neighbour. Buffers are kept per frame shape and reused (`buffers.BufferPool`).
With temporal stabilisation on (the manifest's "temporal", or the run's override), `temporal.TemporalFilter`
turns the probabilities into the mask instead, carrying them over the frames of the stream. Predictions on the
frame's black border, outside the ultrasound image (`sector.imaging_sector`), are dropped first (the probabilities
there set to 0), and the share dropped is reported (`outside_sector`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .backends.selection import Backend
from .buffers import BufferPool
from .core.manifest import Manifest
from .core.postprocess import binarize, mask_geometry, postprocess, probability_stats, sigmoid
from .core.preprocess import preprocess
from .core.temporal import MaskChange, TemporalFilter, TemporalParams
from .sector import imaging_sector
from .timing import Timings


@dataclass
class Result:
    """The segmentation of one frame. The arrays are reused buffers: valid until the next frame."""

    mask: np.ndarray  # (H, W) uint8 0/1 at the frame's size
    model_mask: np.ndarray  # (h, w) uint8 0/1 at the model's resolution
    prob: np.ndarray  # (h, w) float32 probabilities at the model's resolution
    stats: dict  # postprocess.frame_stats keys: geometry at the frame's size, probabilities at the model's, and
    # mask_change (share of the model-resolution mask changed since the previous frame), temporal_reset (whether
    # the filter started afresh on this frame; None with the filter off), outside_sector (the share of the
    # thresholded prediction that lay on the black border and was dropped)


class Segmenter:
    """Runs one frame through the network and the tuned post-processing.

    Args:
        manifest: gives the input size, T*, the morphology and whether the network emits logits.
        net: a backend; its `input_buffer` receives the preprocessed frame directly.
        pixel_spacing_mm: when given, areas are also reported in mm².
        temporal: the stabilisation's settings; None = the manifest's.
    """

    def __init__(self, manifest: Manifest, net: Backend, pixel_spacing_mm: float | None = None,
                 temporal: TemporalParams | None = None):
        self.size = tuple(manifest.input_size)
        self._net = net
        self._threshold, self._morphology = manifest.threshold, manifest.morphology
        self._logits = manifest.output_kind == "logits"
        self._pixel_spacing = pixel_spacing_mm
        self._buffers = BufferPool()
        temporal = manifest.temporal if temporal is None else temporal
        self._filter = TemporalFilter(temporal, self._threshold, self._morphology) if temporal.enabled else None
        self._mask_change = MaskChange()

    def __call__(self, image: np.ndarray, timings: Timings) -> Result:
        with timings.stage("preprocess"):
            batch = preprocess(image, self.size, out=self._net.input_buffer)
            sector = imaging_sector(batch[0, 0], out=self._buffers.get("sector", self.size, np.uint8))
        with timings.stage("inference"):
            output = self._net.infer(batch)
        with timings.stage("postprocess"):
            return self.postprocess(output[0, 0], image.shape[:2], batch[0, 0], sector)

    def postprocess(self, output: np.ndarray, frame_shape: tuple[int, int], model_input: np.ndarray,
                    sector: np.ndarray | None = None) -> Result:
        """(h, w) network output -> Result for a frame of `frame_shape` (height, width); `model_input` is the
        (h, w) image the network saw (the temporal filter follows its motion); `sector`: (h, w) 0/1, where the
        ultrasound image is (None: everywhere)."""
        prob = sigmoid(output, out=self._buffers.get("prob", output.shape, np.float32)) if self._logits else output
        outside = 0.0 if sector is None else self._drop_border(prob, sector)
        reset = None
        if self._filter is None:
            model_mask = postprocess(prob, self._threshold, self._morphology)
        else:
            prob, model_mask, reset, _ = self._filter(model_input, prob)
        height, width = frame_shape
        mask = self._buffers.get("mask", (height, width), np.uint8)
        cv2.resize(model_mask, (width, height), dst=mask, interpolation=cv2.INTER_NEAREST)
        stats = {**mask_geometry(mask, self._pixel_spacing, _components_if_upscaled(model_mask, mask)),
                 **probability_stats(model_mask, prob, sector), "mask_change": self._mask_change(model_mask),
                 "temporal_reset": reset, "outside_sector": outside}
        return Result(mask, model_mask, prob, stats)

    def _drop_border(self, prob: np.ndarray, sector: np.ndarray) -> float:
        """Set the probabilities outside the image to 0 (in place); returns the share of the thresholded prediction
        that lay there."""
        above = binarize(prob, self._threshold)
        predicted = cv2.countNonZero(above)
        inside = cv2.countNonZero(cv2.bitwise_and(above, sector, dst=above)) if predicted else 0
        prob *= sector  # 0 outside, unchanged inside (uint8 0/1 into float32)
        return 1.0 - inside / predicted if predicted else 0.0


def _components_if_upscaled(model_mask: np.ndarray, mask: np.ndarray) -> int | None:
    """Components of `mask` counted on the (smaller) model mask it was enlarged from, or None to count them.

    Nearest-neighbour enlargement maps every model pixel to a non-empty block and adjacent pixels to touching
    blocks, so 8-connected components correspond one to one; shrinking can drop pixels, so it is not used then.
    """
    if mask.shape[0] < model_mask.shape[0] or mask.shape[1] < model_mask.shape[1]:
        return None
    return cv2.connectedComponents(model_mask, connectivity=8)[0] - 1
