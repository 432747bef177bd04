"""The demo's DPO stage swept on the validation prompts: DPO after SFT on clean data, first world.

Every setting starts from the same finished SFT run of each seed (the run store keeps its model), so the sweep
trains SFT once per seed and one DPO stage per setting. Prints one row per setting: beta, learning rate, epochs,
the NLL weight on the chosen answers, validation exact match before (the SFT model) and after DPO, and how the
mean per-token log-prob of the pairs' chosen and rejected answers and of the validation answers moved. The best
setting by validation accuracy after DPO (mean over seeds) is then run with an NLL term on the chosen answers.

    OMP_NUM_THREADS=1 python bench/dpo_sweep.py --output dpo-sweep --seeds 0 1 --workers 2
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
from pathlib import Path

from poft.demo.methods import DPO_PAIRS, DPOSettings
from poft.demo.pipeline import DemoConfig, Grid, build_world
from poft.demo.runs import RunSpec
from poft.runtime import progress_bars_on_terminal_only


def rows(records: list[dict]) -> dict[DPOSettings, list[dict]]:
    by_setting: dict[DPOSettings, list[dict]] = {}
    for record in records:
        by_setting.setdefault(DPOSettings(**record["dpo"]), []).append(record)
    return by_setting


def mean(values) -> float:
    return statistics.mean(values)


def table(by_setting: dict[DPOSettings, list[dict]]) -> None:
    print(
        "| beta | lr | epochs | NLL weight | validation before (SFT) | validation after DPO | after - before "
        "| chosen log-prob before -> after | rejected log-prob before -> after | validation answers' log-prob "
        "before -> after |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for settings, records in sorted(by_setting.items(), key=lambda item: item[0].name):
        before = mean(100 * r["curve"][-2]["validation_accuracy"] for r in records)
        after = mean(100 * r["curve"][-1]["validation_accuracy"] for r in records)
        moved = {
            key: f"{mean(r['log_probs'][f'{key} before'] for r in records):.3f} -> "
            f"{mean(r['log_probs'][f'{key} after'] for r in records):.3f}"
            for key in ("chosen", "rejected", "validation answers")
        }
        print(
            f"| {settings.beta:g} | {settings.learning_rate:g} | {settings.epochs} | {settings.nll_weight:g} | "
            f"{before:.1f} | {after:.1f} | {after - before:+.1f} | {moved['chosen']} | {moved['rejected']} | "
            f"{moved['validation answers']} |"
        )


def best(by_setting: dict[DPOSettings, list[dict]]) -> DPOSettings:
    """The setting with the highest mean validation accuracy after DPO (ties: the earlier name)."""
    return max(
        sorted(by_setting, key=lambda s: s.name),
        key=lambda s: mean(r["curve"][-1]["validation_accuracy"] for r in by_setting[s]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="dpo-sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--learning_rates", type=float, nargs="+", default=[1e-6, 1e-5, 3e-5, 1e-4])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--nll_weight", type=float, default=1.0, help="the NLL term's weight at the best setting")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    progress_bars_on_terminal_only()
    config = DemoConfig(output=args.output, conditions=["clean"], methods=["sft+dpo"], workers=args.workers)
    grid = Grid(config, {"standard": build_world(config)}, Path(args.output))

    def run(settings: list[DPOSettings]) -> list[dict]:
        specs = [
            RunSpec("standard", "none", 0.0, seed, "sft+dpo", config.learning_rate, s)
            for s in settings
            for seed in args.seeds
        ]
        return grid.run(specs)

    swept = [
        DPOSettings(DPO_PAIRS, lr, beta, epochs, nll_weight=0.0)
        for lr, beta, epochs in itertools.product(args.learning_rates, args.betas, args.epochs)
    ]
    by_setting = rows(run(swept))
    chosen = best(by_setting)
    with_nll = DPOSettings(chosen.pairs, chosen.learning_rate, chosen.beta, chosen.epochs, args.nll_weight)
    by_setting.update(rows(run([with_nll])))
    table(by_setting)
    print(f"\nBest without the NLL term: {chosen.name}; best of all, on validation: {best(by_setting).name}")


if __name__ == "__main__":
    main()
