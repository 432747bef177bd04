"""Options several commands share, declared once: each field's default, help and choices, and its check.

`poft score`, `filter --ifd_model`, `train`, `eval` and the demos build their dataclasses from these
factories, so a flag means the same and says the same in every `--help`; the flags and YAML keys are
the field names, unchanged.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from poft.chat import SYSTEM_TURNS, SYSTEM_TURNS_HELP
from poft.errors import OptionError
from poft.runtime import resolve_device, resolve_dtype

CHAT_TEMPLATE_HELP = "Chat template (.jinja file or text) for models whose tokenizer has none."
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps."
DTYPE_HELP = "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16."
MAX_LENGTH_HELP = (
    "Truncate conversations to this many tokens; use the same value for training (TRL's default is 1024)."
)


WARMUP_RATIO_HELP = (
    "Share of the total training steps spent warming up (0 <= ratio < 1): transformers 5 took this option into "
    "--warmup_steps, where a float below 1 is such a ratio; given here, it is passed there."
)


def warmup_ratio_field() -> Any:
    """`--warmup_ratio`, which transformers 5 removed but recipes, TRL's earlier docs and poft's demo still use."""
    return field(default=None, metadata={"help": WARMUP_RATIO_HELP})


def apply_warmup_ratio(args: Any) -> None:
    """Move a config's `warmup_ratio` into `warmup_steps`, the field transformers reads (a float < 1 is a ratio)."""
    ratio = args.warmup_ratio
    if ratio is None:
        return
    if not 0 <= ratio < 1:
        raise OptionError(f"--warmup_ratio is a share of the steps, 0 <= ratio < 1; got {ratio}.")
    if args.warmup_steps:
        raise OptionError(
            f"--warmup_ratio {ratio} and --warmup_steps {args.warmup_steps} both set the warmup; give one."
        )
    args.warmup_steps = float(ratio)


def max_length_field(default: int | None = 1024) -> Any:
    return field(default=default, metadata={"help": MAX_LENGTH_HELP})


def chat_template_field(also: str = "") -> Any:
    """`also`: what the template does besides, for one command (say, that training saves it with the model)."""
    return field(default=None, metadata={"help": f"{CHAT_TEMPLATE_HELP} {also}".rstrip()})


def system_turns_field() -> Any:
    return field(default="auto", metadata={"help": SYSTEM_TURNS_HELP, "choices": list(SYSTEM_TURNS)})


def device_field() -> Any:
    return field(default="auto", metadata={"help": DEVICE_HELP})


def dtype_field() -> Any:
    return field(default="auto", metadata={"help": DTYPE_HELP})


def skip_invalid_field(report: str) -> Any:
    """`report`: where the skipped rows are written, as the command's options name it."""
    return field(
        default=False,
        metadata={"help": f"Skip invalid data rows, writing them to {report}, instead of stopping."},
    )


def check_device_and_dtype(device: str, dtype: str) -> None:
    """A bad --device or --dtype fails before any work."""
    resolve_dtype(dtype, resolve_device(device))
