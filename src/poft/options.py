"""Options several commands share, declared once: each field's default, help and choices, and its check.

`poft score`, `filter --ifd_model`, `train`, `eval` and the demos build their dataclasses from these
factories and groups (`ReadingOptions`: how a model reads conversations; `ModelOptions`: how it loads), so
a flag means the same and says the same in every `--help`; the flags and YAML keys are the field names,
unchanged. This module imports neither torch nor transformers, so declaring a command's options (and
`poft.data`, which shares `skip_invalid`) loads neither; the device check imports torch when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from poft.errors import OptionError

SYSTEM_TURNS = ("auto", "keep", "merge")
SYSTEM_TURNS_HELP = (
    "System turns for templates that reject them: auto (keep them where the template renders them, else merge "
    "each into the next user turn, logged), keep (pass them as they are), merge (always merge into the next user "
    "turn)."
)
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


def check_reading_options(truncation_mode: str, system_turns: str) -> None:
    """The one check of `truncation_mode` and `system_turns`, for the encoder and every command's options."""
    if truncation_mode not in ("keep_start", "keep_end"):
        raise OptionError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
    if system_turns not in SYSTEM_TURNS:
        raise OptionError(f"system_turns must be one of {', '.join(SYSTEM_TURNS)}, got {system_turns!r}")


def check_device_and_dtype(device: str, dtype: str) -> None:
    """A bad --device or --dtype fails before any work."""
    from poft.runtime import resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))


@dataclass
class ReadingOptions:
    """How a model reads conversations (template and truncation, the same rules as training): `poft score`,
    `filter --ifd_model` and `eval`."""

    max_length: int | None = max_length_field()
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which end to keep when truncating: keep_start or keep_end (as in SFTConfig)."},
    )
    chat_template: str | None = chat_template_field()
    system_turns: str = system_turns_field()

    def __post_init__(self):
        check_reading_options(self.truncation_mode, self.system_turns)


@dataclass
class ModelOptions:
    """How a model loads (`poft.models.ModelSpec`): `poft score`, `filter --ifd_model` and `eval`."""

    device: str = device_field()
    dtype: str = dtype_field()
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention implementation to load models with, e.g. sdpa, flex_attention, flash_attention_2 or "
            "poft_varlen (PyTorch's varlen flash kernel). Default: for scoring (poft score, IFD), poft_varlen on CUDA "
            "GPUs that run it, else transformers' choice."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model repositories to run their own code."}
    )

    def __post_init__(self):
        check_device_and_dtype(self.device, self.dtype)
