"""Token Cleaning: the selection math against a hand computation and the authors' algorithm, and the trainer's
completion_mask taking the unselected tokens out of the loss and its gradient."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft.chat import ConversationEncoder
from poft.demo.builders import save_model, tiny_llama
from poft.demo.methods import token_cleaning_data
from poft.demo.settings import MAX_LENGTH
from poft.errors import DataError
from poft.schema import COMPLETION_MASK
from poft.token_cleaning import KEEP_RATIO, select_global_top, token_influence
from poft.trainer import PoFTTrainer
from tests.conftest import as_dataset
from tests.test_trainer import config, whole_batch


def test_influence_is_base_loss_minus_reference_loss():
    base = torch.tensor([[-2.0, -1.0, -9.0]])
    reference = torch.tensor([[-0.5, -3.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    influence = token_influence(base, reference, mask)
    assert influence[0, :2].tolist() == [2.0 - 0.5, 1.0 - 3.0]
    assert math.isnan(influence[0, 2])


def test_global_top_share_with_ties_in_row_major_order():
    nan = float("nan")
    influence = torch.tensor([[0.5, nan, 0.2], [0.5, -1.0, 0.2]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    kept = select_global_top(influence, mask, 0.6)  # floor(5 * 0.6) = 3 of 5 response tokens
    # by hand: 0.5 (row 0), 0.5 (row 1), then the first of the tied 0.2s (row 0)
    assert kept.tolist() == [[True, False, True], [True, False, False]]
    assert not select_global_top(influence, mask, 0.0).any()
    assert select_global_top(influence, mask, 1.0).tolist() == mask.tolist()
    with pytest.raises(ValueError, match="NaN"):
        select_global_top(influence, torch.ones_like(mask), 0.6)


def test_paper_default_keep_ratio():
    assert KEEP_RATIO == 0.6  # fixed_model_cleaning.sh: data_prop=0.6


def authors_global_top_k(labels: list[list[int]], losses: list[list[float]], data_prop: float) -> set[tuple]:
    """`get_global_top_k_indices` of the authors' scripts/generate_token_label.py, as written there."""
    response_tokens = []
    for i, (sample_labels, sample_losses) in enumerate(zip(labels, losses, strict=True)):
        for j, (label, loss) in enumerate(zip(sample_labels, sample_losses, strict=True)):
            if label != -100:
                response_tokens.append((loss, i, j))
    top = sorted(response_tokens, key=lambda x: x[0], reverse=True)[: int(len(response_tokens) * data_prop)]
    return {(item[1], item[2]) for item in top}


def slow_token_losses(path: str, encoder: ConversationEncoder, conversations) -> list[list[float]]:
    """Each label's cross-entropy from one unbatched forward per conversation; 0 at position 0, as the authors'."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    losses = []
    for messages in conversations:
        ids = encoder.encode(messages).input_ids
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        losses.append([0.0] + [-log_probs[j - 1, ids[j]].item() for j in range(1, len(ids))])
    return losses


@pytest.fixture(scope="module")
def same_tokenizer_reference(tiny_models, tmp_path_factory) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    return str(save_model(tiny_llama(tokenizer, seed=9), tokenizer, tmp_path_factory.mktemp("ref") / "ref"))


def short_conversations(conversations):
    return [c for c in conversations if len(c) <= 3][:8]  # single exchanges, none truncated at MAX_LENGTH


def test_demo_selection_is_the_authors_global_top_k(tiny_models, conversations, same_tokenizer_reference):
    chats = short_conversations(conversations)
    data = token_cleaning_data(as_dataset(chats), tiny_models["chatml"], same_tokenizer_reference)
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(tiny_models["chatml"]), max_length=MAX_LENGTH)
    encoded = [encoder.encode(m) for m in chats]
    assert not any(e.truncated for e in encoded)
    labels = [
        [t if m and j > 0 else -100 for j, (t, m) in enumerate(zip(e.input_ids, e.response_mask, strict=True))]
        for e in encoded
    ]
    base = slow_token_losses(tiny_models["chatml"], encoder, chats)
    reference = slow_token_losses(same_tokenizer_reference, encoder, chats)
    diff = [[b - r for b, r in zip(rb, rr, strict=True)] for rb, rr in zip(base, reference, strict=True)]
    expected = authors_global_top_k(labels, diff, 0.6)
    kept = {(i, j) for i, mask in enumerate(data[COMPLETION_MASK]) for j, keep in enumerate(mask) if keep}
    assert kept == expected
    assert [len(m) for m in data[COMPLETION_MASK]] == [len(e.input_ids) for e in encoded]


def test_masked_tokens_get_no_gradient(tiny_models, conversations, tmp_path):
    """The trainer's SFT loss with a completion_mask equals the cross-entropy over the kept tokens alone, in value
    and gradient, computed here from a plain forward."""
    chats = short_conversations(conversations)
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(tiny_models["chatml"]), max_length=256)
    encoded = [encoder.encode(m) for m in chats]
    masks = [[int(m and j % 3 != 0) for j, m in enumerate(e.response_mask)] for e in encoded]
    trainer = PoFTTrainer(
        tiny_models["chatml"],
        args=config(tmp_path, objective="sft"),
        train_dataset=as_dataset(chats, **{COMPLETION_MASK: masks}),
    )
    model = trainer.model
    model.train()
    model.zero_grad()
    trainer.compute_loss(model, whole_batch(trainer)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    total, count = 0.0, 0
    for e, mask in zip(encoded, masks, strict=True):
        log_probs = model(input_ids=torch.tensor([e.input_ids])).logits[0].log_softmax(-1)
        kept = [j for j in range(1, len(e.input_ids)) if mask[j]]
        total = total - sum(log_probs[j - 1, e.input_ids[j]] for j in kept)
        count += len(kept)
    assert 0 < count < sum(e.num_response_tokens for e in encoded)
    (total / count).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4)


def test_completion_mask_is_refused_with_poft_and_checked_for_length(tiny_models, scored_chatml, tmp_path):
    data = scored_chatml.add_column(COMPLETION_MASK, [[1]] * len(scored_chatml))
    with pytest.raises(DataError, match="objective='sft' only"):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path, objective="poft_token"), train_dataset=data)
    with pytest.raises(DataError, match="row 0: 'completion_mask' has 1 entries"):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path, objective="sft"), train_dataset=data)


@pytest.fixture(scope="module")
def scored_chatml(tiny_models, conversations):
    return as_dataset(conversations, ref_score=[-1.0] * len(conversations))
