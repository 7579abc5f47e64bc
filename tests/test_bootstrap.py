import numpy as np
import pytest

from training.evaluation.bootstrap import bootstrap_ci, paired_bootstrap_ci


def test_interval_of_a_normal_mean_matches_the_textbook_one():
    values = np.random.default_rng(1).normal(0.7, 0.1, size=400)
    low, high = bootstrap_ci(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert low < values.mean() < high
    assert abs((high - low) / 2 - half) < 0.1 * half
    assert abs((low + high) / 2 - values.mean()) < 0.2 * half


def test_constant_values_give_a_point_and_level_widens():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    values = np.random.default_rng(2).random(30)
    narrow, wide = bootstrap_ci(values, level=0.5), bootstrap_ci(values, level=0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)


def test_paired_interval_removes_shared_variation():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.95, size=20)  # easy and hard frames
    a = base + 0.01 + rng.normal(0, 0.002, size=20)
    low, high = paired_bootstrap_ci(a, base)
    assert low > 0 and high < 0.02 and low < 0.01 < high
    # unpaired, the same difference would be lost in the spread of the frames
    ua, ub = bootstrap_ci(a), bootstrap_ci(base)
    assert ua[0] < ub[1]
    assert paired_bootstrap_ci(base + 0.1, base) == pytest.approx((0.1, 0.1))


@pytest.mark.parametrize("a,b", [([], []), ([1.0, 2.0], [1.0]), ([np.nan], [1.0])])
def test_bad_input(a, b):
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a, b)
