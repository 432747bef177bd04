"""QLoRA: --load_in_4bit / --load_in_8bit reach the model load as TRL's script passes them, or fail in one line."""

from __future__ import annotations

import json

import pytest
import transformers

import poft.runtime as runtime
from poft.cli import main


class Loaded(Exception):
    """Raised by the patched from_pretrained once it has recorded what it was given."""


def train(tmp_path, model: str, *flags: str) -> int:
    data = tmp_path / "d.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(row) + "\n")
    argv = ["train", "--dataset_name", str(data), "--model_name_or_path", model, "--loss_type", "sft"]
    return main([*argv, "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--max_steps", "1", *flags])


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("flag", "expected"), [("--load_in_4bit", {"load_in_4bit": True}), ("--load_in_8bit", {})])
def test_quantization_flags_reach_from_pretrained(tiny_models, tmp_path, monkeypatch, flag, expected):
    monkeypatch.setattr(runtime, "bitsandbytes_installed", lambda: True)
    monkeypatch.setattr(runtime, "bitsandbytes_runs_here", lambda: True)
    seen = {}

    def from_pretrained(cls, path, *args, **kwargs):
        seen.update(kwargs, path=path)
        raise Loaded

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(from_pretrained))
    with pytest.raises(Loaded):
        train(tmp_path, tiny_models["chatml"], flag, "true", "--use_peft", "true", "--bnb_4bit_quant_type", "fp4")
    config = seen["quantization_config"]
    assert isinstance(config, transformers.BitsAndBytesConfig) and seen["path"] == tiny_models["chatml"]
    if flag == "--load_in_4bit":
        assert (config.load_in_4bit, config.load_in_8bit, config.bnb_4bit_quant_type) == (True, False, "fp4")
    else:
        assert (config.load_in_4bit, config.load_in_8bit) == (False, True)


def test_without_quantization_flags_nothing_is_quantized(tiny_models, tmp_path, monkeypatch):
    seen = {}

    def from_pretrained(cls, path, *args, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(from_pretrained))
    with pytest.raises(Loaded):
        train(tmp_path, tiny_models["chatml"])
    assert seen.get("quantization_config") is None


def test_quantization_without_lora_is_refused(tiny_models, tmp_path, capsys):
    assert train(tmp_path, tiny_models["chatml"], "--load_in_4bit", "true") == 2
    assert error_line(capsys) == (
        "poft train: error: --load_in_4bit trains LoRA adapters on the quantized model (QLoRA); add --use_peft true, "
        "or leave --load_in_4bit out."
    )


def test_missing_bitsandbytes_is_one_line(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "bitsandbytes_installed", lambda: False)
    assert train(tmp_path, tiny_models["chatml"], "--load_in_8bit", "true", "--use_peft", "true") == 2
    assert error_line(capsys) == (
        "poft train: error: --load_in_8bit needs bitsandbytes, which is not installed: pip install "
        "'poft[quantization]' (or leave --load_in_8bit out)."
    )
    assert not (tmp_path / "run").exists()


def test_no_device_bitsandbytes_supports_is_one_line(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "bitsandbytes_installed", lambda: True)
    monkeypatch.setattr(runtime, "bitsandbytes_runs_here", lambda: False)
    assert train(tmp_path, tiny_models["chatml"], "--load_in_4bit", "true", "--use_peft", "true") == 2
    assert error_line(capsys).startswith(
        "poft train: error: --load_in_4bit: bitsandbytes supports none of this machine's devices"
    )
