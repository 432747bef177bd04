"""Response-only log-probs equal the full LM head's: plain logits and TRL's fused head, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head

from poft.logprobs import response_head_supported, response_log_probs

VOCAB = 300
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
OUTPUTS = ("log_probs", "entropy", "is_top1")


def llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**COMMON, **HEADS, **overrides)).eval()


def gemma2() -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(**COMMON, **HEADS, final_logit_softcapping=2.0, attn_implementation="eager")
    return Gemma2ForCausalLM(config).eval()


def mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(**COMMON, **HEADS, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
    return MixtralForCausalLM(config).eval()


MODELS = {"llama": llama, "llama_tied": lambda: llama(tie_word_embeddings=True), "gemma2": gemma2, "mixtral": mixtral}


def sequences(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of varied lengths; labels -100 on a prompt of varied length."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in (23, 7, 16, 40, 3):
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        prompt = length // 2
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def padded(seqs) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in seqs)
    batch = {k: torch.zeros(len(seqs), width, dtype=torch.long) for k in ("input_ids", "attention_mask")}
    batch["labels"] = torch.full((len(seqs), width), -100)
    for row, (ids, labels) in enumerate(seqs):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, : len(ids)] = 1
        batch["labels"][row, : len(ids)] = torch.tensor(labels)
    return batch


def packed(seqs) -> dict[str, torch.Tensor]:
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return collator([{"input_ids": ids, "labels": labels} for ids, labels in seqs])


def full_logits_reference(model, seqs, layout) -> torch.Tensor:
    """Each sequence alone through the model's own forward, log_softmax over its full logits, gathered at the next
    token, then laid out as `layout` aligns them (padded rows, or one packed row with a zero at each boundary)."""
    rows = []
    for ids, labels in seqs:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        shifted = torch.tensor(labels[1:])
        log_probs = logits.log_softmax(-1).gather(-1, shifted.clamp(min=0)[:, None]).squeeze(-1)
        rows.append(log_probs * (shifted != -100))
    if layout is packed:
        return torch.cat([torch.cat([r, r.new_zeros(1)]) for r in rows])[:-1][None]
    width = max(len(ids) for ids, _ in seqs) - 1
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("layout", [padded, packed])
@pytest.mark.parametrize("rows", [256, 5])
def test_values_equal_the_full_logits_and_trl_fused_head(name, layout, rows, monkeypatch):
    monkeypatch.setattr("poft.logprobs.CPU_ROWS", rows)
    model = MODELS[name]()
    batch = layout(sequences())
    with torch.no_grad():
        expected = full_logits_reference(model, sequences(), layout)
        trl_model = copy.deepcopy(model)
        add_fused_lm_head(trl_model, outputs=OUTPUTS)
        trl = trl_model(**batch, fused_lm_head=True)
        ours = response_log_probs(model, batch, OUTPUTS)
    assert response_head_supported(model)
    assert torch.equal(ours.label_mask, batch["labels"][:, 1:] != -100)
    torch.testing.assert_close(ours.log_probs, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.log_probs, trl.log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.entropy, trl.entropy, rtol=0, atol=1e-5)
    assert torch.equal(ours.is_top1, trl.is_top1)
    torch.testing.assert_close(ours.loss, trl.loss, rtol=0, atol=1e-5)
    if name == "mixtral":
        torch.testing.assert_close(ours.aux_loss, trl.aux_loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "llama_tied", "gemma2"])
@pytest.mark.parametrize("layout", [padded, packed])
@pytest.mark.parametrize("rows", [256, 5])
def test_gradients_equal_the_full_logits(name, layout, rows, monkeypatch):
    """A loss that weighs every token differently (as PoFT's per-sequence weights do), with the response rows in one
    kernel call or in several."""
    monkeypatch.setattr("poft.logprobs.CPU_ROWS", rows)
    batch = layout(sequences(1))
    model = MODELS[name]().train()
    reference = copy.deepcopy(model)
    ours = response_log_probs(model, batch, OUTPUTS)
    expected = full_logits_reference(reference, sequences(1), layout)
    weights = torch.linspace(0.5, 2.0, expected.numel()).view(expected.shape)
    (ours.log_probs * weights).sum().backward()
    (expected * weights).sum().backward()
    grads = dict(reference.named_parameters())
    for key, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[key].grad, rtol=0, atol=1e-5, msg=key)


def test_a_batch_without_response_tokens_gives_a_differentiable_zero():
    model = llama().train()
    batch = padded(sequences())
    batch["labels"].fill_(-100)
    out = response_log_probs(model, batch)
    assert out.log_probs.abs().sum() == 0
    out.log_probs.sum().backward()  # connected to the graph, no error


def test_peft_model_goes_through_its_wrapper_and_matches_merged_weights():
    from peft import LoraConfig, get_peft_model

    batch = padded(sequences())
    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        ours = response_log_probs(model, batch)
        expected = full_logits_reference(model, sequences(), padded)
    torch.testing.assert_close(ours.log_probs, expected, rtol=0, atol=1e-5)


def test_scaled_logits_fall_back_to_trl_fused_head():
    """Cohere scales its logits (`logit_scale`): left to TRL's fused head, which knows how, with the same result."""
    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(**COMMON, **HEADS, logit_scale=0.5)).eval()
    batch = padded(sequences())
    assert not response_head_supported(model)
    with torch.no_grad():
        ours = response_log_probs(model, batch)
        expected = full_logits_reference(model, sequences(), padded)
    torch.testing.assert_close(ours.log_probs, expected, rtol=0, atol=1e-5)


def test_other_calls_reach_the_original_forward():
    model = llama()
    batch = padded(sequences())
    response_log_probs(model, batch)  # installs the head
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (*batch["input_ids"].shape, VOCAB)
