"""libvirt events, pending unplugs and a hung libvirtd, through the real agent
on qemu:///system with real QEMU guests.

1. With events on (the default), a detach is REMOVED and the agent made no
   polling read of the live XML during it: nic_agent_detach_poll_reads_total
   stays where it was, and a device-removed event was received.
2. With `--events false`, the same detach is REMOVED by polling (the poll
   counter grows, no device-removed event is received): the fallback works.
3. A detach from a paused guest times out (DEADLINE_EXCEEDED, PENDING); the
   guest is resumed and, WITHOUT a retry, the agent's host clean-up runs: the
   VXLAN bridge and device the agent made for that NIC are removed. Once with
   events (DEVICE_REMOVED ends the pending unplug) and once without (the
   background re-check finds the NIC gone).
4. libvirtd is SIGSTOPped for 20 s in the middle of a burst of attaches:
   health turns NOT_SERVING within 10 s, every request ends with OK,
   UNAVAILABLE or DEADLINE_EXCEEDED within its deadline, after SIGCONT health
   is SERVING again and the agent attaches again, and no guest holds a NIC
   that libvirt does not show. Only a libvirtd the lab itself started
   (start-libvirtd.sh's marker names it) is stopped; otherwise the test is
   skipped, and the skip fails the suite (labkit.finish) unless
   tests/lab/allowed-skips.txt lists it. SIGCONT is always sent in a finally.
5. An unplug request that reaches a guest before its kernel's ACPI is up is
   lost: Linux clears the hot-plug status while it boots. The NIC is put in
   a stopped guest's definition through the agent, the guest is started,
   and DetachNic is sent at once. With `--unplug-retry-ms 0` (never ask
   again) the NIC stays in the booted guest and the detach ends PENDING:
   that proves this lab really loses the request. With asking again on,
   the agent repeats the request once the guest has had its time, and the
   detach ends REMOVED, seen from inside the guest.

Everything made here is named lab-e* (VNIs 5301/5302) and removed at the end.
Run (root, under `flock /tmp/nic-agent-lab.lock`): python3 tests/lab/test_e2e_events.py
Env: NIC_AGENT_BIN (default target/debug/nic-agent).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit as lk  # noqa: E402

grpc, pb, rpc = lk.stubs()

PREFIX = "lab-e"
BRIDGE = "lab-ebr0"        # plain test bridge with DHCP
UNDERLAY = "lab-ebr1"      # label bridge under the agent-made VXLAN bridges
SUBNET, UNDERLAY_SUBNET = 64, 65
OUT = os.path.join(lk.WORK, "guest")
G1 = f"{PREFIX}-g1"        # pc, persistent: detaches
G_STORM = f"{PREFIX}-storm"  # pc, persistent: SIGSTOP burst
G_BOOT = f"{PREFIX}-boot"    # pc, persistent, defined stopped: a request lost at boot
WORKDIR = tempfile.mkdtemp(prefix="lab-e-")
STATE_DIR = os.path.join(WORKDIR, "state")
AGENTS = []
REPORT = []
RPC_TIMEOUT = 60
STOP_SECONDS = 20


def mac(test, n):
    return f"52:54:00:e{test:01x}:{n // 256:02x}:{n % 256:02x}"


def start_agent(tag, *extra):
    # No grace period: test 3 checks that the clean-up of a pending unplug
    # runs without a retry, not the grace period (unit-tested in host::objects).
    a = lk.Agent(os.path.join(WORKDIR, f"agent-{tag}.stderr"), "--host-network", "on",
                 "--state-dir", STATE_DIR, "--persist-dir", STATE_DIR + "-persist",
                 "--bridge-grace-s", "0", "--detach-timeout-ms", "20000",
                 "--metrics-listen", "127.0.0.1:0", *extra)
    AGENTS.append(a)
    return a


def outcome(fn, *a, **kw):
    try:
        return "OK", fn(*a, **kw)
    except grpc.RpcError as e:
        return e.code().name, e.details()


def link_exists(name):
    return subprocess.run(["ip", "link", "show", "dev", name],
                          capture_output=True).returncode == 0


def link_alias(name):
    out = subprocess.run(["ip", "-d", "link", "show", "dev", name], capture_output=True,
                         text=True).stdout
    m = re.search(r"^\s+alias (.+)$", out, re.M)
    return m.group(1).strip() if m else None


def macs_in(vm, inactive=False):
    p = lk.virsh("dumpxml", *(["--inactive"] if inactive else []), vm, check=False)
    if p.returncode != 0:
        return None
    return {m.lower() for m in re.findall(r"<mac address='([0-9a-fA-F:]{17})'", p.stdout)}


def ghost_devices(vm):
    """User-aliased devices QEMU has that libvirt's live XML does not (see
    test_e2e_faults.py)."""
    p = lk.virsh("qemu-monitor-command", vm,
                 '{"execute":"qom-list","arguments":{"path":"/machine/peripheral"}}')
    qemu = {d["name"] for d in json.loads(p.stdout)["return"] if d["name"].startswith("ua-")}
    known = set(re.findall(r"<alias name='(ua-[^']+)'/>", lk.virsh("dumpxml", vm).stdout))
    return qemu - known


def metric(m, name):
    return m.get(name, 0.0)


def lab_libvirtd_pid():
    """libvirtd's PID when the lab started it (marker == pidfile), else None."""
    try:
        with open("/run/libvirtd.pid") as f:
            pid = int(f.read().strip() or 0)
        with open(os.path.join(lk.LAB_STATE, "libvirtd.started")) as f:
            marker = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except (OSError, ValueError):
        return None
    return pid if pid == marker and comm == "libvirtd" else None


def cleanup_vxlan(vni):
    """The agent's links for a VNI, only when they carry its mark."""
    for name in (f"vxlan{vni}", f"brvx-{vni}"):
        if link_exists(name) and link_alias(name) == "nic-agent":
            subprocess.run(["ip", "link", "del", "dev", name], check=False)


def cleanup_all():
    for a in AGENTS:
        if a.alive():
            a.stop()
    lk.script("teardown.sh", PREFIX, check=False)
    for vni in (5301, 5302):
        cleanup_vxlan(vni)
    for br in (BRIDGE, UNDERLAY):
        lk.script("net.sh", "down", br, check=False)


class EventsE2E(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            lk.script("build-guest.sh", OUT, timeout=600)
            cleanup_all()
            lk.script("net.sh", "up", BRIDGE, "--subnet", str(SUBNET))
            lk.script("net.sh", "up", UNDERLAY, "--subnet", str(UNDERLAY_SUBNET), "--mtu", "1500")
            boots = [subprocess.Popen(
                ["bash", os.path.join(lk.LAB_DIR, "define-guest.sh"), n, "pc", OUT,
                 "--timeout", "180"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True) for n in (G1, G_STORM)]
            for p in boots:
                out, _ = p.communicate(timeout=300)
                if p.returncode != 0:
                    raise RuntimeError(f"define-guest failed:\n{out}")
        except BaseException:
            cleanup_all()
            raise

    @classmethod
    def tearDownClass(cls):
        cleanup_all()

    def attach_and_see(self, agent, vm, m, **spec):
        g = lk.Guest(vm, "pc", OUT)
        mark = g.console.mark()
        spec.setdefault("bridge", BRIDGE)
        r = agent.stub.AttachNic(pb.AttachNicRequest(vm=vm, nic=pb.NicSpec(mac=m, **spec)),
                                 timeout=RPC_TIMEOUT)
        g.console.wait(rf"LAB: nic-add name=\S+ mac={m} ", timeout=30, after=mark)
        return r, g, mark

    def detach_counted(self, agent, vm, m):
        """DetachNic; returns (response, seconds, poll reads, device-removed events) for it."""
        before = lk.metrics(agent)
        t0 = time.monotonic()
        r = agent.stub.DetachNic(pb.DetachNicRequest(vm=vm, mac=m), timeout=RPC_TIMEOUT)
        took = time.monotonic() - t0
        after = lk.metrics(agent)
        polls = metric(after, "nic_agent_detach_poll_reads_total") - \
            metric(before, "nic_agent_detach_poll_reads_total")
        key = 'nic_agent_libvirt_events_total{event="device-removed"}'
        events = metric(after, key) - metric(before, key)
        return r, took, polls, events

    # ------------------------------------------------------------ 1, 2

    def test_1_detach_with_events_is_removed_without_polling_reads(self):
        agent = start_agent("events-on")
        try:
            m = mac(1, 1)
            self.attach_and_see(agent, G1, m)
            r, took, polls, events = self.detach_counted(agent, G1, m)
            self.assertEqual(r.state, pb.DETACH_STATE_REMOVED)
            self.assertEqual(polls, 0, "the detach polled the live XML although events flow")
            self.assertGreaterEqual(events, 1, "no device-removed event was received")
            self.assertNotIn(m, macs_in(G1))
            calls = {k: v for k, v in lk.metrics(agent).items()
                     if k.startswith("nic_agent_libvirt_calls_total")}
            self.assertTrue(calls, "no libvirt call counters exported")
            REPORT.append(f"events on: DetachNic REMOVED in {took:.3f}s, poll reads {polls:.0f}, "
                          f"device-removed events {events:.0f}")
        finally:
            agent.stop()

    def test_2_detach_with_events_off_polls(self):
        agent = start_agent("events-off", "--events", "false")
        try:
            m = mac(2, 1)
            self.attach_and_see(agent, G1, m)
            r, took, polls, events = self.detach_counted(agent, G1, m)
            self.assertEqual(r.state, pb.DETACH_STATE_REMOVED)
            self.assertGreaterEqual(polls, 1, "events off, yet no polling read")
            self.assertEqual(events, 0, "events off, yet a device-removed event came")
            self.assertNotIn(m, macs_in(G1))
            REPORT.append(f"events off: DetachNic REMOVED in {took:.3f}s by polling "
                          f"({polls:.0f} reads)")
        finally:
            agent.stop()

    # ------------------------------------------------------------ 3

    def pending_then_cleanup_without_retry(self, events, vni, n):
        br, dev = f"brvx-{vni}", f"vxlan{vni}"
        agent = start_agent(f"pending-{vni}", "--events", "true" if events else "false")
        g = lk.Guest(G1, "pc", OUT)
        try:
            m = mac(3, n)
            r, _, _ = self.attach_and_see(agent, G1, m, bridge=UNDERLAY,
                                          broadcast_uri=f"vxlan://{vni}", mtu=1450)
            self.assertEqual(r.nic.bridge, br)
            self.assertTrue(link_exists(br) and link_exists(dev), f"{br}/{dev} not made")
            self.assertEqual(link_alias(br), "nic-agent")
            lk.virsh("suspend", G1)
            try:
                t0 = time.monotonic()
                with self.assertRaises(grpc.RpcError) as cm:
                    agent.stub.DetachNic(pb.DetachNicRequest(vm=G1, mac=m, timeout_ms=3000),
                                         timeout=RPC_TIMEOUT)
                t_pending = time.monotonic() - t0
                self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED,
                                 cm.exception.details())
                self.assertEqual(lk.rpc_error_metadata(cm.exception).get("x-detach-state"),
                                 "PENDING")
                self.assertIn(m, macs_in(G1), "NIC left a paused guest")
                self.assertTrue(link_exists(br), f"{br} removed while its NIC is still there")
            finally:
                lk.virsh("resume", G1, check=False)
            t1 = time.monotonic()
            # No retry: the agent must clean up by itself once the guest acks.
            lk.wait_until(lambda: m not in (macs_in(G1) or set()), 30, interval=0.1,
                          what=f"{m} to leave {G1} after resume")
            lk.wait_until(lambda: not link_exists(br) and not link_exists(dev), 30,
                          interval=0.1, what=f"the agent to remove {br} and {dev} without a retry")
            REPORT.append(f"pending unplug ({'events' if events else 'no events, re-check'}): "
                          f"PENDING after {t_pending:.2f}s; {br} removed "
                          f"{time.monotonic() - t1:.2f}s after resume, without a retry")
            self.assertIn("pending unplug landed", agent.stderr())
        finally:
            agent.stop()
            cleanup_vxlan(vni)

    def test_3a_pending_detach_cleans_up_on_the_event_without_retry(self):
        self.pending_then_cleanup_without_retry(True, 5301, 1)

    def test_3b_pending_detach_cleans_up_by_recheck_with_events_off(self):
        self.pending_then_cleanup_without_retry(False, 5302, 2)

    # ------------------------------------------------------------ 4

    def test_4_libvirtd_sigstop_mid_burst(self):
        pid = lab_libvirtd_pid()
        if pid is None:
            self.skipTest("libvirtd was not started by the lab (start-libvirtd.sh marker): "
                          "not stopping a libvirtd that is somebody else's")
        agent = start_agent("sigstop")
        statuses = []  # (seconds since start, status)
        stop = threading.Event()
        t_start = time.monotonic()

        def watch():
            while not stop.is_set():
                s = lk.health(agent.channel, timeout=1.0)
                if not statuses or statuses[-1][1] != s:
                    statuses.append((time.monotonic() - t_start, s))
                time.sleep(0.1)

        def timed_attach(m):
            t0 = time.monotonic()
            c, r = outcome(agent.stub.AttachNic,
                           pb.AttachNicRequest(vm=G_STORM, nic=pb.NicSpec(mac=m, bridge=BRIDGE)),
                           timeout=RPC_TIMEOUT)
            return c, r, time.monotonic() - t0

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        macs = [mac(4, n) for n in range(12)]
        results = {}
        t_stop = t_cont = None
        try:
            self.assertEqual(lk.health(agent.channel), lk.SERVING)
            with ThreadPoolExecutor(4) as pool:
                futs = {m: pool.submit(timed_attach, m) for m in macs}
                lk.wait_until(lambda: sum(f.done() for f in futs.values()) >= 2, 60,
                              what="2 attaches before the stop")
                try:
                    os.kill(pid, signal.SIGSTOP)
                    t_stop = time.monotonic() - t_start
                    lk.log(f"SIGSTOPped libvirtd {pid}")
                    lk.wait_until(lambda: any(s == lk.NOT_SERVING for _, s in statuses), 10,
                                  interval=0.05, what="health NOT_SERVING within 10 s")
                    time.sleep(max(0.0, STOP_SECONDS - (time.monotonic() - t_start - t_stop)))
                finally:
                    os.kill(pid, signal.SIGCONT)
                    t_cont = time.monotonic() - t_start
                    lk.log(f"SIGCONTed libvirtd {pid}")
                for m, f in futs.items():
                    results[m] = f.result(timeout=RPC_TIMEOUT + 30)
            lk.wait_until(lambda: statuses[-1][1] == lk.SERVING, 60, interval=0.1,
                          what="health SERVING again after SIGCONT")
        finally:
            stop.set()
            watcher.join(5)
        t_down = next(t for t, s in statuses if s == lk.NOT_SERVING)
        codes = {}
        for c, _, _ in results.values():
            codes[c] = codes.get(c, 0) + 1
        REPORT.append(
            f"libvirtd SIGSTOP {t_cont - t_stop:.1f}s mid-burst: NOT_SERVING "
            f"{t_down - t_stop:.2f}s after the stop; codes {codes}; slowest request "
            f"{max(d for _, _, d in results.values()):.1f}s (deadline {RPC_TIMEOUT}s); health "
            f"{[(round(t, 1), {1: 'SERVING', 2: 'NOT_SERVING'}.get(s, s)) for t, s in statuses]}")
        self.assertLessEqual(t_down - t_stop, 10.0, "NOT_SERVING came too late")
        bad = {m: (c, r) for m, (c, r, _) in results.items()
               if c not in ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED")}
        self.assertEqual(bad, {}, "codes other than OK/UNAVAILABLE/DEADLINE_EXCEEDED")
        late = {m: d for m, (_, _, d) in results.items() if d > RPC_TIMEOUT + 2}
        self.assertEqual(late, {}, "requests that outlived their deadline")
        # The agent serves again (a VM in doubt clears once its call returned).
        def attach_again():
            c, r, _ = timed_attach(mac(4, 0xff))
            return c == "OK"
        lk.wait_until(attach_again, 60, interval=1.0, what="an attach to succeed again")
        self.assertEqual(ghost_devices(G_STORM), set(),
                         "QEMU holds a NIC that libvirt does not show")
        live = macs_in(G_STORM) or set()
        for m, (c, _, _) in results.items():
            if c == "OK":
                self.assertIn(m, live, f"{m} answered OK but is not live")
        agent.stop()

    # ------------------------------------------------------------ 5

    def detach_at_boot(self, tag, retry_ms, m, timeout_ms):
        """Puts NIC m in G_BOOT's definition, starts it and sends DetachNic at
        once. Returns (code, details, seconds, agent, guest, console mark)."""
        g = lk.Guest(G_BOOT, "pc", OUT)
        g.define("--no-start")
        agent = start_agent(tag, "--unplug-retry-ms", str(retry_ms))
        r = agent.stub.AttachNic(pb.AttachNicRequest(vm=G_BOOT, nic=pb.NicSpec(
            mac=m, bridge=BRIDGE)), timeout=RPC_TIMEOUT)
        self.assertEqual(r.applied, "config", r)
        mark = g.console.mark()
        lk.virsh("start", G_BOOT)
        t0 = time.monotonic()
        c, d = outcome(agent.stub.DetachNic,
                       pb.DetachNicRequest(vm=G_BOOT, mac=m, timeout_ms=timeout_ms),
                       timeout=RPC_TIMEOUT)
        return c, d, time.monotonic() - t0, agent, g, mark

    def test_5_a_request_lost_while_the_guest_boots_is_asked_for_again(self):
        # Control: never asking again, the request sent at boot is lost.
        m = mac(5, 1)
        c, d, took, agent, g, mark = self.detach_at_boot("boot-no-retry", 0, m, 15000)
        try:
            self.assertEqual(c, "DEADLINE_EXCEEDED", d)
            g.console.wait(r"LAB: boot ok", timeout=60, after=mark)
            g.console.wait(rf"LAB: nic-add name=\S+ mac={m} ", timeout=30, after=mark)
            self.assertIn(m, macs_in(G_BOOT), "the lab guest acted on a request sent at boot")
            self.assertEqual(g.console.find(rf"LAB: nic-remove name=\S+ mac={m}", after=mark), [])
            self.assertNotIn("asked it again", agent.stderr())
        finally:
            agent.stop()
            g.remove()
        control = f"never asking again: {c} after {took:.1f}s, the NIC stayed in the booted guest"

        m = mac(5, 2)
        c, d, took, agent, g, mark = self.detach_at_boot("boot-retry", 3000, m, 40000)
        try:
            self.assertEqual(c, "OK", d)
            self.assertEqual(d.state, pb.DETACH_STATE_REMOVED)
            g.console.wait(rf"LAB: nic-remove name=\S+ mac={m}", timeout=30, after=mark)
            self.assertNotIn(m, macs_in(G_BOOT) or set())
            asked = [l for l in agent.stderr().splitlines() if "asked it again" in l]
            self.assertTrue(asked, "REMOVED without the agent asking again")
            self.assertIn(m, asked[0])
        finally:
            agent.stop()
            g.remove()
        REPORT.append(f"unplug request sent while the guest boots: {control}; asking again "
                      f"after 3 s: REMOVED in {took:.1f}s after {len(asked)} repeat(s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        lk.BIN = sys.argv.pop(1)
    result = unittest.main(exit=False, verbosity=2).result
    for line in REPORT:
        print(f"report: {line}")
    status = lk.finish("test_e2e_events", result, label="lab-events")
    if status:
        print(f"agent logs kept in {WORKDIR}")
    else:
        shutil.rmtree(WORKDIR, ignore_errors=True)
    sys.exit(status)
