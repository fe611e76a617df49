#!/usr/bin/env bash
# bench/profile.sh: where the agent's time goes on the libvirt test driver,
# under the bench's one-client AttachNic load (root; needs perf).
#
# Why: on the test driver libvirt does almost nothing, so the agent's own
# cost per request (gRPC, XML parse and render, the blocking-pool hops) is
# what the bench's "test driver, 1 client" p50 measures. This records the
# release agent with perf (DWARF call graphs) while examples/bench.rs sends
# 2,000 attaches over 40 test-driver VMs, then prints the shares by library
# and the top symbols with their callers.
#
#   bash bench/profile.sh [OUTDIR]     (default: a new temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "bench/profile.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
OUT=${1:-$(mktemp -d /tmp/nic-agent-profile-XXXXXX)}
mkdir -p "$OUT"
cargo build --release --quiet --bin nic-agent --example bench
python3 -c '
import sys; sys.path.insert(0, "bench"); sys.argv = ["bench.py"]
import bench as b
out = "'"$OUT"'"
b.node_xml(out + "/node.xml", 40)
b.write_jobs(out + "/jobs.txt", [f"bench-vm-{i:02d}" for i in range(40)], 50, 0x10)
'
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
RUST_LOG=warn perf record -q -F 999 --call-graph dwarf,16384 -o "$OUT/perf.data" -- \
  target/release/nic-agent serve --connect "test://$OUT/node.xml" --listen "127.0.0.1:$port" \
  --insecure --state-dir "$OUT/state" >"$OUT/agent.out" 2>"$OUT/agent.err" &
perf_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$OUT/agent.out" 2>/dev/null && break; sleep 0.05; done
target/release/examples/bench grpc --server "127.0.0.1:$port" --jobs "$OUT/jobs.txt" \
  --bridge cloudbr0 --queues 2 --concurrency 1 --label profile >"$OUT/load.json"
kill -INT "$perf_pid"
wait "$perf_pid" || true
python3 - "$OUT/load.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"load: {d['ok']}/{d['requests']} ok, p50 {d['p50_ms']:.2f} ms (perf slows it down)")
PY
# Reports go to files first: `perf report | head` would end perf with
# SIGPIPE, which pipefail turns into a failure.
perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none >"$OUT/by-library.txt" 2>/dev/null
perf report -i "$OUT/perf.data" --no-children --sort dso,sym --stdio -g none >"$OUT/by-symbol.txt" 2>/dev/null
perf report -i "$OUT/perf.data" --no-children --sort sym --stdio -G >"$OUT/report.txt" 2>/dev/null
echo "== share by library"
grep '%' "$OUT/by-library.txt" | grep -v '^#' | sed -n 1,8p
echo "== top symbols (callers: $OUT/report.txt)"
grep '%' "$OUT/by-symbol.txt" | grep -v '^#' | sed -n 1,25p
