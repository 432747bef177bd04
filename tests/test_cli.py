"""The command line: help, repeated flags, YAML recipes, readable errors with exit code 2."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import load_from_disk

from poft.cli import COMMANDS, main, merge_repeated
from tests.conftest import write_jsonl

RECIPES = Path(__file__).parent.parent / "recipes"


def test_import_and_help_load_no_torch():
    """The package face is lazy: `import poft` and `poft --help` load none of torch, transformers or TRL,
    while every public name still resolves on first use."""
    code = (
        "import sys, poft\n"
        "from poft.cli import main\n"
        "assert main(['--help']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert poft.DependencyError.__module__ == 'poft.errors'\n"
        "assert all(getattr(poft, name) is not None for name in ('model_scores', 'PoFTTrainer'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "commands:" in done.stdout


def test_data_loading_and_shared_options_load_no_torch(tmp_path):
    """Reading SFT data and declaring the shared option groups load none of torch, transformers or TRL: the
    groups' help strings live apart from the code that reads and loads models."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    code = (
        "import sys\n"
        "from poft.data import load_sft_dataset\n"
        "from poft.options import ModelOptions, ReadingOptions\n"
        "assert ReadingOptions(max_length=8).system_turns == 'auto'\n"
        f"assert len(load_sft_dataset({str(data)!r})) == 1\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_public_names_resolve_to_their_modules():
    import poft

    assert set(poft.__all__) <= set(dir(poft))
    assert poft.score_dataset.__module__ == "poft.scoring"
    with pytest.raises(AttributeError):
        poft.no_such_name  # noqa: B018


def test_help_lists_commands_and_options(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("score", "train", "quickstart"))
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--data",
        "--model",
        "--output",
        "--max_length",
        "--batch_tokens",
        "--device",
        "--dtype",
        "--skip_invalid",
        "--chat_template",
    ):
        assert option in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--model_name_or_path",
        "--dataset_name",
        "--output_dir",
        "--objective",
        "--loss_type",
        "--beta",
        "--gamma",
        "--max_steps",
        "--max_length",
        "--use_peft",
        "--packing",
    ):
        assert option in out
    assert main(["nope"]) == 2


def test_what_a_command_prints_is_a_function_of_its_result():
    """Library code returns, the command line prints: each `show` names a function of the runner's result."""
    shown = {name: command.show for name, command in COMMANDS.items() if command.show is not None}
    assert set(shown) == {"demo", "filter", "eval", "report", "quickstart"}
    assert all(callable(COMMANDS[name].load(show)) for name, show in shown.items())


def test_merge_repeated_model_flags():
    assert merge_repeated(
        ["--data", "d", "--model", "a", "--out", "o", "--model=b", "--model", "c", "d"], ["--model"]
    ) == [
        "--data",
        "d",
        "--out",
        "o",
        "--model",
        "a",
        "b",
        "c",
        "d",
    ]


def test_score_then_train_from_the_command_line(tiny_models, conversations, tmp_path, caplog, capsys):
    data = write_jsonl(tmp_path / "chats.jsonl", conversations)
    scored = tmp_path / "scored"
    code = main(
        [
            "score",
            "--data",
            data,
            "--model",
            tiny_models["chatml"],
            "--model",
            f"bpe={tiny_models['zephyr']}",
            "--output",
            str(scored),
            "--max-length",
            "256",
            "--batch-tokens",
            "512",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert code == 0
    dataset = load_from_disk(str(scored))
    assert {"messages", "poft_id", "score_chatml", "n_tokens_chatml", "score_bpe", "n_tokens_bpe", "ref_score"} <= set(
        dataset.column_names
    )
    meta = json.loads((scored / "poft_score.json").read_text())
    assert [r["name"] for r in meta["references"]] == ["chatml", "bpe"] and meta["config"]["max_length"] == 256

    recipe = yaml.safe_load((RECIPES / "train-tiny-cpu.yaml").read_text())
    recipe.update(
        model_name_or_path=tiny_models["chatml"],
        dataset_name=str(scored),
        output_dir=str(tmp_path / "trained"),
        max_steps=3,
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", str(tmp_path / "recipe.yaml"), "--beta", "2.0", "--logging-steps", "1"]) == 0
    assert (tmp_path / "trained" / "model.safetensors").exists()
    assert (tmp_path / "trained" / "trainer_state.json").exists()
    shorter = ["train", "--config", str(tmp_path / "recipe.yaml"), "--max_length", "120", "--max_steps", "1"]
    assert main(shorter) == 2
    assert "max_length: scored with 256, training with 120" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        assert main([*shorter, "--allow_truncation_mismatch"]) == 0
    assert "max_length: scored with 256, training with 120" in caplog.text


def test_bad_data_is_one_readable_error(tiny_models, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [{"role": "bot", "content": "x"}]}\n'
    )
    args = [
        "score",
        "--data",
        str(bad),
        "--model",
        tiny_models["chatml"],
        "--device",
        "cpu",
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    assert main([*args, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: line 2" in err and "unknown role 'bot'" in err and "Traceback" not in err
    assert main([*args, "--output", str(tmp_path / "o2"), "--skip-invalid"]) == 0
    report = [json.loads(line) for line in (tmp_path / "o2" / "invalid_rows.jsonl").read_text().splitlines()]
    assert report[0]["line"] == 2 and len(load_from_disk(str(tmp_path / "o2"))) == 1
    assert report[0]["record"] == {"messages": [{"role": "bot", "content": "x"}]}  # the bad row itself


def test_train_without_scores_explains_the_fix(tiny_models, conversations, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chats.jsonl", conversations)
    code = main(
        [
            "train",
            "--model_name_or_path",
            tiny_models["chatml"],
            "--dataset_name",
            data,
            "--output_dir",
            str(tmp_path / "o"),
            "--activation_checkpointing",
            "false",
        ]
    )
    assert code == 2 and "poft score" in capsys.readouterr().err


def _fields(*classes) -> set[str]:
    return {f.name for c in classes for f in dataclasses.fields(c)}


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_keys_are_real_options(recipe):
    values = yaml.safe_load((RECIPES / recipe).read_text())
    command = COMMANDS[recipe.split("-")[0]]
    known = _fields(*(command.load(c) for c in command.configs))
    assert set(values) <= known, set(values) - known
    if "chat_template" in values:  # a template file, relative to the repository root where recipes are run
        assert (RECIPES.parent / values["chat_template"]).is_file()


def test_merge_repeated_keeps_flags_apart():
    assert merge_repeated(["--runs", "a", "--eval", "x", "--runs", "b"], ["--runs", "--eval"]) == [
        "--runs",
        "a",
        "b",
        "--eval",
        "x",
    ]


def test_paper_script_uses_real_recipes_and_options():
    """recipes/paper.sh: every `poft <command>` line names an existing recipe and only options that command has."""
    script = (RECIPES / "paper.sh").read_text().replace("\\\n", " ")
    calls = [
        line.split("poft.cli ", 1)[-1] if "poft.cli " in line else line.split("poft ", 1)[-1]
        for line in script.splitlines()
        if not line.lstrip().startswith("#")
        and ("$ZERO3 " in line or "poft.cli " in line or line.strip().startswith("poft "))
    ]
    commands = set()
    for call in calls:
        words = call.replace("$ZERO3 ", "").split()
        command = COMMANDS[words[0]]
        commands.add(words[0])
        known = _fields(*(command.load(c) for c in command.configs)) | {"config"}
        flags = {w[2:].replace("-", "_") for w in words if w.startswith("--")}
        assert flags <= known, (words[0], flags - known)
        for i, word in enumerate(words[:-1]):
            if word == "--config":
                assert (RECIPES.parent / words[i + 1]).is_file(), words[i + 1]
    assert commands == {"score", "train", "dpo", "eval", "report"}
