"""PoFTTrainer: the same score definition as scoring, batch-layout invariance, GA correctness, errors."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import AutoTokenizer

from poft.chat import MASK_RULE, ChatTemplateError
from poft.errors import DataError
from poft.scoring import ScoreConfig, score_dataset
from poft.trainer import PoFTConfig, PoFTTrainer
from tests.conftest import TWO_CPU_PROCESSES, as_dataset


def config(tmp_path, **overrides) -> PoFTConfig:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 1,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "report_to": [],
        "max_length": 256,
        "seed": 0,
    }
    return PoFTConfig(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def scored(tiny_models, conversations, tmp_path_factory):
    """The conversations scored by each tiny model alone, so ref_score is that model's own score."""
    cache = tmp_path_factory.mktemp("cache")
    return {
        name: score_dataset(
            as_dataset(conversations), [path], ScoreConfig(cache_dir=str(cache), max_length=256, device="cpu")
        )
        for name, path in tiny_models.items()
    }


def whole_batch(trainer: PoFTTrainer) -> dict:
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("name", ["chatml", "zephyr"])
@pytest.mark.parametrize("layout", [{}, {"padding_free": True}, {"packing": True}])
def test_r_theta_equals_the_models_own_score(tiny_models, scored, tmp_path, name, layout):
    trainer = PoFTTrainer(tiny_models[name], args=config(tmp_path, **layout), train_dataset=scored[name])
    trainer.model.eval()
    with torch.no_grad():
        r_theta, ref = trainer.policy_scores(trainer.model, whole_batch(trainer))
    assert len(ref) == len(scored[name])
    torch.testing.assert_close(r_theta, ref, atol=1e-5, rtol=0)
    assert sorted(ref.tolist()) == pytest.approx(sorted(scored[name]["ref_score"]), abs=1e-6)


def loss_and_grads(trainer: PoFTTrainer):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, whole_batch(trainer))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["poft", "sft", "sft_norm"])
def test_padded_and_packed_batches_give_the_same_loss_and_gradients(tiny_models, scored, tmp_path, loss_type):
    data = scored["zephyr"].map(lambda r: {"ref_score": r["ref_score"] + 0.3})  # a non-trivial margin
    results = []
    for layout in ({}, {"padding_free": True}, {"packing": True}):
        trainer = PoFTTrainer(
            tiny_models["chatml"], args=config(tmp_path, loss_type=loss_type, **layout), train_dataset=data
        )
        trainer.model.train()
        results.append(loss_and_grads(trainer))
    (loss, grads), *others = results
    for other_loss, other_grads in others:
        torch.testing.assert_close(other_loss, loss, atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["poft", "sft"])
@pytest.mark.parametrize("layout", [{}, {"padding_free": True}])
def test_response_only_head_gives_trl_fused_heads_loss_and_gradients(
    tiny_models, scored, tmp_path, monkeypatch, loss_type, layout
):
    """The trainer's response-only log-probs against TRL's fused head over every position, the path they replace."""
    data = scored["zephyr"].map(lambda r: {"ref_score": r["ref_score"] + 0.3})
    trainer = PoFTTrainer(
        tiny_models["chatml"], args=config(tmp_path, loss_type=loss_type, **layout), train_dataset=data
    )
    trainer.model.train()
    metrics = []
    loss, grads = loss_and_grads(trainer)
    metrics.append({k: v[-1] for k, v in trainer._metrics["train"].items()})
    monkeypatch.setattr(
        "poft.trainer.response_log_probs", lambda model, inputs, outputs: model(**inputs, fused_lm_head=True)
    )
    fused_loss, fused_grads = loss_and_grads(trainer)
    metrics.append({k: v[-1] for k, v in trainer._metrics["train"].items()})
    torch.testing.assert_close(loss, fused_loss, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, fused_grads[name], atol=1e-5, rtol=0)
    for key in ("entropy", "mean_token_accuracy"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=1e-5)


@pytest.mark.parametrize("loss_type", ["poft", "sft", "sft_norm"])
def test_gradient_accumulation_4x1_equals_1x4(tiny_models, scored, tmp_path, loss_type):
    weights = []
    for batch, accumulation in ((4, 1), (1, 4)):
        args = config(
            tmp_path,
            loss_type=loss_type,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=1e9,
        )
        trainer = PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=scored["zephyr"])
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        weights.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters()})
    for name, update in weights[0].items():
        assert update.abs().max() > 0
        torch.testing.assert_close(weights[1][name], update, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["poft", "sft"])
def test_a_few_steps_lower_the_loss_and_log_poft_metrics(tiny_models, scored, tmp_path, loss_type):
    args = config(tmp_path, loss_type=loss_type, max_steps=12, learning_rate=3e-3)
    trainer = PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=scored["zephyr"])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]
    for key in (
        "poft/weight",
        "poft/win_rate",
        "poft/margin",
        "poft/r_theta",
        "poft/r_ref",
        "entropy",
        "mean_token_accuracy",
    ):
        assert all(math.isfinite(h[key]) for h in logs), key
    assert all(0 <= h["poft/weight"] <= 1 and 0 <= h["poft/win_rate"] <= 1 for h in logs)
    first = logs[0]
    assert first["poft/margin"] == pytest.approx(first["poft/r_theta"] - first["poft/r_ref"], abs=1e-5)
    if loss_type == "poft":
        # with beta=1, gamma=0 the loss is -log sigmoid(margin); weights fall as the target overtakes the references
        assert logs[-1]["poft/weight"] < logs[0]["poft/weight"]


@pytest.mark.parametrize("layout", [{}, {"padding_free": True}])
def test_sft_norm_loss_is_the_mean_sequence_nll(tiny_models, conversations, scored, tmp_path, layout):
    args = config(tmp_path, loss_type="sft_norm", **layout)
    without_ref = PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=as_dataset(conversations))
    with_ref = PoFTTrainer(tiny_models["chatml"], args=config(tmp_path, **layout), train_dataset=scored["chatml"])
    with torch.no_grad():
        loss = without_ref.compute_loss(without_ref.model, whole_batch(without_ref))
        r_theta, _ = with_ref.policy_scores(with_ref.model, whole_batch(with_ref))
    torch.testing.assert_close(loss, -r_theta.mean(), atol=1e-5, rtol=1e-5)


def test_sft_needs_no_reference_scores(tiny_models, conversations, tmp_path):
    trainer = PoFTTrainer(
        tiny_models["chatml"],
        args=config(tmp_path, loss_type="sft", max_steps=2),
        train_dataset=as_dataset(conversations),
    )
    trainer.train()
    assert not any("poft/weight" in h for h in trainer.state.log_history)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reference_score_fails_before_training(tiny_models, conversations, tmp_path, bad):
    refs = [-1.0] * len(conversations)
    refs[3] = bad
    with pytest.raises(DataError, match=r"^1 rows .* NaN or infinite 'ref_score': row 3 \(poft_id"):
        PoFTTrainer(
            tiny_models["chatml"], args=config(tmp_path), train_dataset=as_dataset(conversations, ref_score=refs)
        )


def test_null_reference_score_is_skipped_with_a_warning(tiny_models, conversations, tmp_path, caplog):
    refs = [-1.0] * len(conversations)
    refs[1] = refs[3] = None
    with caplog.at_level(logging.WARNING, logger="poft.trainer"):
        trainer = PoFTTrainer(
            tiny_models["chatml"], args=config(tmp_path), train_dataset=as_dataset(conversations, ref_score=refs)
        )
    assert len(trainer.train_dataset) == len(conversations) - 2
    assert f"2 of {len(conversations)} conversations of the train dataset have a null 'ref_score'" in caplog.text
    assert "are skipped" in caplog.text


def test_missing_reference_column_names_the_fix(tiny_models, conversations, tmp_path):
    with pytest.raises(ValueError, match="poft score"):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path), train_dataset=as_dataset(conversations))


def test_packing_that_cuts_conversations_is_refused(tiny_models, scored, tmp_path):
    with pytest.raises(ValueError, match="bfd"):
        PoFTTrainer(
            tiny_models["chatml"],
            args=config(tmp_path, packing=True, packing_strategy="wrapped"),
            train_dataset=scored["chatml"],
        )
    with pytest.raises(ValueError, match="loss_type"):
        config(tmp_path, loss_type="dpo")


def test_two_processes_equal_one_large_batch(tiny_models, scored, tmp_path):
    """DDP over 2 CPU processes (gloo) with batch 2 each makes the same update as one process with batch 4."""
    import os
    import subprocess

    from safetensors.torch import load_file

    from poft.cli import main

    data = str(tmp_path / "scored")
    scored["zephyr"].save_to_disk(data)
    common = [
        "train",
        "--model_name_or_path",
        tiny_models["chatml"],
        "--dataset_name",
        data,
        "--loss_type",
        "poft",
        "--max_steps",
        "1",
        "--optim",
        "sgd",
        "--learning_rate",
        "1.0",
        "--max_grad_norm",
        "1e9",
        "--max_length",
        "256",
        "--gradient_checkpointing",
        "false",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
        "--seed",
        "0",
    ]
    run = subprocess.run(
        [*TWO_CPU_PROCESSES, *common, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")]) == 0
    two, one = (
        load_file(str(tmp_path / "two" / "model.safetensors")),
        load_file(str(tmp_path / "one" / "model.safetensors")),
    )
    before = load_file(os.path.join(tiny_models["chatml"], "model.safetensors"))
    for name, weight in one.items():
        assert not torch.equal(weight, before[name]), name
        torch.testing.assert_close(two[name], weight, atol=1e-5, rtol=1e-4)


def test_evaluation_reports_the_poft_loss_and_metrics(tiny_models, scored, tmp_path):
    data = scored["zephyr"]
    args = config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=16)
    trainer = PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=data, eval_dataset=data)
    metrics = trainer.evaluate()
    trainer.model.eval()
    with torch.no_grad():
        r_theta, ref = trainer.policy_scores(trainer.model, whole_batch(trainer))
    expected = torch.nn.functional.softplus(-(r_theta - ref)).mean().item()  # -log sigmoid(margin)
    assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["eval_poft/margin"] == pytest.approx((r_theta - ref).mean().item(), abs=1e-5)


@pytest.mark.parametrize("name", ["llama3_1", "qwen3", "gemma"])
def test_r_theta_equals_poft_score_on_real_templates(template_models, conversations, tmp_path, name):
    """Llama 3.1, Qwen 3 (empty reasoning blocks left out) and Gemma (system turns merged) read alike in both."""
    data = score_dataset(
        as_dataset(conversations),
        [template_models[name]],
        ScoreConfig(cache_dir=str(tmp_path / "cache"), max_length=256, device="cpu"),
    )
    (meta,) = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert meta["masking"] == MASK_RULE and meta["system_turns"] == "auto"  # a new rule never reuses old scores
    for layout in ({}, {"padding_free": True}):
        trainer = PoFTTrainer(template_models[name], args=config(tmp_path, **layout), train_dataset=data)
        trainer.model.eval()
        with torch.no_grad():
            r_theta, ref = trainer.policy_scores(trainer.model, whole_batch(trainer))
        torch.testing.assert_close(r_theta, ref, atol=1e-5, rtol=0)
        assert sorted(ref.tolist()) == pytest.approx(sorted(data["ref_score"]), abs=1e-6)


def test_target_without_a_template_trains_with_the_given_one(tiny_models, conversations, tmp_path):
    """A base model trained with Zephyr's template file: r_theta equals `poft score --chat_template` of the same
    file, and the saved model carries the template."""
    from poft.demo.builders import save_model, tiny_llama
    from tests.real_templates import ZEPHYR

    template = tmp_path / "zephyr.jinja"
    template.write_text(ZEPHYR)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["zephyr"])
    tokenizer.chat_template = None
    base = str(save_model(tiny_llama(tokenizer, seed=7), tokenizer, tmp_path / "base"))
    options = {"cache_dir": str(tmp_path / "cache"), "max_length": 256, "device": "cpu"}
    with pytest.raises(ChatTemplateError, match="no chat template"):
        score_dataset(as_dataset(conversations), [base], ScoreConfig(**options))
    data = score_dataset(as_dataset(conversations), [base], ScoreConfig(chat_template=str(template), **options))
    trainer = PoFTTrainer(base, args=config(tmp_path, chat_template=str(template)), train_dataset=data)
    trainer.model.eval()
    with torch.no_grad():
        r_theta, ref = trainer.policy_scores(trainer.model, whole_batch(trainer))
    torch.testing.assert_close(r_theta, ref, atol=1e-5, rtol=0)
    trainer.save_model(str(tmp_path / "trained"))
    assert AutoTokenizer.from_pretrained(tmp_path / "trained").chat_template == ZEPHYR
