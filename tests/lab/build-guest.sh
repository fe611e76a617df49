#!/usr/bin/env bash
# build-guest.sh OUTDIR: builds the lab guest (OUTDIR/vmlinuz, OUTDIR/initrd.img).
#
# Why: end-to-end tests need a real guest kernel to prove that a hot-plugged
# NIC appears inside the VM with the right MTU/queues/lease. It is built from
# Debian packages alone (the newest linux-image-6.1.0-*-cloud-amd64 plus
# busybox-static), downloaded with `apt-get download` and unpacked with
# `dpkg-deb -x`: nothing is installed on the host. The initramfs holds busybox,
# the virtio-net and 8021q modules (with their dependencies) and the scripts in
# guest/. Debs and the result are cached: a re-run with the same inputs only
# checks a stamp. Cache dir: $LAB_WORK (default tests/lab/work, gitignored).
#
# Optional, for guests that need more than the standard set (both default to
# nothing, which builds exactly the standard guest):
#   EXTRA_DIR (2nd argument, or $LAB_EXTRA_DIR): a directory tree copied into
#     the initramfs root last, e.g. a test binary with its shared libraries
#     (test_e2e_vlan.py). Its contents are part of the cache stamp.
#   $LAB_EXTRA_MODULES: more kernel modules for /init to load (with their
#     dependencies), e.g. "bridge" -- the cloud kernel has it as a module.
# Use a separate OUTDIR for such a guest so the standard one stays small.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -eq 1 ] || [ $# -eq 2 ] || { echo "usage: $0 OUTDIR [EXTRA_DIR]" >&2; exit 2; }
OUT=$1
EXTRA=${2:-${LAB_EXTRA_DIR:-}}
if [ -n "$EXTRA" ]; then
  [ -d "$EXTRA" ] || lab_die "extra dir $EXTRA is not a directory"
  EXTRA=$(cd "$EXTRA" && pwd)
fi
EXTRA_MODULES=${LAB_EXTRA_MODULES:-}
[[ $EXTRA_MODULES =~ ^[A-Za-z0-9_\ -]*$ ]] || lab_die "bad LAB_EXTRA_MODULES '$EXTRA_MODULES'"
mkdir -p "$OUT" "$LAB_WORK/debs"
OUT=$(cd "$OUT" && pwd)

# Modules /init loads, in this order. The virtio list is the order that works
# for the 6.1 cloud kernel; 8021q is for VLAN tests inside the guest. Their
# dependencies are resolved from the .ko files themselves (the deb ships no
# modules.dep) and loaded first.
ROOT_MODULES="virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci failover net_failover virtio_net 8021q"
ROOT_MODULES="$ROOT_MODULES${EXTRA_MODULES:+ $EXTRA_MODULES}"

# fetch PKG: prints the path of the cached .deb of PKG's candidate version,
# downloading it only when missing.
fetch() {
  local pkg=$1 ver dir
  ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2 }')
  if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
    # Offline or no apt lists: fall back to whatever is cached.
    dir=$(ls -d "$LAB_WORK/debs/$pkg"/*/ 2>/dev/null | sort -V | tail -1)
    [ -n "$dir" ] || lab_die "no candidate for $pkg and nothing cached"
  else
    dir="$LAB_WORK/debs/$pkg/${ver//:/%3a}/"
  fi
  if ! ls "$dir"*.deb >/dev/null 2>&1; then
    mkdir -p "$dir"
    lab_log "downloading $pkg $ver"
    (cd "$dir" && apt-get download -q "$pkg=$ver" >/dev/null 2>&1) || lab_die "apt-get download $pkg=$ver failed"
  fi
  ls "$dir"*.deb | head -1
}

newest_kernel() {
  local k
  k=$(apt-cache pkgnames linux-image-6.1.0- 2>/dev/null |
        grep -E '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' | sort -V | tail -1 || true)
  if [ -z "$k" ]; then
    k=$(for d in "$LAB_WORK"/debs/linux-image-6.1.0-*-cloud-amd64; do if [ -d "$d" ]; then echo "${d##*/}"; fi; done | sort -V | tail -1)
  fi
  [ -n "$k" ] || lab_die "no linux-image-6.1.0-*-cloud-amd64 in apt-cache (run apt-get update?)"
  echo "$k"
}

KPKG=$(newest_kernel)
KDEB=$(fetch "$KPKG")
BDEB=$(fetch busybox-static)

# Stamp: the inputs that decide the result. Same stamp = nothing to do.
# The extra tree counts by content, names, modes and link targets (not mtimes).
extra_sum() {
  [ -n "$EXTRA" ] || return 0
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C "$EXTRA" . | sha256sum
}
stamp=$( { echo "$KDEB $BDEB $ROOT_MODULES"; cat "$0" "$LAB_DIR"/guest/*; extra_sum; } | sha256sum | cut -c1-32)
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$stamp" ]; then
  lab_log "up to date: $OUT ($KPKG)"
  exit 0
fi

extract() {  # extract DEB: unpacks once into the cache, prints the dir
  local deb=$1 dir
  dir="${deb%.deb}.x"
  if [ ! -e "$dir/.done" ]; then
    rm -rf "$dir"; mkdir -p "$dir"
    dpkg-deb -x "$deb" "$dir"
    touch "$dir/.done"
  fi
  echo "$dir"
}
KX=$(extract "$KDEB")
BX=$(extract "$BDEB")
KVER=$(ls "$KX/lib/modules" | head -1)
MODDIR="$KX/lib/modules/$KVER"

# Module path and dependencies, read from the module files.
declare -A MODPATH=()
while IFS= read -r f; do
  b=${f##*/}; b=${b%%.ko*}
  MODPATH[$b]=$f
  MODPATH[${b//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*')

ORDER=()
declare -A SEEN=()
resolve() {  # depth-first, dependencies before the module
  local m=$1 d deps
  [ -n "${SEEN[$m]:-}" ] && return 0
  SEEN[$m]=1
  [ -n "${MODPATH[$m]:-}" ] || lab_die "module $m not found in $KPKG"
  deps=$(modinfo -F depends "${MODPATH[$m]}")
  for d in ${deps//,/ }; do resolve "$d"; done
  ORDER+=("$m")
}
for m in $ROOT_MODULES; do resolve "$m"; done

STAGE=$(mktemp -d "$LAB_WORK/initrd.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,dev,proc,sys,run,tmp,etc,lib/modules}
cp "$BX/bin/busybox" "$STAGE/bin/busybox"
for app in $("$STAGE/bin/busybox" --list); do
  # --list includes "busybox" itself: linking it would clobber the binary.
  [ "$app" = busybox ] && continue
  ln -s busybox "$STAGE/bin/$app"
done
for m in "${ORDER[@]}"; do
  f=${MODPATH[$m]}
  case $f in
    *.ko) cp "$f" "$STAGE/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" >"$STAGE/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$STAGE/lib/modules/$m.ko" ;;
    *) lab_die "unknown module format: $f" ;;
  esac
  echo "$m" >>"$STAGE/etc/lab-modules"
done
install -m 0755 "$LAB_DIR/guest/init" "$STAGE/init"
install -m 0755 "$LAB_DIR/guest/lab-dhcp" "$STAGE/bin/lab-dhcp"
install -m 0755 "$LAB_DIR/guest/lab-cmdd" "$STAGE/bin/lab-cmdd"
# The kernel opens /dev/console for init before /init can mount devtmpfs.
mknod -m 0600 "$STAGE/dev/console" c 5 1
if [ -n "$EXTRA" ]; then
  # Last, so the caller's files win; -a keeps modes and library symlinks.
  cp -a "$EXTRA/." "$STAGE/"
fi

(cd "$STAGE" && find . -print0 | sort -z | cpio --null -o -H newc --quiet | gzip -9n) >"$OUT/initrd.img.tmp"
cp "$KX/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
echo "$stamp" >"$OUT/.stamp"
lab_log "built $OUT (kernel $KVER, modules: ${ORDER[*]},${EXTRA:+ extra: $EXTRA,} initrd $(stat -c %s "$OUT/initrd.img") bytes)"
