"""One way to get a model: score, eval and IFD share the option groups, the spec, its check and its fingerprint."""

from __future__ import annotations

from dataclasses import fields

import pytest

import poft.models as models
from poft.errors import ModelError
from poft.evaluation import EvalConfig, _load
from poft.filtering import FilterConfig
from poft.models import ModelSpec
from poft.options import ModelOptions, ReadingOptions
from poft.scoring import ScoreConfig, score_dataset
from tests.conftest import as_dataset


@pytest.mark.parametrize("config", [ScoreConfig, FilterConfig, EvalConfig])
def test_every_model_command_has_the_shared_groups(config):
    names = {f.name for f in fields(config)}
    assert {f.name for f in fields(ModelOptions)} | {f.name for f in fields(ReadingOptions)} <= names


def test_eval_loads_with_the_model_options(tiny_models):
    config = EvalConfig(model=[tiny_models["chatml"]], data="qa.jsonl", device="cpu", attn_implementation="eager")
    model, tokenizer = _load(tiny_models["chatml"], config)
    assert model.config._attn_implementation == "eager"
    assert not model.training and tokenizer.chat_template


def test_the_spec_checks_before_loading(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    spec = ModelSpec.of(str(tmp_path), ModelOptions(device="cpu"))
    assert (spec.source, spec.gguf_file, spec.trust_remote_code) == (str(tmp_path), None, False)
    with pytest.raises(ModelError, match="no tokenizer files"):
        spec.check()


def test_a_reference_is_fingerprinted_once_per_run(tiny_models, conversations, tmp_path, monkeypatch):
    calls = []
    original = models.model_fingerprint
    monkeypatch.setattr(models, "model_fingerprint", lambda path: calls.append(path) or original(path))
    config = ScoreConfig(cache_dir=str(tmp_path / "cache"), device="cpu")
    score_dataset(as_dataset(conversations[:4]), [tiny_models["chatml"]], config)
    assert calls == [tiny_models["chatml"]]
