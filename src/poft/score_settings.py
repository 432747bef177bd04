"""The reading settings a reference score was computed with, carried by the score column itself.

r_ref and r_theta cover the same tokens only if scoring and training truncate alike (and treat system
turns alike). `score_dataset` stores its settings in the score columns' feature (`datasets.Value.id`),
which `save_to_disk`/`load_from_disk`, `map`, `filter`, `select` and `poft filter` keep, so that
`PoFTTrainer` can check them whatever the entry point: the CLI, a saved directory, or the Dataset
`score_dataset` returned in memory. A column with no settings (scores from elsewhere, or a JSONL or CSV file
written from poft's output, which keeps the values only) cannot be checked, and the trainer says so.

The reading length (max_length, truncation_mode) changes what is read only in conversations it cuts, so the
column also carries the poft_ids of the conversations its max_length cut: training at another length is refused
only where a conversation is cut under one of the two settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from datasets import Dataset, Value

SETTINGS = ("max_length", "truncation_mode", "system_turns")
LENGTH_SETTINGS = ("max_length", "truncation_mode")  # matter only in the conversations they cut
CUT = "cut"
_KEY = "poft_scoring"


def score_feature(config: Any, cut: Iterable[str] = ()) -> Value:
    """The feature of a score column computed with `config` (any object with the `SETTINGS` attributes), whose
    max_length cut the conversations with these poft_ids."""
    settings: dict[str, Any] = {name: getattr(config, name) for name in SETTINGS}
    settings[CUT] = sorted(cut)
    return Value("float64", id=json.dumps({_KEY: settings}, sort_keys=True))


def scoring_settings(dataset: Dataset, column: str) -> dict[str, Any] | None:
    """The settings `column` of `dataset` was scored with, or None where it carries none."""
    feature = dataset.features.get(column)
    if not isinstance(feature, Value) or not feature.id:
        return None
    try:
        carried = json.loads(feature.id)
    except ValueError:
        return None
    return carried.get(_KEY) if isinstance(carried, dict) else None


def mismatches(scored: Mapping[str, Any], training: Mapping[str, Any]) -> list[str]:
    """The names of the settings that differ."""
    return [name for name in SETTINGS if name in scored and scored[name] != training[name]]
