"""`poft dpo`: preference data in its common shapes, readable errors, real recipes, and DPO that moves the margin."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import string
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser

from poft.cli import main
from poft.demo.builders import char_tokenizer, save_model, tiny_llama
from poft.dpo import DPODataArguments, PoFTDPOConfig, load_preference_dataset, run_dpo
from poft.errors import DataError
from tests.conftest import cut_checkpoint

RECIPES = Path(__file__).parent.parent / "recipes"
DPO_RECIPES = ("dpo-paper.yaml", "dpo-lora.yaml")


def make_pairs(n: int = 16, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): a sum, its answer, and a wrong answer."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        pairs.append((f"What is {a} plus {b}?", f"{a + b}.", f"{a + b + rng.randint(1, 9)}."))
    return pairs


def text_rows(pairs) -> list[dict]:
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]


def ultrafeedback_rows(pairs) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized's shape: a prompt string, and whole conversations that repeat it."""

    def chat(prompt: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    return [
        {
            "prompt": p,
            "prompt_id": str(i),
            "chosen": chat(p, c),
            "rejected": chat(p, r),
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
        for i, (p, c, r) in enumerate(pairs)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    tokenizer = char_tokenizer(string.ascii_letters + string.digits + " ?.\n")
    return str(
        save_model(
            tiny_llama(tokenizer, hidden_size=32, num_layers=1), tokenizer, tmp_path_factory.mktemp("dpo") / "model"
        )
    )


def dpo_flags(model: str, data: str, output: Path, **options) -> list[str]:
    settings = {
        "model_name_or_path": model,
        "dataset_name": data,
        "output_dir": str(output),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "activation_checkpointing": False,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        **options,
    }
    return [token for key, value in settings.items() for token in (f"--{key}", str(value))]


def step_logs(output: Path) -> list[dict]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def test_ultrafeedback_rows_become_explicit_prompt_pairs(tmp_path):
    rows = ultrafeedback_rows(make_pairs(4))
    from_file = load_preference_dataset(write_jsonl(tmp_path / "uf.jsonl", rows))
    saved = tmp_path / "uf"
    DatasetDict({"train_prefs": Dataset.from_list(rows), "test_prefs": Dataset.from_list(rows[:2])}).save_to_disk(
        str(saved)
    )
    from_disk = load_preference_dataset(str(saved), split="train_prefs")
    for dataset in (from_file, from_disk):
        assert dataset.column_names == ["prompt", "chosen", "rejected"] and len(dataset) == 4
        assert dataset[0]["prompt"] == [{"role": "user", "content": rows[0]["prompt"]}]
        assert dataset[0]["chosen"] == rows[0]["chosen"][1:] and dataset[0]["rejected"] == rows[0]["rejected"][1:]
    explicit = load_preference_dataset(
        write_jsonl(
            tmp_path / "explicit.jsonl",
            [
                {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "No."},
                {
                    "prompt": "Sum?",
                    "chosen": [{"role": "assistant", "content": "2."}],
                    "rejected": [{"role": "assistant", "content": "3."}],
                },
            ],
        )
    )
    assert explicit[0]["chosen"] == [{"role": "assistant", "content": "Hello."}]
    assert explicit[1]["prompt"] == [{"role": "user", "content": "Sum?"}]


@pytest.mark.parametrize("form", ["text", "ultrafeedback"])
def test_dpo_end_to_end(tiny_model, tmp_path, form):
    rows = text_rows(make_pairs()) if form == "text" else ultrafeedback_rows(make_pairs())
    output = tmp_path / "dpo"
    assert main(["dpo", *dpo_flags(tiny_model, write_jsonl(tmp_path / "prefs.jsonl", rows), output)]) == 0
    assert (output / "model.safetensors").exists() and (output / "tokenizer.json").exists()
    logs = step_logs(output)
    assert len(logs) == 3
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(
        logs[0]
    )


def completion_log_probs(model, tokenizer, prompt: str, completion: str) -> float:
    """Sum of log p(completion token | prefix), tokenized as DPOTrainer does for text pairs (eos appended)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor(tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"])
    with torch.no_grad():
        log_probs = model(ids[None]).logits[0, :-1].log_softmax(-1)
    token_log_probs = log_probs.gather(-1, ids[1:, None])[:, 0]
    return token_log_probs[len(prompt_ids) - 1 :].sum().item()


def mean_margin(model, tokenizer, pairs) -> float:
    margins = [
        completion_log_probs(model, tokenizer, p, c) - completion_log_probs(model, tokenizer, p, r)
        for p, c, r in pairs
    ]
    return sum(margins) / len(margins)


def test_dpo_widens_the_chosen_rejected_margin(tiny_model, tmp_path):
    pairs = make_pairs()
    output = tmp_path / "dpo"
    parser = TrlParser((DPODataArguments, PoFTDPOConfig, ModelConfig))
    args = parser.parse_args_and_config(
        dpo_flags(
            tiny_model, write_jsonl(tmp_path / "p.jsonl", text_rows(pairs)), output, max_steps=12, learning_rate=5e-3
        )
    )
    assert run_dpo(*args) == str(output)

    margins = [entry["rewards/margins"] for entry in step_logs(output)]  # 12 steps: 3 epochs of 4 batches
    assert margins[0] == pytest.approx(0.0, abs=1e-5)  # at the first step the policy is the reference
    assert sum(margins[-4:]) > max(0.0, sum(margins[:4]))  # batches differ, so compare whole epochs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    before = mean_margin(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer, pairs)
    after = mean_margin(AutoModelForCausalLM.from_pretrained(str(output)), tokenizer, pairs)
    assert after > before + 0.5  # log p(chosen) - log p(rejected), summed over tokens


def test_dpo_resume_true_skips_a_cut_checkpoint_and_ends_where_an_uninterrupted_run_ends(tiny_model, tmp_path, loaded):
    """`poft dpo --resume_from_checkpoint true` takes the last complete checkpoint (a cut one after it, as a kill
    leaves, is skipped) and ends with the weights of a run that was never stopped."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "prefs.jsonl", text_rows(make_pairs()))
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    constant = {"lr_scheduler_type": "constant"}  # the stopped run's schedule does not depend on its max_steps
    assert main(["dpo", *dpo_flags(tiny_model, data, whole, **constant)]) == 0
    stop_at_2 = {"max_steps": 2, "save_strategy": "steps", "save_steps": 2}
    assert main(["dpo", *dpo_flags(tiny_model, data, stopped, **constant, **stop_at_2)]) == 0
    cut_checkpoint(stopped / "checkpoint-2", stopped / "checkpoint-3", "cut state")
    assert main(["dpo", *dpo_flags(tiny_model, data, stopped, **constant), "--resume_from_checkpoint", "true"]) == 0
    assert loaded == [str(stopped / "checkpoint-2")]
    resumed, uninterrupted = load_file(str(stopped / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, atol=1e-6, rtol=1e-5)


def test_bad_preference_data_is_one_readable_error(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi?", "completion": "Hello."}])
    with pytest.raises(DataError, match="sft.jsonl") as error:
        load_preference_dataset(sft)
    assert "prompt/chosen/rejected" in str(error.value) and "found: prompt, completion" in str(error.value)

    rows = text_rows(make_pairs(3))
    rows[1]["chosen"] = " "
    with pytest.raises(DataError, match=r"empty.jsonl: line 2: 'chosen' is empty"):
        load_preference_dataset(write_jsonl(tmp_path / "empty.jsonl", rows))
    rows[1] = ultrafeedback_rows(make_pairs(1))[0]
    with pytest.raises(DataError, match=r"mixed.jsonl: line 2: a chat pair, but earlier rows are text pairs"):
        load_preference_dataset(write_jsonl(tmp_path / "mixed.jsonl", rows))
    with pytest.raises(DataError, match="file not found"):
        load_preference_dataset(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("recipe", DPO_RECIPES)
def test_recipes_use_real_options(recipe):
    path = RECIPES / recipe
    options = {f.name for cls in (DPODataArguments, PoFTDPOConfig, ModelConfig) for f in dataclasses.fields(cls)}
    assert set(yaml.safe_load(path.read_text())) - options == set()
    data_args, training_args, model_args = TrlParser(
        (DPODataArguments, PoFTDPOConfig, ModelConfig)
    ).parse_args_and_config(["--config", str(path), "--bf16", "false"])
    assert data_args.dataset_train_split == "train_prefs" and training_args.beta == 0.01  # zephyr-7b-beta's
    assert model_args.model_name_or_path == "outputs/mistral-7b-poft-ultrachat"
