"""Tokenizers and chat templates of the second demo world, none of them shared with the first world's.

References: a SentencePiece-style unigram tokenizer (metaspace) with a Llama-2 ``[INST]`` template, and a
WordPiece tokenizer with an Alpaca-style ``### Instruction:`` / ``### Response:`` template. Target: a
character-level tokenizer with a Gemma-style ``<start_of_turn>`` template (the target keeps one token per
character, as in the first world, so that its letter-level tasks stay learnable at this size). `poft.chat` must
mask all three alike: exactly each response's content and the token that closes its turn.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from poft.demo.builders import character_tokenizer

LLAMA2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
    "{% else %}{{ message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

GEMMA_SPECIALS = ["<start_of_turn>", "<end_of_turn>"]
TEMPLATE_CHARACTERS = "#[]/_"  # characters the templates write that the task suite never does


def unigram_tokenizer(
    corpus: Iterable[str], alphabet: str, vocab_size: int = 400, chat_template: str = LLAMA2_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A unigram tokenizer trained on `corpus`, words marked by a leading metaspace as sentencepiece does, with
    bos <s> and eos </s>; every character of `alphabet` stays in the vocabulary."""
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        unk_token="<unk>",
        initial_alphabet=sorted(set(alphabet + TEMPLATE_CHARACTERS + "▁")),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return _subword_tokenizer(backend, chat_template)


def _subword_tokenizer(backend: Tokenizer, chat_template: str) -> PreTrainedTokenizerFast:
    """A trained subword backend as a transformers tokenizer with the specials both references share."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def wordpiece_tokenizer(
    corpus: Iterable[str], alphabet: str, vocab_size: int = 400, chat_template: str = ALPACA_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer trained on `corpus` (pieces inside a word carry the ## prefix), bos <s> and eos </s>.

    Unlike BERT's it is lossless: no lower-casing, and every whitespace character is a token of its own, so
    decoding (drop the prefix, join the pieces) gives back the text, case and spacing included.
    """
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    backend = Tokenizer(models.WordPiece(unk_token="<unk>", continuing_subword_prefix="##"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    backend.decoder = decoders.Sequence([decoders.Replace("##", ""), decoders.Fuse()])
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=sorted(set(alphabet + TEMPLATE_CHARACTERS)),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return _subword_tokenizer(backend, chat_template)


def gemma_char_tokenizer(alphabet: str, chat_template: str = GEMMA_TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`, Gemma's turn specials, bos <bos> and eos <end_of_turn>."""
    return character_tokenizer(
        alphabet,
        ["<unk>", "<pad>", "<bos>"],
        GEMMA_SPECIALS,
        chat_template,
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        clean_up_tokenization_spaces=False,
    )
