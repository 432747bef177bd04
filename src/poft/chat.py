"""One conversation + one tokenizer -> token ids and the mask of the tokens a model is scored on.

This is the single definition of "the response" shared by reference scoring and PoFT training, so
r_ref and r_theta always measure the same thing: every assistant turn's content and its end-of-turn
token, exactly as the tokenizer's own chat template renders them. Templates with `{% generation %}`
markers are masked by `apply_chat_template(..., return_assistant_tokens_mask=True)`; templates without
them use TRL's training version of the same template where TRL ships one, and otherwise the mask is
derived by rendering each assistant turn's prefix.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from poft.errors import ChatTemplateError, OptionError

Message = dict[str, str]
TruncationMode = Literal["keep_start", "keep_end"]

CHAT_TEMPLATE_FIX = (
    "Pass a template with --chat_template (a .jinja file or the template text), or use a tokenizer that ships one."
)


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids of a rendered conversation and the 0/1 mask of its response (assistant) tokens."""

    input_ids: list[int]
    response_mask: list[int]
    truncated: bool

    @property
    def num_response_tokens(self) -> int:
        """Response tokens that have a prediction: the first token of a sequence is never predicted."""
        return sum(self.response_mask[1:])

    def labels(self) -> list[int]:
        """Causal-LM labels: the token id where it is a response token, -100 elsewhere."""
        return [t if m else -100 for t, m in zip(self.input_ids, self.response_mask, strict=True)]


def read_chat_template(value: str) -> str:
    """Accept a path to a .jinja/.j2 file or the template text itself."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if value.endswith((".jinja", ".j2")):
        raise ChatTemplateError(f"Chat template file not found: {value}. {CHAT_TEMPLATE_FIX}")
    return value


class ConversationEncoder:
    """Encodes conversations for one tokenizer; the template and the masking method are resolved once.

    `fallback_template` is used only when the tokenizer has no chat template of its own.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        fallback_template: str | None = None,
        max_length: int | None = None,
        truncation_mode: TruncationMode = "keep_start",
        name: str | None = None,
    ):
        if truncation_mode not in ("keep_start", "keep_end"):
            raise OptionError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
        if not tokenizer.is_fast:
            raise ChatTemplateError(
                f"{name or type(tokenizer).__name__}: response masks need a fast tokenizer (character offsets); "
                "load it with use_fast=True or convert it with `tokenizers`."
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.name = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            if fallback_template is None:
                raise ChatTemplateError(f"{self.name}: the tokenizer has no chat template. {CHAT_TEMPLATE_FIX}")
            template = read_chat_template(fallback_template)
        self.template, self.method = self._masking_template(template)

    def _masking_template(self, template: str) -> tuple[str, str]:
        if has_generation_markers(template):
            return template, "generation_markers"
        probe = copy.copy(self.tokenizer)  # TRL's lookup reads the template off the tokenizer
        probe.chat_template = template
        try:
            training = get_training_chat_template(probe)
        except ValueError:
            training = None
        if training is not None:
            return training, "generation_markers"
        return template, "prefix_rendering"

    def encode(self, messages: Sequence[Message]) -> EncodedConversation:
        """Render and tokenize `messages`, mask the response tokens, then truncate to `max_length`.

        A template that refuses the conversation (jinja's `raise_exception`, e.g. "no system role allowed")
        raises `ChatTemplateError` naming the template; callers add the row.
        """
        try:
            return self._encode([{"role": m["role"], "content": m["content"]} for m in messages])
        except TemplateError as error:
            raise ChatTemplateError(f"{self.name}: the chat template refused the conversation: {error}") from error

    def _encode(self, messages: list[Message]) -> EncodedConversation:
        if self.method == "generation_markers":
            out = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        else:
            input_ids, mask = self._encode_by_prefixes(messages)
        truncated = self.max_length is not None and len(input_ids) > self.max_length
        if truncated:
            window = (
                slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            )
            input_ids, mask = input_ids[window], mask[window]
        return EncodedConversation(input_ids=input_ids, response_mask=mask, truncated=truncated)

    def _render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode_by_prefixes(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """Assistant turn i spans from the end of render(turns < i, generation prompt) to the end of render(turns <= i).

        Trailing whitespace after the end-of-turn token is left out: a model stops at that token and never
        generates what follows it.
        """
        full = self._render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise ChatTemplateError(
                    f"{self.name}: the chat template renders earlier turns differently once later turns are "
                    f"added (turn {i}), so the assistant tokens cannot be located. Use a template with "
                    "{% generation %} markers via --chat_template."
                )
            spans.append((len(before), len(through.rstrip())))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        mask = [
            int(any(start < span_end and end > span_start for span_start, span_end in spans))
            for start, end in enc["offset_mapping"]
        ]
        return list(enc["input_ids"]), mask
