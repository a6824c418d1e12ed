#!/usr/bin/env bash
# Launch a training script (default: launch/train.py) under torchrun, one node or several.
#
#   single node:  launch/torchrun.sh --nproc 2 --max-restarts 3 -- --ckpt-dir runs/x --steps 200
#   two nodes:    launch/torchrun.sh --nnodes 2 --master node0:29500 -- --ckpt-dir /nfs/x   (on each node)
#   fixed ranks:  launch/torchrun.sh --nnodes 2 --rdzv static --node-rank 1 --master node0:29500 -- ...
#
# Everything after "--" goes to the training script. Options, and the environment variables
# they default to:
#   --nproc N            workers on this node           [NPROC_PER_NODE, else 2]
#   --nnodes N           nodes                          [NNODES, else 1]
#   --master HOST:PORT   rendezvous endpoint (a host all nodes reach) [MASTER_ADDR:MASTER_PORT, else 127.0.0.1:29500]
#   --rdzv c10d|static   c10d: elastic, node ranks by arrival; static: fixed node ranks [RDZV_BACKEND, else c10d]
#   --node-rank R        this node's rank, 0..N-1, static only [NODE_RANK, else 0]
#   --run-id ID          c10d rendezvous id, the same on every node [RUN_ID, else distckpt]
#   --max-restarts N     restarts of the workers after a failure or preemption [MAX_RESTARTS, else 3]
#   --script PATH        training script                [TRAIN, else launch/train.py]
#   --python PATH        interpreter                    [PYTHON, else python3]
# One node uses --standalone (a free local port). A worker that exits non-zero (distckpt's
# save_and_exit exits 75 after its final save) makes torchrun restart all workers while
# restarts remain; they resume from the newest committed step. Measured with torch 2.13:
# restarted workers that share torchrun's rendezvous store read the previous attempt's
# keys (gloo "connectFullMesh failed ... Connection refused"), hence
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 below; with --rdzv static a restart hangs instead,
# so keep static for --max-restarts 0.
#
# Signals: torchrun's own agent dies on SIGUSR1 and answers SIGTERM by stopping for good.
# This script therefore keeps the agent out of it: SIGUSR1 and SIGTERM sent to this script
# are forwarded to the workers, whose distckpt handlers stop them at an agreed step, save,
# and exit 75, and torchrun restarts them (under SLURM the job requeues itself instead).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

NPROC=${NPROC_PER_NODE:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
RDZV=${RDZV_BACKEND:-c10d}
RUN_ID=${RUN_ID:-distckpt}
MAX_RESTARTS=${MAX_RESTARTS:-3}
SCRIPT=${TRAIN:-$HERE/train.py}
PY=${PYTHON:-python3}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC=$2; shift 2 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --master) MASTER=$2; shift 2 ;;
    --rdzv) RDZV=$2; shift 2 ;;
    --run-id) RUN_ID=$2; shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
    --script) SCRIPT=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "torchrun.sh: unknown option $1 (training arguments go after --)" >&2; usage 2 ;;
  esac
done

args=(--nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS")
if [ "$NNODES" = 1 ]; then
  args+=(--standalone)
elif [ "$RDZV" = c10d ]; then
  args+=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$MASTER" --rdzv-id="$RUN_ID")
elif [ "$RDZV" = static ]; then
  args+=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --master-addr="${MASTER%:*}" --master-port="${MASTER##*:}")
else
  echo "torchrun.sh: --rdzv must be c10d or static, got $RDZV" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

children() { # direct children of the agent, read from /proc (no procps needed)
  local f stat ppid pid
  for f in /proc/[0-9]*/stat; do
    stat=$(cat "$f" 2>/dev/null) || continue
    stat=${stat##*) } # drop "pid (comm) ": comm may contain spaces
    read -r _ ppid _ <<<"$stat"
    if [ "$ppid" = "$AGENT" ]; then
      pid=${f#/proc/}
      echo "${pid%/stat}"
    fi
  done
}
forward() { # signal name
  local pid
  echo "torchrun.sh: forwarding SIG$1 to the workers" >&2
  for pid in $(children); do kill -s "$1" "$pid" 2>/dev/null || true; done
}

"$PY" -m torch.distributed.run "${args[@]}" "$SCRIPT" "$@" &
AGENT=$!
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# 'wait' returns early (status > 128) when a trapped signal arrives: wait for torchrun itself
while :; do
  rc=0
  wait "$AGENT" || rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$AGENT" 2>/dev/null; then continue; fi
  break
done
exit "$rc"
