"""The data audit against other computations: pandas for the extremes, a brute-force percentile count for
disagreement, hand counts for thresholds, and `poft filter` itself for the top-fraction cutoffs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from poft import audit
from poft.filtering import filter_by_score


def scores_with_ties_and_gaps(n: int, seed: int) -> list[float | None]:
    """Scores rounded to one decimal (many ties), with None, NaN and infinities scattered in."""
    rng = np.random.default_rng(seed)
    values: list[float | None] = [round(float(x), 1) for x in rng.normal(-1.5, 0.6, size=n)]
    for i in rng.choice(n, size=n // 8, replace=False):
        values[i] = [None, math.nan, math.inf, -math.inf][i % 4]
    return values


@pytest.mark.parametrize("k", [1, 5, 40, 500])
def test_extremes_are_pandas_nsmallest_and_nlargest(k):
    scores = scores_with_ties_and_gaps(300, seed=k)
    series = pd.Series([math.nan if s is None else s for s in scores], dtype=float).replace(
        [math.inf, -math.inf], math.nan
    )
    found = audit.extremes(scores, k)
    k = min(k, series.count() // 2)  # each list holds at most half the scored rows
    assert found.lowest == list(series.dropna().nsmallest(k, keep="first").index)
    assert found.highest == list(series.dropna().nlargest(k, keep="first").index)
    assert found.missing == list(series[series.isna()].index)
    assert not set(found.missing) & (set(found.lowest) | set(found.highest))


def test_extremes_of_nothing_scored():
    assert audit.extremes([None, math.nan], 3) == audit.Extremes([], [], [0, 1])


def test_small_sets_list_no_row_twice_and_no_agreement_as_disagreement():
    found = audit.extremes([-1.0, -2.0, -3.0], 10)
    assert (found.lowest, found.highest) == ([2], [0])
    assert audit.extremes([-1.0], 10) == audit.Extremes([], [], [])
    disputed = audit.disagreements({"a": [1.0, 2.0, 3.0], "b": [2.0, 1.0, 3.0]}, 10)
    assert [d.row for d in disputed] == [0, 1] and all(d.spread > 0 for d in disputed)


def brute_force_disagreements(columns: dict[str, list], k: int) -> list[tuple[int, float, dict[str, float]]]:
    names = list(columns)
    n = len(columns[names[0]])
    common = [i for i in range(n) if all(columns[m][i] is not None and math.isfinite(columns[m][i]) for m in names)]
    found = []
    for i in common:
        percentiles = {}
        for name in names:
            mine = columns[name][i]
            less = sum(columns[name][j] < mine for j in common)
            equal = sum(columns[name][j] == mine for j in common)
            percentiles[name] = 100 * (less + (equal - 1) / 2) / (len(common) - 1)
        found.append((i, max(percentiles.values()) - min(percentiles.values()), percentiles))
    found = [f for f in found if round(f[1], 9) > 0]
    found.sort(key=lambda f: (-round(f[1], 9), f[0]))
    return found[:k]


def test_disagreements_equal_a_brute_force_count():
    columns = {name: scores_with_ties_and_gaps(120, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    columns["b"] = [None if s is None else 3 * s - 2 for s in columns["b"]]  # another scale: ranks don't care
    found = audit.disagreements(columns, 15)
    expected = brute_force_disagreements(columns, 15)
    assert [d.row for d in found] == [row for row, _, _ in expected]
    for d, (_, spread, percentiles) in zip(found, expected, strict=True):
        assert d.spread == pytest.approx(spread)
        assert d.percentiles == pytest.approx(percentiles)


def test_disagreement_reads_ranks_not_scales():
    a = [0.0, 1.0, 2.0, 3.0]
    assert audit.disagreements({"a": a, "b": [100 * x - 7 for x in a]}, 4) == []  # same ranks: no disagreement
    swapped = audit.disagreements({"a": a, "b": [3.0, 1.0, 2.0, 0.0]}, 2)
    assert [(d.row, d.spread) for d in swapped] == [(0, 100.0), (3, 100.0)]
    assert audit.disagreements({"a": a}, 3) == []


def test_count_below_by_hand():
    scores = [-3.0, -2.0, -2.0, None, -1.0, math.nan, 0.5]
    assert audit.count_below(scores, -2.0) == (1, 5)
    assert audit.count_below(scores, -1.5) == (3, 5)
    assert audit.count_below(scores, 1.0) == (5, 5)
    assert audit.count_below([None], 0.0) == (0, 0)


@pytest.mark.parametrize("fraction", audit.TOP_FRACTIONS + (0.01, 1.0))
def test_top_fraction_cutoff_is_what_poft_filter_keeps(fraction):
    scores = scores_with_ties_and_gaps(80, seed=7)
    data = Dataset.from_dict({"ref_score": [None if s is None else s for s in scores], "x": list(range(80))})
    kept, summary = filter_by_score(data, "ref_score", top_fraction=fraction)
    assert audit.top_fraction_cutoff(scores, fraction) == (summary["kept_min_score"], summary["rows_kept"])


def test_row_text_is_the_first_turn_shortened():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First\n\n  question"},
        {"role": "assistant", "content": "x" * 50},
        {"role": "user", "content": "second"},
    ]
    assert audit.first_text(messages, "user") == "First\n\n  question"
    assert audit.first_text(messages, "tool") == ""
    assert audit.shorten(audit.first_text(messages, "user"), 40) == "First question"
    short = audit.shorten(audit.first_text(messages, "assistant"), 10)
    assert short == "x" * 9 + "…" and len(short) == 10


def hand_ranks(values: list[float]) -> list[float]:
    """1-based ranks by counting: 1 + the values below + half the other values equal."""
    return [1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]


def hand_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5


def test_ranks_share_ties():
    rng = np.random.default_rng(3)
    values = list(rng.integers(0, 6, size=40).astype(float))
    assert audit.ranks(values) == hand_ranks(values)


def test_auc_against_pairwise_counting():
    pos, neg = [0.9, 0.4, 0.4, 0.1], [0.4, 0.2, 0.0]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert audit.auc(pos, neg) == pytest.approx(sum(pairs) / len(pairs))
    assert audit.auc([1, 2], [0]) == 1.0 and audit.auc([0], [1, 2]) == 0.0
    assert audit.auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        audit.auc([1.0], [])


def test_correlations_are_the_hand_formulas_on_values_and_ranks():
    rng = np.random.default_rng(4)
    x = list(rng.normal(size=60))
    y = [a + b for a, b in zip(x, rng.normal(scale=0.7, size=60), strict=True)]
    y[:10] = [round(v) for v in y[:10]]  # ties, which Spearman ranks by their average rank
    pearson, spearman = audit.correlations(x, y)
    assert pearson == pytest.approx(hand_pearson(x, y), abs=1e-12)
    assert spearman == pytest.approx(hand_pearson(hand_ranks(x), hand_ranks(y)), abs=1e-12)
    assert all(math.isnan(c) for c in audit.correlations([1.0], [2.0]))
    assert all(math.isnan(c) for c in audit.correlations([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
