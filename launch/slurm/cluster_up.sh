#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this machine: munged + slurmctld + slurmd on
# 127.0.0.1, as root, without systemd or cgroups. For tests and local trials of
# launch/slurm/train.sbatch; a real cluster already has all of this.
#
#   sudo launch/slurm/cluster_up.sh        # installs slurm-wlm + munge (apt) when missing
#   launch/slurm/cluster_down.sh           # stops what this started
#
# Idempotent: exits 0 when slurmctld is already running. Concurrent callers are serialised
# with a lock. Tuned for fast turnaround: a requeued job is eligible again after ~7 s
# (AuthInfo=cred_expire=5, sched_interval=2) instead of the default 120 s.
# DISTCKPT_SLURM_CPUS: CPUs the node advertises (default: max(nproc, 8)); more than the
# machine has lets several small, mostly idle test jobs run side by side.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
  echo "cluster_up.sh must run as root (it starts munged, slurmctld and slurmd)" >&2
  exit 1
fi

mkdir -p /run/lock
exec 9>/run/lock/distckpt-slurm.lock
flock -w 300 9

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge </dev/null >/dev/null
fi

if [ -s /run/slurm/slurmctld.pid ] && kill -0 "$(cat /run/slurm/slurmctld.pid)" 2>/dev/null; then
  echo "slurmctld already running"
  exit 0
fi

NODE=$(hostname -s)
CPUS=${DISTCKPT_SLURM_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))

# ---- munge: the authentication daemon every SLURM command talks through ----
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
  echo "munged already running"
else
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid 9>&-
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null

# ---- slurm.conf ----
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
cat >/etc/slurm/slurm.conf <<EOF
# written by distckpt launch/slurm/cluster_up.sh
ClusterName=distckpt
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it is eligible again (default 120)
AuthInfo=cred_expire=5
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
# no cgroups in containers: track processes by parentage, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
# the node may advertise more CPUs than the machine has (see DISTCKPT_SLURM_CPUS)
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
echo "CgroupAutomount=no" >/etc/slurm/cgroup.conf

# ---- daemons (they daemonise; pids in /run/slurm) ----
rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
/usr/sbin/slurmctld -c 9>&- # -c: clean job and node state; 9>&-: the daemons must not hold our lock
/usr/sbin/slurmd 9>&-

st=""
for _ in $(seq 300); do
  st=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
  case "$st" in idle | mix | alloc) break ;; esac
  sleep 0.2
done
scontrol update NodeName="${NODE}" State=RESUME >/dev/null 2>&1 || true
st=$(sinfo -h -N -o '%t' | head -1)
if [ "$st" != idle ]; then
  echo "node not idle: $st" >&2
  tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2
  exit 1
fi
sinfo
echo "SLURM up"
