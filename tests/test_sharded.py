"""Sharded engines: FSDP2 and DeepSpeed ZeRO-3 on two CPU processes train as one process with the same batch.

Each case trains 3 SGD steps with the recipes' accelerate configs (`tests.sharded_runs`), asserts the engine that
really wrapped the model (accelerate falls back to DDP, or to no distribution, without a word), and compares the
loss, the `poft/*` metrics and every saved parameter with one process. The matrix (engines x objectives x full
and LoRA) is `bench/sharded.py`; here is the case FSDP2 got wrong: LoRA with a trainable head, which peft's wrap
policy shards alone. Then, in one process: a trainable head takes the response-only head, with TRL's values.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from poft.logprobs import output_head, response_head_supported, response_log_probs
from poft.scoring import ScoreConfig, score_dataset
from tests.conftest import as_dataset
from tests.sharded_runs import compare
from tests.test_logprobs import OUTPUTS, llama, padded, sequences

TOLERANCE = 1e-5  # float32 sums in another order; the bug it guards against moved the head by 6e-2


@pytest.fixture(scope="module")
def scored_data(tiny_models, conversations, tmp_path_factory) -> str:
    """The conversations scored by the model trained, shifted so that PoFT's weights vary."""
    root = tmp_path_factory.mktemp("sharded")
    config = ScoreConfig(cache_dir=str(root / "cache"), max_length=256, device="cpu")
    data = score_dataset(as_dataset(conversations), [tiny_models["chatml"]], config)
    data = data.map(lambda row: {"ref_score": row["ref_score"] + 0.3})
    data.save_to_disk(str(root / "data"))
    return str(root / "data")


def assert_equal_to_one_process(result) -> None:
    assert result.steps == 3
    assert result.moved > 1e-3  # the compared tensors were trained
    assert result.loss < TOLERANCE, result
    assert result.metrics < TOLERANCE, result
    assert result.parameters < TOLERANCE, result


def test_fsdp2_lora_with_a_trainable_head_equals_one_process(tiny_models, scored_data, tmp_path):
    result = compare("fsdp2", tiny_models["chatml"], scored_data, "poft_token", lora=True, root=tmp_path)
    engine = result.engine
    assert (engine["distributed_type"], engine["num_processes"]) == ("DistributedType.FSDP", 2)
    assert "" in engine["fsdp_modules"], engine  # the model itself is an FSDPModule: FSDP2 wrapped it
    assert engine["head_group"] == ["base_model.model.lm_head"], engine  # the head sharded alone
    assert_equal_to_one_process(result)


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install poft[deepspeed])"
)
def test_zero3_lora_with_a_trainable_head_equals_one_process(tiny_models, scored_data, tmp_path):
    result = compare("zero3", tiny_models["chatml"], scored_data, "poft_token", lora=True, root=tmp_path)
    engine = result.engine
    assert engine["wrapper"] == "deepspeed.runtime.engine.DeepSpeedEngine", engine
    assert (engine["zero_stage"], engine["num_processes"]) == (3, 2), engine
    assert_equal_to_one_process(result)


def test_a_trainable_peft_head_takes_the_response_head_with_trl_fused_heads_values_and_gradients():
    """peft's `modules_to_save` puts a wrapper where the head was: its active copy is what the kernel reads."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = peft.get_peft_model(llama(), config)
    head = model.get_base_model().lm_head
    with torch.no_grad():  # the copy trains away from the original: make them differ, as after training
        head.modules_to_save["default"].weight.mul_(1.5)
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model.get_base_model(), outputs=OUTPUTS)
    batch = padded(sequences())

    assert response_head_supported(model.get_base_model())
    ours = response_log_probs(model, batch, OUTPUTS)
    trl = trl_model(**batch, fused_lm_head=True)
    torch.testing.assert_close(ours.log_probs, trl.log_probs, rtol=0, atol=1e-5)
    ours.loss.backward()
    trl.loss.backward()
    reference = dict(trl_model.named_parameters())
    trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert any("modules_to_save" in name for name in trained)
    for name, param in trained.items():
        torch.testing.assert_close(param.grad, reference[name].grad, rtol=0, atol=1e-5)

    with model.disable_adapter(), torch.no_grad():  # adapters off: the original head, as peft's forward runs it
        assert output_head(model.get_base_model()) is head.original_module
        off = response_log_probs(model, batch, OUTPUTS)
        with trl_model.disable_adapter():
            trl_off = trl_model(**batch, fused_lm_head=True)
    torch.testing.assert_close(off.log_probs, trl_off.log_probs, rtol=0, atol=1e-5)
    assert not torch.allclose(off.log_probs, ours.log_probs)
