"""Next-token log-probs at the response positions only: the one computation behind scores, r_theta and SFT's loss.

TRL's fused LM head scores every position on devices without Triton (CPU), prompt and padding included, and a
prompt-heavy batch then spends most of its time on log-probs nobody reads. `response_log_probs` runs the
backbone, gathers the hidden states of the positions whose next token is a response token (label != -100; padded
and padding-free rows alike) and applies the LM head and log-softmax there only, through TRL's chunked kernel
(`trl.kernels.ChunkedLogProbFunction`: vocabulary tiles, online logsumexp, Triton on CUDA), so no (tokens x
vocab) logits ever exist. The output is TRL's `FusedCausalLMOutput`, aligned with the labels as TRL aligns it.

The computation runs inside the model's own forward (a patch on the causal LM, as TRL's fused head is), so
DDP, FSDP, DeepSpeed and peft wrappers see an ordinary forward call. A model this module does not understand
(no plain backbone and linear head, logit scaling other than final softcapping, multimodal configs) goes
through TRL's fused head instead, with the same result at the old cost.
"""

from __future__ import annotations

import functools
import sys
import types
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # TRL's modules cost seconds to import: the functions that run them import them
    from trl.trainer.utils import FusedCausalLMOutput

HEAD_FLAG = "poft_response_head"  # the forward keyword that asks for response-only log-probs
_PATCHED = "_poft_response_head"
# Logit transforms TRL's fused head knows and this module leaves to it.
_SCALED_LOGITS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
# The projection tile. Where the kernel folds it in torch (CPU), small tiles stay in cache: 256 rows x 4096
# columns (4 MiB fp32) ran a 4096-token, 32k-vocabulary head 1.7x as fast as TRL's 4096 x 32768 tiles, and 4096
# columns a 256-token, 49k-vocabulary head in 0.45 s against 0.66 s (one thread). CUDA keeps TRL's tiles.
CPU_VOCAB_TILE = 4096
CPU_ROWS = 256
GPU_VOCAB_TILE = 32768


@dataclass(frozen=True)
class HeadRequest:
    """What the response head computes: TRL's per-token fields (`outputs`) and whether the head runs in fp32."""

    outputs: tuple[str, ...] = ("log_probs",)
    cast_lm_head_to_fp32: bool = False


def response_log_probs(
    model, inputs: dict[str, Any], outputs: tuple[str, ...] = ("log_probs",), cast_lm_head_to_fp32: bool = False
) -> FusedCausalLMOutput:
    """`model(**inputs)`'s next-token log-probs (and the other `outputs` fields) at the response positions.

    `inputs` carries `labels` (-100 outside the response) or pre-shifted `shift_labels`, as for TRL's fused head.
    `model` may be wrapped (DDP, FSDP, DeepSpeed, torch.compile, peft); the call goes through the wrapper. A model
    whose forward accelerate wrapped in autocast (mixed precision, no peft) must be called under the same autocast
    (`accelerator.autocast()`), since the response head is patched above that wrapper.
    """
    causal_lm = causal_lm_of(model)
    request = HeadRequest(tuple(outputs), cast_lm_head_to_fp32)
    if response_head_supported(causal_lm):
        install_response_head(causal_lm)
        return model(**inputs, **{HEAD_FLAG: request})
    if "forward" not in vars(causal_lm):  # trainers' models carry TRL's head already
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(causal_lm, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=request.outputs)
    return model(**inputs, fused_lm_head=True)


def causal_lm_of(model):
    """The transformers causal LM inside the wrappers that training and scoring may add."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # peft
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, FSDP1, DeepSpeed
            model = model.module
        else:
            return model


def response_head_supported(causal_lm) -> bool:
    """Whether the causal LM is a plain decoder: a backbone returning hidden states, then one linear head.

    Final logit softcapping is applied by the kernel; any other logit transform, and multimodal models, are
    left to TRL's fused head.
    """
    config = getattr(causal_lm, "config", None)
    if config is None or not hasattr(causal_lm, "get_output_embeddings"):
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config or any(getattr(text, name, None) is not None for name in _SCALED_LOGITS):
        return False
    backbone = getattr(causal_lm, "base_model", causal_lm)
    return isinstance(output_head(causal_lm), torch.nn.Linear) and backbone is not causal_lm


def output_head(causal_lm) -> torch.nn.Module | None:
    """The module the LM head's forward runs: the head, or under peft's `modules_to_save` (a trainable head) the
    active adapter's copy of it, or the original where adapters are off."""
    head = causal_lm.get_output_embeddings()
    peft = sys.modules.get("peft.utils.other")  # a model peft wrapped means peft is imported
    if peft is None or not isinstance(head, peft.ModulesToSaveWrapper):
        return head
    adapters = head.active_adapters
    if head.disable_adapters or not adapters or any(name not in head.modules_to_save for name in adapters):
        return head.original_module
    return head.modules_to_save[adapters[0]]


def install_response_head(causal_lm) -> None:
    """Patch `causal_lm.forward` (once) so that `forward(..., poft_response_head=HeadRequest())` is response-only.

    Any other call goes to the forward it had (TRL's fused head, generation), unchanged.
    """
    if getattr(causal_lm, _PATCHED, False):
        return
    previous = causal_lm.forward

    @functools.wraps(type(causal_lm).forward)
    def forward(self, *args, poft_response_head: HeadRequest | None = None, **kwargs):
        if poft_response_head is None:
            return previous(*args, **kwargs)
        return _response_forward(self, poft_response_head, *args, **kwargs)

    causal_lm.forward = types.MethodType(forward, causal_lm)
    setattr(causal_lm, _PATCHED, True)


def tile_shape(device: torch.device, rows: int) -> tuple[int, int]:
    """(vocabulary columns, rows) of one kernel call: TRL's on CUDA; small tiles where torch folds them (CPU)."""
    if device.type in ("cuda", "xpu"):
        return GPU_VOCAB_TILE, max(rows, 1)
    return CPU_VOCAB_TILE, CPU_ROWS


def _response_forward(
    self,
    request: HeadRequest,
    *args,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch=None,
    fused_lm_head: bool = False,
    **kwargs,
) -> FusedCausalLMOutput:
    """The backbone, then the LM head on the response rows only: TRL's fused forward without the other rows."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    text_config = self.config.get_text_config()
    kwargs["use_cache"] = False
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone_outputs = self.base_model(*args, **kwargs)
    if shift_labels is None:
        hidden_states, labels = backbone_outputs.last_hidden_state[:, :-1], labels[:, 1:]
    else:
        hidden_states, labels = backbone_outputs.last_hidden_state, shift_labels
    head = output_head(self)
    weight, bias = _whole(head.weight), _whole(head.bias)
    hidden_states, labels = hidden_states.to(weight.device), labels.to(weight.device)
    mask = labels != -100
    rows = hidden_states[mask]
    autocast = nullcontext()
    if request.cast_lm_head_to_fp32:
        rows = rows.float()
        autocast = torch.autocast(rows.device.type, enabled=False)
    targets, softcap = labels[mask], getattr(text_config, "final_logit_softcapping", None)
    vocab, step = tile_shape(rows.device, rows.shape[0])
    with autocast, maybe_gather_lm_head_ctx(weight, bias):
        pieces = [
            ChunkedLogProbFunction.apply(
                rows[start : start + step],
                weight,
                bias,
                targets[start : start + step],
                1.0,
                vocab,
                softcap,
                1.0,
                request.outputs,
            )
            for start in range(0, max(rows.shape[0], 1), step)
        ]
    per_token = [None if piece[0] is None else torch.cat(piece) for piece in zip(*pieces, strict=True)]
    # `masked_scatter` keeps the output connected to the graph when no label is valid (a differentiable zero)
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token
    )
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / count
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _load_balancing_loss(text_config, backbone_outputs.router_logits, kwargs.get("attention_mask"))
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
        aux_loss=aux_loss,
    )


def _whole(parameter: torch.Tensor | None) -> torch.Tensor | None:
    """The head's weight or bias whole, for the kernel, with its gradient averaged over the processes.

    FSDP2 leaves the head sharded (a DTensor) when it is its own group, as peft's wrap policy makes a trainable
    head, since the kernel reads it without calling the module. The whole tensor's gradient on each process comes
    from that process's micro-batch only; `Partial("avg")` reduce-scatters it back to the shards averaged over the
    processes, as FSDP averages every other gradient (a replicated gradient would keep each shard's own process's
    share). Over a tensor-parallel mesh dimension every process holds the same batch, so the average is that
    gradient itself.
    """
    from torch.distributed.tensor import DTensor, Partial  # a second to import: scoring from the cache never needs it

    if not isinstance(parameter, DTensor):
        return parameter
    return parameter.full_tensor(grad_placements=[Partial("avg")] * parameter.device_mesh.ndim)


def _load_balancing_loss(text_config, router_logits, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss that TRL's fused head and the models' own forwards add (Mixtral's)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or text_config.num_local_experts
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)


__all__ = [
    "HeadRequest",
    "causal_lm_of",
    "install_response_head",
    "output_head",
    "response_head_supported",
    "response_log_probs",
]
