#!/usr/bin/env bash
# start-libvirtd.sh: makes sure virtlogd and libvirtd run and answer on qemu:///system.
#
# Why: the lab host has no systemd, and libvirtd is shared by every helper and
# test. So: append the five qemu.conf lines this machine needs (only those not
# yet present), start each daemon by hand only if its pidfile does not name a
# live process, and record the PIDs we started under $LAB_STATE so
# stop-services.sh stops only what we started. Then wait (bounded) until virsh
# answers. Safe to run any number of times, also concurrently (flock).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

TIMEOUT=${LAB_LIBVIRTD_TIMEOUT:-60}
CONF=/etc/libvirt/qemu.conf
mkdir -p "$LAB_STATE"
exec 9>"$LAB_STATE/start-libvirtd.lock"
flock -w 120 9 || lab_die "another start-libvirtd.sh holds the lock"

conf_changed=0
for line in 'namespaces = [ ]' 'cgroup_controllers = [ ]' 'security_driver = "none"' 'user = "root"' 'group = "root"'; do
  if ! grep -qxF "$line" "$CONF"; then
    echo "$line" >>"$CONF"
    conf_changed=1
    lab_log "appended to $CONF: $line"
  fi
done

# start_daemon NAME: starts /usr/sbin/NAME -d unless /run/NAME.pid is live.
start_daemon() {
  local name=$1 pidfile=/run/$1.pid pid
  if lab_pidfile_live "$pidfile" "$name"; then
    if [ "$name" = libvirtd ] && [ "$conf_changed" = 1 ]; then
      lab_log "WARNING: $CONF changed but libvirtd (shared) is already running; not restarting it"
    fi
    return 0
  fi
  # -d daemonizes; setsid detaches it from our session. (-l fails here.)
  # lab_stdio_only: the daemon must not hold our lock (fd 9) or the caller's
  # `flock /tmp/nic-agent-lab.lock`.
  lab_stdio_only setsid "/usr/sbin/$name" -d
  lab_wait 20 lab_pidfile_live "$pidfile" "$name" || lab_die "$name did not write a live $pidfile"
  pid=$(tr -dc '0-9' <"$pidfile")
  echo "$pid" >"$LAB_STATE/$name.started"
  lab_log "started $name pid $pid"
}
start_daemon virtlogd
start_daemon libvirtd

t0=$(lab_now)
# virsh itself can hang while libvirtd probes QEMU capabilities on first start.
lab_wait "$TIMEOUT" timeout 20 virsh -c qemu:///system version ||
  lab_die "virsh -c qemu:///system version still fails after ${TIMEOUT}s"
lab_log "libvirtd ready (waited $(lab_elapsed "$t0" "$(lab_now)")s)"
