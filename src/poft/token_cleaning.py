"""Token Cleaning's selection math (Pang et al., ICML 2025, arXiv 2502.01968), fixed-model variant, as pure functions.

A response token's influence is its loss under the base model minus its loss under a reference model tuned on a
small high-quality set (both sharing the target's tokenizer): a token the reference learned to predict and the
base did not carries what the high-quality data taught. The tokens with the highest influence over the whole
dataset are kept ("global" selection) and SFT trains on those only; every other label becomes -100.

Faithful to the authors' code (github.com/UCSC-REAL/TokenCleaning):
- `scripts/generate_token_label.py`: ``loss_diff = loss_base - loss_ref``; `get_global_top_k_indices` keeps
  ``int(len(response_tokens) * data_prop)`` tokens, sorted by ``loss_diff`` with Python's stable
  ``sorted(..., reverse=True)``, so equal influences keep their (row, position) order: the earlier token wins a tie.
- `fixed_model_cleaning.sh`: ``data_prop=0.6`` and ``select_token_level=global``; `generate_token_label.py`'s
  ``main`` also defaults to ``data_prop: float = 0.6`` (`KEEP_RATIO`).
- `scripts/calculate_token_loss.py`: the loss at position j is the cross-entropy of predicting token j from the
  tokens before it (shifted logits), i.e. the label's next-token log-prob as `poft.logprobs` computes it.
"""

from __future__ import annotations

import torch

KEEP_RATIO = 0.6  # the paper's data_prop: fixed_model_cleaning.sh and generate_token_label.py's default


def token_influence(
    base_log_probs: torch.Tensor, reference_log_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token influence loss_base - loss_ref = log p_ref - log p_base where `mask` is set, NaN elsewhere.

    The three tensors share one shape (rows x positions, padded); `mask` marks the response tokens.
    """
    if not base_log_probs.shape == reference_log_probs.shape == mask.shape:
        raise ValueError(
            f"shapes differ: base {tuple(base_log_probs.shape)}, reference {tuple(reference_log_probs.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    influence = reference_log_probs.double() - base_log_probs.double()
    return influence.masked_fill(~mask.bool(), float("nan"))


def select_global_top(influence: torch.Tensor, mask: torch.Tensor, keep_ratio: float = KEEP_RATIO) -> torch.Tensor:
    """The kept tokens: the floor(keep_ratio * response tokens) highest influences over all rows (a bool mask).

    Ties keep row-major order (row, then position), as the authors' stable sort does, so the choice is
    deterministic. A NaN influence where `mask` is set is an error: it would sort arbitrarily.
    """
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    mask = mask.bool()
    values = influence[mask]  # row-major order
    if torch.isnan(values).any():
        raise ValueError("influence is NaN at a response token; both models must score every response token")
    keep = int(values.numel() * keep_ratio)
    order = torch.sort(values, descending=True, stable=True).indices[:keep]
    chosen = torch.zeros_like(values, dtype=torch.bool)
    chosen[order] = True
    kept = torch.zeros_like(mask)
    kept[mask] = chosen
    return kept
