"""The model options of `poft train` and `poft dpo`: TRL's ModelConfig, with its conflicts refused in one line."""

from __future__ import annotations

from dataclasses import dataclass

from trl import ModelConfig

from poft.errors import OptionError


@dataclass
class PoftModelConfig(ModelConfig):
    """TRL's ModelConfig, unchanged but for the message of a conflict TRL refuses without naming the fix."""

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise OptionError(
                "--load_in_4bit and --load_in_8bit are both set; choose one (4-bit is QLoRA's usual choice)."
            )
        super().__post_init__()
