"""The demo's task checker, AUC, and a toy-size end-to-end run whose report files are well formed."""

from __future__ import annotations

import json
import logging
import re

import datasets
import huggingface_hub.utils
import pytest
import transformers

from poft.demo.analysis import best_learning_rates, summarise, training_options
from poft.demo.pipeline import DemoConfig, run_demo
from poft.demo.tasks import FAMILIES, alphabet, make_words, sample_examples
from poft.evaluation import exact_match
from poft.runtime import progress_bars_on_terminal_only
from poft.trainer import DEFAULT_OBJECTIVE, PoFTTrainer


def test_task_answers_are_correct():
    words = make_words(30, seed=0)
    for example in sample_examples(140, seed=1, words=words):
        prompt, answer = example.prompt, example.answer
        numbers = [int(t.strip("?.")) for t in prompt.split() if t.strip("?.").isdigit()]
        if example.family == "add":
            assert int(answer) == sum(numbers)
        elif example.family == "subtract":
            assert int(answer) == (numbers[1] - numbers[0] if "Subtract" in prompt else numbers[0] - numbers[1])
        elif example.family == "sort":
            assert answer.split() == sorted(str(n) for n in numbers)
        elif example.family == "upper":
            assert answer == answer.upper() and answer.lower() in prompt
        elif example.family == "reverse":
            assert answer[::-1] in prompt
        elif example.family == "count":
            assert any(len(w.strip("?.")) == int(answer) and w.strip("?.") in words for w in prompt.split())
        elif example.family == "repeat":
            assert len(answer.split()) == numbers[0] and len(set(answer.split())) == 1
        assert set(prompt + answer) <= set(alphabet())
    assert {e.family for e in sample_examples(14, seed=2, words=words)} == set(FAMILIES)


def test_held_out_prompts_never_in_training():
    words = make_words(30, seed=0)
    test = sample_examples(70, seed=1, words=words, unique=True)
    assert len({e.prompt for e in test}) == 70
    train = sample_examples(500, seed=2, words=words, exclude=frozenset(e.prompt for e in test))
    assert not {e.prompt for e in train} & {e.prompt for e in test}


def test_check_is_exact_match_up_to_whitespace():
    assert exact_match(" 42 \n", "42") and not exact_match("42.", "42") and not exact_match("4 2", "42")


def toy_config(tmp_path, **overrides) -> DemoConfig:
    settings = {
        "output": str(tmp_path / "demo"),
        "cache_dir": str(tmp_path / "cache"),
        "epochs": 1,
        "target_rows": 70,
        "reference_rows": 140,
        "validation_rows": 14,
        "test_rows": 14,
        "hidden_size": 32,
        "num_layers": 1,
        "reference_epochs": 1,
        "device": "cpu",
    }
    return DemoConfig(**{**settings, **overrides})


def test_toy_demo_writes_a_well_formed_report_and_resumes(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="poft.demo.pipeline"):
        results = run_demo(toy_config(tmp_path, seeds=[0, 1], methods=["sft", "poft", "poft_token", "sft_norm"]))
    assert "[8/8] standard-paper-0.6-seed" in caplog.text  # the progress lines `poft demo` shows
    out = tmp_path / "demo"
    for name in ("report.md", "accuracy.png", "score_distribution.png", "weights.png", "differences.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"] == results["runs"]
    assert {(r["method"], r["seed"]) for r in saved["runs"]} == {
        (m, s) for m in ("sft", "poft", "poft_token", "sft_norm") for s in (0, 1)
    }
    for run in saved["runs"]:
        assert run["noise_rate"] == 0.6 and len(run["test_correct"]) == 14
        assert run["test_accuracy"] == sum(run["test_correct"]) / 14
        assert [p["epoch"] for p in run["curve"]] == [0, 1]
        assert 0 <= run["clipped_share"] <= 1
        assert 0 <= run["curve"][-1]["weight_clean"] <= 1 and 0 <= run["curve"][-1]["weight_noisy"] <= 1
        by_family = run["curve"][-1]["weight_by_family"]  # every family of the 70-row sample, each a mean weight
        assert set(by_family) == set(FAMILIES) and all(0 <= w <= 1 for w in by_family.values())
    (entry,) = saved["summary"]
    sft = entry["differences"]["poft"]["sft"]
    # each PoFT objective against every other method, and poft_token - poft once
    assert set(entry["differences"]["poft_token"]) == {"sft", "poft", "sft_norm"}
    assert set(entry["differences"]["poft"]) == {"sft", "sft_norm"}
    by_seed = {(r["method"], r["seed"]): r["test_accuracy"] for r in saved["runs"]}
    assert sft["difference"] == pytest.approx(sum(by_seed[("poft", s)] - by_seed[("sft", s)] for s in (0, 1)) / 2)
    assert sft["interval_seeds"] is not None and sft["verdict"] in (
        "poft better",
        "poft worse",
        "no measurable difference",
    )
    report = (out / "report.md").read_text()
    assert "| standard | paper | 0.6 | same lr | sft_norm |" in report

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="poft.demo.pipeline"):
        again = run_demo(toy_config(tmp_path, seeds=[0, 1], methods=["sft", "poft", "poft_token", "sft_norm"]))
    assert "8 of 8 runs already finished" in caplog.text and "[1/" not in caplog.text  # nothing retrained
    assert again["runs"] == results["runs"] and again["separation"] == results["separation"]


def test_sweep_picks_on_validation_and_runs_are_deterministic_across_processes(tmp_path, capfd):
    config = toy_config(tmp_path, noise_rate=[0.0], lr_sweep=[1e-3, 3e-3], sweep_seeds=[0])
    results = run_demo(config)
    assert set(results["best_learning_rates"]) == {"sft", DEFAULT_OBJECTIVE}  # the default methods
    for method, lr in results["best_learning_rates"].items():
        sweep = {
            r["learning_rate"]: r["curve"][-1]["validation_accuracy"]
            for r in results["sweep"]
            if r["method"] == method
        }
        assert sweep[lr] == max(sweep.values())
    # the same runs again in two worker processes give the same answers to every prompt; run as the command line
    # runs them with stderr a log file, neither this process nor a worker draws a progress bar into it
    capfd.readouterr()
    progress_bars_on_terminal_only()
    try:
        again = run_demo(toy_config(tmp_path, output=str(tmp_path / "again"), noise_rate=[0.0], seeds=[0], workers=2))
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
    assert "%|" not in capfd.readouterr().err
    first = {(r["method"], r["learning_rate"]): r["test_correct"] for r in results["runs"]}
    for run in again["runs"]:
        assert run["test_correct"] == first[(run["method"], run["learning_rate"])]


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="--methods dpo: choose from"):
        DemoConfig(methods=["dpo"])
    with pytest.raises(ValueError, match="sft@beta=0.5: @beta= applies to the PoFT objectives"):
        DemoConfig(methods=["sft@beta=0.5"])
    with pytest.raises(ValueError, match="give the beta as a number, e.g. poft_token@beta=0.5"):
        DemoConfig(methods=["poft_token@beta=half"])
    with pytest.raises(ValueError, match="beta must be positive"):
        DemoConfig(methods=["poft_token@beta=0"])
    with pytest.raises(ValueError, match="--noise_rate"):
        DemoConfig(noise_rate=[1.0])
    with pytest.raises(ValueError, match="--dpo_pairs must be at least 1"):
        DemoConfig(dpo_pairs=0)


def record(method, seed, lr, correct, validation=0.5):
    return {
        "world": "standard",
        "noise_kind": "none",
        "noise_rate": 0.0,
        "seed": seed,
        "method": method,
        "learning_rate": lr,
        "test_correct": correct,
        "test_accuracy": sum(correct) / len(correct),
        "curve": [{"epoch": 1, "validation_accuracy": validation, "weight_clean": 0.5, "weight_noisy": None}],
        "clipped_share": 1.0,
    }


def test_best_learning_rate_is_chosen_on_validation_and_arms_pair_by_seed():
    sweep = [record("sft", s, lr, [1], validation=v) for s in (0, 1) for lr, v in ((1e-3, 0.4), (2e-3, 0.5))]
    sweep += [record("poft", 0, 1e-3, [0], validation=0.6), record("poft", 0, 2e-3, [1], validation=0.2)]
    assert best_learning_rates(sweep) == {"sft": 2e-3, "poft": 1e-3}
    runs = [
        record("sft", 0, 1e-3, [1, 0, 0, 0]),
        record("sft", 1, 1e-3, [1, 1, 0, 0]),
        record("sft", 0, 2e-3, [1, 1, 1, 0]),
        record("sft", 1, 2e-3, [1, 1, 1, 1]),
        record("poft", 0, 1e-3, [1, 1, 0, 0]),
        record("poft", 1, 1e-3, [1, 1, 1, 0]),
    ]
    by_arm = {e["arm"]: e for e in summarise(runs, 1e-3, {"sft": 2e-3, "poft": 1e-3})}
    same, best = (by_arm[arm]["differences"]["poft"]["sft"] for arm in ("same lr", "best lr"))
    assert same["difference"] == pytest.approx(0.25) and best["difference"] == pytest.approx(-0.25)
    assert by_arm["best lr"]["methods"]["sft"]["learning_rate"] == 2e-3
    # both seeds gain exactly 0.25: a zero-width interval over seeds, which excludes zero
    assert same["interval_seeds"] == {"estimate": 0.25, "low": 0.25, "high": 0.25}


def test_a_run_finished_by_other_code_is_trained_again(tmp_path, monkeypatch, caplog):
    """A run's key holds the code that trained it: with another code version the store's finished run is not
    reported, the run is trained again, and the log says why."""
    import poft.demo.runs

    config = toy_config(tmp_path, epochs=1, methods=["sft"])
    first = run_demo(config)
    assert first["runs"][0]["code"] == poft.demo.runs.code_version()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="poft.demo"):
        assert run_demo(config)["runs"] == first["runs"]  # the same code: reused
        assert "1 of 1 runs already finished" in caplog.text
        monkeypatch.setattr(poft.demo.runs, "code_version", lambda: "0.0.0+other")
        caplog.clear()
        again = run_demo(config)
    assert (
        "holds runs of other code or settings" in caplog.text and "[1/1] standard-paper-0.6-seed0-sft" in caplog.text
    )
    assert again["runs"][0]["code"] == "0.0.0+other"


def test_the_demo_says_what_it_trains_on_and_prints_no_trainer_dicts(tmp_path, capsys, caplog):
    """No raw trainer dicts on the console; one line per epoch of each reference and the base in a log; the
    misaligned references' noisy rows and a clean condition said as they are."""
    with caplog.at_level(logging.INFO, logger="poft"):
        run_demo(toy_config(tmp_path, epochs=1, methods=["sft"], worlds=["misaligned"], conditions=["clean"]))
    assert "{'loss'" not in capsys.readouterr().out
    assert "Reference ref-char: epoch 1 of 1" in caplog.text and "Target base: epoch 1 of 1" in caplog.text
    assert re.search(r"Training reference ref-char on 140 rows, \d+ with noise", caplog.text)
    assert "Corrupted 0 of" not in caplog.text


def test_the_demo_holds_back_notices_of_backends_it_never_uses():
    """bitsandbytes and DeepSpeed log notices about CPU kernels and accelerator detection when imported where they
    are installed (the test set-up installs both); the demo's processes hold them back, and only the demo's."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    pytest.importorskip("deepspeed")
    notices = ("gemm_4bit_forward", "Setting accelerator to CPU")
    use_both = "import bitsandbytes\nfrom deepspeed.accelerator import get_accelerator\nget_accelerator()\n"
    runs = {  # both at once: each spends its seconds importing
        shown: subprocess.Popen(
            [sys.executable, "-c", first + use_both], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for first, shown in (("", True), ("import poft.demo\n", False))
    }
    try:
        for shown, run in runs.items():
            output = run.communicate(timeout=300)[0]
            assert run.returncode == 0, output[-2000:]
            assert all((notice in output) == shown for notice in notices), output[-2000:]
    finally:
        for run in runs.values():
            run.kill()


def test_a_poft_objective_at_another_beta_trains_with_it_and_is_compared_like_one(tmp_path, monkeypatch):
    assert training_options("poft_token@beta=0.5") == {"objective": "poft_token", "loss_type": "nll", "beta": 0.5}
    assert training_options("poft@beta=2+dpo") == {"objective": "poft", "loss_type": "nll", "beta": 2.0}
    assert training_options("poft_token") == {"objective": "poft_token", "loss_type": "nll"}
    assert training_options("oracle") == {"objective": "sft", "loss_type": "nll"}
    seen = []
    init = PoFTTrainer.__init__

    def recording_init(self, model, args=None, *pargs, **kwargs):
        seen.append((args.objective, args.beta))
        init(self, model, args, *pargs, **kwargs)

    monkeypatch.setattr(PoFTTrainer, "__init__", recording_init)
    results = run_demo(toy_config(tmp_path, epochs=1, methods=["sft", "poft_token", "poft_token@beta=0.5"]))
    assert ("poft_token", 0.5) in seen and ("poft_token", 1.0) in seen
    (entry,) = results["summary"]
    assert set(entry["differences"]["poft_token@beta=0.5"]) == {"sft"}
    assert set(entry["differences"]["poft_token"]) == {"sft", "poft_token@beta=0.5"}


def test_weights_plot_draws_every_poft_objective_and_sft(tmp_path, monkeypatch):
    """The weights plot draws the clean and noisy rows' weight of SFT and of each PoFT objective, the default
    poft_token included, and of no other method."""
    from matplotlib.axes import Axes

    from poft.demo.report import plot_weights

    drawn = []
    plot = Axes.plot

    def recording_plot(self, *args, **kwargs):
        drawn.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    runs = []
    for method in ("sft", "poft_token", "poft", "oracle"):
        for seed in (0, 1):
            runs.append(record(method, seed, 1e-3, [1, 0]))
            runs[-1]["curve"] = [
                {"epoch": e, "validation_accuracy": 0.5, "weight_clean": 0.4, "weight_noisy": 0.6} for e in (0, 1)
            ]
    plot_weights(runs, 1e-3, tmp_path / "weights.png")
    assert sorted(drawn) == sorted(
        f"{method}, {rows} rows" for method in ("sft", "poft_token", "poft") for rows in ("clean", "noisy")
    )
