"""Filter SFT data by a score column: the references' `ref_score` (the paper's score filtering) or IFD.

IFD (Cherry LLM's instruction-following difficulty) of a pair is the model's mean response
cross-entropy given the prompt divided by its mean response cross-entropy without it. Both are PoFT
scores computed by `score_dataset` (the conditional one is exactly the model's reference score, so a
reference's cache serves it), the unconditional one on the response turns alone in the same template,
each after an empty user turn (see `response_only`), so both cover exactly the same response tokens.
Its authors drop IFD >= 1 (the prompt does not help) and keep the highest fraction of the rest.

Filters compose: each keeps rows, appends what it did to the `poft_filters` column, and adds a record to
`filter_summary.json` in the output directory.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

from datasets import Dataset, Value

from poft.errors import DataError, OptionError
from poft.models import parse_references
from poft.schema import FILTERS, IFD, MESSAGES, POFT_ID, REF_SCORE, conversation_id, is_numeric, score_column
from poft.scoring import ScoringOptions, data_row, score_dataset
from poft.stage import StageIO, open_stage

logger = logging.getLogger(__name__)

FEW_KEPT = 0.01  # keeping fewer than this share of the rows is warned about; keeping none is an error
RECORD_SOURCE, RECORD_CONFIG = "source", "config"  # what a filter's record in filter_summary.json adds to its summary


@dataclass
class FilterConfig(ScoringOptions, StageIO):
    """Options of `poft filter`; the shared scoring options apply to IFD's model (`--ifd_model`)."""

    by: str = field(
        default=REF_SCORE,
        metadata={"help": "Score column to filter by (higher is kept); 'ifd' computes IFD with --ifd_model."},
    )
    top_fraction: float | None = field(
        default=None, metadata={"help": "Keep this fraction of the rows, in (0, 1], highest scores first."}
    )
    threshold: float | None = field(
        default=None,
        metadata={"help": "Keep rows whose score is at least this (instead of, or besides, --top_fraction)."},
    )
    ifd_model: str | None = field(
        default=None, metadata={"help": "Model (path or hub id) to compute IFD with; implies --by ifd."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.ifd_model:
            self.by = IFD
        check_selection(self.top_fraction, self.threshold)


def check_selection(top_fraction: float | None, threshold: float | None) -> None:
    if top_fraction is None and threshold is None:
        raise OptionError("Say what to keep: --top_fraction F (in (0, 1]) and/or --threshold T.")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise OptionError(
            f"--top_fraction must be in (0, 1], got {top_fraction}; e.g. --top_fraction 0.4 keeps the top 40%."
        )


def filter_by_score(
    dataset: Dataset,
    column: str,
    *,
    top_fraction: float | None = None,
    threshold: float | None = None,
    drop_at_or_above: float | None = None,
) -> tuple[Dataset, dict]:
    """Keep the rows with the highest `column` (a fraction of all rows, and/or at least `threshold`).

    Rows with a missing or non-finite score are dropped, and so are rows whose score is at least
    `drop_at_or_above` (IFD's rule). Kept rows stay in their original order. Returns the kept rows and
    a summary of what was kept and why. Keeping no row is an error (`DataError`, with the highest score
    for a threshold to compare with); keeping under 1% of the rows is warned about.
    """
    check_selection(top_fraction, threshold)
    if column not in dataset.column_names:
        raise DataError(
            f"The data has no {column!r} column (columns: {', '.join(dataset.column_names)}). Score it first "
            "(`poft score` writes ref_score and score_<name>), filter by an existing column with --by, or use "
            "--ifd_model to compute IFD."
        )
    feature = dataset.features[column]
    if not is_numeric(feature, allow_null=True):
        raise DataError(
            f"The column {column!r} holds {feature.dtype if isinstance(feature, Value) else type(feature).__name__} "
            "values, not numbers, so it cannot rank rows. Filter by a score column (--by ref_score, --by "
            "score_<name>) or convert the column to numbers."
        )
    scores = dataset[column]
    valid = [i for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
    eligible = [i for i in valid if drop_at_or_above is None or scores[i] < drop_at_or_above]
    ranked = sorted(eligible, key=lambda i: scores[i], reverse=True)
    if threshold is not None:
        ranked = [i for i in ranked if scores[i] >= threshold]
    if top_fraction is not None:
        ranked = ranked[: math.ceil(top_fraction * len(dataset))]
    kept = sorted(ranked)
    cutoff = min((scores[i] for i in kept), default=None)
    rule = f"{column} " + " and ".join(
        ([f"top {top_fraction:g}"] if top_fraction is not None else [])
        + ([f">= {threshold:g}"] if threshold is not None else [])
        + ([f"< {drop_at_or_above:g}"] if drop_at_or_above is not None else [])
    )
    summary = {
        "filter": rule,
        "rows_in": len(dataset),
        "rows_kept": len(kept),
        "dropped_missing_score": len(dataset) - len(valid),
        "dropped_by_rule": len(valid) - len(kept),
        "kept_min_score": cutoff,
    }
    if not kept:
        best = max((scores[i] for i in eligible), default=None)
        raise DataError(
            f"{rule} keeps none of the {len(dataset)} rows ("
            + (f"the highest eligible score is {best:.4g}" if best is not None else f"no row has a usable {column}")
            + "); nothing was written. Lower --threshold or raise --top_fraction."
        )
    if len(kept) < FEW_KEPT * len(dataset):
        logger.warning(
            "%s keeps only %d of %d rows (under %g%%); check --threshold / --top_fraction.",
            rule,
            len(kept),
            len(dataset),
            100 * FEW_KEPT,
        )
    note = f"{rule} (kept score >= {cutoff:.4g})" if cutoff is not None else rule
    previous = dataset[FILTERS] if FILTERS in dataset.column_names else [[] for _ in range(len(dataset))]
    kept_dataset = dataset.select(kept)
    if FILTERS in kept_dataset.column_names:
        kept_dataset = kept_dataset.remove_columns(FILTERS)
    kept_dataset = kept_dataset.add_column(FILTERS, [list(previous[i]) + [note] for i in kept])
    logger.info("%s: kept %d of %d rows", rule, len(kept), len(dataset))
    return kept_dataset, summary


def response_only(messages: list[dict]) -> list[dict]:
    """IFD's unconditional conversation: each assistant turn after an empty user turn, in the conversation's order.

    The empty user turns carry no prompt, and keep the roles alternating, which many templates require (Gemma,
    Mistral-Instruct v0.1, Llama 2, Qwen 3). The response tokens (each content and its closing token) are the
    same as in the full conversation, so both scores of IFD average over exactly the same tokens.
    """
    out: list[dict] = []
    for message in messages:
        if message["role"] == "assistant":
            out += [{"role": "user", "content": ""}, message]
    return out


def ifd_scores(dataset: Dataset, model: str, config: ScoringOptions) -> list[float | None]:
    """IFD = r(y | x) / r(y) (the ratio of mean cross-entropies, signs cancelling); None where either is missing.

    Both kinds of conversation are scored in one pass, so the model loads once; a message about the
    unconditional pass names the user's row it comes from.
    """
    reference = parse_references([model])
    n = len(dataset)
    conversations = list(dataset[MESSAGES]) + [response_only(m) for m in dataset[MESSAGES]]
    both = Dataset.from_dict({MESSAGES: conversations, POFT_ID: [conversation_id(m) for m in conversations]})

    def describe_row(row: int) -> str:
        return data_row(row) if row <= n else f"the response-only copy (IFD) of {data_row(row - n)}"

    scores = score_dataset(both, reference, config, describe_row)[score_column(reference[0].name)]
    conditional, unconditional = scores[:n], scores[n:]
    return [
        None if c is None or u is None or u == 0 else c / u for c, u in zip(conditional, unconditional, strict=True)
    ]


def run_filter(config: FilterConfig) -> tuple[Dataset, dict]:
    """`poft filter`: load, (compute IFD,) keep, save rows and append to filter_summary.json (atomically).

    Returns the kept rows and this filter's summary (`filter_by_score`'s), its record without the source and config.
    """
    stage = open_stage(config, "filter")  # reads the filter records first: a corrupt one stops the run at once

    def keep(dataset: Dataset) -> Dataset:
        drop = None
        if config.by == IFD:
            if config.ifd_model is None and IFD not in dataset.column_names:
                raise OptionError("Filtering by IFD needs --ifd_model PATH_OR_HUB_ID (or data with an 'ifd' column).")
            if config.ifd_model is not None:
                values = ifd_scores(dataset, config.ifd_model, config)
                dataset = dataset.remove_columns([c for c in (IFD,) if c in dataset.column_names])
                dataset = dataset.add_column(IFD, values)
            drop = 1.0
        kept, summary = filter_by_score(
            dataset, config.by, top_fraction=config.top_fraction, threshold=config.threshold, drop_at_or_above=drop
        )
        stage.history.append({**summary, RECORD_SOURCE: config.data, RECORD_CONFIG: asdict(config)})
        return kept

    kept = stage.write([FILTERS] + ([IFD] if config.ifd_model is not None else []), keep)
    record = stage.history[-1]
    return kept, {key: value for key, value in record.items() if key not in (RECORD_SOURCE, RECORD_CONFIG)}


def kept_summary(result: tuple[Dataset, dict]) -> dict:
    """What `poft filter` prints of `run_filter`'s result: the summary of what it kept."""
    return result[1]
