"""What every model of the demo is scored and trained with, written once.

The references, the base, the target runs, Token Cleaning's reference and the DPO stage each build their own
trainer arguments (TRL's `SFTConfig` or `DPOConfig`, or poft's subclasses), but they read the same
conversations at the same `MAX_LENGTH` and train quietly alike: no checkpoints, no reports, no raw log dicts.
`trainer_args` is that one place; each caller adds only what is its own. `quiet` replaces transformers' console
output (a dict per logging step) with what a tool of this field shows: a progress bar on a terminal, and one line
per epoch in a log or under CI (`StageLog`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TypeVar

from datasets import Dataset
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from poft.schema import NOISE

logger = logging.getLogger(__name__)

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


def describe_rows(data: Dataset) -> str:
    """'4000 clean rows' or '4000 rows, 2400 with noise': what a model trains on, as the demo's log lines say it."""
    noisy = sum(data[NOISE]) if NOISE in data.column_names else 0
    return f"{len(data)} rows, {noisy} with noise" if noisy else f"{len(data)} clean rows"


def on_terminal() -> bool:
    """Whether progress is drawn as a bar: stderr is a terminal and no CI runner says otherwise."""
    return sys.stderr.isatty() and not os.environ.get("CI")


class StageLog(TrainerCallback):
    """A stage's progress: a bar over its steps on a terminal, else one line per epoch with the mean training
    loss since the last one."""

    def __init__(self, label: str):
        self.label, self.bar, self.losses = label, None, []

    def on_train_begin(self, args, state, control, **kwargs):
        if on_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc=self.label, leave=False, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.bar is None:
            loss = f", loss {sum(self.losses) / len(self.losses):.3f}" if self.losses else ""
            logger.info("%s: epoch %d of %d%s", self.label, round(state.epoch), round(args.num_train_epochs), loss)
        elif self.losses:
            self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}")
        self.losses = []

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def quiet(trainer, label: str | None = None) -> None:
    """No dict per logging step on the console (transformers' printer and its bar); with a `label`, `StageLog`'s
    bar or epoch lines instead. A target run inside a grid passes none: the grid logs one line per run."""
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    if label is not None:
        trainer.add_callback(StageLog(label))
