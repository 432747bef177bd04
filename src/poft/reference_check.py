"""A check of the references from the scored data alone, before training: PoFT is only as good as its references.

The signal is the references' confidence on the responses they like best: exp of the 90th percentile of
`ref_score` (a mean response log-prob), i.e. the geometric-mean token probability the references give their
top 10% of rows. References that learned the task from good data predict good responses almost surely; references
trained on noisy data spread their mass over the noise they saw and stay unsure even of the best responses. The
top decile, not the mean, so that noise in the scored data (which lowers the mean) does not read as a weak
reference.

Measured in the demo (`bench/RESULTS.md`, "Reference check"): 0.93-0.98 with the standard references on clean,
paper-noised and subtly noised data, 0.34-0.40 with references trained on 60%-noised data. Rank agreement between the
references (mean pairwise Spearman of the `score_<name>` columns) is reported beside it but is no quality
signal: the misaligned references agree with each other as much as the standard ones do.

Limits: the level depends on the data's kind. Checkable short answers are predictable; open-ended chat responses
are not, and good references on such data score lower, so `CONFIDENT` is calibrated on the demo only: read the
value against references you trust on the same kind of data. It cannot see references that are confidently wrong
in the same way as the data (a shared bias), and it says nothing about whether the references beat the target.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from poft.schema import REF_SCORE, SCORE_PREFIX

TOP_SHARE = 0.1  # the rows the references like best
CONFIDENT = 0.6  # below: weak or noise-trained references (demo: >= 0.93 standard, <= 0.40 misaligned)


@dataclass(frozen=True)
class ReferenceCheck:
    rows: int  # rows with a finite ref_score
    top_confidence: float  # exp of ref_score's (1 - TOP_SHARE) quantile
    agreement: float | None  # mean pairwise Spearman between the references' columns; None with one reference

    @property
    def weak(self) -> bool:
        return self.top_confidence < CONFIDENT

    def line(self) -> str:
        """One line for a log or a report."""
        agreement = "" if self.agreement is None else f"; rank agreement between references {self.agreement:.2f}"
        verdict = (
            f"below {CONFIDENT:g}: the references may be too weak or trained on noisy data; check them before training"
            if self.weak
            else f"at least {CONFIDENT:g} as references that learned the task give"
        )
        return (
            f"Reference check: the references give their top {100 * TOP_SHARE:.0f}% of {self.rows} rows a token "
            f"probability of {self.top_confidence:.2f} (exp of ref_score's {100 * (1 - TOP_SHARE):.0f}th percentile; "
            f"{verdict}){agreement}."
        )


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN where a side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return math.nan
    return statistics.correlation(rx, ry)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    return ranks


def check_references(columns: dict[str, Sequence[float | None]]) -> ReferenceCheck | None:
    """The check of a scored dataset's columns (`ref_score` and each `score_<name>`); None without two finite
    ref_scores."""
    scores = [s for s in columns.get(REF_SCORE, []) if s is not None and math.isfinite(s)]
    if len(scores) < 2:
        return None
    names = [n for n in columns if n.startswith(SCORE_PREFIX)]
    pairs = []
    for a, b in combinations(names, 2):
        both = [
            (x, y)
            for x, y in zip(columns[a], columns[b], strict=True)
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
        ]
        if len(both) >= 2:
            rho = spearman([x for x, _ in both], [y for _, y in both])
            if not math.isnan(rho):
                pairs.append(rho)
    return ReferenceCheck(
        rows=len(scores),
        top_confidence=math.exp(quantile(scores, 1 - TOP_SHARE)),
        agreement=statistics.mean(pairs) if pairs else None,
    )
