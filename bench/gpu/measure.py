"""The whole GPU measurement in one call: environment, packed-attention isolation, scoring, training step.

Run by bench/gpu/run.sh after the offline install. Each stage is a subprocess with its own time limit,
logging to OUT/<stage>.log; OUT/results.json is rewritten after every stage, so a stage that fails or runs
out of time loses nothing measured before it, and closes with the targets, met or not.

    python bench/gpu/measure.py --out OUT [--shape llama-1b|tiny] [--budget_s 450]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

from common import write_json  # noqa: E402

PACKAGES = ("torch", "transformers", "trl", "datasets", "tokenizers", "accelerate", "peft", "triton", "numpy")
# the training configurations the stage's time limit was sized for
TRAINING_CONFIGS = "sft-padded,poft-padded,sft-packed,poft-packed"
# stage -> (script, arguments per shape, time limit in seconds)
STAGES = {
    "packed_attention": (
        "packed_attention.py",
        {"llama-1b": ["--samples=32"], "tiny": ["--samples=12", "--implementations=sdpa,eager"]},
        110,
    ),
    "scoring": (
        "scoring.py",
        {
            # the methods the stage's time limit was sized for (poft-fused differs on CUDA by the padding bound only)
            "llama-1b": ["--samples=512", "--repeats=2", "--check_samples=16", "--methods=public,poft,poft-packed"],
            "tiny": [
                "--samples=16",
                "--repeats=1",
                "--check_samples=4",
                "--max_length=512",
                "--public_batch=4",
                "--methods=public,poft,poft-packed",
            ],
        },
        200,
    ),
    "training_step": (
        "training_step.py",
        {
            "llama-1b": ["--samples=512", "--steps=12", "--repeats=1", f"--configs={TRAINING_CONFIGS}"],
            "tiny": ["--samples=48", "--steps=5", "--max_length=256", "--repeats=1", f"--configs={TRAINING_CONFIGS}"],
        },
        170,
    ),
}


def environment() -> dict:
    import torch

    from poft.attention import torch_varlen_kernel, torch_varlen_supported

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "python": platform.python_version(),
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "torch_varlen_kernel": torch_varlen_kernel() is not None,
        "torch_varlen_runs_here": torch_varlen_supported(device),
        "pip_check": (check.stdout + check.stderr).strip()[-2000:],
    }


def targets(results: dict) -> dict:
    """The performance targets, each with the figure it is judged on (None where that stage gave none)."""
    scoring = results.get("scoring", {}).get("methods", {})
    training = results.get("training_step", {})
    best = max((m for k, m in scoring.items() if k != "public"), key=lambda m: m["tokens_per_s"], default=None)
    figures = {
        "scoring_mfu >= 0.60": best and best["mfu"],
        "scoring_vs_public >= 9": best and best.get("speed_vs_public"),
        "poft_vs_sft_step <= 1.03": training.get("poft_vs_sft_step_padded"),
        "poft_vs_sft_memory <= 1.02": training.get("poft_vs_sft_memory_padded"),
        "packed_vs_padded_training > 1": training.get("packed_vs_padded_throughput"),
        "packed_vs_padded_scoring > 1": (
            scoring["poft-packed"]["tokens_per_s"] / scoring["poft"]["tokens_per_s"]
            if {"poft", "poft-packed"} <= set(scoring)
            else None
        ),
    }
    judged = {}
    for name, value in figures.items():
        op, bound = name.split()[1], float(name.split()[2])
        met = None if value is None else {">=": value >= bound, "<=": value <= bound, ">": value > bound}[op]
        judged[name] = {"value": value, "met": met}
    return judged


def run_stage(command: list[str], log, limit: float) -> str:
    """Run one stage in a process group of its own, so a timeout stops its worker subprocesses too."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return f"timed out after {limit:.0f} s"
    return "ok" if code == 0 else f"failed: exit {code}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=["llama-1b", "tiny"], default="llama-1b")
    parser.add_argument("--budget_s", type=float, default=450, help="all stages together stop by then")
    args = parser.parse_args()
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"shape": args.shape, "environment": environment(), "stages": {}}
    path = str(args.out / "results.json")
    write_json(path, results)
    print(json.dumps(results["environment"], indent=2), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for stage, (script, arguments, limit) in STAGES.items():
            remaining = args.budget_s - (time.monotonic() - start)
            if remaining < 20:
                results["stages"][stage] = {"status": "skipped: out of time"}
                continue
            limit = min(limit, remaining) if args.shape != "tiny" else remaining  # a CPU rehearsal may be slow
            summary = Path(scratch) / f"{stage}.json"
            command = [sys.executable, str(BENCH / script), f"--shape={args.shape}", *arguments[args.shape]]
            began = time.monotonic()
            with open(args.out / f"{stage}.log", "w") as log:
                log.write(" ".join(command[1:]) + "\n")
                log.flush()
                status = run_stage([*command, f"--json={summary}"], log, limit)
            results["stages"][stage] = {"status": status, "seconds": round(time.monotonic() - began, 1)}
            if summary.exists():
                results[stage] = json.loads(summary.read_text())
            results["targets"] = targets(results)
            write_json(path, results)
            print(f"{stage}: {status} ({results['stages'][stage]['seconds']} s)", flush=True)
    print(json.dumps({"stages": results["stages"], "targets": results["targets"]}, indent=2))
    if any(s["status"] != "ok" for s in results["stages"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
