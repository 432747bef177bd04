"""`poft <stage>`: each stage's config from a YAML file (`--config`) plus flag overrides, TRL-style.

One table names every command: its config classes, the function that runs it, what it prints of that function's
result, and its help. Library code never prints: a runner returns its result and this module prints it. Flags use
the config fields' names, with underscores or dashes. User errors, poft's own `PoftError` types raised
where input is validated (bad data, a missing column, an unusable chat template or model, a bad option,
an output that must not be written, a full disk), end with one readable line and exit code 2; set
POFT_DEBUG=1 for the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from poft.errors import OptionError, PoftError
from poft.objective_registry import OBJECTIVES


@dataclass(frozen=True)
class Command:
    """A subcommand: `configs` are parsed from YAML and flags and passed, in order, to `run`.

    `show`, where given, turns what `run` returns into what the command prints: a string, printed as it is, or a
    dict, printed as JSON; a command without it prints nothing. Classes, runners and `show` are named as
    "module:attribute" and imported only when their command runs, so `poft --help` stays fast.
    """

    help: str
    description: str
    configs: tuple[str, ...]
    run: str
    repeated: tuple[str, ...] = ()  # list flags that accumulate when repeated: --model A --model B
    show: str | None = None

    def load(self, name: str):
        module, _, attribute = name.partition(":")
        return getattr(importlib.import_module(module), attribute)


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "PoFT vs SFT on noisy data, end to end on a CPU (the embedded default)",
        "PoFT vs SFT on noisy data with checkable answers, on tiny local models: builds the world, trains two "
        "references, noises the data, scores it, trains SFT and PoFT identically, checks them on validation prompts "
        "after every epoch and on held-out prompts at the end. Writes report.md (PoFT - SFT with 95% intervals), "
        "plots and results.json.",
        ("poft.demo.pipeline:DemoConfig",),
        "poft.demo.pipeline:run_demo",
        show="poft.demo.report:summary_tables",
    ),
    "score": Command(
        "score SFT data with reference models (writes ref_score)",
        "Score SFT data with one or more reference models: per reference, the mean log-prob of the response "
        "tokens in its own chat template; ref_score is their mean. Results are cached per model and resume after "
        "an interruption.",
        ("poft.scoring:ScoreConfig",),
        "poft.scoring:run_score",
        repeated=("--model",),
    ),
    "noise": Command(
        "inject the paper's noise (or subtle noise) into SFT data",
        "Corrupt a fraction of SFT rows, seeded: the paper's recipe (a mismatched response plus character edits) "
        "or subtle edits (a number off by one, two words swapped, one letter changed). Changed rows are marked in "
        "the poft_noise column.",
        ("poft.noise:NoiseConfig",),
        "poft.noise:run_noise",
    ),
    "filter": Command(
        "keep the best-scored rows (ref_score, any score column, or IFD)",
        "Keep the top fraction (or the rows above a threshold) of SFT data by a score column: ref_score (the "
        "paper's score filtering), any score_<name>, or IFD computed with --ifd_model (rows with IFD >= 1 are "
        "dropped, as its authors do). Filters compose; poft_filters and filter_summary.json record what was kept.",
        ("poft.filtering:FilterConfig",),
        "poft.filtering:run_filter",
        show="poft.filtering:kept_summary",
    ),
    "train": Command(
        "train with PoFT or the SFT baseline on TRL",
        "Fine-tune a model with PoFT (--objective "
        + " or ".join(o.name for o in OBJECTIVES if o.needs_references)
        + ", needs a ref_score column from `poft score`) or a baseline (--objective "
        + ", or ".join(
            o.name + (" with TRL's --loss_type nll or dft" if o.trl_loss else "")
            for o in OBJECTIVES
            if not o.needs_references
        )
        + "). Every SFTConfig / TrainingArguments option is accepted.",
        ("poft.trainer:TrainDataArguments", "poft.trainer:PoFTConfig", "poft.model_config:PoftModelConfig"),
        "poft.trainer:run_train",
    ),
    "dpo": Command(
        "DPO on preference data after PoFT or SFT, through TRL's DPOTrainer",
        "DPO on preference pairs (prompt/chosen/rejected, e.g. HuggingFaceH4/ultrafeedback_binarized split "
        "train_prefs) from a PoFT or SFT checkpoint: the paper's second stage. Every DPOConfig / TrainingArguments "
        "option is accepted.",
        ("poft.dpo:DPODataArguments", "poft.dpo:PoFTDPOConfig", "poft.model_config:PoftModelConfig"),
        "poft.dpo:run_dpo",
    ),
    "eval": Command(
        "evaluate models: lm-eval benchmarks and exact match on answer-checked data",
        "Evaluate one or more models side by side: the paper's Open LLM Leaderboard tasks (or any lm-eval task or "
        "local task YAML) through lm-eval-harness (pip install 'poft[eval]'), and/or greedy exact match and "
        "held-out response log-likelihood on data with an answer column.",
        ("poft.evaluation:EvalConfig",),
        "poft.evaluation:run_eval",
        repeated=("--model",),
        show="poft.evaluation:results_table",
    ),
    "report": Command(
        "markdown report with plots of scores, training runs and evals",
        "A markdown report with plots, and the same as one self-contained report.html: score distributions, "
        "reference agreement and a data audit (lowest and highest ref_score rows, where references disagree, "
        "shares below thresholds) of a scored dataset, training curves (loss, PoFT weight, win rate, margin) of "
        "runs, and a comparison table of eval results.",
        ("poft.report:ReportConfig",),
        "poft.report:run_report",
        repeated=("--runs", "--eval"),
        show="poft.report:written",
    ),
    "quickstart": Command(
        "check an installation: the pipeline in seconds on tiny random models",
        "Build tiny local models, score a small bundled dataset with two references and train a few PoFT steps: "
        "the whole pipeline in seconds on a CPU, nothing downloaded.",
        ("poft.demo.quickstart:QuickstartConfig",),
        "poft.demo.quickstart:run_quickstart",
        show="poft.cli:as_returned",
    ),
}


def as_returned(result: dict) -> dict:
    """What a runner returned, whole: for a command whose result is just what it prints."""
    return result


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


def parse(name: str, argv: Sequence[str]) -> tuple:
    """The command's configs from `--config FILE.yaml` and flags (TRL's parser)."""
    import yaml
    from trl import TrlParser

    command = COMMANDS[name]
    parser = TrlParser(
        tuple(command.load(c) for c in command.configs), prog=f"poft {name}", description=command.description
    )
    try:
        refuse_unknown(name, parser, argv)
        return tuple(parser.parse_args_and_config(merge_repeated(argv, command.repeated)))
    except FileNotFoundError as error:  # --config FILE that does not exist
        raise OptionError(f"--config {error.filename}: no such file. Check the path.") from error
    except IsADirectoryError as error:
        raise OptionError(f"--config {error.filename} is a folder; give a YAML file.") from error
    except yaml.YAMLError as error:  # TRL reads the file with yaml.safe_load
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise OptionError(
            f"--config {config_path(argv)} is not valid YAML ({problem}{line}). Fix the file: one `option: value` "
            "per line."
        ) from error
    except ValueError as error:  # a config class (ours, TRL's or transformers') refusing an option value
        if isinstance(error, PoftError):
            raise
        raise OptionError(" ".join(str(error).split())) from error


def refuse_unknown(command: str, parser, argv: Sequence[str]) -> None:
    """Refuse a flag or YAML key no option of the command has, before any config is built (a misspelt option would
    otherwise surface as a missing one), naming the closest option: usually the one meant."""
    import yaml

    known = sorted({action.dest for action in parser._actions if action.option_strings} - {"help"})
    strings = [s for action in parser._actions for s in action.option_strings]
    path = config_path(argv)
    if path:
        with open(path) as file:
            config = yaml.safe_load(file)
        for key in config if isinstance(config, dict) else ():
            if key != "env" and key not in known:
                raise OptionError(f"--config {path}: unknown key {key}: {closest(command, key, known, '')}")
    for i, arg in enumerate(argv):
        given = arg.partition("=")[0]
        if given == "--config" or (i and argv[i - 1] == "--config") or not given.startswith("--"):
            continue
        if given not in strings and sum(s.startswith(given) for s in strings) != 1:  # argparse takes a unique prefix
            raise OptionError(f"unknown option {given}: {closest(command, given[2:], known, '--')}")


def closest(command: str, given: str, known: Sequence[str], prefix: str) -> str:
    """`did you mean OPTION?` for the option nearest to `given` (difflib), or where to find the list."""
    close = difflib.get_close_matches(given.replace("-", "_"), known, n=1)
    return f"did you mean {prefix}{close[0]}?" if close else f"`poft {command} --help` lists every option."


def config_path(argv: Sequence[str]) -> str:
    """The value of --config in `argv` (for messages)."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--config":
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return ""


def usage() -> str:
    lines = ["usage: poft <command> [--config FILE.yaml] [--option value ...]", "", "commands:"]
    lines += [f"  {name:<11} {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "`poft <command> --help` lists every option of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"poft: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from poft.runtime import progress_bars_on_terminal_only

    progress_bars_on_terminal_only()
    command = COMMANDS[name]
    try:
        result = command.load(command.run)(*parse(name, rest))
    except PoftError as error:
        if os.environ.get("POFT_DEBUG"):
            raise
        print(f"poft {name}: error: {error}", file=sys.stderr)
        return 2
    if command.show is not None:
        shown = command.load(command.show)(result)
        print(shown if isinstance(shown, str) else json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
