"""The noise recipes: rates, marking, determinism, nothing lost, prompts untouched."""

from __future__ import annotations

import json
import random

import pytest
from datasets import load_from_disk

from poft.cli import main
from poft.noise import add_noise, corrupt_characters, subtle_edit
from poft.schema import conversation_id
from tests.conftest import as_dataset, make_conversations, write_jsonl


@pytest.mark.parametrize("kind", ["paper", "subtle"])
@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_rate_marking_and_prompts(kind, rate):
    conversations = make_conversations(40, seed=5)
    dataset = as_dataset(conversations, keep=list(range(40)))
    noised = add_noise(dataset, rate, kind=kind, seed=1)
    assert len(noised) == 40 and noised["keep"] == list(range(40))
    assert sum(noised["poft_noise"]) == round(rate * 40)
    for original, new, marked in zip(conversations, noised["messages"], noised["poft_noise"], strict=False):
        assert [m["role"] for m in new] == [m["role"] for m in original]
        assert [m["content"] for m in new if m["role"] != "assistant"] == [
            m["content"] for m in original if m["role"] != "assistant"
        ]
        assert (new != original) == marked
    assert noised["poft_id"] == [conversation_id(m) for m in noised["messages"]]


def test_seeded_and_deterministic():
    dataset = as_dataset(make_conversations(30, seed=6))
    first, again = add_noise(dataset, 0.5, seed=3), add_noise(dataset, 0.5, seed=3)
    assert first["messages"] == again["messages"]
    assert add_noise(dataset, 0.5, seed=4)["poft_noise"] != first["poft_noise"]


def test_paper_noise_uses_another_rows_response():
    conversations = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer number {i} " * 3}]
        for i in range(20)
    ]
    noised = add_noise(as_dataset(conversations), 1.0, seed=0, char_rate=0.0)
    for i, messages in enumerate(noised["messages"]):
        assert messages[1]["content"] != conversations[i][1]["content"]
        assert messages[1]["content"] in {c[1]["content"] for c in conversations}


def test_character_corruption_rate_and_subtle_edits():
    rng = random.Random(0)
    text = "abcdefghij" * 100
    corrupted = corrupt_characters(text, 0.1, rng)
    assert corrupted != text and abs(len(corrupted) - len(text)) < 60
    assert corrupt_characters(text, 0.0, rng) == text
    assert subtle_edit("the sum is 41", random.Random(1)) in {"the sum is 40", "the sum is 42"}
    assert subtle_edit("0", random.Random(1)) == "1"
    assert sorted(subtle_edit("red green", random.Random(0)).split()) == ["green", "red"]
    edited = subtle_edit("HELLO", random.Random(2))
    assert len(edited) == 5 and edited.isupper() and sum(a != b for a, b in zip(edited, "HELLO", strict=False)) == 1


def test_bad_rate_is_an_error():
    with pytest.raises(ValueError, match="--rate"):
        add_noise(as_dataset(make_conversations(4)), 1.5)
    with pytest.raises(ValueError, match="--kind"):
        add_noise(as_dataset(make_conversations(4)), 0.5, kind="loud")


def test_cli(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_conversations(20))
    assert main(["noise", "--data", data, "--rate", "0.3", "--output", str(tmp_path / "n"), "--kind", "subtle"]) == 0
    assert sum(load_from_disk(str(tmp_path / "n"))["poft_noise"]) == 6


@pytest.mark.parametrize("kind", ["paper", "subtle"])
def test_noise_marks_exactly_the_changed_rows(kind):
    """Rows sharing one response: a donor's answer can equal a row's own, which must not count as noise."""
    answers = ["yes", "yes", "yes", "no"] * 6
    conversations = [
        [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]
        for i, a in enumerate(answers)
    ]
    for seed in range(5):
        noised = add_noise(as_dataset(conversations), 0.5, kind=kind, seed=seed, char_rate=0.0)
        changed = [new != old for new, old in zip(noised["messages"], conversations, strict=True)]
        assert noised["poft_noise"] == changed
        # a chosen row is drawn again until it changes (subtle edits always change it; a paper draw may, rarely,
        # find only donors with the same answer)
        assert sum(changed) == 12 if kind == "subtle" else sum(changed) >= 10


def test_noise_leaves_unchangeable_rows_unmarked():
    conversations = [
        [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "same"}] for i in range(6)
    ]
    noised = add_noise(as_dataset(conversations), 1.0, kind="paper", char_rate=0.0)
    assert noised["messages"] == conversations and noised["poft_noise"] == [False] * 6


def test_noise_keeps_poft_columns_it_does_not_invalidate_and_the_filter_records(tmp_path):
    """The one rule for inherited columns: `poft_filters` describes which rows were kept, not their content."""
    source = tmp_path / "scored"
    as_dataset(make_conversations(10, seed=2), length=[float(i) for i in range(10)]).save_to_disk(str(source))
    filtered, noised = tmp_path / "filtered", tmp_path / "noised"
    assert (
        main(["filter", "--data", str(source), "--by", "length", "--threshold", "5", "--output", str(filtered)]) == 0
    )
    assert main(["noise", "--data", str(filtered), "--rate", "0.5", "--output", str(noised)]) == 0
    assert (noised / "filter_summary.json").read_text() == (filtered / "filter_summary.json").read_text()
    marker = json.loads((noised / "poft_output.json").read_text())
    assert marker == {"stage": "noise", "columns": ["poft_filters", "poft_noise"]}
    assert load_from_disk(str(noised))["poft_filters"] == load_from_disk(str(filtered))["poft_filters"]
