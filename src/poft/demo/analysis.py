"""From run records to what the demo reports: each method's accuracy and every PoFT - other difference,
with intervals (`poft.demo.intervals`).

Two learning-rate arms are summarised: "same lr" (every method at --learning_rate) and, after a sweep,
"best lr" (each method at the rate that did best on the validation split; the filter and oracle baselines
train like SFT and take its rate).

Each objective of `poft.objective_registry` is a method of the same name, and a PoFT objective (one that reads the
references) at another Bradley-Terry scale is the method `<objective>@beta=<value>` (e.g. `poft_token@beta=0.5`,
what `poft train --beta 0.5` trains); the PoFT methods are compared with every other one.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

from poft.demo.intervals import paired_bootstrap_interval, paired_t_interval, seeds_for_half_width, verdict, within
from poft.objective_registry import DEFAULT, NAMES, OBJECTIVES, SFT

# each PoFT objective is compared with every other method; two PoFT objectives are compared once, the earlier in
# this order minus the later: the default first, then the later objectives of the registry before the earlier ones
PREFERENCE_METHODS = tuple(
    sorted(
        (o.name for o in OBJECTIVES if o.needs_references),
        key=lambda name: (name != DEFAULT.name, -NAMES.index(name)),
    )
)
BETA_MARK = "@beta="  # a PoFT objective at another beta: poft_token@beta=0.5
LOSS_TYPES = {"dft": "dft"}  # methods that train with SFT's objective under another of TRL's loss_type
# methods with a training loss of their own, in the demo's order (the filters and the oracle train like SFT)
SWEPT = (
    SFT.name,
    *(o.name for o in OBJECTIVES if o.needs_references),
    *LOSS_TYPES,
    *(o.name for o in OBJECTIVES if not o.needs_references and o is not SFT),
)
DPO_SUFFIX = "+dpo"  # an arm that runs DPO after its base method, at the base method's learning rate
# comparisons besides the preference methods': the DPO arms against each other (the same DPO stage) and each against
# its own first stage, as <method>+dpo - <method> (the preference methods are not compared with their own +dpo arm)
PAIRED = {"poft_token+dpo": ("sft+dpo", "poft_token"), "sft+dpo": ("sft",)}


def base_method(method: str) -> str:
    """The method a `+dpo` arm trains with before DPO (the method itself otherwise)."""
    return method.removesuffix(DPO_SUFFIX)


def split_beta(method: str) -> tuple[str, float | None]:
    """A method's name without its `@beta=` part, and that beta (None where it has none)."""
    name, mark, beta = method.partition(BETA_MARK)
    return name, float(beta) if mark else None


def check_method(method: str, known: Sequence[str]) -> str | None:
    """Why `method` is not a method of the demo (None where it is)."""
    name, mark, beta = method.partition(BETA_MARK)
    if not mark:
        return None if method in known else f"{method}: choose from {', '.join(known)}"
    if beta.endswith(DPO_SUFFIX):
        return f"{method}: the DPO arms ({', '.join(m for m in known if m.endswith(DPO_SUFFIX))}) take no {BETA_MARK}"
    if name not in PREFERENCE_METHODS:
        return f"{method}: {BETA_MARK} applies to the PoFT objectives ({', '.join(PREFERENCE_METHODS)})"
    try:
        return None if float(beta) > 0 else f"{method}: beta must be positive"
    except ValueError:
        return f"{method}: give the beta as a number, e.g. {name}{BETA_MARK}0.5"


def _comparison_order(method: str) -> tuple[int, bool, float]:
    """A PoFT method's place among those compared: its objective's, then its beta after the objective's own."""
    name, beta = split_beta(method)
    return PREFERENCE_METHODS.index(name), beta is not None, beta or 0.0


def is_preference(method: str) -> bool:
    """Whether `method` trains with a PoFT objective (compared with every other method)."""
    return split_beta(method)[0] in PREFERENCE_METHODS


def training_options(method: str) -> dict:
    """The `PoFTConfig` options `method` trains with: an objective's own (at its beta); SFT's for every other method
    (filters, oracle, Token Cleaning, a `+dpo` arm's first stage by its base method)."""
    name, beta = split_beta(base_method(method))
    if name in NAMES:
        return {"objective": name, "loss_type": "nll", **({"beta": beta} if beta is not None else {})}
    return {"objective": SFT.name, "loss_type": LOSS_TYPES.get(name, "nll")}


def final_validation_accuracy(record: dict) -> float:
    return record["curve"][-1]["validation_accuracy"]


def best_learning_rates(sweep: Sequence[dict]) -> dict[str, float]:
    """Per method, the learning rate with the highest mean last-epoch validation accuracy over the sweep seeds."""
    scores: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in sweep:
        scores[record["method"]][record["learning_rate"]].append(final_validation_accuracy(record))
    return {
        method: max(sorted(by_lr), key=lambda lr, by_lr=by_lr: statistics.mean(by_lr[lr]))
        for method, by_lr in scores.items()
    }


def has_own_loss(method: str) -> bool:
    """Whether `method` trains with a loss of its own (swept for its own learning rate), not SFT's."""
    return method in SWEPT or is_preference(method)


def arm_lr(method: str, best_lr: dict[str, float], default: float) -> float:
    method = base_method(method)
    return best_lr.get(method if has_own_loss(method) else SFT.name, default)


def _interval_over_seeds(values: list[float]) -> dict | None:
    interval = paired_t_interval(values, [0.0] * len(values))
    return interval.as_dict() if interval else None


def summarise_setting(by_method: dict[str, dict[int, dict]]) -> dict:
    """Accuracy per method and the paired PoFT - method comparisons of one (world, noise, rate, arm)."""
    methods = {}
    for method, seeds in by_method.items():
        accuracies = [seeds[s]["test_accuracy"] for s in sorted(seeds)]
        correct = [seeds[s]["test_correct"] for s in sorted(seeds)]
        finals = [seeds[s]["curve"][-1] for s in sorted(seeds)]
        clipped = [seeds[s]["clipped_share"] for s in sorted(seeds) if seeds[s].get("clipped_share") is not None]
        methods[method] = {
            "learning_rate": next(iter(seeds.values()))["learning_rate"],
            "seeds": sorted(seeds),
            "accuracy": statistics.mean(accuracies),
            "accuracy_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "interval_seeds": _interval_over_seeds(accuracies),
            "interval_prompts": paired_bootstrap_interval(correct, [[0] * len(c) for c in correct]).as_dict(),
            "weight_clean": _mean([f["weight_clean"] for f in finals]),
            "weight_noisy": _mean([f["weight_noisy"] for f in finals]),
            "clipped_share": _mean(clipped),
        }
    differences = {}
    for first in sorted((m for m in by_method if is_preference(m)), key=_comparison_order):
        differences[first] = {
            other: _paired_difference(first, by_method[first], other, seeds)
            for other, seeds in by_method.items()
            if other != first
            and not (is_preference(other) and other in differences)
            and other != first + DPO_SUFFIX
            and set(by_method[first]) & set(seeds)
        }
    for first, others in PAIRED.items():
        for other in others:
            if first in by_method and other in by_method and set(by_method[first]) & set(by_method[other]):
                differences.setdefault(first, {})[other] = _paired_difference(
                    first, by_method[first], other, by_method[other]
                )
    return {"methods": methods, "differences": differences}


def _paired_difference(first: str, a_runs: dict[int, dict], other: str, b_runs: dict[int, dict]) -> dict:
    """`first` minus `other` over their common seeds: mean, intervals over seeds and prompts, verdict."""
    common = sorted(set(a_runs) & set(b_runs))
    a = [a_runs[s]["test_accuracy"] for s in common]
    b = [b_runs[s]["test_accuracy"] for s in common]
    over_seeds = paired_t_interval(a, b)
    over_prompts = paired_bootstrap_interval(
        [a_runs[s]["test_correct"] for s in common], [b_runs[s]["test_correct"] for s in common]
    )
    differences = [x - y for x, y in zip(a, b, strict=True)]
    return {
        "seeds": common,
        "difference": statistics.mean(differences),
        "interval_seeds": over_seeds.as_dict() if over_seeds else None,
        "interval_prompts": over_prompts.as_dict(),
        "verdict": verdict([over_seeds, over_prompts], f"{first} better", f"{first} worse"),
        "within_1_point": within(over_seeds, 0.01),
        "seeds_for_2_points": seeds_for_half_width(differences, 0.02),
    }


def summarise(records: Sequence[dict], learning_rate: float, best_lr: dict[str, float]) -> list[dict]:
    """One entry per (world, noise kind, rate, arm): methods with intervals and the PoFT objectives' paired
    differences with every other method."""
    arms = {"same lr": lambda method: learning_rate}
    if best_lr:
        arms["best lr"] = lambda method: arm_lr(method, best_lr, learning_rate)
    grouped: dict[tuple, dict] = defaultdict(lambda: defaultdict(dict))
    for arm, lr_of in arms.items():
        for record in records:
            if record["learning_rate"] == lr_of(record["method"]):
                key = (record["world"], record["noise_kind"], record["noise_rate"], arm)
                grouped[key][record["method"]][record["seed"]] = record
    return [
        {"world": world, "noise_kind": kind, "noise_rate": rate, "arm": arm, **summarise_setting(by_method)}
        for (world, kind, rate, arm), by_method in grouped.items()
    ]


def _mean(values: list[float | None]) -> float | None:
    given = [v for v in values if v is not None]
    return statistics.mean(given) if given else None
