"""Plots (matplotlib, headless) and markdown reports of what a run measured.

`poft report` covers a scored dataset (per-reference and aggregate score distributions as in the
paper's Figure 2, agreement between references, clean vs noisy where `poft_noise` exists), training
runs (loss, PoFT weight, win rate and margin curves from the trainer's logs) and `poft eval` results
(a comparison table), and audits the scored rows (`poft.audit`: the lowest and highest ref_score, where
the references disagree, the share below thresholds). report.html is the same report as one self-contained
page. `write_demo_report` turns the demo's results into its report.md and plots.
`auc` is the rank statistic of how well scores separate clean from noisy rows.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from poft import audit  # noqa: E402
from poft.errors import DataError, OptionError  # noqa: E402
from poft.outputs import atomic_write_text  # noqa: E402
from poft.report_html import escape_markdown, render_html  # noqa: E402


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney AUC."""
    if not positives or not negatives:
        raise ValueError("auc needs at least one positive and one negative score")
    ranks = audit.ranks(list(positives) + list(negatives))
    n_pos, n_neg = len(positives), len(negatives)
    return (sum(ranks[:n_pos]) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _setting(run: dict) -> tuple[str, float]:
    return run["noise_kind"], run["noise_rate"]


def _group(runs: Sequence[dict]) -> dict[tuple[str, float], dict[str, dict[int, dict[int, dict]]]]:
    """setting -> method -> seed -> epoch -> run record."""
    grouped: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for run in runs:
        grouped[_setting(run)][run["method"]][run["seed"]][run["epoch"]] = run
    return grouped


def accuracy_table(runs: Sequence[dict]) -> str:
    """Markdown: accuracy at the last and the best epoch per setting and method, mean ± std over seeds (in %)."""
    lines = [
        "| noise | rate | method | seeds | last epoch | best epoch | PoFT weight clean / noisy (last) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (kind, rate), methods in sorted(_group(runs).items()):
        for method, seeds in methods.items():
            last = [epochs[max(epochs)]["accuracy"] for epochs in seeds.values()]
            best = [max(r["accuracy"] for r in epochs.values()) for epochs in seeds.values()]
            finals = [epochs[max(epochs)] for epochs in seeds.values()]
            weights = "-"
            if method == "poft":
                clean = [f["weight_clean"] for f in finals if f.get("weight_clean") is not None]
                noisy = [f["weight_noisy"] for f in finals if f.get("weight_noisy") is not None]
                weights = f"{statistics.mean(clean):.2f} / " + (f"{statistics.mean(noisy):.2f}" if noisy else "-")
            lines.append(
                f"| {kind} | {rate:g} | {method} | {len(seeds)} | {mean_std(last)} | {mean_std(best)} | {weights} |"
            )
    return "\n".join(lines)


def plot_score_distributions(distributions: dict[str, dict[str, list[float]]], path: Path) -> None:
    fig, axes = plt.subplots(
        1, max(len(distributions), 1), figsize=(4.5 * max(len(distributions), 1), 3.4), squeeze=False
    )
    for ax, (name, groups) in zip(axes[0], distributions.items(), strict=False):
        low = min(min(groups["clean"]), min(groups["noisy"]))
        high = max(max(groups["clean"]), max(groups["noisy"]))
        bins = [low + (high - low) * i / 40 for i in range(41)]
        ax.hist(groups["clean"], bins=bins, alpha=0.6, label=f"clean ({len(groups['clean'])})", color="tab:blue")
        ax.hist(groups["noisy"], bins=bins, alpha=0.6, label=f"noisy ({len(groups['noisy'])})", color="tab:red")
        ax.set_title(f"ref_score, {name} noise")
        ax.set_xlabel("mean response log-prob (references' mean)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_setting_plot(runs: Sequence[dict], path: Path, draw) -> None:
    grouped = sorted(_group(runs).items())
    fig, axes = plt.subplots(1, max(len(grouped), 1), figsize=(4.5 * max(len(grouped), 1), 3.4), squeeze=False)
    for ax, ((kind, rate), methods) in zip(axes[0], grouped, strict=False):
        draw(ax, methods)
        ax.set_title(f"{kind} noise, rate {rate:g}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_curve(seeds: dict[int, dict[int, dict]], key: str) -> tuple[list[int], list[float]]:
    epochs = sorted(set.intersection(*(set(e) for e in seeds.values())))
    values = [statistics.mean(seeds[s][e][key] for s in seeds) for e in epochs]
    return epochs, values


def plot_accuracy(runs: Sequence[dict], path: Path) -> None:
    def draw(ax, methods):
        for method, seeds in methods.items():
            epochs, values = _mean_curve(seeds, "accuracy")
            ax.plot(epochs, [100 * v for v in values], marker="o", label=method)
        ax.set_ylabel("exact match on held-out prompts (%)")

    _per_setting_plot(runs, path, draw)


def plot_weights(runs: Sequence[dict], path: Path) -> None:
    poft_runs = [r for r in runs if r["method"] == "poft" and r.get("weight_noisy") is not None]

    def draw(ax, methods):
        for key, color in (("weight_clean", "tab:blue"), ("weight_noisy", "tab:red")):
            epochs, values = _mean_curve(methods["poft"], key)
            ax.plot(epochs, values, marker="o", color=color, label=key.replace("weight_", "") + " rows")
        ax.set_ylabel("mean PoFT weight sigmoid(r_ref - r_theta)")
        ax.set_ylim(0, 1)

    _per_setting_plot(poft_runs, path, draw)


def write_demo_report(results: dict, distributions: dict[str, dict[str, list[float]]], output: Path) -> str:
    """Write report.md and its plots; return the accuracy table."""
    runs = results["runs"]
    table = accuracy_table(runs)
    plots = {"accuracy.png": plot_accuracy}
    if distributions:
        plot_score_distributions(distributions, output / "score_distribution.png")
    if any(r.get("weight_noisy") is not None for r in runs if r["method"] == "poft"):
        plots["weights.png"] = plot_weights
    for name, plot in plots.items():
        plot(runs, output / name)
    separation = defaultdict(list)
    for row in results["separation"]:
        separation[(row["noise_kind"], row["noise_rate"])].append(row["auc"])
    config = results["config"]
    lines = [
        "# poft demo: PoFT vs SFT on noisy instruction data",
        "",
        f"Target split: {config['target_rows']} rows; held-out prompts: {config['test_rows']}; "
        f"{config['epochs']} epochs, lr {config['learning_rate']}, batch {config['batch_size']}, "
        f"models {config['num_layers']} layers x width {config['hidden_size']}. Accuracy is greedy exact match (%), "
        "mean ± std over seeds where there are several.",
        "",
        "## Accuracy",
        "",
        table,
        "",
        "References, trained on clean data, on the same held-out prompts: "
        + ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in results.get("reference_accuracy", {}).items())
        + ".",
        "",
        "![accuracy per epoch](accuracy.png)",
        "",
        "## How well the references separate clean from noisy rows",
        "",
        "| noise | rate | AUC of ref_score (clean > noisy) |",
        "| --- | --- | --- |",
        *[f"| {k} | {r:g} | {statistics.mean(v):.3f} |" for (k, r), v in sorted(separation.items())],
        "",
    ]
    if distributions:
        lines += ["![reference score distribution](score_distribution.png)", ""]
    if "weights.png" in plots:
        lines += ["## PoFT's weight on clean and noisy rows over training", "", "![PoFT weights](weights.png)", ""]
    (output / "report.md").write_text("\n".join(lines))
    return table


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


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 2:
        return float("nan")
    mx, my = statistics.mean(x), statistics.mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=False))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def agreement_table(columns: dict[str, list[float]]) -> str:
    """Markdown: Pearson / Spearman correlation between every pair of score columns (rows scored by all)."""
    names = list(columns)
    rows = [i for i in range(len(next(iter(columns.values())))) if all(columns[n][i] is not None for n in names)]
    lines = ["| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for a in names:
        cells = []
        for b in names:
            x, y = [columns[a][i] for i in rows], [columns[b][i] for i in rows]
            cells.append(f"{_pearson(x, y):.3f} / {_pearson(audit.ranks(x), audit.ranks(y)):.3f}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def scored_data_section(dataset, output: Path) -> list[str]:
    """Distributions of every score column and ref_score (paper Figure 2), agreement, clean vs noisy.

    Null, NaN and infinite scores count as missing; a column with no finite score is reported as such.
    """
    names = [c for c in dataset.column_names if c.startswith("score_")] + (
        ["ref_score"] if "ref_score" in dataset.column_names else []
    )
    if not names:
        raise DataError("The scored data has no score_<name> or ref_score column: run `poft score` first.")
    columns = {n: [v if _finite(v) else None for v in dataset[n]] for n in names}
    noisy = dataset["poft_noise"] if "poft_noise" in dataset.column_names else None
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
    fig.tight_layout()
    fig.savefig(output / "score_distributions.png", dpi=110)
    plt.close(fig)
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
        lines.append(
            f"| {name} | {statistics.mean(values):.3f} | {statistics.pstdev(values):.3f} | {min(values):.3f} | {max(values):.3f} | {len(columns[name]) - len(values)} |"
        )
    lines += ["", "![score distributions](score_distributions.png)", ""]
    names = [n for n in names if any(v is not None for v in columns[n])]  # the rest has nothing to compare
    if len(names) > 2:
        lines += [
            "Agreement between references (Pearson / Spearman):",
            "",
            agreement_table({n: columns[n] for n in names if n != "ref_score"}),
            "",
        ]
    if noisy is not None and any(noisy) and not all(noisy):
        lines += ["| column | AUC clean > noisy |", "| --- | --- |"]
        for name in names:
            clean = [v for v, n in zip(columns[name], noisy, strict=False) if v is not None and not n]
            bad = [v for v, n in zip(columns[name], noisy, strict=False) if v is not None and n]
            lines.append(f"| {name} | {auc(clean, bad):.3f} |" if clean and bad else f"| {name} | - |")
        lines.append("")
    return lines


def _score(value: float | None) -> str:
    return "-" if audit.is_missing(value) else f"{value:.3f}"


def _rows_table(dataset, rows: Sequence[int], columns: dict[str, Callable[[int], str]], text_chars: int) -> list[str]:
    """Markdown table of `rows`: index, poft_id, a cell per column, first user and assistant text (escaped)."""
    header = ["row", "poft_id", *columns, "first user turn", "first reply"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    has_ids, has_messages = "poft_id" in dataset.column_names, "messages" in dataset.column_names
    for row in rows:
        record = dataset[int(row)]
        messages = record["messages"] if has_messages else None
        cells = [
            str(row),
            escape_markdown(str(record["poft_id"])) if has_ids else "-",
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
    references = [c for c in dataset.column_names if c.startswith("score_")]
    lines = ["## Data audit", ""]
    if "ref_score" not in dataset.column_names:
        return lines + ["No ref_score column (the references' mean that `poft score` writes): nothing to audit.", ""]
    names = [*references, "ref_score"]
    columns = {n: dataset[n] for n in names}
    found = audit.extremes(columns["ref_score"], rows)
    scores = {n: (lambda row, n=n: _score(columns[n][row])) for n in ["ref_score", *references]}
    noise = {}
    if "poft_noise" in dataset.column_names:  # synthetic noise (`poft noise`, the demo): is the row a corrupted one?
        flags = dataset["poft_noise"]
        noise = {"noisy": lambda row: "yes" if flags[row] else "no"}
    scores.update(noise)
    lines += [
        "Rows are numbered from 0 in the scored dataset's order (`datasets.load_from_disk(DIR)[row]`); "
        "text is the first user turn and the first assistant turn, shortened.",
        "",
        f"### Lowest ref_score ({len(found.lowest)} rows)",
        "",
        *_rows_table(dataset, found.lowest, scores, text_chars),
        "",
        f"### Highest ref_score ({len(found.highest)} rows)",
        "",
        *_rows_table(dataset, found.highest, scores, text_chars),
        "",
    ]
    if found.missing:
        lines += [
            f"### Rows without a ref_score ({len(found.missing)})",
            "",
            "At least one reference gave no score (usually: no response token survived its truncation; see the "
            "score columns). `poft filter` drops these rows; PoFT training refuses data that still holds them."
            + (f" The first {rows}:" if len(found.missing) > rows else ""),
            "",
            *_rows_table(dataset, found.missing[:rows], scores, text_chars),
            "",
        ]
    lines += ["### Where the references disagree", ""]
    disputed = audit.disagreements({n: columns[n] for n in references}, rows)
    if len(references) < 2:
        lines += ["One reference: nothing to compare.", ""]
    elif disputed:
        by_row = {d.row: d for d in disputed}
        cells = {
            n: (lambda row, n=n: f"{_score(columns[n][row])} ({by_row[row].percentiles[n]:.0f})") for n in references
        }
        lines += [
            "Each reference's scores as percentiles among the rows all references scored (0: its lowest row, "
            "100: its highest; in brackets), since references' log-prob scales differ; spread is the largest "
            "minus the smallest percentile.",
            "",
            *_rows_table(
                dataset,
                [d.row for d in disputed],
                {"spread": lambda row: f"{by_row[row].spread:.0f}", **cells, **noise},
                text_chars,
            ),
            "",
        ]
    else:
        lines += ["No row was scored by every reference.", ""]
    lines += [
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
        cutoff, kept = audit.top_fraction_cutoff(columns["ref_score"], fraction)
        lines.append(f"| {fraction:g} | {kept} of {len(dataset)} | {_score(cutoff)} |")
    return lines + [""]


TRAINING_CURVES = ("loss", "poft/weight", "poft/win_rate", "poft/margin")


def training_section(run_dirs: Sequence[str], output: Path) -> list[str]:
    """Loss, PoFT weight, win rate and margin per step, one line per run, from trainer_state.json."""
    histories = {}
    for run in run_dirs:
        path = Path(run) / "trainer_state.json" if Path(run).is_dir() else Path(run)
        if not path.is_file():
            raise OptionError(
                f"No trainer_state.json in {run}: give a `poft train` output_dir or checkpoint directory."
            )
        histories[Path(run).name] = [h for h in json.loads(path.read_text())["log_history"] if "loss" in h]
    fig, axes = plt.subplots(1, len(TRAINING_CURVES), figsize=(4.2 * len(TRAINING_CURVES), 3.3), squeeze=False)
    for ax, key in zip(axes[0], TRAINING_CURVES, strict=False):
        for name, history in histories.items():
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points, strict=False), label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "training_curves.png", dpi=110)
    plt.close(fig)
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
    output.mkdir(parents=True, exist_ok=True)
    lines = ["# poft report", ""]
    if config.scored:
        try:
            scored = load_from_disk(config.scored)
        except FileNotFoundError:
            raise DataError(
                f"--scored {config.scored} is not a dataset directory: give the --output folder of `poft score`."
            ) from None
        lines += scored_data_section(scored, output)
        lines += audit_section(scored, config.audit_rows, config.audit_text_chars)
    if config.runs:
        lines += training_section(config.runs, output)
    if config.eval:
        payloads = [json.loads(Path(p).read_text()) for p in config.eval]
        lines += ["## Evaluation", "", eval_table(payloads), ""]
    markdown = "\n".join(lines)
    atomic_write_text(output / "report.md", markdown)
    atomic_write_text(output / "report.html", render_html(markdown, output, title="poft report"))
    print(f"Wrote {output / 'report.md'} and {output / 'report.html'}")
    return output / "report.md"
