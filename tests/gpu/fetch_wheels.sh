#!/usr/bin/env bash
# Download, here (with network), the wheels the GPU machine lacks into .whl/ (git-ignored):
# omegaconf + its pin antlr4-python3-runtime==4.9.3 (an sdist only: built into a wheel here, since
# the GPU machine cannot fetch setuptools either) and submitit, for Python 3.12 (the GPU machine's).
# tests/gpu/run.sh installs them there offline. Usage: bash tests/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
"$PY" -m pip --version >/dev/null 2>&1 || PY=.venv/bin/python
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    omegaconf==2.3.0 submitit==1.5.4
"$PY" -m pip download --no-deps --python-version 3.12 --only-binary=:none: -d .whl antlr4-python3-runtime==4.9.3
sdist=$(ls .whl/antlr4[-_]python3[-_]runtime-4.9.3.tar.gz)
"$PY" -m pip wheel --no-deps -w .whl "$sdist"
rm -f "$sdist"
ls -l .whl
