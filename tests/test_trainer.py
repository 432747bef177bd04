"""PoFTTrainer: the same score definition as scoring, batch-layout invariance, GA correctness, errors."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from transformers import AutoTokenizer

from poft.chat import MASK_RULE, ChatTemplateError
from poft.errors import DataError, OptionError
from poft.scoring import ScoreConfig, score_dataset
from poft.trainer import PoFTConfig, PoFTTrainer, _num_sequences
from tests import processes
from tests.conftest import as_dataset, two_cpu_processes


def config(tmp_path, **overrides) -> PoFTConfig:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 1,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "activation_checkpointing": False,
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
        r_theta, ref = policy_scores(trainer)
    assert len(ref) == len(scored[name])
    torch.testing.assert_close(r_theta, ref, atol=1e-5, rtol=0)
    assert sorted(ref.tolist()) == pytest.approx(sorted(scored[name]["ref_score"]), abs=1e-6)


def policy_scores(trainer: PoFTTrainer, compared: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """r_theta and r_ref of the whole training set, computed by the loss's own path (with `compared`, what the
    objective compares r_theta with: r_ref + H_ref for poft_calibrated)."""
    batch = whole_batch(trainer)
    outputs, ref, seq_ids = trainer._forward(trainer.model, batch)
    _, r_theta = trainer._objective_loss(outputs, ref, seq_ids, _num_sequences(batch), None)
    return r_theta, None if ref is None else ref.compared() if compared else ref.score


def loss_and_grads(trainer: PoFTTrainer):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, whole_batch(trainer))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("objective", ["poft", "poft_token", "poft_calibrated", "sft", "sft_norm"])
def test_padded_and_packed_batches_give_the_same_loss_and_gradients(tiny_models, scored, tmp_path, objective):
    data = scored["zephyr"].map(lambda r: {"ref_score": r["ref_score"] + 0.3})  # a non-trivial margin
    results = []
    for layout in ({}, {"padding_free": True}, {"packing": True}):
        trainer = PoFTTrainer(
            tiny_models["chatml"], args=config(tmp_path, objective=objective, **layout), train_dataset=data
        )
        trainer.model.train()
        results.append(loss_and_grads(trainer))
    (loss, grads), *others = results
    for other_loss, other_grads in others:
        torch.testing.assert_close(other_loss, loss, atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", ["poft", "poft_token", "sft"])
@pytest.mark.parametrize("layout", [{}, {"padding_free": True}])
def test_response_only_head_gives_trl_fused_heads_loss_and_gradients(
    tiny_models, scored, tmp_path, monkeypatch, objective, layout
):
    """The trainer's response-only log-probs against TRL's fused head over every position, the path they replace."""
    data = scored["zephyr"].map(lambda r: {"ref_score": r["ref_score"] + 0.3})
    trainer = PoFTTrainer(
        tiny_models["chatml"], args=config(tmp_path, objective=objective, **layout), train_dataset=data
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


@pytest.mark.parametrize("objective", ["poft", "poft_token", "poft_calibrated", "sft", "sft_norm"])
def test_gradient_accumulation_4x1_equals_1x4(tiny_models, scored, tmp_path, objective):
    weights = []
    for batch, accumulation in ((4, 1), (1, 4)):
        args = config(
            tmp_path,
            objective=objective,
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


@pytest.mark.parametrize("objective", ["poft", "poft_token", "sft"])
def test_a_few_steps_lower_the_loss_and_log_poft_metrics(tiny_models, scored, tmp_path, objective):
    args = config(tmp_path, objective=objective, max_steps=12, learning_rate=3e-3)
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
    if objective != "sft":
        # with beta=1, gamma=0 the loss is -log sigmoid(margin); weights fall as the target overtakes the references
        assert logs[-1]["poft/weight"] < logs[0]["poft/weight"]


@pytest.mark.parametrize("layout", [{}, {"padding_free": True}])
def test_sft_norm_loss_is_the_mean_sequence_nll(tiny_models, conversations, scored, tmp_path, layout):
    args = config(tmp_path, objective="sft_norm", **layout)
    without_ref = PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=as_dataset(conversations))
    with_ref = PoFTTrainer(tiny_models["chatml"], args=config(tmp_path, **layout), train_dataset=scored["chatml"])
    with torch.no_grad():
        loss = without_ref.compute_loss(without_ref.model, whole_batch(without_ref))
        r_theta, _ = policy_scores(with_ref)
    torch.testing.assert_close(loss, -r_theta.mean(), atol=1e-5, rtol=1e-5)


def test_sft_needs_no_reference_scores(tiny_models, conversations, tmp_path):
    trainer = PoFTTrainer(
        tiny_models["chatml"],
        args=config(tmp_path, objective="sft", max_steps=2),
        train_dataset=as_dataset(conversations),
    )
    trainer.train()
    assert not any("poft/weight" in h for h in trainer.state.log_history)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reference_score_fails_before_training(tiny_models, conversations, tmp_path, bad):
    refs = [-1.0] * len(conversations)
    refs[3] = bad
    data = as_dataset(conversations, ref_score=refs, ref_entropy=[1.0] * len(conversations))
    with pytest.raises(DataError, match=r"^1 rows .* NaN or infinite 'ref_score': row 3 \(poft_id"):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path), train_dataset=data)


def test_calibrated_poft_needs_the_references_entropy(tiny_models, conversations, scored, tmp_path):
    """Scores without ref_entropy (an older poft's, or brought from elsewhere) are one line that names the fix; a
    NaN entropy names its row, as a NaN score does."""
    args = config(tmp_path, objective="poft_calibrated")
    with pytest.raises(
        DataError, match=r"no 'ref_entropy' column, which objective='poft_calibrated' reads.*poft score"
    ):
        PoFTTrainer(
            tiny_models["chatml"],
            args=args,
            train_dataset=as_dataset(conversations, ref_score=[-1.0] * len(conversations)),
        )
    entropies = list(scored["zephyr"]["ref_entropy"])
    entropies[2] = float("nan")
    data = scored["zephyr"].remove_columns("ref_entropy").add_column("ref_entropy", entropies)
    with pytest.raises(DataError, match=r"NaN or infinite 'ref_entropy': row 2 \(poft_id"):
        PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=data)
    # one reference's score reads that reference's entropy; a column poft score does not write has none beside it
    one = config(tmp_path, objective="poft_calibrated", ref_score_column="score_zephyr")
    trainer = PoFTTrainer(tiny_models["chatml"], args=one, train_dataset=data.remove_columns("ref_entropy"))
    _, ref = trainer._forward(trainer.model, whole_batch(trainer))[:2]
    torch.testing.assert_close(ref.entropy, torch.tensor(data["entropy_zephyr"]))
    own = config(tmp_path, objective="poft_calibrated", ref_score_column="my_score")
    with pytest.raises(OptionError, match="ref_score_column='my_score' is not a column `poft score` writes"):
        PoFTTrainer(tiny_models["chatml"], args=own, train_dataset=data.add_column("my_score", data["ref_score"]))


def test_null_reference_score_is_skipped_with_a_warning(tiny_models, conversations, tmp_path, caplog):
    refs = [-1.0] * len(conversations)
    refs[1] = refs[3] = None
    with caplog.at_level(logging.WARNING, logger="poft.trainer"):
        trainer = PoFTTrainer(
            tiny_models["chatml"],
            args=config(tmp_path),
            train_dataset=as_dataset(conversations, ref_score=refs, ref_entropy=[1.0] * len(conversations)),
        )
    assert len(trainer.train_dataset) == len(conversations) - 2
    assert f"2 of {len(conversations)} conversations of the train dataset have a null 'ref_score'" in caplog.text
    assert "are skipped" in caplog.text


def test_missing_reference_column_names_the_fix(tiny_models, conversations, tmp_path):
    with pytest.raises(ValueError, match="poft score"):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path), train_dataset=as_dataset(conversations))


def through_disk_and_filter(dataset, tmp_path):
    """What `poft filter` and `poft train` do to a saved scored dataset: save, load, filter, save, load."""
    from poft.data import load_sft_dataset
    from poft.filtering import filter_by_score

    dataset.save_to_disk(str(tmp_path / "scored"))
    filtered, _ = filter_by_score(load_sft_dataset(str(tmp_path / "scored")), "ref_score", top_fraction=0.9)
    filtered.save_to_disk(str(tmp_path / "filtered"))
    return load_sft_dataset(str(tmp_path / "filtered"))


def conversation_lengths(tokenizer_path: str, conversations) -> list[int]:
    """Tokens of each whole conversation, from the tokenizer's own chat template."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return [len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in conversations]


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_another_reading_length_is_refused_only_where_it_cuts_a_conversation(
    tiny_models, conversations, scored, tmp_path, caplog, where
):
    lengths = conversation_lengths(tiny_models["chatml"], conversations)
    assert 0 < sum(n > 120 for n in lengths) < len(lengths)
    short = score_dataset(
        as_dataset(conversations),
        [tiny_models["chatml"]],
        ScoreConfig(cache_dir=str(tmp_path / "cache"), max_length=120, device="cpu"),
    )
    whole = scored["chatml"]  # read at 256: no conversation is cut
    if where == "disk":
        short, whole = through_disk_and_filter(short, tmp_path / "s"), through_disk_and_filter(whole, tmp_path / "w")

    def cut_in(dataset) -> int:
        return sum(n > 120 for n, c in zip(lengths, conversations, strict=True) if c in dataset["messages"])

    with caplog.at_level(logging.INFO, logger="poft.trainer"):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path, max_length=200), train_dataset=whole)
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path, truncation_mode="keep_end"), train_dataset=whole)
    assert caplog.text.count("no conversation is cut under either") == 2
    cut = cut_in(whole)
    expected = rf"{cut} of {len(whole)} conversations are cut under one of them \(0 when scored, {cut} in training\)"
    with pytest.raises(OptionError, match=expected + r".* Train with --max_length 256 \(as scored\)"):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path, max_length=120), train_dataset=whole)
    cut = cut_in(short)
    with pytest.raises(OptionError, match=rf"\({cut} when scored, 0 in training\).* Train with --max_length 120 "):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path), train_dataset=short)
    with pytest.raises(OptionError, match=r"Train with --truncation_mode keep_start \(as scored\)"):
        PoFTTrainer(
            tiny_models["chatml"],
            args=config(tmp_path, max_length=120, truncation_mode="keep_end"),
            train_dataset=short,
        )


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize(("option", "value"), [("max_length", 120), ("system_turns", "merge")])
def test_training_refuses_scores_read_with_other_settings(tiny_models, scored, tmp_path, caplog, where, option, value):
    dataset = scored["chatml"] if where == "memory" else through_disk_and_filter(scored["chatml"], tmp_path)
    scored_with = {"max_length": 256, "truncation_mode": "keep_start", "system_turns": "auto"}[option]
    expected = f"{option}: scored with {scored_with!r}, training with {value!r}"
    with pytest.raises(OptionError, match=re.escape(expected) + ".*allow_truncation_mismatch"):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path, **{option: value}), train_dataset=dataset)
    with caplog.at_level(logging.WARNING, logger="poft.trainer"):
        PoFTTrainer(
            tiny_models["chatml"],
            args=config(tmp_path, allow_truncation_mismatch=True, **{option: value}),
            train_dataset=dataset,
        )
    assert expected in caplog.text
    PoFTTrainer(tiny_models["chatml"], args=config(tmp_path), train_dataset=dataset)  # the same settings train


def test_scores_written_to_jsonl_train_with_one_warning_that_their_settings_cannot_be_checked(
    tiny_models, scored, tmp_path, caplog
):
    """`Dataset.to_json` keeps the scores, not the reading settings in their feature: training at another max_length
    cannot be refused then, and says so in one warning naming the settings it reads with."""
    from poft.data import load_sft_dataset

    exported = tmp_path / "scored.jsonl"
    scored["chatml"].to_json(str(exported))
    data = load_sft_dataset(str(exported))
    assert data["ref_score"] == pytest.approx(scored["chatml"]["ref_score"], abs=1e-9)  # pandas writes 10 digits
    with caplog.at_level(logging.WARNING, logger="poft.trainer"):
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path, max_length=120), train_dataset=data)
        PoFTTrainer(tiny_models["chatml"], args=config(tmp_path), train_dataset=scored["chatml"])  # checked
    assert caplog.text.count("carries no reading settings") == 1
    assert (
        "The train dataset's 'ref_score' carries no reading settings (scores from elsewhere, or written to a file "
        "such as JSONL, which keeps the values only), so training cannot check that they read conversations as it "
        "does (max_length 120, truncation_mode keep_start, system_turns auto). Train on `poft score`'s output "
        "folder to have them checked." in caplog.text
    )


def test_packing_that_cuts_conversations_is_refused(tiny_models, scored, tmp_path):
    with pytest.raises(ValueError, match="bfd"):
        PoFTTrainer(
            tiny_models["chatml"],
            args=config(tmp_path, packing=True, packing_strategy="wrapped"),
            train_dataset=scored["chatml"],
        )
    with pytest.raises(ValueError, match="loss_type"):
        config(tmp_path, loss_type="dpo")


# poft_calibrated's step is poft_token's with the entropy carried beside r_ref: it covers both on 2 processes
@pytest.mark.parametrize("objective", ["poft", "poft_calibrated"])
def test_two_processes_equal_one_large_batch(tiny_models, scored, tmp_path, objective):
    """DDP over 2 CPU processes (gloo) with batch 2 each makes the same update as one process with batch 4."""
    import os

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
        "--objective",
        objective,
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
        "--activation_checkpointing",
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
    script = tmp_path / "train_then_report.py"  # poft train, then whether the process group was left behind
    script.write_text(
        "import faulthandler, os, sys\n"
        "faulthandler.dump_traceback_later(240, exit=True)\n"  # a hang fails below with every thread's stack
        "import torch.distributed as dist\nfrom poft.cli import main\ncode = main()\n"
        f"open(os.path.join({str(tmp_path)!r}, 'alive-' + os.environ['RANK']), 'w').write(str(dist.is_initialized()))\n"
        "sys.exit(code)\n"
    )
    run = processes.run(
        [
            *two_cpu_processes(str(script)),
            *common,
            *("--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")),
        ],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-12000:]
    # a gloo group alive at interpreter exit can abort a process after everything was saved
    assert [(tmp_path / f"alive-{rank}").read_text() for rank in (0, 1)] == ["False", "False"]
    assert main([*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")]) == 0
    two, one = (
        load_file(str(tmp_path / "two" / "model.safetensors")),
        load_file(str(tmp_path / "one" / "model.safetensors")),
    )
    before = load_file(os.path.join(tiny_models["chatml"], "model.safetensors"))
    for name, weight in one.items():
        assert not torch.equal(weight, before[name]), name
        torch.testing.assert_close(two[name], weight, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", ["poft", "poft_token", "poft_calibrated"])
def test_evaluation_reports_the_poft_loss_and_metrics(tiny_models, scored, tmp_path, objective):
    data = scored["zephyr"]
    args = config(
        tmp_path, objective=objective, max_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=16
    )
    trainer = PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=data, eval_dataset=data)
    metrics = trainer.evaluate()
    trainer.model.eval()
    with torch.no_grad():
        r_theta, ref = policy_scores(trainer, compared=True)
    if objective == "poft_calibrated":  # r_ref + H_ref of each row, read from the scored data (not shuffled)
        expected_ref = torch.tensor(data["ref_score"]) + torch.tensor(data["ref_entropy"])
        torch.testing.assert_close(ref, expected_ref.to(ref.dtype))
    losses = torch.nn.functional.softplus(-(r_theta - ref))  # -log sigmoid(margin)
    tokens = whole_batch(trainer)["labels"][:, 1:].ne(-100).sum(1).to(losses.dtype)
    expected = (losses.mean() if objective == "poft" else (losses * tokens).sum() / tokens.sum()).item()
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
            r_theta, ref = policy_scores(trainer)
        torch.testing.assert_close(r_theta, ref, atol=1e-5, rtol=0)
        assert sorted(ref.tolist()) == pytest.approx(sorted(data["ref_score"]), abs=1e-6)


@pytest.mark.parametrize("given", ["path", "model"])
@pytest.mark.parametrize("max_length", [256, None])
def test_training_reads_no_further_than_the_models_context(
    tiny_models, conversations, tmp_path, caplog, given, max_length
):
    """A max_length past max_position_embeddings (or none) is capped at the context, as poft score caps it:
    conversations longer than the context are cut to it, and the run records the length it used."""
    from poft.demo.builders import save_model, tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    model = tiny_llama(tokenizer, max_position_embeddings=64)
    target = str(save_model(model, tokenizer, tmp_path / "short")) if given == "path" else model
    data = as_dataset(conversations)
    lengths = [len(tokenizer.apply_chat_template(c["messages"])["input_ids"]) for c in data]
    assert max(lengths) > 64  # some conversations reach past the context
    with caplog.at_level(logging.INFO, logger="poft.trainer"):
        trainer = PoFTTrainer(
            target,
            args=config(tmp_path, objective="sft", max_length=max_length),
            train_dataset=data,
            processing_class=tokenizer,
        )
    assert trainer.args.max_length == 64
    assert [len(ids) for ids in trainer.train_dataset["input_ids"]] == [min(n, 64) for n in lengths]
    requested = "no max_length" if max_length is None else f"max_length {max_length}"
    assert f"{requested} is beyond the model's context (max_position_embeddings=64)" in caplog.text


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
        r_theta, ref = policy_scores(trainer)
    torch.testing.assert_close(r_theta, ref, atol=1e-5, rtol=0)
    trainer.save_model(str(tmp_path / "trained"))
    assert AutoTokenizer.from_pretrained(tmp_path / "trained").chat_template == ZEPHYR


@pytest.mark.parametrize("legacy", ["poft", "sft", "sft_norm"])
def test_former_loss_type_spellings_select_the_objective(tmp_path, legacy, caplog):
    with caplog.at_level(logging.WARNING, logger="poft.trainer"):
        args = config(tmp_path, loss_type=legacy)
    assert (args.objective, args.loss_type) == (legacy, "nll")
    assert f"use `objective: {legacy}`" in caplog.text
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"loss_type: {legacy}\nmodel_name_or_path: m\ndataset_name: d\noutput_dir: {tmp_path / 'o'}\n")
    from poft.cli import parse

    _, parsed, _ = parse("train", ["--config", str(recipe)])
    assert (parsed.objective, parsed.loss_type) == (legacy, "nll")


def test_contradicting_or_misplaced_losses_are_one_line_errors(tmp_path):
    with pytest.raises(OptionError, match="contradicts objective='sft'"):
        config(tmp_path, loss_type="sft_norm", objective="sft")
    with pytest.raises(OptionError, match="applies with objective='sft'"):
        config(tmp_path, loss_type="dft", objective="poft_token")
    with pytest.raises(OptionError, match="objective must be one of"):
        config(tmp_path, objective="dpo")


def test_no_deprecation_warning_for_options_left_unset(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = PoFTConfig(output_dir=str(tmp_path / "o"), report_to=[])
    assert args.activation_checkpointing is True  # TRL's default, under its current name
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        assert (
            PoFTConfig(output_dir=str(tmp_path / "o"), gradient_checkpointing=False).activation_checkpointing is False
        )


def test_dft_is_the_probability_weighted_token_nll(tiny_models, scored, tmp_path):
    trainer = PoFTTrainer(
        tiny_models["chatml"], args=config(tmp_path, objective="sft", loss_type="dft"), train_dataset=scored["zephyr"]
    )
    batch = whole_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token = log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)[mask]
    torch.testing.assert_close(loss, -(token * token.exp()).sum() / mask.sum(), atol=1e-5, rtol=1e-5)


def tiny_mixtral(tokenizer, coef: float = 0.05):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(3)
    return MixtralForCausalLM(
        MixtralConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_aux_loss_coef=coef,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).float()


def test_moe_sft_equals_trls_sft_trainer_step_for_step(tiny_models, scored, tmp_path):
    """A Mixtral target: poft's SFT objective and TRL's own SFTTrainer (same labels) make the same updates and
    log the same router aux loss, so the load-balancing loss is kept."""
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    steps = {"max_steps": 3, "per_device_train_batch_size": 16, "optim": "sgd", "learning_rate": 0.5}
    ours = PoFTTrainer(
        tiny_mixtral(tokenizer),
        args=config(tmp_path, objective="sft", **steps),
        train_dataset=scored["zephyr"],
        processing_class=tokenizer,
    )
    tokenized = ours.train_dataset.map(lambda r: {"completion_mask": [int(t != -100) for t in r["labels"]]})
    theirs = SFTTrainer(
        tiny_mixtral(tokenizer),
        args=SFTConfig(
            output_dir=str(tmp_path / "trl"),
            activation_checkpointing=False,
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            seed=0,
            bf16=False,
            max_length=256,
            completion_only_loss=True,
            **steps,
        ),
        train_dataset=tokenized.select_columns(["input_ids", "completion_mask"]),
        processing_class=tokenizer,
    )
    assert ours.aux_loss_enabled and theirs.aux_loss_enabled
    ours.train()
    theirs.train()
    ours_logs = [h for h in ours.state.log_history if "loss" in h]
    theirs_logs = [h for h in theirs.state.log_history if "loss" in h]
    for a, b in zip(ours_logs, theirs_logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-5)
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("objective", ["poft", "poft_token"])
def test_moe_poft_loss_adds_the_router_aux_loss(tiny_models, scored, tmp_path, objective):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["chatml"])
    losses = {}
    for coef in (0.0, 0.05):
        trainer = PoFTTrainer(
            tiny_mixtral(tokenizer, coef),
            args=config(tmp_path, objective=objective),
            train_dataset=scored["zephyr"],
            processing_class=tokenizer,
        )
        batch = whole_batch(trainer)
        with torch.no_grad():
            losses[coef] = trainer.compute_loss(trainer.model, batch)
            if coef:
                aux = trainer.model(
                    **{k: batch[k] for k in ("input_ids", "attention_mask")}, output_router_logits=True
                )
    torch.testing.assert_close(losses[0.05] - losses[0.0], 0.05 * aux.aux_loss, atol=1e-6, rtol=1e-5)
