"""The data audit of a scored dataset: which rows the references think are worst, best, and disputed, and
the statistics of score columns (ranks, AUC of clean over noisy rows, correlation between references).

Pure functions over score columns (lists of floats with None where a row could not be scored), on
`scipy.stats`; `poft report` and the demo turn their results into tables. A score that is None or not finite is "missing": it is listed
apart and never counted as an extreme, the same rule `poft filter` uses to drop rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from poft.optional import require

# Fixed ref_score thresholds, as the geometric-mean probability the references give a response token.
# ref_score is a mean per-token log-prob, so ln(p) reads the same on any data and any tokenizer:
# "below ln 0.1" means the references find a typical token of the response less than 10% likely.
TOKEN_PROBABILITIES = (0.5, 0.25, 0.1, 0.01)
# --top_fraction values of `poft filter` whose ref_score cutoffs the audit shows (0.4: the paper's filter).
TOP_FRACTIONS = (0.9, 0.75, 0.5, 0.4)


def is_missing(score: float | None) -> bool:
    return score is None or not math.isfinite(score)


def _stats():
    return require("scipy.stats", "report", "The data audit's statistics")


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    return _stats().rankdata(values, method="average").tolist()


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney U over n_pos * n_neg."""
    if not positives or not negatives:
        raise ValueError("auc needs at least one positive and one negative score")
    u = _stats().mannwhitneyu(positives, negatives, method="asymptotic").statistic  # U of `positives`; p unused
    return float(u) / (len(positives) * len(negatives))


def correlations(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Pearson, Spearman) of paired scores; NaN where undefined (fewer than two pairs, or one side constant)."""
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    stats = _stats()
    return float(stats.pearsonr(x, y).statistic), float(stats.spearmanr(x, y).statistic)


@dataclass
class Extremes:
    """Row indices: the k lowest (ascending), the k highest (descending), and every row with a missing score."""

    lowest: list[int]
    highest: list[int]
    missing: list[int]


def extremes(scores: Sequence[float | None], k: int) -> Extremes:
    """The k lowest and k highest scored rows; ties go to the earlier row, so the lists are deterministic.

    Each list holds at most half the scored rows, so the two never share a row (with 3 rows, "lowest"
    and "highest" would otherwise list the same rows).
    """
    scored = [i for i, s in enumerate(scores) if not is_missing(s)]
    k = min(k, len(scored) // 2)
    lowest = sorted(scored, key=lambda i: (scores[i], i))[:k]
    highest = sorted(scored, key=lambda i: (-scores[i], i))[:k]
    return Extremes(lowest, highest, [i for i, s in enumerate(scores) if is_missing(s)])


@dataclass
class Disagreement:
    """A row the references rank differently: its percentile under each reference and their spread."""

    row: int
    spread: float
    percentiles: dict[str, float]


def disagreements(columns: dict[str, Sequence[float | None]], k: int) -> list[Disagreement]:
    """The k rows whose percentile ranks differ most between references (largest spread first, ties by row);
    rows every reference ranks alike (spread 0) are no disagreement and never listed.

    References' scales differ (a stronger or better-matched model gives every row higher log-probs, and
    their spreads differ too), so raw scores cannot be compared across references. Each reference's scores
    become percentile ranks among the rows every reference scored (0 = its lowest row, 100 = its highest,
    ties averaged), and a row's disagreement is the largest minus the smallest of its percentiles: "one
    reference puts it in its bottom 5%, another above the median". Ranks rather than z-scores because
    log-prob distributions have long low tails (noisy rows), which would squash z-scores of ordinary rows.
    """
    if len(columns) < 2:
        return []
    names = list(columns)
    rows = [i for i in range(len(columns[names[0]])) if not any(is_missing(columns[n][i]) for n in names)]
    if not rows:
        return []
    row_ranks = {name: ranks([columns[name][i] for i in rows]) for name in names}
    # Spreads are compared in ranks (exact half-integers), so equal spreads tie exactly and go by row.
    rank_spreads = [
        max(row_ranks[n][j] for n in names) - min(row_ranks[n][j] for n in names) for j in range(len(rows))
    ]
    disputed = [j for j in range(len(rows)) if rank_spreads[j] > 0]
    top = sorted(disputed, key=lambda j: (-rank_spreads[j], rows[j]))[:k]
    scale = 100 / (len(rows) - 1) if len(rows) > 1 else 0.0
    return [
        Disagreement(
            rows[j],
            scale * rank_spreads[j],
            {n: scale * (row_ranks[n][j] - 1) if len(rows) > 1 else 50.0 for n in names},
        )
        for j in top
    ]


def count_below(scores: Sequence[float | None], threshold: float) -> tuple[int, int]:
    """(scored rows with a score strictly below `threshold`, scored rows)."""
    scored = [s for s in scores if not is_missing(s)]
    return sum(s < threshold for s in scored), len(scored)


def top_fraction_cutoff(scores: Sequence[float | None], fraction: float) -> tuple[float | None, int]:
    """(lowest score kept, rows kept) by `poft filter --top_fraction fraction`: the top ceil(fraction * all rows).

    The count is of all rows, missing ones included, as `poft filter` counts; None when nothing is kept.
    """
    ranked = sorted((s for s in scores if not is_missing(s)), reverse=True)[: math.ceil(fraction * len(scores))]
    return (ranked[-1] if ranked else None), len(ranked)


def first_text(messages: Sequence[dict] | None, role: str) -> str:
    """The content of the conversation's first turn by `role`, or '' if it has none."""
    return next((m["content"] for m in messages or () if m.get("role") == role and m.get("content")), "")


def shorten(text: str, width: int) -> str:
    """Whitespace collapsed to single spaces, cut to at most `width` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(width - 1, 0)].rstrip() + "…"
