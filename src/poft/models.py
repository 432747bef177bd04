"""Models as `poft score`, `poft eval` and IFD get them: one spec, one check, one fingerprint, one loader.

A `ModelSpec` is where a model is (a folder, a hub id or a GGUF file, see `poft.gguf_models`) and how it
loads (device, dtype, remote code, attention), built from the shared `ModelOptions`, so an option given to one
command means the same in every other. Weights load from safetensors or, de-quantised by transformers, from
GGUF; `check` refuses a folder that cannot load before any work, and `fingerprint` names the model by content
(`poft.score_cache.model_fingerprint`), which keys the score cache and tells two references apart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from poft.errors import ModelError
from poft.gguf_models import load_args
from poft.options import ModelOptions
from poft.runtime import resolve_device, resolve_dtype
from poft.score_cache import model_fingerprint
from poft.validation import check_model_source


@dataclass(frozen=True)
class Reference:
    """A model named on the command line: the column-safe name its results are stored under, and where it is."""

    name: str
    path: str


def parse_references(specs: Sequence[str]) -> list[Reference]:
    """`PATH` or `NAME=PATH`; names default to the last path component and are made unique."""
    references, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or os.sep in name:
            name, path = Path(spec.rstrip("/")).name, spec
            name = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"
        unique, k = name, 2
        while unique in seen:
            unique, k = f"{name}_{k}", k + 1
        seen.add(unique)
        references.append(Reference(unique, path))
    return references


@dataclass(frozen=True)
class ModelSpec:
    """One model and how to load it. `path` is as the user gave it; `source` and `gguf_file` are what
    `from_pretrained` takes (the folder and the file's name for a GGUF model, else `path` and None)."""

    path: str
    source: str
    gguf_file: str | None
    device: torch.device
    dtype: torch.dtype
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    @classmethod
    def of(cls, path: str, options: ModelOptions) -> ModelSpec:
        """The spec of `path` under the shared model options (device and dtype resolved)."""
        device = resolve_device(options.device)
        source, gguf = load_args(path)
        return cls(
            path,
            source,
            gguf.get("gguf_file"),
            device,
            resolve_dtype(options.dtype, device),
            options.trust_remote_code,
            options.attn_implementation,
        )

    def check(self) -> None:
        """A local folder or GGUF file that cannot load fails here, in one line (`check_model_source`)."""
        check_model_source(self.path, "--model", safetensors_only=True, gguf=True)

    def fingerprint(self) -> str:
        """The model's content fingerprint: a copy or another spelling of its path shares it."""
        return model_fingerprint(self.path)

    def pretrained_args(self) -> dict:
        """What every `from_pretrained` call of this model takes besides `source`."""
        return {"trust_remote_code": self.trust_remote_code} | (
            {"gguf_file": self.gguf_file} if self.gguf_file else {}
        )

    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.source, **self.pretrained_args())

    def config(self):
        return AutoConfig.from_pretrained(self.source, **self.pretrained_args())

    def load(self):
        """The causal LM from safetensors weights (or the GGUF file), on `device`, in eval mode."""
        from safetensors import SafetensorError

        import poft.attention  # noqa: F401  registers poft_varlen with transformers (seconds to import: only here)

        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.source,
                dtype=self.dtype,
                attn_implementation=self.attn_implementation,
                **self.pretrained_args(),
                **({} if self.gguf_file else {"use_safetensors": True}),
            )
        except (OSError, SafetensorError) as error:
            raise ModelError(
                f"--model {self.path}: the weights cannot be loaded ({str(error).splitlines()[0]}). Save or download "
                "the model again (poft loads safetensors weights)."
            ) from error
        return model.to(self.device).eval()


def load_for_scoring(spec: ModelSpec, packing: bool | None = None) -> tuple[Any, bool]:
    """`spec.load()`, with the attention that packs when it pays and TRL's fused LM head, for scoring; and whether
    its batches pack (`packing`: as asked, None for where it pays, see `poft.attention.packs`)."""
    from trl.trainer.utils import add_fused_lm_head

    from poft.attention import VARLEN, packs, use_varlen_by_default

    model = spec.load()
    if spec.attn_implementation is None and use_varlen_by_default(model, spec.device):
        model.set_attn_implementation(VARLEN)  # packed rows through PyTorch's varlen kernel
    add_fused_lm_head(model, cast_lm_head_to_fp32=True)
    return model, packs(model, spec.device, packing)


def model_max_length(max_length: int | None, model_config) -> int | None:
    """Where one model's reading stops: `max_length`, but never past the model's context (`max_position_embeddings`),
    whose later positions it never learned (scores there are noise; learned position embeddings fail outright), as
    transformers' tokenizers cap truncation at their `model_max_length`. None (no truncation) reads up to it."""
    context = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(context, int) or isinstance(context, bool) or context < 2:
        return max_length
    return context if max_length is None else min(max_length, context)


def beyond_context(requested: str, context: int) -> str:
    """The line that says `requested` (a reading length, as its caller names it) was capped at the model's context
    by `model_max_length`: shared by scoring and training, so both say it alike."""
    return (
        f"{requested} is beyond the model's context (max_position_embeddings={context}), so conversations are read "
        f"up to {context} tokens"
    )
