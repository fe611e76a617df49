#!/usr/bin/env bash
# smoke.sh: proves the lab works end to end, on pc and on q35.
#
# Why: every later end-to-end test stands on this lab. For each machine type it
# boots a guest with no NICs, hot-plugs a virtio NIC with plain
# `virsh attach-device --live` (bridge labbr0, mtu 1400, 2 queues), and checks
# from inside the guest that it appeared with that MTU and queue count, got a
# DHCP lease from our dnsmasq, answers carrier changes, and can ping the
# bridge (via the command channel); then detaches it and checks the guest saw
# it go. Everything it made is torn down at the end, also on failure, and on
# failure the console logs are printed. Prints timings. Exit 0 = pass.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PREFIX=lab-smoke-
BR=${LAB_SMOKE_BRIDGE:-labbr0}
OUT="$LAB_WORK/guest"
VIRSH=(virsh -q -c qemu:///system)
WAIT=${LAB_SMOKE_WAIT:-30}
TIMINGS=()
CUR_LOG=

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    if [ -n "$CUR_LOG" ] && [ -e "$CUR_LOG" ]; then
      echo "===== $CUR_LOG =====" >&2
      cat "$CUR_LOG" >&2
    fi
    [ -e "$LAB_STATE/net/$BR/dnsmasq.log" ] && { echo "===== dnsmasq.log =====" >&2; cat "$LAB_STATE/net/$BR/dnsmasq.log" >&2; }
  fi
  "$LAB_DIR/teardown.sh" "$PREFIX" || true
  "$LAB_DIR/net.sh" down "$BR" || true
  if [ "$rc" = 0 ]; then echo "SMOKE: PASS"; else echo "SMOKE: FAIL (rc=$rc)" >&2; fi
  exit "$rc"
}
trap cleanup EXIT

fail() { lab_log "FAIL: $*"; exit 1; }

# wait_line FILE REGEX: waits up to $WAIT s for a line matching REGEX; prints it.
wait_line() {
  local file=$1 re=$2 deadline=$(( $(date +%s) + WAIT )) line
  while :; do
    line=$(grep -aE "$re" "$file" 2>/dev/null | tail -1 || true)
    [ -n "$line" ] && { echo "$line"; return 0; }
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

"$LAB_DIR/start-libvirtd.sh"
"$LAB_DIR/build-guest.sh" "$OUT"
# Leftovers of an interrupted earlier run.
"$LAB_DIR/teardown.sh" "$PREFIX"
"$LAB_DIR/net.sh" down "$BR"
"$LAB_DIR/net.sh" up "$BR"

n=0
for machine in pc q35; do
  n=$((n + 1))
  dom="$PREFIX$machine"
  mac="52:54:00:77:00:0$n"
  log="$OUT/$dom.console.log"
  CUR_LOG=$log
  sock="$OUT/$dom.cmd.sock"
  nic="$OUT/$dom.nic.xml"
  cat >"$nic" <<XML
<interface type='bridge'>
  <mac address='$mac'/>
  <source bridge='$BR'/>
  <model type='virtio'/>
  <driver name='qemu' queues='2'/>
  <mtu size='1400'/>
</interface>
XML

  t0=$(lab_now)
  "$LAB_DIR/define-guest.sh" "$dom" "$machine" "$OUT"
  t_boot=$(lab_elapsed "$t0" "$(lab_now)")
  grep -q "LAB: nic-add" "$log" && fail "$dom: a NIC before any hot-plug"

  t0=$(lab_now)
  "${VIRSH[@]}" attach-device "$dom" "$nic" --live >/dev/null
  t_attach=$(lab_elapsed "$t0" "$(lab_now)")
  line=$(wait_line "$log" "LAB: nic-add name=[^ ]+ mac=$mac ") || fail "$dom: guest never reported the NIC"
  t_seen=$(lab_elapsed "$t0" "$(lab_now)")
  lab_log "$dom: $line"
  [[ $line =~ \ mtu=1400\  ]] || fail "$dom: wrong MTU in guest: $line"
  [[ $line =~ \ queues=2\  ]] || fail "$dom: wrong queue count in guest: $line"
  ifname=$(sed -E 's/.* name=([^ ]+) .*/\1/' <<<"$line")

  line=$(wait_line "$log" "LAB: (dhcp|dhcp-fail) name=$ifname mac=$mac") || fail "$dom: no DHCP result"
  t_dhcp=$(lab_elapsed "$t0" "$(lab_now)")
  lab_log "$dom: $line"
  [[ $line =~ LAB:\ dhcp\ .*\ ip=(10\.77\.0\.[0-9]+)/24 ]] || fail "$dom: DHCP failed: $line"
  ip=${BASH_REMATCH[1]}
  grep -q "$mac $ip" "$LAB_STATE/net/$BR/leases" || fail "$dom: dnsmasq has no lease $mac $ip"
  wait_line "$log" "LAB: carrier name=$ifname mac=$mac state=up" >/dev/null || fail "$dom: no carrier up"

  # The command channel: the address is really on the interface, and the NIC
  # carries traffic to our own bridge.
  out=$("$LAB_DIR/guest-exec.sh" "$sock" "ip -4 addr show dev $ifname") || fail "$dom: guest-exec failed: $out"
  grep -q "inet $ip/24" <<<"$out" || fail "$dom: guest does not have $ip: $out"
  out=$("$LAB_DIR/guest-exec.sh" --timeout 15 "$sock" "ping -c 2 -W 3 10.77.0.1") || fail "$dom: ping to bridge failed: $out"
  # Negative check of the channel itself: a failing command must fail.
  if "$LAB_DIR/guest-exec.sh" "$sock" "ip link show dev nosuchnic" >/dev/null 2>&1; then
    fail "$dom: guest-exec reported success for a failing command"
  fi

  # Carrier: link down/up from the host side.
  "${VIRSH[@]}" domif-setlink "$dom" "$mac" down >/dev/null
  wait_line "$log" "LAB: carrier name=$ifname mac=$mac state=down" >/dev/null || fail "$dom: guest did not see carrier down"
  "${VIRSH[@]}" domif-setlink "$dom" "$mac" up >/dev/null
  t1=$(lab_now)
  while [ "$(grep -ac "LAB: carrier name=$ifname mac=$mac state=up" "$log")" -lt 2 ]; do
    [ "$(lab_elapsed "$t1" "$(lab_now)" | cut -d. -f1)" -lt "$WAIT" ] || fail "$dom: guest did not see carrier up again"
    sleep 0.1
  done

  t0=$(lab_now)
  "${VIRSH[@]}" detach-device "$dom" "$nic" --live >/dev/null
  t_detach=$(lab_elapsed "$t0" "$(lab_now)")
  line=$(wait_line "$log" "LAB: nic-remove name=$ifname mac=$mac") || fail "$dom: guest never reported the removal"
  t_gone=$(lab_elapsed "$t0" "$(lab_now)")
  lab_log "$dom: $line"
  lab_wait 10 bash -c "! ${VIRSH[*]} domiflist $dom | grep -qi $mac" || fail "$dom: NIC still in live XML"

  TIMINGS+=("$machine: boot ${t_boot}s, attach ${t_attach}s, attach->nic-add ${t_seen}s, attach->dhcp ${t_dhcp}s, detach ${t_detach}s, detach->nic-remove ${t_gone}s")
  "$LAB_DIR/teardown.sh" "$dom"
done

for t in "${TIMINGS[@]}"; do echo "SMOKE timing: $t"; done
