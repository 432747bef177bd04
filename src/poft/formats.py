"""Rows of the common SFT layouts as one conversation shape: validated ``{"role", "content"}`` turns.

Chat ``messages``, ShareGPT ``conversations``, ``prompt``/``completion``, Alpaca and Dolly rows become
``messages``; `poft.schema.conversation_id` hashes a conversation's content, so later stages (reference
scoring, caches, reports) can join rows across runs without trusting row order. Content given as a list of parts
(the OpenAI / multimodal shape ``[{"type": "text", "text": ...}]``) is joined into one string when every
part is text; chat templates that expect parts get them back from `poft.chat`. A ``messages`` or
``conversations`` cell holding a JSON string (a chat dataset saved as CSV) is parsed. Errors are
``ValueError``s saying what is wrong with the row; the caller, who knows the file and row, adds them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import datasets

from poft.errors import DataError

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
MESSAGES_FEATURE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


def detect_format(column_names: Iterable[str]) -> str:
    """Name the data format implied by ``column_names``; formats are tried in priority order."""
    columns = list(column_names)
    fmt = match_format(columns)
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


def match_format(columns: Iterable[str]) -> str | None:
    """The first format whose identifying columns are all present, or None."""
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
