"""labkit: small shared helpers for the lab end-to-end tests (tests/lab/test_e2e_*.py).

Why a module: every end-to-end suite needs the same few things -- gRPC stubs
generated from proto/ at test time, the real agent started against
qemu:///system with its stderr kept for post-mortems, the lab scripts run with
bounded timeouts, and a guest console log that can be polled for `LAB: ...`
lines -- and getting bounded waits and PID-only process handling subtly
different per suite is how labs hang or leak processes.

Nothing here sleeps to "let things settle": every wait polls a condition and
gives up after a deadline.
"""
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(LAB_DIR))
WORK = os.environ.get("LAB_WORK", os.path.join(LAB_DIR, "work"))
LAB_STATE = os.environ.get("LAB_STATE", "/run/nic-agent-lab")
BIN = os.environ.get("NIC_AGENT_BIN", os.path.join(ROOT, "target", "debug", "nic-agent"))
URI = "qemu:///system"

_stubs = None


def stubs():
    """Generates the Python gRPC stubs from proto/ (once) and returns (grpc, pb, rpc)."""
    global _stubs
    if _stubs is None:
        from grpc_tools import protoc

        out = tempfile.mkdtemp(prefix="nicagent-lab-py-")
        rc = protoc.main([
            "protoc", f"-I{ROOT}/proto", f"--python_out={out}", f"--grpc_python_out={out}",
            f"{ROOT}/proto/nicagent/v1/nicagent.proto",
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed: {rc}")
        sys.path.insert(0, out)
        import grpc
        from nicagent.v1 import nicagent_pb2 as pb
        from nicagent.v1 import nicagent_pb2_grpc as rpc

        _stubs = (grpc, pb, rpc)
    return _stubs


def log(msg):
    print(f"[lab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, timeout=120, check=True, env=None):
    """Runs cmd (a list), returns CompletedProcess with text stdout/stderr.
    Raises RuntimeError with both streams when check and the exit code is not 0."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def script(name, *args, timeout=180, check=True):
    """Runs tests/lab/NAME with bash."""
    return run(["bash", os.path.join(LAB_DIR, name), *args], timeout=timeout, check=check)


def virsh(*args, check=True, timeout=60):
    return run(["virsh", "-q", "-c", URI, *args], timeout=timeout, check=check)


def wait_until(pred, timeout, interval=0.1, what="condition"):
    """Polls pred() until it returns a truthy value (returned) or timeout (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Console:
    """A guest's file serial console (ttyS0), read as lines."""

    def __init__(self, path):
        self.path = path

    def _raw(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace").replace("\r", "")

    def lines(self):
        """Complete lines only. The guest writes the console a few bytes at a
        time, so the text after the last newline may be half a line (an IP
        cut to "10.77.11"); matching it would read a truncated value."""
        return self._raw().split("\n")[:-1]

    def mark(self):
        """Current number of complete lines; pass to wait()/find() as `after`."""
        return len(self.lines())

    def find(self, regex, after=0):
        """All matches of regex (re.Match) among lines after `after`."""
        r = re.compile(regex)
        return [m for m in (r.search(l) for l in self.lines()[after:]) if m]

    def wait(self, regex, timeout=20, after=0, count=1):
        """Waits until at least `count` lines after `after` match; returns the last match."""
        found = wait_until(lambda: (lambda ms: ms if len(ms) >= count else None)(
            self.find(regex, after)), timeout, what=f"{regex!r} x{count} in {self.path}")
        return found[-1]

    def text(self):
        return self._raw()


class Guest:
    """A lab guest made by define-guest.sh; removed by remove()."""

    def __init__(self, name, machine, outdir):
        self.name, self.machine, self.outdir = name, machine, outdir
        self.console = Console(os.path.join(outdir, f"{name}.console.log"))
        self.sock = os.path.join(outdir, f"{name}.cmd.sock")

    def define(self, *flags, timeout=150):
        t0 = time.monotonic()
        script("define-guest.sh", self.name, self.machine, self.outdir, *flags, timeout=timeout)
        return time.monotonic() - t0

    def exec(self, cmd, timeout=30):
        """Runs cmd in the guest via the command channel; returns (rc, output)."""
        p = run(["bash", os.path.join(LAB_DIR, "guest-exec.sh"), "--timeout", str(timeout),
                 self.sock, cmd], timeout=timeout + 20, check=False)
        return p.returncode, p.stdout + p.stderr

    def state(self):
        return virsh("domstate", self.name, check=False).stdout.strip()

    def iflist(self, inactive=False):
        """`virsh domiflist` output, lower-cased (MACs are compared lower-case)."""
        args = ["domiflist", self.name] + (["--inactive"] if inactive else [])
        return virsh(*args).stdout.lower()

    def remove(self):
        virsh("destroy", self.name, check=False)
        virsh("undefine", self.name, check=False)


def nic_xml(mac, bridge, queues=None, mtu=None):
    """A plain virtio bridge NIC, for driving libvirt directly (bypassing the agent)."""
    q = f"<driver name='qemu' queues='{queues}'/>" if queues else ""
    m = f"<mtu size='{mtu}'/>" if mtu else ""
    return (f"<interface type='bridge'><mac address='{mac}'/><source bridge='{bridge}'/>"
            f"<model type='virtio'/>{q}{m}</interface>")


class Agent:
    """The real nic-agent serving on 127.0.0.1:<random port>; stderr goes to a file."""

    def __init__(self, stderr_path, *extra, uri=URI):
        grpc, _, rpc = stubs()
        self.stderr_path = stderr_path
        self._err = open(stderr_path, "w")
        # TCP without TLS must be asked for (--insecure): loopback only, test hosts.
        cmd = [BIN, "serve", "--connect", uri, "--listen", "127.0.0.1:0", "--insecure", *extra]
        log("starting " + " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")})
        self.addr = None
        # Set when the agent was started with --metrics-listen.
        self.metrics_addr = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                if line.startswith("nic-agent listening on "):
                    self.addr = line.strip().split()[-1]
                    ready.set()
                elif line.startswith("nic-agent metrics on "):
                    self.metrics_addr = line.strip().split()[-1]

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60):
            self.stop()
            raise RuntimeError(f"agent did not start; stderr:\n{self.stderr()}")
        # No proxy: the agent is on loopback, and grpc honours http_proxy.
        self.channel = grpc.insecure_channel(self.addr, options=[("grpc.enable_http_proxy", 0)])
        grpc.channel_ready_future(self.channel).result(timeout=20)
        self.stub = rpc.NicAgentStub(self.channel)

    def stderr(self):
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        """SIGTERM by PID (graceful shutdown), SIGKILL after 10 s."""
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def metrics(agent, timeout=10):
    """The agent's Prometheus text as {"name{labels}": value} (started with
    --metrics-listen 127.0.0.1:0)."""
    import urllib.request

    wait_until(lambda: agent.metrics_addr, 10, what="the metrics address")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{agent.metrics_addr}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


def rpc_error_metadata(err):
    """Trailing metadata of a grpc.RpcError as a dict."""
    md = err.trailing_metadata() or ()
    return {k: v for k, v in md}


_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def shared_libs(binary):
    """Absolute paths of the shared libraries `ldd BINARY` lists, the dynamic
    loader included (vdso and 'not found' entries raise or are skipped)."""
    out = run(["ldd", binary], timeout=30).stdout
    if "not found" in out:
        raise RuntimeError(f"ldd {binary}: missing libraries:\n{out}")
    paths = []
    for line in out.splitlines():
        m = _LDD_PATH.search(line)
        if m and m.group(1) not in paths:
            paths.append(m.group(1))
    return paths


def stage_binary(binary, root, dest):
    """Copies BINARY (stripped) to ROOT/DEST and every library ldd names to
    the same path under ROOT (as regular files), so ROOT can be copied into a
    guest's initramfs (build-guest.sh EXTRA_DIR) and the binary runs there.

    Why ldd and not a static build: the agent's library links glibc, and a
    static musl build would need another toolchain. The guest has no
    ld.so.cache; the loader still searches the multiarch directories it was
    built with, which is where ldd found the libraries. Returns the staged
    library paths (guest-side)."""
    target = os.path.join(root, dest.lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    run(["strip", "-o", target, binary], timeout=60)
    os.chmod(target, 0o755)
    libs = shared_libs(binary)
    for lib in libs:
        out = os.path.join(root, lib.lstrip("/"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(os.path.realpath(lib), "rb") as src, open(out, "wb") as dst:
            dst.write(src.read())
        os.chmod(out, 0o755)
    return libs


# grpc.health.v1 ServingStatus values.
SERVING, NOT_SERVING = 1, 2


def health(channel, timeout=2.0):
    """grpc.health.v1.Health/Check for the whole server ("" service): SERVING (1),
    NOT_SERVING (2), or None when the call itself fails.

    Raw bytes instead of generated stubs: the request is an empty message and
    the reply's only field (1, varint) is the status, so no health.proto has
    to be found or compiled on the lab host."""
    grpc, _, _ = stubs()
    call = channel.unary_unary("/grpc.health.v1.Health/Check",
                               request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    try:
        raw = call(b"", timeout=timeout)
    except grpc.RpcError:
        return None
    if len(raw) >= 2 and raw[0] == 0x08:
        return raw[1]
    # An empty reply is status 0 (UNKNOWN) in proto3.
    return 0


# ---------------------------------------------------------------- skips

# A skipped test proves nothing, so a skip fails its suite unless it is
# listed here with the reason it may be skipped. One line per skip:
#   SUITE::TEST  REASON
# SUITE is the file name without .py (test_e2e_faults); TEST the test
# method (or setUpClass for a skip of the whole class).
ALLOWED_SKIPS = os.environ.get("LAB_ALLOWED_SKIPS", os.path.join(LAB_DIR, "allowed-skips.txt"))


def allowed_skips(path=None):
    """{'suite::test': reason} from the allowed-skips file (a missing file allows none)."""
    path = path or ALLOWED_SKIPS
    allowed = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return allowed
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, reason = line.partition(" ")
        if "::" not in key or not reason.strip():
            raise ValueError(f"{path}:{n}: want 'suite::test reason', got {line!r}")
        allowed[key] = reason.strip()
    return allowed


def _test_name(test):
    """The method name of a test, a subtest's test, or 'setUpClass' for a class-level skip."""
    case = getattr(test, "test_case", test)
    name = getattr(case, "_testMethodName", None)
    if name:
        return name
    # unittest's _ErrorHolder for a skip raised in setUpClass: "setUpClass (module.Class)".
    return str(case).split(" ", 1)[0]


def finish(suite, result, label=None, failed=None):
    """Prints a suite's summary and returns its exit status.

    suite: the file name without .py; label: the summary's prefix (default
    suite); failed: the number of failed tests when the caller counts them
    itself (default failures + errors). Non-zero when a test failed, when no
    test passed, or when a test was skipped without an entry in the
    allowed-skips file. Every skip is printed with its reason, allowed or not."""
    label = label or suite
    if failed is None:
        failed = len(result.failures) + len(result.errors)
    allowed = allowed_skips()
    skipped_ids = set()
    refused = []
    for test, reason in result.skipped:
        key = f"{suite}::{_test_name(test)}"
        skipped_ids.add(key)
        if key in allowed:
            print(f"{label}: skipped {key} (allowed: {allowed[key]}): {reason}")
        else:
            refused.append(key)
            print(f"{label}: SKIP NOT ALLOWED {key}: {reason}\n"
                  f"{label}:   make it run, or list it with a reason in {ALLOWED_SKIPS}")
    # A skip raised in setUpClass is not in testsRun; a skipped test is.
    skipped_run = {getattr(t, "test_case", t).id() for t, _ in result.skipped
                   if hasattr(getattr(t, "test_case", t), "_testMethodName")}
    passed = result.testsRun - failed - len(skipped_run)
    print(f"{label}: {max(passed, 0)} passed, {failed} failed, {len(skipped_ids)} skipped"
          + (f" ({len(refused)} not allowed)" if refused else ""))
    if passed <= 0:
        print(f"{label}: no test passed: the suite proved nothing")
    status = 1 if failed or refused or passed <= 0 else 0
    if failed:
        print_consoles(label)
    return status


# When this suite's process began: the consoles it wrote are newer.
_STARTED = time.time()


def print_consoles(label, lines=25):
    """The tail of every guest console this suite wrote, for a failure seen
    only in CI's output: what the guest said is often the cause (a NIC it
    never released, a kernel warning)."""
    for path in sorted(glob.glob(os.path.join(WORK, "guest*", "*.console.log"))):
        try:
            if os.path.getmtime(path) < _STARTED:
                continue
            with open(path, "rb") as f:
                tail = f.read().decode("utf-8", "replace").replace("\r", "").splitlines()[-lines:]
        except OSError:
            continue
        print(f"{label}: console {os.path.basename(path)}, last {len(tail)} lines:")
        for line in tail:
            print(f"{label}:   {line}")
