"""What is read is said: conversations truncated only in part are counted (how many, the fewest response tokens
left) by `poft score` and `poft train`, and a template's own system turn is named once."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer

from poft.chat import ConversationEncoder
from poft.scoring import ScoreConfig, score_dataset
from poft.trainer import PoFTConfig, PoFTTrainer
from tests.conftest import as_dataset, make_conversations
from tests.real_templates import ORIGINAL, WRITTEN, tokenizer_for

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's template: a default system prompt where the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The shipped templates that write a system turn of their own into a conversation without one, read off each
# template's source (a default prompt, a date or reasoning header, or an empty system turn).
ADDS_SYSTEM = {
    "cohere2",
    "gptoss",
    "llama3_1",
    "llama3_2",
    "muse_glimmer",
    "nemotron_3_5_lightning",
    "nemotron_3_nano",
    "nemotron_3_super",
    "nemotron_3_ultra",
    "qwen2_5",
    "qwen2_5_vl",
    "qwen3_8",
}
MAX_LENGTH = 40


def expected_partial(tokenizer, conversations, max_length: int) -> tuple[int, int]:
    """(rows cut with some response left, fewest response tokens left), from the untruncated masks."""
    kept = []
    for messages in conversations:
        mask = ConversationEncoder(tokenizer).encode(messages).response_mask
        if len(mask) > max_length and sum(mask[1:max_length]):
            kept.append(sum(mask[1:max_length]))
    return len(kept), min(kept)


@pytest.fixture(scope="module")
def long_conversations():
    conversations = make_conversations(12, seed=5)
    conversations[0] = [{"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "ok"}]
    return conversations


def test_score_counts_partly_truncated_conversations(tiny_models, long_conversations, tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["zephyr"])
    count, fewest = expected_partial(tokenizer, long_conversations, MAX_LENGTH)
    assert 0 < count < len(long_conversations) - 1  # some rows cut, some whole, one cut to its prompt
    config = ScoreConfig(cache_dir=str(tmp_path / "c"), max_length=MAX_LENGTH, device="cpu")
    line = (
        f"reference 'zephyr': {count} of {len(long_conversations)} conversations are longer than "
        f"max_length={MAX_LENGTH} and keep only part of their tokens (keep_start): they are read on the response "
        f"tokens left, as few as {fewest}."
    )
    for _ in range(2):  # scored, then read from the cache: counted alike
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="poft"):
            score_dataset(as_dataset(long_conversations), [tiny_models["zephyr"]], config)
        assert line in caplog.text


def test_train_counts_partly_truncated_conversations(tiny_models, long_conversations, tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    count, fewest = expected_partial(tokenizer, long_conversations, MAX_LENGTH)
    args = PoFTConfig(output_dir=str(tmp_path / "o"), loss_type="sft", max_length=MAX_LENGTH, report_to=[])
    with caplog.at_level(logging.WARNING, logger="poft"):
        PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=as_dataset(long_conversations))
    assert (
        f"The train dataset: {count} of {len(long_conversations)} conversations are longer than "
        f"max_length={MAX_LENGTH} and keep only part of their tokens (keep_start): they are read on the response "
        f"tokens left, as few as {fewest}."
    ) in caplog.text


def test_nothing_is_said_when_nothing_is_cut(tiny_models, conversations, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="poft"):
        score_dataset(as_dataset(conversations), [tiny_models["zephyr"]], ScoreConfig(cache_dir=str(tmp_path)))
    assert "keep only part" not in caplog.text


def test_a_default_system_turn_is_named_once(tiny_models, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    encoder = ConversationEncoder(tokenizer, name="smollm2")
    with_system, without = make_conversations(2)  # the first has a system turn, the second none
    with caplog.at_level(logging.INFO, logger="poft.chat"):
        encoder.encode(with_system)
        assert "adds a system turn" not in caplog.text
        for _ in range(3):
            encoder.encode(without)
    assert caplog.text.count("adds a system turn") == 1
    assert (
        "smollm2: the tokenizer's chat template adds a system turn to conversations that have none ('<|im_start|>system "
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face'); they are read with it."
    ) in caplog.text


@pytest.mark.parametrize("name", ORIGINAL + sorted(WRITTEN))
def test_which_templates_add_a_system_turn(base_tokenizer, name):
    encoder = ConversationEncoder(tokenizer_for(base_tokenizer, name))
    assert (encoder.default_system is not None) == (name in ADDS_SYSTEM)
    if encoder.default_system is not None:  # what is named is what a conversation without a system turn holds
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        assert encoder.default_system.strip() in encoder.render(chat)
