"""The reference check (`poft.reference_check`) on the demo's standard and misaligned worlds.

    nice -n 5 python bench/reference_check.py

Builds (or reuses, from the demo's cache) both worlds at the default settings, scores the target split under each
condition (clean, paper noise 0.6, subtle noise 0.3; seeds 0 and 1) with each world's references, and prints one
markdown row per dataset: the check's top-decile token probability, the references' rank agreement, and, for
comparison, the AUC of ref_score separating clean from noisy rows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from poft.audit import auc
from poft.demo.pipeline import DemoConfig, Grid, build_world
from poft.reference_check import check_references
from poft.schema import NOISE, REF_SCORE, is_score_column

CONDITIONS = (("none", 0.0), ("paper", 0.6), ("subtle", 0.3))


def main() -> None:
    config = DemoConfig(worlds=["standard", "misaligned"])
    worlds = {name: build_world(config, name) for name in config.worlds}
    with tempfile.TemporaryDirectory() as scratch:
        grid = Grid(config, worlds, Path(scratch))
        print("| world | data | seed | top-decile token probability | rank agreement | AUC clean > noisy |")
        print("| --- | --- | --- | --- | --- | --- |")
        for world in worlds:
            for kind, rate in CONDITIONS:
                for seed in (0, 1):
                    data = grid.scored_data(world, kind, rate, seed)
                    check = check_references({c: data[c] for c in data.column_names if is_score_column(c)})
                    noisy = data[NOISE]
                    clean = [s for s, n in zip(data[REF_SCORE], noisy, strict=True) if not n]
                    bad = [s for s, n in zip(data[REF_SCORE], noisy, strict=True) if n]
                    separation = f"{auc(clean, bad):.3f}" if bad else "-"
                    print(
                        f"| {world} | {kind} {rate:g} | {seed} | {check.top_confidence:.2f} | {check.agreement:.2f} "
                        f"| {separation} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
