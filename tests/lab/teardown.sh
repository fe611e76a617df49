#!/usr/bin/env bash
# teardown.sh PREFIX: removes the lab things whose names start with PREFIX.
#
# Why: libvirtd and the host network are shared with other helpers, so cleanup
# must be by name prefix and by our own records only. It destroys and
# undefines libvirt domains named PREFIX*, and removes bridges (+ their
# dnsmasq) and network namespaces named PREFIX* that lab scripts recorded in
# $LAB_STATE. Nothing unrecorded is touched. Idempotent.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -eq 1 ] || { echo "usage: $0 PREFIX" >&2; exit 2; }
PREFIX=$1
# A short prefix would sweep up other people's domains.
[ "${#PREFIX}" -ge 3 ] || lab_die "prefix '$PREFIX' too short (min 3 chars)"

VIRSH=(virsh -q -c qemu:///system)
while IFS= read -r dom; do
  [ -n "$dom" ] || continue
  case $dom in "$PREFIX"*) ;; *) continue ;; esac
  "${VIRSH[@]}" destroy "$dom" >/dev/null 2>&1 || true
  "${VIRSH[@]}" undefine "$dom" >/dev/null 2>&1 || true
  lab_log "removed domain $dom"
done < <("${VIRSH[@]}" list --all --name 2>/dev/null)

for d in "$LAB_STATE"/net/"$PREFIX"*; do
  [ -d "$d" ] || continue
  "$LAB_DIR/net.sh" down "${d##*/}"
done
for f in "$LAB_STATE"/netns/"$PREFIX"*; do
  [ -e "$f" ] || continue
  ns=${f##*/}
  ip netns del "$ns" 2>/dev/null || true
  rm -f "$f"
  lab_log "removed netns $ns"
done
