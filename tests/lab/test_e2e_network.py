"""End-to-end host networking through the real agent, checked from the host
and from inside real QEMU guests.

The agent runs as `nic-agent serve --connect qemu:///system --host-network on`
and is driven over gRPC (Python stubs generated from proto/ at test time).
Three scenarios, each on host links this file creates itself (prefix lab-b):

1. OVS VLAN: an OVS bridge (userspace datapath) with an internal port tagged
   100 and a dnsmasq on it; a NIC attached with vlan://100 lands on a port
   tagged 100 and gets a lease in 10.77.100.0/24.
2. VXLAN: a too-large MTU is refused before anything is created; a fitting
   one builds vxlan5101 inside brvx-5101; a request without an MTU gets the
   bridge's; the agent removes both links once the last NIC has left.
3. IDS: promiscuous NICs make the bridge PROMISC and put tc mirror filters
   to each sensor tap on every other port; the ageing time is left alone (an
   earlier version set ageing 0 and flooded every tenant; changed on
   purpose, issue 13). Thousands of unicast frames between two other
   endpoints reach the IDS guest and not the non-IDS guest on the same
   bridge (rx counters inside the guests). When the last sensor leaves,
   its filters are gone and the original state comes back.

Run as root: python3 tests/lab/test_e2e_network.py [path/to/nic-agent]
Env: NIC_AGENT_BIN, LAB_AGENT_ARGS (extra `serve` flags), LAB_KEEP_WORKDIR=1
(keep the agent's stderr and state dir).
Last line: `lab-network: N passed, M failed`.
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

LAB = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(LAB))
WORK = os.environ.get("LAB_WORK", os.path.join(LAB, "work"))
GUEST_DIR = os.path.join(WORK, "guest")
LAB_STATE = os.environ.get("LAB_STATE", "/run/nic-agent-lab")

PREFIX = "lab-b"
G1, G2 = "lab-b-g1", "lab-b-g2"  # pc and q35
OVS_BR, OVS_PORT, OVS_SUBNET, OVS_VLAN = "lab-bovs", "lab-bv100", 100, 100
VX_LABEL, VX_SUBNET, VNI = "lab-bbr1", 22, 5101
IDS_BR, IDS_SUBNET = "lab-bbr2", 23
VX_BR, VX_DEV = f"brvx-{VNI}", f"vxlan{VNI}"
WAIT = 30  # seconds to wait for a guest console line
DETACH_MS = 20000


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit as lk  # noqa: E402

grpc, pb, rpc = lk.stubs()


# ---------------------------------------------------------------- helpers

def sh(*cmd, check=True, timeout=120):
    """Runs a command (argument vector), returns stdout; raises with stderr on failure."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> rc {p.returncode}\n{p.stdout}{p.stderr}")
    return p.stdout


def lab(script, *args, check=True, timeout=180):
    return sh("bash", os.path.join(LAB, script), *args, check=check, timeout=timeout)


def link_exists(name):
    return subprocess.run(["ip", "link", "show", "dev", name],
                          capture_output=True).returncode == 0


def link_detail(name):
    """`ip -d link show NAME` as text."""
    return sh("ip", "-d", "link", "show", "dev", name)


def link_flags(name):
    m = re.search(r"<([^>]*)>", link_detail(name))
    return set(m.group(1).split(",")) if m else set()


def link_alias(name):
    m = re.search(r"^\s+alias (.+)$", link_detail(name), re.M)
    return m.group(1).strip() if m else None


def ageing_time_cs(name):
    """Bridge FDB ageing time in centiseconds. iproute2 6.1 prints the raw
    centiseconds (`ageing_time 30000`); newer ones print seconds with two
    decimals (`ageing_time 300.00`)."""
    m = re.search(r"\bageing_time (\d+(?:\.\d+)?)\b", link_detail(name))
    if not m:
        raise AssertionError(f"no ageing_time in ip -d link show {name}")
    v = m.group(1)
    return round(float(v) * 100) if "." in v else int(v)


def bridge_ports(br):
    try:
        return sorted(os.listdir(f"/sys/class/net/{br}/brif"))
    except OSError:
        return []


def mirror_targets(dev):
    """The sensor taps the agent's tc filters (prio 49152-49167) on DEV's
    ingress copy to."""
    p = subprocess.run(["tc", "-j", "filter", "show", "dev", dev, "ingress"],
                       capture_output=True, text=True)
    try:
        items = json.loads(p.stdout or "[]")
    except ValueError:
        return set()
    out = set()
    for f in items:
        if not 49152 <= f.get("pref", 0) < 49168:
            continue
        for a in (f.get("options") or {}).get("actions", []):
            if a.get("kind") == "mirred" and a.get("to_dev"):
                out.add(a["to_dev"])
    return out


def pid_is(pid, comm):
    """True when PID is a live (not zombie) COMM process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    # "PID (COMM) STATE ...": COMM may hold spaces, so split at the last ')'.
    name = stat[stat.find("(") + 1:stat.rfind(")")]
    state = stat[stat.rfind(")") + 2:].split(" ", 1)[0]
    return name == comm and state not in ("Z", "X")


def kill_pid(pid, comm):
    """Kills PID only if it is still COMM (no recycled PIDs)."""
    if pid and pid_is(pid, comm):
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not pid_is(pid, comm):
                return
            time.sleep(0.1)
        if pid_is(pid, comm):
            os.kill(pid, signal.SIGKILL)


def console(dom):
    return os.path.join(GUEST_DIR, f"{dom}.console.log")


def cmd_sock(dom):
    return os.path.join(GUEST_DIR, f"{dom}.cmd.sock")


def wait_line(dom, regex, timeout=WAIT):
    """Waits for a console line of DOM matching REGEX; returns the match."""
    pat = re.compile(regex)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(console(dom), "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        found = [m for m in (pat.search(line) for line in text.splitlines()) if m]
        if found:
            return found[-1]
        if time.monotonic() >= deadline:
            raise AssertionError(f"{dom}: no console line matching {regex!r} within {timeout}s")
        time.sleep(0.1)


def wait_until(pred, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def guest_exec(dom, cmd, timeout=15):
    p = subprocess.run(["bash", os.path.join(LAB, "guest-exec.sh"), "--timeout", str(timeout),
                        cmd_sock(dom), cmd], capture_output=True, text=True, timeout=timeout + 20)
    return p.returncode, p.stdout + p.stderr


class Agent(lk.Agent):
    """labkit's agent with host networking on and this suite's state dir."""

    def __init__(self, workdir):
        self.state_dir = os.path.join(workdir, "state")
        super().__init__(
            os.path.join(workdir, "agent.stderr"),
            "--host-network", "on", "--state-dir", self.state_dir,
            "--persist-dir", os.path.join(workdir, "persist"),
            # This suite checks removal after the last NIC at once; the
            # grace period's rule is unit-tested in host::objects.
            "--bridge-grace-s", "0",
            "--detach-timeout-ms", str(DETACH_MS),
            # Extra flags, e.g. to check that the suite can fail.
            *os.environ.get("LAB_AGENT_ARGS", "").split())

    def log_tail(self, n=200):
        return "".join(self.stderr().splitlines(keepends=True)[-n:])


TIMINGS = []


def dump_on_failure(fn):
    """On a failing test, prints the guest consoles and the agent's stderr."""
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        t0 = time.monotonic()
        try:
            return fn(self, *a, **kw)
        except BaseException:
            cls = type(self)
            for dom in (G1, G2):
                try:
                    with open(console(dom), errors="replace") as f:
                        tail = "".join(f.readlines()[-60:])
                    sys.stderr.write(f"===== {dom} console (tail) =====\n{tail}\n")
                except OSError:
                    pass
            if getattr(cls, "agent", None):
                sys.stderr.write(f"===== agent stderr (tail) =====\n{cls.agent.log_tail()}\n")
            for log in cls.extra_logs:
                if os.path.exists(log):
                    with open(log, errors="replace") as f:
                        sys.stderr.write(f"===== {log} =====\n{f.read()[-4000:]}\n")
            raise
        finally:
            TIMINGS.append(f"{fn.__name__}: {time.monotonic() - t0:.2f}s total")
    return wrapper


# ---------------------------------------------------------------- tests

class NetworkE2E(unittest.TestCase):
    agent = None
    extra_logs = []

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root")
        cls.workdir = tempfile.mkdtemp(prefix="lab-b-net-")
        cls.ovs_dnsmasq_pid = None
        cls.extra_logs = [os.path.join(LAB_STATE, "net", b, "dnsmasq.log")
                          for b in (VX_LABEL, IDS_BR)]
        cls.extra_logs.append(os.path.join(cls.workdir, "ovs-dnsmasq.log"))
        try:
            lab("start-libvirtd.sh")
            lab("start-ovs.sh")
            lab("build-guest.sh", GUEST_DIR)
            cls.cleanup_host()
            t0 = time.monotonic()
            # Boot both guests at once; each waits for "LAB: boot ok".
            boots = [
                subprocess.Popen(["bash", os.path.join(LAB, "define-guest.sh"), G1, "pc",
                                  GUEST_DIR], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True),
                subprocess.Popen(["bash", os.path.join(LAB, "define-guest.sh"), G2, "q35",
                                  GUEST_DIR, "--root-ports", "6", "--timeout", "120"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            ]
            for p in boots:
                out, _ = p.communicate(timeout=180)
                if p.returncode != 0:
                    raise RuntimeError(f"define-guest failed:\n{out}")
            TIMINGS.append(f"boot pc+q35 in parallel: {time.monotonic() - t0:.2f}s")
            cls.agent = Agent(cls.workdir)
            cls.stub = cls.agent.stub
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def cleanup_host(cls):
        """Removes everything this file may have made (also by an interrupted run)."""
        lab("teardown.sh", PREFIX, check=False)
        for br in (VX_LABEL, IDS_BR):
            lab("net.sh", "down", br, check=False)
        kill_pid(cls.ovs_dnsmasq_pid, "dnsmasq")
        pidfile = os.path.join(LAB_STATE, "lab-b-ovs-dnsmasq.pid")
        try:
            with open(pidfile) as f:
                kill_pid(int(f.read().strip() or 0), "dnsmasq")
        except (OSError, ValueError):
            pass
        sh("ovs-vsctl", "--if-exists", "del-br", OVS_BR, check=False)
        # The agent's links for our VNI, only when they carry its mark.
        for name in (VX_DEV, VX_BR):
            if link_exists(name) and link_alias(name) == "nic-agent":
                sh("ip", "link", "del", "dev", name, check=False)

    @classmethod
    def tearDownClass(cls):
        if cls.agent:
            cls.agent.stop()
        cls.cleanup_host()
        if os.environ.get("LAB_KEEP_WORKDIR"):
            print(f"kept {getattr(cls, 'workdir', '')} (agent.stderr, dnsmasq log)", file=sys.stderr)
        else:
            shutil.rmtree(getattr(cls, "workdir", ""), ignore_errors=True)

    # -- small RPC helpers

    def attach(self, vm, **nic):
        t0 = time.monotonic()
        r = self.stub.AttachNic(pb.AttachNicRequest(vm=vm, nic=pb.NicSpec(**nic)), timeout=60)
        TIMINGS.append(f"  AttachNic {vm} {nic.get('mac')}: {time.monotonic() - t0:.3f}s")
        return r

    def detach(self, vm, mac):
        t0 = time.monotonic()
        r = self.stub.DetachNic(pb.DetachNicRequest(vm=vm, mac=mac, timeout_ms=DETACH_MS),
                                timeout=60)
        TIMINGS.append(f"  DetachNic {vm} {mac}: {time.monotonic() - t0:.3f}s")
        self.assertEqual(r.state, pb.DETACH_STATE_REMOVED, f"detach {vm} {mac}: {r}")
        return r

    def macs(self, vm):
        return [n.mac for n in self.stub.ListNics(pb.ListNicsRequest(vm=vm)).nics]

    def guest_nic(self, vm, mac):
        """The guest's nic-add line for MAC: (ifname, mtu, queues)."""
        m = wait_line(vm, rf"LAB: nic-add name=(\S+) mac={mac} mtu=(\d+) queues=(\d+)")
        return m.group(1), int(m.group(2)), int(m.group(3))

    def guest_lease(self, vm, ifname, mac, subnet):
        m = wait_line(vm, rf"LAB: (dhcp|dhcp-fail) name={ifname} mac={mac}\b(?: ip=(\S+))?")
        self.assertEqual(m.group(1), "dhcp", f"{vm}: DHCP failed on {ifname}: {m.group(0)}")
        ip = m.group(2).split("/")[0]
        self.assertTrue(ip.startswith(f"10.77.{subnet}."), f"{vm}: lease {ip} not in 10.77.{subnet}.0/24")
        return ip

    def guest_ping(self, vm, ifname, subnet):
        rc, out = guest_exec(vm, f"ping -c 2 -W 3 -I {ifname} 10.77.{subnet}.1", timeout=20)
        self.assertEqual(rc, 0, f"{vm}: ping 10.77.{subnet}.1 via {ifname} failed: {out}")

    def guest_removed(self, vm, ifname, mac):
        wait_line(vm, rf"LAB: nic-remove name={ifname} mac={mac}\b")

    # -- 1. OVS VLAN

    def make_ovs(self):
        sh("ovs-vsctl", "--may-exist", "add-br", OVS_BR, "--", "set", "bridge", OVS_BR,
           "datapath_type=netdev")
        # add-br without netdev prints an error but exits 0: check for real.
        self.assertEqual(sh("ovs-vsctl", "get", "bridge", OVS_BR, "datapath_type").strip(),
                         "netdev")
        sh("ovs-vsctl", "--may-exist", "add-port", OVS_BR, OVS_PORT, f"tag={OVS_VLAN}", "--",
           "set", "interface", OVS_PORT, "type=internal")
        wait_until(lambda: link_exists(OVS_PORT), 10, f"{OVS_PORT} to appear")
        sh("ip", "addr", "replace", f"10.77.{OVS_SUBNET}.1/24", "dev", OVS_PORT)
        sh("ip", "link", "set", "dev", OVS_PORT, "up")
        pidfile = os.path.join(LAB_STATE, "lab-b-ovs-dnsmasq.pid")
        net = f"10.77.{OVS_SUBNET}"
        # Same flags as net.sh.
        sh("dnsmasq", "--conf-file=/dev/null", "--no-hosts", f"--pid-file={pidfile}",
           "--bind-interfaces", f"--interface={OVS_PORT}", "--except-interface=lo",
           f"--dhcp-range={net}.50,{net}.150,255.255.255.0,12h", "--dhcp-authoritative",
           "--no-ping", "--port=0", "--no-resolv",
           f"--dhcp-leasefile={os.path.join(self.workdir, 'ovs-leases')}",
           "--user=root", "--group=root", "--log-dhcp",
           f"--log-facility={os.path.join(self.workdir, 'ovs-dnsmasq.log')}")
        wait_until(lambda: os.path.exists(pidfile), 10, "dnsmasq pidfile")
        with open(pidfile) as f:
            type(self).ovs_dnsmasq_pid = int(f.read().strip())

    @dump_on_failure
    def test_1_ovs_vlan_nic_is_tagged_and_gets_a_lease_on_that_vlan(self):
        self.make_ovs()
        mac = "02:b0:00:01:00:01"
        t0 = time.monotonic()
        r = self.attach(G1, mac=mac, bridge=OVS_BR, switch_type=pb.SWITCH_TYPE_OPEN_VSWITCH,
                        broadcast_uri=f"vlan://{OVS_VLAN}")
        self.assertFalse(r.already_present)
        self.assertEqual(r.nic.vlan, OVS_VLAN)
        self.assertEqual(r.nic.bridge, OVS_BR)
        tap = r.nic.target_dev
        self.assertTrue(tap, f"no target_dev in {r.nic}")
        self.assertEqual(sh("ovs-vsctl", "port-to-br", tap).strip(), OVS_BR)
        self.assertEqual(sh("ovs-vsctl", "get", "port", tap, "tag").strip(), str(OVS_VLAN))
        # The OVS port carries the NIC's identity for controllers.
        ext = sh("ovs-vsctl", "get", "interface", tap, "external_ids")
        self.assertIn(f'attached-mac="{mac}"', ext)
        self.assertIn("iface-id=", ext)
        self.assertIn("vm-id=", ext)
        ifname, mtu, _ = self.guest_nic(G1, mac)
        self.assertEqual(mtu, r.nic.mtu or 1500, "guest MTU differs from the NIC's <mtu>")
        ip = self.guest_lease(G1, ifname, mac, OVS_SUBNET)
        TIMINGS.append(f"  ovs: attach->lease {time.monotonic() - t0:.2f}s ({ip})")
        self.guest_ping(G1, ifname, OVS_SUBNET)

        # Negative: the same bridge, another VLAN: tagged 200, and no lease,
        # because our DHCP server lives on VLAN 100 only.
        mac200 = "02:b0:00:01:00:02"
        r200 = self.attach(G2, mac=mac200, bridge=OVS_BR,
                           switch_type=pb.SWITCH_TYPE_OPEN_VSWITCH, broadcast_uri="vlan://200")
        self.assertEqual(r200.nic.vlan, 200)
        self.assertEqual(sh("ovs-vsctl", "get", "port", r200.nic.target_dev, "tag").strip(), "200")
        if200, _, _ = self.guest_nic(G2, mac200)
        m = wait_line(G2, rf"LAB: (dhcp|dhcp-fail) name={if200} mac={mac200}\b")
        self.assertEqual(m.group(1), "dhcp-fail", f"a NIC on VLAN 200 got a lease: {m.group(0)}")
        self.detach(G2, mac200)
        self.guest_removed(G2, if200, mac200)

        self.detach(G1, mac)
        self.guest_removed(G1, ifname, mac)
        self.assertNotIn(mac, self.macs(G1))
        wait_until(lambda: tap not in sh("ovs-vsctl", "list-ports", OVS_BR).split(), 10,
                   f"{tap} to leave {OVS_BR}")

    # -- 2. VXLAN

    @dump_on_failure
    def test_2_vxlan_mtu_preflight_then_segment_built_and_removed(self):
        lab("net.sh", "up", VX_LABEL, "--subnet", str(VX_SUBNET), "--mtu", "1500")
        mac_big, mac_a, mac_b = "02:b0:00:02:00:01", "02:b0:00:02:00:02", "02:b0:00:02:00:03"
        uri = f"vxlan://{VNI}"

        # Too large for 1500 underlay - 50: refused, and nothing was created.
        with self.assertRaises(grpc.RpcError) as cm:
            self.attach(G1, mac=mac_big, bridge=VX_LABEL, broadcast_uri=uri, mtu=1500)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION,
                         cm.exception.details())
        msg = cm.exception.details()
        for needle in ("1500", "1450"):
            self.assertIn(needle, msg)
        self.assertFalse(link_exists(VX_BR), f"{VX_BR} exists after a refused attach")
        self.assertFalse(link_exists(VX_DEV), f"{VX_DEV} exists after a refused attach")
        self.assertNotIn(mac_big, self.macs(G1))

        # 1450 fits exactly.
        t0 = time.monotonic()
        r = self.attach(G1, mac=mac_a, bridge=VX_LABEL, broadcast_uri=uri, mtu=1450)
        self.assertEqual(r.nic.bridge, VX_BR)
        self.assertEqual(r.nic.mtu, 1450)
        ifa, mtu, _ = self.guest_nic(G1, mac_a)
        TIMINGS.append(f"  vxlan: attach->nic-add {time.monotonic() - t0:.2f}s")
        self.assertEqual(mtu, 1450)
        dev = link_detail(VX_DEV)
        self.assertRegex(dev, rf"vxlan id {VNI}\b")
        # CloudStack's modifyvxlan.sh gives no port, so the kernel's own
        # default applies (8472 unless the vxlan module was told otherwise);
        # this used to assert 4789, which cloudstack-agent's hosts never use.
        with open("/sys/module/vxlan/parameters/udp_port") as f:
            kernel_port = int(f.read())
        self.assertRegex(dev, rf"\bdstport {kernel_port}\b")
        self.assertRegex(dev, rf"\bmaster {re.escape(VX_BR)}\b")
        self.assertRegex(dev, rf"\bdev {re.escape(VX_LABEL)}\b")
        self.assertRegex(dev, r"\bgroup 239\.0\.19\.237\b")  # 5101 = 0x0013ed
        self.assertRegex(link_detail(VX_BR), r"\bmtu 1450\b")

        # No MTU in the request: the bridge's MTU is written (and the guest sees it).
        r = self.attach(G2, mac=mac_b, bridge=VX_LABEL, broadcast_uri=uri)
        self.assertEqual(r.nic.mtu, 1450)
        self.assertEqual(r.nic.bridge, VX_BR)
        ifb, mtu_b, _ = self.guest_nic(G2, mac_b)
        self.assertEqual(mtu_b, 1450, "guest MTU of a NIC attached without <mtu> request")

        # First NIC leaves: the segment stays for the second.
        self.detach(G1, mac_a)
        self.guest_removed(G1, ifa, mac_a)
        self.assertTrue(link_exists(VX_BR), f"{VX_BR} removed while {mac_b} still uses it")
        self.assertTrue(link_exists(VX_DEV), f"{VX_DEV} removed while {mac_b} still uses it")
        # Last NIC leaves: the agent removes what it built, but not the label bridge.
        self.detach(G2, mac_b)
        self.guest_removed(G2, ifb, mac_b)
        wait_until(lambda: not link_exists(VX_BR) and not link_exists(VX_DEV), 10,
                   f"{VX_BR} and {VX_DEV} to be removed")
        self.assertTrue(link_exists(VX_LABEL), "the label bridge must never be removed")

    # -- 3. IDS

    def assert_ids(self, sensors, original_ageing):
        """PROMISC while there are sensors, ageing never touched, and every
        bridge port but a sensor's own mirrors to each sensor."""
        flags, ageing = link_flags(IDS_BR), ageing_time_cs(IDS_BR)
        if sensors:
            self.assertIn("PROMISC", flags)
        else:
            self.assertNotIn("PROMISC", flags)
        self.assertEqual(ageing, original_ageing, "IDS must not change ageing_time (a hub)")

        def in_step():
            return all(mirror_targets(p) == set(sensors) - {p} for p in bridge_ports(IDS_BR))
        wait_until(in_step, 10, f"mirror filters on {IDS_BR} to {sorted(sensors)}: "
                   + str({p: sorted(mirror_targets(p)) for p in bridge_ports(IDS_BR)}))

    def rx(self, vm, ifname):
        rc, out = guest_exec(vm, f"cat /sys/class/net/{ifname}/statistics/rx_packets")
        self.assertEqual(rc, 0, out)
        return int(re.findall(r"\d+", out)[-1])

    @dump_on_failure
    def test_3_ids_copies_reach_the_sensor_and_not_other_tenants(self):
        lab("net.sh", "up", IDS_BR, "--subnet", str(IDS_SUBNET))
        original = ageing_time_cs(IDS_BR)
        self.assertNotIn("PROMISC", link_flags(IDS_BR), "bridge promiscuous before any IDS NIC")
        mac_p, mac_i1, mac_i2 = "02:b0:00:03:00:01", "02:b0:00:03:00:02", "02:b0:00:03:00:03"

        # A normal NIC (guest C): lease and traffic before anything IDS happens.
        r = self.attach(G1, mac=mac_p, bridge=IDS_BR)
        self.assertFalse(r.nic.alias.startswith("ua-ids-"), r.nic.alias)
        ifp, _, _ = self.guest_nic(G1, mac_p)
        self.guest_lease(G1, ifp, mac_p, IDS_SUBNET)
        self.guest_ping(G1, ifp, IDS_SUBNET)
        self.assert_ids([], original)

        r1 = self.attach(G1, mac=mac_i1, bridge=IDS_BR, promiscuous=True)
        self.assertTrue(r1.nic.alias.startswith("ua-ids-"), r1.nic.alias)
        if1, _, _ = self.guest_nic(G1, mac_i1)
        self.assert_ids([r1.nic.target_dev], original)
        r2 = self.attach(G2, mac=mac_i2, bridge=IDS_BR, promiscuous=True)
        self.assertTrue(r2.nic.alias.startswith("ua-ids-"), r2.nic.alias)
        if2, _, _ = self.guest_nic(G2, mac_i2)
        self.assert_ids([r1.nic.target_dev, r2.nic.target_dev], original)
        self.guest_ping(G1, ifp, IDS_SUBNET)

        # One IDS NIC left: its filters stay, the gone sensor's filters go.
        self.detach(G1, mac_i1)
        self.guest_removed(G1, if1, mac_i1)
        self.assert_ids([r2.nic.target_dev], original)
        self.guest_ping(G1, ifp, IDS_SUBNET)

        # Isolation: a third endpoint (a veth in a namespace, a port this
        # agent never plugged: followed through link events) sends thousands
        # of unicast frames to the bridge's own address. Static neighbours on
        # both sides, so no ARP broadcast. The sensor sees them, guest C not.
        ns, veth, peer, ip = "lab-b-ids-ns", "lab-bids0", "lab-bids1", f"10.77.{IDS_SUBNET}.200"
        vmac = "02:b0:00:03:00:c8"
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", veth, check=False)
        try:
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "address", vmac, "netns", ns)
            sh("ip", "link", "set", veth, "master", IDS_BR, "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", peer)
            sh("ip", "-n", ns, "link", "set", peer, "up")
            brmac = open(f"/sys/class/net/{IDS_BR}/address").read().strip()
            sh("ip", "-n", ns, "neigh", "replace", f"10.77.{IDS_SUBNET}.1", "lladdr", brmac,
               "dev", peer, "nud", "permanent")
            sh("ip", "neigh", "replace", ip, "lladdr", vmac, "dev", IDS_BR, "nud", "permanent")
            self.assert_ids([r2.nic.target_dev], original)
            n = 3000
            # A sensor listens promiscuously (as an IDS does): QEMU's
            # virtio-net drops frames for other MACs before the guest
            # counts them otherwise.
            rc, out = guest_exec(G2, f"ip link set {if2} up promisc on")
            self.assertEqual(rc, 0, out)
            tap = r2.nic.target_dev

            def host_count(dev, what):
                with open(f"/sys/class/net/{dev}/statistics/{what}") as f:
                    return int(f.read())
            h0, v0 = host_count(tap, "tx_packets"), host_count(veth, "rx_packets")
            d0 = host_count(tap, "tx_dropped")
            c0, s0 = self.rx(G1, ifp), self.rx(G2, if2)
            # Paced, 50 frames every 20 ms: a tight loop outruns a TCG
            # guest's virtio ring, and the tap then drops what QEMU has not
            # read yet (tx_dropped; one CI run counted 2800 of 3000 sent).
            sh("ip", "netns", "exec", ns, "python3", "-c",
               "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
               f"for i in range({n}):\n"
               f"  s.sendto(b'x'*64,('10.77.{IDS_SUBNET}.1',9))\n"
               "  if i % 50 == 49: time.sleep(0.02)")
            # Let the TCG guests drain their rings: read until the sensor's
            # count stops moving (bounded).
            s1, deadline = self.rx(G2, if2), time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.5)
                s_now = self.rx(G2, if2)
                if s_now == s1:
                    break
                s1 = s_now
            c1 = self.rx(G1, ifp)
            h1, v1 = host_count(tap, "tx_packets"), host_count(veth, "rx_packets")
            d1 = host_count(tap, "tx_dropped")
            TIMINGS.append(f"  ids isolation: {n} unicast frames (veth port rx +{v1 - v0}); "
                           f"sensor tap tx +{h1 - h0} (dropped by the tap +{d1 - d0}), "
                           f"sensor guest rx +{s1 - s0}, guest C +{c1 - c0}")
            # The agent's part, exactly: every frame was mirrored to the
            # sensor's tap. The tap hands it to QEMU (tx_packets) or, when
            # QEMU's TCG virtio-net has not emptied the tap's queue on a
            # loaded 2-core host, drops it there (tx_dropped): both mean
            # the copy reached the sensor's port. What the guest then counts
            # depends on QEMU keeping up (one CI run counted 2975 of 3000),
            # so the guest must see nearly all of them, not each one.
            self.assertGreaterEqual((h1 - h0) + (d1 - d0), n,
                                    "mirror copies did not all reach the sensor's tap")
            self.assertGreaterEqual(s1 - s0, n * 95 // 100, "the IDS guest missed mirror copies")
            self.assertLess(c1 - c0, 50, "guest C received another endpoint's unicast")
        finally:
            sh("ip", "neigh", "del", ip, "dev", IDS_BR, check=False)
            sh("ip", "link", "del", veth, check=False)
            sh("ip", "netns", "del", ns, check=False)

        # Last IDS NIC gone: its filters are gone, original flags come back.
        self.detach(G2, mac_i2)
        self.guest_removed(G2, if2, mac_i2)
        self.assert_ids([], original)
        self.guest_ping(G1, ifp, IDS_SUBNET)

        self.detach(G1, mac_p)
        self.guest_removed(G1, ifp, mac_p)
        self.assertTrue(link_exists(IDS_BR), "agent removed a bridge it did not create")

    # -- 4. IDS on Open vSwitch, through AttachNic

    def ovs_mirrors(self):
        """The bridge's mirrors: {name: (output port name, select_vlan, select_all)}."""
        out = sh("ovs-vsctl", "--format=json", "--columns=name,output_port,select_vlan,select_all",
                 "list", "mirror")
        rows = json.loads(out).get("data", [])
        port_names = {}
        for uuid, name in json.loads(sh("ovs-vsctl", "--format=json", "--columns=_uuid,name",
                                        "list", "port")).get("data", []):
            port_names[uuid[1]] = name
        res = {}
        for name, output, vlans, sel_all in rows:
            out_name = port_names.get(output[1]) if output and output[0] == "uuid" else None
            vl = vlans[1] if isinstance(vlans, list) and vlans and vlans[0] == "set" else vlans
            if isinstance(vl, list):
                vl = sorted(vl)
            elif isinstance(vl, int):
                vl = [vl]
            res[name] = (out_name, vl, sel_all)
        return res

    @dump_on_failure
    def test_4_ovs_ids_nic_mirrors_only_its_vlan_to_the_sensor_and_loses_it_at_detach(self):
        if not (self.ovs_dnsmasq_pid and pid_is(self.ovs_dnsmasq_pid, "dnsmasq")):
            self.make_ovs()
        ovs = pb.SWITCH_TYPE_OPEN_VSWITCH
        uri = f"vlan://{OVS_VLAN}"
        mac_n, mac_s = "02:b0:00:04:00:01", "02:b0:00:04:00:02"
        rn = self.attach(G1, mac=mac_n, bridge=OVS_BR, switch_type=ovs, broadcast_uri=uri)
        ifn, _, _ = self.guest_nic(G1, mac_n)
        ip_n = self.guest_lease(G1, ifn, mac_n, OVS_SUBNET)
        self.assertEqual(self.ovs_mirrors(), {}, "a mirror before any IDS NIC")

        rs = self.attach(G2, mac=mac_s, bridge=OVS_BR, switch_type=ovs, broadcast_uri=uri,
                         promiscuous=True)
        self.assertTrue(rs.nic.alias.startswith("ua-ids-"), rs.nic.alias)
        sensor = rs.nic.target_dev
        mirrors = self.ovs_mirrors()
        to_sensor = {n: m for n, m in mirrors.items() if m[0] == sensor}
        self.assertEqual(len(to_sensor), 1, f"one mirror to the sensor's port {sensor}: {mirrors}")
        (mname, (_, vlans, _)), = to_sensor.items()
        # select_all may be set: OVS still selects only the listed VLANs.
        self.assertEqual(vlans, [OVS_VLAN], f"{mname} must select VLAN {OVS_VLAN} only")

        # Endpoints that are no sensor, each a veth into a private namespace:
        # W on VLAN 100, X and Y on VLAN 200. Unicast from the host's VLAN-100
        # port to guest C reaches the sensor and not W; unicast from X to Y
        # on VLAN 200, another tenant's segment, does not reach the sensor.
        ends = {"w": (OVS_VLAN, "lab-bow0", "lab-bow1", None),
                "x": (200, "lab-bow2", "lab-bow3", "10.77.202.2"),
                "y": (200, "lab-bow4", "lab-bow5", "10.77.202.3")}

        def ns_of(k):
            return f"lab-b-oids-{k}"

        def count(dev, what, ns=None):
            path = f"/sys/class/net/{dev}/statistics/{what}"
            if ns is None:
                with open(path) as f:
                    return int(f.read())
            return int(sh("ip", "netns", "exec", ns, "cat", path).strip())

        def udp(n, dst, dev, ns=None):
            code = ("import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                    f"s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'{dev}')\n"
                    f"for i in range({n}):\n"
                    f"  s.sendto(b'x'*64,('{dst}',9))\n"
                    "  if i % 50 == 49: time.sleep(0.02)")
            pre = ["ip", "netns", "exec", ns] if ns else []
            sh(*pre, "python3", "-c", code)

        try:
            for k, (tag, veth, peer, ip) in ends.items():
                sh("ip", "netns", "del", ns_of(k), check=False)
                sh("ip", "link", "del", veth, check=False)
                sh("ip", "netns", "add", ns_of(k))
                # No IPv6 chatter (DAD, MLD) from the test's own endpoints.
                sh("ip", "netns", "exec", ns_of(k), "sysctl", "-qw",
                   "net.ipv6.conf.default.disable_ipv6=1")
                sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
                sh("ip", "link", "set", peer, "netns", ns_of(k))
                if ip:
                    sh("ip", "-n", ns_of(k), "addr", "add", f"{ip}/24", "dev", peer)
                sh("ip", "-n", ns_of(k), "link", "set", peer, "up")
                sh("sysctl", "-qw", f"net.ipv6.conf.{veth}.disable_ipv6=1")
                sh("ip", "link", "set", veth, "up")
                sh("ovs-vsctl", "add-port", OVS_BR, veth, f"tag={tag}")
            mac_of = {k: sh("ip", "netns", "exec", ns_of(k), "cat",
                            f"/sys/class/net/{ends[k][2]}/address").strip() for k in ("x", "y")}
            sh("ip", "-n", ns_of("x"), "neigh", "replace", ends["y"][3], "lladdr", mac_of["y"],
               "dev", ends["x"][2], "nud", "permanent")
            sh("ip", "-n", ns_of("y"), "neigh", "replace", ends["x"][3], "lladdr", mac_of["x"],
               "dev", ends["y"][2], "nud", "permanent")
            sh("ip", "neigh", "replace", ip_n, "lladdr", mac_n, "dev", OVS_PORT,
               "nud", "permanent")
            n = 500
            w_port = ends["w"][1]

            def sensor_count():
                return count(sensor, "tx_packets") + count(sensor, "tx_dropped")
            s0, w0, c0 = sensor_count(), count(w_port, "tx_packets"), count(rn.nic.target_dev,
                                                                             "tx_packets")
            udp(n, ip_n, OVS_PORT)
            time.sleep(1)
            s1, w1, c1 = sensor_count(), count(w_port, "tx_packets"), count(rn.nic.target_dev,
                                                                             "tx_packets")
            y0 = count(ends["y"][2], "rx_packets", ns_of("y"))
            udp(n, ends["y"][3], ends["x"][2], ns_of("x"))
            time.sleep(1)
            s2, y1 = sensor_count(), count(ends["y"][2], "rx_packets", ns_of("y"))
            TIMINGS.append(f"  ovs ids: VLAN {OVS_VLAN}: {n} unicast frames to guest C (its tap "
                           f"+{c1 - c0}), sensor +{s1 - s0}, port W +{w1 - w0}; VLAN 200: "
                           f"{n} from X to Y (Y rx +{y1 - y0}), sensor +{s2 - s1}")
            self.assertGreaterEqual(c1 - c0, n, "the frames did not reach guest C's port")
            self.assertGreaterEqual(s1 - s0, n, "mirror copies did not all reach the sensor's port")
            # Mirrored unicast would be +n; the guests' own broadcasts on
            # VLAN 100 (DHCP renewals, ARP) are a handful.
            self.assertLess(w1 - w0, n // 10, "a non-sensor port received mirrored unicast")
            self.assertGreaterEqual(y1 - y0, n, "VLAN 200 traffic did not flow")
            self.assertLess(s2 - s1, n // 10, "the sensor received another VLAN's traffic")
        finally:
            sh("ip", "neigh", "del", ip_n, "dev", OVS_PORT, check=False)
            for k, (_, veth, _, _) in ends.items():
                sh("ovs-vsctl", "--if-exists", "del-port", OVS_BR, veth, check=False)
                sh("ip", "link", "del", veth, check=False)
                sh("ip", "netns", "del", ns_of(k), check=False)

        self.detach(G2, mac_s)
        wait_until(lambda: mname not in self.ovs_mirrors(), 10, f"mirror {mname} to go")
        self.assertEqual(self.ovs_mirrors(), {}, "no mirror left after the last IDS NIC")
        self.detach(G1, mac_n)
        self.guest_removed(G1, ifn, mac_n)


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        lk.BIN = sys.argv.pop(1)
    result = unittest.main(exit=False, verbosity=2).result
    for t in TIMINGS:
        print(f"timing: {t}")
    sys.exit(lk.finish("test_e2e_network", result, label="lab-network"))
