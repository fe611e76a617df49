#!/usr/bin/env bash
# stop-services.sh: stops only the daemons that start-libvirtd.sh / start-ovs.sh
# started (per their markers in $LAB_STATE), by PID, and removes the nic-agent
# hook drop-in start-libvirtd.sh installed.
#
# Why: libvirtd and OVS are shared with other helpers and may have been started
# by someone else; those must be left alone. A marker whose PID is dead or now
# belongs to another program is just removed. Running QEMU guests survive a
# libvirtd stop, so tear guests down first if that matters.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

stop_pid() {  # stop_pid PID COMM
  local pid=$1 comm=$2
  lab_pid_is "$pid" "$comm" || { lab_log "$comm pid $pid not running (or reused); skipping"; return 0; }
  kill -TERM "$pid"
  if ! lab_wait 15 bash -c "! kill -0 $pid"; then
    lab_log "$comm pid $pid ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  lab_log "stopped $comm pid $pid"
}

# libvirtd before virtlogd: libvirtd talks to virtlogd.
for name in libvirtd virtlogd; do
  m="$LAB_STATE/$name.started"
  [ -e "$m" ] || continue
  stop_pid "$(tr -dc '0-9' <"$m")" "$name"
  rm -f "$m"
done
rm -f "$LAB_STATE/libvirtd.hooked"
# The hook drop-in, only if start-libvirtd.sh installed it (and it is still ours).
m="$LAB_STATE/hook.installed"
if [ -e "$m" ]; then
  if [ -e "$LAB_HOOK" ] && grep -q '^# nic-agent lab hook' "$LAB_HOOK"; then
    rm -f "$LAB_HOOK"
    lab_log "removed $LAB_HOOK"
  fi
  rm -f "$m"
fi
m="$LAB_STATE/ovs.started"
if [ -e "$m" ]; then
  # vswitchd before the database it reads.
  for d in ovs-vswitchd ovsdb-server; do
    read -r pid mon < <(awk -v d="$d" '$1 == d { print $2, $3 }' "$m") || continue
    # The monitor first, so it cannot restart the daemon we stop next.
    [ -n "$mon" ] && [ "$mon" != - ] && stop_pid "$mon" monitor
    [ -n "$pid" ] && stop_pid "$pid" "$d"
  done
  rm -f "$m"
fi
