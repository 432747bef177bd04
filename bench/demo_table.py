"""Merge `poft demo` results.json files (e.g. a grid run as several commands) into the RESULTS.md tables.

    python bench/demo_table.py RUN_A/results.json RUN_B/results.json

Runs are merged by their identity (world, noise, seed, method, learning rate) and summarised again, so
paired differences span every file: PoFT minus each method with its 95% intervals over seeds and over
prompts, the accuracy table, the PoFT and SFT weights of clean and noisy rows over epochs, the references'
AUC of clean vs noisy rows, and the learning-rate sweep where one ran; with `--rule`, each PoFT objective's
difference to SFT in every condition, its worst, its share of poft_token's paper-noise gain, and each method's
share of the noise's cost it recovers, (method - sft) / (oracle - sft).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

from poft.demo.analysis import summarise
from poft.demo.report import accuracy_table, difference_table


def decision_table(summary: list[dict]) -> None:
    """The default's decision rule (bench/RESULTS.md, "Never below SFT"): per PoFT objective, its difference to SFT
    in each condition (same lr), the worst, and its paper-noise gain as a share of poft_token's in each world; then
    each method's recovered share of the noise's cost."""
    same = [e for e in summary if e["arm"] == "same lr"]
    conditions = [(e["world"], e["noise_kind"], e["noise_rate"]) for e in same]
    differences: dict[str, dict[tuple, float]] = defaultdict(dict)
    for entry, condition in zip(same, conditions, strict=True):
        methods = entry["methods"]
        for method, m in methods.items():
            if method != "sft" and "sft" in methods:
                differences[method][condition] = 100 * (m["accuracy"] - methods["sft"]["accuracy"])
    print(
        "| objective | "
        + " | ".join(f"{w} {k} {r:g}" for w, k, r in conditions)
        + " | worst | paper gain vs poft_token |"
    )
    print("| --- |" + " --- |" * (len(conditions) + 2))
    for method, by_condition in sorted(differences.items()):
        if method in ("oracle",) or not all(c in by_condition for c in conditions):
            continue
        shares = [
            f"{w} {by_condition[(w, k, r)] / differences['poft_token'][(w, k, r)]:.0%}"
            for w, k, r in conditions
            if k == "paper" and w != "misaligned" and "poft_token" in differences
        ]
        cells = " | ".join(f"{by_condition[c]:+.1f}" for c in conditions)
        print(f"| {method} | {cells} | {min(by_condition.values()):+.1f} | {', '.join(shares)} |")
    print()
    print(
        "| world | noise | rate | oracle - sft | "
        + " | ".join(f"{m}: recovered" for m in sorted(differences) if m != "oracle")
        + " |"
    )
    print("| --- | --- | --- | --- |" + " --- |" * (len(differences) - 1))
    for world, kind, rate in conditions:
        oracle = differences.get("oracle", {}).get((world, kind, rate))
        if oracle is None:
            continue
        shares = " | ".join(
            f"{differences[m][(world, kind, rate)] / oracle:.0%}" for m in sorted(differences) if m != "oracle"
        )
        print(f"| {world} | {kind} | {rate:g} | {oracle:+.1f} | {shares} |")
    print()


def main(paths: list[str], rule: bool = False) -> None:
    runs: dict[tuple, dict] = {}
    sweep: dict[tuple, dict] = {}
    separation, reference_accuracy, best_lr, learning_rates = [], {}, {}, set()
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        key = ("world", "noise_kind", "noise_rate", "seed", "method", "learning_rate")
        for run in results["runs"]:
            runs[tuple(run[k] for k in key)] = run
        for run in results.get("sweep", []):
            sweep[tuple(run[k] for k in key)] = run
        separation += results["separation"]
        reference_accuracy.update(results.get("reference_accuracy", {}))
        best_lr.update(results.get("best_learning_rates", {}))
        learning_rates.add(results["config"]["learning_rate"])
    if len(learning_rates) != 1:
        sys.exit(f"The files use different --learning_rate values {sorted(learning_rates)}; merge files of one arm.")
    summary = summarise(list(runs.values()), learning_rates.pop(), best_lr)
    summary.sort(key=lambda e: (e["world"], e["arm"], e["noise_kind"] != "none", e["noise_kind"], e["noise_rate"]))
    if rule:
        decision_table(summary)
    print(difference_table(summary))
    print()
    print(accuracy_table(summary))
    print()
    if sweep:
        print("| method | lr | seeds | validation exact match, last epoch (mean) | test exact match (mean) |")
        print("| --- | --- | --- | --- | --- |")
        grouped = defaultdict(list)
        for run in sweep.values():
            grouped[(run["method"], run["learning_rate"])].append(run)
        for (method, lr), group in sorted(grouped.items()):
            validation = statistics.mean(r["curve"][-1]["validation_accuracy"] for r in group)
            test = statistics.mean(r["test_accuracy"] for r in group)
            print(f"| {method} | {lr:g} | {len(group)} | {100 * validation:.1f} | {100 * test:.1f} |")
        print()
    print("| world | noise | rate | method | weight clean / noisy per epoch (mean over seeds) |")
    print("| --- | --- | --- | --- | --- |")
    curves = defaultdict(list)
    for run in runs.values():
        if run["method"] in ("poft", "poft_token", "poft_calibrated", "sft") and run["learning_rate"] in {
            r["learning_rate"] for r in runs.values()
        }:
            curves[(run["world"], run["noise_kind"], run["noise_rate"], run["method"], run["learning_rate"])].append(
                run
            )
    for (world, kind, rate, method, lr), group in sorted(curves.items()):
        cells = []
        for index in range(len(group[0]["curve"])):
            clean = statistics.mean(r["curve"][index]["weight_clean"] for r in group)
            noisy = [r["curve"][index]["weight_noisy"] for r in group if r["curve"][index]["weight_noisy"] is not None]
            cells.append(f"{clean:.2f}" + (f"/{statistics.mean(noisy):.2f}" if noisy else ""))
        print(f"| {world} | {kind} | {rate:g} | {method} (lr {lr:g}) | {' '.join(cells)} |")
    print()
    aucs = defaultdict(list)
    for row in separation:
        aucs[(row["world"], row["noise_kind"], row["noise_rate"])].append(row["auc"])
    print("| world | noise | rate | AUC of ref_score, clean > noisy (mean over seeds) |")
    print("| --- | --- | --- | --- |")
    for (world, kind, rate), values in sorted(aucs.items()):
        print(f"| {world} | {kind} | {rate:g} | {statistics.mean(values):.3f} |")
    print()
    for world, accuracies in sorted(reference_accuracy.items()):
        print(
            f"References of the {world} world on the test prompts: "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in accuracies.items())
        )


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main([a for a in arguments if a != "--rule"], rule="--rule" in arguments)
