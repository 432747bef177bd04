"""The demo's report.md and plots: accuracy and PoFT-minus tables with intervals, curves per epoch, score histograms."""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from poft.demo.analysis import PREFERENCE_METHODS
from poft.demo.intervals import paired_t_interval
from poft.objective_registry import SFT
from poft.optional import pyplot
from poft.outputs import atomic_write, atomic_write_text

plt = pyplot()


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


def curve_table(runs: Sequence[dict]) -> str:
    """Markdown: validation exact match (%) after each epoch (0: before training), mean over seeds, per setting,
    method and learning rate: accuracy against training length, read from the runs' own curves."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        grouped[(run["world"], run["noise_kind"], run["noise_rate"], run["method"], run["learning_rate"])].append(run)
    lines = [
        "| world | noise | rate | method | lr | seeds | validation exact match after epoch 0, 1, ... |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (world, kind, rate, method, lr), group in sorted(grouped.items()):
        _, means, _, _ = _band(group, "validation_accuracy")
        curve = " ".join(f"{100 * v:.1f}" for v in means)
        lines.append(f"| {world} | {kind} | {rate:g} | {method} | {lr:g} | {len(group)} | {curve} |")
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


def _weight_styles() -> dict[str, str]:
    """The methods the weights plot draws, with their line styles: each PoFT objective its own, SFT dotted."""
    styles = itertools.cycle(("-", "--", "-."))
    return {**{method: next(styles) for method in PREFERENCE_METHODS}, SFT.name: ":"}


def plot_weights(runs: Sequence[dict], learning_rate: float, path: Path) -> None:
    """sigmoid(r_ref - r_theta) of clean and noisy rows per epoch, for each PoFT objective and for SFT, with 95%
    bands."""

    def draw(ax, methods):
        for method, style in _weight_styles().items():
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


def _epochs(epochs: int, world_epochs: dict[str, int]) -> str:
    """'10 epochs', or each world's epochs where a world trains for its own number."""
    if all(e == epochs for e in world_epochs.values()):
        return f"{epochs} epochs"
    return "epochs: " + ", ".join(f"{world} {e}" for world, e in world_epochs.items())


def summary_tables(results: dict) -> str:
    """The difference and accuracy tables of `poft demo`'s results: what the command prints when it is done."""
    return difference_table(results["summary"]) + "\n\n" + accuracy_table(results["summary"])


def write_demo_report(results: dict, distributions: dict[str, dict[str, list[float]]], output: Path) -> None:
    """Write report.md and its plots (each atomically)."""
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
        atomic_write(output / name, plot)
    separation = defaultdict(list)
    for row in results["separation"]:
        separation[(row["world"], row["noise_kind"], row["noise_rate"])].append(row["auc"])
    settings = results["train_settings"]
    lines = [
        "# poft demo: PoFT vs SFT on noisy instruction data",
        "",
        f"Target split: {config['target_rows']} rows; test prompts: {config['test_rows']}; validation prompts: "
        f"{config['validation_rows']}; {_epochs(settings['epochs'], results.get('world_epochs', {}))}, {settings['lr_scheduler_type']} schedule with "
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
        "Validation exact match (%) after each epoch, mean over seeds:",
        "",
        curve_table(runs),
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
