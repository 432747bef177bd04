"""Plots (matplotlib, headless) and markdown reports of what a run measured.

`auc` is the rank statistic of how well reference scores separate clean from noisy rows.
`write_demo_report` turns the demo's results into report.md with three plots: the reference score
distribution of clean vs noisy rows (the paper's Figures 2 and 3d), accuracy per epoch per method, and
the mean PoFT weight on clean vs noisy rows over training.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney AUC."""
    if not positives or not negatives:
        raise ValueError("auc needs at least one positive and one negative score")
    pooled = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2  # ranks are 1-based
        rank_sum += average_rank * sum(label for _, label in pooled[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


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
            lines.append(f"| {kind} | {rate:g} | {method} | {len(seeds)} | {mean_std(last)} | {mean_std(best)} | {weights} |")
    return "\n".join(lines)


def plot_score_distributions(distributions: dict[str, dict[str, list[float]]], path: Path) -> None:
    fig, axes = plt.subplots(1, max(len(distributions), 1), figsize=(4.5 * max(len(distributions), 1), 3.4), squeeze=False)
    for ax, (name, groups) in zip(axes[0], distributions.items()):
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
    for ax, ((kind, rate), methods) in zip(axes[0], grouped):
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
