"""The demo's DPO arms and Token Cleaning arm: the preference pairs as specified, and a toy grid that trains every new
arm end to end and reports their comparisons."""

from __future__ import annotations

import json
import logging
import re

import pytest

from poft.demo.analysis import PAIRED, arm_lr
from poft.demo.methods import DPO_PAIRS, preference_pairs
from poft.demo.pipeline import METHODS, DemoConfig, build_world, run_demo
from poft.schema import COMPLETION_MASK, MESSAGES
from tests.test_demo import toy_config


def solve(prompt: str) -> str:
    """The task suite's answer, worked out from the prompt alone."""
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    word = re.findall(r"\b[a-z]{3,6}\b", prompt)
    if re.search(r"plus|Add|\+", prompt):
        return str(sum(numbers))
    if "Subtract" in prompt:
        return str(numbers[1] - numbers[0])
    if re.search(r"minus| - ", prompt):
        return str(numbers[0] - numbers[1])
    if re.search(r"Sort|ascending", prompt):
        return " ".join(sorted(str(n) for n in numbers))
    if re.search(r"Upper-case|capitals|uppercase", prompt):
        phrase = prompt.removeprefix("Upper-case: ").removeprefix("Write ").removeprefix("Make ")
        return phrase.removesuffix(" in capitals.").removesuffix(" uppercase.").upper()
    if re.search(r"Reverse|backwards|reverse", prompt):
        return [w for w in word if w not in ("the", "word", "write", "spell", "in")][-1][::-1]
    if re.search(r"How many|Count", prompt):
        return str(len(prompt.rstrip("?.").split()[-1]))
    if re.search(r"Repeat|Say", prompt):
        target = prompt.split()[1]
        return " ".join([target] * numbers[0])
    raise AssertionError(f"unknown task: {prompt}")


@pytest.fixture(scope="module")
def splits_only_world(tmp_path_factory):
    """The default world's splits, with its models marked built so that nothing trains (pairs need no model)."""
    cache = tmp_path_factory.mktemp("cache")
    config = DemoConfig(cache_dir=str(cache))
    done = cache / f"world-{config.world_key()}" / "done"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"reference_accuracy": {}}))
    return build_world(config)


def test_pairs_prefer_the_correct_answer_on_prompts_no_split_uses(splits_only_world):
    world = splits_only_world
    pairs = preference_pairs(world)
    assert len(pairs) == DPO_PAIRS
    prompts = [p[0]["content"] for p in pairs["prompt"]]
    assert all(p[0]["role"] == "user" and len(p) == 1 for p in pairs["prompt"])
    assert len(set(prompts)) == len(prompts)
    for split in (world.train, world.validation, world.test):
        assert not set(prompts) & {m[0]["content"] for m in split[MESSAGES]}
    for prompt, chosen, rejected in zip(prompts, pairs["chosen"], pairs["rejected"], strict=True):
        assert [t["role"] for t in chosen] == [t["role"] for t in rejected] == ["assistant"]
        assert chosen[0]["content"] == solve(prompt), prompt
        assert rejected[0]["content"] != chosen[0]["content"]
    assert pairs.to_list() == preference_pairs(world).to_list()  # seeded


def test_dpo_arms_take_their_base_methods_learning_rate():
    best = {"sft": 1e-3, "poft_token": 3e-3}
    assert arm_lr("poft_token+dpo", best, 5e-4) == 3e-3 and arm_lr("sft+dpo", best, 5e-4) == 1e-3
    assert arm_lr("token_cleaning", best, 5e-4) == 1e-3
    assert {"token_cleaning", "sft+dpo", "poft_token+dpo"} <= set(METHODS) and PAIRED == {
        "poft_token+dpo": ("sft+dpo", "poft_token"),
        "sft+dpo": ("sft",),
    }


def test_toy_grid_trains_the_new_arms_and_reports_their_comparisons(tmp_path):
    methods = ["sft", "poft_token", "token_cleaning", "sft+dpo", "poft_token+dpo"]
    results = run_demo(toy_config(tmp_path, methods=methods, dpo_pairs=64))
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == set(methods)
    assert 0 < runs["sft+dpo"]["dpo_pairs"] == runs["poft_token+dpo"]["dpo_pairs"] <= 64
    assert runs["sft+dpo"]["curve"][-1]["after_dpo"] and "dpo_pairs" not in runs["sft"]
    # each DPO stage starts from its base method's finished run: the same curve up to the point after DPO
    for method in ("sft", "poft_token"):
        assert runs[f"{method}+dpo"]["curve"][:-1] == runs[method]["curve"]
        moved = runs[f"{method}+dpo"]["log_probs"]
        assert set(moved) == {
            f"{k} {w}" for k in ("chosen", "rejected", "validation answers") for w in ("before", "after")
        }
        assert all(v < 0 for v in moved.values())
    (entry,) = results["summary"]
    assert {"token_cleaning", "sft+dpo"} <= set(entry["differences"]["poft_token"])
    assert "poft_token+dpo" not in entry["differences"]["poft_token"]  # reported as poft_token+dpo - poft_token
    assert set(entry["differences"]["poft_token+dpo"]) == {"sft+dpo", "poft_token"}
    assert set(entry["differences"]["sft+dpo"]) == {"sft"}
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| poft_token - token_cleaning |" in report and "| poft_token+dpo - sft+dpo |" in report
    # the same-tokenizer reference is cached inside the world's directory, beside the world's own models
    world = tmp_path / "cache" / f"world-{toy_config(tmp_path).world_key()}"
    assert (world / "token-cleaning-ref-v1" / "done").exists() and (world / "done").exists()


def test_dpo_settings_are_a_dpo_arms_identity_only_and_share_its_first_stage(tmp_path, caplog):
    """Another DPO setting trains only its DPO stage, from the first stage's saved model; the first stage and every
    other run keep their key. An NLL term on the chosen answers raises their log-prob against plain DPO."""
    config = toy_config(
        tmp_path, methods=["sft", "sft+dpo"], dpo_pairs=64, epochs=1, dpo_learning_rate=1e-3, dpo_nll_weight=0.0
    )
    first = run_demo(config)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="poft.demo.pipeline"):
        again = run_demo(
            toy_config(
                tmp_path,
                methods=["sft", "sft+dpo"],
                dpo_pairs=64,
                epochs=1,
                dpo_learning_rate=1e-3,
                dpo_nll_weight=1.0,
            )
        )
    assert "1 of 2 runs already finished" in caplog.text and "[1/1] standard-paper-0.6-seed0-sft+dpo" in caplog.text
    runs = {r["method"]: r for r in again["runs"]}
    plain = {r["method"]: r for r in first["runs"]}["sft+dpo"]
    assert runs["sft"] == {r["method"]: r for r in first["runs"]}["sft"]
    assert runs["sft+dpo"]["dpo"]["nll_weight"] == 1.0 and plain["dpo"]["nll_weight"] == 0.0
    assert runs["sft+dpo"]["log_probs"]["chosen before"] == plain["log_probs"]["chosen before"]
    assert runs["sft+dpo"]["log_probs"]["chosen after"] > plain["log_probs"]["chosen after"]


def test_token_cleaning_mask_keeps_the_papers_share(tmp_path):
    from poft.demo.pipeline import Grid
    from poft.demo.runs import RunSpec

    config = toy_config(tmp_path, methods=["token_cleaning"])
    grid = Grid(config, {"standard": build_world(config)}, tmp_path / "out")
    data, _ = grid.training_data(RunSpec("standard", "paper", 0.6, 0, "token_cleaning", 1e-3))
    plain, _ = grid.training_data(RunSpec("standard", "paper", 0.6, 0, "sft", 1e-3))
    assert data[MESSAGES] == plain[MESSAGES]
    kept = sum(sum(m) for m in data[COMPLETION_MASK])
    assert kept == int(0.6 * sum(len(m[1]["content"]) + 1 for m in data[MESSAGES]))  # char tokens plus <|im_end|>


def test_ifd_arm_keeps_the_top_fraction_below_one_by_the_bases_own_ifd(tmp_path):
    """IFD from the base's own log-probs (conditional over response-only), ranked here, against the arm's rows."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poft.batching import model_scores
    from poft.chat import ConversationEncoder
    from poft.demo.pipeline import Grid
    from poft.demo.runs import RunSpec
    from poft.filtering import response_only

    config = toy_config(tmp_path, methods=["ifd"], filter_fractions=[0.4])
    world = build_world(config)
    grid = Grid(config, {"standard": world}, tmp_path / "out")
    kept, _ = grid.training_data(RunSpec("standard", "paper", 0.6, 0, "ifd0.4", 1e-3))
    plain, _ = grid.training_data(RunSpec("standard", "paper", 0.6, 0, "sft", 1e-3))
    model = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(world.base), max_length=128)
    conditional = model_scores(model, encoder, plain[MESSAGES])
    unconditional = model_scores(model, encoder, [response_only(m) for m in plain[MESSAGES]])
    ifd = [c / u for c, u in zip(conditional, unconditional, strict=True)]
    ranked = sorted((i for i in range(len(ifd)) if ifd[i] < 1), key=lambda i: -ifd[i])
    expected = sorted(ranked[: math.ceil(0.4 * len(plain))])
    assert kept[MESSAGES] == [plain[MESSAGES][i] for i in expected]
    assert kept["ifd"] == pytest.approx([ifd[i] for i in expected], abs=1e-5)


def test_demo_help_lists_the_new_arms(capsys):
    from poft.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in ("token_cleaning", "ifd (SFT", "sft+dpo", "poft_token+dpo"))
