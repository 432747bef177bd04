"""Tests for poft.data (with poft.sources and poft.formats): every input format and file kind, ids, and the errors users see."""

import hashlib
import json
import logging
import re

import datasets
import pandas as pd
import pytest

from poft.data import load_sft_dataset
from poft.errors import DataError
from poft.formats import detect_format, normalize_example
from poft.schema import conversation_id

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
ALPACA = [
    {"instruction": "Add 2 and 3", "input": "", "output": "5", "category": "math", "ref_score": 0.5},
    {"instruction": "Translate", "input": "chat", "output": "cat", "category": "fr", "ref_score": 1.5},
    {"instruction": "Say N/A", "input": "", "output": "N/A", "category": "misc", "ref_score": 2.5},
]
ALPACA_MESSAGES = [
    [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}],
    [{"role": "user", "content": "Say N/A"}, {"role": "assistant", "content": "N/A"}],
]


def write_jsonl(path, rows):
    """Rows may be dicts or raw text lines (for blank and broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def load_rows(tmp_path, rows, **kwargs):
    return load_sft_dataset(str(write_jsonl(tmp_path / "data.jsonl", rows)), **kwargs)


def test_messages_format_keeps_system_turns_and_only_role_content(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "bob"},
        {"role": "assistant", "content": "Hello!", "weight": 1},
    ]
    ds = load_rows(tmp_path, [{"messages": turns, "answer": "x"}])
    assert ds.column_names == ["messages", "poft_id", "answer"]
    assert ds[0]["messages"] == [{"role": t["role"], "content": t["content"]} for t in turns]
    assert ds[0]["answer"] == "x"


def test_sharegpt_format(tmp_path):
    convo = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q"},
        {"from": "function", "value": "T"},
        {"from": "gpt", "value": "A"},
    ]
    ds = load_rows(tmp_path, [{"conversations": convo, "category": "c"}])
    assert ds.column_names == ["messages", "poft_id", "category"]
    assert [(m["role"], m["content"]) for m in ds[0]["messages"]] == [
        ("system", "S"),
        ("user", "Q"),
        ("tool", "T"),
        ("assistant", "A"),
    ]


@pytest.mark.parametrize(
    "speaker, role",
    [
        ("human", "user"),
        ("user", "user"),
        ("gpt", "assistant"),
        ("assistant", "assistant"),
        ("chatgpt", "assistant"),
        ("bard", "assistant"),
        ("model", "assistant"),
        ("system", "system"),
        ("tool", "tool"),
        ("function", "tool"),
        ("observation", "tool"),
    ],
)
def test_sharegpt_speaker_mapping(speaker, role):
    convo = [{"from": "human", "value": "q"}, {"from": speaker, "value": "x"}, {"from": "gpt", "value": "y"}]
    assert normalize_example({"conversations": convo}, "sharegpt")[1]["role"] == role


def test_prompt_completion_format(tmp_path):
    rows = [
        {"prompt": "Q1", "completion": "A1"},
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"}],
            "completion": [{"role": "assistant", "content": "A2"}],
        },
        {"prompt": "Q3", "completion": [{"role": "assistant", "content": "A3"}]},
    ]
    ds = load_rows(tmp_path, rows)
    assert ds.column_names == ["messages", "poft_id"]
    assert ds["messages"][0] == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    assert [m["role"] for m in ds["messages"][1]] == ["system", "user", "assistant"]
    assert ds["messages"][2] == [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}]


def test_alpaca_format_with_optional_input_and_system(tmp_path):
    rows = [
        {"instruction": "I1", "input": "ctx", "output": "O1", "system": "Sys"},
        {"instruction": "I2", "output": "O2", "system": ""},
    ]
    ds = load_rows(tmp_path, rows)
    assert ds.column_names == ["messages", "poft_id"]
    assert ds["messages"][0] == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "I1\n\nctx"},
        {"role": "assistant", "content": "O1"},
    ]
    assert ds["messages"][1] == [{"role": "user", "content": "I2"}, {"role": "assistant", "content": "O2"}]


def test_dolly_format_with_optional_context(tmp_path):
    rows = [
        {
            "instruction": "Who wrote it?",
            "context": "Dune is a novel by Frank Herbert.",
            "response": "Frank Herbert.",
            "category": "closed_qa",
        },
        {"instruction": "Name a fruit.", "context": "", "response": "A pear.", "category": "brainstorming"},
    ]
    ds = load_rows(tmp_path, rows)
    assert ds.column_names == ["messages", "poft_id", "category"]
    assert ds["messages"] == [
        [
            {"role": "user", "content": "Who wrote it?\n\nDune is a novel by Frank Herbert."},
            {"role": "assistant", "content": "Frank Herbert."},
        ],
        [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}],
    ]
    assert detect_format(["instruction", "context", "response", "category"]) == "dolly"


def test_chat_csv_with_messages_as_json_text(tmp_path):
    path = tmp_path / "chats.csv"
    conversations = [CHAT, [{"role": "system", "content": 'Be brief, "please".'}, *CHAT]]
    pd.DataFrame({"messages": [json.dumps(c) for c in conversations], "source": ["a", "b"]}).to_csv(path, index=False)
    ds = load_sft_dataset(str(path))
    assert ds["messages"] == conversations and ds["source"] == ["a", "b"]
    assert ds["poft_id"] == [conversation_id(c) for c in conversations]


def test_text_parts_are_joined_into_the_content(tmp_path):
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there!"}]},
    ]
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]
    assert load_rows(tmp_path, [{"messages": turns}])["messages"] == [expected]
    datasets.Dataset.from_list([{"messages": turns}]).save_to_disk(str(tmp_path / "saved"))
    saved = load_sft_dataset(str(tmp_path / "saved"))  # Arrow adds the missing keys to every part
    assert saved["messages"] == [expected] and saved["poft_id"] == [conversation_id(expected)]


def test_extra_columns_kept_and_source_columns_dropped(tmp_path):
    ds = load_rows(tmp_path, [dict(r, poft_noise=0.1) for r in ALPACA])
    assert ds.column_names == ["messages", "poft_id", "category", "ref_score", "poft_noise"]
    assert ds["messages"] == ALPACA_MESSAGES
    assert ds["category"] == ["math", "fr", "misc"] and ds["ref_score"] == [0.5, 1.5, 2.5]


@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"data": rows, "version": "1"}])
def test_json_list_and_wrapped_object(tmp_path, wrap):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(wrap(ALPACA)))
    ds = load_sft_dataset(str(path))
    assert ds["messages"] == ALPACA_MESSAGES and ds["category"] == ["math", "fr", "misc"]


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_parquet_and_csv(tmp_path, suffix):
    path = tmp_path / f"data.{suffix}"
    frame = pd.DataFrame(ALPACA)
    frame.to_parquet(path) if suffix == "parquet" else frame.to_csv(path, index=False)
    ds = load_sft_dataset(str(path))
    assert ds.column_names == ["messages", "poft_id", "category", "ref_score"]
    assert ds["messages"] == ALPACA_MESSAGES and ds["ref_score"] == [0.5, 1.5, 2.5]


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "single"))
    ds = load_sft_dataset(str(tmp_path / "single"))
    assert ds.column_names == ["messages", "poft_id", "category", "ref_score"]
    assert ds["messages"] == ALPACA_MESSAGES
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(ALPACA), test=datasets.Dataset.from_list([{"messages": CHAT}])
    ).save_to_disk(str(tmp_path / "dict"))
    assert load_sft_dataset(str(tmp_path / "dict"))["messages"] == ALPACA_MESSAGES
    assert load_sft_dataset(str(tmp_path / "dict"), split="test")["messages"] == [CHAT]
    with pytest.raises(DataError, match=r"no split 'validation' \(available: train, test\)"):
        load_sft_dataset(str(tmp_path / "dict"), split="validation")


def test_saved_dataset_bad_row_and_skip(tmp_path):
    rows = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "Q"}]}, {"messages": CHAT[::-1]}]
    src = str(tmp_path / "saved")
    datasets.Dataset.from_list(rows).save_to_disk(src)
    with pytest.raises(DataError, match=rf"^{re.escape(src)}: row 2: no assistant turn"):
        load_sft_dataset(src)
    report = tmp_path / "bad.jsonl"
    ds = load_sft_dataset(src, skip_invalid=True, invalid_report=report)
    assert ds["messages"] == [CHAT, CHAT[::-1]]
    assert [json.loads(line)["row"] for line in report.read_text().splitlines()] == [2]


def test_poft_id_is_a_content_hash(tmp_path):
    plain = {"messages": CHAT, "poft_id": "stale"}
    reordered = {"other": 1, "messages": [{"content": m["content"], "role": m["role"], "x": 0} for m in CHAT]}
    changed = {"messages": [CHAT[0], {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(DataError, match=r"data.jsonl: line 1: the column 'poft_id' holds 'stale', not poft's id"):
        load_rows(tmp_path, [plain, reordered, changed])
    ids = load_rows(tmp_path, [plain, reordered, changed], replace_poft_id=True)["poft_id"]
    assert load_rows(tmp_path, [{**plain, "poft_id": ids[0]}])["poft_id"] == [ids[0]]  # poft's own id is kept
    canonical = json.dumps(CHAT, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert ids[0] == ids[1] == conversation_id(CHAT) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert ids[2] != ids[0] and len(ids[2]) == 16
    assert conversation_id([{"role": "user", "content": "é"}]) != conversation_id([{"role": "user", "content": "e"}])


BAD_LINES = {
    "unknown role": (
        {"messages": [CHAT[0], {"role": "bot", "content": "x"}]},
        "unknown role 'bot' in turn 2 (allowed: system, user, assistant, tool)",
    ),
    "no assistant": ({"messages": [CHAT[0]]}, "no assistant turn"),
    "empty content": ({"messages": [CHAT[0], {"role": "assistant", "content": "  "}]}, "empty content in turn 2"),
    "non-string content": (
        {"messages": [CHAT[0], {"role": "assistant", "content": 5}]},
        "non-string content in turn 2 (found int)",
    ),
    "image part": (
        {"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, CHAT[1]]},
        "content part 1 of turn 1 is not text (type 'image'); poft scores text only",
    ),
    "part that is not an object": (
        {"messages": [CHAT[0], {"role": "assistant", "content": ["x"]}]},
        "content part 1 of turn 2 is not text (str)",
    ),
    "tool call": (
        {"messages": [CHAT[0], {"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}]},
        "turn 2 is an assistant tool call ('tool_calls')",
    ),
    "messages text that is not JSON": ({"messages": "[{'role': 'user'"}, "'messages' is text but not a JSON list"),
    "unreadable json": ('{"messages": [', "unreadable JSON"),
    "not an object": ("[1, 2]", "not a JSON object (found list)"),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_bad_jsonl_line_names_file_line_and_problem(tmp_path, name):
    bad, problem = BAD_LINES[name]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}, "", bad, {"messages": CHAT}])
    with pytest.raises(DataError) as info:
        load_sft_dataset(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: line 3: ")
    assert problem in message and "--skip-invalid" in message


@pytest.mark.parametrize("suffix", ["json", "parquet", "csv"])
def test_bad_row_in_other_files_uses_row_number(tmp_path, suffix):
    rows = [dict(r) for r in ALPACA]
    rows[1]["output"] = ""
    path = tmp_path / f"data.{suffix}"
    frame = pd.DataFrame(rows)
    {
        "json": lambda: path.write_text(json.dumps(rows)),
        "parquet": lambda: frame.to_parquet(path),
        "csv": lambda: frame.to_csv(path, index=False),
    }[suffix]()
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: row 2: '?output'? (is empty|must be a string)"):
        load_sft_dataset(str(path))


def test_json_list_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"messages": CHAT}, "oops"]))
    with pytest.raises(DataError, match=r"data.json: row 2: not a JSON object \(found str\)"):
        load_sft_dataset(str(path))


def test_unknown_format_lists_accepted_formats(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError) as info:
        load_sft_dataset(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: unknown data format") and "found: text" in message
    for needed in ("'messages'", "'conversations'", "'prompt' + 'completion'", "'instruction' + 'output'"):
        assert needed in message
    with pytest.raises(DataError, match="unknown data format"):
        detect_format(["prompt"])
    assert detect_format(["prompt", "completion", "messages"]) == "messages"


def test_missing_file_never_calls_the_hub(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub called"))
    with pytest.raises(DataError, match=r"^\./nope/missing\.jsonl: file not found"):
        load_sft_dataset("./nope/missing.jsonl")


def test_hub_failure_is_wrapped(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match=r"^someone/some-data: does not exist locally.*offline"):
        load_sft_dataset("someone/some-data")


@pytest.mark.parametrize("name, text", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", ""), ("e.jsonl", "")])
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: the file is empty"):
        load_sft_dataset(str(path))


def test_skip_invalid_drops_bad_rows_and_writes_report(tmp_path, caplog):
    good = [{"messages": [CHAT[0], {"role": "assistant", "content": f"A{i}"}], "i": i} for i in range(3)]
    lines = [good[0], {"messages": [CHAT[0]], "i": 9}, "", good[1], "not json", good[2]]
    report = tmp_path / "reports" / "bad.jsonl"
    with caplog.at_level(logging.INFO, logger="poft.data"):
        ds = load_rows(tmp_path, lines, skip_invalid=True, invalid_report=str(report))
    assert ds["i"] == [0, 1, 2]
    assert [m[1]["content"] for m in ds["messages"]] == ["A0", "A1", "A2"]
    entries = [json.loads(line) for line in report.read_text().splitlines()]
    assert [e["line"] for e in entries] == [2, 5]
    assert "no assistant turn" in entries[0]["error"] and "unreadable JSON" in entries[1]["error"]
    assert entries[0]["record"] == lines[1] and entries[1]["record"] == "not json"  # the bad row itself
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "Skipped 2 of 5 rows" in warning and str(report) in warning
    assert any(
        r.getMessage() == f"Loaded 3 conversations from {tmp_path / 'data.jsonl'} (format: messages)"
        for r in caplog.records
    )


def test_a_csv_with_rows_that_are_not_utf8(tmp_path):
    """Two rows of a CSV hold Latin-1 bytes: without --skip-invalid the error names the file, the first of them and
    the fix; with it, the other rows load as the same rows in a clean file do (columns typed alike), and the report
    lists the two by row number."""
    rows = [
        {"instruction": f"Say {word}", "output": word, "score": score}
        for word, score in [("hi", 1.5), ("café", 2), ("multi\nline", 3), ("naïve", 4), ("ok", 5)]
    ]
    path, clean = tmp_path / "data.csv", tmp_path / "clean.csv"
    pd.DataFrame(rows).to_csv(path, index=False, encoding="latin-1")
    pd.DataFrame([r for r in rows if r["output"].isascii()]).to_csv(clean, index=False)
    with pytest.raises(DataError) as raised:
        load_sft_dataset(str(path))
    assert str(raised.value) == (
        f"{path}: row 2: not valid UTF-8 in column 'instruction' (re-save the file as UTF-8). Fix the row, or pass "
        "--skip-invalid to skip bad rows and write them to a report."
    )
    report = tmp_path / "bad.jsonl"
    assert load_sft_dataset(str(path), skip_invalid=True, invalid_report=report).to_list() == (
        load_sft_dataset(str(clean)).to_list()
    )
    entries = [json.loads(line) for line in report.read_text().splitlines()]
    assert [e["row"] for e in entries] == [2, 4]
    assert entries[0]["record"] == {"instruction": "Say caf\ufffd", "output": "caf\ufffd", "score": "2.0"}


def test_skip_invalid_with_every_row_bad_still_raises(tmp_path):
    report = tmp_path / "bad.jsonl"
    with pytest.raises(DataError, match=r"all 2 rows are invalid, so there is nothing to train on \(first: line 1: "):
        load_rows(tmp_path, ["{", {"messages": [CHAT[0]]}], skip_invalid=True, invalid_report=report)
    assert not report.exists()  # no output is written, so no report beside it


def test_assistant_only_rows_are_rejected_at_load_with_their_line(tmp_path):
    only_assistant = {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}
    with pytest.raises(DataError, match=r"data.jsonl: line 2: only assistant turns, no user turn"):
        load_rows(tmp_path, [{"messages": CHAT}, only_assistant])
    report = tmp_path / "bad.jsonl"
    assert load_rows(tmp_path, [{"messages": CHAT}, only_assistant], skip_invalid=True, invalid_report=report)[
        "messages"
    ] == [CHAT]
    assert json.loads(report.read_text())["record"] == only_assistant


def test_a_file_and_the_same_rows_saved_as_a_dataset_convert_alike(tmp_path):
    """Both inputs go through one per-row conversion: same rows, ids, extra columns, errors and skip report."""
    rows = [
        {"messages": CHAT, "topic": "greeting"},
        {"messages": [{"role": "user", "content": "Hi"}], "topic": "no reply"},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "topic": "math"},
    ]
    file = str(write_jsonl(tmp_path / "data.jsonl", rows))
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_list(rows).save_to_disk(saved)
    errors = []
    for source in (file, saved):
        with pytest.raises(DataError) as raised:
            load_sft_dataset(source)
        errors.append(str(raised.value).removeprefix(source))
    assert errors[0].replace("line 2", "row 2") == errors[1]
    loaded = []
    for source, report in ((file, tmp_path / "file.jsonl"), (saved, tmp_path / "saved.jsonl")):
        loaded.append(load_sft_dataset(source, skip_invalid=True, invalid_report=report).to_list())
    assert loaded[0] == loaded[1] and [r["topic"] for r in loaded[0]] == ["greeting", "math"]
    reports = [json.loads((tmp_path / name).read_text()) for name in ("file.jsonl", "saved.jsonl")]
    assert reports[0]["error"] == reports[1]["error"] and reports[0]["line"] == reports[1]["row"] == 2
