"""Where a PoFT objective loses to SFT on clean data, and what the references' and the base's scores say there.

Reads a demo output's `results.json` (runs of `--method` and `--against` on clean data, several seeds), rebuilds
the worlds it names from the demo's cache, and prints markdown tables:

- test exact match per task family, per answer length and per decile of the references' score of the correct
  answer, for both methods (mean over seeds), and the difference;
- PoFT's weight sigmoid(r_ref - r_theta) per family over training, relative to the mean weight of all rows at the
  same epoch (under AdamW and clipping only the weights' ratios move the update);
- each method's pre-clipping gradient norm (median over steps) and share of clipped steps;
- on the target's training rows: the references' and the base's mean per-token log-prob and entropy per family,
  whether the two references agree on the rows they score low, and how much of r_ref the base's own score
  predicts;
- with `--noisy KIND:RATE`, how well each per-row signal separates clean from noisy rows (AUC), so that a
  weight built from it can be judged by what it keeps of PoFT's gain under noise.

    OMP_NUM_THREADS=1 python bench/diagnosis.py diag/results.json --noisy paper:0.6 subtle:0.3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft.audit import auc
from poft.chat import ConversationEncoder
from poft.demo.pipeline import DemoConfig, build_world
from poft.demo.runs import answers_correct
from poft.demo.settings import MAX_LENGTH
from poft.demo.tasks import FAMILY
from poft.noise import add_noise
from poft.runtime import progress_bars_on_terminal_only
from poft.schema import MESSAGES, NOISE


@torch.no_grad()
def response_statistics(path: str, conversations: list[list[dict]]) -> tuple[list[float], list[float]]:
    """Per conversation: the model's mean log-prob of the response tokens (its score r) and its mean entropy at
    those positions (how unsure it is there), from full logits, one conversation at a time."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(path), max_length=MAX_LENGTH)
    scores, entropies = [], []
    for messages in conversations:
        encoded = encoder.encode(messages)
        ids = torch.tensor([encoded.input_ids])
        log_probs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        positions = torch.tensor(encoded.response_mask[1:], dtype=torch.bool)
        chosen = log_probs[positions].gather(-1, ids[0, 1:][positions, None]).squeeze(-1)
        entropy = -(log_probs[positions].exp() * log_probs[positions]).sum(-1)
        scores.append(chosen.mean().item())
        entropies.append(entropy.mean().item())
    return scores, entropies


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result

    return statistics.correlation(ranks(a), ranks(b))


def bottom(values: list[float], share: float) -> set[int]:
    return set(sorted(range(len(values)), key=values.__getitem__)[: round(share * len(values))])


def accuracy_table(title: str, groups: dict[str, list[int]], correct: dict[str, list[list[int]]], method, against):
    print(f"\n{title}\n")
    print(f"| group | prompts | {against} | {method} | {method} - {against} |")
    print("| --- | --- | --- | --- | --- |")
    for group, rows in groups.items():
        if not rows:
            continue
        means = {
            m: 100 * statistics.mean(statistics.mean(seed[i] for i in rows) for seed in correct[m])
            for m in (against, method)
        }
        print(
            f"| {group} | {len(rows)} | {means[against]:.1f} | {means[method]:.1f} | "
            f"{means[method] - means[against]:+.1f} |"
        )


def length_groups(answers: list[str]) -> dict[str, list[int]]:
    bins = (("1 character", 1, 1), ("2-3", 2, 3), ("4-5", 4, 5), ("6-7", 6, 7), ("8 or more", 8, 10**6))
    return {name: [i for i, a in enumerate(answers) if lo <= len(a) <= hi] for name, lo, hi in bins}


def decile_groups(values: list[float]) -> dict[str, list[int]]:
    order = sorted(range(len(values)), key=values.__getitem__)
    size = len(order) / 10
    return {f"decile {d + 1} (lowest first)": order[round(d * size) : round((d + 1) * size)] for d in range(10)}


def diagnose(world_name: str, records: list[dict], method: str, against: str, noisy: list[str]) -> None:
    config = DemoConfig(worlds=[world_name])
    world = build_world(config, world_name)
    runs = {m: sorted((r for r in records if r["method"] == m), key=lambda r: r["seed"]) for m in (method, against)}
    print(
        f"\n### {world_name} world, clean data: {method} against {against}, seeds {[r['seed'] for r in runs[method]]}"
    )
    correct = {m: [r["test_correct"] for r in rs] for m, rs in runs.items()}
    families = world.test[FAMILY]
    by_family = defaultdict(list)
    for i, family in enumerate(families):
        by_family[family].append(i)
    accuracy_table("Test exact match (%) per task family", dict(sorted(by_family.items())), correct, method, against)
    accuracy_table("Per answer length (characters)", length_groups(world.test["answer"]), correct, method, against)
    reference_test = {}
    for path in world.references:
        reference_test[Path(path).name], _ = response_statistics(path, world.test[MESSAGES])
    r_ref_test = [statistics.mean(v) for v in zip(*reference_test.values(), strict=True)]
    accuracy_table(
        "Per decile of r_ref of the correct answer (the references' mean log-prob of it)",
        decile_groups(r_ref_test),
        correct,
        method,
        against,
    )

    print("\nReferences' and base's exact match on the test prompts per family (%)\n")
    models = {Path(p).name: p for p in [*world.references, world.base]}
    per_model_correct = {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        per_model_correct[name] = answers_correct(model, AutoTokenizer.from_pretrained(path), world.test)
    print(f"| family | {' | '.join(models)} |")
    print(f"| --- |{' --- |' * len(models)}")
    for family, rows in sorted(by_family.items()):
        cells = " | ".join(f"{100 * statistics.mean(per_model_correct[n][i] for i in rows):.0f}" for n in models)
        print(f"| {family} | {cells} |")

    print(f"\nPoFT's weight per family over training, relative to all rows' mean weight at that epoch ({method})\n")
    for m in (method, against):
        curves = [r["curve"] for r in runs[m]]
        if "weight_by_family" not in curves[0][0]:
            print(f"({m}: no per-family weights recorded)")
            continue
        epochs = len(curves[0])
        print(f"{m}:\n")
        print(f"| family | {' | '.join(str(e) for e in range(epochs))} |")
        print(f"| --- |{' --- |' * epochs}")
        for family in sorted(curves[0][0]["weight_by_family"]):
            cells = []
            for e in range(epochs):
                relative = [c[e]["weight_by_family"][family] / c[e]["weight_clean"] for c in curves]
                cells.append(f"{statistics.mean(relative):.2f}")
            print(f"| {family} | {' | '.join(cells)} |")
        absolute = [statistics.mean(c[e]["weight_clean"] for c in curves) for e in range(epochs)]
        print(f"| all rows (absolute) | {' | '.join(f'{w:.2f}' for w in absolute)} |\n")

    print("\nGradient norm before clipping (median over steps, mean over seeds) and share of clipped steps\n")
    print("| method | test exact match | grad norm median | clipped steps |")
    print("| --- | --- | --- | --- |")
    for m, rs in runs.items():
        print(
            f"| {m} | {100 * statistics.mean(r['test_accuracy'] for r in rs):.1f} | "
            f"{statistics.mean(r['grad_norm_median'] for r in rs):.2f} | "
            f"{100 * statistics.mean(r['clipped_share'] for r in rs):.0f}% |"
        )

    train = world.train
    stats = {name: response_statistics(path, train[MESSAGES]) for name, path in models.items()}
    base_name = Path(world.base).name
    ref_names = [Path(p).name for p in world.references]
    r_ref = [statistics.mean(v) for v in zip(*(stats[n][0] for n in ref_names), strict=True)]
    r_base = stats[base_name][0]
    train_families = train[FAMILY]
    print("\nThe target's clean training rows, per family: mean per-token log-prob r and entropy H of each model\n")
    print(f"| family | rows | {' | '.join(f'r {n} | H {n}' for n in models)} |")
    print(f"| --- | --- |{' --- | --- |' * len(models)}")
    for family in sorted(set(train_families)):
        rows = [i for i, f in enumerate(train_families) if f == family]
        cells = " | ".join(
            f"{statistics.mean(stats[n][0][i] for i in rows):.2f} | {statistics.mean(stats[n][1][i] for i in rows):.2f}"
            for n in models
        )
        print(f"| {family} | {len(rows)} | {cells} |")

    a, b = (stats[n][0] for n in ref_names)
    print("\nDo the references agree on the rows they score low?\n")
    print(f"- Spearman correlation of {ref_names[0]} and {ref_names[1]} over all rows: {spearman(a, b):.2f}")
    within = [
        spearman([a[i] for i in rows], [b[i] for i in rows])
        for family in sorted(set(train_families))
        if (rows := [i for i, f in enumerate(train_families) if f == family])
    ]
    print(f"- within families (mean over families): {statistics.mean(within):.2f}")
    for share in (0.1, 0.2):
        low_a, low_b = bottom(a, share), bottom(b, share)
        print(
            f"- of {ref_names[0]}'s lowest {share:.0%} rows, {len(low_a & low_b) / len(low_a):.0%} are among "
            f"{ref_names[1]}'s lowest {share:.0%} (chance: {share:.0%})"
        )
    print("\nWhat the base already knows:\n")
    print(f"- Spearman correlation of r_ref and r_base over all rows: {spearman(r_ref, r_base):.2f}")
    for share in (0.1, 0.2):
        low_ref, low_base = bottom(r_ref, share), bottom(r_base, share)
        print(
            f"- of r_ref's lowest {share:.0%} rows, {len(low_ref & low_base) / len(low_ref):.0%} are r_base's lowest"
        )

    for condition in noisy:
        kind, rate = condition.split(":")
        noised = add_noise(train, float(rate), kind=kind, seed=0)
        flags = noised[NOISE]
        noisy_stats = {name: response_statistics(path, noised[MESSAGES]) for name, path in models.items()}
        nr_ref = [statistics.mean(v) for v in zip(*(noisy_stats[n][0] for n in ref_names), strict=True)]
        nh_ref = [statistics.mean(v) for v in zip(*(noisy_stats[n][1] for n in ref_names), strict=True)]
        nr_base = noisy_stats[base_name][0]
        signals = {
            "r_ref": nr_ref,
            "r_base": nr_base,
            "r_ref - r_base": [r - q for r, q in zip(nr_ref, nr_base, strict=True)],
            "r_ref + H_ref": [r + h for r, h in zip(nr_ref, nh_ref, strict=True)],
            **{f"r {n}": noisy_stats[n][0] for n in ref_names},
        }
        print(f"\nAUC, clean rows over noisy rows, {condition} (seed 0):\n")
        for name, values in signals.items():
            clean = [v for v, f in zip(values, flags, strict=True) if not f]
            bad = [v for v, f in zip(values, flags, strict=True) if f]
            print(f"- {name}: {auc(clean, bad):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json of demo runs on clean data")
    parser.add_argument("--method", default="poft_token")
    parser.add_argument("--against", default="sft")
    parser.add_argument("--worlds", nargs="+", default=["second", "misaligned"])
    parser.add_argument("--noisy", nargs="*", default=[], help="KIND:RATE conditions whose separation to measure")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    progress_bars_on_terminal_only()
    records = [r for path in args.results for r in json.loads(Path(path).read_text())["runs"]]
    for world in args.worlds:
        chosen = [r for r in records if r["world"] == world and r["noise_rate"] == 0 and r["learning_rate"] == 1e-3]
        diagnose(world, chosen, args.method, args.against, args.noisy)


if __name__ == "__main__":
    main()
