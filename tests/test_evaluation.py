"""poft eval: greedy exact match against a hand-written decoding loop, lm-eval on a local task against
log-likelihoods computed by hand, and the command line's files and errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft.cli import main
from poft.evaluation import EvalConfig, exact_match_accuracy, generate_responses, run_lm_eval
from tests.conftest import as_dataset, make_conversations


@pytest.fixture(scope="module")
def chatml(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]).eval(), AutoTokenizer.from_pretrained(
        tiny_models["chatml"]
    )


def greedy_by_hand(model, tokenizer, messages, steps: int) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_generation_and_exact_match(chatml):
    model, tokenizer = chatml
    conversations = make_conversations(6, seed=2)
    prompts = [list(c[:-1]) for c in conversations]
    predictions = generate_responses(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    assert predictions == [greedy_by_hand(model, tokenizer, p, 8) for p in prompts]
    answers = [p if i % 2 else "never this" for i, p in enumerate(predictions)]
    accuracy, got = exact_match_accuracy(model, tokenizer, as_dataset(conversations, answer=answers), max_new_tokens=8)
    assert got == predictions and accuracy == 0.5
    with pytest.raises(ValueError, match="no 'answer' column"):
        exact_match_accuracy(model, tokenizer, as_dataset(conversations))


TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""

DOCS = [
    {"question": "What is 2 plus 2?", "choices": [" 4", " 5", " 22"], "label": 0},
    {"question": "Reverse abc.", "choices": [" cba", " abc"], "label": 0},
    {"question": "Upper-case: tiger", "choices": [" tiger", " TIGER"], "label": 1},
    {"question": "What is 9 minus 3?", "choices": [" 6", " 12", " 3"], "label": 0},
]


def test_lm_eval_local_task_matches_loglikelihoods_by_hand(chatml, tmp_path):
    model, tokenizer = chatml
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=data))
    scores = run_lm_eval(
        model, tokenizer, ["tiny_choice:0"], EvalConfig(model=["m"], task_dir=str(tmp_path / "tasks"), batch_size=2)
    )
    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            totals = []
            for choice in doc["choices"]:
                continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
                logits = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
                totals.append(sum(logits[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)))
            correct += int(max(range(len(totals)), key=totals.__getitem__) == doc["label"])
    assert scores["tiny_choice"]["acc"] == pytest.approx(correct / len(DOCS))
    with pytest.raises(ValueError, match="Unknown lm-eval task.*--task_dir"):
        run_lm_eval(model, tokenizer, ["no_such_task"], EvalConfig(model=["m"]))


def test_cli_compares_models_on_answer_data(tiny_models, tmp_path, capsys):
    conversations = make_conversations(5, seed=7)
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"messages": c, "answer": c[-1]["content"]}) + "\n" for c in conversations))
    code = main(
        [
            "eval",
            "--model",
            f"a={tiny_models['chatml']}",
            "--model",
            f"b={tiny_models['chatml']}",
            "--tasks",
            "none",
            "--data",
            str(rows),
            "--max_new_tokens",
            "4",
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "ev"),
        ]
    )
    assert code == 0
    payload = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert set(payload["results"]) == {"a", "b"}
    metrics = payload["results"]["a"]["data:qa.jsonl"]
    assert 0 <= metrics["exact_match"] <= 1 and metrics["response_log_likelihood"] < 0
    assert payload["results"]["a"] == payload["results"]["b"]
    table = (tmp_path / "ev" / "eval_table.md").read_text()
    assert "| data:qa.jsonl | exact_match |" in table and capsys.readouterr().out == table  # the command prints it
    assert main(["eval", "--model", tiny_models["chatml"], "--tasks", "none"]) == 2
    assert "Nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NAME:FEWSHOT"):
        EvalConfig(model=["m"], tasks=["arc:x"])


def test_eval_writes_every_prediction_and_logs_examples(chatml, tiny_models, tmp_path, caplog):
    conversations = make_conversations(4, seed=8)
    answers = [c[-1]["content"] for c in conversations]
    model, tokenizer = chatml
    expected = [greedy_by_hand(model, tokenizer, c[:-1], 3) for c in conversations]
    answers[1] = expected[1].strip()  # one row the model gets right
    answers[2] = expected[2].strip()[:1] or "x"  # one whose answer sits inside a longer generation
    rows = tmp_path / "qa.jsonl"
    rows.write_text(
        "".join(json.dumps({"messages": c, "answer": a}) + "\n" for c, a in zip(conversations, answers, strict=True))
    )
    argv = ["eval", "--model", f"m={tiny_models['chatml']}", "--tasks", "none", "--data", str(rows)]
    with caplog.at_level(logging.INFO, logger="poft"):
        assert main([*argv, "--max_new_tokens", "3", "--device", "cpu", "--output", str(tmp_path / "ev")]) == 0
    lines = (tmp_path / "ev" / "eval_predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert [p["row"] for p in predictions] == [1, 2, 3, 4] and {p["model"] for p in predictions} == {"m"}
    for p, c, a, e in zip(predictions, conversations, answers, expected, strict=True):
        assert p["prompt"] == c[:-1] and p["generation"] == e and p["answer"] == a
        assert p["verdict"] == ("correct" if e.strip() == a.strip() else "wrong")
    assert predictions[1]["verdict"] == "correct"
    accuracy = json.loads((tmp_path / "ev" / "eval_results.json").read_text())["results"]["m"]["data:qa.jsonl"]
    assert accuracy["exact_match"] == sum(p["verdict"] == "correct" for p in predictions) / 4
    assert f"m, row 1: {conversations[0][-2]['content']} -> {expected[0]!r}" in caplog.text
    assert "row 4:" not in caplog.text  # a few examples, not every row
    if predictions[2]["verdict"] == "wrong":
        assert "wrong generations contain the answer within longer text" in caplog.text


@pytest.mark.parametrize("name", ["llama3_1", "qwen3", "gemma"])
def test_prompts_render_as_scoring_and_training_read_the_conversation(template_models, name):
    """The prompt a model completes is the start of the conversation as `encode` renders it (the same system-turn
    policy: Gemma's template rejects system turns, so both merge them), up to where the response begins."""
    from poft.chat import ConversationEncoder

    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(template_models[name]))
    for conversation in make_conversations(4, seed=3):
        conversation = [{"role": "system", "content": "Answer briefly."}, *conversation]
        prompt = encoder.render_prompt(conversation[:-1])
        full = encoder.render(encoder.prepare(conversation))
        assert full.startswith(prompt)
        assert conversation[-1]["content"] in full[len(prompt) :]


def test_eval_loads_safetensors_weights_only(tiny_models, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    pickled = shutil.copytree(tiny_models["chatml"], tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    rows = tmp_path / "qa.jsonl"
    rows.write_text(json.dumps({"messages": make_conversations(1)[0], "answer": "x"}) + "\n")
    args = ["eval", "--model", str(pickled), "--tasks", "none", "--data", str(rows), "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "ev")]) == 2
    assert "safetensors" in capsys.readouterr().err
