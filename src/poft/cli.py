"""`poft <stage>`: each stage's config from a YAML file (`--config`) plus flag overrides, TRL-style.

Flags use the config fields' names, with underscores or dashes. User errors (bad data, a missing
column, an unusable chat template, a bad option) end with one readable message and exit code 2;
set POFT_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from poft.chat import ChatTemplateError
from poft.data import DataError
from poft.scoring import ScoreConfig, ScoringError, run_score
from poft.trainer import PoFTConfig, run_train

USER_ERRORS = (DataError, ChatTemplateError, ScoringError, ValueError, FileNotFoundError, ImportError)


@dataclass
class TrainDataArguments(ScriptArguments):
    """TRL's ScriptArguments; `dataset_name` may be a local file or directory as well as a hub id."""

    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Skip invalid data rows (written to OUTPUT_DIR/invalid_rows.jsonl) instead of stopping."},
    )


def merge_repeated(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """`--model A --model B` -> `--model A B`, so a repeated list flag accumulates instead of overriding."""
    argv = list(argv)
    for flag in flags:
        values: list[str] = []
        rest: list[str] = []
        i = 0
        while i < len(argv):
            name, eq, inline = argv[i].partition("=")
            i += 1
            if name != flag:
                rest.append(argv[i - 1])
            elif eq:
                values.append(inline)
            else:
                while i < len(argv) and not argv[i].startswith("--"):
                    values.append(argv[i])
                    i += 1
        argv = rest + ([flag, *values] if values else [])
    return argv


def score_main(argv: Sequence[str]) -> None:
    parser = TrlParser(
        (ScoreConfig,),
        prog="poft score",
        description="Score SFT data with one or more reference models: per reference, the mean log-prob of the "
        "response tokens in its own chat template; ref_score is their mean. Results are cached per model and resume "
        "after an interruption.",
    )
    (config,) = parser.parse_args_and_config(merge_repeated(argv, ["--model"]))
    if not config.model:
        parser.error("give at least one reference with --model PATH_OR_HUB_ID")
    run_score(config)


def train_main(argv: Sequence[str]) -> None:
    parser = TrlParser(
        (TrainDataArguments, PoFTConfig, ModelConfig),
        prog="poft train",
        description="Fine-tune a model with PoFT (loss_type=poft, needs a ref_score column from `poft score`) or "
        "the SFT baseline (loss_type=sft). Every SFTConfig / TrainingArguments option is accepted.",
    )
    run_train(*parser.parse_args_and_config(argv))


def noise_main(argv: Sequence[str]) -> None:
    from poft.noise import NoiseConfig, run_noise

    parser = TrlParser(
        (NoiseConfig,),
        prog="poft noise",
        description="Corrupt a fraction of SFT rows, seeded: the paper's recipe (a mismatched response plus character "
        "edits) or subtle edits (a number off by one, two words swapped, one letter changed). Changed rows are marked "
        "in the poft_noise column.",
    )
    (config,) = parser.parse_args_and_config(argv)
    run_noise(config)


def filter_main(argv: Sequence[str]) -> None:
    from poft.filtering import FilterConfig, run_filter

    parser = TrlParser(
        (FilterConfig,),
        prog="poft filter",
        description="Keep the top fraction (or the rows above a threshold) of SFT data by a score column: ref_score "
        "(the paper's score filtering), any score_<name>, or IFD computed with --ifd_model (rows with IFD >= 1 are "
        "dropped, as its authors do). Filters compose; poft_filters and filter_summary.json record what was kept.",
    )
    (config,) = parser.parse_args_and_config(argv)
    run_filter(config)


def dpo_main(argv: Sequence[str]) -> None:
    from poft.dpo import dpo_main as run

    run(argv)


def eval_main(argv: Sequence[str]) -> None:
    from poft.evaluation import EvalConfig, run_eval

    parser = TrlParser(
        (EvalConfig,),
        prog="poft eval",
        description="Evaluate one or more models side by side: the paper's Open LLM Leaderboard tasks (or any lm-eval "
        "task or local task YAML) through lm-eval-harness (pip install 'poft[eval]'), and/or greedy exact match and "
        "held-out response log-likelihood on data with an answer column.",
    )
    (config,) = parser.parse_args_and_config(merge_repeated(argv, ["--model"]))
    run_eval(config)


def report_main(argv: Sequence[str]) -> None:
    from poft.report import ReportConfig, run_report

    parser = TrlParser(
        (ReportConfig,),
        prog="poft report",
        description="A markdown report with plots: score distributions and reference agreement of a scored dataset, "
        "training curves (loss, PoFT weight, win rate, margin) of runs, and a comparison table of eval results.",
    )
    (config,) = parser.parse_args_and_config(merge_repeated(argv, ["--runs", "--eval"]))
    print(f"Wrote {run_report(config)}")


def demo_main(argv: Sequence[str]) -> None:
    from poft.demo.pipeline import DemoConfig, run_demo

    parser = TrlParser(
        (DemoConfig,),
        prog="poft demo",
        description="PoFT vs SFT on noisy data with checkable answers, on tiny local models: builds the world, trains "
        "two references, noises the data, scores it, trains SFT and PoFT identically and evaluates after every epoch. "
        "Writes report.md, plots and results.json.",
    )
    (config,) = parser.parse_args_and_config(argv)
    run_demo(config)


def quickstart_main(argv: Sequence[str]) -> None:
    from poft.demo.quickstart import QuickstartConfig, run_quickstart

    parser = TrlParser(
        (QuickstartConfig,),
        prog="poft quickstart",
        description="Build tiny local models, score a small bundled dataset with two references and train a few "
        "PoFT steps: the whole pipeline in seconds on a CPU, nothing downloaded.",
    )
    (config,) = parser.parse_args_and_config(argv)
    run_quickstart(config)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "demo": (demo_main, "PoFT vs SFT on noisy data, end to end on a CPU (the embedded default)"),
    "score": (score_main, "score SFT data with reference models (writes ref_score)"),
    "noise": (noise_main, "inject the paper's noise (or subtle noise) into SFT data"),
    "filter": (filter_main, "keep the best-scored rows (ref_score, any score column, or IFD)"),
    "train": (train_main, "train with PoFT or the SFT baseline on TRL"),
    "dpo": (dpo_main, "DPO on preference data after PoFT or SFT, through TRL's DPOTrainer"),
    "eval": (eval_main, "evaluate models: lm-eval benchmarks and exact match on answer-checked data"),
    "report": (report_main, "markdown report with plots of scores, training runs and evals"),
    "quickstart": (quickstart_main, "run the pipeline in seconds on tiny random models"),
}


def usage() -> str:
    lines = ["usage: poft <command> [--config FILE.yaml] [--option value ...]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`poft <command> --help` lists every option of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"poft: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        COMMANDS[command][0](rest)
    except USER_ERRORS as error:
        if os.environ.get("POFT_DEBUG"):
            raise
        print(f"poft {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
