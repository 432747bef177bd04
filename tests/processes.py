"""Child processes in tests: started in a process group of their own and ended whole, and killed where they say.

`subprocess.run(timeout=...)` kills only the process it started: under `accelerate launch` that is the launcher, and
its workers (gloo processes) would live on. `run` starts the command in a new session and, on a timeout or any
other failure, kills the whole group.

A kill "at some moment" is a race with the process's own speed. A child that must be killed at a point instead
runs `STOP_HERE`'s `stop_here(point)` there: it prints the point and waits; `reached` reads that line (waiting at
most a bounded time) and `sigkill` then sends a real SIGKILL, so no cleanup of the child's runs, as after a real
kill.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

STOP_HERE = '''
import sys


def stop_here(point: str) -> None:
    """Tell the test which point this process reached, then wait for its SIGKILL."""
    print(point, flush=True)
    sys.stdin.read()  # returns only if the test went away without killing this process
    sys.exit(f"not killed at {point}")
'''


def run(command: Sequence[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, timeout=timeout, ...)` that kills every process the command started, not only the
    first, when the time is up (or the test is interrupted)."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process = subprocess.Popen(command, start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        end_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def end_group(process: subprocess.Popen) -> None:
    """SIGKILL `process` and every process of its group (it leads one: `start_new_session`), and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


def start(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -c STOP_HERE + code args...`: a child that can call `stop_here(point)`; its stdout is read by
    `reached`."""
    return subprocess.Popen(
        [sys.executable, "-c", STOP_HERE + code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def reached(process: subprocess.Popen, timeout: float = 120) -> str:
    """The next line the child prints (the point it stopped at, or whatever it says when done), waiting at most
    `timeout` seconds; '' where it ended without a word."""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([process.stdout], [], [], max(deadline - time.monotonic(), 0))
        if ready:
            return process.stdout.readline().strip()
        if time.monotonic() >= deadline:
            end_group(process)
            raise TimeoutError(f"the child said nothing in {timeout} s")


def sigkill(process: subprocess.Popen) -> None:
    """A real SIGKILL, as a power switch would give it: nothing of the child runs after it."""
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.stdin is not None:
        process.stdin.close()
    process.stdout.close()
