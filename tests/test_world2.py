"""The second demo world: its task answers against independent computations, its disjoint splits, the masks of
its tokenizers and templates, and its run identity (own epochs, the other worlds' keys unchanged)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from tokenizers import Tokenizer

from poft.chat import ConversationEncoder
from poft.demo import tasks_second
from poft.demo.builders_second import gemma_char_tokenizer, unigram_tokenizer, wordpiece_tokenizer
from poft.demo.pipeline import SECOND, DemoConfig, run_demo, world_examples
from poft.demo.runs import RunSpec, RunStore
from poft.demo.tasks import FAMILIES as FIRST_FAMILIES
from poft.demo.tasks import alphabet

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def argument(prompt: str) -> str:
    """The word a word family works on: the prompt's last token, its final punctuation dropped."""
    return prompt.split()[-1].rstrip(".?:")


def expected_answer(family: str, prompt: str) -> str:
    """Each family's answer computed from the prompt text, another way than the generator computes it."""
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    word = argument(prompt)
    if family == "last_letter":
        return word[len(word) - 1]
    if family == "shift":
        return "".join(ALPHABET[(ALPHABET.index(c) + 1) % 26] for c in word)
    if family == "sequence":
        steps = {b - a for a, b in zip(numbers, numbers[1:], strict=False)}
        (step,) = steps  # an arithmetic sequence has one step
        return str(numbers[-1] + step)
    if family == "max_digit":
        assert all(0 <= n <= 9 for n in numbers)
        return str(sorted(numbers)[-1])
    if family == "no_vowels":
        return re.sub("[aeiou]", "", word)
    if family == "swap_case":
        return word.swapcase()
    if family == "position":
        return str(ALPHABET.index(word[0]) + 1)
    raise AssertionError(family)


def test_answers_match_an_independent_computation():
    words = tasks_second.make_words(200)
    examples = tasks_second.sample(1400, seed=1, words=words)
    assert {e.family for e in examples} == set(tasks_second.FAMILIES)
    assert not set(tasks_second.FAMILIES) & set(FIRST_FAMILIES)
    for example in examples:
        assert example.answer == expected_answer(example.family, example.prompt), example
        assert set(example.prompt + example.answer) <= set(alphabet())
        if example.family in ("last_letter", "shift", "no_vowels", "position"):
            assert argument(example.prompt) in words
        if example.family == "swap_case":
            assert argument(example.prompt).lower() in words
    assert max(len(e.answer) for e in examples) <= 6  # short answers, well inside the generation budget


def test_words_alternate_and_start_with_either_letter_class():
    words = tasks_second.make_words(200)
    assert len(set(words)) == 200
    vowel = [c in "aeiou" for w in words for c in w[:1]]
    assert any(vowel) and not all(vowel)
    for w in words:
        assert 3 <= len(w) <= 6
        assert all((a in "aeiou") != (b in "aeiou") for a, b in zip(w, w[1:], strict=False))


def test_splits_are_disjoint_and_the_test_split_covers_every_family_evenly():
    config = DemoConfig()
    splits = world_examples(config, SECOND)
    prompts = {name: [e.prompt for e in examples] for name, examples in splits.items()}
    assert len(prompts["test"]) == config.test_rows and len(set(prompts["test"])) == config.test_rows
    assert len(prompts["validation"]) == config.validation_rows
    assert len(set(prompts["validation"])) == config.validation_rows
    held_out = set(prompts["test"]) | set(prompts["validation"])
    assert not set(prompts["test"]) & set(prompts["validation"])
    for name in ("train", "reference", "pretrain"):
        assert not set(prompts[name]) & held_out, name
    families = [e.family for e in splits["test"]]
    assert all(families.count(f) == config.test_rows // len(tasks_second.FAMILIES) for f in tasks_second.FAMILIES)
    # the first world's splits are not the second's
    assert not set(prompts["test"]) & {e.prompt for e in world_examples(config)["test"]}


@pytest.fixture(scope="module")
def tokenizers():
    examples = tasks_second.sample(700, seed=2, words=tasks_second.make_words(200))
    texts = [t for e in examples for t in (e.prompt, e.answer)]
    return {
        "unigram-llama2": unigram_tokenizer(texts, alphabet()),
        "wordpiece-alpaca": wordpiece_tokenizer(texts, alphabet()),
        "char-gemma": gemma_char_tokenizer(alphabet()),
    }


def conversations() -> list[list[dict]]:
    examples = tasks_second.sample(14, seed=3, words=tasks_second.make_words(200))
    single = [e.record()["messages"] for e in examples]
    two_turns = [single[i] + single[i + 1] for i in range(0, 14, 2)]
    return single + two_turns


@pytest.mark.parametrize("name", ["unigram-llama2", "wordpiece-alpaca", "char-gemma"])
def test_mask_is_exactly_each_response_and_its_closing_token(tokenizers, name):
    """The masked tokens are those whose characters overlap, in the rendered text, a response's content up to the
    end of the eos that follows it (Llama 2's space before eos included), located by plain string search."""
    tokenizer = tokenizers[name]
    encoder = ConversationEncoder(tokenizer)
    for messages in conversations():
        encoded = encoder.encode(messages)  # the guard inside passes
        text = encoder.render(messages)
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            cursor = len(encoder.render(messages[:i], add_generation_prompt=True))
            start = text.index(message["content"], cursor)
            end = text.index(tokenizer.eos_token, start + len(message["content"])) + len(tokenizer.eos_token)
            assert text[start + len(message["content"]) : end - len(tokenizer.eos_token)].strip() == ""
            spans.append((start, end))
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        expected = [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]
        assert encoded.response_mask == expected
        assert (
            encoded.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        )
        masked = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.response_mask, strict=True) if m])
        wanted = "".join(m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant")
        assert "".join(masked.split()) == "".join(wanted.split())


@pytest.mark.parametrize("name", ["unigram-llama2", "wordpiece-alpaca", "char-gemma"])
def test_prompt_a_model_completes_is_the_training_text_before_the_response(tokenizers, name):
    """Evaluation renders the prompt with the generation prompt; training reads it followed by the response."""
    tokenizer = tokenizers[name]
    encoder = ConversationEncoder(tokenizer)
    for messages in conversations()[:14]:
        prompt = encoder.render_prompt(messages[:1])
        assert encoder.render(messages).startswith(prompt)


@pytest.mark.parametrize("name", ["unigram-llama2", "wordpiece-alpaca"])
def test_subword_tokenizers_are_lossless_and_distinct(tokenizers, name):
    tokenizer = tokenizers[name]
    for messages in conversations():
        for text in (ConversationEncoder(tokenizer).render(messages), messages[-1]["content"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert "".join(tokenizer.decode(ids).split()) == "".join(text.split())
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    assert backend == {"unigram-llama2": "Unigram", "wordpiece-alpaca": "WordPiece"}[name]
    assert isinstance(tokenizer.backend_tokenizer, Tokenizer)


def test_run_identity_changes_for_the_second_world_only():
    config, other = DemoConfig(), DemoConfig(second_epochs=DemoConfig().second_epochs + 3)
    # the first world's key as it always was: the same settings list, hashed the same way
    standard = hashlib.sha256(json.dumps([3, 1800, 4000, 210, 700, 128, 2, 6]).encode()).hexdigest()[:12]
    assert config.world_key() == standard and other.world_key() == standard
    assert config.world_key(SECOND) not in (standard, config.world_key("strong"), config.world_key("misaligned"))
    assert config.train_settings() == config.train_settings("standard") == other.train_settings("standard")
    assert config.train_settings().epochs == config.epochs == 10
    assert config.train_settings(SECOND).epochs == config.second_epochs
    key = config.world_key(SECOND)
    assert config.train_settings(SECOND).fingerprint(key) != other.train_settings(SECOND).fingerprint(key)
    assert "second" not in DemoConfig(full=True).worlds


def test_toy_second_world_trains_for_its_own_epochs_and_reports_the_curve(tmp_path):
    settings = {
        "output": str(tmp_path / "demo"),
        "cache_dir": str(tmp_path / "cache"),
        "worlds": [SECOND],
        "conditions": ["paper:0.5"],
        "methods": ["sft", "poft_token"],
        "epochs": 1,
        "second_epochs": 2,
        "target_rows": 70,
        "reference_rows": 140,
        "validation_rows": 14,
        "test_rows": 14,
        "hidden_size": 32,
        "num_layers": 1,
        "reference_epochs": 1,
        "device": "cpu",
    }
    config = DemoConfig(**settings)
    results = run_demo(config)
    assert results["world_epochs"] == {SECOND: 2}
    assert set(results["reference_accuracy"][SECOND]) == {"ref-unigram", "ref-wordpiece"}
    for run in results["runs"]:
        assert [p["epoch"] for p in run["curve"]] == [0, 1, 2]
    store = RunStore(tmp_path / "demo", config.train_settings(SECOND).fingerprint(config.world_key(SECOND)))
    assert all(store.path(spec).exists() for spec in _specs(results))
    report = (tmp_path / "demo" / "report.md").read_text()
    curve = [p["validation_accuracy"] for p in results["runs"][0]["curve"]]
    first = results["runs"][0]
    row = f"| {SECOND} | paper | 0.5 | {first['method']} | {first['learning_rate']:g} | 1 | " + " ".join(
        f"{100 * v:.1f}" for v in curve
    )
    assert row + " |" in report


def _specs(results: dict) -> list[RunSpec]:
    return [
        RunSpec(r["world"], r["noise_kind"], r["noise_rate"], r["seed"], r["method"], r["learning_rate"])
        for r in results["runs"]
    ]
