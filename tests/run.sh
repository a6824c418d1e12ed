#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the whole suite in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# Real components the tests start themselves: a single-node SLURM cluster (tests/system/test_slurm.py,
# via launch/slurm/cluster_up.sh) and an sshd + two sshfs clients of one directory
# (tests/system/test_sharedfs.py). Install their Debian packages up front on a fresh machine.
missing=()
command -v slurmctld >/dev/null && command -v slurmd >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v sshfs >/dev/null || missing+=(sshfs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" </dev/null >/dev/null
  else
    echo "warning: ${missing[*]} missing and cannot be installed here (needs root and apt-get);" \
      "the SLURM, shared-filesystem and s3rver tests will fail until they are" >&2
  fi
fi
# s3rver: a second S3 server (Node, from the npm registry) that ignores If-None-Match, so the
# tests see distckpt keep one writer per root on such stores too (tests/conftest.py starts it).
if [ ! -x .venv/node/node_modules/.bin/s3rver ] && command -v npm >/dev/null; then
  echo "installing s3rver (npm)"
  npm install --silent --no-audit --no-fund --prefix .venv/node s3rver@3.7.1 >/dev/null
fi
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --timeout=600 "$@" tests
