"""Confidence intervals for paired comparisons of two training methods, as pure functions.

Two sources of chance separate a measured difference from the true one: the seed (noise draw, data
order, initialisation of the run) and the finite set of held-out prompts. `paired_t_interval` covers
the first (the same seed trains both methods on the same data, so differences are paired);
`paired_bootstrap_interval` the second (both methods answer the same prompts, which are resampled
together). `verdict` calls a difference measurable only when every interval excludes zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from poft.optional import require

stats = require("scipy.stats", "report", "The demo's confidence intervals")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided confidence interval."""

    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def paired_t_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval | None:
    """Student-t interval of mean(a - b) over pairs (a[i], b[i]); None with fewer than two pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(differences.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, df=len(differences) - 1)) * _standard_error(differences)
    return Interval(mean, mean - half, mean + half)


def paired_bootstrap_interval(
    a: Sequence[Sequence[float]] | Sequence[float],
    b: Sequence[Sequence[float]] | Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of mean(a - b), resampling items (held-out prompts) with replacement.

    `a` and `b` are per-item scores (e.g. 1 for a correct answer), or one such list per seed: the items are
    then resampled together across seeds and each item's difference is its mean over seeds.
    """
    first, second = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if first.shape != second.shape or first.size == 0:
        raise ValueError(f"paired samples need equal, non-empty shapes, got {first.shape} and {second.shape}")
    differences = (first - second).reshape(-1, first.shape[-1]).mean(axis=0)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], method="inverted_cdf")
    return Interval(float(differences.mean()), float(low), float(high))


def seeds_for_half_width(differences: Sequence[float], half_width: float, confidence: float = 0.95) -> int | None:
    """Seeds needed for a paired t-interval no wider than +-half_width, if the spread stays as measured."""
    if len(differences) < 2:
        return None
    sd = float(np.std(np.asarray(differences, dtype=float), ddof=1))
    n = 2
    while float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


def verdict(intervals: Sequence[Interval | None], better: str = "PoFT better", worse: str = "PoFT worse") -> str:
    """`better` or `worse` only when every interval excludes zero on that side, else "no measurable difference"."""
    given = [i for i in intervals if i is not None]
    if given and all(i.low > 0 for i in given):
        return better
    if given and all(i.high < 0 for i in given):
        return worse
    return "no measurable difference"


def _standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) / math.sqrt(len(values))


def within(interval: Interval | None, margin: float) -> str:
    """Whether a difference is within +-margin: "yes" (interval inside), "no" (interval outside), else "undecided"."""
    if interval is None:
        return "undecided"
    if -margin <= interval.low and interval.high <= margin:
        return "yes"
    if interval.low > margin or interval.high < -margin:
        return "no"
    return "undecided"
