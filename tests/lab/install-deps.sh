#!/usr/bin/env bash
# Installs everything nic-agent needs to build and to run its test tiers on a
# fresh Debian 12 host. Idempotent: re-running it only re-checks.
#
# Why bookworm-backports: the image ships qemu-utils 10.0 from backports, and
# bookworm's own qemu-system-x86 7.2 conflicts with it, so libvirt and QEMU
# must come from the same backports suite.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "install-deps: run as root" >&2; exit 1; }; }
need_root

export DEBIAN_FRONTEND=noninteractive
BPO=/etc/apt/sources.list.d/nic-agent-bookworm-backports.list
stamp=/var/lib/nic-agent-deps.stamp

# libvirt-daemon-driver-nwfilter and libvirt-daemon-config-nwfilter: the
# nwfilter driver and its standard filters (no-mac-spoofing, no-ipv6-spoofing,
# ...), which the agent's anti-spoofing filter is built from; iptables ships
# ebtables-nft, which the driver runs. libvirtd loads both only when it
# starts: start-libvirtd.sh restarts a lab-started libvirtd that lacks them.
pkgs_bpo="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86 libvirt-daemon-driver-nwfilter libvirt-daemon-config-nwfilter"
pkgs="pkg-config protobuf-compiler libxml2-utils iproute2 openvswitch-switch dnsmasq-base python3-libvirt cpio busybox-static iptables ethtool"

missing=0
for p in $pkgs_bpo $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing=1
done

if [ "$missing" = 1 ]; then
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" > "$BPO"
  fi
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq -t bookworm-backports $pkgs_bpo >/dev/null
  # shellcheck disable=SC2086
  apt-get install -y -qq $pkgs >/dev/null
fi

# Python gRPC client: the "other implementation" our API tests talk to.
if ! python3 -c 'import grpc, grpc_tools, grpc_reflection' 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check grpcio grpcio-tools grpcio-reflection protobuf
fi
# The consumers of guest-config's files (tests/guest_formats.sh). Without
# recommends, and NetworkManager masked first where systemd runs, so that
# installing it on a lab host never starts it and takes over the host's or
# the lab's interfaces.
guest_pkgs="netplan.io network-manager ifupdown"
for p in $guest_pkgs; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    if [ -d /run/systemd/system ]; then
      systemctl mask NetworkManager.service NetworkManager-wait-online.service >/dev/null 2>&1 || true
    fi
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $guest_pkgs >/dev/null
    break
  fi
done
touch "$stamp"
echo "install-deps: ok (libvirt $(dpkg-query -W -f='${Version}' libvirt-daemon))"
