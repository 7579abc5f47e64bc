"""What the report measures itself: test Dice through ONNX Runtime as deployed, and CPU latency.

Both go through the device runtime's own ONNX Runtime backend (`OnnxRuntimeBackend`: ORT_ENABLE_ALL, batch 1,
no spin-waiting threads), so the numbers are those of `nerveseg-device` on ONNX Runtime CPU, not of a
differently configured session. Latencies of all models are taken in one interleaved run (round-robin, one
inference of each model per round): on a shared, noisy machine a slow minute then hurts every model alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from device_runtime.backends import OnnxRuntimeBackend
from device_runtime.manifest import Manifest
from device_runtime.postprocess import Morphology, sigmoid
from training.evaluate import evaluate_arrays

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


def interleaved_latency(graphs: dict[str, Path], manifest: Manifest, frame: np.ndarray, threads: int,
                        runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds of one batch-1 inference per graph, all timed in one interleaved run.

    Args:
        graphs: row name -> ONNX file.
        frame: one (H, W) float32 frame in [0, 1] (a real test frame: integer kernels' speed does not depend
            on the values, but a real frame keeps the float path honest too).
        runs: timed rounds; warmup: untimed rounds first (allocations, thread pools).
    """
    backends = {name: open_cpu(path, manifest, threads) for name, path in graphs.items()}
    batch = np.ascontiguousarray(frame[None, None], dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in backends}
    try:
        for round_index in range(warmup + runs):
            order = list(backends)
            shift = round_index % max(1, len(order))
            for name in order[shift:] + order[:shift]:  # rotate who goes first: no model always follows another
                start = time.perf_counter()
                backends[name].infer(batch)
                if round_index >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000.0)
    finally:
        for backend in backends.values():
            backend.close()
    return {name: statistics.median(values) for name, values in times.items()}
