"""poft's training objectives, declared once each: the trainer, `--objective` and the demo read this table.

From an `Objective` the trainer takes its loss, how the optimizer step's items are counted and which of TRL's
SFT-only paths apply; `poft train` the choices and help of `--objective`; the demo which of its methods are PoFT
objectives (compared with every other method, drawn in the weights plot). The loss is named, as `poft.cli.Command`
names its runner, so that reading the table imports no torch and `poft --help` stays fast.

Adding an objective: its loss in `poft.objectives` (a function of a `StepTensors`), one `Objective` here, listed
in `OBJECTIVES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    """One training objective, and what the code around its loss needs to know of it."""

    name: str  # the value of --objective, and the demo's method that trains with it
    loss: str  # the function of poft.objectives that computes it from a StepTensors
    help: str  # what it minimises, in --objective's help
    per_sequence: bool  # normalised by the step's sequences; otherwise by its response tokens
    needs_references: bool  # compares r_theta with ref_score: a PoFT objective
    # TRL's own SFT loss: TRL's loss_type, label smoothing, compute_loss_func, sequence parallelism, plain text and
    # a completion_mask column apply to it only, since it needs no per-sequence score
    trl_loss: bool = False
    reads_entropy: bool = False  # also reads the references' mean entropy (`poft score`'s ref_entropy)

    def loss_function(self) -> Callable:
        return getattr(importlib.import_module("poft.objectives"), self.loss)


POFT = Objective(
    "poft",
    "poft_objective",
    "the paper's -log sigmoid(beta (r_theta - r_ref) + gamma), averaged over sequences",
    per_sequence=True,
    needs_references=True,
)
POFT_TOKEN = Objective(
    "poft_token",
    "poft_token_objective",
    "the same Bradley-Terry loss weighted by each sequence's response tokens (gradient: token-level SFT with each "
    "sequence scaled by PoFT's weight)",
    per_sequence=False,
    needs_references=True,
)
POFT_CALIBRATED = Objective(
    "poft_calibrated",
    "poft_calibrated_objective",
    "poft_token against the references' score calibrated by their own uncertainty, r_ref + H_ref (H_ref: their mean "
    "entropy at the response positions, poft score's ref_entropy), so that rows a reference is unsure of are not "
    "down-weighted as if they were wrong",
    per_sequence=False,
    needs_references=True,
    reads_entropy=True,
)
SFT = Objective(
    "sft",
    "sft_objective",
    "TRL's cross-entropy (its loss_type nll or dft)",
    per_sequence=False,
    needs_references=False,
    trl_loss=True,
)
SFT_NORM = Objective(
    "sft_norm",
    "sft_norm_objective",
    "mean over sequences of -r_theta (length-normalised cross-entropy)",
    per_sequence=True,
    needs_references=False,
)
OBJECTIVES = (POFT, POFT_TOKEN, POFT_CALIBRATED, SFT, SFT_NORM)
DEFAULT = POFT_CALIBRATED  # chosen by the demo grid's decision rule: bench/RESULTS.md, "Never below SFT"
NAMES = tuple(objective.name for objective in OBJECTIVES)
HELP = "; ".join(f"{objective.name}: {objective.help}" for objective in OBJECTIVES) + "."


def objective_named(name: str) -> Objective:
    """The declared objective called `name` (a KeyError for any other: `PoFTConfig` checks the name first)."""
    return {objective.name: objective for objective in OBJECTIVES}[name]
