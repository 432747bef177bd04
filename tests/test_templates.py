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

import pytest

from poft.chat import ChatTemplateError, ConversationEncoder, merge_system_turns
from tests.real_templates import (
    NEEDS_IMAGES,
    ORIGINAL,
    SPECIAL,
    TRL_TEMPLATES,
    WRITTEN,
    sentencepiece_tokenizer,
    template_text,
    tokenizer_for,
)

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
    closing = set(tokenizer.all_special_tokens) - {tokenizer.bos_token, tokenizer.unk_token}
    specials = "|".join(re.escape(t) for t in sorted(closing, key=len, reverse=True))
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


@pytest.fixture(scope="module")
def sentencepiece_tokenizers():
    texts = [m["content"] for messages in CONVERSATIONS.values() for m in messages] * 4
    return {legacy: sentencepiece_tokenizer(texts, legacy) for legacy in (True, False)}


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "metaspace"])
@pytest.mark.parametrize("name", ["zephyr", "mistral_v0.1", "llama2", "chatml_yi", "gemma", "gemma3"])
def test_sentencepiece_style_tokenizers(sentencepiece_tokenizers, name, legacy):
    """The paper's references and Gemma tokenize in sentencepiece's style, whose decoders do not restore every
    space in a slice; the masked tokens' characters (from the offsets) are compared instead of their decoding."""
    tokenizer = copy.deepcopy(sentencepiece_tokenizers[legacy])
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(set(SPECIAL.findall(template_text(name))))})
    tokenizer.chat_template = template_text(name)
    encoder = ConversationEncoder(tokenizer, name=name)
    for messages in CONVERSATIONS.values():
        encoded = encoder.encode(messages)
        rendered = encoder.render(encoder.prepare(messages))
        offsets = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert encoded.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        runs, start = [], None
        for index, flag in enumerate([*encoded.response_mask, 0]):
            if flag and start is None:
                start = index
            elif not flag and start is not None:
                runs.append(rendered[offsets[start][0] : offsets[index - 1][1]].strip())
                start = None
        assert runs == [response for _, response in expected_responses(tokenizer, encoder, messages)]


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


def test_guard_error_stops_scoring_and_training_naming_the_conversation(base_tokenizer, tmp_path):
    from poft.demo.builders import save_model, tiny_llama
    from poft.scoring import ScoreConfig, score_dataset
    from poft.trainer import PoFTConfig, PoFTTrainer
    from tests.conftest import as_dataset

    tokenizer = tokenizer_for(base_tokenizer, "deepseek_r1_distill")
    model = str(save_model(tiny_llama(tokenizer), tokenizer, tmp_path / "r1"))
    reasoning = [CHAT[0], {"role": "assistant", "content": "<think>two and three</think>Five."}]
    data = as_dataset([CHAT[:2], reasoning], ref_score=[-1.0, -1.0], ref_entropy=[1.0, 1.0])
    with pytest.raises(ChatTemplateError, match=rf"poft_id {data['poft_id'][1]}: {model}: .*rewrites"):
        score_dataset(data, [model], ScoreConfig(cache_dir=str(tmp_path / "cache"), device="cpu"))
    args = PoFTConfig(output_dir=str(tmp_path / "out"), report_to=[], max_length=256)
    with pytest.raises(ChatTemplateError, match="row 1: .*rewrites"):
        PoFTTrainer(model, args=args, train_dataset=data)


def test_a_turn_without_a_closing_token_is_its_content_alone(base_tokenizer, caplog):
    """The next turn's beginning-of-sequence token does not close the previous one: the model never generates it."""
    tokenizer = tokenizer_for(base_tokenizer, "mistral_v0.1")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    with caplog.at_level("WARNING", logger="poft.chat"):
        encoded = ConversationEncoder(tokenizer).encode(CHAT[:4])
    assert [run.strip() for run in masked_runs(tokenizer, encoded.input_ids, encoded.response_mask)] == [
        "Two plus three is five.",
        "elppa",
    ]
    assert "no special token right after" in caplog.text
