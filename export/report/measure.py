"""What the report measures itself: test Dice through ONNX Runtime as deployed (latency: export.bundle.latency).

Frames go through the device runtime's own ONNX Runtime backend (`OnnxRuntimeBackend`: ORT_ENABLE_ALL, batch 1,
no spin-waiting threads), so the numbers are those of `nerveseg-device` on ONNX Runtime CPU, not of a
differently configured session, and each frame's Dice is kept for the bootstrap intervals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_runtime.core.manifest import Manifest
from device_runtime.core.ort_session import OnnxRuntimeBackend
from device_runtime.core.postprocess import Morphology, sigmoid
from training.evaluation.evaluate import evaluate_arrays

CPU = [("CPUExecutionProvider", {})]


def open_cpu(onnx_path: Path, manifest: Manifest, threads: int) -> OnnxRuntimeBackend:
    """A batch-1 ONNX Runtime CPU session over any graph with the bundle's input and output names."""
    return OnnxRuntimeBackend(Path(onnx_path), manifest, "ort-cpu", CPU, threads)


def onnx_test_scores(onnx_path: Path, manifest: Manifest, images: np.ndarray, masks: np.ndarray,
                     threshold: float, morphology: dict, threads: int) -> tuple[dict, np.ndarray]:
    """Test metrics of one graph as the device computes them: frame by frame, sigmoid, T*, morphology.

    Returns:
        (metrics, per_image_dice): `evaluate_arrays`' summary and the (N,) per-frame Dice.
    """
    backend = open_cpu(onnx_path, manifest, threads)
    prob = np.empty(images.shape, np.float32)
    try:
        for i, image in enumerate(images):
            prob[i] = sigmoid(backend.infer(image[None, None])[0, 0])
    finally:
        backend.close()
    metrics, per_image, _ = evaluate_arrays(prob, masks, threshold, Morphology.from_dict(morphology))
    return metrics, per_image
