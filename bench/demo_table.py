"""Merge `poft demo` results.json files (e.g. a grid run as several processes) into the RESULTS.md tables.

    python bench/demo_table.py RUN_A/results.json RUN_B/results.json

Prints the accuracy table (last and best epoch, mean ± std over seeds), the best of the ref_score
filter fractions per setting, and the references' AUC of clean vs noisy rows.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

from poft.report import accuracy_table, mean_std


def main(paths: list[str]) -> None:
    runs, separation, reference_accuracy = [], [], {}
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        runs += results["runs"]
        separation += results["separation"]
        reference_accuracy.update(results.get("reference_accuracy", {}))
    print(accuracy_table(runs))
    print()
    last: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    final_epoch = max(r["epoch"] for r in runs)
    for run in runs:
        if run["epoch"] == final_epoch:
            last[(run["noise_kind"], run["noise_rate"])][run["method"]].append(run["accuracy"])
    print("| noise | rate | sft | poft | oracle | best ref_score filter |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (kind, rate), methods in sorted(last.items()):
        filters = {m: v for m, v in methods.items() if m.startswith("filter")}
        best = max(filters, key=lambda m: statistics.mean(filters[m])) if filters else None
        cells = [mean_std(methods[m]) if m in methods else "-" for m in ("sft", "poft", "oracle")]
        cells.append(f"{mean_std(filters[best])} (top {best.removeprefix('filter')})" if best else "-")
        print(f"| {kind} | {rate:g} | " + " | ".join(cells) + " |")
    print()
    aucs = defaultdict(list)
    for row in separation:
        aucs[(row["noise_kind"], row["noise_rate"])].append(row["auc"])
    print("| noise | rate | AUC of ref_score, clean > noisy (mean over seeds) |")
    print("| --- | --- | --- |")
    for (kind, rate), values in sorted(aucs.items()):
        print(f"| {kind} | {rate:g} | {statistics.mean(values):.3f} |")
    print()
    print(
        "References on the held-out prompts: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in reference_accuracy.items())
    )


if __name__ == "__main__":
    main(sys.argv[1:])
