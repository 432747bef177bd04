"""QLoRA: --load_in_4bit / --load_in_8bit load the model through bitsandbytes and train LoRA adapters on it, or fail
in one line. bitsandbytes (0.46.1 on) quantizes on CPU too, so the training runs here are real ones."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from poft.cli import main
from poft.trainer import PoFTTrainer

LAYER = "model.layers.0.self_attn.q_proj"


class Loaded(Exception):
    """Raised by the patched from_pretrained once it has recorded what it was given."""


def train(tmp_path, model: str, *flags: str) -> int:
    data = tmp_path / "d.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(row) + "\n")
    argv = ["train", "--dataset_name", str(data), "--model_name_or_path", model, "--objective", "sft"]
    return main([*argv, "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--max_steps", "1", *flags])


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """The float weight a bitsandbytes layer computes with: 4-bit blocks through their quantization state, 8-bit
    rows (LLM.int8) as int8 times the row's absmax / 127."""
    import bitsandbytes

    weight = layer.weight
    if isinstance(weight, bitsandbytes.nn.Params4bit):
        return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB  # the first forward moves them to the state
    return bitsandbytes.functional.int8_vectorwise_dequant(weight.data, scales)


@pytest.mark.parametrize(
    ("flag", "layer_class", "stored", "error_bound"),
    [
        # fp4's largest gap between levels is 1/3 of a block's absmax: a weight lands within 1/6 of it
        ("--load_in_4bit", "Linear4bit", torch.uint8, 1 / 6),
        ("--load_in_8bit", "Linear8bitLt", torch.int8, 1 / 254),  # rounding to 1/127 of the row's absmax
    ],
)
def test_qlora_trains_adapters_on_the_model_bitsandbytes_quantized(
    tiny_models, tmp_path, monkeypatch, flag, layer_class, stored, error_bound
):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    model = tiny_models["chatml"]
    trained = {}
    compute_loss = PoFTTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):  # the model the training step really receives
        trained.setdefault("model", model)
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(PoFTTrainer, "compute_loss", recording)
    flags = (flag, "true", "--bnb_4bit_quant_type", "fp4", "--use_peft", "true", "--lora_r", "4")
    assert (
        train(
            tmp_path,
            model,
            *flags,
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--learning_rate",
            "1e-2",
            "--logging_steps",
            "1",
        )
        == 0
    )

    base = trained["model"].get_base_model()
    linears = {name: m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}  # bnb's subclass it
    quantized = {name for name, m in linears.items() if isinstance(m, getattr(bitsandbytes.nn, layer_class))}
    assert quantized == {name for name in linears if ".layers." in name and ".lora_" not in name}
    assert len(quantized) == 7 * base.config.num_hidden_layers  # q, k, v, o, gate, up and down of every layer
    assert type(base.lm_head) is torch.nn.Linear  # transformers keeps the output head in full precision
    layer = linears[f"{LAYER}.base_layer"]
    original = load_file(str(Path(model) / "model.safetensors"))[f"{LAYER}.weight"]
    assert layer.weight.dtype == stored
    if flag == "--load_in_4bit":
        assert layer.weight.quant_state.quant_type == "fp4"  # --bnb_4bit_quant_type reached the load
        assert layer.weight.numel() == original.numel() // 2  # two 4-bit values a byte
    error = (dequantized(layer) - original).abs()
    assert 0 < error.max() <= error_bound * original.abs().max() + 1e-7

    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert math.isfinite(history[0]["loss"])
    adapters = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert {name.rsplit(".", 3)[-3] for name in adapters} == {"q_proj", "v_proj"}
    assert all(adapters[name].abs().max() > 0 for name in adapters if "lora_B" in name)  # B starts at zero


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
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as where it is not installed: import and find_spec fail
    assert train(tmp_path, tiny_models["chatml"], "--load_in_8bit", "true", "--use_peft", "true") == 2
    assert error_line(capsys) == (
        "poft train: error: --load_in_8bit needs bitsandbytes, which is not installed: pip install "
        "'poft[quantization]' (or leave --load_in_8bit out)."
    )
    assert not (tmp_path / "run").exists()
