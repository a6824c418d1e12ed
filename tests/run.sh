#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the whole suite in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --timeout=600 "$@" tests
