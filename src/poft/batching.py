"""Batches for scoring: length-sorted, filled to a token budget, padded or packed, never padded to max_length.

`iter_scores` runs a model over encoded conversations, log-probs from the response positions alone
(`poft.logprobs`), and yields each batch's per-conversation mean response log-prob, token count and mean entropy
of the model's next-token distribution at those positions (`BatchScores`); `model_scores` is the scores for an
in-memory model and a list of conversations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from poft.chat import ConversationEncoder, EncodedConversation
from poft.logprobs import response_log_probs
from poft.objectives import sequence_mean_log_probs

# Default token budget of a batch, by device (bench/batching.py): on CPU, batches beyond about 2048 tokens were
# no faster than one conversation at a time; GPUs need large batches to fill. Not measured on a GPU yet.
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384
# Largest share of padding in a padded batch: a length-sorted batch is split where the next conversation would
# push it above this. Padding costs the backbone as much as real tokens do; bench/batching.py measures it.
MAX_PADDING = 0.2


class BatchScores(NamedTuple):
    """One batch of `iter_scores`: the conversations' indices, and per conversation its mean response log-prob, its
    response-token count and, where asked for, the mean entropy of the model's next-token distribution at its
    response positions (None otherwise: it costs one more pass over the vocabulary)."""

    indices: list[int]
    means: list[float]
    counts: list[int]
    entropies: list[float] | None


def token_budget_batches(
    lengths: Sequence[int], batch_tokens: int, max_padding: float = MAX_PADDING
) -> Iterator[list[int]]:
    """Indices grouped longest first so that batch size x longest length stays within `batch_tokens` and padding
    stays within `max_padding` of the batch (1 lifts that bound).

    A sequence longer than the budget gets a batch of its own.
    """

    def full(batch: list[int], real: int, next_length: int) -> bool:
        padded = (len(batch) + 1) * lengths[batch[0]]
        return padded > batch_tokens or real + next_length < (1 - max_padding) * padded

    return _longest_first(lengths, full)


def packed_batches(lengths: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped longest first so that the summed length stays within `batch_tokens` (no padding)."""
    return _longest_first(lengths, lambda batch, real, next_length: real + next_length > batch_tokens)


def _longest_first(lengths: Sequence[int], full: Callable[[list[int], int, int], bool]) -> Iterator[list[int]]:
    """Indices, longest first, in batches closed where `full(batch, its real tokens, the next length)` says so."""
    batch: list[int] = []
    real = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        if batch and full(batch, real, lengths[index]):
            yield batch
            batch, real = [], 0
        batch.append(index)
        real += lengths[index]
    if batch:
        yield batch


def collate_packed(encoded: Sequence[EncodedConversation], device: torch.device) -> dict[str, torch.Tensor]:
    """One padding-free row through TRL's collator: position ids restart per conversation, and the
    cumulative sequence lengths let varlen attention kernels keep the conversations apart."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # seconds to import: only where packing

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": e.input_ids, "labels": e.labels()} for e in encoded])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def score_packed_batch(
    model, batch: dict[str, torch.Tensor], num_sequences: int, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-conversation mean response log-prob, token count and (with `entropy`) mean entropy of a packed row."""
    seq_ids = batch["seq_idx"][:, 1:].long()  # the conversation each next-token prediction belongs to
    return _sequence_scores(model, batch, entropy, seq_ids, num_sequences)


def _sequence_scores(
    model, batch: dict[str, torch.Tensor], entropy: bool, *grouping
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The response head's log-probs (and entropies, where asked: one more pass over the vocabulary) averaged per
    sequence: per row of a padded batch, or per `grouping` (sequence ids, their number) of a packed one."""
    asked = ("log_probs", "entropy") if entropy else ("log_probs",)
    outputs = response_log_probs(model, batch, asked, cast_lm_head_to_fp32=True)
    means, counts = sequence_mean_log_probs(outputs.log_probs.float(), outputs.label_mask, *grouping)
    if not entropy:
        return means, counts, None
    return means, counts, sequence_mean_log_probs(outputs.entropy.float(), outputs.label_mask, *grouping)[0]


def collate(
    encoded: Sequence[EncodedConversation], pad_token_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and response-only labels."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels())
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


@torch.no_grad()
def score_batch(
    model, batch: dict[str, torch.Tensor], entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean response log-prob, response token count and (with `entropy`) mean entropy of each row, from the response
    positions alone."""
    return _sequence_scores(model, batch, entropy)


def default_batch_tokens(device: torch.device) -> int:
    return GPU_BATCH_TOKENS if device.type in ("cuda", "xpu") else CPU_BATCH_TOKENS


def iter_scores(
    model,
    encoded: Sequence[EncodedConversation],
    pad_token_id: int,
    batch_tokens: int | None,
    device: torch.device,
    desc: str,
    packing: bool = False,
    max_padding: float = MAX_PADDING,
    entropy: bool = False,
) -> Iterator[BatchScores]:
    """Score `encoded` in length-sorted token-budget batches: `BatchScores` per batch.

    `batch_tokens` None: the device's default (`default_batch_tokens`). Padded batches by default, each at most
    `max_padding` padding; `packing` concatenates conversations into one
    padding-free row instead.
    The LM head runs in fp32 on the response positions only (`poft.logprobs.response_log_probs`).
    """
    lengths = [len(e.input_ids) for e in encoded]
    batch_tokens = batch_tokens or default_batch_tokens(device)
    batches = (
        packed_batches(lengths, batch_tokens) if packing else token_budget_batches(lengths, batch_tokens, max_padding)
    )
    with tqdm(total=sum(lengths), unit="tok", unit_scale=True, desc=desc, leave=False, disable=None) as bar:
        for batch in batches:
            chosen = [encoded[i] for i in batch]
            if packing:
                means, counts, entropies = score_packed_batch(
                    model, collate_packed(chosen, device), len(batch), entropy
                )
            else:
                means, counts, entropies = score_batch(model, collate(chosen, pad_token_id, device), entropy)
            counts = [int(c) for c in counts.tolist()]
            yield BatchScores(batch, means.tolist(), counts, None if entropies is None else entropies.tolist())
            bar.update(sum(lengths[i] for i in batch))


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def model_scores(
    model, encoder: ConversationEncoder, conversations: Sequence[Sequence[dict]], batch_tokens: int | None = None
) -> list[float | None]:
    """r_m of each conversation for an in-memory model (None where no response token survives truncation)."""
    if "forward" not in vars(model):  # TRL's fused LM head patches the instance; trainers' models already have it
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    encoded = [encoder.encode(messages) for messages in conversations]
    scores: list[float | None] = [None] * len(encoded)
    scorable = [i for i, e in enumerate(encoded) if e.num_response_tokens > 0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for batch, means, _, _ in iter_scores(
        model, [encoded[i] for i in scorable], pad_token_id(encoder.tokenizer), batch_tokens, device, "Scoring"
    ):
        for i, mean in zip(batch, means, strict=True):
            scores[scorable[i]] = mean
    model.train(was_training)
    return scores
