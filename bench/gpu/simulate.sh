#!/usr/bin/env bash
# Rehearse bench/gpu/run.sh on CPU, from a clean clone, in a fresh venv that holds only the GPU image's
# packages (bench/gpu/image.txt), then run the kit with no package index:
#
#     bash bench/gpu/simulate.sh [OUT]        # OUT defaults to outputs/gpu-simulation
#
# Differences from the GPU machine, all forced by this one: Python is this machine's (3.11, not 3.12.3);
# torch is 2.13.0, the CPU build (the only torch here; the image has 2.11 with CUDA 13); triton is left out
# (CPU torch does not use it); versions the image list leaves open are pinned to those poft resolved to
# here. The kit's wheels are fetched twice: for CPython 3.12 (.whl/, what travels) and, the same versions,
# for this Python (into a temporary folder, which the simulation installs: pure-Python wheels, but
# multiprocess ships one per Python version). Needs the network (a package index) for the venv only, and the Python poft's
# pyproject resolved to (POFT_PYTHON, default .venv/bin/python from `make`) to read the pins from.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/gpu-simulation}
POFT_PYTHON=${POFT_PYTHON:-.venv/bin/python}
BASE=${PYTHON:-python3}
pyver=$("$BASE" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
SIM=$(mktemp -d "${TMPDIR:-/tmp}/poft-gpu-sim.XXXXXX")
trap 'rm -rf "$SIM"' EXIT

"$POFT_PYTHON" bench/gpu/fetch_wheels.py
"$POFT_PYTHON" bench/gpu/fetch_wheels.py --python-version "$pyver" --dest "$SIM/wheels"

# The image: its packages at the image's versions where known; the others no newer than here, left to pip
# to make consistent with those (transformers 5.17 wants an older huggingface-hub than poft resolves to).
mapfile -t pins < <("$POFT_PYTHON" - <<'PY'
from importlib import metadata
for line in open("bench/gpu/image.txt"):
    name, _, version = line.split("#")[0].strip().partition("==")
    if not name or name == "triton":
        continue
    if name == "torch":
        version = "2.13.0"  # the CPU build available here
    elif not version:
        print(f"{name}<={metadata.version(name)}")
        continue
    print(f"{name}=={version}" if version.count(".") >= 2 else f"{name}=={version}.*")
PY
)
echo "image packages: ${pins[*]}"
"$BASE" -m venv "$SIM/venv"
"$SIM/venv/bin/python" -m pip install -q --upgrade pip
"$SIM/venv/bin/python" -m pip install -q torch==2.13.0
"$SIM/venv/bin/python" -m pip install -q "${pins[@]}"
"$SIM/venv/bin/python" -m pip list --format=freeze > "$SIM/image-packages.txt"

# The kit, as on the GPU machine: no index, the wheels, poft from src/, the tiny shape on CPU.
rm -rf "$OUT"
PIP_NO_INDEX=1 PYTHON="$SIM/venv/bin/python" WHEELS="$SIM/wheels" SHAPE=tiny BUDGET_S=900 \
    bash bench/gpu/run.sh "$OUT"
cp "$SIM/image-packages.txt" "$OUT/"
echo "simulation passed: $OUT/results.json"
