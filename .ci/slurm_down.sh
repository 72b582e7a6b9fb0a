#!/usr/bin/env bash
# Stops the Slurm and munge daemons started by .ci/slurm_up.sh (packages, key and configuration
# stay, so the next slurm_up.sh only starts them again).
set -uo pipefail

# Stops the daemon whose pid file names it (never by process name: other instances may exist).
stop() {
  local name="$1" pidfile="$2" pid
  [ -s "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] &&
      [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || break
    sleep 1
  done
  echo "slurm_down: stopped $name"
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop munged /run/munge/munged.pid
exit 0
