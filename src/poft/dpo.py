"""`poft dpo`: the paper's second stage, DPO on preference pairs starting from a PoFT or SFT checkpoint.

Preference data comes from the same places as SFT data (JSONL, JSON, Parquet or CSV files,
``save_to_disk`` directories, Hub datasets) and is normalised into the explicit-prompt form that
TRL's DPOTrainer tokenizes without guessing: ``prompt``, ``chosen`` and ``rejected`` are either all
text or all message lists. That matters for UltraFeedback (``HuggingFaceH4/ultrafeedback_binarized``),
whose ``chosen``/``rejected`` are whole conversations that repeat the prompt turn while ``prompt`` is
a plain string: DPOTrainer only extracts an implicit prompt when there is no ``prompt`` column, and
concatenating a string prompt with message lists fails. Here the turns that chosen and rejected share
become the prompt, and the rest are the two completions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import datasets
from trl import DPOConfig, DPOTrainer, ModelConfig

from poft.errors import DataError, OptionError
from poft.formats import MESSAGES_FEATURE, clean_turn, type_name
from poft.options import apply_warmup_ratio, warmup_ratio_field
from poft.runtime import default_bf16, machine_defaults, output_dir_for, train_and_save
from poft.sources import Row, column_union, open_source
from poft.validation import check_model_source

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
PAIR_HINT = (
    "A DPO set needs prompt/chosen/rejected columns, e.g. HuggingFaceH4/ultrafeedback_binarized split train_prefs."
)
ROW_HINT = "Fix or remove the row."
PAIR_FEATURES = {
    "chat": datasets.Features(dict.fromkeys(PAIR_COLUMNS, MESSAGES_FEATURE)),
    "text": datasets.Features({column: datasets.Value("string") for column in PAIR_COLUMNS}),
}


@dataclass
class DPODataArguments:
    """Where the preference pairs come from; the model and training options live in ModelConfig and the DPO config."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Preference data: a JSONL/JSON/Parquet/CSV file, a save_to_disk directory or a Hub dataset id, "
            "with prompt/chosen/rejected columns (text or message lists)."
        },
    )
    dataset_train_split: str = field(
        default="train", metadata={"help": "Split to train on (Hub and save_to_disk data)."}
    )
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "Split to evaluate on when eval_strategy is not 'no' (Hub and save_to_disk data)."},
    )


@dataclass
class PoFTDPOConfig(DPOConfig):
    """DPOConfig whose unset bf16 follows the hardware, since TRL turns it on even where bf16 cannot run (a laptop
    CPU), and which takes the `warmup_ratio` transformers 5 folded into `warmup_steps`. `beta` and `learning_rate`
    keep TRL's defaults; their help says what public recipes use."""

    warmup_ratio: float | None = warmup_ratio_field()
    beta: float = field(
        default=DPOConfig.beta,
        metadata={
            "help": "DPO's KL strength: higher stays closer to the starting model. TRL's default 0.1; public recipes "
            "use 0.01 (alignment-handbook zephyr-7b-beta, the recipe recipes/dpo-paper.yaml follows), 0.05 "
            "(SmolLM3's apo_zero) and 0.5 (SmolLM2); the demo's DPO stage chose 0.05 on its validation prompts."
        },
    )
    learning_rate: float = field(
        default=DPOConfig.learning_rate,
        metadata={
            "help": "TRL's default 1e-6. Public recipes run DPO at a fortieth to a thousandth of their SFT learning rate "
            "(zephyr-7b-beta: 5e-7 after SFT at 2e-5; SmolLM2: 1e-6 after 1e-3); a tenth cost the demo 2.6 to 9.8 "
            "points of validation accuracy (bench/RESULTS.md, DPO sweep)."
        },
    )

    def __post_init__(self):
        apply_warmup_ratio(self)
        machine_defaults(self)
        self.bf16 = default_bf16(self.bf16, self.fp16)
        super().__post_init__()


# --------------------------------------------------------------------------- data


def load_preference_dataset(source: str | os.PathLike, *, split: str = "train") -> datasets.Dataset:
    """Load ``source`` (see `poft.sources.open_source`) as explicit-prompt preference pairs: ``prompt``, ``chosen``,
    ``rejected`` columns only."""
    source = os.fspath(source)
    loaded = open_source(source, split)
    dataset = _pairs_from_rows(loaded, source) if isinstance(loaded, list) else _pairs_from_dataset(loaded, source)
    form = "message lists" if dataset.features == PAIR_FEATURES["chat"] else "text"
    logger.info("Loaded %d preference pairs from %s (%s)", len(dataset), source, form)
    return dataset


def normalize_pair(record: dict[str, Any]) -> dict[str, Any]:
    """One row as an explicit-prompt pair, all text or all message lists; ``ValueError`` says what is wrong."""
    chosen, rejected = _completion(record, "chosen"), _completion(record, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError("'chosen' and 'rejected' must both be text or both be message lists")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str | list):
        raise ValueError(f"'prompt' must be a string or a list of messages, found {type_name(prompt)}")
    if isinstance(chosen, str) and not isinstance(prompt, list):
        if not (prompt or "").strip():
            raise ValueError("'prompt' is missing or empty; text pairs need an explicit prompt")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return _chat_pair(prompt, _as_turns(chosen), _as_turns(rejected))


def _completion(record: dict[str, Any], key: str) -> str | list[dict]:
    value = record.get(key)
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{key}' is empty")
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError(f"'{key}' is an empty list of messages")
        return _turns(value, key)
    raise ValueError(f"'{key}' must be a string or a list of messages, found {type_name(value)}")


def _turns(value: list, key: str) -> list[dict]:
    try:
        return [clean_turn(turn, i) for i, turn in enumerate(value, start=1)]
    except ValueError as exc:
        raise ValueError(f"'{key}': {exc}") from None


def _as_turns(completion: str | list[dict]) -> list[dict]:
    return [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion


def _chat_pair(prompt: str | list | None, chosen: list[dict], rejected: list[dict]) -> dict[str, list[dict]]:
    """Split message lists into prompt and completions: an explicit prompt list, else the turns both share."""
    if isinstance(prompt, list):
        turns = _turns(prompt, "prompt")
        chosen, rejected = _drop_prefix(chosen, turns), _drop_prefix(rejected, turns)
    elif shared := _shared_turns(chosen, rejected):
        turns, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif prompt and prompt.strip():
        turns = [{"role": "user", "content": prompt}]
    else:
        raise ValueError("no prompt: 'prompt' is missing and 'chosen' and 'rejected' share no opening turns")
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        if not any(turn["role"] == "assistant" for turn in completion):
            raise ValueError(f"'{key}' has no assistant reply after the prompt")
    return {"prompt": turns, "chosen": chosen, "rejected": rejected}


def _drop_prefix(turns: list[dict], prefix: list[dict]) -> list[dict]:
    """Completions that repeat an explicit prompt would otherwise see it twice."""
    return turns[len(prefix) :] if turns[: len(prefix)] == prefix else turns


def _shared_turns(chosen: list[dict], rejected: list[dict]) -> int:
    """Number of opening turns both share, leaving each at least its last turn (identical pairs stay usable)."""
    limit = min(len(chosen), len(rejected)) - 1
    return next((i for i in range(limit) if chosen[i] != rejected[i]), limit)


def _form(pair: dict[str, Any]) -> str:
    return "chat" if isinstance(pair["chosen"], list) else "text"


def _checked_pair(source: str, row: Row, form: str | None = None) -> dict[str, Any]:
    """Normalise one read row, raising a DataError located at the row; ``form`` is what earlier rows were."""
    try:
        if row.error is not None:
            raise ValueError(row.error)
        pair = normalize_pair(row.record)
        if form is not None and _form(pair) != form:
            raise ValueError(f"a {_form(pair)} pair, but earlier rows are {form} pairs; give every row the same form")
    except ValueError as exc:
        raise DataError(f"{source}: {row.where}: {exc}. {ROW_HINT}") from None
    return pair


def _require_columns(source: str, columns: Iterable[str]) -> None:
    columns = list(columns)
    if not {"chosen", "rejected"} <= set(columns):
        raise DataError(
            f"{source}: not preference data: no 'chosen' and 'rejected' columns (found: "
            f"{', '.join(columns) or 'none'}). {PAIR_HINT}"
        )


def _pairs_from_rows(rows: list[Row], source: str) -> datasets.Dataset:
    _require_columns(source, column_union(row.record for row in rows if row.record is not None))
    first = _checked_pair(source, rows[0])
    pairs = [first] + [_checked_pair(source, row, _form(first)) for row in rows[1:]]
    return datasets.Dataset.from_dict(
        {column: [pair[column] for pair in pairs] for column in PAIR_COLUMNS}, features=PAIR_FEATURES[_form(first)]
    )


def _pairs_from_dataset(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """Normalise with ``map``, so large saved or Hub data need not pass through Python lists."""
    if len(dataset) == 0:
        raise DataError(
            f"{source}: the dataset is empty, so there is nothing to train on. Add preference pairs to it."
        )
    _require_columns(source, dataset.column_names)
    form = _form(_checked_pair(source, Row("row", 1, dataset[0])))
    return dataset.map(
        lambda example, index: _checked_pair(source, Row("row", index + 1, example), form),
        with_indices=True,
        remove_columns=dataset.column_names,
        features=PAIR_FEATURES[form],
        keep_in_memory=True,  # never write cache files into the user's data directory
        desc="Normalising preference pairs",
    )


# --------------------------------------------------------------------------- training


def run_dpo(data_args: DPODataArguments, training_args: DPOConfig, model_args: ModelConfig) -> str:
    """Train with DPOTrainer and save the model, plus the log history (trainer_state.json), to ``output_dir``."""
    if not data_args.dataset_name or not model_args.model_name_or_path:
        raise OptionError("poft dpo needs dataset_name and model_name_or_path (in the YAML config or as flags)")
    check_model_source(model_args.model_name_or_path, "--model_name_or_path")
    with output_dir_for(training_args.output_dir, "--output_dir"):
        train_dataset = load_preference_dataset(data_args.dataset_name, split=data_args.dataset_train_split)
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset = load_preference_dataset(data_args.dataset_name, split=data_args.dataset_test_split)
        logger.info(
            "DPO of %s on %d preference pairs (beta=%g, loss_type=%s)",
            model_args.model_name_or_path,
            len(train_dataset),
            training_args.beta,
            ",".join(training_args.loss_type),
        )
        return train_and_save(DPOTrainer, model_args, training_args, train_dataset, eval_dataset)
