"""One conversation + one tokenizer -> token ids and the mask of the tokens a model is scored on.

This is the single definition of "the response" shared by reference scoring and PoFT training, so r_ref
(a mean over references that each read the conversation in their own template) and r_theta (the target
in its template) measure the same thing whatever the templates are:

    the response of an assistant turn is the tokens of its content, as the template renders it, plus the
    one special token that closes the turn (<|eot_id|>, <|im_end|>, <end_of_turn>, <|end|>, </s>, ...),
    and nothing else the template adds around it.

Left out: role headers (``<|start_header_id|>assistant<|end_header_id|>``, ``<｜Assistant｜>``), empty
reasoning blocks (``<think>\\n\\n</think>\\n\\n``), whitespace after the closing token, and any second token
after it (Phi-3's ``<|end|>`` is followed by ``\\n`` and, at the end, ``</s>``). The reason is what generation
does: a model stops at the first end-of-turn token (it is in every chat model's generation-config stop
list), so that token is the last one it generates, and everything the template writes before the content
is part of the prompt. Those template tokens are near-certain for a model, so counting them would inflate
its length-normalised score by an amount that depends on the template and on the response's length, and
r_theta - r_ref would shift by a template artefact. Whitespace that sits between the content and the
closing token (Llama 2's ``' ' + eos``) is kept, since the model must generate it to reach that token; a
leading space the tokenizer glues to the first content token is kept, since that token is what the model
generates. Where no special token follows the content (GLM-4's last turn: its turns end with the next
role token, which its generation config stops at), the turn is its content alone, with a warning. A
beginning-of-sequence token never closes a turn.

One method serves every template, with or without ``{% generation %}`` markers: the conversation is
rendered once as it is and once with every assistant content replaced by a unique marker; the marker
rendering splits the text into the template's own pieces, which locate each content (possibly trimmed by
the template) in the real rendering exactly. Character spans map to tokens through the tokenizer's
offsets. A guard then decodes every turn's masked tokens and stops with `ChatTemplateError`, naming the
model and the template, unless they are exactly that turn's content and closing token (whitespace aside,
which decoders do not all restore): a wrong mask never passes silently.

Templates that reject or drop system turns (Gemma, Mistral-Instruct v0.1) get them merged into the next user
turn, as such models' guides say, under `system_turns="auto"` (logged) or `"merge"`; templates that expect
content as a list of parts (SmolVLM, Idefics3, LLaVA-NeXT) get ``[{"type": "text", "text": ...}]``.
"""

from __future__ import annotations

import bisect
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from poft.errors import ChatTemplateError
from poft.options import check_reading_options

logger = logging.getLogger(__name__)

Message = dict[str, str]
TruncationMode = Literal["keep_start", "keep_end"]
SystemTurns = Literal["auto", "keep", "merge"]

# Version of the response definition above; score caches are keyed by it, so changing which tokens are
# scored makes earlier cache entries unreachable instead of silently reused.
MASK_RULE = "content+closing_token/v2"
# a conversation longer than max_length is tokenized in a window of its text (`ConversationEncoder._windowed`): first
# WINDOW_CHARS_PER_TOKEN characters per token, widened until WINDOW_MARGIN tokens more than are kept lie in it
WINDOW_CHARS_PER_TOKEN, WINDOW_MARGIN = 16, 64

CHAT_TEMPLATE_FIX = (
    "Pass a template with --chat_template (a .jinja file or the template text), or use a tokenizer that ships one."
)
# --chat_template is only a fallback: with several references one template cannot replace each one's own.
OWN_TEMPLATE_FIX = (
    "Fix the template in the model folder (chat_template.jinja or tokenizer_config.json), or use a tokenizer whose "
    "template renders each assistant content unchanged; --chat_template serves only tokenizers without a template."
)
GIVEN_TEMPLATE_FIX = "Pass a template that renders each assistant content unchanged with --chat_template."


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids of a rendered conversation and the 0/1 mask of its response (assistant) tokens."""

    input_ids: list[int]
    response_mask: list[int]
    truncated: bool
    unknown: tuple[str, ...] = ()  # pieces of the response text the tokenizer reads as its unknown token, each once

    @property
    def num_response_tokens(self) -> int:
        """Response tokens that have a prediction: the first token of a sequence is never predicted."""
        return sum(self.response_mask[1:])

    def labels(self) -> list[int]:
        """Causal-LM labels: the token id where it is a response token, -100 elsewhere."""
        return [t if m else -100 for t, m in zip(self.input_ids, self.response_mask, strict=True)]


def partly_truncated(kept: Sequence[int], total: int, max_length: int | None, truncation_mode: str) -> str:
    """The line that says how many conversations lost part of their response to truncation (`kept`: the response
    tokens each still has), shared by `poft score` and `poft train` so both count alike."""
    return (
        f"{len(kept)} of {total} conversations are longer than max_length={max_length} and keep only part of their "
        f"tokens ({truncation_mode}): they are read on the response tokens left, as few as {min(kept)}. Raise "
        "max_length to read them whole (use the same value for scoring and training)."
    )


def shorten(text: str, limit: int = 80) -> str:
    """`text` on one line, cut to `limit` characters, for log lines that quote data or templates."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_chat_template(value: str) -> str:
    """Accept a path to a .jinja/.j2 file or the template text itself."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if value.endswith((".jinja", ".j2")):
        raise ChatTemplateError(f"Chat template file not found: {value}. {CHAT_TEMPLATE_FIX}")
    return value


def merge_system_turns(messages: Sequence[Message]) -> list[Message]:
    """Prepend each system turn's text to the next user turn (separated by a blank line, as Gemma 3's template
    does); a system turn with no user turn before the next assistant turn becomes a user turn itself."""
    merged: list[Message] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system":
            pending.append(message["content"])
            continue
        if pending and message["role"] == "user":
            message = {"role": "user", "content": "\n\n".join([*pending, message["content"]])}
        elif pending:
            merged.append({"role": "user", "content": "\n\n".join(pending)})
        pending = []
        merged.append(dict(message))
    if pending:
        merged.append({"role": "user", "content": "\n\n".join(pending)})
    return merged


@dataclass(frozen=True)
class ResponseSpan:
    """One assistant turn in the rendered text: its content's characters and the tokens that are its response."""

    turn: int
    content: str  # the content as the template renders it
    first_token: int
    end_token: int  # exclusive
    closing_token: int | None  # index of the closing special token, None where the template has none


class ConversationEncoder:
    """Encodes conversations for one tokenizer; the template and how it takes content are resolved once.

    `fallback_template` is used only when the tokenizer has no chat template of its own. `system_turns`
    says what to do with system turns (see `poft.options.SYSTEM_TURNS_HELP`).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        fallback_template: str | None = None,
        max_length: int | None = None,
        truncation_mode: TruncationMode = "keep_start",
        system_turns: SystemTurns = "auto",
        name: str | None = None,
    ):
        check_reading_options(truncation_mode, system_turns)
        self.name = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not tokenizer.is_fast:
            raise ChatTemplateError(
                f"{self.name}: response masks need a fast tokenizer (character offsets); "
                "load it with use_fast=True or convert it with `tokenizers`."
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.system_turns = system_turns
        self.mask_rule_version = MASK_RULE
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        self.template_source = "the tokenizer's chat template"
        self.template_fix = OWN_TEMPLATE_FIX  # what to do when the template fails: depends on where it came from
        if template and fallback_template is not None:
            logger.info(
                "%s: using the tokenizer's own chat template; --chat_template serves only those without one", self.name
            )
        if not template:
            if fallback_template is None:
                raise ChatTemplateError(f"{self.name}: the tokenizer has no chat template. {CHAT_TEMPLATE_FIX}")
            template = read_chat_template(fallback_template)
            self.template_fix = GIVEN_TEMPLATE_FIX
            self.template_source = (
                f"chat template {fallback_template}"
                if os.path.isfile(fallback_template)
                else "the given chat template"
            )
        self.template = template
        self.unknown_ids = _unknown_ids(tokenizer)
        # tokens that can close a turn: the special ones, but never a beginning-of-sequence or unknown token
        self.closing_ids = (
            set(tokenizer.all_special_ids)
            | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        ) - {tokenizer.bos_token_id, *self.unknown_ids}
        self.content_as_parts = self._probe_content_shape()
        self.renders_system = self._probe_system_turns()
        self.default_system = self._probe_default_system()
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ public

    def encode(self, messages: Sequence[Message]) -> EncodedConversation:
        """Render and tokenize `messages`, mask the response tokens, then truncate to `max_length`.

        A conversation far longer than max_length tokens is tokenized only in a window of its rendered text at the
        end truncation keeps (`_windowed`), so a 5 MB row costs about what its kept tokens cost."""
        full, contents = self._locate_contents(self.prepare(messages))
        if self.max_length is not None:
            windowed = self._windowed(full, contents)
            if windowed is not None:
                return windowed
        input_ids, mask, _, unknown = self._tokenize_and_mask(full, contents)
        truncated = self.max_length is not None and len(input_ids) > self.max_length
        if truncated:
            window = (
                slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            )
            input_ids, mask = input_ids[window], mask[window]
        return EncodedConversation(input_ids=input_ids, response_mask=mask, truncated=truncated, unknown=unknown)

    def encode_spans(self, messages: Sequence[Message]) -> tuple[list[int], list[int], list[ResponseSpan]]:
        """Untruncated token ids, response mask and each assistant turn's response span, checked by the guard."""
        return self._tokenize_and_mask(*self._locate_contents(self.prepare(messages)))[:3]

    def _windowed(self, full: str, contents: list[tuple[int, str, int]]) -> EncodedConversation | None:
        """The kept max_length tokens read from a window of `full` (its start for keep_start, its end for keep_end)
        that grows until it holds WINDOW_MARGIN tokens more than are kept: a cut changes the tokens only next to
        it, and those are dropped. None where the window would be the whole text."""
        assert self.max_length is not None
        size = WINDOW_CHARS_PER_TOKEN * (self.max_length + WINDOW_MARGIN)
        while size < len(full):
            start, end = (len(full) - size, len(full)) if self.truncation_mode == "keep_end" else (0, size)
            input_ids, mask, _, unknown = self._tokenize_and_mask(full, contents, start, end)
            if len(input_ids) >= self.max_length + WINDOW_MARGIN:
                window = slice(-self.max_length, None) if start else slice(None, self.max_length)
                return EncodedConversation(input_ids[window], mask[window], truncated=True, unknown=unknown)
            size *= 4
        return None

    def _tokenize_and_mask(
        self, full: str, contents: list[tuple[int, str, int]], start: int = 0, end: int | None = None
    ) -> tuple[list[int], list[int], list[ResponseSpan], tuple[str, ...]]:
        """Token ids of `full[start:end]`, its response mask, the response spans in it and the pieces of response
        text the tokenizer reads as its unknown token; a turn cut by the window is masked on the part inside it, and the guard checks
        the turns it holds whole."""
        end = len(full) if end is None else end
        enc = self.tokenizer(full[start:end], add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        offsets = [(a + start, b + start) for a, b in enc["offset_mapping"]]
        mask, spans = [0] * len(input_ids), []
        for turn, text, at in contents:
            if at + len(text) <= start or at >= end:
                continue  # outside the window
            cut_after = at + len(text) > end
            span = self._response_span(turn, text, at, full, input_ids, offsets, cut_after)
            if start <= at and not cut_after:
                self._check(span, input_ids, [(a - at, b - at) for a, b in offsets])
            mask[span.first_token : span.end_token] = [1] * (span.end_token - span.first_token)
            spans.append(span)
        unknown = (
            full[a:b] for t, m, (a, b) in zip(input_ids, mask, offsets, strict=True) if m and t in self.unknown_ids
        )
        return input_ids, mask, spans, tuple(dict.fromkeys(unknown))

    def prepare(self, messages: Sequence[Message]) -> list[Message]:
        """The turns as the template receives them: role and content only, system turns per the policy."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        has_system = any(m["role"] == "system" for m in messages)
        if not has_system and self.default_system is not None:
            self._warn_once(
                "default_system",
                "%s: %s adds a system turn to conversations that have none (%r); they are read with it.",
                self.name,
                self.template_source,
                shorten(self.default_system, 160),
                level=logging.INFO,
            )
        if has_system and (self.system_turns == "merge" or (self.system_turns == "auto" and not self.renders_system)):
            if self.system_turns == "auto":
                self._warn_once(
                    "system",
                    "%s: %s does not render system turns; merging each into the next user turn (system_turns=auto). "
                    "Pass --system_turns keep to stop this.",
                    self.name,
                    self.template_source,
                )
            messages = merge_system_turns(messages)
        return messages

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The text a model completes to answer `messages` (the turns before a response): read as `encode` reads
        them (system-turn policy, content shape, fallback template), plus the template's generation prompt."""
        return self.render(self.prepare(messages), add_generation_prompt=True)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The template's text for prepared `messages`; any failure of the template is a `ChatTemplateError`."""
        try:
            return self._apply(messages, add_generation_prompt)
        except Exception as error:  # templates fail in many ways: raise_exception, KeyError, TypeError, ...
            hint = self.template_fix
            if any(m["role"] == "system" for m in messages):
                hint = "The conversation has a system turn: pass --system_turns merge to merge it into the user turn."
            raise ChatTemplateError(
                f"{self.name}: {self.template_source} fails on this conversation "
                f"({type(error).__name__}: {error}). {hint}"
            ) from error

    # ------------------------------------------------------------------ rendering

    def _apply(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        if self.content_as_parts:
            messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        return self.tokenizer.apply_chat_template(
            list(messages), chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _probe_content_shape(self) -> bool:
        """True when the template renders content only given as a list of text parts."""
        marks = _Markers()
        probe = [{"role": "user", "content": marks.new()}, {"role": "assistant", "content": marks.new()}]
        for parts in (False, True):
            self.content_as_parts = parts
            try:
                text = self._apply(probe)
            except Exception:  # a template expecting the other shape fails in its own way
                continue
            if all(text.count(m["content"]) == 1 for m in probe):
                return parts
        raise self._guard_error(
            None, "the template renders assistant content unchanged neither as text nor as text parts"
        )

    def _probe_system_turns(self) -> bool:
        marks = _Markers()
        system = marks.new()
        probe = [
            {"role": "system", "content": system},
            {"role": "user", "content": marks.new()},
            {"role": "assistant", "content": marks.new()},
        ]
        try:
            return system in self._apply(probe)
        except Exception:  # e.g. Gemma's raise_exception('System role not supported')
            return False

    def _probe_default_system(self) -> str | None:
        """The system turn the template writes into a conversation that has none (SmolLM2's and Qwen 2.5's default
        prompts, Llama 3.1's date header), as rendered text; None where it writes none.

        Before the first user content a template writes the tokens that open a sequence, any turn of its own and
        the user header; the user header also precedes the second user content (after the first answer's closing
        token), so what is left once it is taken off holds text only where the template added a turn."""
        marks = _Markers()
        first, second = marks.new(), marks.new()
        turns = [
            {"role": "user", "content": first},
            {"role": "assistant", "content": marks.new()},
            {"role": "user", "content": second},
            {"role": "assistant", "content": marks.new()},
        ]
        try:
            text = self._apply(turns)
        except Exception:  # the template's failures are reported where conversations are encoded
            return None
        before, _, rest = text.partition(first)
        encoded = self.tokenizer(before, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        between = self.tokenizer(rest.partition(second)[0], add_special_tokens=False)["input_ids"]
        end = len(ids) - len(os.path.commonprefix([ids[::-1], between[::-1]]))  # the user header ends both
        special = set(self.tokenizer.all_special_ids) | self.closing_ids
        if not any(
            before[a:b].strip() for t, (a, b) in zip(ids[:end], offsets[:end], strict=True) if t not in special
        ):
            return None  # only the tokens that open a sequence (<s>, [gMASK]<sop>), no turn
        start = 1 if ids[0] == self.tokenizer.bos_token_id else 0
        return before[offsets[start][0] : offsets[end - 1][1]]

    def _locate_contents(self, messages: list[Message]) -> tuple[str, list[tuple[int, str, int]]]:
        """The rendered text and, per assistant turn, (turn index, content as rendered, its start character)."""
        full = self.render(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            return full, []
        marks = _Markers(avoid=full)
        marked = [dict(m) for m in messages]
        for i in turns:
            marked[i]["content"] = marks.new()
        pieces = self._split_at_markers(self.render(marked), [marked[i]["content"] for i in turns])
        if not full.startswith(pieces[0]):
            raise self._guard_error(turns[0], "the text before it changes with the content")
        contents, cursor = [], len(pieces[0])
        for k, i in enumerate(turns):
            after, last = pieces[k + 1], k + 1 == len(turns)
            content = messages[i]["content"]
            for text in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
                end = cursor + len(text)
                if full.startswith(text, cursor) and (full[end:] == after if last else full.startswith(after, end)):
                    contents.append((i, text, cursor))
                    cursor = end + len(after)
                    break
            else:
                raise self._guard_error(i, "the template rewrites this content or the text around it")
        return full, contents

    def _split_at_markers(self, text: str, markers: list[str]) -> list[str]:
        pieces, cursor = [], 0
        for k, marker in enumerate(markers):
            at = text.find(marker, cursor)
            if at < 0 or text.count(marker) != 1:
                how = "drops" if marker not in text else ("repeats" if text.count(marker) > 1 else "reorders")
                raise self._guard_error(None, f"the template {how} the content of assistant turn {k + 1}")
            pieces.append(text[cursor:at])
            cursor = at + len(marker)
        pieces.append(text[cursor:])
        return pieces

    # ------------------------------------------------------------------ tokens

    def _response_span(
        self,
        turn: int,
        text: str,
        start: int,
        full: str,
        input_ids: list[int],
        offsets: list[tuple[int, int]],
        cut_after: bool = False,
    ) -> ResponseSpan:
        """The tokens of one assistant turn's content and its closing token; `cut_after`: the tokens end inside the
        content (a window of the text), so no closing token is looked for."""
        end = start + len(text)
        # offsets are sorted, so the tokens overlapping [start, end) are found by bisection (long conversations)
        first = bisect.bisect_right(offsets, start, key=lambda offset: offset[1])
        last = bisect.bisect_left(offsets, end, key=lambda offset: offset[0]) - 1
        if first > last:
            raise self._guard_error(turn, "no token covers its content")
        if cut_after:
            return ResponseSpan(turn, text, first, last + 1, None)
        closing = last + 1
        while (  # whitespace between the content and the closing token is generated too (Llama 2's ' </s>')
            closing < len(input_ids)
            and input_ids[closing] not in self.closing_ids
            and not full[offsets[closing][0] : offsets[closing][1]].strip()
        ):
            closing += 1
        if closing < len(input_ids) and input_ids[closing] in self.closing_ids:
            return ResponseSpan(turn, text, first, closing + 1, closing)
        self._warn_once(
            "closing",
            "%s: %s writes no special token right after an assistant turn's content, so that turn is scored on its "
            "content alone (the model learns no stop token there).",
            self.name,
            self.template_source,
        )
        return ResponseSpan(turn, text, first, last + 1, None)

    def _check(self, span: ResponseSpan, input_ids: list[int], offsets: list[tuple[int, int]]) -> None:
        """The guard: the masked tokens must decode to the turn's content and then its closing token. Whitespace is
        not compared (a space glued to the first token, decoders that drop spaces in a slice); every other
        character is, so dropped, rewritten, repeated or added text stops the run. A character the tokenizer does
        not know is expected back as its unknown token (`offsets`: the tokens' characters in the content)."""
        body_end = span.end_token if span.closing_token is None else span.closing_token
        body = self.tokenizer.decode(input_ids[span.first_token : body_end])
        closing = "" if span.closing_token is None else self.tokenizer.decode([input_ids[span.closing_token]])
        expected, cursor, unknown = [], 0, ""
        for token in range(span.first_token, body_end):
            if input_ids[token] in self.unknown_ids:
                a, b = max(offsets[token][0], cursor), offsets[token][1]
                expected += [span.content[cursor:a], self.tokenizer.decode([input_ids[token]])]
                unknown, cursor = unknown + span.content[a:b], max(b, cursor)
        expected.append(span.content[cursor:])
        if not _same_but_whitespace(body, "".join(expected)) or (span.closing_token is not None and not closing):
            if unknown:
                raise ChatTemplateError(
                    f"{self.name}: the response of assistant turn at position {span.turn + 1} holds "
                    f"{_characters(unknown)}, which the tokenizer does not know and does not decode back; this is the "
                    "tokenizer's vocabulary, not the chat template. Replace the character in the data, or use a "
                    "model whose tokenizer knows it."
                )
            raise self._guard_error(
                span.turn, f"its masked tokens decode to {body + closing!r}, not to the content and its closing token"
            )

    def _guard_error(self, turn: int | None, why: str) -> ChatTemplateError:
        where = f"assistant turn at position {turn + 1}" if turn is not None else "an assistant turn"
        return ChatTemplateError(
            f"{self.name}: cannot locate the response of {where} in {self.template_source}: {why}. {self.template_fix}"
        )

    def _warn_once(self, key: str, message: str, *args, level: int = logging.WARNING) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.log(level, message, *args)


def _same_but_whitespace(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())


def _characters(text: str) -> str:
    """Characters as a message names them: each quoted with its code point."""
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in dict.fromkeys(text))


def _unknown_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's unknown token: the one it declares and the one its tokenizer model uses (a
    tokenizer built from a `tokenizers` object may not declare it)."""
    ids = {tokenizer.unk_token_id}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    token = getattr(getattr(backend, "model", None), "unk_token", None)  # BPE, WordPiece, WordLevel
    if isinstance(token, str):
        ids.add(backend.token_to_id(token))
    return {i for i in ids if i is not None}


class _Markers:
    """Unique placeholder strings that no template trims, escapes or finds in the conversation."""

    def __init__(self, avoid: str = ""):
        self.nonce = secrets.token_hex(4)
        while self.nonce in avoid:
            self.nonce = secrets.token_hex(4)
        self.count = 0

    def new(self) -> str:
        self.count += 1
        return f"POFTMARK{self.nonce}N{self.count}"
