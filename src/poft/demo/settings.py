"""What every model of the demo is scored and trained with, written once.

The references, the base, the target runs, Token Cleaning's reference and the DPO stage each build their own
trainer arguments (TRL's `SFTConfig` or `DPOConfig`, or poft's subclasses), but they read the same
conversations at the same `MAX_LENGTH` and train quietly alike: no checkpoints, no reports, no progress bars.
`trainer_args` is that one place; each caller adds only what is its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

MAX_LENGTH = 128  # the demo's max_length everywhere: scoring, training, DPO, the weights and Token Cleaning

Args = TypeVar("Args")


def trainer_args(
    config_class: type[Args],
    output_dir: str | Path,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    use_cpu: bool,
    **options,
) -> Args:
    """`config_class`'s arguments for one of the demo's trainers: the shared settings plus the caller's `options`."""
    return config_class(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        use_cpu=use_cpu,
        max_length=MAX_LENGTH,
        activation_checkpointing=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        **options,
    )
