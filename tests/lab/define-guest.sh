#!/usr/bin/env bash
# define-guest.sh NAME pc|q35 OUTDIR [--transient] [--root-ports N] [--no-start]
#                 [--type qemu|kvm] [--timeout SECS] [--cmd-sock PATH] [--memory MIB]
#
# Why: end-to-end tests need a small, real libvirt guest with no NICs at boot,
# so every NIC it ever sees is a hot-plugged one. This writes OUTDIR/NAME.xml
# (direct kernel boot of OUTDIR/vmlinuz + initrd.img from build-guest.sh,
# 256 MiB (--memory: a bigger initramfs, such as one with the agent and its
# ~60 libraries, needs room to unpack), 2 vCPUs -- 2 so virtio-net gets 2
# queue pairs --, usb none, no
# balloon, no disks, no NICs; q35 gets N empty pcie-root-ports, default 4,
# one per hot-pluggable NIC), defines and starts it (or creates it transient,
# as CloudStack does), and waits (bounded) for "LAB: boot ok" on the console.
# Serial 0 = console, a file at OUTDIR/NAME.console.log. Serial 1 = command
# channel, a unix socket (default OUTDIR/NAME.cmd.sock) for guest-exec.sh.
# The domain type is a parameter (default qemu = TCG; kvm does not work on
# this host's PVM /dev/kvm) and never hard-coded elsewhere.
# Idempotent: an existing domain of the same NAME is destroyed and replaced.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

usage() {
  echo "usage: $0 NAME pc|q35 OUTDIR [--transient] [--root-ports N] [--no-start] [--type qemu|kvm] [--timeout SECS] [--cmd-sock PATH] [--memory MIB]" >&2
  exit 2
}
[ $# -ge 3 ] || usage
NAME=$1 MACHINE=$2 OUT=$3; shift 3
TRANSIENT=0 PORTS=4 START=1 TYPE=${LAB_DOMAIN_TYPE:-qemu} TIMEOUT=${LAB_BOOT_TIMEOUT:-60} SOCK= MEMORY=256
while [ $# -gt 0 ]; do
  case $1 in
    --transient) TRANSIENT=1; shift ;;
    --root-ports) PORTS=${2:?}; shift 2 ;;
    --no-start) START=0; shift ;;
    --type) TYPE=${2:?}; shift 2 ;;
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    --cmd-sock) SOCK=${2:?}; shift 2 ;;
    --memory) MEMORY=${2:?}; shift 2 ;;
    *) usage ;;
  esac
done
[[ $NAME =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || lab_die "bad domain name '$NAME'"
case $MACHINE in pc|q35) ;; *) lab_die "machine must be pc or q35, not '$MACHINE'" ;; esac
[[ $PORTS =~ ^[0-9]+$ ]] && [ "$PORTS" -le 30 ] || lab_die "bad --root-ports '$PORTS'"
[[ $TYPE =~ ^[a-z]+$ ]] || lab_die "bad --type '$TYPE'"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || lab_die "bad --timeout '$TIMEOUT'"
[[ $MEMORY =~ ^[0-9]+$ ]] && [ "$MEMORY" -ge 128 ] && [ "$MEMORY" -le 4096 ] || lab_die "bad --memory '$MEMORY' (128-4096 MiB)"
[ "$TRANSIENT" = 1 ] && [ "$START" = 0 ] && lab_die "--transient and --no-start exclude each other"
OUT=$(cd "$OUT" && pwd)
[ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] || lab_die "$OUT has no vmlinuz/initrd.img; run build-guest.sh $OUT"
LOG="$OUT/$NAME.console.log"
XML="$OUT/$NAME.xml"
SOCK=${SOCK:-$OUT/$NAME.cmd.sock}
# sun_path holds 108 bytes including the NUL.
[ "${#SOCK}" -lt 108 ] || lab_die "socket path too long (${#SOCK} chars): $SOCK; use --cmd-sock"

VIRSH=(virsh -q -c qemu:///system)

xml_escape() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e "s/'/\&apos;/g"; }
e_kernel=$(xml_escape <<<"$OUT/vmlinuz")
e_initrd=$(xml_escape <<<"$OUT/initrd.img")
e_log=$(xml_escape <<<"$LOG")
e_sock=$(xml_escape <<<"$SOCK")
ports=
if [ "$MACHINE" = q35 ]; then
  # Root explicit: libvirt otherwise treats the first port as index 0.
  ports="    <controller type='pci' index='0' model='pcie-root'/>"$'\n'
  for _ in $(seq 1 "$PORTS"); do ports+="    <controller type='pci' model='pcie-root-port'/>"$'\n'; done
fi
cat >"$XML" <<XMLEOF
<domain type='$TYPE'>
  <name>$NAME</name>
  <memory unit='MiB'>$MEMORY</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='$MACHINE'>hvm</type>
    <kernel>$e_kernel</kernel>
    <initrd>$e_initrd</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <!-- A guest that panics (panic=-1 reboots) stops instead of looping. -->
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='none'/>
$ports    <serial type='file'>
      <source path='$e_log'/>
      <target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path='$e_sock'/>
      <target port='1'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
XMLEOF
if command -v virt-xml-validate >/dev/null; then
  virt-xml-validate "$XML" domain >/dev/null 2>&1 || lab_die "$XML does not validate"
fi

# Replace a previous domain of the same name (ours: the caller chose the name).
if "${VIRSH[@]}" dominfo "$NAME" >/dev/null 2>&1; then
  "${VIRSH[@]}" destroy "$NAME" >/dev/null 2>&1 || true
  "${VIRSH[@]}" undefine "$NAME" >/dev/null 2>&1 || true
fi
rm -f "$LOG" "$SOCK" "$SOCK.lock"

t0=$(lab_now)
if [ "$TRANSIENT" = 1 ]; then
  "${VIRSH[@]}" create "$XML" >/dev/null
else
  "${VIRSH[@]}" define "$XML" >/dev/null
  if [ "$START" = 0 ]; then
    lab_log "defined $NAME ($MACHINE, type $TYPE), not started"
    exit 0
  fi
  "${VIRSH[@]}" start "$NAME" >/dev/null
fi

booted() {
  grep -q 'LAB: boot ok' "$LOG" 2>/dev/null && return 0
  # Fail fast if the domain died (panic, QEMU error) instead of waiting it out.
  [ "$("${VIRSH[@]}" domstate "$NAME" 2>/dev/null)" = running ] || { echo dead; return 0; }
  return 1
}
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  if r=$(booted); then
    [ -z "$r" ] && break
    tail -n 40 "$LOG" >&2 2>/dev/null || true
    lab_die "$NAME stopped before 'LAB: boot ok'"
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    tail -n 40 "$LOG" >&2 2>/dev/null || true
    lab_die "$NAME: no 'LAB: boot ok' within ${TIMEOUT}s"
  fi
  sleep 0.2
done
lab_log "$NAME ($MACHINE, type $TYPE$([ "$TRANSIENT" = 1 ] && echo ", transient")) booted in $(lab_elapsed "$t0" "$(lab_now)")s; console $LOG, cmd $SOCK"
