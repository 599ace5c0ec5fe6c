#!/usr/bin/env bash
# A private single-node SLURM cluster for capsfus development and tests.
#
#   bash slurm/cluster.sh install   apt-get install slurmctld slurmd slurm-client munge
#   bash slurm/cluster.sh start     (re)start a fresh cluster from clean state
#   bash slurm/cluster.sh stop      stop the daemons this script started
#   bash slurm/cluster.sh status    sinfo + squeue; exit 0 if up
#   bash slurm/cluster.sh env       print `export SLURM_CONF=...` (use with eval)
#
# Everything lives in ${CAPSFUS_SLURM_DIR:-/tmp/capsfus-slurm} and is selected with SLURM_CONF;
# /etc/slurm is never written, and the script refuses to start next to a cluster it did not
# start. Options (environment, read by `start`):
#   CAPSFUS_SLURM_GPUS=N         declare N fake GPUs (GRES gpu, dummy device files)      [0]
#   CAPSFUS_SLURM_MAX_ARRAY=N    MaxArraySize                                           [1001]
#   CAPSFUS_SLURM_CPUS=N         logical CPUs of the node (> nproc oversubscribes)   [max(nproc,8)]
#   CAPSFUS_SLURM_PORT=P         slurmctld port; slurmd uses P+1                        [6817]
#   CAPSFUS_SLURM_TIMEOUT=S      how long `start` waits for the node to be idle         [60]
#   CAPSFUS_SLURM_IGNORE_SYSTEM_CONF=1   start even if /etc/slurm/slurm.conf exists (it is
#                                never read or written; use only if that cluster is not
#                                running on this host)
# Needs root (the daemons run as root; munged runs as user munge).
set -euo pipefail

DIR="${CAPSFUS_SLURM_DIR:-/tmp/capsfus-slurm}"
DIR=$(realpath -m -- "$DIR")
CONF="$DIR/slurm.conf"
MARK="$DIR/.capsfus-slurm"
PKGS=(slurmctld slurmd slurm-client munge)

say() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (the SLURM daemons run as root)"; }

# ------------------------------------------------------------------------------ install
cmd_install() {
    need_root
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "already installed: ${PKGS[*]}"
        return 0
    fi
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${PKGS[@]}" >/dev/null
    say "installed: ${PKGS[*]}"
}

# ------------------------------------------------------------------------------ helpers
# Is pid $1 a process this script started for $DIR? Our daemons get `-f $CONF` on their
# command line and SLURM_CONF=$CONF in their environment; slurmstepd inherits the latter.
is_ours() {
    local pid=$1
    [ -r "/proc/$pid/cmdline" ] || return 1
    if { tr '\0' '\n' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qxF -- "$CONF"; then return 0; fi
    { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF -- "SLURM_CONF=$CONF"
}

live() {  # pid $1 exists and is not a zombie (a daemon's exited parent may linger as one)
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

pids_named() {  # live processes named exactly $1
    local pid
    for pid in $(pgrep -x "$1" 2>/dev/null || true); do
        if live "$pid"; then echo "$pid"; fi
    done
}

our_pids() {  # slurmctld, slurmd and slurmstepd processes that belong to $DIR
    local name pid
    for name in slurmctld slurmd slurmstepd; do
        for pid in $(pids_named "$name"); do
            if is_ours "$pid"; then echo "$pid"; fi
        done
    done
    for name in slurmctld slurmd; do
        if [ -s "$DIR/run/$name.pid" ]; then
            pid=$(cat "$DIR/run/$name.pid")
            if live "$pid" && is_ours "$pid"; then echo "$pid"; fi
        fi
    done
}

foreign_daemons() {  # slurmctld/slurmd processes that this script (for $DIR) did not start
    local name pid
    for name in slurmctld slurmd; do
        for pid in $(pids_named "$name"); do
            if ! is_ours "$pid"; then
                echo "$name pid $pid: $({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null)"
            fi
        done
    done
}

check_no_foreign_cluster() {
    local foreign
    foreign=$(foreign_daemons)
    if [ -n "$foreign" ]; then
        say "refusing to start: SLURM daemons not started by this script (for $DIR) are running:"
        printf '  %s\n' "$foreign" >&2
        say "this script does not touch an existing cluster; stop it yourself, or run"
        say "'CAPSFUS_SLURM_DIR=<its dir> bash slurm/cluster.sh stop' if another capsfus dir owns it"
        exit 2
    fi
    if [ -e /etc/slurm/slurm.conf ] && [ "${CAPSFUS_SLURM_IGNORE_SYSTEM_CONF:-0}" != 1 ]; then
        say "refusing to start: /etc/slurm/slurm.conf exists, so a system cluster seems configured"
        say "on this host. This script never reads or writes it; if that cluster is not running"
        say "here, set CAPSFUS_SLURM_IGNORE_SYSTEM_CONF=1 (or use that cluster directly)."
        exit 2
    fi
}

kill_ours() {
    local pids pid i
    pids=$(our_pids | sort -u)
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 1 50); do
        local alive=""
        for pid in $pids; do if live "$pid"; then alive="$alive $pid"; fi; done
        [ -z "$alive" ] && return 0
        sleep 0.2
    done
    say "killing (SIGKILL) daemons that did not stop:$alive"
    # shellcheck disable=SC2086
    kill -KILL $alive 2>/dev/null || true
    sleep 0.5
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then return 0; fi
    id munge >/dev/null 2>&1 || die "user munge is missing: run 'bash slurm/cluster.sh install'"
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
        else
            create-munge-key -f
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if [ -z "$(pids_named munged)" ]; then
        runuser -u munge -- /usr/sbin/munged
    else
        say "munged is running but does not answer yet; waiting"
    fi
    local i
    for i in $(seq 1 50); do munge_ok && return 0; sleep 0.2; done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

log_tails() {
    local f
    for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log; do
        [ -e "$f" ] || continue
        printf '\n----- tail of %s -----\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
}

check_options() {  # before anything is stopped or wiped
    local v
    v=${CAPSFUS_SLURM_GPUS:-0};        [[ "$v" =~ ^[0-9]+$ ]] || die "CAPSFUS_SLURM_GPUS must be >= 0, got '$v'"
    v=${CAPSFUS_SLURM_MAX_ARRAY:-1001}; [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "CAPSFUS_SLURM_MAX_ARRAY must be >= 1, got '$v'"
    v=${CAPSFUS_SLURM_CPUS:-8};        [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "CAPSFUS_SLURM_CPUS must be >= 1, got '$v'"
    v=${CAPSFUS_SLURM_PORT:-6817};     [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "CAPSFUS_SLURM_PORT must be a port, got '$v'"
    v=${CAPSFUS_SLURM_TIMEOUT:-60};    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "CAPSFUS_SLURM_TIMEOUT must be >= 1, got '$v'"
}

write_config() {
    local node cpus mem gpus maxarr port gres_node="" gres_types=""
    node=$(hostname -s)
    local nproc_; nproc_=$(nproc)
    cpus=${CAPSFUS_SLURM_CPUS:-$(( nproc_ > 8 ? nproc_ : 8 ))}
    mem=$(awk '/^MemTotal:/ {printf "%d", $2/1024 * 0.9}' /proc/meminfo)
    gpus=${CAPSFUS_SLURM_GPUS:-0}
    maxarr=${CAPSFUS_SLURM_MAX_ARRAY:-1001}
    port=${CAPSFUS_SLURM_PORT:-6817}

    {
        echo "# written by capsfus slurm/cluster.sh; only $DIR/dev/fakegpu* files, no real devices"
        echo "AutoDetect=off"
    } >"$DIR/gres.conf"
    if [ "$gpus" -gt 0 ]; then
        local i
        # slurmd wants character devices: each fake GPU is a node with /dev/null's numbers
        # (1:3), harmless to open; fall back to plain files (slurmd then logs "not a valid
        # character or block device" and sets no CUDA_VISIBLE_DEVICES)
        for i in $(seq 0 $((gpus - 1))); do
            if ! mknod -m 0666 "$DIR/dev/fakegpu$i" c 1 3 2>/dev/null; then
                say "warning: mknod failed; $DIR/dev/fakegpu$i is a plain file: no CUDA_VISIBLE_DEVICES"
                : >"$DIR/dev/fakegpu$i"
            fi
        done
        echo "NodeName=$node Name=gpu File=$DIR/dev/fakegpu[0-$((gpus - 1))]" >>"$DIR/gres.conf"
        gres_types="GresTypes=gpu"
        gres_node="Gres=gpu:$gpus"
    fi

    # MaxJobCount must leave room for a whole array plus other jobs.
    local maxjobs=$(( maxarr * 2 > 10000 ? maxarr * 2 : 10000 ))
    cat >"$CONF" <<EOF
# capsfus single-node development cluster, written by slurm/cluster.sh (regenerated on start)
ClusterName=capsfus
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the node declares CPUs=$cpus on $(nproc) real cores: trust the config, not the hardware
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# schedule batch jobs at submission (default: up to 3 s later), backfill every second
SchedulerParameters=batch_sched_delay=0,bf_interval=1
PreemptType=preempt/none
ReturnToService=2
JobRequeue=1
MaxArraySize=$maxarr
MaxJobCount=$maxjobs
SlurmctldTimeout=10
SlurmdTimeout=10
InactiveLimit=0
KillWait=2
MinJobAge=5
Waittime=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
$gres_types
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

prepare_dir() {
    if [ -e "$DIR" ] && [ ! -e "$MARK" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
        die "$DIR exists, is not empty and was not made by this script; choose another CAPSFUS_SLURM_DIR"
    fi
    mkdir -p "$DIR"
    touch "$MARK"
    # clean state: only what this script creates
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/dev"
    rm -f "$DIR/slurm.conf" "$DIR/gres.conf"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/dev"
    chmod 0755 "$DIR" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/dev"
}

node_state() { SLURM_CONF="$CONF" sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

# ------------------------------------------------------------------------------ commands
cmd_start() {
    need_root
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        && command -v munged >/dev/null || die "SLURM/munge not installed: run 'bash slurm/cluster.sh install'"
    check_options
    check_no_foreign_cluster
    local t0=$SECONDS
    if [ -e "$MARK" ]; then
        cancel_jobs
        kill_ours
    fi
    prepare_dir
    write_config
    start_munge
    export SLURM_CONF="$CONF"
    /usr/sbin/slurmctld -f "$CONF" || { log_tails; die "slurmctld did not start"; }
    local i
    for i in $(seq 1 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    /usr/sbin/slurmd -f "$CONF" || { log_tails; kill_ours; die "slurmd did not start"; }
    local timeout=${CAPSFUS_SLURM_TIMEOUT:-60} state=""
    local deadline=$(( SECONDS + timeout ))
    while [ $SECONDS -lt $deadline ]; do
        state=$(node_state)
        case "$state" in idle) break ;; esac
        sleep 0.25
    done
    if [ "$state" != idle ]; then
        say "node did not become idle within ${timeout}s (state: '${state:-unknown}')"
        SLURM_CONF="$CONF" scontrol show node 2>&1 | grep -E "State=|Reason=" >&2 || true
        log_tails
        kill_ours
        exit 1
    fi
    say "cluster up in $((SECONDS - t0))s: node $(hostname -s) idle; SLURM_CONF=$CONF"
    say "use it with: eval \"\$(bash $0 env)\""
}

cancel_jobs() {
    # cancel our jobs so no slurmstepd outlives the daemons; ignore a controller that is down
    if SLURM_CONF="$CONF" timeout 5 scontrol ping >/dev/null 2>&1; then
        local jobs
        jobs=$(SLURM_CONF="$CONF" timeout 5 squeue -h -o '%A' 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            SLURM_CONF="$CONF" timeout 5 scancel $jobs 2>/dev/null || true
            sleep 1
        fi
    fi
}

cmd_stop() {
    if [ ! -e "$MARK" ]; then say "nothing to stop in $DIR"; return 0; fi
    cancel_jobs
    kill_ours
    rm -f "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid"
    say "stopped (munged left running)"
}

cmd_status() {
    export SLURM_CONF="$CONF"
    if [ ! -e "$CONF" ] || ! scontrol ping >/dev/null 2>&1 || ! scontrol ping | grep -q UP; then
        echo "capsfus slurm cluster ($DIR): not running"
        return 1
    fi
    echo "capsfus slurm cluster: SLURM_CONF=$CONF"
    sinfo
    echo
    squeue
    [ "$(node_state)" != "" ]
}

cmd_env() { echo "export SLURM_CONF=$CONF"; }

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 64 ;;
esac
