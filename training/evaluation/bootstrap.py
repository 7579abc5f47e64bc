"""Percentile bootstrap confidence intervals of a mean, and of a paired mean difference.

Small test splits (20 frames) give noisy Dice: every difference between two models is reported with the
interval of that difference. Per-image values are resampled with replacement (Efron's percentile
bootstrap); the paired form resamples images, keeping each image's two values together, so that the
variation shared by both models (easy and hard frames) cancels out of the difference.
"""

from __future__ import annotations

import numpy as np


def _check(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of per-image values, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return values


def _interval(values: np.ndarray, n: int, seed: int, level: float) -> tuple[float, float]:
    if n < 1:
        raise ValueError(f"n (resamples) must be at least 1, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ci(values, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """(low, high): the `level` percentile-bootstrap interval of the mean of `values` (n resamples)."""
    return _interval(_check(values, "values"), n, seed, level)


def paired_bootstrap_ci(a, b, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """(low, high): the percentile-bootstrap interval of mean(a - b), a[i] and b[i] from the same image."""
    a, b = _check(a, "a"), _check(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values need one value per image in both: got {a.size} and {b.size}")
    return _interval(a - b, n, seed, level)
