"""A training run survives what real runs meet: a kill, a full disk while checkpointing, and resuming after either.

Each test runs `poft train` as a user does (`poft.cli.main`, or a subprocess where the run must be killed) on
conftest's tiny model, and checks the outcome against a run that was not interrupted or against the files left.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

import poft
from poft.cli import main, parse
from poft.errors import OptionError
from poft.runtime import resume_checkpoint, save_error
from poft.trainer import DEFAULT_OBJECTIVE, PoFTConfig
from tests.conftest import cut_checkpoint, make_conversations

STEPS_PER_EPOCH = 4  # 16 conversations in batches of 4


def error_lines(capsys) -> list[str]:
    return re.findall(r"poft \w+: error: .*", capsys.readouterr().err)


@pytest.fixture(scope="module")
def scored_data(tmp_path_factory) -> str:
    """16 conversations with made-up reference scores: enough for PoFT to train on, 4 steps per epoch."""
    path = tmp_path_factory.mktemp("data") / "scored.jsonl"
    rows = [
        {"messages": m, "ref_score": -1.0 - 0.1 * i, "ref_entropy": 1.0 + 0.05 * i}
        for i, m in enumerate(make_conversations(16))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def train_argv(data: str, model: str, output: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        *("train", "--dataset_name", data, "--model_name_or_path", model, "--output_dir", str(output)),
        *("--max_steps", str(max_steps), "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"),
        *("--logging_steps", "1", "--max_length", "256", "--activation_checkpointing", "false"),
        *("--report_to", "none", "--seed", "0", "--use_cpu", "true"),
        *extra,
    ]


# --------------------------------------------------------------------------- --resume_from_checkpoint


def test_resume_true_loads_the_last_complete_checkpoint(tiny_models, scored_data, tmp_path, loaded):
    run = tmp_path / "run"
    assert main(train_argv(scored_data, tiny_models["chatml"], run, 2, "--save_steps", "1")) == 0
    for value in ("true", "True", "1"):
        loaded.clear()
        argv = train_argv(scored_data, tiny_models["chatml"], run, 3, "--save_strategy", "no")
        assert main([*argv, "--resume_from_checkpoint", value]) == 0
        assert loaded == [str(run / "checkpoint-2")]


def test_resume_true_without_a_checkpoint_starts_fresh_with_a_warning(
    tiny_models, scored_data, tmp_path, loaded, caplog
):
    run = tmp_path / "run"
    argv = train_argv(scored_data, tiny_models["chatml"], run, 1, "--save_strategy", "no")
    with caplog.at_level(logging.WARNING, logger="poft.runtime"):
        assert main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert loaded == []
    assert (
        f"--resume_from_checkpoint true: no complete checkpoint in --output_dir {run}, so training starts from the "
        "beginning." in caplog.text
    )
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 1


def test_resume_from_a_path_and_what_false_means(tiny_models, scored_data, tmp_path, loaded):
    run = tmp_path / "run"
    assert main(train_argv(scored_data, tiny_models["chatml"], run, 2, "--save_steps", "1")) == 0
    first = str(run / "checkpoint-1")
    assert resume_checkpoint(first, str(run)) == first
    for fresh in (None, False, "false", "False", "none", "0", ""):
        assert resume_checkpoint(fresh, str(run)) is None
    argv = train_argv(scored_data, tiny_models["chatml"], run, 2, "--save_strategy", "no")
    assert main([*argv, "--resume_from_checkpoint", first]) == 0
    assert loaded == [first]


@pytest.mark.parametrize("damage", ["no state", "cut state"])
def test_a_half_written_checkpoint_is_never_resumed_from(tiny_models, scored_data, tmp_path, capsys, caplog, damage):
    run = tmp_path / "run"
    assert main(train_argv(scored_data, tiny_models["chatml"], run, 2, "--save_steps", "2")) == 0
    half = cut_checkpoint(run / "checkpoint-2", run / "checkpoint-3", damage)
    with caplog.at_level(logging.WARNING, logger="poft.runtime"):
        assert resume_checkpoint("true", str(run)) == str(run / "checkpoint-2")
    assert f"{half} is incomplete (no readable trainer_state.json" in caplog.text
    assert main(train_argv(scored_data, tiny_models["chatml"], run, 3, "--resume_from_checkpoint", str(half))) == 2
    assert error_lines(capsys) == [
        f"poft train: error: --resume_from_checkpoint {half} is not a complete checkpoint (no readable "
        "trainer_state.json, which the trainer writes last). Give another checkpoint-N folder, or true for the last "
        "complete one in --output_dir."
    ]


@pytest.mark.parametrize("checkpoints", ["a cut one after a complete one", "none"])
def test_poft_trainer_resume_true_from_python_means_what_the_flag_means(
    tiny_models, scored_data, tmp_path, loaded, caplog, checkpoints
):
    """PoFTTrainer.train(resume_from_checkpoint=True) skips a cut checkpoint as the CLI does (transformers would
    load the newest folder), and starts fresh with a warning where there is none (transformers would raise)."""
    from poft.data import load_sft_dataset
    from poft.trainer import PoFTTrainer

    run = tmp_path / "run"
    expected = []
    if checkpoints != "none":
        assert main(train_argv(scored_data, tiny_models["chatml"], run, 2, "--save_steps", "2")) == 0
        cut_checkpoint(run / "checkpoint-2", run / "checkpoint-3", "cut state")
        expected = [str(run / "checkpoint-2")]
    args = PoFTConfig(
        output_dir=str(run),
        max_steps=3,
        per_device_train_batch_size=4,
        max_length=256,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        activation_checkpointing=False,
    )
    trainer = PoFTTrainer(tiny_models["chatml"], args=args, train_dataset=load_sft_dataset(scored_data))
    with caplog.at_level(logging.WARNING, logger="poft.runtime"):
        assert trainer.train(resume_from_checkpoint=True).global_step == 3
    assert loaded == expected
    if checkpoints == "none":
        assert "no complete checkpoint in --output_dir" in caplog.text


def test_resume_from_a_missing_folder_is_one_line(tiny_models, scored_data, tmp_path, capsys):
    missing = tmp_path / "run" / "checkpoint-7"
    argv = train_argv(
        scored_data, tiny_models["chatml"], tmp_path / "run", 1, "--resume_from_checkpoint", str(missing)
    )
    assert main(argv) == 2
    assert error_lines(capsys) == [
        f"poft train: error: --resume_from_checkpoint {missing}: no such folder. Give a checkpoint-N folder of an "
        "earlier run, or true for the last complete one in --output_dir."
    ]


# --------------------------------------------------------------------------- a kill, then resuming

KILLED_RUN = """
import io, os, signal, sys
import torch
from transformers import Trainer
from poft.cli import main

kill_at, where = int(sys.argv[1]), sys.argv[2]
real_save, real_checkpoint = torch.save, Trainer._save_checkpoint

def save(obj, f, *args, **kwargs):
    if where == "inside" and str(f).endswith(os.path.join(f"checkpoint-{kill_at}", "optimizer.pt")):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: buffer.tell() // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

def save_checkpoint(self, *args, **kwargs):
    real_checkpoint(self, *args, **kwargs)
    if where == "after" and self.state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

torch.save, Trainer._save_checkpoint = save, save_checkpoint
sys.exit(main(sys.argv[3:]))
"""


def logged_losses(run: Path) -> list[tuple[int, float]]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, scored_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(train_argv(scored_data, tiny_models["chatml"], run, 6, "--save_steps", "2")) == 0
    return run


@pytest.mark.parametrize(
    ("where", "resumed_from"),
    [("after", "checkpoint-4"), ("inside", "checkpoint-2")],
    ids=["killed-after-checkpoint-4", "killed-while-writing-checkpoint-4"],
)
def test_a_killed_run_resumes_exactly(tiny_models, scored_data, uninterrupted, tmp_path, loaded, where, resumed_from):
    """SIGKILL after checkpoint-4 is written, or while its optimizer.pt is half written; `--resume_from_checkpoint
    true` then ends with the uninterrupted run's weights and logged losses (steps cross an epoch boundary)."""
    run = tmp_path / "run"
    argv = train_argv(scored_data, tiny_models["chatml"], run, 6, "--save_steps", "2")
    source = str(Path(poft.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, "4", where, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "model.safetensors").exists()  # the run did not finish
    half = run / "checkpoint-4"
    assert (half / "trainer_state.json").exists() == (where == "after")
    assert main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert loaded == [str(run / resumed_from)]
    expected, resumed = load_file(uninterrupted / "model.safetensors"), load_file(run / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.allclose(resumed[name], tensor, rtol=0, atol=1e-6), name
    assert logged_losses(run) == logged_losses(uninterrupted)
    assert [step for step, _ in logged_losses(run)] == list(range(1, 7))


# --------------------------------------------------------------------------- a full disk while checkpointing


def real_full_disk_error() -> RuntimeError:
    """What torch.save raises on a full disk (its C++ writer reports no errno): a write to /dev/full."""
    try:
        torch.save({"weights": torch.zeros(4096)}, "/dev/full")
    except RuntimeError as error:
        return error
    raise AssertionError("torch.save to /dev/full succeeded")


def real_torch_error(path: str) -> RuntimeError:
    try:
        torch.save({"weights": torch.zeros(4)}, path)
    except RuntimeError as error:
        return error
    raise AssertionError(f"torch.save to {path} succeeded")


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@needs_dev_full
def test_full_disk_in_torch_save_is_one_line_and_leaves_no_half_checkpoint(
    tiny_models, scored_data, tmp_path, monkeypatch, capsys
):
    real_save = torch.save

    def fill_the_disk(obj, f, *args, **kwargs):
        """Write half of checkpoint-2's optimizer.pt, then fail as torch.save does on a full disk."""
        if str(f).endswith(os.path.join("checkpoint-2", "optimizer.pt")):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            Path(f).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
            real_save(obj, "/dev/full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_the_disk)
    run = tmp_path / "run"
    assert main(train_argv(scored_data, tiny_models["chatml"], run, 3, "--save_steps", "1")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = re.findall(r"poft \w+: error: .*", err)
    assert len(lines) == 1
    assert re.fullmatch(
        re.escape(
            f"poft train: error: cannot write checkpoints or the model to {run}: torch.save stopped part-way with "
        )
        + r"\d+\.\d MiB"
        + re.escape(
            " left on that disk (full, or over quota). Free space or pick a writable location, then rerun. Complete "
            f"checkpoints in {run} are kept: resume with --resume_from_checkpoint true."
        ),
        lines[0],
    )
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert resume_checkpoint("true", str(run)) == str(run / "checkpoint-1")


@needs_dev_full
def test_save_errors_of_every_writer_are_recognised(tmp_path):
    what = f"checkpoints or the model to {tmp_path}"
    fix = "Free space or pick a writable location, then rerun."
    oserror = save_error(OSError(28, "No space left on device"), what, str(tmp_path))
    assert str(oserror) == f"cannot write {what}: the disk is full (Errno 28). {fix}"
    # safetensors' own wording for model.safetensors on a full disk
    safetensors = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(save_error(safetensors, what, str(tmp_path))) == str(oserror)
    quota = SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert (
        str(save_error(quota, what, str(tmp_path)))
        == f"cannot write {what}: the disk quota is exceeded (Errno 122). {fix}"
    )
    torch_error = save_error(real_full_disk_error(), what, str(tmp_path))
    assert str(torch_error).startswith(f"cannot write {what}: torch.save stopped part-way with ")
    # torch.save that cannot open its file names the system's reason: sysfs refuses new files even to root
    assert str(save_error(real_torch_error("/sys/poft.pt"), what, str(tmp_path))) == (
        f"cannot write {what}: permission denied (Errno 13). {fix}"
    )
    assert save_error(real_torch_error("/proc/poft.pt"), what, str(tmp_path)) is None  # no such folder: not the disk
    for unrelated in (RuntimeError("CUDA out of memory"), ValueError("bad"), SafetensorError("invalid header")):
        assert save_error(unrelated, what, str(tmp_path)) is None


def test_a_disk_that_fills_up_while_a_checkpoint_is_written(tiny_models, scored_data, small_disk, monkeypatch, capsys):
    """checkpoint-2's weights are written, then the run's disk (a tmpfs of its own) fills up: torch.save meets the
    kernel's ENOSPC part-way through the optimizer's state. One line, exit 2, checkpoint-2 removed, checkpoint-1
    kept whole."""
    from transformers import Trainer

    real_save = Trainer._save_optimizer_and_scheduler

    def fill_midway(self, output_dir):
        if os.path.basename(output_dir) == "checkpoint-2":
            small_disk.fill()
        return real_save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", fill_midway)
    run = small_disk.path / "run"
    assert main(train_argv(scored_data, tiny_models["chatml"], run, 3, "--save_steps", "1")) == 2
    assert error_lines(capsys) == [
        f"poft train: error: cannot write checkpoints or the model to {run}: torch.save stopped part-way with 0.0 MiB "
        "left on that disk (full, or over quota). Free space or pick a writable location, then rerun. Complete "
        f"checkpoints in {run} are kept: resume with --resume_from_checkpoint true."
    ]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert resume_checkpoint("true", str(run)) == str(run / "checkpoint-1")


def test_full_disk_while_the_final_model_is_written(tiny_models, scored_data, small_disk, monkeypatch, capsys, loaded):
    """The run's disk (a tmpfs of its own) fills up after the last step, so the final save meets the kernel's ENOSPC
    in safetensors' writer: one line, exit 2, every checkpoint kept whole; with space freed, `--resume_from_checkpoint
    true` saves the weights the run trained."""
    from poft.trainer import PoFTTrainer

    real_train = PoFTTrainer.train

    def train_then_fill_the_disk(self, *args, **kwargs):
        result = real_train(self, *args, **kwargs)
        small_disk.fill(leave=64 << 10)  # room for config.json, not for the weights
        return result

    monkeypatch.setattr(PoFTTrainer, "train", train_then_fill_the_disk)
    run = small_disk.path / "run"
    argv = train_argv(scored_data, tiny_models["chatml"], run, 2, "--save_steps", "1")
    assert main(argv) == 2
    assert error_lines(capsys) == [
        f"poft train: error: cannot write checkpoints or the model to {run}: the disk is full (Errno 28). Free space "
        f"or pick a writable location, then rerun. Complete checkpoints in {run} are kept: resume with "
        "--resume_from_checkpoint true."
    ]
    assert not (run / "model.safetensors").exists()
    assert resume_checkpoint("true", str(run)) == str(run / "checkpoint-2")
    monkeypatch.setattr(PoFTTrainer, "train", real_train)
    small_disk.free()
    assert main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert loaded == [str(run / "checkpoint-2")]
    trained, saved = load_file(run / "checkpoint-2" / "model.safetensors"), load_file(run / "model.safetensors")
    assert trained.keys() == saved.keys() and all(torch.equal(saved[k], t) for k, t in trained.items())


@pytest.fixture
def read_only_switch(request, tmp_path) -> tuple[Path, Callable[[Path], None]]:
    """A folder to train into, and how to make a checkpoint folder in it read-only for real: as root (whom mode bits
    do not stop), by remounting a tmpfs of the test's own read-only (EROFS); as any other user, by the folder's mode
    bits (EACCES)."""
    if os.geteuid() == 0:
        disk = request.getfixturevalue("small_disk")
        return disk.path, lambda checkpoint: disk.read_only()
    folder, changed = tmp_path / "disk", []
    folder.mkdir()

    def forbid(checkpoint: Path) -> None:
        checkpoint.chmod(0o555)
        changed.append(checkpoint)

    request.addfinalizer(lambda: [path.chmod(0o755) for path in changed])
    return folder, forbid


def test_read_only_disk_while_a_checkpoint_is_written(
    tiny_models, scored_data, read_only_switch, monkeypatch, capsys, caplog
):
    """checkpoint-2's weights are written, then its disk turns read-only before the optimizer's state is: torch.save
    meets the system's EROFS (or EACCES). One line, exit 2; checkpoint-1 kept whole; checkpoint-2, which a read-only
    disk does not let poft remove, is named in the line and skipped by `--resume_from_checkpoint true`."""
    from transformers import Trainer

    folder, make_read_only = read_only_switch
    real_save = Trainer._save_optimizer_and_scheduler

    def read_only_midway(self, output_dir):
        if os.path.basename(output_dir) == "checkpoint-2":
            make_read_only(Path(output_dir))
        return real_save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", read_only_midway)
    run = folder / "run"
    assert main(train_argv(scored_data, tiny_models["chatml"], run, 3, "--save_steps", "1")) == 2
    reason = "the file system is read-only (Errno 30)" if os.geteuid() == 0 else "permission denied (Errno 13)"
    assert error_lines(capsys) == [
        f"poft train: error: cannot write checkpoints or the model to {run}: {reason}. Free space or pick a writable "
        f"location, then rerun. Complete checkpoints in {run} are kept: resume with --resume_from_checkpoint true, "
        "which skips the unfinished checkpoint-2 (it could not be removed)."
    ]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    half = run / "checkpoint-2"
    assert (half / "model.safetensors").exists() and not (half / "optimizer.pt").exists()
    with caplog.at_level(logging.WARNING, logger="poft.runtime"):
        assert resume_checkpoint("true", str(run)) == str(run / "checkpoint-1")
    assert f"{half} is incomplete" in caplog.text


# --------------------------------------------------------------------------- options that contradict each other


@pytest.mark.parametrize("objective", ["poft_token", "poft", "sft_norm"])
@pytest.mark.parametrize("source", ["flags", "yaml", "python"])
def test_an_explicit_objective_contradicted_by_a_legacy_loss_type_is_refused(tmp_path, capsys, objective, source):
    legacy = "sft" if objective != "sft" else "poft"
    expected = (
        f"loss_type={legacy!r} (poft's former spelling of the objective) contradicts objective={objective!r}. "
        "Set only --objective."
    )
    if source == "python":
        with pytest.raises(OptionError) as error:
            PoFTConfig(output_dir=str(tmp_path / "o"), objective=objective, loss_type=legacy)
        assert str(error.value) == expected
        return
    argv = ["train", "--dataset_name", "d.jsonl", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "o")]
    if source == "flags":
        argv += ["--objective", objective, "--loss_type", legacy]
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"objective: {objective}\nloss_type: {legacy}\n")
        argv += ["--config", str(recipe)]
    assert main(argv) == 2
    assert error_lines(capsys) == [f"poft train: error: {expected}"]


def test_objective_defaults_and_agreeing_legacy_spellings(tmp_path):
    out = str(tmp_path / "o")
    assert PoFTConfig(output_dir=out).objective == DEFAULT_OBJECTIVE == "poft_calibrated"
    assert PoFTConfig(output_dir=out, loss_type="sft").objective == "sft"
    assert PoFTConfig(output_dir=out, objective="poft", loss_type="poft").objective == "poft"
    common = ["--dataset_name", "d", "--model_name_or_path", "m", "--output_dir", out]
    assert parse("train", common)[1].objective == DEFAULT_OBJECTIVE
    assert parse("train", [*common, "--loss_type", "sft_norm"])[1].objective == "sft_norm"


def test_4bit_and_8bit_together_name_both_and_the_fix(tmp_path, capsys):
    argv = ["--dataset_name", "d", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "o")]
    for command in ("train", "dpo"):
        assert main([command, *argv, "--load_in_4bit", "true", "--load_in_8bit", "true", "--use_peft", "true"]) == 2
        assert error_lines(capsys) == [
            f"poft {command}: error: --load_in_4bit and --load_in_8bit are both set; choose one (4-bit is QLoRA's "
            "usual choice)."
        ]


# --------------------------------------------------------------------------- quickstart


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_quickstart_refuses_no_steps(tmp_path, capsys, steps):
    assert main(["quickstart", "--output", str(tmp_path / "q"), "--max_steps", steps]) == 2
    assert error_lines(capsys) == [
        f"poft quickstart: error: --max_steps must be at least 1 (PoFT training steps), got {steps}."
    ]
    assert not (tmp_path / "q").exists()


@pytest.fixture(scope="module")
def quickstarted(tmp_path_factory) -> tuple[Path, dict]:
    """A folder in which `poft quickstart` ran as a user runs it (its default --output, relative to the working
    folder), with fewer steps than its logging interval; and what it printed."""
    from poft.demo.quickstart import LOGGING_STEPS

    folder, previous = tmp_path_factory.mktemp("user"), os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as shown:
            code = main(["quickstart", "--max_steps", str(LOGGING_STEPS - 1), "--device", "cpu"])
    finally:
        os.chdir(previous)
    assert code == 0
    printed = shown.getvalue()  # the trainer's log lines, then the command's JSON
    return folder, json.loads(printed[printed.rfind("\n{\n") + 1 :])


def test_quickstart_with_fewer_steps_than_its_logging_interval(quickstarted):
    summary = quickstarted[1]["last_step"]
    assert set(summary) == {"loss", "poft/weight", "poft/win_rate", "poft/margin", "poft/r_theta", "poft/r_ref"}
    assert all(math.isfinite(value) for value in summary.values())
    assert 0 < summary["poft/weight"] < 1


def test_the_tiny_cpu_recipe_runs_as_written_after_quickstart(quickstarted, monkeypatch):
    """`poft train --config recipes/train-tiny-cpu.yaml` where `poft quickstart` ran, as the recipe's comment says:
    its own model, data and output paths (only its 30 steps cut to 2) train the quickstart's target."""
    folder, _ = quickstarted
    recipe = Path(__file__).parents[1] / "recipes" / "train-tiny-cpu.yaml"
    settings = yaml.safe_load(recipe.read_text())
    monkeypatch.chdir(folder)
    assert main(["train", "--config", str(recipe), "--max_steps", "2"]) == 0
    trained, target = folder / settings["output_dir"], folder / settings["model_name_or_path"]
    assert json.loads((trained / "trainer_state.json").read_text())["global_step"] == 2
    before, after = load_file(target / "model.safetensors"), load_file(trained / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_leaving_the_process_group_waits_until_gloos_workers_have_let_go_of_the_meetings(tmp_path, monkeypatch):
    """The processes meet by an all-reduce on every gloo group (DeepSpeed adds a clone of the world group); the groups
    are left only once gloo's worker threads no longer own those tensors (freeing one needs the GIL, which the
    group's destructor holds while it joins the workers)."""
    import torch.distributed as dist

    from poft.runtime import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    clone = dist.new_group(ranks=[0])
    met, owners_when_leaving = [], []
    all_reduce = dist.all_reduce

    def recorded(tensor, *args, **kwargs):
        met.append((tensor, kwargs.get("group")))
        return all_reduce(tensor, *args, **kwargs)

    class TwoProcesses:  # the meeting path of a multi-process run, over real one-process gloo groups
        num_processes = 2
        device = torch.device("cpu")

        def end_training(self):
            owners_when_leaving.extend(tensor._use_count() for tensor, _ in met)
            dist.destroy_process_group()

    monkeypatch.setattr(dist, "all_reduce", recorded)
    groups = [dist.group.WORLD, clone]
    leave_process_group(TwoProcesses())
    assert [group for _, group in met] == groups and owners_when_leaving == [1, 1]
    assert not dist.is_initialized()
