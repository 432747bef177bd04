"""Small runtime helpers every stage shares: devices, dtypes, where caches live, the training glue.

Kept in one place (as nanochat's `common.py`) so that a fix to, say, the bf16 default reaches `poft
train`, `poft dpo` and the demo alike.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return dtypes[dtype]


def cache_root() -> Path:
    """Where poft keeps what it can recompute: $POFT_CACHE, else ~/.cache/poft."""
    return Path(os.environ.get("POFT_CACHE", Path.home() / ".cache" / "poft"))


def default_bf16(bf16: bool | None, fp16: bool) -> bool:
    """The bf16 setting of a training config whose user left it unset: on only where the hardware runs bf16.

    Workaround: TRL 1.16's SFTConfig and DPOConfig turn bf16 on unconditionally when it is unset, which
    fails on machines without bf16 support (a laptop CPU). Remove once TRL follows the hardware itself.
    """
    if bf16 is not None or fp16:
        return bool(bf16)
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def train_and_save(trainer_class, model_args, training_args, train_dataset, eval_dataset=None) -> str:
    """Build a TRL trainer for `model_args` (PEFT included), train, then save the model and trainer_state.json
    (the logged curves `poft report --runs` plots). `poft train` and `poft dpo` differ only in what they pass."""
    from trl import get_peft_config

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = trainer_class(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    logger.info("Saved the model to %s", training_args.output_dir)
    return training_args.output_dir
