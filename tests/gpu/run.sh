#!/usr/bin/env bash
# The GPU check: every test in tests/gpu/ on this machine's GPU, in at most 8 minutes.
#
#   bash tests/gpu/run.sh                      # in the repository root of a copy with .whl/ (see below)
#   GPU_CHECK_ON_CPU=1 bash tests/gpu/run.sh   # CPU smoke mode: checks the checks on a machine without a GPU
#
# Needs the wheels from `bash tests/gpu/fetch_wheels.sh` in .whl/ where omegaconf/submitit are not
# installed (the GPU machine has no network): they are installed offline into /tmp/site.
# Results: one line per check (name, PASS/FAIL/SKIP, seconds, key figures) on the console and in
# ${OUT:-/tmp}/gpu_check.txt, written as each check ends, so they survive a timeout; the whole
# pytest log goes to ${OUT:-/tmp}/gpu_check.log and the speed rounds to gpu_check_speed.json.
# Environment: PYTHON (default python3), GPU_CHECK_TIMEOUT (default 480 s, the whole run),
# GPU_CHECK_ROUNDS (speed rounds, default 3), extra pytest arguments after the script's name.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
RESULTS_DIR=${OUT:-/tmp}
mkdir -p "$RESULTS_DIR"
export GPU_CHECK_RESULTS="$RESULTS_DIR/gpu_check.txt"
LOG="$RESULTS_DIR/gpu_check.log"
: >"$GPU_CHECK_RESULTS"

if ! "$PY" -c "import omegaconf, submitit" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "installing the carried wheels offline into /tmp/site: $(cd .whl && echo *.whl)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
            || { echo "# FAIL: could not install .whl/*.whl" | tee -a "$GPU_CHECK_RESULTS"; exit 1; }
    else
        echo "# FAIL: omegaconf/submitit missing and no .whl/ here: run bash tests/gpu/fetch_wheels.sh where there is network" \
            | tee -a "$GPU_CHECK_RESULTS"
        exit 1
    fi
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -c "import omegaconf, submitit, torch, ddp" \
    || { echo "# FAIL: the project does not import" | tee -a "$GPU_CHECK_RESULTS"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

LIMIT=${GPU_CHECK_TIMEOUT:-480}
# -p no:cacheprovider: write nothing into the checkout; pytest-timeout's per-check limits are in the tests
timeout --kill-after=10 "$LIMIT" "$PY" -m pytest tests/gpu -m gpu -v -p no:cacheprovider -o addopts="" -rfEs \
    "$@" 2>&1 | tee "$LOG"
code=${PIPESTATUS[0]}
if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    echo "# TIMEOUT: the whole check was stopped after $LIMIT s; the lines above are the checks that ended" \
        | tee -a "$GPU_CHECK_RESULTS"
fi
echo
echo "=== $GPU_CHECK_RESULTS ==="
cat "$GPU_CHECK_RESULTS"
exit "$code"
