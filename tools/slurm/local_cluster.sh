#!/usr/bin/env bash
# A real two-node Slurm "cluster" (plus Open MPI) on this one machine, for CI and tests.
#
#   bash tools/slurm/local_cluster.sh start  STATE_DIR  # install if needed, start, wait for idle nodes
#   bash tools/slurm/local_cluster.sh stop   STATE_DIR  # stop the daemons started here
#   bash tools/slurm/local_cluster.sh status STATE_DIR  # exit 0 iff running and both nodes usable
#
# `start` prints `export SLURM_CONF=...`: eval it (or export it) before running sbatch/srun/sinfo.
# Needs root (apt-get, munge key, daemons). Nodes node1/node2 are two slurmd processes on
# 127.0.0.1 (Debian builds slurmd with multiple-slurmd support, hence `slurmd -N`).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status STATE_DIR" >&2; exit 2; }
[[ $# -eq 2 && $1 =~ ^(start|stop|status)$ ]] || usage
CMD=$1
[[ $CMD == start ]] && mkdir -p "$2"
[[ -d $2 ]] || { [[ $CMD == stop ]] && exit 0; exit 1; }   # nothing was started there
STATE=$(cd "$2" && pwd)          # absolute: slurm.conf paths must not depend on cwd
export SLURM_CONF=$STATE/slurm.conf
NODES=(node1 node2)
CTLD_PORT=16817                  # away from the default 6817/6818 in case a system slurm exists

log_tail() { for f in "$STATE"/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done; true; }

nodes_idle() {                   # both nodes registered and schedulable (idle/mixed/allocated)
  local n
  n=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | grep -cE '^node[12] (idle|mix|alloc)$') || true
  [[ $n -eq 2 ]]
}

install_pkgs() {
  local missing=() p
  for p in slurmctld slurmd slurm-client munge openmpi-bin; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  echo "installing ${missing[*]} ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2            # stdout is reserved for the `export` line (callers may eval it)
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
  # Reuse a munged that already answers (e.g. a system one); only a munged we start is ours to stop.
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && { cp /run/munge/munged.pid "$STATE/munged.pid"; return; }
    sleep 0.1
  done
  echo "munged did not come up" >&2; tail -n 20 /var/log/munge/munged.log >&2 || true; exit 1
}

write_conf() {
  local host; host=$(hostname)
  # %n = node name: each slurmd gets its own spool dir, pid and log file.
  cat >"$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits one credential lifetime before it starts again (default 120 s): 20 s keeps
# the requeue test short, and starting it earlier by hand fails ("Job credential revoked").
AuthInfo=cred_expire=20
# Look for startable jobs every 2 s (default 60 s), so that a requeued job starts when it may.
SchedulerParameters=sched_interval=2,bf_interval=2
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the CPUs= below instead of the real core count (2 virtual nodes share the host's cores).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Reject impossible requests (too many nodes/CPUs) at submit time instead of pending forever.
EnforcePartLimits=ALL
MailProg=/bin/true
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdSpoolDir=$STATE/slurmd.%n
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmdLogFile=$STATE/slurmd.%n.log
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
  mkdir -p "$STATE/ctld" "$STATE/slurmd.node1" "$STATE/slurmd.node2"
  # No /etc/slurm/slurm.conf is needed: slurmd sets SLURM_CONF in every job's environment, and
  # callers outside jobs use the printed `export SLURM_CONF=...`.
  # Not strictly needed (NodeAddr is explicit) but lets `ssh node1`/`getent hosts node2` work.
  grep -qE '^127\.0\.0\.1\s.*\bnode1\b' /etc/hosts ||
    { echo "127.0.0.1 node1 node2" >>/etc/hosts; } 2>/dev/null || echo "note: /etc/hosts not writable" >&2
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  if pid_alive "$STATE/slurmctld.pid" && nodes_idle; then echo "export SLURM_CONF=$SLURM_CONF"; return; fi
  install_pkgs
  start_munge
  write_conf
  pid_alive "$STATE/slurmctld.pid" || slurmctld || { log_tail; exit 1; }
  for n in "${NODES[@]}"; do
    pid_alive "$STATE/slurmd.$n.pid" || slurmd -N "$n" || { log_tail; exit 1; }
  done
  for _ in $(seq 120); do
    if nodes_idle; then echo "export SLURM_CONF=$SLURM_CONF"; return; fi
    sleep 0.5
  done
  echo "nodes did not become idle within 60 s:" >&2; sinfo -N -l >&2 || true; log_tail; exit 1
}

# TERM the given pid files' processes together (each takes ~2 s to exit), wait, then KILL leftovers.
kill_pidfiles() {
  local f pids=()
  for f in "$@"; do [[ -s $f ]] && pids+=("$(cat "$f")"); done
  rm -f "$@"
  [[ ${#pids[@]} -gt 0 ]] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "${pids[@]}" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

stop() {
  # Cancel leftover jobs first so no slurmstepd/job process outlives the daemons. (Processes a job
  # script left behind after it exited, e.g. `cmd &` never waited for, are reparented to init and
  # untracked by proctrack/linuxproc: neither Slurm nor this script can find them.)
  if pid_alive "$STATE/slurmctld.pid"; then
    local jobs; jobs=$(squeue -h -o %A 2>/dev/null) || true
    # shellcheck disable=SC2086
    [[ -z $jobs ]] || scancel $jobs 2>/dev/null || true
    # A job that traps SIGTERM gets KillWait (30 s) before SIGKILL, so wait a bit longer than that.
    for _ in $(seq 400); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.1; done
  fi
  kill_pidfiles "$STATE"/slurmd.node*.pid "$STATE/slurmctld.pid"
  kill_pidfiles "$STATE/munged.pid"   # last: slurm daemons talk to munge while shutting down
  true
}

case $CMD in
  start) start ;;
  stop) stop ;;
  status) pid_alive "$STATE/slurmctld.pid" && nodes_idle ;;
  *) usage ;;
esac
