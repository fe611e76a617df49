#!/usr/bin/env bash
# The README's first command: on a fresh Debian 12 host, install what is
# missing, build nic-agent, start it on the embedded lab (libvirt's test
# driver with fixtures/lab-node.xml, no hypervisor needed), and do a real
# attach and list through the client. The agent is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash tests/lab/install-deps.sh
echo "== building nic-agent"
cargo build --release --quiet
BIN=$ROOT/target/release/nic-agent

LOG=$(mktemp /tmp/nic-agent-demo.XXXXXX.log)
ADDR_FILE=$(mktemp)
"$BIN" serve --connect "test://$ROOT/fixtures/lab-node.xml" --listen 127.0.0.1:0 --insecure >"$ADDR_FILE" 2>"$LOG" &
AGENT=$!
trap 'kill $AGENT 2>/dev/null; wait $AGENT 2>/dev/null; rm -f "$ADDR_FILE"' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$ADDR_FILE" && break
  kill -0 $AGENT 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.1
done
ADDR=$(sed -n 's/^nic-agent listening on //p' "$ADDR_FILE")
export NIC_AGENT_SERVER=$ADDR
echo "== agent pid $AGENT listening on $ADDR (log: $LOG)"
run() { echo; echo "\$ nic-agent $*"; "$BIN" "$@"; }
run vms
run capacity --vm i-2-10-VM
run attach --vm i-2-10-VM --mac 02:00:0a:00:99:01 --bridge cloudbr0 --mtu 1450 --rate-mbps 200 --request-id demo-1
run attach --vm i-3-20-VM --mac 02:00:0a:00:99:02 --bridge br-ovs0 --ovs --broadcast-uri vlan://100
run list --vm i-2-10-VM
echo; echo "# the same attach again is idempotent:"
run attach --vm i-2-10-VM --mac 02:00:0a:00:99:01 --bridge cloudbr0 --mtu 1450 --rate-mbps 200
echo; echo "# and bad input names the field and the range:"
run attach --vm i-2-10-VM --mac 02:00:0a:00:99:03 --bridge cloudbr0 --mtu 70000 || true
echo; echo "# a VM with no free PCI slot is refused before libvirt is asked:"
run attach --vm i-2-99-VM --mac 02:00:0a:00:99:04 --bridge cloudbr0 || true
echo; echo "== agent log"; cat "$LOG"
