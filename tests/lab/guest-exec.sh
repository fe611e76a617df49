#!/usr/bin/env bash
# guest-exec.sh [--timeout SECS] SOCKET 'command': runs a shell command in a lab
# guest and prints its output (stdout+stderr merged); exits with its status.
#
# Why: tests need to look inside the guest (ip route, ping to our bridge, VLAN
# devices) without depending on the guest network under test. SOCKET is the
# guest's second serial port (define-guest.sh: OUTDIR/NAME.cmd.sock), served
# by lab-cmdd in the guest. Request: "ID SECS BASE64(cmd)\n"; the reply sits
# between "@@LAB-BEGIN ID@@" and "@@LAB-END ID rc=N@@", so output left over
# from an earlier timed-out request is skipped. The guest kills the command
# after SECS; we give up a few seconds later (exit 124). One client at a time
# (flock on SOCKET.lock): QEMU's socket serves a single connection.
set -euo pipefail

SECS=30
if [ "${1:-}" = --timeout ]; then SECS=${2:?}; shift 2; fi
[ $# -eq 2 ] || { echo "usage: $0 [--timeout SECS] SOCKET 'command'" >&2; exit 2; }
[[ $SECS =~ ^[0-9]+$ ]] && [ "$SECS" -gt 0 ] || { echo "guest-exec: bad --timeout" >&2; exit 2; }
SOCK=$1 CMD=$2
[ -S "$SOCK" ] || { echo "guest-exec: $SOCK is not a socket" >&2; exit 2; }

exec 9>"$SOCK.lock"
flock -w "$((SECS + 10))" 9 || { echo "guest-exec: $SOCK busy" >&2; exit 124; }

exec 9>&- /usr/bin/python3 - "$SOCK" "$SECS" "$CMD" 9<&- <<'PY'
import base64, os, re, socket, sys, time

sock_path, secs, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rid = os.urandom(6).hex()
line = f"{rid} {secs} {base64.b64encode(cmd.encode()).decode()}\n".encode()
begin = f"@@LAB-BEGIN {rid}@@\n".encode()
end_re = re.compile(rb"@@LAB-END " + rid.encode() + rb" rc=(\d+)@@")

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
deadline = time.monotonic() + secs + 5
# A bare newline first flushes any half line a previous client left behind.
s.sendall(b"\n" + line)
buf = b""
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        sys.stderr.write("guest-exec: timed out waiting for the guest\n")
        sys.exit(124)
    s.settimeout(left)
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        continue
    if not chunk:
        sys.stderr.write("guest-exec: guest closed the channel\n")
        sys.exit(125)
    buf += chunk
    b = buf.find(begin)
    if b < 0:
        continue
    m = end_re.search(buf, b + len(begin))
    if m:
        out = buf[b + len(begin):m.start()]
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
        sys.exit(int(m.group(1)))
PY
