#!/usr/bin/env bash
# Starts a one-node Slurm cluster on this machine (Debian, as root) for the Slurm tests.
#
# Idempotent: installs slurmctld/slurmd/slurm-client/munge only when missing, keeps an existing
# munge key, rewrites slurm.conf only when it changes, and (re)starts only daemons that are not
# running. Waits until `sinfo` shows the node idle; prints diagnostics and exits non-zero otherwise.
# Overrides: SLURM_UP_TIMEOUT (seconds to wait for the node, default 60).
set -euo pipefail

timeout_s="${SLURM_UP_TIMEOUT:-60}"
conf=/etc/slurm/slurm.conf
node="$(hostname -s)"

log() { echo "slurm_up: $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "slurm_up: must run as root" >&2
  exit 1
fi

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not try to start services: there may be no init system here, and
  # this script starts the daemons itself once the configuration is written.
  local policy=/usr/sbin/policy-rc.d had_policy=1
  if [ ! -e "$policy" ]; then
    had_policy=0
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  [ "$had_policy" = 1 ] || rm -f "$policy"
}

start_munge() {
  mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --force --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
  fi
  chmod 0400 /etc/munge/munge.key
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    # --force: munged refuses to run as root, or with a stale socket, without it.
    munged --force
  fi
}

write_conf() {
  local cpus mem tmp
  cpus="$(nproc)"
  # Leave ~5% of the memory to the system so jobs with --mem defaults still fit.
  mem="$(free -m | awk '/^Mem:/ {print int($2 * 0.95)}')"
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  tmp="$(mktemp)"
  cat >"$tmp" <<CONF
# Written by .ci/slurm_up.sh: one-node test cluster.
ClusterName=jaxmm-ci
SlurmctldHost=${node}(127.0.0.1)
AuthType=auth/munge
# Job credentials live 30 s instead of 120 s; a requeued job must wait that long before it may
# start again (earlier, slurmd still holds the revoked credential and kills the new start).
AuthInfo=cred_expire=30
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
# Keep finished jobs visible to scontrol for 10 minutes (there is no accounting database).
MinJobAge=600
KillWait=30
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
CONF
  if [ -f "$conf" ] && cmp -s "$tmp" "$conf"; then
    rm -f "$tmp"
    return 1
  fi
  log "writing $conf (CPUs=$cpus RealMemory=${mem}MiB)"
  mv "$tmp" "$conf"
  chmod 0644 "$conf"
}

# Alive = the pid in the daemon's pid file is that daemon and not a zombie (a daemon that exited
# can linger as a zombie when its parent does not reap it).
running() {
  local pidfile="/run/$1.pid" pid
  [ -s "$pidfile" ] || return 1
  pid="$(cat "$pidfile")"
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ]
}

start_daemons() {
  local changed="$1"
  if [ "$changed" = 1 ]; then
    # A new configuration needs fresh daemons; pids from their own pid files, not by name.
    local daemon
    for daemon in slurmd slurmctld; do
      running "$daemon" && kill "$(cat "/run/$daemon.pid")" 2>/dev/null
    done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      running slurmd || running slurmctld || break
      sleep 1
    done
  fi
  if ! running slurmctld; then
    # -c: forget jobs saved by an earlier cluster, which would otherwise run again now.
    log "starting slurmctld"
    slurmctld -c
  fi
  if ! running slurmd; then
    log "starting slurmd"
    slurmd
  fi
}

wait_idle() {
  local deadline=$((SECONDS + timeout_s)) state=""
  while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(sinfo -h -n "$node" -o '%t' 2>/dev/null | head -n1 || true)"
    case "$state" in
      idle|mix|alloc) log "node $node is $state"; return 0 ;;
      down*|drain*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  echo "slurm_up: node $node not idle after ${timeout_s}s (state: '${state}')" >&2
  sinfo -N -l >&2 || true
  scontrol show node "$node" >&2 || true
  tail -n 30 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  return 1
}

install_packages
start_munge
if write_conf; then changed=1; else changed=0; fi
start_daemons "$changed"
wait_idle
