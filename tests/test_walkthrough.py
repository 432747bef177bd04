"""The README's walkthrough, run as written: every `poft` line of its marked block, in order, in a folder holding
models of a user's own (tiny, each with its own tokenizer and chat template) under the names the README uses.
A README command that stops working fails here."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from poft.cli import main
from tests.conftest import make_conversations

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- walkthrough: tests/test_walkthrough.py runs this block -->"


def walkthrough() -> list[list[str]]:
    """The commands of the README block after MARK, comments dropped."""
    block = README.read_text(encoding="utf-8").split(MARK, 1)[1]
    body = block.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in body.splitlines() if line.strip()]


def test_the_readme_walkthrough_runs_as_written(tiny_models, template_models, tmp_path, monkeypatch):
    commands = walkthrough()
    assert [c[:2] for c in commands] == [
        ["poft", "noise"], ["poft", "score"], ["poft", "filter"], ["poft", "train"], ["poft", "train"],
        ["poft", "train"], ["poft", "eval"], ["poft", "report"],
    ]  # fmt: skip
    for name, source in {
        "my-ref-a": tiny_models["chatml"], "my-ref-b": tiny_models["zephyr"], "my-base": template_models["qwen3"]
    }.items():  # fmt: skip
        shutil.copytree(source, tmp_path / name)
    with open(tmp_path / "chats.jsonl", "w", encoding="utf-8") as f:
        for messages in make_conversations(16, seed=5):
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(tmp_path / "heldout.jsonl", "w", encoding="utf-8") as f:
        for messages in make_conversations(6, seed=6):
            turns = [m for m in messages if m["role"] != "system"][:2]
            f.write(json.dumps({"messages": turns, "answer": turns[1]["content"]}) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POFT_CACHE", str(tmp_path / "cache"))
    for command in commands:
        assert main(command[1:]) == 0, shlex.join(command)

    noised = json.loads((tmp_path / "noisy" / "poft_output.json").read_text())
    assert noised["stage"] == "noise"
    results = json.loads((tmp_path / "poft-eval" / "eval_results.json").read_text())
    assert len(results["models"]) == 3
    report = (tmp_path / "poft-report" / "report.md").read_text(encoding="utf-8")
    assert (tmp_path / "poft-report" / "report.html").is_file()
    # 16 rows, batch 8, 3 epochs: 6 steps, under TRL's logging_steps of 10, so the report says why no curve is drawn
    assert "poft, sft logged no training step" in report
    for run in ("poft", "sft", "top70-sft"):
        assert (tmp_path / "runs" / run / "model.safetensors").is_file(), run
