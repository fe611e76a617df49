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
  # This libvirtd saw the drop-in when it started (see lab_hook_loaded).
  if [ "$name" = libvirtd ] && [ -x "$LAB_HOOK" ]; then echo "$pid" >"$LAB_STATE/libvirtd.hooked"; fi
  lab_log "started $name pid $pid"
}
# The nic-agent qemu hook. libvirtd reads /etc/libvirt/hooks/qemu.d/ only
# when it starts, so the drop-in goes in before libvirtd does. It runs this
# worktree's binary with the lab's state dirs (test_e2e_lifecycle.py starts
# the agent on the same dirs, so both share locks and records). libvirt runs
# hooks with a cleared environment: absolute paths only. The marker records
# that the lab installed it, so stop-services.sh removes only its own.
# /etc/libvirt/hooks/qemu (cloudstack-agent's) is never touched.
LAB_BIN=$(cd "$LAB_DIR/../.." && pwd)/target/debug/nic-agent
LAB_HOOK_TAG="# nic-agent lab hook: installed by tests/lab/start-libvirtd.sh, removed by stop-services.sh"
install_hook() {
  local tmp
  mkdir -p "$(dirname "$LAB_HOOK")"
  if [ -e "$LAB_HOOK" ] && [ ! -e "$LAB_STATE/hook.installed" ]; then
    lab_log "WARNING: $LAB_HOOK exists and was not installed by the lab; leaving it as it is"
    return 0
  fi
  tmp=$(mktemp "$LAB_HOOK.XXXXXX")
  cat >"$tmp" <<HOOKEOF
#!/bin/sh
$LAB_HOOK_TAG
PATH=/usr/sbin:/usr/bin:/sbin:/bin
RUST_LOG=info
export PATH RUST_LOG
# A stale drop-in (lab state gone, worktree removed) must not stop VMs from starting.
[ -d $LAB_STATE ] && [ -x $LAB_BIN ] || exit 0
echo "qemu \$*" >>$LAB_STATE/hook.log
exec $LAB_BIN hook --state-dir $LAB_STATE/hook-state --persist-dir $LAB_STATE/hook-persist --bridge-grace-s 0 qemu "\$@" 2>>$LAB_STATE/hook.log
HOOKEOF
  chmod 755 "$tmp"
  # Unchanged content keeps the file (and its mtime) as libvirtd saw it.
  if [ -e "$LAB_HOOK" ] && cmp -s "$tmp" "$LAB_HOOK"; then
    rm -f "$tmp"
  else
    mv -f "$tmp" "$LAB_HOOK"
    lab_log "installed $LAB_HOOK"
  fi
  echo "$LAB_HOOK" >"$LAB_STATE/hook.installed"
}
install_hook

start_daemon virtlogd
# A libvirtd the lab started before the hook was in place (or changed) has
# not read it: restart it (running guests survive). One the lab did not
# start is left alone, loudly: the lifecycle suite then fails.
if lab_pidfile_live /run/libvirtd.pid libvirtd && ! lab_hook_loaded; then
  pid=$(tr -dc '0-9' </run/libvirtd.pid)
  if [ -e "$LAB_STATE/libvirtd.started" ] && [ "$(tr -dc '0-9' <"$LAB_STATE/libvirtd.started")" = "$pid" ]; then
    lab_log "restarting lab-started libvirtd pid $pid so that it reads $LAB_HOOK"
    kill -TERM "$pid"
    lab_wait 60 bash -c "! kill -0 $pid" || lab_die "libvirtd pid $pid did not stop in 60 s"
    rm -f "$LAB_STATE/libvirtd.started"
  else
    lab_log "WARNING: ******************************************************************"
    lab_log "WARNING: libvirtd pid $pid was NOT started by the lab and has not read $LAB_HOOK."
    lab_log "WARNING: the nic-agent hook will not run; test_e2e_lifecycle.py will FAIL."
    lab_log "WARNING: stop that libvirtd (bash tests/lab/stop-services.sh if the lab started it) and re-run."
    lab_log "WARNING: ******************************************************************"
  fi
fi
start_daemon libvirtd

wait_ready() {
  local t0
  t0=$(lab_now)
  # virsh itself can hang while libvirtd probes QEMU capabilities on first start.
  lab_wait "$TIMEOUT" timeout 20 virsh -c qemu:///system version ||
    lab_die "virsh -c qemu:///system version still fails after ${TIMEOUT}s"
  lab_log "libvirtd ready (waited $(lab_elapsed "$t0" "$(lab_now)")s)"
}
wait_ready

# The nwfilter standard filters (libvirt-daemon-config-nwfilter, installed by
# install-deps.sh into /etc/libvirt/nwfilter) are read only when libvirtd
# starts. A lab-started libvirtd that predates them is restarted once
# (running guests survive); one the lab did not start is left alone, loudly.
nwfilter_loaded() {
  timeout 20 virsh -c qemu:///system nwfilter-list 2>/dev/null | grep -qw no-ipv6-spoofing
}
# A libvirtd that has just started may answer before its nwfilter driver has
# read the files (and ignores SIGTERM until its drivers are up): give it a
# moment before judging it, or a fresh daemon gets "restarted" and hangs.
if [ -e /etc/libvirt/nwfilter/no-ipv6-spoofing.xml ] && ! lab_wait 20 nwfilter_loaded; then
  pid=$(tr -dc '0-9' </run/libvirtd.pid)
  if [ -e "$LAB_STATE/libvirtd.started" ] && [ "$(tr -dc '0-9' <"$LAB_STATE/libvirtd.started")" = "$pid" ]; then
    lab_log "restarting lab-started libvirtd pid $pid so that it loads the standard nwfilters"
    kill -TERM "$pid"
    lab_wait 60 bash -c "! kill -0 $pid" || lab_die "libvirtd pid $pid did not stop in 60 s"
    rm -f "$LAB_STATE/libvirtd.started"
    start_daemon libvirtd
    wait_ready
    nwfilter_loaded || lab_log "WARNING: libvirtd still lists no standard nwfilters; test_e2e_antispoof.py will FAIL"
  else
    lab_log "WARNING: libvirtd pid $pid was NOT started by the lab and has not loaded the standard nwfilters; test_e2e_antispoof.py will FAIL"
  fi
fi
