#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by cluster_up.sh: cancels every job, then
# stops slurmd, slurmctld and munged by their PID files (never by name). Idempotent.
set -uo pipefail

mkdir -p /run/lock
exec 9>/run/lock/distckpt-slurm.lock
flock -w 300 9

wait_gone() { # pid seconds
  local p=$1 t=$2
  for _ in $(seq $((t * 10))); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  return 1
}
stop_pidfile() { # pidfile name
  local f=$1 n=$2 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p"
    wait_gone "$p" 15 || { echo "$n ($p) did not exit, SIGKILL"; kill -KILL "$p"; }
  fi
  rm -f "$f"
}

if [ -s /run/slurm/slurmctld.pid ] && kill -0 "$(cat /run/slurm/slurmctld.pid)" 2>/dev/null; then
  # cancel what is queued or running so that slurmstepd and the jobs' processes exit
  scancel --full -u "$(id -un)" >/dev/null 2>&1 || true
  for _ in $(seq 100); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.3
  done
  scontrol shutdown >/dev/null 2>&1 || true # stops slurmctld and every slurmd cleanly
fi
for f in /run/slurm/slurmctld.pid /run/slurm/slurmd.pid; do
  [ -s "$f" ] && wait_gone "$(cat "$f")" 15
done
stop_pidfile /run/slurm/slurmd.pid slurmd
stop_pidfile /run/slurm/slurmctld.pid slurmctld
if [ -s /run/munge/munged.pid ]; then
  runuser -u munge -- /usr/sbin/munged --stop >/dev/null 2>&1 || stop_pidfile /run/munge/munged.pid munged
fi
echo "SLURM down"
