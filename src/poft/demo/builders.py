"""Tiny tokenizers and Llama-style models, saved as ordinary Hugging Face model directories.

The quickstart, the demo and the tests build their models here in seconds, with nothing downloaded,
and hand the pipeline a path, so it cannot tell them from real checkpoints. Two tokenizer families
with different chat templates, which `poft.chat` must mask alike: a character-level one with a
ChatML template carrying `{% generation %}` markers, and a byte-level BPE one with a Zephyr-style
template without them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ZEPHYR_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
ZEPHYR_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>"]


def char_tokenizer(alphabet: Iterable[str], chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet` (others map to <unk>), ChatML specials, eos <|im_end|>."""
    return character_tokenizer(alphabet, ["<unk>", "<pad>"], CHATML_SPECIALS, chat_template, eos_token="<|im_end|>")


def character_tokenizer(
    alphabet: Iterable[str],
    specials: list[str],
    turn_specials: list[str],
    chat_template: str | None,
    **named: str | bool,
) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet` after `specials` and the template's `turn_specials` (each one token);
    `named` gives the special tokens' roles beyond <unk> and <pad> (eos_token=..., bos_token=...)."""
    vocabulary = [*specials, *turn_specials]
    chars = sorted(set(alphabet) - set(vocabulary))
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocabulary + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", **named)
    tokenizer.add_special_tokens({"additional_special_tokens": turn_specials})
    tokenizer.chat_template = chat_template
    return tokenizer


def bpe_tokenizer(
    corpus: Iterable[str], vocab_size: int = 384, chat_template: str | None = ZEPHYR_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with Zephyr-style specials, bos <s> and eos </s>."""
    specials = ["<unk>", "<pad>", "<s>", "</s>", *ZEPHYR_SPECIALS]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ZEPHYR_SPECIALS})
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama-architecture causal LM sized for `tokenizer`, in float32."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Save model and tokenizer (with its chat template) as one Hugging Face model directory."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
