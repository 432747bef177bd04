"""Padding-free attention: which implementations keep packed conversations apart, and which make packing pay.

A packed row concatenates several conversations; TRL's padding-free collator restarts `position_ids` at
each one and passes their boundaries as `cu_seq_lens_q`/`max_length_q`. Every transformers implementation
then keeps the conversations isolated, but at different cost: sdpa and eager build a dense block-diagonal
mask over the whole row (correct, and slower than padding on skewed lengths); flex_attention builds a
block mask and skips the empty blocks; flash attention and PyTorch's own varlen kernel
(`torch.nn.attention.varlen`, shipped with recent CUDA builds, no flash-attn package needed) attend within
each conversation only. `VARLEN` registers that PyTorch kernel with transformers, so a model loaded with
`attn_implementation="poft_varlen"` runs packed rows through it and anything else (padded batches,
generation) through sdpa.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN = "poft_varlen"
# Implementations whose packed rows cost only the within-conversation attention.
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4", VARLEN)
FLEX = "flex_attention"


@cache
def torch_varlen_kernel() -> Callable | None:
    """PyTorch's varlen flash-attention function, or None where this torch build has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def torch_varlen_supported(device: torch.device) -> bool:
    """Whether `VARLEN` can run on `device`: a CUDA GPU of compute capability 8.0 or newer, and the kernel."""
    if device.type != "cuda" or torch_varlen_kernel() is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def packing_pays(attn_implementation: str | None, device: torch.device) -> bool:
    """Whether packed rows beat padded batches: only where attention skips the cross-conversation pairs.

    Every implementation keeps packed conversations isolated (position ids restart); sdpa and eager do it with
    a dense mask over the whole row, which costs more than padding, so they stay padded.
    """
    if device.type != "cuda" or attn_implementation is None:
        return False
    return attn_implementation in VARLEN_IMPLEMENTATIONS or attn_implementation == FLEX


def routes_attention(model) -> bool:
    """Whether `model` runs attention through transformers' interface, the one place packed rows are made safe.

    A model with its own attention code (older remote code) may ignore position ids and let packed
    conversations see each other, so it is never packed by default.
    """
    return bool(getattr(model, "_supports_attention_backend", False))


def plain_causal(config) -> bool:
    """Full causal softmax attention: no sliding window, logit softcapping or attention sinks, which `VARLEN` lacks."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    windowed = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    layered = "sliding_attention" in (getattr(text, "layer_types", None) or [])
    return not (windowed or layered or getattr(text, "attn_logit_softcapping", None))


def use_varlen_by_default(model, device: torch.device) -> bool:
    """Whether a model loaded with transformers' default attention should switch to `VARLEN`."""
    return torch_varlen_supported(device) and routes_attention(model) and plain_causal(model.config)


def packs(model, device: torch.device, requested: bool | None = None) -> bool:
    """The packing decision: as `requested`, else (auto) only where it is safe (`routes_attention`) and pays
    (`packing_pays`) for the attention `model` runs."""
    if requested is not None:
        return requested
    return routes_attention(model) and packing_pays(getattr(model.config, "_attn_implementation", None), device)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Conversation boundaries of one packed row (positions restart at 0), as TRL's collator computes them."""
    row = position_ids.reshape(-1)
    starts = (row == 0).nonzero().flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([row.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


@cache
def _parameters(kernel: Callable):
    return inspect.signature(kernel).parameters


def _call_kernel(kernel: Callable, query, key, value, cu, max_length: int, scaling: float | None) -> torch.Tensor:
    """Causal varlen attention on (tokens, heads, dim) tensors, across the argument names torch releases used."""
    parameters = _parameters(kernel)
    kwargs: dict = {"scale": scaling} if "scale" in parameters else {}
    kwargs.update({"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True})
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in parameters:
            kwargs["enable_gqa"] = True
        else:  # older kernels want as many key/value heads as query heads
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return kernel(query, key, value, cu, cu, max_length, max_length, **kwargs)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out."""
    cu, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    unpadded = query.shape[0] == 1 and attention_mask is None and query.shape[2] == key.shape[2]
    if cu is None and unpadded and position_ids is not None:
        cu, max_length = cu_seqlens_from_position_ids(position_ids)
    if cu is None or not unpadded:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    unsupported = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
    if dropout or not getattr(module, "is_causal", True) or unsupported:
        raise ValueError(
            f"attn_implementation={VARLEN!r} runs plain causal attention only, not {unsupported or 'dropout'}: "
            "load this model with flex_attention or sdpa instead"
        )
    kernel = torch_varlen_kernel()
    if kernel is None:
        raise RuntimeError(
            f"attn_implementation={VARLEN!r} needs torch.nn.attention.varlen (torch {torch.__version__})"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    output = _call_kernel(kernel, q, k, v, cu.to(q.device, torch.int32), int(max_length), scaling)
    return output.unsqueeze(0), None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for an unpadded row (the kernel reads the boundaries); sdpa's mask where there is padding."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, varlen_mask)

__all__ = [
    "FLEX",
    "VARLEN",
    "cu_seqlens_from_position_ids",
    "plain_causal",
    "packing_pays",
    "packs",
    "routes_attention",
    "torch_varlen_kernel",
    "torch_varlen_supported",
    "use_varlen_by_default",
    "varlen_attention_forward",
]
