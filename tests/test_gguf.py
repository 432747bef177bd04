"""GGUF references: a tiny GGUF written by the `gguf` package scores as the model it was written from, is known
by its content in the cache, converts to a folder, and each misuse is one line."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import poft.scoring as scoring
from poft.cli import main
from poft.gguf_models import convert_gguf
from poft.score_cache import model_fingerprint
from poft.scoring import ScoreConfig, score_dataset
from tests.conftest import as_dataset, write_jsonl
from tests.gguf_writer import write_gguf

pytest.importorskip("gguf")


def error_line(capsys) -> str:
    errors = re.findall(r"poft \w+: error: .*", capsys.readouterr().err)
    return errors[-1] if errors else ""


@pytest.fixture(scope="module")
def gguf_model(tiny_models, tmp_path_factory):
    """The zephyr tiny model (BPE tokenizer, Zephyr template) as a float32 GGUF file alone in its folder."""
    folder = tmp_path_factory.mktemp("gguf")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["zephyr"])
    return write_gguf(model, AutoTokenizer.from_pretrained(tiny_models["zephyr"]), folder / "tiny.Q0.gguf")


def test_a_gguf_scores_as_the_model_it_was_written_from(tiny_models, gguf_model, conversations, tmp_path, caplog):
    dataset = as_dataset(conversations)
    expected = score_dataset(dataset, [tiny_models["zephyr"]], ScoreConfig(cache_dir=str(tmp_path / "a")))
    with caplog.at_level(logging.INFO, logger="poft"):
        scored = score_dataset(dataset, [str(gguf_model)], ScoreConfig(cache_dir=str(tmp_path / "b")))
    assert scored["score_tiny.Q0"] == pytest.approx(expected["score_zephyr"], abs=1e-5)
    assert scored["n_tokens_tiny.Q0"] == expected["n_tokens_zephyr"]
    assert (
        "is a GGUF file; transformers de-quantises its weights to torch.float32, so these are the scores of the "
        in (caplog.text)
    )


def test_a_gguf_is_known_by_its_content(tiny_models, gguf_model, conversations, tmp_path, monkeypatch):
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(gguf_model, copy)
    assert model_fingerprint(str(copy)) == model_fingerprint(str(gguf_model)) == model_fingerprint(str(copy.parent))
    retemplated = AutoTokenizer.from_pretrained(tiny_models["zephyr"])
    retemplated.chat_template = retemplated.chat_template.replace("|>", "|> ")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["zephyr"])
    other = write_gguf(model, retemplated, tmp_path / "template.gguf")
    reseeded = write_gguf(
        AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]), retemplated, tmp_path / "w.gguf"
    )
    assert len({model_fingerprint(str(p)) for p in (gguf_model, other, reseeded)}) == 3
    forwards = []
    original = scoring.iter_scores
    monkeypatch.setattr(
        scoring, "iter_scores", lambda m, e, *a, **k: forwards.append(len(e)) or original(m, e, *a, **k)
    )
    config = ScoreConfig(cache_dir=str(tmp_path / "cache"))
    for spelling in (str(gguf_model), str(copy), str(copy.parent), str(copy.parent) + "/"):
        score_dataset(as_dataset(conversations), [spelling], config)
    assert len(forwards) == 1  # the file, a renamed copy and its folder: one model, scored once


def test_convert_gguf_saves_a_folder_that_scores_alike(gguf_model, conversations, tmp_path):
    folder = convert_gguf(str(gguf_model), str(tmp_path / "converted"))
    dataset = as_dataset(conversations)
    from_folder = score_dataset(dataset, [str(folder)], ScoreConfig(cache_dir=str(tmp_path / "a")))
    from_file = score_dataset(dataset, [str(gguf_model)], ScoreConfig(cache_dir=str(tmp_path / "b")))
    assert from_folder["ref_score"] == pytest.approx(from_file["ref_score"], abs=1e-6)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (
        AutoTokenizer.from_pretrained(folder).chat_template
        == AutoTokenizer.from_pretrained(gguf_model.parent, gguf_file=gguf_model.name).chat_template
    )


def test_cli_scores_a_gguf_and_refuses_misuse(tiny_models, gguf_model, conversations, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", conversations[:4])
    argv = ["score", "--data", data, "--cache_dir", str(tmp_path / "c"), "--device", "cpu"]
    assert main([*argv, "--model", str(gguf_model.parent), "--output", str(tmp_path / "o")]) == 0
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(gguf_model, two / name)
    assert main([*argv, "--model", str(two), "--output", str(tmp_path / "o2")]) == 2
    assert error_line(capsys) == (
        f"poft score: error: --model {two} holds 2 GGUF files (a.gguf, b.gguf); name the one to use, e.g. --model "
        f"{two / 'a.gguf'}."
    )
    train = ["train", "--dataset_name", data, "--model_name_or_path", str(gguf_model), "--output_dir", str(tmp_path)]
    assert main([*train, "--loss_type", "sft"]) == 2
    assert error_line(capsys).startswith(
        f"poft train: error: --model_name_or_path {gguf_model} is a GGUF file, which this command does not read "
        '(poft score and poft eval do). Convert it to a model folder first: python -c "from poft.gguf_models import '
        f"convert_gguf; convert_gguf('{gguf_model}', 'FOLDER')\""
    )
    import transformers.utils.import_utils as import_utils

    monkeypatch.setattr(import_utils, "is_gguf_available", lambda *a: False)
    assert main([*argv, "--model", str(gguf_model), "--output", str(tmp_path / "o3")]) == 2
    assert re.fullmatch(
        rf"poft score: error: --model {re.escape(str(gguf_model))} is a GGUF file, which needs the gguf package "
        r"\(>= [\d.]+\): pip install 'poft\[gguf\]'\.",
        error_line(capsys),
    )
