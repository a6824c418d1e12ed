#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the whole suite in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# The SLURM tests run a real single-node cluster (tests/test_slurm.py starts it with
# launch/slurm/cluster_up.sh); install its Debian packages up front on a fresh machine.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge </dev/null >/dev/null
  else
    echo "warning: slurm-wlm/munge are missing and cannot be installed here (needs root and apt-get);" \
      "tests/test_slurm.py will fail until they are" >&2
  fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --timeout=600 "$@" tests
