"""The response mask: exactly the assistant turns' content and end-of-turn tokens, in every template path."""

from __future__ import annotations

import pytest
from tokenizers import normalizers
from transformers import AutoTokenizer

from poft.chat import MASK_RULE, ChatTemplateError, ConversationEncoder
from poft.demo.builders import CHATML_TEMPLATE, char_tokenizer


def masked_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.response_mask, strict=False) if m])


@pytest.mark.parametrize("name", ["chatml", "zephyr"])
def test_mask_covers_assistant_content_and_end_of_turn(tiny_models, conversations, name):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[name])
    encoder = ConversationEncoder(tokenizer)
    assert encoder.mask_rule_version == MASK_RULE
    for messages in conversations:
        encoded = encoder.encode(messages)
        expected = "".join(m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant")
        assert masked_text(tokenizer, encoded) == expected
        # the ids are the template's own rendering, tokenized as apply_chat_template does
        assert (
            encoded.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        )
        assert encoded.num_response_tokens == sum(encoded.response_mask)
        assert encoded.labels() == [
            t if m else -100 for t, m in zip(encoded.input_ids, encoded.response_mask, strict=False)
        ]


def test_truncation_keeps_start_and_counts_only_surviving_response_tokens(tiny_models, conversations):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    full = ConversationEncoder(tokenizer).encode(conversations[1])
    cut = ConversationEncoder(tokenizer, max_length=len(full.input_ids) - 5).encode(conversations[1])
    assert cut.truncated and cut.input_ids == full.input_ids[:-5] and cut.response_mask == full.response_mask[:-5]
    end = ConversationEncoder(tokenizer, max_length=10, truncation_mode="keep_end").encode(conversations[1])
    assert end.input_ids == full.input_ids[-10:]
    prompt_only = ConversationEncoder(tokenizer, max_length=8).encode(conversations[1])
    assert prompt_only.num_response_tokens == 0


def test_missing_chat_template_names_the_fix():
    tokenizer = char_tokenizer("abc", chat_template=None)
    with pytest.raises(ChatTemplateError, match="--chat_template"):
        ConversationEncoder(tokenizer, name="my-model")
    encoder = ConversationEncoder(tokenizer, fallback_template=CHATML_TEMPLATE)
    assert encoder.template == CHATML_TEMPLATE


DROPPER = "{% for m in messages %}{{ m.role + ': ' + (m.content if m.role == 'user' else '') + '.' }}{% endfor %}"


def test_template_error_names_the_fix_that_applies_to_where_the_template_came_from():
    """--chat_template replaces no tokenizer's own template, so only a tokenizer without one is told to pass it."""
    own = char_tokenizer("abcdefghijklmnopqrstuvwxyz:. ", chat_template=DROPPER)
    with pytest.raises(ChatTemplateError, match=r"Fix the template in the model folder \(chat_template.jinja") as e:
        ConversationEncoder(own, fallback_template=CHATML_TEMPLATE)
    assert "--chat_template serves only tokenizers without a template." in str(e.value)
    given = char_tokenizer("abcdefghijklmnopqrstuvwxyz:. ", chat_template=None)
    with pytest.raises(ChatTemplateError, match=r"Pass a template that renders each assistant content unchanged"):
        ConversationEncoder(given, fallback_template=DROPPER)


def test_fallback_template_from_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(CHATML_TEMPLATE)
    encoder = ConversationEncoder(char_tokenizer("abc ", chat_template=None), fallback_template=str(path))
    assert encoder.template == CHATML_TEMPLATE
    with pytest.raises(ChatTemplateError, match="not found"):
        ConversationEncoder(char_tokenizer("abc", chat_template=None), fallback_template=str(tmp_path / "no.jinja"))


def test_template_that_rewrites_history_is_reported():
    # renders only the last assistant turn's content in full: earlier turns change as turns are added
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ 'x' }}{% else %}{{ m['content'] }}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    encoder = ConversationEncoder(char_tokenizer("abcdefghijklmnopqrstuvwxyz ", chat_template=template))
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}] * 2
    with pytest.raises(ChatTemplateError, match="drops the content of assistant turn 1"):
        encoder.encode(messages)


ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ?.\n"
MESSAGES = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there."}]


@pytest.mark.parametrize(
    "rewrite",
    [
        "message['content'] | upper",  # rewrites the content
        "message['content'][:-1]",  # drops its last character
        "message['content'].replace('e', 'E')",  # rewrites part of it
        "message['content'] * 2",  # repeats it
        "'x' if message['role'] == 'assistant' else message['content']",  # drops it
    ],
)
def test_template_that_changes_assistant_content_is_a_guard_error(rewrite):
    template = CHATML_TEMPLATE.replace(
        "{{ message['content'] + '<|im_end|>' }}", f"{{{{ ({rewrite}) + '<|im_end|>' }}}}"
    )
    assert template != CHATML_TEMPLATE
    tokenizer = char_tokenizer(ALPHABET + "()", chat_template=template)
    with pytest.raises(ChatTemplateError, match=r"ref-model: cannot locate the response .* the tokenizer's chat"):
        ConversationEncoder(tokenizer, name="ref-model").encode(MESSAGES)


def test_tokens_that_do_not_decode_to_the_content_are_a_guard_error():
    """A normalizer that lowercases keeps the offsets right but the tokens are not the content: no silent mask."""
    tokenizer = char_tokenizer(ALPHABET.lower())
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(ChatTemplateError, match="decode to 'hi there.<|im_end|>'"):
        ConversationEncoder(tokenizer, name="ref-model").encode(MESSAGES)
    assert ConversationEncoder(tokenizer).encode([MESSAGES[0], {"role": "assistant", "content": "ok."}])
