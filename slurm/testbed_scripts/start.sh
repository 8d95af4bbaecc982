#!/usr/bin/env bash
# Idempotent: install, configure and start a single-node Slurm cluster on localhost
# (munged + MariaDB + slurmdbd + slurmctld + slurmd), then wait until the node is idle.
# Safe to run again: installed packages are skipped, running daemons are left alone,
# and daemons are restarted only if the generated config changed.
#   testbed start.sh --fresh      first stop everything and delete all state (jobs, DB, logs);
#                               a cold start (no slurm daemon alive) does this too unless
#                               SLURM_KEEP_STATE=1
#   testbed start.sh --nodes 2    two nodes, h0 and h1, each a network namespace with its own address
#                               (10.98.0.1, .2 on bridge ddpslurm0 = 10.98.0.254, no route out),
#                               hostname and /etc/hosts, running its own slurmd; slurmctld, slurmdbd and
#                               MariaDB stay in this namespace. A change of node count is a fresh start.
#
#   DDP_SLURM_TESTBED_DIR=/var/tmp/ddp-slurm-testbed   where config, state, spool, logs and the DB live
#   SLURM_WITH_DBD=1            0 = no slurmdbd/MariaDB (then `sacct` fails, and submitit
#                               cannot see job states: cancelled jobs make job.result() hang)
set -euo pipefail

S=${DDP_SLURM_TESTBED_DIR:-/var/tmp/ddp-slurm-testbed}
WITH_DBD=${SLURM_WITH_DBD:-1}
FRESH=0
NODES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --fresh) FRESH=1 ;;
    --nodes) NODES=$2; shift ;;
    *) echo "[testbed start] ERROR: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case "$NODES" in 1|2) ;; *) echo "[testbed start] ERROR: --nodes must be 1 or 2, not $NODES" >&2; exit 2 ;; esac
SUBNET=10.98.0                 # the two-node network: only inside the namespaces and the bridge
BRIDGE=ddpslurm0
MYSQL_SOCK=/run/mysqld/mysqld.sock
log() { echo "[testbed start $(date +%T)] $*"; }
die() { echo "[testbed start] ERROR: $*" >&2; exit 1; }

# is_running PIDFILE COMM: pid in file is alive and really is COMM (guards against pid reuse)
is_running() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] && alive "$pid"
}
# alive = exists and not a zombie (PID 1 here reaps orphans only every ~2s, so kill -0 lies)
alive() { local st; st=$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }
# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2s
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "timed out after ${secs}s waiting for: $what"
    sleep 0.2
  done
}

# ---------------------------------------------------------------- 0. cold start => fresh state
# If no Slurm daemon and no job step is alive, nothing can be running, and state left by an
# unclean stop (kill -9, a session ending) would bring back "RUNNING" jobs whose processes are
# gone; cancelling those still leaves the node busy 60-90s. So a cold start wipes $S (state,
# spool, logs, accounting DB) unless SLURM_KEEP_STATE=1. --fresh wipes it in any case.
if [ -d "$S" ]; then
  cold=0
  if ! is_running "$S/slurmctld.pid" slurmctld && ! is_running "$S/slurmd.pid" slurmd \
     && ! is_running "$S/slurmd-h0.pid" slurmd && ! pgrep -x slurmstepd >/dev/null; then cold=1; fi
  resized=0
  [ -s "$S/nodes" ] && [ "$(cat "$S/nodes")" != "$NODES" ] && resized=1
  if [ $FRESH = 1 ] || [ $resized = 1 ] || { [ $cold = 1 ] && [ "${SLURM_KEEP_STATE:-0}" != 1 ]; }; then
    log "fresh start: removing old state in $S"
    DDP_SLURM_TESTBED_DIR=$S "$(dirname "$(readlink -f "$0")")/stop.sh" --purge >/dev/null
  fi
fi

# ---------------------------------------------------------------- 1. packages
PKGS="munge slurmctld slurmd slurm-client"
[ "$WITH_DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  t0=$SECONDS
  apt-get update -qq
  # --no-install-recommends: otherwise ~40 packages (hdf5, rrd, ipmi, influxdb plugins...)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  log "installed in $((SECONDS - t0))s"
else
  log "packages already installed"
fi

# ---------------------------------------------------------------- 2. directories + config
mkdir -p "$S/state" "$S/log" /etc/slurm
echo "$NODES" > "$S/nodes"
if [ "$NODES" = 1 ]; then NODE_NAMES=localhost; mkdir -p "$S/spool"; else NODE_NAMES="h0 h1"; mkdir -p "$S/spool-h0" "$S/spool-h1"; fi
# slurmd_pid NODE: the pid file of that node's slurmd
slurmd_pid() { if [ "$NODES" = 1 ]; then echo "$S/slurmd.pid"; else echo "$S/slurmd-$1.pid"; fi; }

# Node line from the hardware slurmd actually sees (CPUs, sockets/cores, RealMemory), so the
# config matches this machine exactly (with only CPUs=2, slurmd logs "Node reconfigured
# socket/core boundaries SocketsPerBoard=2:1(hw) CoresPerSocket=1:2(hw)").
HW=$(slurmd -C | head -1)
HW=${HW#NodeName=* }                                 # drop "NodeName=<hostname>"
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
[ -n "$CPUS" ] || die "could not parse 'slurmd -C' output: $HW"

if [ "$WITH_DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi

if [ "$NODES" = 1 ]; then
  CTLD_HOST=localhost
  NODE_LINES="NodeName=localhost NodeAddr=127.0.0.1 $HW
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"
  SLURMD_FILES="SlurmdSpoolDir=$S/spool
SlurmdPidFile=$S/slurmd.pid
SlurmdLogFile=$S/log/slurmd.log"
else
  # slurmds in the namespaces reach slurmctld at the bridge's address; both nodes see all CPUs
  # (oversubscribed on purpose: jobs here are small)
  CTLD_HOST="localhost($SUBNET.254)"
  NODE_LINES="NodeName=h0 NodeAddr=$SUBNET.1 $HW
NodeName=h1 NodeAddr=$SUBNET.2 $HW
PartitionName=debug Nodes=h0,h1 Default=YES MaxTime=INFINITE State=UP"
  SLURMD_FILES="SlurmdSpoolDir=$S/spool-%n
SlurmdPidFile=$S/slurmd-%n.pid
SlurmdLogFile=$S/log/slurmd-%n.log
# a node that stops answering is DOWN after 15 s (default 300 s), so its jobs end as NODE_FAIL
SlurmdTimeout=15"
fi

cat > "$S/slurm.conf.new" <<EOF
# generated by testbed start.sh
ClusterName=testbed
SlurmctldHost=$CTLD_HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job is held (default 120s)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$S/state
SlurmctldPidFile=$S/slurmctld.pid
SlurmctldLogFile=$S/log/slurmctld.log
$SLURMD_FILES
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
$ACCT
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# default batch_sched_delay=3 makes back-to-back sbatch jobs wait ~3s each; default
# sched_interval=60 lets a requeued job wait up to ~60s more after its hold ends
SchedulerParameters=batch_sched_delay=0,sched_interval=1
ReturnToService=2
# SIGTERM->SIGKILL grace for cancelled/requeued steps (default 30s; submitit ignores SIGTERM,
# so every cancel/requeue of a submitit job otherwise holds the CPUs for 30s)
KillWait=5
MailProg=/bin/true
$NODE_LINES
EOF

CONF_CHANGED=0
if ! cmp -s "$S/slurm.conf.new" "$S/slurm.conf"; then
  mv "$S/slurm.conf.new" "$S/slurm.conf"; CONF_CHANGED=1
  log "wrote $S/slurm.conf"
else
  rm -f "$S/slurm.conf.new"
fi
# clients (sbatch/srun/squeue/submitit) read /etc/slurm/slurm.conf: no SLURM_CONF needed
ln -sfn "$S/slurm.conf" /etc/slurm/slurm.conf

if [ "$WITH_DBD" = 1 ]; then
  cat > "$S/slurmdbd.conf.new" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
LogFile=$S/log/slurmdbd.log
PidFile=$S/slurmdbd.pid
EOF
  if ! cmp -s "$S/slurmdbd.conf.new" "$S/slurmdbd.conf"; then
    mv "$S/slurmdbd.conf.new" "$S/slurmdbd.conf"; CONF_CHANGED=1
  else
    rm -f "$S/slurmdbd.conf.new"
  fi
  chmod 600 "$S/slurmdbd.conf"          # slurmdbd refuses a group/world-readable file
  ln -sfn "$S/slurmdbd.conf" /etc/slurm/slurmdbd.conf
fi

# a changed config needs every Slurm daemon restarted, or slurmctld logs
# "Node localhost appears to have a different slurm.conf than the slurmctld"
if [ "$CONF_CHANGED" = 1 ]; then
  for f in $(for n in $NODE_NAMES; do slurmd_pid "$n"; done) "$S/slurmctld.pid" "$S/slurmdbd.pid"; do
    d=$(basename "$f" .pid); d=${d%-h[01]}
    if is_running "$f" "$d"; then
      pid=$(cat "$f"); log "config changed: stopping $d (pid $pid)"
      kill "$pid"
      for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    fi
  done
fi

# ---------------------------------------------------------------- 2b. two nodes: their network
# A bridge in this namespace and one veth per node; the root namespace then routes $SUBNET.0/24 to
# the bridge, so nothing addressed to the nodes leaves the machine (checked below). Each node's
# /etc/hosts names h0, h1 and the controller, so a node's hostname resolves to its own address
# (Gloo and the c10d rendezvous take their address from it).
if [ "$NODES" = 2 ]; then
  printf '127.0.0.1 localhost\n%s.254 ctl\n%s.1 h0\n%s.2 h1\n' $SUBNET $SUBNET $SUBNET > "$S/hosts"
  if ! ip link show $BRIDGE >/dev/null 2>&1; then
    ip link add $BRIDGE type bridge
    ip addr add $SUBNET.254/24 dev $BRIDGE
    ip link set $BRIDGE up
  fi
  for i in 0 1; do
    ns=ddp-slurm-h$i
    if ! [ -e "/run/netns/$ns" ]; then
      ip link del "ddpslurm-h$i" 2>/dev/null || true     # the root end of a veth left by a deleted namespace
      ip netns add "$ns"
      ip link add "ddpslurm-h$i" type veth peer name eth0 netns "$ns"
      ip link set "ddpslurm-h$i" master $BRIDGE up
      ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    fi
    ip -n "$ns" link set eth0 up                        # a node whose link was taken down comes back
  done
  for i in 1 2; do
    ip route get $SUBNET.$i | grep -q "dev $BRIDGE" || die "$SUBNET.$i is not routed to $BRIDGE: refusing to go on"
  done
fi

# ---------------------------------------------------------------- 3. munge
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already running"
else
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged          # daemonizes; pid in /run/munge/munged.pid
  wait_for 10 munged sh -c 'munge -n | unmunge'
  log "munged started (pid $(cat /run/munge/munged.pid))"
fi

# ---------------------------------------------------------------- 4. MariaDB + slurmdbd
if [ "$WITH_DBD" = 1 ]; then
  if is_running "$S/mysql/mysqld.pid" mariadbd; then
    log "mariadbd already running"
  else
    install -d -o mysql -g mysql "$S/mysql" /run/mysqld
    if [ ! -d "$S/mysql/mysql" ]; then
      mariadb-install-db --user=mysql --datadir="$S/mysql" --skip-test-db > "$S/log/mariadb-install-db.log" 2>&1
    fi
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$S/mysql" \
      --socket=$MYSQL_SOCK --skip-networking --pid-file="$S/mysql/mysqld.pid" \
      --log-error="$S/mysql/mysqld.err" --innodb-buffer-pool-size=1024M \
      --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadbd mariadb-admin --socket=$MYSQL_SOCK ping
    log "mariadbd started (pid $(cat "$S/mysql/mysqld.pid"))"
  fi
  mariadb --socket=$MYSQL_SOCK -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  if is_running "$S/slurmdbd.pid" slurmdbd; then
    log "slurmdbd already running"
  else
    /usr/sbin/slurmdbd                           # daemonizes
    wait_for 60 slurmdbd sacctmgr -n -P show cluster
    log "slurmdbd started (pid $(cat "$S/slurmdbd.pid"))"
  fi
fi

# ---------------------------------------------------------------- 5. slurmctld + slurmd
if is_running "$S/slurmctld.pid" slurmctld; then
  log "slurmctld already running"
else
  /usr/sbin/slurmctld                            # daemonizes; registers the cluster in slurmdbd
  wait_for 30 slurmctld scontrol ping
  log "slurmctld started (pid $(cat "$S/slurmctld.pid"))"
fi
SLURMD_T0=0
STARTED=""                   # the nodes whose slurmd this run started
start_slurmd() {   # start_slurmd NODE
  if [ "$NODES" = 1 ]; then
    /usr/sbin/slurmd -N localhost                # -N: node name is 'localhost', not $(hostname)
  else
    # nsenter --net, not 'ip netns exec': the latter remounts /sys, and slurmd then dies with "No
    # filesystem mounted on /sys/fs/cgroup". unshare --uts --mount: its own hostname and /etc/hosts,
    # inherited by every job step; mounts made later in this namespace still reach it (slave).
    nsenter --net=/run/netns/ddp-slurm-$1 unshare --uts --mount --propagation slave sh -c \
      "mount --bind $S/hosts /etc/hosts && hostname $1 && exec /usr/sbin/slurmd -N $1"
  fi
}
for node in $NODE_NAMES; do
  if is_running "$(slurmd_pid "$node")" slurmd; then
    log "slurmd $node already running"
  else
    [ "$SLURMD_T0" != 0 ] || SLURMD_T0=$(date +%s)
    STARTED="$STARTED $node"
    start_slurmd "$node"
    wait_for 30 "slurmd $node" is_running "$(slurmd_pid "$node")" slurmd
    log "slurmd $node started (pid $(cat "$(slurmd_pid "$node")"))"
  fi
done

# ---------------------------------------------------------------- 6. stale jobs
# After an unclean stop (kill -9, machine reset) slurmctld recovers jobs as RUNNING from its
# last state save; their processes are gone and they hold the node until their time limit.
# With no slurmstepd alive nothing can really be running, so cancel them.
if [ "$SLURMD_T0" != 0 ] && ! pgrep -x slurmstepd >/dev/null; then
  stale=$(squeue -h -t RUNNING,COMPLETING,SUSPENDED -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${stale// /}" ]; then
    # only reachable with SLURM_KEEP_STATE=1; the node then stays 'mixed' for 60-90s
    log "cancelling stale jobs recovered from saved state: $stale (node busy 60-90s)"
    scancel $stale || true
  fi
fi

# ---------------------------------------------------------------- 7. wait for idle nodes
node_state() { sinfo -h -n "$1" -o %T 2>/dev/null; }
# after a slurmctld restart a node shows the *saved* state (idle) before slurmd has
# registered, so also require that slurmd registered after we started it
registered() {
  local t
  case " $STARTED " in *" $1 "*) ;; *) return 0 ;; esac      # a slurmd left running registered long ago
  t=$(scontrol show node "$1" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
  [ -n "$t" ] && [ "$t" != None ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge $((SLURMD_T0 - 1)) ]
}
end=$((SECONDS + ${SLURM_IDLE_TIMEOUT:-90}))
for node in $NODE_NAMES; do
  while :; do
    st=$(node_state "$node")
    case "$st" in
      idle) registered "$node" && break ;;
      down*|drain*|drained*|fail*)
        # e.g. left DOWN in StateSaveLocation by an unclean stop
        scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
    esac
    [ $SECONDS -lt $end ] || die "node $node not idle after ${SLURM_IDLE_TIMEOUT:-90}s (state '$st'); see $S/log/ or use --fresh"
    sleep 0.2
  done
done
# smoke test: a real step with one task per CPU on every node
srun -N"$NODES" -n$((CPUS * NODES)) -t 1 true || die "srun smoke test failed; see $S/log/"
log "$NODES node(s) idle, srun works:"
sinfo
