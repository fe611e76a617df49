#!/usr/bin/env bash
# start-ovs.sh: makes sure Open vSwitch (ovsdb-server + ovs-vswitchd) runs.
#
# Why: there is no systemd, and OVS tests need the daemons. This kernel has no
# openvswitch module, so bridges must use datapath_type=netdev (userspace);
# ovs-ctl still starts fine. We start it only if `ovs-vsctl show` fails, and
# record the PIDs we started so stop-services.sh stops only those.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

TIMEOUT=${LAB_OVS_TIMEOUT:-30}
mkdir -p "$LAB_STATE"
exec 9>"$LAB_STATE/start-ovs.lock"
flock -w 120 9 || lab_die "another start-ovs.sh holds the lock"

if timeout 5 ovs-vsctl --timeout=3 show >/dev/null 2>&1; then
  lab_log "ovs already running"
  exit 0
fi
# lab_stdio_only: the daemons must not inherit (and so hold) our lock or the
# caller's `flock /tmp/nic-agent-lab.lock`.
lab_stdio_only /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random >&2
lab_wait "$TIMEOUT" timeout 5 ovs-vsctl --timeout=3 show || lab_die "ovs-vsctl show still fails after ${TIMEOUT}s"
: >"$LAB_STATE/ovs.started.tmp"
for d in ovsdb-server ovs-vswitchd; do
  pid=$(tr -dc '0-9' <"/run/openvswitch/$d.pid" 2>/dev/null || true)
  lab_pid_is "$pid" "$d" || continue
  # ovs-ctl runs each daemon under a --monitor parent that would
  # restart it on a crash (its comm is "monitor"); record it too so
  # stop-services.sh can stop both.
  mon=$(awk '{ print $4 }' "/proc/$pid/stat" 2>/dev/null || true)
  lab_pid_is "$mon" monitor || mon=-
  echo "$d $pid $mon" >>"$LAB_STATE/ovs.started.tmp"
done
mv "$LAB_STATE/ovs.started.tmp" "$LAB_STATE/ovs.started"
lab_log "started ovs: $(tr '\n' ' ' <"$LAB_STATE/ovs.started")"
