"""Reading SFT or preference data from where people keep it into rows located the way a person will look for them.

Local files (JSONL, JSON, Parquet, CSV) are read into `Row`s that carry their line or row number (and why
a line could not be read), so every later error names the place to fix; ``save_to_disk`` directories and
Hub datasets are opened as ``datasets`` datasets, so large data need not pass through Python lists. What
the rows mean (`poft.formats`, `poft.dpo`) is not this module's business.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from poft.errors import DataError
from poft.formats import match_format, type_name
from poft.validation import looks_local

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Row:
    """One input row (or why it could not be read), located the way the user will look for it."""

    kind: str  # "line" for JSONL, where blank lines count; "row" otherwise
    number: int  # 1-based
    record: dict[str, Any] | None = None
    error: str | None = None
    # what could be read of a row that is no record, for the invalid-rows report: the text of a line that is not a
    # JSON object, or a CSV row's cells with the bytes that are not UTF-8 shown as U+FFFD
    raw: str | dict[str, Any] | None = None

    @property
    def where(self) -> str:
        return f"{self.kind} {self.number}"


def open_source(source: str, split: str) -> list[Row] | datasets.Dataset:
    """The rows of a local file (located by line or row), or the dataset of a saved directory or hub id.

    Local paths win over Hub ids; a source that looks like a path but does not exist is an
    error rather than a Hub lookup, so a typo never turns into a confusing network failure.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return load_saved(path, source, split)
    if path.is_file():
        return read_file(path, source)
    if looks_local(source, FILE_SUFFIXES):
        raise DataError(f"{source}: file not found. Check the path (relative paths start from {os.getcwd()}).")
    return load_hub(source, split)


def column_union(records: Iterable[dict]) -> list[str]:
    """All keys in first-seen order: JSONL rows need not share one set of keys."""
    return list(dict.fromkeys(key for record in records for key in record))


def read_file(path: Path, source: str) -> list[Row]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{source}: unsupported file type '{path.suffix}' (supported: {', '.join(FILE_SUFFIXES)}). "
            "Convert the file, or save the data with datasets' save_to_disk."
        )
    try:
        rows = reader(path, source)
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text ({exc}). Re-save the file as UTF-8.") from None
    if not rows:
        raise DataError(f"{source}: the file is empty, so there is nothing to train on. Add conversations to it.")
    return rows


def _read_jsonl(path: Path, source: str) -> list[Row]:
    """Read line by line, so every problem has an exact line number (blank lines count, but hold no row)."""
    with path.open("rb") as lines:
        return [_parse_jsonl_line(raw, n) for n, raw in enumerate(lines, start=1) if raw.strip()]


def _parse_jsonl_line(raw: bytes, number: int) -> Row:
    try:
        record = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return Row("line", number, error="not valid UTF-8", raw=raw.decode("utf-8", "replace").rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        text = raw.decode("utf-8-sig").rstrip("\r\n")
        return Row("line", number, error=f"unreadable JSON ({exc.msg} at column {exc.colno})", raw=text)
    if not isinstance(record, dict):
        return Row("line", number, error=f"not a JSON object (found {type_name(record)})", raw=json.dumps(record))
    return Row("line", number, record)


def _read_json(path: Path, source: str) -> list[Row]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: JSON Lines saved as .json
            return _read_jsonl(path, source)
        raise DataError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}). "
            "Fix the file so it holds a list of records, or write one object per line to a .jsonl file."
        ) from None
    return [_json_row(n, record) for n, record in enumerate(_json_records(data, source), start=1)]


def _json_row(number: int, record: Any) -> Row:
    if not isinstance(record, dict):
        return Row("row", number, error=f"not a JSON object (found {type_name(record)})")
    return Row("row", number, record)


def _json_records(data: Any, source: str) -> list:
    """The records of a JSON document: a list, one conversation object, or an object wrapping one list."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if match_format(data) is not None:
            return [data]
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
        found = f"an object with {len(lists)} list values"
    else:
        found = type_name(data)
    raise DataError(
        f"{source}: expected a list of records, or an object with exactly one list value "
        f'such as {{"data": [...]}}; found {found}. Reshape the file into one of those.'
    )


def _read_parquet(path: Path, source: str) -> list[Row]:
    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{source}: could not read the Parquet file ({exc}). Check that it is valid Parquet."
        ) from None
    return [Row("row", n, record) for n, record in enumerate(records, start=1)]


def _read_csv(path: Path, source: str) -> list[Row]:
    """The rows of a CSV file, typed as pandas infers each column. A row holding bytes that are not UTF-8 is a bad
    row of its own (named, or skipped with `--skip-invalid`), not a reason to refuse the whole file."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return _read_csv_with_undecodable_rows(path, source)
    return _records(_parse_csv(path, source))


def _parse_csv(file: Path | io.StringIO, source: str, **options: Any) -> pd.DataFrame:
    try:
        # Only empty cells are missing; text such as "NA" or "None" is content.
        return pd.read_csv(file, keep_default_na=False, na_values=[""], **options)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except pd.errors.ParserError as exc:
        raise DataError(f"{source}: could not parse the CSV file ({exc}). Fix its quoting or column counts.") from None


def _records(frame: pd.DataFrame) -> list[Row]:
    frame = frame.astype(object).where(frame.notna(), None)
    return [Row("row", n, record) for n, record in enumerate(frame.to_dict("records"), start=1)]


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def _shown(text: str) -> str:
    """`text` with each byte that was not UTF-8 shown as U+FFFD, as a text editor shows it."""
    return _UNDECODABLE.sub("\ufffd", text)


def _read_csv_with_undecodable_rows(path: Path, source: str) -> list[Row]:
    """Read every cell as text, each byte that is not UTF-8 kept as a lone surrogate (Python's surrogateescape), so
    the rows holding one are known; the other rows are parsed again on their own, so their columns are typed as in a
    clean file."""
    cells = _parse_csv(path, source, dtype=object, encoding_errors="surrogateescape")
    for column in cells.columns:
        if _UNDECODABLE.search(str(column)):
            raise DataError(
                f"{source}: the header row is not valid UTF-8 (column {_shown(str(column))!r}). Re-save the file as "
                "UTF-8."
            )
    rows = _records(cells)
    bad = {}
    for row in rows:
        column = next((c for c, v in row.record.items() if isinstance(v, str) and _UNDECODABLE.search(v)), None)
        if column is not None:
            bad[row.number] = Row(
                "row",
                row.number,
                error=f"not valid UTF-8 in column {column!r} (re-save the file as UTF-8)",
                raw={c: _shown(v) if isinstance(v, str) else v for c, v in row.record.items()},
            )
    good = cells.drop(index=[n - 1 for n in bad])
    typed = iter(_records(_parse_csv(io.StringIO(good.to_csv(index=False)), source)) if len(good) else [])
    return [bad.get(row.number) or Row("row", row.number, next(typed).record) for row in rows]


_READERS: dict[str, Callable[[Path, str], list[Row]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def load_saved(path: Path, source: str, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{source}: directory is not a dataset saved with save_to_disk. "
            f"Point to a data file ({', '.join(FILE_SUFFIXES)}) or to a save_to_disk directory."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{source}: no split '{split}' (available: {', '.join(loaded)}). Pick one of those splits."
            )
        return loaded[split]
    return loaded


def load_hub(source: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # the Hub fails in many unrelated ways; each means "cannot use this source"
        raise DataError(
            f"{source}: does not exist locally, and could not be loaded as a Hugging Face Hub dataset "
            f"({type(exc).__name__}: {exc}). Check the path, or the hub id, the split and network access."
        ) from exc
