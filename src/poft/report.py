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
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from poft import audit  # noqa: E402
from poft.errors import DataError, OptionError, OutputError  # noqa: E402
from poft.outputs import atomic_write_text, disk_error  # noqa: E402
from poft.report_html import escape_markdown, render_html  # noqa: E402
from poft.validation import is_numeric  # noqa: E402


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney AUC."""
    if not positives or not negatives:
        raise ValueError("auc needs at least one positive and one negative score")
    ranks = audit.ranks(list(positives) + list(negatives))
    n_pos, n_neg = len(positives), len(negatives)
    return (sum(ranks[:n_pos]) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _pct(interval: dict | None, signed: bool = False) -> str:
    if interval is None:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"[{fmt.format(100 * interval['low'])}, {fmt.format(100 * interval['high'])}]"


def _weight(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _setting_cells(entry: dict) -> str:
    return f"| {entry['world']} | {entry['noise_kind']} | {entry['noise_rate']:g} | {entry['arm']} |"


def accuracy_table(summary: Sequence[dict]) -> str:
    """Markdown: test exact match per setting and method (%), with 95% intervals over seeds and over prompts."""
    lines = [
        "| world | noise | rate | lr arm | method | lr | seeds | test exact match | 95% CI, seeds | 95% CI, prompts "
        "| weight clean / noisy (last epoch) | clipped steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in summary:
        for method, m in entry["methods"].items():
            clipped = "-" if m["clipped_share"] is None else f"{100 * m['clipped_share']:.0f}%"
            lines.append(
                f"{_setting_cells(entry)} {method} | {m['learning_rate']:g} | {len(m['seeds'])} | "
                f"{100 * m['accuracy']:.1f} | {_pct(m['interval_seeds'])} | {_pct(m['interval_prompts'])} | "
                f"{_weight(m['weight_clean'])} / {_weight(m['weight_noisy'])} | {clipped} |"
            )
    return "\n".join(lines)


def difference_table(summary: Sequence[dict]) -> str:
    """Markdown: each PoFT objective minus each other method (points), paired by seed and prompt, with the verdict."""
    lines = [
        "| world | noise | rate | lr arm | comparison | seeds | difference | 95% CI, seeds | 95% CI, prompts | verdict "
        "| within 1 point | seeds for +-2 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in summary:
        for first, method, c in _differences(entry):
            lines.append(
                f"{_setting_cells(entry)} {first} - {method} | {len(c['seeds'])} | {100 * c['difference']:+.1f} | "
                f"{_pct(c['interval_seeds'], True)} | {_pct(c['interval_prompts'], True)} | {c['verdict']} | "
                f"{c['within_1_point']} | {c['seeds_for_2_points'] or '-'} |"
            )
    return "\n".join(lines)


def _differences(entry: dict) -> list[tuple[str, str, dict]]:
    return [(first, other, c) for first, others in entry["differences"].items() for other, c in others.items()]


def _curves(runs: Sequence[dict], learning_rate: float) -> dict[tuple, dict[str, list[dict]]]:
    """(world, kind, rate) -> method -> runs at `learning_rate` (the shared-lr arm)."""
    grouped: dict = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run["learning_rate"] == learning_rate:
            grouped[(run["world"], run["noise_kind"], run["noise_rate"])][run["method"]].append(run)
    return dict(sorted(grouped.items()))


def _band(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs, the mean of `key` over runs and its 95% t-band (the mean itself with one run)."""
    from poft.intervals import paired_t_interval

    epochs = sorted(set.intersection(*({p["epoch"] for p in r["curve"] if p[key] is not None} for r in runs)))
    means, lows, highs = [], [], []
    for epoch in epochs:
        values = [next(p[key] for p in r["curve"] if p["epoch"] == epoch) for r in runs]
        interval = paired_t_interval(values, [0.0] * len(values))
        means.append(statistics.mean(values))
        lows.append(interval.low if interval else means[-1])
        highs.append(interval.high if interval else means[-1])
    return epochs, means, lows, highs


def _curve_plot(runs: Sequence[dict], learning_rate: float, path: Path, draw, ylabel: str) -> None:
    grouped = _curves(runs, learning_rate)
    fig, axes = plt.subplots(1, max(len(grouped), 1), figsize=(4.5 * max(len(grouped), 1), 3.6), squeeze=False)
    for ax, ((world, kind, rate), methods) in zip(axes[0], grouped.items(), strict=False):
        draw(ax, methods)
        ax.set_title(f"{world}: {kind} noise {rate:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def plot_accuracy(runs: Sequence[dict], learning_rate: float, path: Path) -> None:
    """Validation exact match per epoch, mean over seeds with a 95% band."""

    def draw(ax, methods):
        for method, group in methods.items():
            epochs, means, lows, highs = _band(group, "validation_accuracy")
            ax.plot(epochs, [100 * v for v in means], marker="o", markersize=3, label=method)
            ax.fill_between(epochs, [100 * v for v in lows], [100 * v for v in highs], alpha=0.2)

    _curve_plot(runs, learning_rate, path, draw, "validation exact match (%)")


def plot_weights(runs: Sequence[dict], learning_rate: float, path: Path) -> None:
    """sigmoid(r_ref - r_theta) of clean and noisy rows per epoch, for PoFT and for SFT, with 95% bands."""

    def draw(ax, methods):
        for method, style in (("poft", "-"), ("sft", ":")):
            for key, color in (("weight_clean", "tab:blue"), ("weight_noisy", "tab:red")):
                group = methods.get(method, [])
                if not group or all(p[key] is None for r in group for p in r["curve"]):
                    continue
                epochs, means, lows, highs = _band(group, key)
                label = f"{method}, {key.removeprefix('weight_')} rows"
                ax.plot(epochs, means, style, marker="o", markersize=3, color=color, label=label)
                ax.fill_between(epochs, lows, highs, color=color, alpha=0.15)
        ax.set_ylim(0, 1)

    _curve_plot(runs, learning_rate, path, draw, "mean sigmoid(r_ref - r_theta)")


def plot_differences(summary: Sequence[dict], path: Path) -> None:
    """Each PoFT objective minus each method per setting: the difference with its 95% intervals over seeds and
    over prompts."""
    rows = [(e, f"{first} - {m}", c) for e in summary for first, m, c in _differences(e)]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    for y, (_, _, c) in enumerate(rows):
        for interval, offset, color in (
            (c["interval_seeds"], -0.12, "tab:blue"),
            (c["interval_prompts"], 0.12, "tab:orange"),
        ):
            if interval is not None:
                ax.plot([100 * interval["low"], 100 * interval["high"]], [y + offset] * 2, color=color, linewidth=2)
        ax.plot(100 * c["difference"], y, "ko", markersize=4)
    ax.set_yticks(
        range(len(rows)),
        [f"{e['world']} {e['noise_kind']} {e['noise_rate']:g} ({e['arm']}): {m}" for e, m, _ in rows],
        fontsize=7,
    )
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("difference, exact-match points (blue: 95% CI over seeds, orange: over prompts)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_demo_report(results: dict, distributions: dict[str, dict[str, list[float]]], output: Path) -> str:
    """Write report.md and its plots (each atomically); return the difference and accuracy tables."""
    runs, summary, config = results["runs"], results["summary"], results["config"]
    plots = {
        "accuracy.png": lambda path: plot_accuracy(runs, config["learning_rate"], path),
        "weights.png": lambda path: plot_weights(runs, config["learning_rate"], path),
    }
    if any(_differences(e) for e in summary):
        plots["differences.png"] = lambda path: plot_differences(summary, path)
    if distributions:
        plots["score_distribution.png"] = lambda path: plot_score_distributions(distributions, path)
    for name, plot in plots.items():
        _atomic(output / name, plot)
    separation = defaultdict(list)
    for row in results["separation"]:
        separation[(row["world"], row["noise_kind"], row["noise_rate"])].append(row["auc"])
    tables = difference_table(summary) + "\n\n" + accuracy_table(summary)
    settings = results["train_settings"]
    lines = [
        "# poft demo: PoFT vs SFT on noisy instruction data",
        "",
        f"Target split: {config['target_rows']} rows; test prompts: {config['test_rows']}; validation prompts: "
        f"{config['validation_rows']}; {settings['epochs']} epochs, {settings['lr_scheduler_type']} schedule with "
        f"{settings['warmup_ratio']:g} warmup, batch {settings['batch_size']}, max_grad_norm "
        f"{settings['max_grad_norm']:g}; models {config['num_layers']} layers x width {config['hidden_size']}. "
        "Accuracy is greedy exact match (%) on the test prompts after the last epoch. Differences are paired: the "
        "same seed gives both methods the same noise and data order, and both answer the same prompts. "
        "A difference whose 95% intervals do not all exclude zero is reported as no measurable difference.",
        "",
    ]
    if results.get("best_learning_rates"):
        lines += [
            "Best learning rates on the validation split (clean data): "
            + ", ".join(f"{m} {lr:g}" for m, lr in results["best_learning_rates"].items())
            + ".",
            "",
        ]
    lines += [
        "## The PoFT objectives minus the other methods (exact-match points)",
        "",
        difference_table(summary),
        "",
        "![differences with intervals](differences.png)" if "differences.png" in plots else "",
        "",
        "## Accuracy",
        "",
        accuracy_table(summary),
        "",
        "References, trained on clean data, on the same test prompts: "
        + "; ".join(
            f"{world}: " + ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in accuracies.items())
            for world, accuracies in results.get("reference_accuracy", {}).items()
        )
        + ".",
        "",
        "![validation accuracy per epoch](accuracy.png)",
        "",
        "## How well the references separate clean from noisy rows",
        "",
        "| world | noise | rate | AUC of ref_score (clean > noisy), mean over seeds |",
        "| --- | --- | --- | --- |",
        *[f"| {w} | {k} | {r:g} | {statistics.mean(v):.3f} |" for (w, k, r), v in sorted(separation.items())],
        "",
    ]
    if distributions:
        lines += ["![reference score distribution](score_distribution.png)", ""]
    lines += [
        "## Weight sigmoid(r_ref - r_theta) of clean and noisy rows over training (PoFT and SFT)",
        "",
        "![weights](weights.png)",
        "",
    ]
    atomic_write_text(output / "report.md", "\n".join(lines))
    return tables


def _atomic(path: Path, write) -> None:
    """Let `write` fill a temporary sibling of `path` (same suffix, which names the image format), then rename."""
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(temporary)
        temporary.replace(path)
    except BaseException:  # a full disk mid-write: no half-written image left beside the report
        temporary.unlink(missing_ok=True)
        raise


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
    _atomic(output / "score_distributions.png", lambda path: fig.savefig(path, dpi=110))
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
        stats = (statistics.mean(values), statistics.pstdev(values), min(values), max(values))
        lines.append(
            f"| {name} | " + " | ".join(f"{v:.3f}" for v in stats) + f" | {len(columns[name]) - len(values)} |"
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
            "score columns). `poft filter` drops these rows; PoFT training skips them with a warning."
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
        lines += [
            "No disagreement: the references rank every row they all scored alike (or no row was scored by "
            "every reference).",
            "",
        ]
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
        if not (name.startswith("score_") or name == "ref_score"):
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
    _atomic(output / "training_curves.png", lambda path: fig.savefig(path, dpi=110))
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
    print(f"Wrote {output / 'report.md'} and {output / 'report.html'}")
    return output / "report.md"
