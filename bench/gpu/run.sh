#!/usr/bin/env bash
# The GPU measurement in one call, offline, on the bare GPU machine (run from anywhere in the checkout):
#
#     bash bench/gpu/run.sh "$OUT"
#
# Installs the wheels bench/gpu/fetch_wheels.py put in .whl/ into a private directory placed before the
# image's packages on PYTHONPATH (nothing is upgraded in place, torch is never touched), takes poft from
# the checkout's src/ without installing it, then runs bench/gpu/measure.py: OUT/results.json and one
# log per stage. Environment: PYTHON (python3), WHEELS (.whl), SHAPE (llama-1b; tiny for a CPU check),
# BUDGET_S (450: the stages stop by then, well inside 8 minutes with the install).
set -uo pipefail
OUT=${1:?usage: bash bench/gpu/run.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=$(mktemp -d "${TMPDIR:-/tmp}/poft-gpu-site.XXXXXX")
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
{
    echo "$(date -u '+%F %T') installing ${#wheels[@]} wheels from $WHEELS into $SITE"
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels in $WHEELS: run 'python bench/gpu/fetch_wheels.py' where there is network, then carry .whl"
        exit 1
    fi
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}"
    else  # no pip on the image: the wheels are pure Python, so unpacking them is installing them
        "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$SITE" "${wheels[@]}"
    fi
    ls "$SITE"
} >"$OUT/install.log" 2>&1 || { echo "install failed:"; tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HOME="$SITE/hf" POFT_CACHE="$SITE/poft" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
"$PYTHON" bench/gpu/measure.py --out "$OUT" --shape "${SHAPE:-llama-1b}" --budget_s "${BUDGET_S:-450}"
status=$?
rm -rf "$SITE"
exit $status
