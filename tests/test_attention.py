"""Packed (padding-free) scoring keeps conversations apart: each attention path against every conversation scored alone.

PyTorch's varlen kernel runs on CUDA only, so on CPU `poft_varlen` is exercised with stand-in kernels of the
two signatures torch releases have used (a per-conversation loop of causal sdpa); a leaky stand-in, causal
over the whole packed row, shows the comparison would catch a kernel that lets conversations see each other.
flex_attention needs a compile that takes minutes on CPU; bench/packed_attention.py checks it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head

from poft import attention
from poft.batching import collate_packed, iter_scores
from poft.chat import EncodedConversation

LENGTHS = [37, 5, 64, 18, 90, 3, 41]


def gqa(key, value, heads):
    groups = heads // key.shape[1]
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def per_conversation(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    """Stand-in for torch.nn.attention.varlen.varlen_attn (newer signature): causal sdpa per conversation."""
    assert window_size == (-1, 0)
    if not enable_gqa:
        assert query.shape[1] == key.shape[1]
    key, value = gqa(key, value, query.shape[1])
    out = torch.empty_like(query)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1)
    return out


def per_conversation_old(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None, scale=None
):
    """The older signature: `is_causal`, no grouped-query support."""
    assert is_causal and query.shape[1] == key.shape[1]
    return per_conversation(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=(-1, 0))


def leaky(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """Causal over the whole packed row: every conversation sees the ones before it."""
    whole = torch.tensor([0, query.shape[0]], dtype=torch.int32)
    return per_conversation(
        query, key, value, whole, whole, 0, 0, scale=scale, window_size=window_size, enable_gqa=True
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    add_fused_lm_head(model)
    return model


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(1)
    conversations = []
    for n in LENGTHS:
        ids = torch.randint(1, 97, (n,), generator=generator).tolist()
        conversations.append(EncodedConversation(ids, [0] * (n // 2) + [1] * (n - n // 2), truncated=False))
    return conversations


@pytest.fixture(scope="module")
def alone(model, data):
    """fp32 slow path: each conversation on its own, full logits, log_softmax, mean over its response tokens."""
    model.set_attn_implementation("eager")
    scores = []
    with torch.no_grad():
        for e in data:
            ids = torch.tensor([e.input_ids])
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            mask = torch.tensor(e.response_mask[1:], dtype=torch.bool)
            scores.append(logps[mask].mean().item())
    return torch.tensor(scores)


def packed_scores(model, data, implementation):
    model.set_attn_implementation(implementation)
    scores = torch.full((len(data),), float("nan"))
    batches = 0
    for batch, means, _, _ in iter_scores(model, data, 0, 4096, torch.device("cpu"), "test", packing=True):
        scores[batch] = torch.tensor(means)
        batches += 1
    assert batches == 1  # every conversation shares one row
    return scores


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_dense_masks_keep_packed_conversations_apart(model, data, alone, implementation):
    torch.testing.assert_close(packed_scores(model, data, implementation), alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", [per_conversation, per_conversation_old])
def test_varlen_path_keeps_packed_conversations_apart(model, data, alone, kernel, monkeypatch):
    monkeypatch.setattr(attention, "torch_varlen_kernel", lambda: kernel)
    torch.testing.assert_close(packed_scores(model, data, attention.VARLEN), alone, rtol=0, atol=1e-5)


def test_a_leaky_kernel_is_caught(model, data, alone, monkeypatch):
    monkeypatch.setattr(attention, "torch_varlen_kernel", lambda: leaky)
    difference = (packed_scores(model, data, attention.VARLEN) - alone).abs()
    assert difference.max() > 1e-3


def test_varlen_reads_boundaries_from_position_ids_without_the_collator_kwargs(model, data, alone, monkeypatch):
    monkeypatch.setattr(attention, "torch_varlen_kernel", lambda: per_conversation)
    model.set_attn_implementation(attention.VARLEN)
    batch = collate_packed(data, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    first = len(data[0].input_ids)
    with torch.no_grad():
        own = model(input_ids=torch.tensor([data[1].input_ids])).logits[0]
    torch.testing.assert_close(logits[first : first + len(data[1].input_ids)], own, rtol=0, atol=1e-5)


def test_padded_batches_through_varlen_model_fall_back_to_sdpa(model, data, alone, monkeypatch):
    monkeypatch.setattr(attention, "torch_varlen_kernel", lambda: leaky)  # must not be reached
    model.set_attn_implementation(attention.VARLEN)
    scores = torch.full((len(data),), float("nan"))
    for batch, means, _, _ in iter_scores(model, data, 0, 4096, torch.device("cpu"), "test", packing=False):
        scores[batch] = torch.tensor(means)
    torch.testing.assert_close(scores, alone, rtol=0, atol=1e-5)


def test_boundaries_match_trls_collator():
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": list(range(1, n + 1))} for n in LENGTHS])
    cu, longest = attention.cu_seqlens_from_position_ids(batch["position_ids"])
    assert cu.tolist() == batch["cu_seq_lens_q"].tolist()
    assert longest == batch["max_length_q"] == max(LENGTHS)


def test_packing_pays_only_where_attention_skips_other_conversations():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention.packing_pays(attention.VARLEN, cuda)
    assert attention.packing_pays("flash_attention_2", cuda)
    assert attention.packing_pays("flex_attention", cuda)
    assert not attention.packing_pays("sdpa", cuda)  # correct, but a dense mask over the whole row
    assert not attention.packing_pays("eager", cuda)
    assert not attention.packing_pays(attention.VARLEN, cpu)


def test_varlen_is_the_default_only_for_plain_causal_attention(model):
    assert attention.plain_causal(model.config)
    assert not attention.use_varlen_by_default(model, torch.device("cpu"))  # the kernel is CUDA-only
    windowed = LlamaConfig(sliding_window=4096)  # as Mistral v0.1
    assert not attention.plain_causal(windowed)
    assert attention.plain_causal(LlamaConfig(sliding_window=4096, use_sliding_window=False))  # as Qwen2
    assert not attention.plain_causal(
        LlamaConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    )
    assert not attention.plain_causal(LlamaConfig(attn_logit_softcapping=50.0))  # as Gemma 2


def test_models_with_their_own_attention_code_are_not_packed_by_default(model):
    model.set_attn_implementation(attention.VARLEN)
    assert attention.routes_attention(model)

    class OwnAttention(torch.nn.Module):  # stands for remote code that ignores the attention interface
        config = model.config

    assert not attention.routes_attention(OwnAttention())
    assert not attention.packs(OwnAttention(), torch.device("cuda"))
    assert attention.packs(OwnAttention(), torch.device("cuda"), requested=True)  # the user's choice stands
