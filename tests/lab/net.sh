#!/usr/bin/env bash
# net.sh up|down NAME [--subnet N] [--mtu M]: a test Linux bridge with its own DHCP.
#
# Why: hot-plug tests need a bridge for the NIC and a DHCP server so the guest
# can prove the NIC carries traffic. House rule: traffic only on bridges we
# made, and only 10.77.x addresses. `up` creates bridge NAME with 10.77.N.1/24
# (N from --subnet, default 0), MTU set explicitly (default 1500, so a tap
# with a smaller MTU cannot pull the bridge down), and a dnsmasq serving
# 10.77.N.50-150 with DNS off. Everything is recorded under
# $LAB_STATE/net/NAME; `down` kills only that dnsmasq PID and deletes only a
# bridge recorded there. Both are idempotent.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

usage() { echo "usage: $0 up|down NAME [--subnet 0-255] [--mtu MTU]" >&2; exit 2; }
[ $# -ge 2 ] || usage
ACTION=$1 NAME=$2; shift 2
SUBNET=0 MTU=1500
while [ $# -gt 0 ]; do
  case $1 in
    --subnet) SUBNET=${2:?}; shift 2 ;;
    --mtu) MTU=${2:?}; shift 2 ;;
    *) usage ;;
  esac
done
[[ $NAME =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$ ]] || lab_die "bad bridge name '$NAME' (1-15 chars)"
[[ $SUBNET =~ ^[0-9]{1,3}$ ]] && [ "$SUBNET" -le 255 ] || lab_die "bad --subnet '$SUBNET'"
[[ $MTU =~ ^[0-9]{3,5}$ ]] || lab_die "bad --mtu '$MTU'"

ST="$LAB_STATE/net/$NAME"
PIDFILE="$ST/dnsmasq.pid"
mkdir -p "$LAB_STATE/net"
exec 9>"$LAB_STATE/net/.lock"
flock -w 60 9 || lab_die "lock busy"

net_up() {
  local net="10.77.$SUBNET" other
  if ip link show dev "$NAME" >/dev/null 2>&1 && [ ! -e "$ST/bridge" ]; then
    lab_die "$NAME exists but was not created by net.sh; refusing to touch it"
  fi
  # Another interface already in this subnet would make routing ambiguous.
  other=$(ip -o -4 addr show | awk -v pre="$net." -v n="$NAME" 'index($4, pre) == 1 && $2 != n { print $2 }' | head -1)
  [ -z "$other" ] || lab_die "$net.0/24 is already used on $other; pick another --subnet"
  mkdir -p "$ST"
  if ! ip link show dev "$NAME" >/dev/null 2>&1; then
    ip link add "$NAME" type bridge
    echo "$SUBNET" >"$ST/bridge"
    lab_log "created bridge $NAME"
  fi
  ip link set dev "$NAME" mtu "$MTU"
  ip -4 addr show dev "$NAME" | grep -q "inet $net.1/24" || ip addr add "$net.1/24" dev "$NAME"
  ip link set dev "$NAME" up

  if lab_pidfile_live "$PIDFILE" dnsmasq; then
    lab_log "$NAME up (dnsmasq pid $(cat "$PIDFILE") already running)"
    return 0
  fi
  rm -f "$PIDFILE"
  # --no-ping: by default dnsmasq pings a new address before offering it and
  # holds the offer ~3 s; on our own fresh bridge nobody else can own it.
  # --user/--group root: the default 'dnsmasq' user may not exist, and the
  # lease file lives in our root-owned state dir.
  dnsmasq --conf-file=/dev/null --no-hosts --pid-file="$PIDFILE" \
    --bind-interfaces --interface="$NAME" --except-interface=lo \
    --dhcp-range="$net.50,$net.150,255.255.255.0,12h" --dhcp-authoritative --no-ping \
    --port=0 --no-resolv --dhcp-leasefile="$ST/leases" \
    --user=root --group=root --log-dhcp --log-facility="$ST/dnsmasq.log" 9>&-
  lab_wait 10 lab_pidfile_live "$PIDFILE" dnsmasq || lab_die "dnsmasq did not start (see $ST/dnsmasq.log)"
  lab_log "$NAME up: $net.1/24 mtu $MTU, dnsmasq pid $(cat "$PIDFILE")"
}

net_down() {
  local pid
  if [ ! -d "$ST" ]; then
    lab_log "$NAME: nothing recorded, nothing to do"
    return 0
  fi
  if [ -e "$PIDFILE" ]; then
    pid=$(tr -dc '0-9' <"$PIDFILE")
    if lab_pid_is "$pid" dnsmasq; then
      kill -TERM "$pid"
      lab_wait 10 bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  if [ -e "$ST/bridge" ] && ip link show dev "$NAME" >/dev/null 2>&1; then
    ip link del dev "$NAME"
  fi
  rm -rf "$ST"
  lab_log "$NAME down"
}

case $ACTION in
  up) net_up ;;
  down) net_down ;;
  *) usage ;;
esac
