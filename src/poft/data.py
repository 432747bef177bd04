"""Load supervised fine-tuning data from the formats people have, in one shape.

Every source (JSONL, JSON, Parquet or CSV files, ``save_to_disk`` directories,
Hub datasets) and every layout (chat ``messages``, ShareGPT ``conversations``,
``prompt``/``completion``, Alpaca, Dolly) becomes a ``messages`` column of
``{"role", "content"}`` turns plus ``poft_id``, a hash of the conversation's
content, so later stages (reference scoring, caches, reports) can join rows
across runs without trusting row order. A bad row is reported with the file and
the line or row a person has to fix, or skipped into a report on request.

Content given as a list of parts (the OpenAI / multimodal shape ``[{"type": "text", "text": ...}]``) is
joined into one string when every part is text; chat templates that expect parts get them back from
`poft.chat`. A ``messages`` or ``conversations`` cell holding a JSON string (a chat dataset saved as CSV)
is parsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from poft.errors import DataError
from poft.outputs import atomic_write_text

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
# Columns that identify each format, in detection priority order.
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
}
# Columns each format turns into `messages`; they are not carried into the output.
SOURCE_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output", "system"),
    "dolly": ("instruction", "context", "response"),
}
ACCEPTED_FORMATS = (
    "messages (column 'messages'), sharegpt ('conversations'), "
    "prompt_completion ('prompt' + 'completion'), "
    "alpaca ('instruction' + 'output', optional 'input' and 'system'), "
    "dolly ('instruction' + 'response', optional 'context')"
)
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SKIP_HINT = "Fix the row, or pass --skip-invalid to skip bad rows and write them to a report."
MESSAGES_FEATURE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_ERROR_COLUMN = "__poft_error__"


@dataclass
class Row:
    """One input row (or why it could not be read), located the way the user will look for it."""

    kind: str  # "line" for JSONL, where blank lines count; "row" otherwise
    number: int  # 1-based
    record: dict[str, Any] | None = None
    error: str | None = None
    raw: str | None = None  # the text of a line that is not a JSON object, for the invalid-rows report

    @property
    def where(self) -> str:
        return f"{self.kind} {self.number}"


# --------------------------------------------------------------------------- public API


def load_sft_dataset(
    source: str | os.PathLike,
    *,
    split: str = "train",
    skip_invalid: bool = False,
    invalid_report: str | os.PathLike | None = None,
    replace_poft_id: bool = False,
) -> datasets.Dataset:
    """Load ``source`` (see `open_source`) as a dataset of normalised conversations (``messages``, ``poft_id``,
    extra columns).

    A ``poft_id`` column in the source that is not poft's content hash is someone else's id: refused
    (``DataError``) unless ``replace_poft_id``, rather than silently replaced.
    """
    source = os.fspath(source)
    loaded = open_source(source, split)
    if isinstance(loaded, list):
        dataset, fmt = _convert_rows(loaded, source, skip_invalid, invalid_report, replace_poft_id)
    else:
        dataset, fmt = _convert_dataset(loaded, source, skip_invalid, invalid_report, replace_poft_id)
    logger.info("Loaded %d conversations from %s (format: %s)", len(dataset), source, fmt)
    return dataset


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
    if looks_like_path(source):
        raise DataError(f"{source}: file not found. Check the path (relative paths start from {os.getcwd()}).")
    return load_hub(source, split)


def detect_format(column_names: Iterable[str]) -> str:
    """Name the data format implied by ``column_names``; formats are tried in priority order."""
    columns = list(column_names)
    fmt = _match_format(columns)
    if fmt is None:
        raise DataError(
            f"unknown data format: no recognised columns (found: {', '.join(columns) or 'none'}). "
            f"Accepted formats: {ACCEPTED_FORMATS}. Rename your columns to match one of them."
        )
    return fmt


def normalize_example(example: dict, fmt: str) -> list[dict]:
    """Turn one row of format ``fmt`` into validated ``{"role", "content"}`` turns.

    Raises ``ValueError`` saying what is wrong; callers add the file and row.
    """
    try:
        to_turns = _TO_TURNS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r} (expected one of: {', '.join(_TO_TURNS)})") from None
    return _validate(to_turns(example))


def conversation_id(messages: Sequence[dict]) -> str:
    """Stable id of a conversation's content: the same turns give the same id whatever else a row holds."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    payload = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- formats


def _match_format(columns: Iterable[str]) -> str | None:
    present = set(columns)
    return next((fmt for fmt, needed in FORMAT_COLUMNS.items() if present.issuperset(needed)), None)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _turn_list(example: dict, key: str) -> list:
    value = example.get(key)
    if value is None:
        raise ValueError(f"missing '{key}'")
    if isinstance(value, str):  # a chat dataset saved as CSV holds each conversation as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"'{key}' is text but not a JSON list of turns ({exc.msg} at column {exc.colno})"
            ) from None
    if not isinstance(value, list):
        raise ValueError(f"'{key}' must be a list of turns, found {type_name(value)}")
    return value


def _from_messages(example: dict) -> list:
    return _turn_list(example, "messages")


def _from_sharegpt(example: dict) -> list[dict]:
    return [_sharegpt_turn(turn, i) for i, turn in enumerate(_turn_list(example, "conversations"), start=1)]


def _sharegpt_turn(turn: Any, index: int) -> dict:
    if not isinstance(turn, dict):
        raise ValueError(f"turn {index} is not an object (found {type_name(turn)})")
    speaker = turn.get("from")
    role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise ValueError(
            f"unknown speaker {speaker!r} in turn {index} (allowed 'from' values: {', '.join(SHAREGPT_ROLES)})"
        )
    return {"role": role, "content": turn.get("value")}


def _from_prompt_completion(example: dict) -> list:
    return _as_turns(example, "prompt", "user") + _as_turns(example, "completion", "assistant")


def _as_turns(example: dict, key: str, role: str) -> list:
    value = example.get(key)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise ValueError(f"'{key}' must be a string or a list of messages, found {type_name(value)}")


def _from_alpaca(example: dict) -> list[dict]:
    user = _text(example, "instruction", required=True)
    extra = _text(example, "input")
    if extra.strip():
        user += "\n\n" + extra
    system = _text(example, "system")
    turns = [{"role": "system", "content": system}] if system.strip() else []
    return turns + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(example, "output", required=True)},
    ]


def _from_dolly(example: dict) -> list[dict]:
    """databricks-dolly-15k: the optional reference text follows the instruction, as Alpaca's input does."""
    user = _text(example, "instruction", required=True)
    context = _text(example, "context")
    if context.strip():
        user += "\n\n" + context
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(example, "response", required=True)},
    ]


def _text(example: dict, key: str, *, required: bool = False) -> str:
    """A string field; optional ones may be missing or null (CSV leaves empty cells null)."""
    value = example.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, found {type_name(value)}")
    if required and not value.strip():
        raise ValueError(f"'{key}' is empty")
    return value


_TO_TURNS: dict[str, Callable[[dict], list]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "prompt_completion": _from_prompt_completion,
    "alpaca": _from_alpaca,
    "dolly": _from_dolly,
}


def _validate(turns: list) -> list[dict]:
    clean = [clean_turn(turn, i) for i, turn in enumerate(turns, start=1)]
    roles = [turn["role"] for turn in clean]
    if "assistant" not in roles:
        raise ValueError("no assistant turn (a conversation needs at least one assistant reply to learn from)")
    if not set(roles) - {"system", "assistant"}:
        # PoFT scores a response given its prompt, and chat templates often refuse a conversation without a user
        # turn, so such a row is rejected here, where its row number is known
        raise ValueError("only assistant turns, no user turn (a response needs the prompt it answers)")
    return clean


def clean_turn(turn: Any, index: int) -> dict:
    """Check one turn (``index`` is 1-based) and keep only role and content."""
    if not isinstance(turn, dict):
        raise ValueError(f"turn {index} is not an object with role and content (found {type_name(turn)})")
    role, content = turn.get("role"), turn.get("content")
    if not isinstance(role, str):
        raise ValueError(f"turn {index} has no string 'role' (found {type_name(role)})")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} in turn {index} (allowed: {', '.join(ROLES)})")
    if turn.get("tool_calls"):
        raise ValueError(
            f"turn {index} is an assistant tool call ('tool_calls'), which poft cannot score as a text response; "
            "remove tool-call turns and their tool results, or write the call as text in 'content'"
        )
    if isinstance(content, list):
        content = _join_text_parts(content, index)
    if not isinstance(content, str):
        raise ValueError(f"non-string content in turn {index} (found {type_name(content)}); content must be text")
    if not content.strip():
        raise ValueError(f"empty content in turn {index}")
    return {"role": role, "content": content}


def _join_text_parts(parts: list, index: int) -> str:
    """The text of OpenAI-style content parts; any other part (an image, audio) is an error, since poft scores text."""
    texts = []
    for number, part in enumerate(parts, start=1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            found = f"type {kind!r}" if isinstance(part, dict) else type_name(part)
            raise ValueError(
                f"content part {number} of turn {index} is not text ({found}); poft scores text only: "
                'keep only {"type": "text", "text": ...} parts, or drop the row'
            )
        texts.append(part["text"])
    return "".join(texts)


# --------------------------------------------------------------------------- reading files


def looks_like_path(source: str) -> bool:
    return source.startswith(("./", "../", "/", "~")) or Path(source).suffix.lower() in FILE_SUFFIXES


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
        if _match_format(data) is not None:
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
    try:
        # Only empty cells are missing; text such as "NA" or "None" is content.
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        return []
    except pd.errors.ParserError as exc:
        raise DataError(f"{source}: could not parse the CSV file ({exc}). Fix its quoting or column counts.") from None
    frame = frame.astype(object).where(frame.notna(), None)
    return [Row("row", n, record) for n, record in enumerate(frame.to_dict("records"), start=1)]


_READERS: dict[str, Callable[[Path, str], list[Row]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


# --------------------------------------------------------------------------- datasets sources


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


# --------------------------------------------------------------------------- conversion


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
    return [c for c in columns if c not in SOURCE_COLUMNS[fmt] and c != "poft_id"]


def column_union(records: Iterable[dict]) -> list[str]:
    """All keys in first-seen order: JSONL rows need not share one set of keys."""
    return list(dict.fromkeys(key for record in records for key in record))


def _normalize_row(row: Row, fmt: str | None) -> list[dict] | None:
    """Normalise a read row, or record on it why it is bad (``fmt`` is None only when no row was readable)."""
    if row.error is None and fmt is not None:
        try:
            return normalize_example(row.record, fmt)
        except ValueError as exc:
            row.error = str(exc)
    return None


def _convert_rows(
    rows: list[Row],
    source: str,
    skip_invalid: bool,
    invalid_report: str | os.PathLike | None,
    replace_poft_id: bool = False,
) -> tuple[datasets.Dataset, str | None]:
    """Normalise rows read from a file, in memory, stopping at the first bad row unless skipping."""
    readable = [row.record for row in rows if row.record is not None]
    columns = column_union(readable)
    fmt = _detect(source, columns) if readable else None
    good: list[tuple[Row, list[dict]]] = []
    bad: list[Row] = []
    for row in rows:
        messages = _normalize_row(row, fmt)
        if messages is not None:
            good.append((row, messages))
        elif skip_invalid:
            bad.append(row)
        else:
            raise _row_error(source, row)
    _handle_invalid(bad, len(rows), source, invalid_report)
    ids = [conversation_id(m) for _, m in good]
    if not replace_poft_id:
        for (row, _), poft_id in zip(good, ids, strict=True):
            _check_poft_id(source, row, row.record.get("poft_id"), poft_id)
    data = {"messages": [m for _, m in good], "poft_id": ids}
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
    """Normalise a ``datasets`` dataset with ``map`` so large saved or Hub data need not pass through Python lists."""
    if len(dataset) == 0:
        raise DataError(f"{source}: the dataset is empty, so there is nothing to train on. Add conversations to it.")
    fmt = _detect(source, dataset.column_names)
    extras = _extra_columns(fmt, dataset.column_names)
    features = datasets.Features(
        {
            "messages": MESSAGES_FEATURE,
            "poft_id": datasets.Value("string"),
            **{c: dataset.features[c] for c in extras},
            _ERROR_COLUMN: datasets.Value("string"),
        }
    )

    def convert(example: dict, index: int) -> dict:
        row = Row("row", index + 1, example)
        messages = _normalize_row(row, fmt)
        if messages is None and not skip_invalid:
            raise _row_error(source, row)
        poft_id = conversation_id(messages) if messages else ""
        if messages and not replace_poft_id:
            _check_poft_id(source, row, example.get("poft_id"), poft_id)
        return {
            "messages": messages or [],
            "poft_id": poft_id,
            _ERROR_COLUMN: row.error or "",
        }

    converted = dataset.map(
        convert,
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
    return converted.select_columns(["messages", "poft_id", *extras]), fmt


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


@dataclass
class StageIO:
    """Where a dataset stage (`poft score`, `filter`, `noise`) reads and writes, and what it may replace."""

    data: str | None = field(
        default=None,
        metadata={"help": "SFT data: a JSONL/JSON/Parquet/CSV file, a saved dataset directory or a hub id."},
    )
    split: str = field(default="train", metadata={"help": "Split to read from a dataset directory or hub dataset."})
    output: str | None = field(
        default=None, metadata={"help": "Directory for the output dataset (loadable with datasets.load_from_disk)."}
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Skip invalid data rows, writing them to OUTPUT/invalid_rows.jsonl, instead of stopping."},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace a previous poft output at --output (even the input itself, atomically), and input "
            "columns poft computes (poft_id, ref_score, score_<name>, poft_filters, ifd, poft_noise) that poft "
            "did not write."
        },
    )

    def load_input(self, output_tmp: Path | None = None) -> datasets.Dataset:
        """The input rows; with --skip_invalid, bad rows go to `invalid_rows.jsonl` in the output being written."""
        report = output_tmp / "invalid_rows.jsonl" if self.skip_invalid and output_tmp is not None else None
        return load_sft_dataset(
            self.data,
            split=self.split,
            skip_invalid=self.skip_invalid,
            invalid_report=report,
            replace_poft_id=self.overwrite,
        )
