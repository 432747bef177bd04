"""Multi-process runs (`accelerate launch`): one process that fails stops every process, with its error."""

from __future__ import annotations

import os
import textwrap

from tests import processes
from tests.conftest import two_cpu_processes, write_jsonl

# poft.cli in which process 1 fails before scoring while process 0 scores and then waits for it
FAILING_PROCESS = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path

    import poft.scoring
    from poft.errors import DataError

    Path(sys.argv[1], os.environ["RANK"]).write_text(str(os.getpid()))
    score_reference = poft.scoring.score_reference

    def fail_in_process_1(*args, **kwargs):
        if os.environ["RANK"] == "1":
            raise DataError("process 1 cannot go on")
        return score_reference(*args, **kwargs)

    poft.scoring.score_reference = fail_in_process_1
    from poft.cli import main

    sys.exit(main(sys.argv[2:]))
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_one_failing_process_ends_every_process_with_its_error(tiny_models, conversations, tmp_path):
    script, pids = tmp_path / "fail_in_process_1.py", tmp_path / "pids"
    script.write_text(FAILING_PROCESS)
    pids.mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", conversations)
    args = [
        "score",
        "--data",
        data,
        "--model",
        tiny_models["zephyr"],
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "o"),
    ]
    launcher = processes.run(  # a process left waiting for its failed peer would hang here: all are ended then
        [*two_cpu_processes(str(script), str(pids)), *args, "--cache_dir", str(tmp_path / "cache")],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert launcher.returncode != 0
    assert "poft score: error: process 1 cannot go on" in launcher.stderr
    started = [int((pids / rank).read_text()) for rank in ("0", "1")]
    assert not any(alive(pid) for pid in started)
    assert not (tmp_path / "o").exists()
