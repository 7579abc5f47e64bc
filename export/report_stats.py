"""Bootstrap intervals for the report: the test split's 95 % interval of mean Dice, and of a difference.

Small test sets are noisy (about 20 frames on usgra-seg), so every Dice in the report carries its percentile
bootstrap interval (Efron & Tibshirani 1993): resample the frames with replacement, take the mean, read the
2.5 and 97.5 percentiles. A difference between two models is bootstrapped paired (the same resampled frames
for both), which is what "model A beats model B on this test set" means.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0  # fixed: the report must print the same interval every time it is made from the same files


def _check(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be a non-empty 1-D array of finite numbers, got shape {values.shape}")
    return values


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(low), float(high)


def mean_ci(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-frame values (e.g. per-image Dice).

    Shape:
        values: (N,) -> (low, high).
    """
    values = _check(values, "values")
    index = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    return _interval(values[index].mean(axis=1), level)


def paired_diff_ci(a, b, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Interval of mean(a) - mean(b), the frames resampled together (a[i] and b[i] are the same frame).

    Shape:
        a, b: (N,) -> (low, high).
    """
    a, b = _check(a, "a"), _check(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values must have one entry per frame in both, got {a.shape} and {b.shape}")
    index = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    return _interval((a - b)[index].mean(axis=1), level)
