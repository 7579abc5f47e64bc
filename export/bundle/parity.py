"""Does the exported graph compute what the PyTorch model computes? Checked on real frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from device_runtime.core import metrics
from device_runtime.core.manifest import INPUT_NAME
from device_runtime.core.postprocess import Morphology, postprocess_batch, sigmoid

# Largest probability difference allowed between ONNX Runtime and PyTorch, per precision, and the least
# mean Dice between the two sets of masks after threshold and morphology.
# INT8: ONNX Runtime's fused integer kernels do not reproduce the QDQ reference bit for bit (it requantizes
# inside QLinearConv), so only the final masks are held to a bound; the largest difference is reported.
TOLERANCE = {"fp32": {"max_prob_diff": 1e-4, "mask_dice": 0.999}, "int8": {"mask_dice": 0.995}}
OPTIMIZATION_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # what the device runtime runs
                       "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}  # the QDQ reference: every op as written


def onnx_probabilities(onnx_path: str | Path, images: np.ndarray, batch_size: int = 8, optimization: str = "all") -> np.ndarray:
    """(N, H, W) float32 frames in [0, 1] -> (N, H, W) probabilities from ONNX Runtime on the CPU, at the
    graph optimisation level named (`OPTIMIZATION_LEVELS`; "all" is ONNX Runtime's default and the device's)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    out = np.empty(images.shape, np.float32)
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start:start + batch_size, None], dtype=np.float32)
        out[start:start + len(batch)] = sigmoid(session.run(None, {INPUT_NAME: batch})[0][:, 0])
    return out


def compare(reference_prob: np.ndarray, onnx_prob: np.ndarray, threshold: float, morphology: Morphology) -> dict:
    """Largest and mean probability difference, and the mean Dice between the two sets of final masks."""
    reference_masks = postprocess_batch(reference_prob, threshold, morphology)
    onnx_masks = postprocess_batch(onnx_prob, threshold, morphology)
    difference = np.abs(reference_prob.astype(np.float64) - onnx_prob)
    return {
        "frames": int(len(reference_prob)),
        "max_prob_diff": float(difference.max()),
        "mean_prob_diff": float(difference.mean()),
        "mask_dice": float(metrics.dice(metrics.confusion_counts(onnx_masks, reference_masks))),
        "flipped_fraction": float(np.mean(reference_masks != onnx_masks)),  # pixels whose final label differs
    }


def parity_failures(result: dict, precision: str, min_mask_dice: float | None = None,
                    bound_source: str = "") -> list[str]:
    """What `result` misses of the precision's tolerance (`min_mask_dice` in place of its mask bound where given;
    `bound_source` says in the message where that bound came from, when the user did not type it)."""
    limits = dict(TOLERANCE[precision], **({} if min_mask_dice is None else {"mask_dice": min_mask_dice}))
    failures = []
    if "max_prob_diff" in limits and result["max_prob_diff"] > limits["max_prob_diff"]:
        failures.append(f"largest probability difference {result['max_prob_diff']:.2e} > {limits['max_prob_diff']:.0e}")
    if result["mask_dice"] < limits["mask_dice"]:
        value, limit = distinct_digits(result["mask_dice"], limits["mask_dice"])
        failures.append(f"mask Dice agreement {value} < {limit}" + (f" ({bound_source})" if bound_source else ""))
    return failures


def distinct_digits(value: float, limit: float) -> tuple[str, str]:
    """Both numbers with 4 decimals, or as many more (up to 9) as it takes for the printed pair to differ: a bound
    taken from the model's own agreement is a long float (0.99493...), and "0.9949 < 0.9949" explains nothing."""
    for decimals in range(4, 10):
        shown = f"{value:.{decimals}f}", f"{limit:.{decimals}f}"
        if shown[0] != shown[1]:
            break
    return shown
