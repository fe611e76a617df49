#!/usr/bin/env bash
# The real-QEMU tier: builds the guest, runs the virsh smoke test, then the
# end-to-end suites that drive the real `nic-agent serve --connect
# qemu:///system` over gRPC and check from inside the guests.
# Run alone:  bash tests/lab/run-lab.sh   (root; libvirtd is started if needed)
#
# Fails when no suite is found, when the agent binary is older than the
# sources it is built from, and when any suite fails. A suite fails on a
# skipped test too, unless tests/lab/allowed-skips.txt ($LAB_ALLOWED_SKIPS)
# lists that skip with a reason (see labkit.finish).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

die() { echo "run-lab: $*" >&2; exit 1; }

shopt -s nullglob
suites=(tests/lab/test_e2e_*.py)
shopt -u nullglob
[ "${#suites[@]}" -gt 0 ] || die "no suites match tests/lab/test_e2e_*.py: nothing would be tested"

# The agent under test: built from this tree unless NIC_AGENT_BIN names
# another binary, which must not be older than the sources (a stale binary
# would test yesterday's code).
built_here=0
if [ -z "${NIC_AGENT_BIN:-}" ]; then
  cargo build --quiet --bin nic-agent
  built_here=1
fi
export NIC_AGENT_BIN=${NIC_AGENT_BIN:-$ROOT/target/debug/nic-agent}
[ -x "$NIC_AGENT_BIN" ] || die "$NIC_AGENT_BIN is not an executable"
# A binary cargo just built is as fresh as cargo says, even when a file
# only tests compile (a #[cfg(test)] module) is newer than it: cargo does
# not relink the binary for that. A binary named by NIC_AGENT_BIN is
# compared with every source file.
if [ "$built_here" = 0 ]; then
  newer=$(find src proto build.rs Cargo.toml Cargo.lock -type f -newer "$NIC_AGENT_BIN" -print -quit) ||
    die "cannot compare $NIC_AGENT_BIN with its sources"
  [ -z "$newer" ] || die "$NIC_AGENT_BIN is older than its sources ($newer is newer); run cargo build, or unset NIC_AGENT_BIN"
fi
echo "run-lab: agent $NIC_AGENT_BIN ($(date -r "$NIC_AGENT_BIN" '+%F %T'))"
echo "run-lab: allowed skips: ${LAB_ALLOWED_SKIPS:-tests/lab/allowed-skips.txt}"
grep -Ev '^[[:space:]]*(#|$)' "${LAB_ALLOWED_SKIPS:-tests/lab/allowed-skips.txt}" 2>/dev/null | sed 's/^/run-lab:   /' || echo "run-lab:   (none)"

bash tests/lab/start-libvirtd.sh
bash tests/lab/start-ovs.sh
bash tests/lab/smoke.sh
status=0
summary=()
for t in "${suites[@]}"; do
  echo "== $t"
  if python3 "$t"; then
    summary+=("ok      $t")
  else
    summary+=("FAILED  $t (exit $?)")
    status=1
  fi
done
echo "run-lab: summary"
printf 'run-lab:   %s\n' "${summary[@]}"
exit $status
