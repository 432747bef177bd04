"""What a new user meets on a first day with their own data and models: eval offline on their data, the options
recipes on the internet use, misspelt options, plain-text rows, one chat-template option, quiet logs, generation
bounded by the answers, scores made at another max_length."""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, get_scheduler

from poft.cli import main, parse
from poft.errors import OptionError
from poft.evaluation import LEADERBOARD_TASKS, EvalConfig, answer_token_bound, generate_responses
from poft.trainer import DEFAULT_OBJECTIVE, PoFTConfig, PoFTTrainer
from tests.conftest import as_dataset, make_conversations

ROOT = Path(__file__).parents[1]


def answer_rows(path: Path, n: int = 4) -> str:
    conversations = make_conversations(n, seed=7)
    path.write_text("".join(json.dumps({"messages": c, "answer": c[-1]["content"]}) + "\n" for c in conversations))
    return str(path)


# --------------------------------------------------------------------------- 1. poft eval --data, offline


def test_eval_with_data_and_no_tasks_evaluates_the_data_alone(tiny_models, tmp_path, monkeypatch):
    assert EvalConfig(model=["m"], data="qa.jsonl").tasks == []
    assert EvalConfig(model=["m"]).tasks == list(LEADERBOARD_TASKS)
    assert EvalConfig(model=["m"], data="qa.jsonl", tasks=["gsm8k:5"]).tasks == ["gsm8k:5"]

    def no_task(*args, **kwargs):
        raise AssertionError("no lm-eval task should run")

    monkeypatch.setattr("poft.evaluation.run_lm_eval", no_task)
    rows = answer_rows(tmp_path / "qa.jsonl")
    argv = ["eval", "--model", tiny_models["chatml"], "--data", rows, "--answer_column", "answer"]
    assert main([*argv, "--device", "cpu", "--output", str(tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "eval_results.json").read_text())["results"]
    assert list(results.values())[0].keys() == {"data:qa.jsonl"}


def test_data_results_are_written_before_a_task_that_cannot_download(tiny_models, tmp_path, monkeypatch, capsys):
    import lm_eval

    ran = []

    def offline(**kwargs):
        ran.append((tmp_path / "ev" / "eval_results.json").exists())
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    rows = answer_rows(tmp_path / "qa.jsonl")
    argv = ["eval", "--model", tiny_models["chatml"], "--data", rows, "--tasks", "arc_challenge:25"]
    assert main([*argv, "--device", "cpu", "--output", str(tmp_path / "ev")]) == 2
    assert ran == [True]  # the data's results were on disk when the task started
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "arc_challenge" in error[0]
    assert "--tasks none" in error[0] and "--task_dir" in error[0]
    results = json.loads((tmp_path / "ev" / "eval_results.json").read_text())["results"]
    assert 0 <= list(results.values())[0]["data:qa.jsonl"]["exact_match"] <= 1
    assert (tmp_path / "ev" / "eval_predictions.jsonl").read_text().count("\n") == 4


# --------------------------------------------------------------------------- 2. --warmup_ratio


def test_warmup_ratio_gives_the_schedule_of_a_fractional_warmup_steps(tmp_path):
    common = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path / "o")]
    common += ["--lr_scheduler_type", "cosine", "--learning_rate", "1e-3"]
    _, by_ratio, _ = parse("train", [*common, "--warmup_ratio", "0.1"])
    _, by_steps, _ = parse("train", [*common, "--warmup_steps", "0.1"])
    for total in (1, 7, 95, 1000):
        assert by_ratio.get_warmup_steps(total) == by_steps.get_warmup_steps(total) == math.ceil(0.1 * total)

    def schedule(args, total: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.get_warmup_steps(total), total)
        rates = []
        for _ in range(total):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return rates

    assert schedule(by_ratio, 40) == schedule(by_steps, 40)
    assert schedule(by_ratio, 40)[:5] == pytest.approx([1e-3 * k / 4 for k in range(4)] + [1e-3])
    _, dpo_args, _ = parse("dpo", ["--output_dir", str(tmp_path / "o"), "--warmup_ratio", "0.1"])
    assert dpo_args.warmup_steps == 0.1
    with pytest.raises(OptionError, match="both set the warmup"):
        parse("train", [*common, "--warmup_ratio", "0.1", "--warmup_steps", "5"])
    with pytest.raises(OptionError, match="0 <= ratio < 1"):
        parse("train", [*common, "--warmup_ratio", "1.5"])


# --------------------------------------------------------------------------- 3. misspelt options


@pytest.mark.parametrize(
    ("command", "given", "meant"),
    [
        ("train", "--learnig_rate", "--learning_rate"),
        ("train", "--num-train-epoks", "--num_train_epochs"),
        ("score", "--modle", "--model"),
        ("eval", "--max_new_tokns", "--max_new_tokens"),
        ("filter", "--top_fractoin", "--top_fraction"),
    ],
)
def test_a_misspelt_flag_is_one_line_naming_the_option_meant(command, given, meant, capsys):
    assert main([command, given, "1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"poft {command}: error: unknown option {given}: did you mean {meant}?"]


def test_a_misspelt_yaml_key_is_one_line_naming_the_key_meant(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\nlearnig_rate: 1.0e-3\n")
    assert main(["train", "--config", str(recipe)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"poft train: error: --config {recipe}: unknown key learnig_rate: did you mean learning_rate?"]
    assert main(["train", "--zzzz_qqqq", "1"]) == 2
    assert "`poft train --help` lists every option" in capsys.readouterr().err


# --------------------------------------------------------------------------- 6. one chat-template option


def test_chat_template_is_the_deprecated_alias_of_trls_chat_template_path(tmp_path, caplog):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    with caplog.at_level(logging.WARNING, logger="poft.trainer"):
        args = PoFTConfig(output_dir=str(tmp_path / "o"), chat_template=str(template))
    assert (args.chat_template_path, args.chat_template) == (str(template), None)
    assert "use TRL's --chat_template_path" in caplog.text
    with pytest.raises(OptionError, match="give only the latter"):
        PoFTConfig(output_dir=str(tmp_path / "o"), chat_template=str(template), chat_template_path=str(template))
    with pytest.raises(OptionError, match="no such file"):
        PoFTConfig(output_dir=str(tmp_path / "o"), chat_template_path=str(tmp_path / "missing.jinja"))


def test_recipes_name_trls_chat_template_option(monkeypatch):
    import yaml

    monkeypatch.chdir(ROOT)
    for recipe in sorted((ROOT / "recipes").glob("train-*.yaml")):
        assert "chat_template" not in yaml.safe_load(recipe.read_text()), recipe.name
    _, args, _ = parse("train", ["--config", "recipes/train-mistral-7b-base.yaml", "--bf16", "false"])
    assert Path(args.chat_template_path).read_text() == (ROOT / "recipes/templates/zephyr.jinja").read_text()


def test_chat_template_path_is_what_the_target_trains_and_is_saved_with(tiny_models, conversations, tmp_path):
    from poft.demo.builders import save_model, tiny_llama
    from tests.real_templates import ZEPHYR

    template = tmp_path / "zephyr.jinja"
    template.write_text(ZEPHYR)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["zephyr"])
    tokenizer.chat_template = None
    base = str(save_model(tiny_llama(tokenizer, seed=7), tokenizer, tmp_path / "base"))
    args = PoFTConfig(
        output_dir=str(tmp_path / "out"), objective="sft", chat_template_path=str(template), max_steps=1,
        report_to=[], save_strategy="no", activation_checkpointing=False, max_length=256,
    )  # fmt: skip
    trainer = PoFTTrainer(base, args=args, train_dataset=as_dataset(conversations))
    assert trainer.processing_class.chat_template == ZEPHYR
    from poft.chat import ConversationEncoder

    expected = ConversationEncoder(tokenizer, fallback_template=str(template), max_length=256)
    assert trainer.train_dataset[0]["input_ids"] == expected.encode(conversations[0]).input_ids


# --------------------------------------------------------------------------- 7. quiet logs


def test_cpu_training_pins_no_memory_and_draws_no_bars_into_a_log(tiny_models, conversations, tmp_path, monkeypatch):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    args = PoFTConfig(
        output_dir=str(tmp_path / "out"), objective="sft", max_steps=2, logging_steps=1, report_to=[],
        save_strategy="no", activation_checkpointing=False, max_length=256, per_device_train_batch_size=4,
    )  # fmt: skip
    assert args.dataloader_pin_memory is False and args.disable_tqdm is True
    trainer = PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=as_dataset(conversations))
    kinds = {type(c) for c in trainer.callback_handler.callbacks}
    assert PrinterCallback in kinds and ProgressCallback not in kinds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    kept = PoFTConfig(output_dir=str(tmp_path / "o"), disable_tqdm=False, report_to=[])
    assert kept.disable_tqdm is False  # the user's choice stands


# --------------------------------------------------------------------------- 8. generation bounded by the answers


def test_max_new_tokens_follows_the_longest_answer(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["zephyr"])
    answers = ["4", "elppa", "41 plus 19 is 60, and that is the whole answer to the question asked."]
    longest = max(len(tokenizer.encode(a, add_special_tokens=False)) for a in answers)
    assert answer_token_bound(tokenizer, answers) == longest + max(8, math.ceil(longest / 4))
    many = " ".join(make_conversations(1, seed=0)[0][-1]["content"] for _ in range(20))
    n = len(tokenizer.encode(many, add_special_tokens=False))
    assert n > 32 and answer_token_bound(tokenizer, [many]) == n + math.ceil(n / 4)


def test_generation_stops_at_the_templates_end_of_turn(base_tokenizer, tmp_path):
    """A ChatML template closes turns with <|im_end|> while eos is </s>: a model that answers <|im_end|> at once
    generates one token per prompt, not max_new_tokens."""
    import copy

    from poft.demo.builders import tiny_llama
    from tests.real_templates import CHATML_YI

    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer.add_special_tokens({"eos_token": "</s>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_YI
    closing = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert closing != tokenizer.eos_token_id
    model = tiny_llama(tokenizer, seed=3).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[closing] = 1e4
    model.lm_head = head
    steps = []
    model.model.register_forward_hook(lambda *_: steps.append(1))
    prompts = [c[:-1] for c in make_conversations(3, seed=4)]
    assert generate_responses(model, tokenizer, prompts, max_new_tokens=20, batch_size=3) == ["", "", ""]
    assert len(steps) == 1


# --------------------------------------------------------------------------- 5. plain text, objective sft


def text_rows(path: Path) -> str:
    texts = [m["content"] for c in make_conversations(12, seed=5) for m in c][:24]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_plain_text_trains_with_objective_sft_as_trls_sfttrainer(tiny_models, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from poft.data import load_sft_dataset

    data = load_sft_dataset(text_rows(tmp_path / "text.jsonl"), text_field="text")
    assert data.column_names == ["text"] and len(data) == 24
    options = {
        "max_steps": 1, "report_to": [], "save_strategy": "no", "activation_checkpointing": False,
        "max_length": 8, "per_device_train_batch_size": 8, "seed": 0, "shuffle_dataset": False,
    }  # fmt: skip
    poft = PoFTTrainer(
        tiny_models["zephyr"], args=PoFTConfig(output_dir=str(tmp_path / "p"), objective="sft", **options),
        train_dataset=data,
    )  # fmt: skip
    trl = SFTTrainer(
        tiny_models["zephyr"], args=SFTConfig(output_dir=str(tmp_path / "t"), bf16=False, **options),
        train_dataset=data,
    )  # fmt: skip
    assert poft.train_dataset["input_ids"] == trl.train_dataset["input_ids"]
    assert max(map(len, poft.train_dataset["input_ids"])) == 8  # truncated to max_length, as TRL does
    rows = [poft.train_dataset[i] for i in range(8)]
    with torch.no_grad():
        ours = poft.compute_loss(poft.model, poft.data_collator(rows))
        theirs = trl.compute_loss(trl.model, trl.data_collator([trl.train_dataset[i] for i in range(8)]))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_plain_text_from_the_command_line_and_poft_on_it_is_one_line(tiny_models, tmp_path, capsys):
    rows = text_rows(tmp_path / "text.jsonl")
    argv = ["train", "--model_name_or_path", tiny_models["chatml"], "--dataset_name", rows, "--max_steps", "1"]
    argv += ["--report_to", "none", "--save_strategy", "no", "--activation_checkpointing", "false"]
    assert main([*argv, "--objective", "sft", "--output_dir", str(tmp_path / "sft")]) == 0
    assert (tmp_path / "sft" / "model.safetensors").exists()
    assert main([*argv, "--objective", "poft_token", "--output_dir", str(tmp_path / "poft")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "plain text" in error[0] and "objective='sft'" in error[0]


# --------------------------------------------------------------------------- 10. the headline is the measured run


def test_the_readmes_headline_is_the_recorded_make_demo_run():
    """The README quotes the `make demo` run recorded in bench/RESULTS.md (measured on the committed code), not a
    grid run: both are updated together when the demo changes."""
    root = Path(__file__).resolve().parents[1]
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    results = (root / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    section = results.split("## `make demo` (CPU)", 1)[1].split("\n## ", 1)[0]
    sft = re.search(r"seed0-sft-lr0\.001: test ([\d.]+)%", section).group(1)
    poft = re.search(rf"seed0-{DEFAULT_OBJECTIVE}-lr0\.001: test ([\d.]+)%", section).group(1)
    row = re.search(
        rf"\| {DEFAULT_OBJECTIVE} - sft \| 1 \| ([+-][\d.]+) \| - \| \[([+-][\d.]+), ([+-][\d.]+)\]", section
    )
    wall = re.search(r"# (\d+ min \d+ s) wall", section).group(1)
    assert f"it prints {poft}% exact match" in readme and f"against {sft}% for SFT" in readme
    assert f"{row.group(1)} points, 95% bootstrap interval over the prompts [{row.group(2)}, {row.group(3)}]" in readme
    assert f"it takes {wall}" in readme
