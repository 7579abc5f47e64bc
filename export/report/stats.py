"""The report's intervals: training.evaluation.bootstrap (Efron's percentile bootstrap over test frames) at the report's
settings. 10 000 resamples instead of bootstrap's default 2 000: the report prints three decimals, and at
~20 frames the interval's ends still move in the third decimal between seeds with 2 000."""

from __future__ import annotations

from training.evaluation.bootstrap import bootstrap_ci, paired_bootstrap_ci

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0  # fixed: the report prints the same interval every time it is made from the same files


def mean_ci(values) -> tuple[float, float]:
    """95 % interval of the mean of per-frame values. Shape: (N,) -> (low, high)."""
    return bootstrap_ci(values, n=RESAMPLES, seed=SEED, level=LEVEL)


def paired_diff_ci(a, b) -> tuple[float, float]:
    """95 % interval of mean(a) - mean(b), a[i] and b[i] the same frame. Shape: (N,), (N,) -> (low, high)."""
    return paired_bootstrap_ci(a, b, n=RESAMPLES, seed=SEED, level=LEVEL)
