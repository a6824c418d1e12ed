#!/usr/bin/env bash
# The demo command: set up ./.venv if needed, then train under torchrun, kill -9 it
# mid-run, resume, and check the result equals an uninterrupted run (launch/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python launch/demo.py "$@"
