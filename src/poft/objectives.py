"""The math of PoFT as pure tensor functions, shared by scoring and training.

A model's preference score of a conversation is the mean log-probability of its response tokens
(`sequence_mean_log_probs`). PoFT trains the target to score each pair higher than the references do,
with a Bradley-Terry loss: L = -log sigmoid(beta * (r_theta - r_ref) + gamma). Its gradient is
beta * sigmoid(-(beta * (r_theta - r_ref) + gamma)) times the gradient of the length-normalised
cross-entropy, so `poft_weights` is the per-sample data weight that the references induce.

`poft_token_loss` weighs each sequence's Bradley-Terry loss by its response-token count and divides by the
step's response tokens. Since T_i * r_theta_i is sequence i's summed log-prob, its gradient is
beta * w_i * grad(summed NLL of sequence i) / N_tokens with w_i the same PoFT weight: token-level SFT with
each sequence scaled by the weight, so long responses count per token as SFT counts them.

`poft_calibrated_objective` is token-weighted PoFT against `calibrated_reference`: r_ref + H_ref, the references'
mean response log-prob plus their mean entropy at the same positions. -H is the log-prob a reference expects of its
own next token, so r + H is how much more likely (> 0) or less likely (< 0) the response is to a reference than its
own answers are: near 0 where a reference is unsure and the response is as plausible as anything it would say,
well below 0 only where a confident reference finds the response wrong. The weight then follows what a reference
knows: a family of rows it is unsure of is no longer down-weighted as if it were noise.

Each training objective's loss is one function of a `StepTensors` (`poft_objective`, `poft_token_objective`,
`poft_calibrated_objective`, `sft_objective`, `sft_norm_objective`), so the trainer calls whichever
`poft.objective_registry` declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]


def sequence_mean_log_probs(
    token_log_probs: torch.Tensor,
    mask: torch.Tensor,
    seq_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean of `token_log_probs` over `mask`, and the per-sequence token counts.

    Padded batches: one sequence per row (`seq_ids` None). Packed / padding-free batches: `seq_ids`
    (same shape as the log-probs) gives each position's sequence index in [0, num_sequences); positions
    outside the mask may carry any valid index. Vectorised with scatter-add: no per-sequence loop, no
    host synchronisation. A sequence with no masked token gets mean 0 and count 0.
    """
    mask = mask.to(token_log_probs.dtype)
    masked = token_log_probs * mask
    if seq_ids is None:
        sums, counts = masked.sum(-1), mask.sum(-1)
    else:
        if num_sequences is None:
            raise ValueError("num_sequences is required with seq_ids")
        flat_ids = seq_ids.reshape(-1).clamp(0, num_sequences - 1)
        sums = masked.new_zeros(num_sequences).scatter_add(0, flat_ids, masked.reshape(-1))
        counts = mask.new_zeros(num_sequences).scatter_add(0, flat_ids, mask.reshape(-1))
    return sums / counts.clamp(min=1), counts


def poft_margins(
    policy_scores: torch.Tensor, ref_scores: torch.Tensor, beta: float = 1.0, gamma: float = 0.0
) -> torch.Tensor:
    """The Bradley-Terry logit beta * (r_theta - r_ref) + gamma of each sample."""
    return beta * (policy_scores - ref_scores.to(policy_scores.dtype)) + gamma


def poft_loss(
    policy_scores: torch.Tensor,
    ref_scores: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 0.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """-log sigmoid(beta * (r_theta - r_ref) + gamma), averaged (or summed) over samples."""
    losses = -F.logsigmoid(poft_margins(policy_scores, ref_scores, beta, gamma))
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def poft_token_loss(
    policy_scores: torch.Tensor,
    ref_scores: torch.Tensor,
    num_tokens: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 0.0,
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Token-weighted PoFT: sum_i T_i * -log sigmoid(beta (r_theta_i - r_ref_i) + gamma) / `num_items`.

    `num_tokens` holds each sequence's response-token count T_i; `num_items` is the step's response-token
    count (default: sum of `num_tokens`), so gradient accumulation and data parallelism see one large batch.
    """
    losses = poft_loss(policy_scores, ref_scores, beta, gamma, reduction="none")
    counts = num_tokens.to(losses.dtype)
    denominator = counts.sum() if num_items is None else num_items
    return (losses * counts).sum() / torch.as_tensor(denominator, device=losses.device).clamp(min=1)


def poft_weights(
    policy_scores: torch.Tensor, ref_scores: torch.Tensor, beta: float = 1.0, gamma: float = 0.0
) -> torch.Tensor:
    """sigmoid(-(beta * (r_theta - r_ref) + gamma)): the weight PoFT puts on each sample's normalised CE.

    For beta = 1, gamma = 0 this is the paper's tau = sigmoid(r_ref - r_theta); the full gradient factor
    is beta times this weight.
    """
    return torch.sigmoid(-poft_margins(policy_scores.detach(), ref_scores, beta, gamma))


def calibrated_reference(ref_scores: torch.Tensor, ref_entropies: torch.Tensor) -> torch.Tensor:
    """r_ref + H_ref: the references' mean response log-prob beyond the log-prob they expect of their own tokens (the
    negative of their mean entropy at the response positions)."""
    return ref_scores + ref_entropies.to(ref_scores.dtype)


def nll_loss(
    token_log_probs: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | int | None = None
) -> torch.Tensor:
    """SFT's token-level cross-entropy: the summed negative log-probs over `num_items` (default: masked tokens)."""
    total = -(token_log_probs * mask.to(token_log_probs.dtype)).sum()
    denominator = mask.sum() if num_items is None else num_items
    return total / torch.as_tensor(denominator, device=total.device).clamp(min=1)


def normalised_nll_loss(policy_scores: torch.Tensor, num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """Length-normalised SFT: the summed per-sequence NLL -r_theta over `num_items` sequences (default: all given).

    Every sequence counts once whatever its length, as in PoFT; token-level SFT (`nll_loss`) weighs sequences by
    their response length instead.
    """
    denominator = policy_scores.numel() if num_items is None else num_items
    return -policy_scores.sum() / torch.as_tensor(denominator, device=policy_scores.device).clamp(min=1)


@dataclass(frozen=True)
class StepTensors:
    """What an objective's loss reads from one micro-batch.

    `log_probs` and `mask` are the next-token log-probs at the response positions and their mask; `r_theta` and
    `counts` the per-sequence means and response-token counts (None where the objective needs neither and no
    reference is given); `ref` the references' scores (None without them); `num_items` the optimizer step's
    sequences or response tokens (None: this micro-batch's); `dft` asks for TRL's Dynamic Fine-Tuning;
    `ref_entropy` the references' mean entropy at the response positions (None unless the objective reads it).
    """

    log_probs: torch.Tensor
    mask: torch.Tensor
    r_theta: torch.Tensor | None
    counts: torch.Tensor | None
    ref: torch.Tensor | None
    num_items: torch.Tensor | int | None
    beta: float = 1.0
    gamma: float = 0.0
    dft: bool = False
    ref_entropy: torch.Tensor | None = None


def poft_objective(step: StepTensors) -> torch.Tensor:
    """The paper's PoFT loss summed over this micro-batch's sequences, over the step's sequences."""
    total = poft_loss(step.r_theta, step.ref, step.beta, step.gamma, reduction="sum")
    return total / (step.num_items if step.num_items is not None else step.r_theta.numel())


def poft_token_objective(step: StepTensors) -> torch.Tensor:
    """Token-weighted PoFT over the step's response tokens."""
    return poft_token_loss(step.r_theta, step.ref, step.counts, step.beta, step.gamma, step.num_items)


def poft_calibrated_objective(step: StepTensors) -> torch.Tensor:
    """Token-weighted PoFT against the calibrated references r_ref + H_ref, over the step's response tokens."""
    reference = calibrated_reference(step.ref, step.ref_entropy)
    return poft_token_loss(step.r_theta, reference, step.counts, step.beta, step.gamma, step.num_items)


def sft_objective(step: StepTensors) -> torch.Tensor:
    """TRL's token-level cross-entropy; with `dft`, TRL's DFT: each token's NLL scaled by its (detached)
    probability."""
    log_probs = step.log_probs * step.log_probs.detach().exp() if step.dft else step.log_probs
    return nll_loss(log_probs, step.mask, step.num_items)


def sft_norm_objective(step: StepTensors) -> torch.Tensor:
    """Length-normalised SFT over the step's sequences."""
    return normalised_nll_loss(step.r_theta, step.num_items)
