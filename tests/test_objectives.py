"""The PoFT math against formulas computed by hand and against autograd of the definitions."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from poft.objective_registry import DEFAULT, HELP, NAMES, OBJECTIVES, objective_named
from poft.objectives import (
    StepTensors,
    nll_loss,
    normalised_nll_loss,
    poft_calibrated_objective,
    poft_loss,
    poft_token_loss,
    poft_token_objective,
    poft_weights,
    sequence_mean_log_probs,
)


def test_poft_loss_equals_formula_by_hand():
    policy, ref = [-1.2, -0.3, -2.5], [-1.0, -0.9, -0.4]
    for beta, gamma in [(1.0, 0.0), (2.5, 0.3), (0.1, -1.0)]:
        expected = (
            sum(-math.log(1 / (1 + math.exp(-(beta * (p - r) + gamma)))) for p, r in zip(policy, ref, strict=False))
            / 3
        )
        got = poft_loss(torch.tensor(policy, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), beta, gamma)
        assert got.item() == pytest.approx(expected, abs=1e-12)
    total = poft_loss(torch.tensor(policy), torch.tensor(ref), reduction="sum")
    assert total.item() == pytest.approx(3 * poft_loss(torch.tensor(policy), torch.tensor(ref)).item(), rel=1e-6)


def _log_probs(weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A toy model: token log-probs from a learnable logit table."""
    return torch.log_softmax(weight, -1).gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("beta, gamma", [(1.0, 0.0), (2.0, 0.5)])
def test_gradient_is_weighted_normalised_cross_entropy(beta, gamma):
    torch.manual_seed(0)
    weight = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0, 1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    ref = torch.tensor([-2.0, -3.5, -1.0], dtype=torch.float64)

    r_theta, _ = sequence_mean_log_probs(_log_probs(weight, tokens), mask)
    (grad_poft,) = torch.autograd.grad(poft_loss(r_theta, ref, beta, gamma), weight)

    # the paper's identity: grad L_PoFT = beta * tau * grad L_CE(length-normalised), per sample, averaged
    expected = torch.zeros_like(weight)
    for i in range(3):
        r_i = _log_probs(weight, tokens)[i][mask[i]].mean()
        (grad_ce,) = torch.autograd.grad(-r_i, weight)
        tau = torch.sigmoid(-(beta * (r_i.detach() - ref[i]) + gamma))
        expected += beta * tau * grad_ce / 3
    torch.testing.assert_close(grad_poft, expected)
    if beta == 1.0 and gamma == 0.0:
        torch.testing.assert_close(poft_weights(r_theta, ref), torch.sigmoid(ref - r_theta.detach()))


def test_packed_sequence_means_equal_padded():
    torch.manual_seed(1)
    lengths = [5, 2, 4]
    rows = [torch.randn(n) for n in lengths]
    masks = [torch.rand(n) > 0.3 for n in lengths]
    masks[1][:] = True
    padded = torch.zeros(3, 5)
    padded_mask = torch.zeros(3, 5, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=False)):
        padded[i, : len(r)], padded_mask[i, : len(r)] = r, m
    means, counts = sequence_mean_log_probs(padded, padded_mask)
    packed = torch.cat(rows)[None]
    packed_mask = torch.cat(masks)[None]
    seq_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    packed_means, packed_counts = sequence_mean_log_probs(packed, packed_mask, seq_ids, 3)
    torch.testing.assert_close(packed_means, means)
    torch.testing.assert_close(packed_counts, counts)
    by_hand = torch.stack([r[m].mean() for r, m in zip(rows, masks, strict=False)])
    torch.testing.assert_close(means, by_hand)


def test_nll_is_token_mean_or_sum_over_given_count():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert nll_loss(log_probs, mask).item() == pytest.approx(7.0 / 3)
    assert nll_loss(log_probs, mask, num_items=7).item() == pytest.approx(1.0)


def test_normalised_nll_is_the_mean_of_per_sequence_means():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    r_theta, _ = sequence_mean_log_probs(log_probs, mask)
    # by hand: sequence NLLs (1 + 2) / 2 = 1.5 and 4 / 1 = 4, mean 2.75; token-level SFT gives 7 / 3
    assert normalised_nll_loss(r_theta).item() == pytest.approx(2.75)
    assert normalised_nll_loss(r_theta, num_items=11).item() == pytest.approx(5.5 / 11)


def test_token_weighted_poft_loss_equals_formula_by_hand():
    policy, ref, tokens = [-1.2, -0.3, -2.5], [-1.0, -0.9, -0.4], [4, 1, 10]
    for beta, gamma in [(1.0, 0.0), (2.5, 0.3)]:
        per_sequence = [
            -math.log(1 / (1 + math.exp(-(beta * (p - r) + gamma)))) for p, r in zip(policy, ref, strict=True)
        ]
        expected = sum(n * loss for n, loss in zip(tokens, per_sequence, strict=True)) / sum(tokens)
        got = poft_token_loss(
            torch.tensor(policy, dtype=torch.float64),
            torch.tensor(ref, dtype=torch.float64),
            torch.tensor(tokens),
            beta,
            gamma,
        )
        assert got.item() == pytest.approx(expected, abs=1e-12)
        # over a larger step (gradient accumulation, several processes) it is divided by that step's tokens
        partial = poft_token_loss(torch.tensor(policy), torch.tensor(ref), torch.tensor(tokens), beta, gamma, 60)
        assert partial.item() == pytest.approx(expected * sum(tokens) / 60, rel=1e-6)


def test_calibrated_poft_equals_formula_by_hand():
    """poft_calibrated: token-weighted PoFT with r_ref + H_ref in place of r_ref; hand-computed numbers."""
    policy, ref, entropy, tokens = [-1.2, -0.3, -2.5], [-1.0, -0.9, -0.4], [0.9, 0.2, 0.0], [4, 1, 10]
    beta, gamma = 2.0, 0.5
    # margins 2 * (-1.2 - (-0.1)) + 0.5 = -1.7, 2 * (-0.3 - (-0.7)) + 0.5 = 1.3, 2 * (-2.5 - (-0.4)) + 0.5 = -3.7
    per_sequence = [math.log1p(math.exp(1.7)), math.log1p(math.exp(-1.3)), math.log1p(math.exp(3.7))]
    expected = (4 * per_sequence[0] + per_sequence[1] + 10 * per_sequence[2]) / 15
    step = StepTensors(
        torch.zeros(3, 1),
        torch.ones(3, 1),
        torch.tensor(policy, dtype=torch.float64),
        torch.tensor(tokens),
        torch.tensor(ref, dtype=torch.float64),
        None,
        beta,
        gamma,
        ref_entropy=torch.tensor(entropy, dtype=torch.float64),
    )
    assert poft_calibrated_objective(step).item() == pytest.approx(expected, abs=1e-12)
    # with every entropy 0 (references sure of each next token) it is poft_token itself
    sure = dataclasses.replace(step, ref_entropy=torch.zeros(3, dtype=torch.float64))
    assert poft_calibrated_objective(sure).item() == pytest.approx(poft_token_objective(sure).item(), abs=1e-12)


@pytest.mark.parametrize("beta, gamma", [(1.0, 0.0), (2.0, 0.5)])
def test_token_weighted_gradient_is_weighted_token_level_cross_entropy(beta, gamma):
    """grad = beta * sum_i w_i * grad(summed NLL of sequence i) / N_tokens, w_i = sigmoid(-(beta (r_i - ref_i) + gamma))."""
    torch.manual_seed(0)
    weight = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0, 1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    ref = torch.tensor([-2.0, -3.5, -1.0], dtype=torch.float64)

    r_theta, counts = sequence_mean_log_probs(_log_probs(weight, tokens), mask)
    (grad,) = torch.autograd.grad(poft_token_loss(r_theta, ref, counts, beta, gamma), weight)

    expected = torch.zeros_like(weight)
    for i in range(3):
        log_probs = _log_probs(weight, tokens)[i][mask[i]]
        (grad_nll,) = torch.autograd.grad(-log_probs.sum(), weight)
        w = torch.sigmoid(-(beta * (log_probs.detach().mean() - ref[i]) + gamma))
        expected += beta * w * grad_nll / mask.sum()
    torch.testing.assert_close(grad, expected)
    # where every weight is the same, it is token-level SFT's gradient scaled by that weight
    (grad_sft,) = torch.autograd.grad(nll_loss(_log_probs(weight, tokens), mask), weight)
    r_theta, counts = sequence_mean_log_probs(_log_probs(weight, tokens), mask)
    tied = r_theta.detach() + 0.7
    (grad_tied,) = torch.autograd.grad(poft_token_loss(r_theta, tied, counts, 1.0, 0.0), weight)
    torch.testing.assert_close(grad_tied, torch.sigmoid(torch.tensor(0.7, dtype=torch.float64)) * grad_sft)


def test_every_declared_objective_has_one_name_a_loss_and_help():
    assert len(set(NAMES)) == len(OBJECTIVES) and DEFAULT in OBJECTIVES
    for objective in OBJECTIVES:
        assert objective_named(objective.name) is objective
        assert callable(objective.loss_function()) and f"{objective.name}: {objective.help}" in HELP
    assert [o.name for o in OBJECTIVES if o.trl_loss] == ["sft"]


def test_declared_losses_are_the_objectives_formulas():
    """Each objective's loss, called as the trainer calls it, against the formula it stands for."""
    torch.manual_seed(0)
    log_probs, mask = -torch.rand(3, 5), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    r_theta, counts = sequence_mean_log_probs(log_probs, mask)
    ref, entropy = torch.tensor([-0.3, -0.6, -0.2]), torch.tensor([0.1, 0.5, 0.0])
    step = StepTensors(log_probs, mask, r_theta, counts, ref, num_items=None, beta=2.0, gamma=0.5, ref_entropy=entropy)
    expected = {
        "poft": poft_loss(r_theta, ref, 2.0, 0.5),
        "poft_token": (counts * -F.logsigmoid(2.0 * (r_theta - ref) + 0.5)).sum() / counts.sum(),
        "poft_calibrated": (counts * -F.logsigmoid(2.0 * (r_theta - ref - entropy) + 0.5)).sum() / counts.sum(),
        "sft": -(log_probs * mask).sum() / mask.sum(),
        "sft_norm": -r_theta.mean(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(objective_named(name).loss_function()(step), value)
    dft = StepTensors(log_probs, mask, None, None, None, num_items=4, dft=True)
    torch.testing.assert_close(
        objective_named("sft").loss_function()(dft), -(log_probs * log_probs.exp() * mask).sum() / 4
    )
