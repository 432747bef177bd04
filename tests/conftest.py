"""Shared fixtures: multi-turn conversations and two tiny models with different tokenizers and templates."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import Trainer

from poft.demo.builders import bpe_tokenizer, char_tokenizer, save_model, tiny_llama
from poft.schema import conversation_id
from tests.real_templates import tokenizer_for


@pytest.fixture
def loaded(monkeypatch) -> list[str]:
    """The checkpoints the Trainer loads weights from, in order."""
    seen: list[str] = []
    original = Trainer._load_from_checkpoint

    def record(self, resume_from_checkpoint, *args, **kwargs):
        seen.append(resume_from_checkpoint)
        return original(self, resume_from_checkpoint, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_load_from_checkpoint", record)
    return seen


def cut_checkpoint(complete: Path, target: Path, damage: str) -> Path:
    """A copy of `complete` as a kill or a full disk leaves it: trainer_state.json missing or cut off."""
    target.mkdir()
    for file in complete.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    optimizer = target / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    state = target / "trainer_state.json"
    if damage == "no state":
        state.unlink()
    else:
        state.write_text(state.read_text()[:40])
    return target


class SmallDisk:
    """A file system of the test's own, a tmpfs mounted at `path`, so that writers meet a real full or read-only disk
    (the kernel's ENOSPC and EROFS), not an exception a test raised."""

    def __init__(self, path: Path):
        self.path, self.filler = path, path / "filler"

    def fill(self, leave: int = 0) -> None:
        """Write a file until the disk is full, then give back about `leave` bytes of it."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, bytes(1 << 16))
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
        try:
            while True:  # the last pages: a 64 KiB write can fail where a smaller one fits
                os.write(fd, bytes(4096))
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
        os.ftruncate(fd, max(os.fstat(fd).st_size - leave, 0))
        os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self, read_only: bool = True) -> None:
        _mount("-o", f"remount,{'ro' if read_only else 'rw'}", str(self.path))


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=True, timeout=60)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    """A 32 MiB tmpfs of this test's own. Mounting needs root with CAP_SYS_ADMIN (a container's root may lack it);
    elsewhere the test is skipped, saying why."""
    path = tmp_path / "disk"
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command, so no file system of the test's own to fill or make read-only")
    try:
        _mount("-t", "tmpfs", "-o", "size=32m", "tmpfs", str(path))
    except subprocess.CalledProcessError as error:
        reason = (error.stderr.strip().splitlines() or ["mount failed"])[0]
        pytest.skip(f"cannot mount a tmpfs here ({reason}), so no disk to fill or make read-only")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def two_cpu_processes(*program: str, config_file: str | None = None) -> list[str]:
    """`program` (by default `-m poft.cli`) under accelerate with two CPU processes (gloo): the multi-process
    paths, tested without a GPU. `--main_process_port 0` is accelerate's own choice of a free port, taken by the
    launcher just before its rendezvous store binds it, so test suites running side by side on one machine do not
    collide on the default 29500 (nor on a port a test picked and let go before the launcher started). Run it
    with `tests.processes.run`, which ends the workers too. `config_file`: an accelerate config (FSDP, DeepSpeed)
    in place of plain data parallelism."""
    engine = ("--multi_gpu",) if config_file is None else ("--config_file", config_file)
    return [
        sys.executable,
        *("-m", "accelerate.commands.launch", *engine, "--num_processes", "2", "--num_machines", "1"),
        *("--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *(program or ("-m", "poft.cli")),
    ]


WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "pixel"]


def make_conversations(n: int = 16, seed: int = 0) -> list[list[dict]]:
    """Multi-turn chats, some with system turns, of varied lengths."""
    rng = random.Random(seed)
    conversations = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
        messages += [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
        for _ in range(i % 3):
            word = rng.choice(WORDS)
            messages += [
                {"role": "user", "content": f"Reverse {word}, please."},
                {"role": "assistant", "content": word[::-1] * rng.randint(1, 3)},
            ]
        conversations.append(messages)
    return conversations


def as_dataset(conversations: list[list[dict]], **columns) -> Dataset:
    return Dataset.from_dict(
        {"messages": conversations, "poft_id": [conversation_id(m) for m in conversations], **columns}
    )


def write_jsonl(path, conversations) -> str:
    with open(path, "w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def conversations() -> list[list[dict]]:
    return make_conversations()


@pytest.fixture(scope="session")
def base_tokenizer():
    """A byte-level BPE tokenizer without a template, for loading real models' templates into (`real_templates`)."""
    texts = [m["content"] for c in make_conversations(64, seed=1) for m in c]
    return bpe_tokenizer(
        texts + ["Two plus three is five.", "Now reverse the word apple, please."], vocab_size=360, chat_template=None
    )


@pytest.fixture(scope="session")
def template_models(base_tokenizer, tmp_path_factory) -> dict[str, str]:
    """Tiny models whose tokenizers carry real templates: Llama 3.1, Qwen 3 (empty reasoning blocks) and Gemma
    (rejects system turns)."""
    root = tmp_path_factory.mktemp("template_models")
    models = {}
    for seed, name in enumerate(("llama3_1", "qwen3", "gemma"), start=3):
        tokenizer = tokenizer_for(base_tokenizer, name)
        models[name] = str(save_model(tiny_llama(tokenizer, seed=seed), tokenizer, root / name))
    return models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """'chatml': char-level tokenizer, template with generation markers; 'zephyr': BPE, template without."""
    root = tmp_path_factory.mktemp("models")
    texts = [m["content"] for c in make_conversations(64, seed=1) for m in c]
    char_tok = char_tokenizer("".join(texts) + "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    bpe_tok = bpe_tokenizer(texts, vocab_size=320)
    return {
        "chatml": str(save_model(tiny_llama(char_tok, seed=1), char_tok, root / "chatml")),
        "zephyr": str(save_model(tiny_llama(bpe_tok, seed=2), bpe_tok, root / "zephyr")),
    }
