"""End-to-end VM life through libvirt's qemu hook and the agent's reconcile.

libvirtd runs the lab's hook drop-in (`/etc/libvirt/hooks/qemu.d/nic-agent`,
installed by start-libvirtd.sh before libvirtd starts) with the state dirs
/run/nic-agent-lab/hook-state and hook-persist. The agent runs on the same
dirs (`--host-network on --bridge-grace-s 0 --reconcile-interval-s 2`), so the
two share locks, intents, segment records and saved IDS state. Guests are
persistent and started with plain `virsh start`, as after a host reboot.

1. VXLAN: a NIC on vxlan://5301 (mtu 1450) gets a lease from a dnsmasq in a
   "next host" network namespace that has its own vxlan5301 (same group,
   ttl and dstport as the agent's device). The guest is destroyed, brvx-5301
   and vxlan5301 are deleted, `virsh start`: the hook rebuilds them, and the
   guest sees its NIC (mtu 1450) and gets a lease again.
2. IDS: destroy -> the reconcile restores the bridge; start -> the hook puts
   it into IDS state (PROMISC) before the guest runs; destroy again -> the
   reconcile restores it.
3. An IDS NIC attached CONFIG-only to a stopped guest gets IDS state when the
   guest is started through the hook.
4. A guest with no agent-made NICs starts normally; the hook leaves nothing.
5. A guest undefined and defined again under its name (new UUID) is found by
   name: the agent's name cache does not answer NOT_FOUND for it.

Run as root: python3 tests/lab/test_e2e_lifecycle.py [path/to/nic-agent]
The hook must be loaded by the running libvirtd; otherwise the suite FAILS.
Env: NIC_AGENT_BIN, LAB_KEEP_WORKDIR=1.
Last line: `lab-lifecycle: N passed, M failed`.
"""
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit as lk  # noqa: E402

grpc, pb, rpc = lk.stubs()

LAB = lk.LAB_DIR
GUEST_DIR = os.path.join(lk.WORK, "guest")
HOOK = "/etc/libvirt/hooks/qemu.d/nic-agent"
HOOK_STATE = os.path.join(lk.LAB_STATE, "hook-state")
HOOK_PERSIST = os.path.join(lk.LAB_STATE, "hook-persist")
HOOK_LOG = os.path.join(lk.LAB_STATE, "hook.log")
# What start-libvirtd.sh's drop-in runs (the agent may be another binary).
HOOK_BIN = os.path.join(lk.ROOT, "target", "debug", "nic-agent")

PREFIX = "lab-l"
GA, GB, GC, GD = "lab-l-ga", "lab-l-gb", "lab-l-gc", "lab-l-gd"
GE = "lab-l-ge"
VX_LABEL, VX_SUBNET, VNI = "lab-lbr1", 31, 5301
VX_BR, VX_DEV = f"brvx-{VNI}", f"vxlan{VNI}"
PEER_NS, PEER_VETH, PEER_VETH_NS, PEER_BR, PEER_SUBNET = "lab-lns1", "lab-lv1", "lab-lv1p", "lab-lpbr", 32
IDS_BR, IDS_SUBNET = "lab-lbr2", 33
IDS_BR3, IDS_SUBNET3 = "lab-lbr3", 34
LABEL_BRIDGES = (VX_LABEL, IDS_BR, IDS_BR3)
WAIT = 40
RECONCILE_WAIT = 20  # the agent reconciles every 2 s
DETACH_MS = 20000

TIMINGS = []


# ---------------------------------------------------------------- helpers

def sh(*cmd, check=True, timeout=60):
    return lk.run(list(cmd), timeout=timeout, check=check).stdout


def link_exists(name, ns=None):
    pre = ["ip", "-n", ns] if ns else ["ip"]
    return subprocess.run([*pre, "link", "show", "dev", name], capture_output=True).returncode == 0


def link_detail(name):
    return sh("ip", "-d", "link", "show", "dev", name)


def link_flags(name):
    m = re.search(r"<([^>]*)>", link_detail(name))
    return set(m.group(1).split(",")) if m else set()


def link_alias(name):
    m = re.search(r"^\s+alias (.+)$", link_detail(name), re.M)
    return m.group(1).strip() if m else None


def promisc(name):
    return "PROMISC" in link_flags(name)


def promisc_file(bridge):
    return os.path.join(HOOK_STATE, f"promisc-{bridge}.json")


def pid_is(pid, comm):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    name = stat[stat.find("(") + 1:stat.rfind(")")]
    state = stat[stat.rfind(")") + 2:].split(" ", 1)[0]
    return name == comm and state not in ("Z", "X")


def kill_pid(pid, comm):
    """Kills PID only while it is still COMM."""
    if pid and pid_is(pid, comm):
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not pid_is(pid, comm):
                return
            time.sleep(0.1)
        if pid_is(pid, comm):
            os.kill(pid, signal.SIGKILL)


def hook_log_mark():
    try:
        return os.path.getsize(HOOK_LOG)
    except OSError:
        return 0


def hook_log_since(mark):
    try:
        with open(HOOK_LOG, "rb") as f:
            f.seek(mark)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def intent_files():
    """(path, text) of every intent file under the hook's state dir."""
    out = []
    for root, _, files in os.walk(os.path.join(HOOK_STATE, "intents")):
        for n in files:
            p = os.path.join(root, n)
            try:
                with open(p, errors="replace") as f:
                    out.append((p, f.read()))
            except OSError:
                pass
    return out


def hook_loaded():
    """lib.sh's lab_hook_loaded: the running libvirtd started with the drop-in."""
    return subprocess.run(["bash", "-c", f". {LAB}/lib.sh; lab_hook_loaded"]).returncode == 0


class Agent(lk.Agent):
    def __init__(self, workdir):
        super().__init__(
            os.path.join(workdir, "agent.stderr"),
            "--host-network", "on", "--state-dir", HOOK_STATE, "--persist-dir", HOOK_PERSIST,
            "--bridge-grace-s", "0", "--reconcile-interval-s", "2",
            "--detach-timeout-ms", str(DETACH_MS),
            *os.environ.get("LAB_AGENT_ARGS", "").split())

    def log_tail(self, n=200):
        return "".join(self.stderr().splitlines(keepends=True)[-n:])


def dump_on_failure(fn):
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        t0 = time.monotonic()
        try:
            return fn(self, *a, **kw)
        except BaseException:
            cls = type(self)
            for g in cls.guests.values():
                sys.stderr.write(f"===== {g.name} console (tail) =====\n"
                                 f"{''.join(g.console.text().splitlines(True)[-60:])}\n")
            if getattr(cls, "agent", None):
                sys.stderr.write(f"===== agent stderr (tail) =====\n{cls.agent.log_tail()}\n")
            for log in (HOOK_LOG, os.path.join(cls.workdir, "peer-dnsmasq.log")):
                if os.path.exists(log):
                    with open(log, errors="replace") as f:
                        sys.stderr.write(f"===== {log} (tail) =====\n{f.read()[-6000:]}\n")
            raise
        finally:
            TIMINGS.append(f"{fn.__name__}: {time.monotonic() - t0:.2f}s total")
    return wrapper


# ---------------------------------------------------------------- tests

class LifecycleE2E(unittest.TestCase):
    agent = None
    guests = {}
    peer_dnsmasq_pid = None

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root")
        cls.workdir = tempfile.mkdtemp(prefix="lab-l-life-")
        cls.guests = {n: lk.Guest(n, "pc", GUEST_DIR) for n in (GA, GB, GC, GD)}
        try:
            lk.script("start-libvirtd.sh")
            lk.script("start-ovs.sh")
            # Not a skip: without the hook this suite proves nothing, and a
            # libvirtd started by someone else must not turn it green.
            if not os.access(HOOK, os.X_OK):
                raise AssertionError(f"{HOOK} is missing: start-libvirtd.sh installs it")
            with open(HOOK) as f:
                text = f.read()
            if HOOK_BIN not in text:
                raise AssertionError(f"{HOOK} does not run {HOOK_BIN}:\n{text}")
            if not hook_loaded():
                raise AssertionError(
                    "the running libvirtd was not started with the nic-agent hook in place, "
                    "so it will not run it; stop it (tests/lab/stop-services.sh if the lab "
                    "started it) and run start-libvirtd.sh again")
            lk.script("build-guest.sh", GUEST_DIR)
            cls.cleanup_host()
            t0 = time.monotonic()
            boots = [subprocess.Popen(["bash", os.path.join(LAB, "define-guest.sh"), g, "pc",
                                       GUEST_DIR, "--timeout", "120"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for g in (GA, GB)]
            for p in boots:
                out, _ = p.communicate(timeout=200)
                if p.returncode != 0:
                    raise RuntimeError(f"define-guest failed:\n{out}")
            TIMINGS.append(f"boot 2 guests in parallel: {time.monotonic() - t0:.2f}s")
            for g in (GC, GD):
                cls.guests[g].define("--no-start")
            cls.agent = Agent(cls.workdir)
            cls.stub = cls.agent.stub
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def cleanup_host(cls):
        """Removes everything this file may have made (also by an interrupted run)."""
        lk.script("teardown.sh", PREFIX, check=False)
        kill_pid(cls.peer_dnsmasq_pid, "dnsmasq")
        pidfile = os.path.join(lk.LAB_STATE, "lab-l-peer-dnsmasq.pid")
        try:
            with open(pidfile) as f:
                kill_pid(int(f.read().strip() or 0), "dnsmasq")
        except (OSError, ValueError):
            pass
        if subprocess.run(["ip", "netns", "pids", PEER_NS], capture_output=True).returncode == 0:
            sh("ip", "netns", "del", PEER_NS, check=False)
        if link_exists(PEER_VETH):
            sh("ip", "link", "del", "dev", PEER_VETH, check=False)
        for br in LABEL_BRIDGES:
            lk.script("net.sh", "down", br, check=False)
        for name in (VX_DEV, VX_BR):
            if link_exists(name) and link_alias(name) == "nic-agent":
                sh("ip", "link", "del", "dev", name, check=False)
        for p in [os.path.join(HOOK_PERSIST, "segments", f"{VX_BR}.json"),
                  *(promisc_file(b) for b in LABEL_BRIDGES)]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        for b in (VX_BR, *LABEL_BRIDGES):
            shutil.rmtree(os.path.join(HOOK_STATE, "intents", b), ignore_errors=True)

    @classmethod
    def tearDownClass(cls):
        if cls.agent:
            cls.agent.stop()
            cls.agent = None
        cls.cleanup_host()
        if os.environ.get("LAB_KEEP_WORKDIR"):
            print(f"kept {getattr(cls, 'workdir', '')}", file=sys.stderr)
        else:
            shutil.rmtree(getattr(cls, "workdir", ""), ignore_errors=True)

    # -- helpers

    def attach(self, vm, **nic):
        t0 = time.monotonic()
        r = self.stub.AttachNic(pb.AttachNicRequest(vm=vm, nic=pb.NicSpec(**nic)), timeout=60)
        TIMINGS.append(f"  AttachNic {vm} {nic.get('mac')}: {time.monotonic() - t0:.3f}s")
        return r

    def g(self, name):
        return self.guests[name]

    def destroy(self, name):
        lk.virsh("destroy", name)
        lk.wait_until(lambda: self.g(name).state() == "shut off", 30, what=f"{name} shut off")

    def start(self, name):
        """`virsh start` with a fresh console; waits for the guest's boot line."""
        g = self.g(name)
        try:
            os.unlink(g.console.path)
        except FileNotFoundError:
            pass
        mark = hook_log_mark()
        t0 = time.monotonic()
        lk.virsh("start", name, timeout=120)
        g.console.wait(r"LAB: boot ok", timeout=120)
        TIMINGS.append(f"  virsh start {name} -> boot ok: {time.monotonic() - t0:.2f}s")
        return hook_log_since(mark)

    def assert_hook_ran(self, log, name, ops=("prepare begin", "started begin")):
        for op in ops:
            self.assertIn(f"qemu {name} {op}", log, f"the hook was not run for {name} {op}")
        self.assertNotRegex(log, r"(?i)\berror\b", f"the hook logged an error:\n{log}")

    def nic_line(self, name, mac):
        m = self.g(name).console.wait(rf"LAB: nic-add name=(\S+) mac={mac} mtu=(\d+)", WAIT)
        return m.group(1), int(m.group(2))

    def lease(self, name, ifname, mac, subnet, after=0):
        m = self.g(name).console.wait(
            rf"LAB: (dhcp|dhcp-fail) name={ifname} mac={mac}\b(?: ip=(\S+))?", WAIT, after=after)
        self.assertEqual(m.group(1), "dhcp", f"{name}: no lease on {ifname}: {m.group(0)}")
        ip = m.group(2).split("/")[0]
        self.assertTrue(ip.startswith(f"10.77.{subnet}."), f"lease {ip} not in 10.77.{subnet}.0/24")
        return ip

    def make_peer(self, group, port):
        """The "next host": a netns on the label bridge with its own VTEP and DHCP."""
        sh("ip", "netns", "add", PEER_NS)
        sh("ip", "link", "add", PEER_VETH, "type", "veth", "peer", "name", PEER_VETH_NS,
           "netns", PEER_NS)
        sh("ip", "link", "set", "dev", PEER_VETH, "master", VX_LABEL, "up")
        ns = ["ip", "-n", PEER_NS]
        sh(*ns, "link", "set", "lo", "up")
        sh(*ns, "addr", "add", f"10.77.{VX_SUBNET}.2/24", "dev", PEER_VETH_NS)
        sh(*ns, "link", "set", "dev", PEER_VETH_NS, "up")
        sh(*ns, "link", "add", VX_DEV, "type", "vxlan", "id", str(VNI), "group", group,
           "ttl", "10", "dev", PEER_VETH_NS, "dstport", str(port))
        sh(*ns, "link", "add", PEER_BR, "type", "bridge")
        sh(*ns, "link", "set", "dev", PEER_BR, "mtu", "1450")
        sh(*ns, "link", "set", "dev", VX_DEV, "master", PEER_BR, "up")
        sh(*ns, "addr", "add", f"10.77.{PEER_SUBNET}.1/24", "dev", PEER_BR)
        sh(*ns, "link", "set", "dev", PEER_BR, "up")
        pidfile = os.path.join(lk.LAB_STATE, "lab-l-peer-dnsmasq.pid")
        net = f"10.77.{PEER_SUBNET}"
        # Same flags as net.sh, inside the namespace.
        sh("ip", "netns", "exec", PEER_NS, "dnsmasq", "--conf-file=/dev/null", "--no-hosts",
           f"--pid-file={pidfile}", "--bind-interfaces", f"--interface={PEER_BR}",
           "--except-interface=lo", f"--dhcp-range={net}.50,{net}.150,255.255.255.0,12h",
           "--dhcp-authoritative", "--no-ping", "--port=0", "--no-resolv",
           f"--dhcp-leasefile={os.path.join(self.workdir, 'peer-leases')}",
           "--user=root", "--group=root", "--log-dhcp",
           f"--log-facility={os.path.join(self.workdir, 'peer-dnsmasq.log')}")
        lk.wait_until(lambda: os.path.exists(pidfile), 10, what="peer dnsmasq pidfile")
        with open(pidfile) as f:
            type(self).peer_dnsmasq_pid = int(f.read().strip())
        self.assertTrue(pid_is(self.peer_dnsmasq_pid, "dnsmasq"))

    # -- 1. VXLAN rebuilt by the hook

    @dump_on_failure
    def test_1_vxlan_segment_rebuilt_by_the_hook_after_a_reboot(self):
        lk.script("net.sh", "up", VX_LABEL, "--subnet", str(VX_SUBNET), "--mtu", "1500")
        mac = "02:c0:00:01:00:01"
        r = self.attach(GA, mac=mac, bridge=VX_LABEL, broadcast_uri=f"vxlan://{VNI}", mtu=1450)
        self.assertEqual(r.nic.bridge, VX_BR)
        self.assertEqual(r.nic.mtu, 1450)
        ifname, mtu = self.nic_line(GA, mac)
        self.assertEqual(mtu, 1450)
        dev = link_detail(VX_DEV)
        port = int(re.search(r"\bdstport (\d+)", dev).group(1))
        group = re.search(r"\bgroup (\d+\.\d+\.\d+\.\d+)", dev).group(1)
        self.assertTrue(group.startswith("239."), group)
        self.assertRegex(dev, rf"\bmaster {re.escape(VX_BR)}\b")
        self.assertTrue(os.path.exists(os.path.join(HOOK_PERSIST, "segments", f"{VX_BR}.json")),
                        "no segment record under the shared persist dir")

        # The guest's one DHCP try at hot-plug had no server yet: now there is one.
        self.make_peer(group, port)
        mark = self.g(GA).console.mark()
        rc, out = self.g(GA).exec(f"udhcpc -i {ifname} -n -q -t 5 -T 1 -s /bin/lab-dhcp", 30)
        self.assertEqual(rc, 0, f"udhcpc over VXLAN before the restart: {out}")
        ip1 = self.lease(GA, ifname, mac, PEER_SUBNET, after=mark)
        TIMINGS.append(f"  vxlan: lease before restart {ip1} (dstport {port}, group {group})")

        # As after a host reboot: the guest is down, the agent's links are gone.
        self.destroy(GA)
        gone_by_release = not link_exists(VX_BR) and not link_exists(VX_DEV)
        TIMINGS.append(f"  vxlan: release hook removed {VX_BR}: {gone_by_release}")
        for name in (VX_DEV, VX_BR):
            if link_exists(name):
                sh("ip", "link", "del", "dev", name)
        self.assertFalse(link_exists(VX_BR) or link_exists(VX_DEV))
        # Nothing running uses them: the reconcile must not bring them back.
        time.sleep(5)
        self.assertFalse(link_exists(VX_BR) or link_exists(VX_DEV),
                         "links rebuilt while the guest was down")

        log = self.start(GA)
        self.assert_hook_ran(log, GA)
        self.assertIn(f"built {VX_BR}", log, f"the hook did not say it built {VX_BR}:\n{log}")
        dev = link_detail(VX_DEV)
        self.assertRegex(dev, rf"\bmaster {re.escape(VX_BR)}\b")
        self.assertRegex(dev, r"\balias nic-agent\b")
        self.assertRegex(dev, rf"vxlan id {VNI}\b")
        self.assertRegex(dev, rf"\bdstport {port}\b")
        self.assertRegex(dev, rf"\bgroup {re.escape(group)}\b")
        self.assertRegex(dev, rf"\bdev {re.escape(VX_LABEL)}\b")
        self.assertEqual(link_alias(VX_BR), "nic-agent")
        self.assertRegex(link_detail(VX_BR), r"\bmtu 1450\b")
        ifname2, mtu2 = self.nic_line(GA, mac)
        self.assertEqual(mtu2, 1450)
        ip2 = self.lease(GA, ifname2, mac, PEER_SUBNET)
        TIMINGS.append(f"  vxlan: lease after restart {ip2}")
        self.assertTrue(link_exists(VX_LABEL), "the label bridge must never be removed")

    # -- 2. IDS state across stop and start

    def wait_promisc(self, bridge, on, timeout, what):
        lk.wait_until(lambda: promisc(bridge) == on and os.path.exists(promisc_file(bridge)) == on,
                      timeout, interval=0.2, what=what)

    @dump_on_failure
    def test_2_ids_state_follows_the_guest_through_destroy_and_start(self):
        lk.script("net.sh", "up", IDS_BR, "--subnet", str(IDS_SUBNET))
        self.assertFalse(promisc(IDS_BR), "bridge promiscuous before any IDS NIC")
        self.assertFalse(os.path.exists(promisc_file(IDS_BR)))
        mac = "02:c0:00:02:00:01"
        r = self.attach(GB, mac=mac, bridge=IDS_BR, promiscuous=True)
        self.assertTrue(r.nic.alias.startswith("ua-ids-"), r.nic.alias)
        self.nic_line(GB, mac)
        self.assertTrue(promisc(IDS_BR))
        self.assertTrue(os.path.exists(promisc_file(IDS_BR)))
        with open(promisc_file(IDS_BR)) as f:
            json.load(f)
        # The reconcile keeps it while the sensor runs.
        time.sleep(5)
        self.assertTrue(promisc(IDS_BR), "IDS state dropped while the sensor runs")

        # The only sensor stops: the reconcile restores the original state.
        self.destroy(GB)
        t0 = time.monotonic()
        self.wait_promisc(IDS_BR, False, RECONCILE_WAIT, f"{IDS_BR} restored by the reconcile")
        TIMINGS.append(f"  ids: restored {time.monotonic() - t0:.2f}s after destroy")

        # Started again: the hook puts the bridge into IDS state before QEMU runs.
        log = self.start(GB)
        self.assert_hook_ran(log, GB)
        self.assertRegex(log, rf"{re.escape(IDS_BR)} in IDS state",
                         f"the hook did not put {IDS_BR} into IDS state:\n{log}")
        self.assertTrue(promisc(IDS_BR))
        self.assertTrue(os.path.exists(promisc_file(IDS_BR)))
        self.nic_line(GB, mac)

        # The last IDS guest is destroyed: the original state comes back.
        self.destroy(GB)
        self.wait_promisc(IDS_BR, False, RECONCILE_WAIT, f"{IDS_BR} restored after the last IDS guest")
        self.assertTrue(link_exists(IDS_BR), "the agent removed a bridge it did not create")

    # -- 3. CONFIG-only IDS NIC on a stopped guest

    @dump_on_failure
    def test_3_ids_nic_attached_to_a_stopped_guest_gets_ids_state_at_start(self):
        lk.script("net.sh", "up", IDS_BR3, "--subnet", str(IDS_SUBNET3))
        self.assertEqual(self.g(GC).state(), "shut off")
        mac = "02:c0:00:03:00:01"
        r = self.attach(GC, mac=mac, bridge=IDS_BR3, promiscuous=True)
        self.assertTrue(r.nic.alias.startswith("ua-ids-"), r.nic.alias)
        self.assertIn(mac, self.g(GC).iflist(inactive=True))
        # No sensor runs: the bridge is not (or no longer, after a reconcile) in IDS state.
        self.wait_promisc(IDS_BR3, False, RECONCILE_WAIT, f"{IDS_BR3} not in IDS state while stopped")
        time.sleep(3)
        self.assertFalse(promisc(IDS_BR3))

        log = self.start(GC)
        self.assert_hook_ran(log, GC)
        self.assertRegex(log, rf"{re.escape(IDS_BR3)} in IDS state", log)
        self.assertTrue(promisc(IDS_BR3))
        self.assertTrue(os.path.exists(promisc_file(IDS_BR3)))
        self.assertIn(mac, self.g(GC).iflist())
        self.nic_line(GC, mac)
        self.destroy(GC)
        self.wait_promisc(IDS_BR3, False, RECONCILE_WAIT, f"{IDS_BR3} restored")

    # -- 4. A guest the agent has nothing to do with

    @dump_on_failure
    def test_4_guest_without_agent_nics_starts_and_the_hook_leaves_nothing(self):
        before = intent_files()
        uuid = lk.virsh("domuuid", GD).stdout.strip()
        self.assertTrue(uuid)
        log = self.start(GD)
        self.assertEqual(self.g(GD).state(), "running")
        self.assert_hook_ran(log, GD)
        self.assertNotRegex(log, r"built |in IDS state", f"the hook changed something:\n{log}")
        after = intent_files()
        self.assertEqual(sorted(p for p, _ in after), sorted(p for p, _ in before))
        self.assertFalse([p for p, t in after if uuid in t or GD in t],
                         "the hook left an intent for a guest with no agent NICs")
        mark = hook_log_mark()
        self.destroy(GD)
        lk.wait_until(lambda: f"qemu {GD} release end" in hook_log_since(mark), 10,
                      what="release hook")
        self.assertEqual(sorted(p for p, _ in intent_files()), sorted(p for p, _ in before))

    # -- 5. A name defined again with a new UUID

    @dump_on_failure
    def test_5_a_name_defined_again_with_a_new_uuid_is_the_new_domain(self):
        """The agent remembers name -> UUID. After `virsh undefine` and a new
        `define` under the same name (libvirt gives it a new UUID), a request
        by name must reach the new domain, not answer NOT_FOUND. The agent
        here runs without host networking: the suite's agent reconciles host
        objects on every lifecycle event, and that reconcile lists every
        domain and so learns the new UUID before the request comes, which
        hid the stale entry. Three rounds, each define straight from saved
        XML with the attach right after it."""
        lk.script("net.sh", "up", IDS_BR3, "--subnet", str(IDS_SUBNET3))
        agent = lk.Agent(os.path.join(self.workdir, "agent5.stderr"), "--host-network", "off",
                         "--state-dir", os.path.join(self.workdir, "state5"))
        self.addCleanup(agent.stop)
        stub = agent.stub
        g = lk.Guest(GE, "pc", GUEST_DIR)
        self.guests[GE] = g
        g.define("--no-start")
        xml = re.sub(r"\s*<uuid>[^<]*</uuid>", "",
                     lk.virsh("dumpxml", "--inactive", GE).stdout)
        xml = re.sub(r"\s*<interface .*?</interface>", "", xml, flags=re.S)
        path = os.path.join(self.workdir, f"{GE}.xml")
        with open(path, "w") as f:
            f.write(xml)
        uuids = [lk.virsh("domuuid", GE).stdout.strip()]
        def attach(mac):
            return stub.AttachNic(pb.AttachNicRequest(vm=GE, nic=pb.NicSpec(
                mac=mac, bridge=IDS_BR3)), timeout=60)

        attach("02:c0:00:05:00:00")
        for i in range(1, 4):
            lk.virsh("undefine", GE)
            lk.virsh("define", path)
            uuids.append(lk.virsh("domuuid", GE).stdout.strip())
            mac = f"02:c0:00:05:00:{i:02x}"
            r = attach(mac)
            self.assertTrue(r.nic.in_config, r.nic)
            nics = stub.ListNics(pb.ListNicsRequest(vm=GE), timeout=30).nics
            self.assertEqual([n.mac for n in nics], [mac],
                             "the new domain has only the NIC attached after it was defined")
        self.assertEqual(len(set(uuids)), 4, f"each define must give a new UUID: {uuids}")

        # MoveNic locks two VMs; its target's name goes stale the same way.
        ge2 = f"{GE}2"
        path2 = os.path.join(self.workdir, f"{ge2}.xml")
        with open(path2, "w") as f:
            f.write(xml.replace(f"<name>{GE}</name>", f"<name>{ge2}</name>", 1))
        self.addCleanup(lambda: lk.virsh("undefine", ge2, check=False))
        lk.virsh("define", path2)
        stub.AttachNic(pb.AttachNicRequest(vm=ge2, nic=pb.NicSpec(
            mac="02:c0:00:05:01:00", bridge=IDS_BR3)), timeout=60)
        lk.virsh("undefine", ge2)
        lk.virsh("define", path2)
        moved = "02:c0:00:05:00:03"
        r = stub.MoveNic(pb.MoveNicRequest(from_vm=GE, to_vm=ge2, mac=moved), timeout=60)
        self.assertTrue(r.moved, r)
        self.assertEqual([n.mac for n in stub.ListNics(pb.ListNicsRequest(vm=ge2),
                                                        timeout=30).nics], [moved])
        self.assertEqual(list(stub.ListNics(pb.ListNicsRequest(vm=GE), timeout=30).nics), [])
        stub.DetachNic(pb.DetachNicRequest(vm=ge2, mac=moved), timeout=60)
        self.assertNotIn(moved, lk.virsh("domiflist", "--inactive", ge2).stdout.lower())
        g.remove()

if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        lk.BIN = sys.argv.pop(1)
    result = unittest.main(exit=False, verbosity=2).result
    for t in TIMINGS:
        print(f"timing: {t}")
    sys.exit(lk.finish("test_e2e_lifecycle", result, label="lab-lifecycle"))
