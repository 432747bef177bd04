"""Atomic outputs: a kill or a full disk at any moment leaves the old output or the new one; inputs are never touched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, load_from_disk

from poft import outputs
from poft.cli import main
from poft.errors import OutputError
from poft.outputs import atomic_output, check_output
from poft.schema import MARKER

SRC = str(Path(__file__).parent.parent / "src")


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` by content, to show an input is byte-identical afterwards."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_rows(folder: Path, n: int) -> str:
    """n one-turn chats with a numeric `quality` column to filter by."""
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "quality": i}
        for i in range(n)
    ]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "data.jsonl")


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if outputs.TMP_TAG in p.name or outputs.OLD_TAG in p.name]


def write_version(out: Path, version: int, rows: int = 50) -> None:
    with atomic_output(out, "test") as tmp:
        Dataset.from_dict({"version": [version] * rows}).save_to_disk(str(tmp))


def test_check_output_refuses_what_it_would_destroy(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    with pytest.raises(OutputError, match=r"^--output .*data.jsonl is the input .*data.jsonl: writing there would"):
        check_output(data, [data])
    with pytest.raises(OutputError, match=r"^--output .*data.jsonl is an existing file; poft writes a directory"):
        check_output(data, [], overwrite=True)
    with pytest.raises(OutputError, match=r"contains the input"):
        check_output(tmp_path, [data])
    (tmp_path / "saved").mkdir()
    with pytest.raises(OutputError, match=r"lies inside the input"):
        check_output(tmp_path / "saved" / "sub", [tmp_path / "saved"])
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"photos is a non-empty folder that is not a poft output; poft never"):
            check_output(foreign, [], overwrite=overwrite)
    previous = tmp_path / "previous"
    write_version(previous, 1)
    with pytest.raises(OutputError, match=r"previous holds a previous poft output. Pass --overwrite to replace it"):
        check_output(previous, [])
    assert check_output(previous, [], overwrite=True) == previous.resolve()
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", []) == (tmp_path / "empty").resolve()
    assert check_output(tmp_path / "new", [data, "org/hub-dataset"]) == (tmp_path / "new").resolve()


def test_atomic_output_never_replaces_a_foreign_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff")
    with pytest.raises(OutputError, match="is a non-empty folder that is not a poft output"):
        write_version(tmp_path / "photos", 1)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"\xff" and leftovers(tmp_path) == []


def test_replacing_an_output_leaves_only_the_new_one(tmp_path):
    out = tmp_path / "out"
    write_version(out, 1)
    write_version(out, 2)
    assert set(load_from_disk(str(out))["version"]) == {2}
    assert (out / MARKER).is_file() and leftovers(tmp_path) == []


def test_an_output_behind_a_symlink_is_replaced_and_the_link_kept(tmp_path):
    write_version(tmp_path / "real", 1)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    write_version(tmp_path / "link", 2)
    assert (tmp_path / "link").is_symlink() and set(load_from_disk(str(tmp_path / "link"))["version"]) == {2}
    assert leftovers(tmp_path) == []


def test_a_failure_removes_the_temporary_folder_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    write_version(out, 1)
    with pytest.raises(RuntimeError, match="boom"), atomic_output(out, "test") as tmp:
        Dataset.from_dict({"version": [2]}).save_to_disk(str(tmp))
        raise RuntimeError("boom")
    assert set(load_from_disk(str(out))["version"]) == {1} and leftovers(tmp_path) == []


def test_full_disk_while_saving_keeps_the_old_output(tmp_path, monkeypatch, capsys):
    """`poft noise --overwrite` over its previous output, with the Arrow writer failing half-way (ENOSPC)."""
    data = write_rows(tmp_path, 40)
    out = tmp_path / "noised"
    assert main(["noise", "--data", data, "--output", str(out), "--rate", "0.5"]) == 0
    before = digest(out)
    original = datasets.arrow_writer.ArrowWriter.write_table

    def write_then_fail(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if str(tmp_path) in str(self._path):  # the output's files, not the processing's cache files
            self.stream.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.arrow_writer.ArrowWriter, "write_table", write_then_fail)
    code = main(["noise", "--data", data, "--output", str(out), "--rate", "0.3", "--seed", "1", "--overwrite"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert message.startswith(f"poft noise: error: cannot write --output {out}: the disk is full (Errno 28).")
    assert digest(out) == before and len(load_from_disk(str(out))) == 40
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", ["filter", "noise"])
def test_output_equal_to_input_is_refused_and_the_input_untouched(tmp_path, stage, capsys):
    data = write_rows(tmp_path, 48)
    saved = tmp_path / "saved"
    assert main(["noise", "--data", data, "--output", str(saved), "--rate", "0.5"]) == 0
    before = digest(saved)
    options = ["--by", "quality", "--top_fraction", "0.5"] if stage == "filter" else ["--rate", "0.2"]
    capsys.readouterr()
    assert main([stage, "--data", str(saved), "--output", str(saved), *options]) == 2
    assert capsys.readouterr().err.strip() == (
        f"poft {stage}: error: --output {saved} is the input {saved}: writing there would replace the data being "
        "read. Choose another --output, or pass --overwrite to replace it once the new output is complete."
    )
    assert digest(saved) == before


def test_overwriting_the_input_is_atomic_and_complete(tmp_path):
    data = write_rows(tmp_path, 48)
    saved = tmp_path / "saved"
    assert main(["noise", "--data", data, "--output", str(saved), "--rate", "0.5"]) == 0
    scores = ["--by", "quality", "--top_fraction", "0.5", "--overwrite"]
    assert main(["filter", "--data", str(saved), "--output", str(saved), *scores]) == 0
    assert len(load_from_disk(str(saved))) == 24 and leftovers(tmp_path) == []


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import types

    from datasets import Dataset

    package = types.ModuleType("poft")  # poft.outputs alone, without the package's heavy imports (torch, trl)
    package.__path__ = [sys.argv[3]]
    sys.modules["poft"] = package
    from poft import outputs
    from poft.outputs import atomic_output

    out, exchange = sys.argv[1], sys.argv[2] == "exchange"
    if not exchange:
        outputs._exchange = lambda a, b: False  # the rename-aside path of systems without renameat2
    rows = 100_000
    print("ready", flush=True)
    version = 1
    while True:  # save over the previous output, again and again, until killed
        with atomic_output(out, "test") as tmp:
            Dataset.from_dict({"version": [version] * rows, "text": ["x" * 20] * rows}).save_to_disk(tmp)
        version += 1
    """
)


def test_sigkill_while_saving_over_a_previous_output_leaves_a_loadable_output(tmp_path):
    """A real process saving over its previous output, killed at several moments: the output is always whole."""
    out = tmp_path / "out"
    rows = 100_000
    with atomic_output(out, "test") as tmp:
        Dataset.from_dict({"version": [0] * rows, "text": ["x" * 20] * rows}).save_to_disk(str(tmp))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    mid_write = []
    for mode, delay in [("exchange", 0.05), ("exchange", 0.6), ("aside", 0.4)]:
        process = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, str(out), mode, str(Path(SRC) / "poft")],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        mid_write.append(bool(leftovers(tmp_path)))
        outputs._recover(out)  # what the next run does first: restore an aside copy, drop dead runs' temporaries
        loaded = load_from_disk(str(out))
        assert len(loaded) == rows and len(set(loaded["version"])) == 1, (mode, delay)
        assert leftovers(tmp_path) == []
    assert any(mid_write)  # at least one kill fell while a new output was being written


def test_recovery_restores_an_output_renamed_aside_by_a_killed_run(tmp_path):
    """The window between the two renames of the fallback path: old output aside, new one not yet in place."""
    out = tmp_path / "out"
    write_version(out, 1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    os.rename(out, tmp_path / f".out{outputs.OLD_TAG}{pid}")
    (tmp_path / f".out{outputs.TMP_TAG}{pid}-abc").mkdir()
    write_version(out, 2)  # the next run recovers first, then replaces as usual
    assert set(load_from_disk(str(out))["version"]) == {2} and leftovers(tmp_path) == []


def test_poft_noise_killed_while_replacing_its_output_leaves_the_old_one(tmp_path):
    """The real CLI, SIGKILLed as soon as its temporary output appears: the previous output still loads, whole."""
    data = write_rows(tmp_path, 2_000)
    out = tmp_path / "noised"
    assert main(["noise", "--data", data, "--output", str(out), "--rate", "0.5"]) == 0
    before = digest(out)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    argv = ["noise", "--data", data, "--output", str(out), "--rate", "0.2", "--seed", "3", "--overwrite"]
    process = subprocess.Popen(
        [sys.executable, "-m", "poft.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not leftovers(tmp_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert leftovers(tmp_path), "the run was not caught while writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    loaded = load_from_disk(str(out))
    assert len(loaded) == 2_000
    if digest(out) != before:  # the kill fell just after the swap: then the output is the new one, whole
        assert sum(loaded["poft_noise"]) == 400
    outputs._recover(out)  # what the next run does first
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_mode_a_plain_write_would(tmp_path, umask):
    """Not mkstemp's 0o600 or mkdtemp's 0o700: a new file 0o666 and a new folder 0o777, less the umask."""
    previous = os.umask(umask)
    try:
        outputs.atomic_write_text(tmp_path / "report.md", "new")
        with atomic_output(tmp_path / "out", "test") as tmp:
            outputs.atomic_write_text(tmp / "poft_score.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "out" / "poft_score.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "eval_results.json"
    path.write_text("old")
    path.chmod(0o640)
    outputs.atomic_write_text(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


def test_a_single_file_write_removes_what_killed_runs_left_and_keeps_live_ones(tmp_path):
    """Temporaries beside one file carry their writer's pid: a dead writer's are deleted, a live one's kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".report.md{outputs.TMP_TAG}{dead.stdout.strip()}-abc.md"
    live = tmp_path / f".report.md{outputs.TMP_TAG}{os.getppid()}-abc.md"
    stale.write_text("half")
    live.write_text("half")
    outputs.atomic_write_text(tmp_path / "report.md", "new")
    assert (tmp_path / "report.md").read_text() == "new"
    assert not stale.exists() and live.exists()


def test_a_failing_single_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")

    def write(tmp: Path) -> None:
        assert tmp.suffix == ".png"  # the suffix names the image format to matplotlib
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        outputs.atomic_write(path, write)
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []
