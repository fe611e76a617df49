# shellcheck shell=bash
# Shared helpers for the nic-agent lab scripts. Sourced, never run.
#
# Why a shared file: every lab script needs the same state directory, the same
# "is this PID alive and really that program" check, and the same bounded wait,
# and getting those subtly different per script is how labs leak processes.

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Where we record what *we* created or started, so teardown touches nothing else.
LAB_STATE=${LAB_STATE:-/run/nic-agent-lab}
LAB_WORK=${LAB_WORK:-$LAB_DIR/work}
# The lab's nic-agent qemu hook (a libvirt drop-in; see start-libvirtd.sh).
LAB_HOOK=/etc/libvirt/hooks/qemu.d/nic-agent

lab_log() { echo "[$(basename "$0")] $*" >&2; }
lab_die() { lab_log "ERROR: $*"; exit 1; }

# lab_pid_is PID COMM: true when PID is alive and its comm is COMM (guards
# against acting on a recycled PID).
lab_pid_is() {
  local pid=$1 comm=$2 actual
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  actual=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$actual" = "$comm" ]
}

# lab_pidfile_live FILE COMM: true when FILE names a live COMM process.
lab_pidfile_live() {
  local f=$1 comm=$2 pid
  [ -r "$f" ] || return 1
  pid=$(tr -dc '0-9' <"$f")
  lab_pid_is "$pid" "$comm"
}

# lab_wait SECONDS CMD...: retries CMD every 0.2 s until it succeeds or time runs out.
lab_wait() {
  local secs=$1; shift
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# lab_stdio_only CMD...: runs CMD with only stdin, stdout and stderr open.
# For anything that starts a daemon: it must not inherit our other
# descriptors, one of which is the lock of `flock /tmp/nic-agent-lab.lock
# ...`; a libvirtd or ovsdb-server holding it keeps every later lab run
# waiting for as long as the daemon lives. (Python closes them: bash cannot
# list and close its inherited descriptors without touching its own.)
lab_stdio_only() {
  python3 -c 'import os, sys
os.closerange(3, os.sysconf("SC_OPEN_MAX"))
os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}

# lab_now: seconds since the epoch with milliseconds, for timings.
lab_now() { date +%s.%3N; }
lab_elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# lab_hook_loaded: true when the running libvirtd runs $LAB_HOOK, i.e. the
# drop-in is executable and libvirtd started with it in place: either the
# lab started this libvirtd with the hook present ($LAB_STATE/libvirtd.hooked
# holds its PID), or libvirtd started at least 2 s after the drop-in's mtime.
lab_hook_loaded() {
  local pid etimes mtime
  [ -x "$LAB_HOOK" ] || return 1
  lab_pidfile_live /run/libvirtd.pid libvirtd || return 1
  pid=$(tr -dc '0-9' </run/libvirtd.pid)
  if [ -r "$LAB_STATE/libvirtd.hooked" ] && [ "$(tr -dc '0-9' <"$LAB_STATE/libvirtd.hooked")" = "$pid" ]; then
    return 0
  fi
  etimes=$(ps -o etimes= -p "$pid" | tr -dc '0-9')
  mtime=$(stat -c %Y "$LAB_HOOK")
  [ -n "$etimes" ] && [ $(( $(date +%s) - etimes )) -ge $(( mtime + 2 )) ]
}
