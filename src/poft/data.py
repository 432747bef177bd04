"""Load supervised fine-tuning data as one dataset: a ``messages`` column, ``poft_id`` and the input's other columns.

`poft.sources` reads the data into located rows (or opens a saved or Hub dataset), `poft.formats` turns
each row into ``messages``; both kinds of input go through one per-row conversion, so a file and a saved
dataset holding the same rows give the same result and the same errors. A bad row is reported with the
file and the line or row a person has to fix, or skipped into a report on request.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from poft.errors import DataError
from poft.formats import MESSAGES_FEATURE, SOURCE_COLUMNS, detect_format, match_format, normalize_example, type_name
from poft.outputs import atomic_write_text
from poft.schema import MESSAGES, POFT_ID, conversation_id
from poft.sources import Row, column_union, open_source

logger = logging.getLogger(__name__)

SKIP_HINT = "Fix the row, or pass --skip-invalid to skip bad rows and write them to a report."
_ERROR_COLUMN = "__poft_error__"


def load_sft_dataset(
    source: str | os.PathLike,
    *,
    split: str = "train",
    skip_invalid: bool = False,
    invalid_report: str | os.PathLike | None = None,
    replace_poft_id: bool = False,
    text_field: str | None = None,
) -> datasets.Dataset:
    """Load ``source`` (see `open_source`) as a dataset of normalised conversations (``messages``, ``poft_id``,
    extra columns).

    A ``poft_id`` column in the source that is not poft's content hash is someone else's id: refused
    (``DataError``) unless ``replace_poft_id``, rather than silently replaced. With ``text_field``, data in no
    conversation format that has that column is plain text (language modelling, as TRL's ``dataset_text_field``):
    returned as that one column.
    """
    source = os.fspath(source)
    loaded = open_source(source, split)
    if text_field is not None:
        text = _plain_text(loaded, source, text_field)
        if text is not None:
            logger.info("Loaded %d rows of plain text (%r) from %s", len(text), text_field, source)
            return text
    if isinstance(loaded, list):
        dataset, fmt = _convert_rows(loaded, source, skip_invalid, invalid_report, replace_poft_id)
    else:
        dataset, fmt = _convert_dataset(loaded, source, skip_invalid, invalid_report, replace_poft_id)
    logger.info("Loaded %d conversations from %s (format: %s)", len(dataset), source, fmt)
    return dataset


def _plain_text(loaded: list[Row] | datasets.Dataset, source: str, text_field: str) -> datasets.Dataset | None:
    """The `text_field` column of data in no conversation format, or None (conversations, or no such column)."""
    if isinstance(loaded, datasets.Dataset):
        columns = loaded.column_names
    else:
        columns = column_union(row.record for row in loaded if row.record is not None)
    if match_format(columns) is not None or text_field not in columns:
        return None
    if isinstance(loaded, datasets.Dataset):
        texts = loaded[text_field]
        rows = [Row("row", i) for i in range(1, len(texts) + 1)]
    else:
        texts = [row.record.get(text_field) if row.record is not None else None for row in loaded]
        rows = loaded
    for row, text in zip(rows, texts, strict=True):
        if not isinstance(text, str) or not text:
            found = "empty" if text == "" else (row.error or f"found {type_name(text)}")
            raise DataError(f"{source}: {row.where}: {text_field!r} must be non-empty text ({found}).")
    if not texts:
        raise DataError(f"{source}: the dataset is empty, so there is nothing to train on.")
    return datasets.Dataset.from_dict({text_field: texts})


def _detect(source: str, columns: Iterable[str]) -> str:
    try:
        return detect_format(columns)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None


def _row_error(source: str, row: Row) -> DataError:
    return DataError(f"{source}: {row.where}: {row.error}. {SKIP_HINT}")


def _check_poft_id(source: str, row: Row, given: Any, computed: str) -> None:
    """A source ``poft_id`` must be poft's content hash (as in poft's own outputs); anything else is refused."""
    if given is not None and given != computed:
        raise DataError(
            f"{source}: {row.where}: the column 'poft_id' holds {given!r}, not poft's id of this conversation "
            f"({computed}); poft would replace it. Rename that column (e.g. to 'id'), or pass --overwrite to "
            "replace it."
        )


def _extra_columns(fmt: str, columns: Iterable[str]) -> list[str]:
    """Columns carried through untouched; ``poft_id`` is always recomputed from content."""
    return [c for c in columns if c not in SOURCE_COLUMNS[fmt] and c != POFT_ID]


@dataclass(frozen=True)
class _Conversion:
    """What one conversion of a dataset needs to know: the source (for messages), its format and the options."""

    source: str
    fmt: str | None  # None only when no row was readable
    skip_invalid: bool
    replace_poft_id: bool

    def row(self, row: Row) -> dict[str, Any]:
        """``messages``, ``poft_id`` and (when skipping) the error of one located row: the one rule both inputs use.

        A bad row raises a DataError naming it, or with ``skip_invalid`` comes back empty with its error.
        """
        if row.error is None and self.fmt is not None:
            try:
                messages = normalize_example(row.record, self.fmt)
            except ValueError as exc:
                row.error = str(exc)
        if row.error is not None or self.fmt is None:
            if not self.skip_invalid:
                raise _row_error(self.source, row)
            return {MESSAGES: [], POFT_ID: "", _ERROR_COLUMN: row.error}
        poft_id = conversation_id(messages)
        if not self.replace_poft_id:
            _check_poft_id(self.source, row, row.record.get(POFT_ID), poft_id)
        return {MESSAGES: messages, POFT_ID: poft_id, _ERROR_COLUMN: ""}


def _convert_rows(
    rows: list[Row],
    source: str,
    skip_invalid: bool,
    invalid_report: str | os.PathLike | None,
    replace_poft_id: bool = False,
) -> tuple[datasets.Dataset, str | None]:
    """Convert rows read from a file, in memory."""
    readable = [row.record for row in rows if row.record is not None]
    columns = column_union(readable)
    fmt = _detect(source, columns) if readable else None
    conversion = _Conversion(source, fmt, skip_invalid, replace_poft_id)
    converted = [(row, conversion.row(row)) for row in rows]
    _handle_invalid([row for row, c in converted if c[_ERROR_COLUMN]], len(rows), source, invalid_report)
    good = [(row, c) for row, c in converted if not c[_ERROR_COLUMN]]
    data = {MESSAGES: [c[MESSAGES] for _, c in good], POFT_ID: [c[POFT_ID] for _, c in good]}
    data |= {c: [row.record.get(c) for row, _ in good] for c in _extra_columns(fmt, columns)}
    try:
        return datasets.Dataset.from_dict(data), fmt
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(
            f"{source}: extra columns hold values that do not fit one type ({exc}). "
            "Give each column one type in every row, or remove the column."
        ) from None


def _convert_dataset(
    dataset: datasets.Dataset,
    source: str,
    skip_invalid: bool,
    invalid_report: str | os.PathLike | None,
    replace_poft_id: bool = False,
) -> tuple[datasets.Dataset, str]:
    """Convert a ``datasets`` dataset with ``map``, so large saved or Hub data need not pass through Python lists."""
    if len(dataset) == 0:
        raise DataError(f"{source}: the dataset is empty, so there is nothing to train on. Add conversations to it.")
    fmt = _detect(source, dataset.column_names)
    extras = _extra_columns(fmt, dataset.column_names)
    features = datasets.Features(
        {
            MESSAGES: MESSAGES_FEATURE,
            POFT_ID: datasets.Value("string"),
            **{c: dataset.features[c] for c in extras},
            _ERROR_COLUMN: datasets.Value("string"),
        }
    )
    conversion = _Conversion(source, fmt, skip_invalid, replace_poft_id)
    converted = dataset.map(
        lambda example, index: conversion.row(Row("row", index + 1, example)),
        with_indices=True,
        remove_columns=[c for c in dataset.column_names if c not in extras],
        features=features,
        keep_in_memory=True,  # never write cache files into the user's data directory
        desc="Normalising conversations",
    )
    errors = list(converted[_ERROR_COLUMN])
    bad = [Row("row", i, dataset[i - 1], error) for i, error in enumerate(errors, start=1) if error]
    _handle_invalid(bad, len(errors), source, invalid_report)
    if bad:
        converted = converted.select([i for i, error in enumerate(errors) if not error])
    return converted.select_columns([MESSAGES, POFT_ID, *extras]), fmt


def _handle_invalid(bad: list[Row], total: int, source: str, invalid_report: str | os.PathLike | None) -> None:
    """Report skipped rows, and refuse to go on when none are left."""
    if not bad:
        return
    first = f"{bad[0].where}: {bad[0].error}"
    if len(bad) == total:  # nothing would be written, so neither is a report
        raise DataError(
            f"{source}: all {total} rows are invalid, so there is nothing to train on (first: {first}). "
            "Fix the data, or check that this is the right file."
        )
    if invalid_report is not None:
        _write_report(bad, Path(invalid_report).expanduser())
        details = f"report written to {os.fspath(invalid_report)}"
    else:
        details = "no report written (pass invalid_report to list them all)"
    logger.warning("Skipped %d of %d rows of %s as invalid (first: %s); %s", len(bad), total, source, first, details)


def _write_report(bad: list[Row], report: Path) -> None:
    """One JSON line per skipped row: where it was, what is wrong, and the row itself (its text if unreadable)."""
    report.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {row.kind: row.number, "error": row.error, "record": row.record if row.record is not None else row.raw},
            ensure_ascii=False,
            default=str,  # dates, bytes and the like from Parquet or Arrow
        )
        for row in bad
    ]
    atomic_write_text(report, "".join(line + "\n" for line in lines))
