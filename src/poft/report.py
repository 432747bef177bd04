"""`poft report`: plots (matplotlib, headless) and a markdown report of what a run measured.

It covers a scored dataset (per-reference and aggregate score distributions as in the paper's Figure 2,
agreement between references, clean vs noisy where `poft_noise` exists), training runs (loss, PoFT weight,
win rate and margin curves from the trainer's logs) and `poft eval` results (a comparison table), and
audits the scored rows (`poft.audit`: the lowest and highest ref_score, where the references disagree,
the share below thresholds). report.html is the same report as one self-contained page.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poft import audit
from poft.errors import DataError, OptionError, OutputError
from poft.optional import pyplot
from poft.outputs import atomic_write, atomic_write_text, disk_error
from poft.reference_check import check_references
from poft.report_html import escape_markdown, render_html
from poft.schema import MESSAGES, NOISE, POFT_ID, REF_SCORE, SCORE_PREFIX, is_numeric, is_score_column


def eval_table(payloads: Sequence[dict]) -> str:
    """Markdown: one row per (task, metric), one column per model, from `poft eval` results."""
    results: dict[str, dict] = {}
    for payload in payloads:
        results.update(payload["results"])
    models = list(results)
    rows = sorted(
        {(task, metric) for scores in results.values() for task, metrics in scores.items() for metric in metrics}
    )
    lines = ["| task | metric | " + " | ".join(models) + " |", "| --- | --- |" + " --- |" * len(models)]
    for task, metric in rows:
        cells = [results[m].get(task, {}).get(metric) for m in models]
        lines.append(f"| {task} | {metric} | " + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines)


def agreement_table(columns: dict[str, list[float]]) -> str:
    """Markdown: Pearson / Spearman correlation between every pair of score columns (rows scored by all)."""
    names = list(columns)
    rows = [i for i in range(len(next(iter(columns.values())))) if all(columns[n][i] is not None for n in names)]
    lines = ["| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for a in names:
        cells = []
        for b in names:
            x, y = [columns[a][i] for i in rows], [columns[b][i] for i in rows]
            pearson, spearman = audit.correlations(x, y)
            cells.append(f"{pearson:.3f} / {spearman:.3f}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _save(fig, path: Path) -> None:
    """Write a plot atomically, then free it (pyplot keeps every open figure)."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    pyplot().close(fig)


def scored_data_section(dataset, output: Path) -> list[str]:
    """Distributions of every score column and ref_score (paper Figure 2), agreement, clean vs noisy.

    Null, NaN and infinite scores count as missing; a column with no finite score is reported as such.
    """
    plt = pyplot()
    names = [c for c in dataset.column_names if c.startswith(SCORE_PREFIX)] + (
        [REF_SCORE] if REF_SCORE in dataset.column_names else []
    )
    if not names:
        raise DataError("The scored data has no score_<name> or ref_score column: run `poft score` first.")
    columns = {n: [v if _finite(v) else None for v in dataset[n]] for n in names}
    noisy = dataset[NOISE] if NOISE in dataset.column_names else None
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        values = [v for v in columns[name] if v is not None]
        if noisy is None:
            ax.hist(values, bins=40, color="tab:blue")
        else:
            ax.hist(
                [v for v, n in zip(columns[name], noisy, strict=False) if v is not None and not n],
                bins=40,
                alpha=0.6,
                label="clean",
                color="tab:blue",
            )
            ax.hist(
                [v for v, n in zip(columns[name], noisy, strict=False) if v is not None and n],
                bins=40,
                alpha=0.6,
                label="noisy",
                color="tab:red",
            )
            ax.legend()
        if not values:
            ax.text(0.5, 0.5, "no finite score", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("mean response log-prob")
    _save(fig, output / "score_distributions.png")
    lines = [
        "## Reference scores",
        "",
        f"{len(dataset)} rows.",
        "",
        "| column | mean | std | min | max | missing |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        values = [v for v in columns[name] if v is not None]
        if not values:
            lines.append(f"| {name} | - | - | - | - | {len(columns[name])} (no finite score) |")
            continue
        stats = (statistics.mean(values), statistics.pstdev(values), min(values), max(values))
        lines.append(
            f"| {name} | " + " | ".join(f"{v:.3f}" for v in stats) + f" | {len(columns[name]) - len(values)} |"
        )
    lines += ["", "![score distributions](score_distributions.png)", ""]
    if (check := check_references(columns)) is not None:
        lines += [check.line(), ""]
    names = [n for n in names if any(v is not None for v in columns[n])]  # the rest has nothing to compare
    if len(names) > 2:
        lines += [
            "Agreement between references (Pearson / Spearman):",
            "",
            agreement_table({n: columns[n] for n in names if n != REF_SCORE}),
            "",
        ]
    if noisy is not None and any(noisy) and not all(noisy):
        lines += ["| column | AUC clean > noisy |", "| --- | --- |"]
        for name in names:
            clean = [v for v, n in zip(columns[name], noisy, strict=False) if v is not None and not n]
            bad = [v for v, n in zip(columns[name], noisy, strict=False) if v is not None and n]
            lines.append(f"| {name} | {audit.auc(clean, bad):.3f} |" if clean and bad else f"| {name} | - |")
        lines.append("")
    return lines


def _score(value: float | None) -> str:
    return "-" if audit.is_missing(value) else f"{value:.3f}"


def _rows_table(dataset, rows: Sequence[int], columns: dict[str, Callable[[int], str]], text_chars: int) -> list[str]:
    """Markdown table of `rows`: index, poft_id, a cell per column, first user and assistant text (escaped)."""
    header = ["row", POFT_ID, *columns, "first user turn", "first reply"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    has_ids, has_messages = POFT_ID in dataset.column_names, MESSAGES in dataset.column_names
    for row in rows:
        record = dataset[int(row)]
        messages = record[MESSAGES] if has_messages else None
        cells = [
            str(row),
            escape_markdown(str(record[POFT_ID])) if has_ids else "-",
            *(cells_of(row) for cells_of in columns.values()),
            *(
                escape_markdown(audit.shorten(audit.first_text(messages, r), text_chars))
                for r in ("user", "assistant")
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def audit_section(dataset, rows: int = 10, text_chars: int = 120) -> list[str]:
    """Which rows the references think are worst and best, where they disagree, and how many fall below thresholds."""
    references = [c for c in dataset.column_names if c.startswith(SCORE_PREFIX)]
    lines = ["## Data audit", ""]
    if REF_SCORE not in dataset.column_names:
        return lines + ["No ref_score column (the references' mean that `poft score` writes): nothing to audit.", ""]
    columns = {n: dataset[n] for n in [*references, REF_SCORE]}
    noise = {}
    if NOISE in dataset.column_names:  # synthetic noise (`poft noise`, the demo): is the row a corrupted one?
        flags = dataset[NOISE]
        noise = {"noisy": lambda row: "yes" if flags[row] else "no"}
    tables = AuditTables(dataset, columns, references, noise, rows, text_chars)
    return lines + tables.extreme_rows() + tables.disputed_rows() + _threshold_shares(columns, len(dataset))


@dataclass(frozen=True)
class AuditTables:
    """The audit's row tables over one scored dataset: its score columns, reference names, the noise column's cells
    (where the data carry one), how many rows a table shows and how much of each text."""

    dataset: Any
    columns: dict[str, list]
    references: list[str]
    noise: dict[str, Callable[[int], str]]
    rows: int
    text_chars: int

    def extreme_rows(self) -> list[str]:
        """The audit's tables of the rows with the lowest and the highest ref_score, and of those without one."""
        found = audit.extremes(self.columns[REF_SCORE], self.rows)
        scores = {n: (lambda row, n=n: _score(self.columns[n][row])) for n in [REF_SCORE, *self.references]}
        scores.update(self.noise)
        lines = [
            "Rows are numbered from 0 in the scored dataset's order (`datasets.load_from_disk(DIR)[row]`); "
            "text is the first user turn and the first assistant turn, shortened.",
            "",
            f"### Lowest ref_score ({len(found.lowest)} rows)",
            "",
            *_rows_table(self.dataset, found.lowest, scores, self.text_chars),
            "",
            f"### Highest ref_score ({len(found.highest)} rows)",
            "",
            *_rows_table(self.dataset, found.highest, scores, self.text_chars),
            "",
        ]
        if found.missing:
            lines += [
                f"### Rows without a ref_score ({len(found.missing)})",
                "",
                "At least one reference gave no score (usually: no response token survived its truncation; see the "
                "score columns). `poft filter` drops these rows; PoFT training skips them with a warning."
                + (f" The first {self.rows}:" if len(found.missing) > self.rows else ""),
                "",
                *_rows_table(self.dataset, found.missing[: self.rows], scores, self.text_chars),
                "",
            ]
        return lines

    def disputed_rows(self) -> list[str]:
        """The audit's table of the rows whose references' percentile ranks differ most."""
        lines = ["### Where the references disagree", ""]
        disputed = audit.disagreements({n: self.columns[n] for n in self.references}, self.rows)
        if len(self.references) < 2:
            return lines + ["One reference: nothing to compare.", ""]
        if not disputed:
            return lines + [
                "No disagreement: the references rank every row they all scored alike (or no row was scored by "
                "every reference).",
                "",
            ]
        by_row = {d.row: d for d in disputed}
        cells = {
            n: (lambda row, n=n: f"{_score(self.columns[n][row])} ({by_row[row].percentiles[n]:.0f})")
            for n in self.references
        }
        return lines + [
            "Each reference's scores as percentiles among the rows all references scored (0: its lowest row, "
            "100: its highest; in brackets), since references' log-prob scales differ; spread is the largest "
            "minus the smallest percentile.",
            "",
            *_rows_table(
                self.dataset,
                [d.row for d in disputed],
                {"spread": lambda row: f"{by_row[row].spread:.0f}", **cells, **self.noise},
                self.text_chars,
            ),
            "",
        ]


def _threshold_shares(columns: dict[str, list], n_rows: int) -> list[str]:
    """The audit's shares of rows below token-probability thresholds, and what each top fraction keeps."""
    names = list(columns)
    lines = [
        "### Rows below thresholds",
        "",
        "exp(score) is the geometric-mean probability a reference gives a response token, so each threshold is "
        "ln(p) for a token probability p. Shares are of the rows with a score in that column.",
        "",
        "| score below | token probability | " + " | ".join(names) + " |",
        "| --- | --- |" + " --- |" * len(names),
    ]
    for p in audit.TOKEN_PROBABILITIES:
        threshold = math.log(p)
        shares = []
        for name in names:
            below, scored = audit.count_below(columns[name], threshold)
            shares.append(f"{100 * below / scored:.1f}% ({below} of {scored})" if scored else "-")
        lines.append(f"| {threshold:.3f} | {p:g} | " + " | ".join(shares) + " |")
    lines += [
        "",
        "What `poft filter --top_fraction F` keeps (the paper keeps the top 40% by ref_score):",
        "",
        "| F | rows kept | lowest ref_score kept |",
        "| --- | --- | --- |",
    ]
    for fraction in audit.TOP_FRACTIONS:
        cutoff, kept = audit.top_fraction_cutoff(columns[REF_SCORE], fraction)
        lines.append(f"| {fraction:g} | {kept} of {n_rows} | {_score(cutoff)} |")
    return lines + [""]


TRAINING_CURVES = ("loss", "poft/weight", "poft/win_rate", "poft/margin")


def read_json(path: Path, option: str, what: str) -> Any:
    """A JSON file a user named; a missing, unreadable or malformed one is a one-line DataError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{option} {path}: no such file. Give {what}.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{option} {path} cannot be read ({error}). Give {what}.") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{option} {path} is not valid JSON ({error}). Give {what}.") from None


def read_training_histories(run_dirs: Sequence[str]) -> dict[str, list[dict]]:
    """Each run's logged training steps, from its trainer_state.json."""
    histories = {}
    for run in run_dirs:
        path = Path(run) / "trainer_state.json" if Path(run).is_dir() else Path(run)
        if not path.is_file():
            raise OptionError(
                f"No trainer_state.json in {run}: give a `poft train` output_dir or checkpoint directory."
            )
        what = "the trainer_state.json of a `poft train` output_dir or checkpoint"
        state = read_json(path, "--runs", what)
        log = state.get("log_history") if isinstance(state, dict) else None
        if not isinstance(log, list) or not all(isinstance(h, dict) for h in log):
            raise DataError(f"--runs {path} has no log_history list of steps. Give {what}.")
        histories[Path(run).name] = [h for h in log if "loss" in h]
    return histories


def read_eval_results(paths: Sequence[str]) -> list[dict]:
    """`poft eval` records: each a JSON object whose `results` maps model -> task -> metric -> number."""
    what = "the eval_results.json that `poft eval` writes"
    payloads = []
    for path in paths:
        payload = read_json(Path(path), "--eval", what)
        results = payload.get("results") if isinstance(payload, dict) else None
        if not isinstance(results, dict) or not all(
            isinstance(tasks, dict) and all(isinstance(metrics, dict) for metrics in tasks.values())
            for tasks in results.values()
        ):
            raise DataError(f"--eval {path} has no 'results' object (model -> task -> metric). Give {what}.")
        payloads.append(payload)
    return payloads


def check_score_columns(dataset, source: str) -> None:
    """Score columns (score_<name>, ref_score) must hold numbers: anything else is not a poft score."""
    for name in dataset.column_names:
        if not is_score_column(name):
            continue
        feature = dataset.features[name]
        if not is_numeric(feature, allow_null=True):
            kind = getattr(feature, "dtype", type(feature).__name__)
            raise DataError(
                f"--scored {source}: the column {name!r} holds {kind} values, not numbers. Give the output of "
                "`poft score`, or rename the column."
            )


def training_section(histories: dict[str, list[dict]], output: Path) -> list[str]:
    """Loss, PoFT weight, win rate and margin per step, one line per run (see `read_training_histories`)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(TRAINING_CURVES), figsize=(4.2 * len(TRAINING_CURVES), 3.3), squeeze=False)
    for ax, key in zip(axes[0], TRAINING_CURVES, strict=False):
        for name, history in histories.items():
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points, strict=False), label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    _save(fig, output / "training_curves.png")
    lines = [
        "## Training",
        "",
        "| run | steps | last loss | last PoFT weight | last win rate | last margin |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, history in histories.items():
        last = history[-1] if history else {}
        cells = " | ".join(f"{last[k]:.4f}" if k in last else "-" for k in TRAINING_CURVES)
        lines.append(f"| {name} | {last.get('step', 0)} | {cells} |")
    silent = [name for name, history in histories.items() if not history]
    if silent:
        lines += [
            "",
            f"{', '.join(silent)} logged no training step, so no curve is drawn for them: the run was shorter than "
            "its logging_steps (10 by default). Train with a smaller --logging_steps to see its curves.",
        ]
    return lines + ["", "![training curves](training_curves.png)", ""]


@dataclass
class ReportConfig:
    """Options of `poft report`."""

    scored: str | None = field(default=None, metadata={"help": "A scored dataset directory (`poft score` output)."})
    runs: list[str] = field(
        default_factory=list, metadata={"help": "Training output directories (or trainer_state.json files) to plot."}
    )
    eval: list[str] = field(default_factory=list, metadata={"help": "`poft eval` eval_results.json files to compare."})
    output: str = field(
        default="poft-report", metadata={"help": "Directory for report.md, its plots and report.html."}
    )
    audit_rows: int = field(
        default=10,
        metadata={"help": "Rows in each list of the data audit (lowest, highest, most disputed ref_score)."},
    )
    audit_text_chars: int = field(
        default=120, metadata={"help": "The data audit shortens each quoted turn to this many characters."}
    )

    def __post_init__(self):
        if self.audit_rows < 1 or self.audit_text_chars < 10:
            raise OptionError(
                f"--audit_rows must be at least 1 and --audit_text_chars at least 10 "
                f"(got {self.audit_rows} and {self.audit_text_chars})."
            )


def run_report(config: ReportConfig) -> Path:
    """`poft report`: report.md over whatever was given, and report.html, the same page self-contained."""
    from datasets import load_from_disk

    if not (config.scored or config.runs or config.eval):
        raise OptionError("Nothing to report: give --scored, --runs and/or --eval.")
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise OutputError(
            f"--output {config.output} is an existing file; poft report writes a folder there (report.md, "
            "report.html, plots). Choose another --output."
        )
    scored = None
    if config.scored:  # every input is read and checked before anything is written
        try:
            scored = load_from_disk(config.scored)
        except FileNotFoundError:
            raise DataError(
                f"--scored {config.scored} is not a dataset directory: give the --output folder of `poft score`."
            ) from None
        check_score_columns(scored, config.scored)
    histories = read_training_histories(config.runs)
    payloads = read_eval_results(config.eval)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise disk_error(error, f"--output {config.output}") or OutputError(
            f"--output {config.output}: cannot create the folder ({error.strerror}). Choose another --output."
        ) from error
    lines = ["# poft report", ""]
    if scored is not None:
        lines += scored_data_section(scored, output)
        lines += audit_section(scored, config.audit_rows, config.audit_text_chars)
    if histories:
        lines += training_section(histories, output)
    if payloads:
        lines += ["## Evaluation", "", eval_table(payloads), ""]
    markdown = "\n".join(lines)
    atomic_write_text(output / "report.md", markdown)
    atomic_write_text(output / "report.html", render_html(markdown, output, title="poft report"))
    return output / "report.md"


def written(report: Path) -> str:
    """What `poft report` prints of `run_report`'s result: the two files it wrote."""
    return f"Wrote {report} and {report.with_name('report.html')}"
