"""Wall time of `poft --help` (or of importing a stage), this checkout against a baseline commit, side by side.

    python bench/cli_startup.py --baseline 0873ded --repeats 5
    python bench/cli_startup.py --baseline 6b99762 --repeats 5 --statement import-scoring

The baseline's `src/` is extracted with `git archive` into a temporary folder; each round runs the
command once from each tree (alternating, so machine load hits both alike) in a fresh interpreter, the
same as the `poft` console script does. Prints the best of the repeats, the ratio, and whether torch was
imported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "print('torch' in sys.modules, file=sys.stderr)"
STATEMENTS = {  # what a command does before its work starts
    "help": f"import sys; from poft.cli import main; main(['--help']); {TORCH}",
    "import-scoring": f"import sys; import poft.scoring; {TORCH}",  # `poft score` before reading any data
    "import-data": f"import sys; import poft.data; {TORCH}",  # reading and validating SFT data
}


def run_statement(src: Path, statement: str) -> tuple[float, bool]:
    """Seconds for one run of `statement` from the tree `src` in a fresh interpreter, and whether it imported
    torch."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", STATEMENTS[statement]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    return time.perf_counter() - start, done.stderr.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--statement", choices=sorted(STATEMENTS), default="help")
    args = parser.parse_args()
    archive = subprocess.run(["git", "archive", args.baseline, "src"], cwd=ROOT, capture_output=True, check=True)
    with tempfile.TemporaryDirectory() as folder:
        tarfile.open(fileobj=BytesIO(archive.stdout)).extractall(folder, filter="data")
        trees = {f"baseline {args.baseline}": Path(folder) / "src", "this checkout": ROOT / "src"}
        times: dict[str, list[float]] = {name: [] for name in trees}
        torch_loaded: dict[str, bool] = {}
        for _ in range(args.repeats):
            for name, src in trees.items():
                seconds, torch_loaded[name] = run_statement(src, args.statement)
                times[name].append(seconds)
    base = min(times[f"baseline {args.baseline}"])
    print(f"{args.statement}, best of {args.repeats}\n\n| tree | best (s) | median (s) | speed-up | imports torch |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in times.items():
        runs.sort()
        print(
            f"| {name} | {runs[0]:.2f} | {runs[len(runs) // 2]:.2f} | {base / runs[0]:.1f}x | "
            f"{'yes' if torch_loaded[name] else 'no'} |"
        )


if __name__ == "__main__":
    main()
