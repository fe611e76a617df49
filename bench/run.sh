#!/usr/bin/env bash
# bench/run.sh: nic-agent's attach benchmark in one command (root).
#
# Starts libvirtd if it is not running (tests/lab/start-libvirtd.sh), builds
# the release agent and the load generator (examples/bench.rs), then runs
# bench/bench.py: raw libvirt vs nic-agent over gRPC vs a python-libvirt peer,
# on the test driver and on 20 real TCG guests. Prints a markdown table and
# writes bench/results.json (--write-md also rewrites bench/RESULTS.md).
# Extra arguments go to bench.py (--skip-qemu, --guests N, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/run.sh: run as root (libvirtd, guests, bridges)" >&2; exit 1; }
bash tests/lab/start-libvirtd.sh
cargo build --release --quiet --bin nic-agent --example bench
# The peer needs Debian's python3-libvirt; the runner needs grpcio.
PEER_PY=${BENCH_PEER_PYTHON:-/usr/bin/python3}
"$PEER_PY" -c 'import libvirt' 2>/dev/null || { echo "bench/run.sh: $PEER_PY has no libvirt module (apt-get install python3-libvirt)" >&2; exit 1; }
PY=${BENCH_PYTHON:-python3}
"$PY" -c 'import grpc, grpc_tools' 2>/dev/null || { echo "bench/run.sh: $PY has no grpcio/grpcio-tools (tests/lab/install-deps.sh)" >&2; exit 1; }
export BENCH_PEER_PYTHON=$PEER_PY
exec timeout 900 "$PY" bench/bench.py "$@"
