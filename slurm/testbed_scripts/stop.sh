#!/usr/bin/env bash
# Stop what start.sh started, by the pids in its pid files (never by name).
#   testbed stop.sh          stop daemons, keep state/DB/logs
#   testbed stop.sh --purge  also delete $DDP_SLURM_TESTBED_DIR (state, spool, logs, MariaDB datadir)
set -uo pipefail
S=${DDP_SLURM_TESTBED_DIR:-/var/tmp/ddp-slurm-testbed}
log() { echo "[testbed stop $(date +%T)] $*"; }
# alive = exists and not a zombie (PID 1 here reaps orphans only every ~2s, so kill -0 lies)
alive() { local st; st=$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }

stop_pid() {   # stop_pid PIDFILE COMM
  local pf=$1 comm=$2 pid
  [ -s "$pf" ] || { log "$comm: no pid file"; return 0; }
  pid=$(cat "$pf")
  if [ -z "$pid" ] || [ "$(cat /proc/"$pid"/comm 2>/dev/null)" != "$comm" ]; then
    log "$comm: not running (stale pid file)"; rm -f "$pf"; return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then log "$comm ($pid) ignored SIGTERM for 15s: SIGKILL"; kill -KILL "$pid"; fi
  rm -f "$pf"
  log "$comm ($pid) stopped"
}

# cancel remaining jobs so no slurmstepd/job processes outlive slurmd
if scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then log "cancelling jobs: $jobs"; scancel $jobs; sleep 1; fi
fi

stop_pid "$S/slurmd.pid"          slurmd
for node in h0 h1; do [ -e "$S/slurmd-$node.pid" ] && stop_pid "$S/slurmd-$node.pid" slurmd; done
stop_pid "$S/slurmctld.pid"       slurmctld
stop_pid "$S/slurmdbd.pid"        slurmdbd
stop_pid "$S/mysql/mysqld.pid"    mariadbd
stop_pid /run/munge/munged.pid    munged

# the two-node network: the namespaces and bridge start.sh --nodes 2 made (by their names); any process
# still inside a namespace (a job step's leftovers) belongs to this testbed
for ns in ddp-slurm-h0 ddp-slurm-h1; do
  if [ -e "/run/netns/$ns" ]; then
    pids=$(ip netns pids "$ns" | tr '\n' ' ')
    [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null
    ip netns del "$ns" && log "removed namespace $ns"
  fi
done
ip link show ddpslurm0 >/dev/null 2>&1 && ip link del ddpslurm0 && log "removed bridge ddpslurm0"

if [ "${1:-}" = --purge ]; then
  rm -rf "$S"
  for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do [ -L "$f" ] && rm -f "$f"; done
  log "purged $S"
fi
