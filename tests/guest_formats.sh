#!/usr/bin/env bash
# guest-config's files, checked by the tools that consume them (issue 16):
#   netplan       `netplan generate --root-dir` (and its networkd output)
#   NM keyfile    `nmcli --offline connection modify` reads it from stdin and
#                 rejects invalid properties
#   ifupdown      `ifup --no-act -i FILE NAME`
#   networkd      no offline validator exists: `systemd-analyze cat-config
#                 --root` finds it, then every [Section] Key= is checked
#                 against the list systemd.network(5) documents for the keys
#                 we write (a typo fails)
#   ifcfg, hooks  `sh -n` and `busybox sh -n` (ifcfg is sourced as shell)
#   udhcpc hook   run for real: busybox udhcpc leases from dnsmasq across a
#                 veth pair in a private network namespace (unshare -n), and
#                 the rule and table appear on bound and go on release
# A missing tool fails loudly: tests/lab/install-deps.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/nic-agent}
for t in netplan nmcli ifup systemd-analyze busybox dnsmasq unshare python3; do
  command -v "$t" >/dev/null || { echo "guest_formats: FAIL: $t missing (run tests/lab/install-deps.sh)" >&2; exit 1; }
done
W=$(mktemp -d /tmp/nic-agent-guest-formats.XXXXXX)
trap 'rm -rf "$W"' EXIT
fail() { echo "guest_formats: FAIL: $*" >&2; exit 1; }
MAC=52:54:00:ab:cd:01

check_case() { # NAME FLAGS...
  local name=$1; shift
  local r="$W/$name"
  "$BIN" guest-config --mac "$MAC" --name eth1 --root "$r" "$@" >/dev/null || fail "$name: guest-config $*"

  netplan generate --root-dir "$r" 2>"$r.np.err" || fail "$name: netplan generate: $(cat "$r.np.err")"
  grep -qi "permissions" "$r.np.err" && fail "$name: netplan complains: $(cat "$r.np.err")"
  ls "$r"/run/systemd/network/*eth1*.network >/dev/null 2>&1 \
    || [ -n "$(ls "$r"/run/NetworkManager/system-connections/ 2>/dev/null)" ] \
    || fail "$name: netplan generated nothing"

  local kf="$r/etc/NetworkManager/system-connections/eth1.nmconnection"
  [ "$(stat -c %a "$kf")" = 600 ] || fail "$name: keyfile mode $(stat -c %a "$kf")"
  nmcli --offline connection modify connection.id eth1 <"$kf" >"$r.nm.out" 2>&1 \
    || fail "$name: nmcli --offline rejects the keyfile: $(cat "$r.nm.out")"
  grep -qi "^mac-address=$MAC" "$r.nm.out" || fail "$name: keyfile lost its MAC match"

  ifup --no-act -i "$r/etc/network/interfaces.d/eth1" eth1 >"$r.if.out" 2>&1 \
    || fail "$name: ifup --no-act: $(cat "$r.if.out")"

  local nd=etc/systemd/network/60-eth1.network
  systemd-analyze --root="$r" cat-config "systemd/network/60-eth1.network" >/dev/null \
    || fail "$name: systemd-analyze cat-config cannot find $nd"
  python3 - "$r/$nd" <<'PY' || fail "$name: networkd file"
import sys
known = {
    "Match": {"MACAddress"},
    "Network": {"DHCP", "Address", "LinkLocalAddressing", "IPv6AcceptRA"},
    "Route": {"Gateway", "Metric", "Table", "Destination", "Scope"},
    "RoutingPolicyRule": {"From", "Table"},
    "DHCPv4": {"UseGateway", "RouteMetric"},
    "IPv6AcceptRA": {"UseGateway", "RouteMetric"},
}
sec = None
for n, l in enumerate(open(sys.argv[1]), 1):
    l = l.strip()
    if not l or l.startswith(("#", ";")):
        continue
    if l.startswith("["):
        sec = l.strip("[]")
        assert sec in known, f"line {n}: unknown section {l}"
        continue
    k, _, v = l.partition("=")
    assert sec and k in known[sec] and v, f"line {n}: {l!r} in [{sec}]"
PY

  for f in "$r"/etc/sysconfig/network-scripts/ifcfg-eth1 \
           $(find "$r/etc/NetworkManager/dispatcher.d" "$r/etc/dhcp" "$r/etc/networkd-dispatcher" "$r/usr" -type f 2>/dev/null); do
    sh -n "$f" || fail "$name: sh -n $f"
    busybox sh -n "$f" || fail "$name: busybox sh -n $f"
  done
  echo "guest_formats: $name ok (netplan generate, nmcli --offline, ifup --no-act, networkd keys, sh -n)"
}

check_case dhcp-secondary
check_case dhcp-table-slaac --table 100 --ip6-mode slaac
check_case dhcp6-default --default --ip6-mode dhcp6
check_case static-default-v6 --ip 10.0.0.5/24 --gateway 10.0.0.1 --default --ip6 2001:db8::5/64 --gateway6 fe80::1
check_case static-table --ip 10.77.32.88/24 --gateway 10.77.32.1 --table 100

# The udhcpc hook, for real, in a private network namespace: dnsmasq serves
# 10.99.0.0/24 with router .1 on one end of a veth pair, busybox udhcpc
# leases on eth1 with the rendered script.
"$BIN" guest-config --mac "$MAC" --name eth1 --table 100 --root "$W/udhcpc" >/dev/null
S="$W/udhcpc/usr/share/udhcpc/nic-agent-eth1.script"
# The hook runs with busybox's `ip`, as in the busybox lab guest.
mkdir -p "$W/bb"
ln -s "$(command -v busybox)" "$W/bb/ip"
unshare -n sh -eu -c '
  ip link set lo up
  ip link add eth1 address '"$MAC"' type veth peer name srv0
  ip addr add 10.99.0.1/24 dev srv0
  ip link set srv0 up; ip link set eth1 up
  dnsmasq --no-daemon --conf-file=/dev/null --interface=srv0 --bind-interfaces --port=0 \
    --dhcp-range=10.99.0.50,10.99.0.60,255.255.255.0,1h --dhcp-option=3,10.99.0.1 \
    --dhcp-leasefile='"$W"'/leases >'"$W"'/dnsmasq.log 2>&1 &
  # --no-daemon writes no pid file: this shell knows its child.
  dnsmasq_pid=$!
  sleep 0.5
  PATH='"$W"'/bb:$PATH busybox udhcpc -i eth1 -n -q -t 5 -T 1 -s '"$S"' >'"$W"'/udhcpc.log 2>&1
  ip -4 addr show dev eth1 >'"$W"'/addr
  ip rule >'"$W"'/rules.up
  ip route show table 100 >'"$W"'/table.up
  ip route show table main >'"$W"'/main.up
  PATH='"$W"'/bb:$PATH interface=eth1 busybox sh '"$S"' deconfig
  ip rule >'"$W"'/rules.down
  ip route show table 100 >'"$W"'/table.down 2>&1 || true
  kill "$dnsmasq_pid"
' || fail "udhcpc in a netns: $(cat "$W"/udhcpc.log "$W"/dnsmasq.log 2>/dev/null)"
leased=$(sed -n 's/.*inet \(10\.99\.0\.[0-9]*\)\/24.*/\1/p' "$W/addr")
[ -n "$leased" ] || fail "udhcpc: no lease: $(cat "$W/addr" "$W/udhcpc.log")"
grep -q "from $leased lookup 100" "$W/rules.up" || fail "udhcpc bound: no rule: $(cat "$W/rules.up")"
grep -q "default via 10.99.0.1 dev eth1" "$W/table.up" || fail "udhcpc bound: table 100: $(cat "$W/table.up")"
grep -q "10.99.0.0/24 dev eth1 .*src $leased" "$W/table.up" || fail "udhcpc bound: table 100 connected: $(cat "$W/table.up")"
grep -q "^default" "$W/main.up" && fail "udhcpc: a NIC without --default took the main default route: $(cat "$W/main.up")"
grep -q "lookup 100" "$W/rules.down" && fail "udhcpc deconfig: rule left: $(cat "$W/rules.down")"
grep -q "10.99" "$W/table.down" && fail "udhcpc deconfig: table 100 left: $(cat "$W/table.down")"
echo "guest_formats: udhcpc hook ok (lease $leased: rule + table 100 on bound, none in main, gone on deconfig)"
echo "guest_formats: ok"
