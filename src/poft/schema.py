"""The data contract between poft's stages: column names, the conversation id, and the record files.

Columns and records cross stages and live on disk (a set scored today is trained on tomorrow), so their
names and shapes are defined here once, not spelled again by each writer and reader. A dataset stage's
output carries `poft_output.json` (the stage and the columns poft computed); `poft score` adds
`poft_score.json` (its options and references) and `poft filter` `filter_summary.json` (one record per
filter run, carried by every later stage). Record files are written into a stage's temporary output
directory, which `poft.outputs.atomic_output` moves into place whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from poft.errors import DataError

MESSAGES = "messages"
POFT_ID = "poft_id"
REF_SCORE = "ref_score"
REF_ENTROPY = "ref_entropy"  # the references' mean entropy at the response positions, beside ref_score
SCORE_PREFIX, N_TOKENS_PREFIX, ENTROPY_PREFIX = "score_", "n_tokens_", "entropy_"
SCORE_PREFIXES = (SCORE_PREFIX, N_TOKENS_PREFIX, ENTROPY_PREFIX)  # a reference's columns
NOISE = "poft_noise"
FILTERS = "poft_filters"
IFD = "ifd"
COMPLETION_MASK = "completion_mask"  # TRL's per-token 0/1 column: 0 takes a token out of the loss
CONTENT_SCORES = (REF_SCORE, REF_ENTROPY, *SCORE_PREFIXES, IFD)  # prefixes of the columns scoring a row's content

MARKER = "poft_output.json"
SCORE_RECORD = "poft_score.json"
FILTER_HISTORY = "filter_summary.json"

NUMERIC_DTYPES = ("int", "uint", "float", "double", "half")


def score_column(reference: str) -> str:
    """The column of one reference's scores r_m."""
    return f"{SCORE_PREFIX}{reference}"


def n_tokens_column(reference: str) -> str:
    """The column of the response-token counts behind one reference's scores."""
    return f"{N_TOKENS_PREFIX}{reference}"


def entropy_column(reference: str) -> str:
    """The column of one reference's mean entropy at the response positions: how unsure it was where it scored."""
    return f"{ENTROPY_PREFIX}{reference}"


def entropy_column_for(score: str) -> str | None:
    """The entropy column `poft score` writes beside a score column: `ref_entropy` beside `ref_score`,
    `entropy_<name>` beside `score_<name>`; None beside any other column."""
    if score == REF_SCORE:
        return REF_ENTROPY
    return entropy_column(score.removeprefix(SCORE_PREFIX)) if score.startswith(SCORE_PREFIX) else None


def reference_columns(references: Iterable[str]) -> set[str]:
    """The columns `poft score` writes for these reference names: theirs, `ref_score` and `ref_entropy`."""
    columns = (score_column, n_tokens_column, entropy_column)
    return {REF_SCORE, REF_ENTROPY} | {column(name) for name in references for column in columns}


def is_score_column(name: str) -> bool:
    """`ref_score` or one reference's `score_<name>`: the columns training, filtering and reports read."""
    return name == REF_SCORE or name.startswith(SCORE_PREFIX)


def is_numeric(feature, allow_null: bool = False) -> bool:
    """A `datasets` feature holding numbers (and, with `allow_null`, a column of nulls only)."""
    from datasets import Value

    if not isinstance(feature, Value):
        return False
    return feature.dtype.startswith(NUMERIC_DTYPES) or (allow_null and feature.dtype == "null")


def conversation_id(messages: Sequence[dict]) -> str:
    """Stable id of a conversation's content: the same turns give the same id whatever else a row holds."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    payload = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def is_poft_output(path: Path) -> bool:
    return (path / MARKER).is_file()


def write_marker(directory: Path, stage: str, columns: Iterable[str]) -> None:
    """Record which stage wrote `directory` and which of its columns poft computed."""
    _write_json(directory / MARKER, {"stage": stage, "columns": sorted(set(columns))})


def read_marker(source: str | os.PathLike) -> dict:
    """The record a poft output carries ({} for anything else, e.g. a data file or a hub id, or one unreadable)."""
    path = Path(source).expanduser() / MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def poft_columns(source: str | os.PathLike) -> set[str]:
    """Columns of `source` that poft computed (from its `poft_output.json`): poft's to replace or drop later."""
    return set(read_marker(source).get("columns", []))


def write_score_record(directory: Path, record: dict) -> None:
    """`poft score`'s record: its options, references, and what it dropped, kept and could not score."""
    _write_json(directory / SCORE_RECORD, record)


def write_filter_history(directory: Path, history: list[dict]) -> None:
    """The records of the `poft filter` runs that made the data in `directory`."""
    _write_json(directory / FILTER_HISTORY, history)


def read_filter_history(source: str | os.PathLike) -> list[dict]:
    """The records of the `poft filter` runs that made `source` (`filter_summary.json`; [] where there is none).

    It follows the data through later stages; a file that is not poft's list of records is a DataError.
    """
    path = Path(source).expanduser() / FILTER_HISTORY
    if not path.is_file():
        return []
    fix = "Fix or delete it: it only records what earlier `poft filter` runs kept."
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path} cannot be read ({error}). {fix}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error}). {fix}") from None
    if not isinstance(history, list) or not all(isinstance(record, dict) for record in history):
        raise DataError(f"{path} is not a list of filter records. {fix}")
    return history
