"""Interval math against values computed another way: t-tables by hand, exact bootstrap enumeration."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from poft.demo.intervals import (
    Interval,
    paired_bootstrap_interval,
    paired_t_interval,
    seeds_for_half_width,
    verdict,
    within,
)

# two-sided 95% Student-t quantiles from a printed table
T_975 = {2: 4.303, 4: 2.776, 9: 2.262}


def test_paired_t_interval_by_hand():
    a, b = [0.30, 0.34, 0.28], [0.25, 0.27, 0.30]
    d = [0.05, 0.07, -0.02]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = T_975[2] * sd / math.sqrt(3)
    interval = paired_t_interval(a, b)
    assert interval.estimate == pytest.approx(mean)
    assert interval.low == pytest.approx(mean - half, abs=1e-4) and interval.high == pytest.approx(
        mean + half, abs=1e-4
    )


@pytest.mark.parametrize("n", [5, 10])
def test_paired_t_interval_uses_n_minus_one_degrees_of_freedom(n):
    a = [float(i % 3) for i in range(n)]
    b = [0.0] * n
    interval = paired_t_interval(a, b)
    half = T_975[n - 1] * statistics.stdev(a) / math.sqrt(n)
    assert interval.high - interval.estimate == pytest.approx(half, rel=1e-3)


def test_paired_t_interval_needs_two_pairs_and_equal_lengths():
    assert paired_t_interval([1.0], [0.0]) is None
    with pytest.raises(ValueError, match="equal lengths"):
        paired_t_interval([1.0, 2.0], [0.0])


def exact_bootstrap_quantiles(differences, confidence):
    """Every one of the n^n equally likely resamples, enumerated: the exact percentile interval."""
    means = sorted(sum(s) / len(s) for s in itertools.product(differences, repeat=len(differences)))
    tail = (1 - confidence) / 2
    cdf = np.arange(1, len(means) + 1) / len(means)
    return means[int(np.searchsorted(cdf, tail))], means[int(np.searchsorted(cdf, 1 - tail))]


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_bootstrap_on_a_tiny_sample_matches_exact_enumeration(confidence):
    a, b = [1, 0, 1, 1], [0, 0, 1, 0]
    interval = paired_bootstrap_interval(a, b, confidence=confidence, resamples=20000, seed=0)
    low, high = exact_bootstrap_quantiles([1, 0, 0, 1], confidence)
    assert (interval.low, interval.high) == pytest.approx((low, high))
    assert interval.estimate == pytest.approx(0.5)


def test_bootstrap_is_reproducible_and_pairs_items_across_seeds():
    a = [[1, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    b = [[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]]
    first = paired_bootstrap_interval(a, b, seed=3)
    assert first == paired_bootstrap_interval(a, b, seed=3)
    per_item = [(1 + 0) / 2, (0 + 1) / 2, (0 + 1) / 2, 0.0, 0.0]  # each prompt's mean difference over seeds
    assert first == paired_bootstrap_interval(per_item, [0.0] * 5, seed=3)
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap_interval([1, 0], [1, 0, 1])


def test_identical_methods_have_a_zero_width_interval():
    interval = paired_bootstrap_interval([1, 0, 1], [1, 0, 1])
    assert interval == Interval(0.0, 0.0, 0.0)


def test_verdict_needs_every_interval_to_exclude_zero():
    ahead, across = Interval(0.03, 0.01, 0.05), Interval(0.01, -0.01, 0.03)
    assert verdict([ahead]) == "PoFT better"
    assert verdict([Interval(-0.03, -0.05, -0.01)]) == "PoFT worse"
    assert verdict([ahead, across]) == "no measurable difference"
    assert verdict([None, ahead]) == "PoFT better"
    assert verdict([None]) == "no measurable difference"


def test_within_a_margin():
    assert within(Interval(0.0, -0.005, 0.008), 0.01) == "yes"
    assert within(Interval(-0.03, -0.05, -0.02), 0.01) == "no"
    assert within(Interval(0.0, -0.02, 0.005), 0.01) == "undecided"
    assert within(None, 0.01) == "undecided"


def test_seeds_for_half_width_is_the_smallest_sufficient_count():
    differences = [0.04, -0.02, 0.07, 0.01, -0.03]
    n = seeds_for_half_width(differences, 0.02)
    sd = statistics.stdev(differences)
    from scipy import stats

    def half(k):
        return stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)

    assert half(n) <= 0.02 < half(n - 1)
    assert seeds_for_half_width([0.1], 0.02) is None
