"""Frame -> mask and statistics: preprocess, infer, sigmoid, threshold T*, morphology, resize, stats.

Threshold and morphology run at the model's resolution, as they were tuned; the mask is then resized to the
frame's own size with nearest neighbour. Buffers are kept per frame shape and reused (`buffers.BufferPool`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .backends.selection import Backend
from .buffers import BufferPool
from .core.manifest import Manifest
from .core.postprocess import mask_geometry, postprocess, probability_stats, sigmoid
from .core.preprocess import preprocess
from .timing import Timings


@dataclass
class Result:
    """The segmentation of one frame. The arrays are reused buffers: valid until the next frame."""

    mask: np.ndarray  # (H, W) uint8 0/1 at the frame's size
    model_mask: np.ndarray  # (h, w) uint8 0/1 at the model's resolution
    prob: np.ndarray  # (h, w) float32 probabilities at the model's resolution
    stats: dict  # postprocess.frame_stats keys: geometry at the frame's size, probabilities at the model's


class Segmenter:
    """Runs one frame through the network and the tuned post-processing.

    Args:
        manifest: gives the input size, T*, the morphology and whether the network emits logits.
        net: a backend; its `input_buffer` receives the preprocessed frame directly.
        pixel_spacing_mm: when given, areas are also reported in mm².
    """

    def __init__(self, manifest: Manifest, net: Backend, pixel_spacing_mm: float | None = None):
        self.size = tuple(manifest.input_size)
        self._net = net
        self._threshold, self._morphology = manifest.threshold, manifest.morphology
        self._logits = manifest.output_kind == "logits"
        self._pixel_spacing = pixel_spacing_mm
        self._buffers = BufferPool()

    def __call__(self, image: np.ndarray, timings: Timings) -> Result:
        with timings.stage("preprocess"):
            batch = preprocess(image, self.size, out=self._net.input_buffer)
        with timings.stage("inference"):
            output = self._net.infer(batch)
        with timings.stage("postprocess"):
            return self.postprocess(output[0, 0], image.shape[:2])

    def postprocess(self, output: np.ndarray, frame_shape: tuple[int, int]) -> Result:
        """(h, w) network output -> Result for a frame of `frame_shape` (height, width)."""
        prob = sigmoid(output, out=self._buffers.get("prob", output.shape, np.float32)) if self._logits else output
        model_mask = postprocess(prob, self._threshold, self._morphology)
        height, width = frame_shape
        mask = self._buffers.get("mask", (height, width), np.uint8)
        cv2.resize(model_mask, (width, height), dst=mask, interpolation=cv2.INTER_NEAREST)
        stats = {**mask_geometry(mask, self._pixel_spacing, _components_if_upscaled(model_mask, mask)),
                 **probability_stats(model_mask, prob)}
        return Result(mask, model_mask, prob, stats)


def _components_if_upscaled(model_mask: np.ndarray, mask: np.ndarray) -> int | None:
    """Components of `mask` counted on the (smaller) model mask it was enlarged from, or None to count them.

    Nearest-neighbour enlargement maps every model pixel to a non-empty block and adjacent pixels to touching
    blocks, so 8-connected components correspond one to one; shrinking can drop pixels, so it is not used then.
    """
    if mask.shape[0] < model_mask.shape[0] or mask.shape[1] < model_mask.shape[1]:
        return None
    return cv2.connectedComponents(model_mask, connectivity=8)[0] - 1
