#!/usr/bin/env bash
# The real-QEMU tier: builds the guest, runs the virsh smoke test, then the
# end-to-end suites that drive the real `nic-agent serve --connect
# qemu:///system` over gRPC and check from inside the guests.
# Run alone:  bash tests/lab/run-lab.sh   (root; libvirtd is started if needed)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
bash tests/lab/start-libvirtd.sh
bash tests/lab/start-ovs.sh
[ -x target/debug/nic-agent ] || cargo build --quiet
export NIC_AGENT_BIN=${NIC_AGENT_BIN:-$ROOT/target/debug/nic-agent}
bash tests/lab/smoke.sh
status=0
for t in tests/lab/test_e2e_*.py; do
  [ -e "$t" ] || continue
  echo "== $t"
  python3 "$t" || status=1
done
exit $status
