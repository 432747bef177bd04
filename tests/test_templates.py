"""The response mask on the chat templates people use: every original template shipped with TRL, plus
format-equivalent copies of Zephyr, Mistral-Instruct v0.1, ChatML (Yi) and Llama 2.

Each template is loaded into one small byte-level BPE tokenizer with the template's special tokens added as
special tokens, so tokenization splits where the real models' tokenizers do. The expected response of each
assistant turn is computed from the rendered text alone (the content's characters, then the first special
token after it if only whitespace separates them) and compared with the decoded masked tokens.
"""

from __future__ import annotations

import copy
import re
from dataclasses import astuple
from pathlib import Path

import pytest
import trl

from poft.chat import ChatTemplateError, ConversationEncoder, merge_system_turns
from poft.demo.builders import bpe_tokenizer

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# Templates whose rendering needs images; none of the shipped ones does (text-only conversations render
# through the vision-language templates too, as a list of text parts where they expect one).
NEEDS_IMAGES: set[str] = set()
ORIGINAL = sorted(p.stem for p in TRL_TEMPLATES.glob("*.jinja") if not p.stem.endswith("_training"))

ZEPHYR = (Path(__file__).parents[1] / "recipes" / "templates" / "zephyr.jinja").read_text()
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHATML_YI = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
WRITTEN = {"zephyr": ZEPHYR, "mistral_v0.1": MISTRAL_V01, "chatml_yi": CHATML_YI, "llama2": LLAMA2}

# Special tokens as the real tokenizers mark them: <|...|>, <|...>, <...|>, DeepSeek's <｜...｜> and Gemma's.
SPECIAL = re.compile(
    r"<\|[^<>\s|]*\|>|<\|[^<>\s|]+>|<[^<>\s|]+\|>|<｜[^｜]+｜>"
    r"|<(?:start_of_turn|end_of_turn|end_of_utterance|start_of_image|sop)>"
)
# bos and eos of each family's tokenizer, which templates reach through bos_token / eos_token.
BOS_EOS = {
    "llama": ("<|begin_of_text|>", "<|eot_id|>"),
    "gemma": ("<bos>", "<eos>"),
    "diffusion": ("<bos>", "<eos>"),
    "phi": ("<s>", "<|endoftext|>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "qwen": ("<|endoftext|>", "<|im_end|>"),
    "idefics": ("<|begin_of_text|>", "<end_of_utterance>"),
    "glm": ("[gMASK]", "<|endoftext|>"),
    "cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "lfm": ("<|startoftext|>", "<|im_end|>"),
    "nemotron": ("<s>", "<|im_end|>"),
    "gptoss": ("<|startoftext|>", "<|return|>"),
    "chatml": ("<|startoftext|>", "<|im_end|>"),
}

SYSTEM = {"role": "system", "content": "Answer briefly."}
CHAT = [
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Two plus three is five."},
    {"role": "user", "content": "Now reverse the word apple, please."},
    {"role": "assistant", "content": "elppa"},
    {"role": "user", "content": "And maple?"},
    {"role": "assistant", "content": "It is elpam, the word maple reversed."},
]
CONVERSATIONS = {"system": [SYSTEM, *CHAT], "no_system": CHAT, "one_turn": CHAT[:2]}


@pytest.fixture(scope="session")
def base_tokenizer():
    texts = [m["content"] for m in [SYSTEM, *CHAT]] * 4
    return bpe_tokenizer(texts, vocab_size=360, chat_template=None)


def template_text(name: str) -> str:
    return WRITTEN[name] if name in WRITTEN else (TRL_TEMPLATES / f"{name}.jinja").read_text()


def tokenizer_for(base, name: str):
    text = template_text(name)
    bos, eos = BOS_EOS.get(re.match(r"[a-z]+", name).group(), ("<s>", "</s>"))
    tokenizer = copy.deepcopy(base)
    tokenizer.add_special_tokens(
        {"bos_token": bos, "eos_token": eos, "additional_special_tokens": sorted(set(SPECIAL.findall(text)) | {eos})}
    )
    tokenizer.chat_template = text
    return tokenizer


def expected_responses(tokenizer, encoder: ConversationEncoder, messages: list[dict]) -> list[tuple[str, str]]:
    """Each assistant content found in the rendered text (turns searched in order), then the first special token
    after it when only whitespace separates them; with the whitespace before the content, part of which a
    byte-level tokenizer may glue to the first content token."""
    turns = messages if encoder.renders_system else merge_system_turns(messages)
    if encoder.content_as_parts:
        shaped = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in turns]
    else:
        shaped = turns
    rendered = tokenizer.apply_chat_template(shaped, tokenize=False)
    specials = "|".join(re.escape(t) for t in sorted(tokenizer.all_special_tokens, key=len, reverse=True))
    expected, cursor = [], 0
    for message in turns:
        start = rendered.find(message["content"], cursor)
        assert start >= 0, message
        cursor = start + len(message["content"])
        if message["role"] == "assistant":
            closing = re.compile(rf"\s*(?:{specials})").match(rendered, cursor)
            before = rendered[:start]
            expected.append(
                (before[len(before.rstrip()) :], message["content"] + (closing.group() if closing else ""))
            )
    return expected


def masked_runs(tokenizer, input_ids: list[int], mask: list[int]) -> list[str]:
    runs, current = [], []
    for token, flag in zip(input_ids, [*mask], strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", [n for n in ORIGINAL if n not in NEEDS_IMAGES] + list(WRITTEN))
def test_mask_is_each_content_and_its_closing_token(base_tokenizer, name, conversation):
    tokenizer = tokenizer_for(base_tokenizer, name)
    encoder = ConversationEncoder(tokenizer, name=name)
    messages = CONVERSATIONS[conversation]
    encoded = encoder.encode(messages)
    runs = masked_runs(tokenizer, encoded.input_ids, encoded.response_mask)
    expected = expected_responses(tokenizer, encoder, messages)
    assert len(runs) == len(expected) == sum(m["role"] == "assistant" for m in messages)
    for run, (whitespace_before, response) in zip(runs, expected, strict=True):
        assert run.lstrip() == response and whitespace_before.endswith(run[: len(run) - len(run.lstrip())])


def test_every_shipped_template_is_covered():
    assert len(ORIGINAL) >= 30 and "_training" not in " ".join(ORIGINAL)
    assert NEEDS_IMAGES <= set(ORIGINAL)


@pytest.mark.parametrize("name", ["llama3", "qwen2_5", "qwen3", "gemma3", "phi3", "deepseekv3", "gptoss"])
def test_trl_training_copy_gives_the_same_mask(base_tokenizer, name):
    """TRL's copy with {% generation %} markers (which may render history differently, e.g. Qwen 3's reasoning
    blocks) gives the same responses: the markers do not decide what is scored."""
    original = ConversationEncoder(tokenizer_for(base_tokenizer, name))
    training_tokenizer = tokenizer_for(base_tokenizer, name)
    training_tokenizer.chat_template = (TRL_TEMPLATES / f"{name}_training.jinja").read_text()
    training = ConversationEncoder(training_tokenizer)
    for messages in CONVERSATIONS.values():
        runs = [masked_runs(e.tokenizer, *astuple(e.encode(messages))[:2]) for e in (original, training)]
        assert runs[0] == runs[1] and len(runs[0]) == sum(m["role"] == "assistant" for m in messages)


def test_the_response_leaves_out_what_the_template_adds(base_tokenizer):
    """Qwen 3's empty reasoning block and Phi-3's trailing newline and </s> are template text, not response."""
    qwen3 = tokenizer_for(base_tokenizer, "qwen3")
    encoded = ConversationEncoder(qwen3).encode(CHAT[:2])
    assert "<think>\n\n</think>\n\n" in qwen3.decode(encoded.input_ids)
    assert masked_runs(qwen3, encoded.input_ids, encoded.response_mask) == ["Two plus three is five.<|im_end|>"]
    phi3 = tokenizer_for(base_tokenizer, "phi3")
    phi3.eos_token = "</s>"  # as in the Phi-3 tokenizers that end conversations with </s>
    encoded = ConversationEncoder(phi3).encode(CHAT[:2])
    assert phi3.decode(encoded.input_ids).endswith("<|end|>\n</s>")
    assert masked_runs(phi3, encoded.input_ids, encoded.response_mask) == ["Two plus three is five.<|end|>"]


def test_system_turns_for_a_template_that_rejects_them(base_tokenizer, caplog):
    tokenizer = tokenizer_for(base_tokenizer, "gemma")
    messages = [SYSTEM, *CHAT[:2]]
    with caplog.at_level("WARNING", logger="poft.chat"):
        merged = ConversationEncoder(tokenizer, name="gemma-2b-it").encode(messages)
    assert "system_turns" in caplog.text
    rendered = tokenizer.decode(merged.input_ids)
    assert "<start_of_turn>user\nAnswer briefly.\n\nWhat is two plus three?<end_of_turn>" in rendered
    assert ConversationEncoder(tokenizer, system_turns="merge").encode(messages) == merged
    with pytest.raises(ChatTemplateError, match=r"gemma-2b-it: .*System role not supported.*--system_turns merge"):
        ConversationEncoder(tokenizer, system_turns="keep", name="gemma-2b-it").encode(messages)


def test_merge_system_turns():
    assert merge_system_turns([SYSTEM, *CHAT[:2]])[0] == {
        "role": "user",
        "content": "Answer briefly.\n\nWhat is two plus three?",
    }
    assert merge_system_turns([SYSTEM, CHAT[1]]) == [{"role": "user", "content": "Answer briefly."}, CHAT[1]]
    assert merge_system_turns(CHAT) == CHAT


def test_parts_templates_get_text_parts(base_tokenizer):
    for name in ("smolvlm", "idefics3", "llava_next"):
        assert ConversationEncoder(tokenizer_for(base_tokenizer, name)).content_as_parts, name
    assert not ConversationEncoder(tokenizer_for(base_tokenizer, "qwen2_5_vl")).content_as_parts


def test_reasoning_the_template_strips_is_a_guard_error(base_tokenizer):
    """DeepSeek-R1's template drops everything up to </think> from assistant turns: that content is not scored."""
    encoder = ConversationEncoder(tokenizer_for(base_tokenizer, "deepseek_r1_distill"), name="DeepSeek-R1-Distill")
    messages = [CHAT[0], {"role": "assistant", "content": "<think>two and three</think>Five."}]
    with pytest.raises(ChatTemplateError, match="DeepSeek-R1-Distill: .*rewrites this content"):
        encoder.encode(messages)
