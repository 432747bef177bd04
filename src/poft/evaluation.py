"""Evaluate a model on data with checkable answers: greedy exact match and held-out response likelihood.

Prompts are rendered with the model's own chat template (generation prompt added), decoded greedily,
and compared with the `answer` column. The likelihood is the same response score `poft score` computes,
so held-out numbers are comparable with the references'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset

from poft.chat import ConversationEncoder
from poft.scoring import model_scores


def prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last]]


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: Sequence[Sequence[dict]], *, max_new_tokens: int = 32, batch_size: int = 64
) -> list[str]:
    """Greedy completions of each prompt (a message list), special tokens removed."""
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
        ).to(device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
        )
        new_tokens = generated[:, batch["input_ids"].size(1) :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    model.train(was_training)
    return outputs


def exact_match_accuracy(
    model, tokenizer, dataset: Dataset, *, answer_column: str = "answer", max_new_tokens: int = 32, batch_size: int = 64
) -> tuple[float, list[str]]:
    """Share of rows whose greedy response equals `answer_column` (whitespace-trimmed), and the responses."""
    if answer_column not in dataset.column_names:
        raise ValueError(f"The dataset has no {answer_column!r} column to check answers against; pass answer_column.")
    prompts = [prompt_messages(m) for m in dataset["messages"]]
    predictions = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = sum(p.strip() == str(a).strip() for p, a in zip(predictions, dataset[answer_column], strict=True))
    return correct / max(len(predictions), 1), predictions


def heldout_log_likelihood(model, tokenizer, dataset: Dataset, *, max_length: int | None = None) -> float:
    """Mean over rows of the mean response log-prob (the PoFT score) on held-out data."""
    scores = model_scores(model, ConversationEncoder(tokenizer, max_length=max_length), dataset["messages"])
    kept = [s for s in scores if s is not None]
    return sum(kept) / max(len(kept), 1)
