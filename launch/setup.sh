#!/usr/bin/env bash
# Creates (or refreshes) ./.venv with CPU torch 2.13.0 and distckpt[test], idempotently.
# Used by launch/demo.sh and tests/run.sh; safe to run again (skips work when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.distckpt-setup
want=$(cat pyproject.toml launch/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
# Pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0" numpy
python -m pip install -q -e ".[test,bench]"
echo "$want" > "$stamp"
