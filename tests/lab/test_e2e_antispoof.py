"""Anti-spoofing on a hot-plugged NIC, proven with a real guest and counted on the far side.

Brings up bridge lab-asbr0 (10.77.71.1/24 + dnsmasq) and guest lab-as-pc, starts
`nic-agent serve --connect qemu:///system --host-network off --anti-spoofing nwfilter`
and hot-plugs a NIC with anti_spoofing and the address 10.77.71.20. Then:

- libvirt instantiated the agent's filter on the NIC's tap: ebtables chains
  named after the tap exist (`ebtables -t nat -L`, and in `nft list ruleset`);
- the guest, with its own MAC and IP, pings 10.77.71.1: the host's IP stack
  counts the echo requests (/proc/net/snmp Icmp InEchos);
- the guest takes another IP (10.77.71.21), then another MAC: the frames leave
  the guest (the tap's rx counter grows) and the host receives none of them
  (InEchos unchanged);
- after DetachNic the chains are gone.

The guest pins the bridge's MAC as its neighbour for 10.77.71.1, so what is
dropped is the IP packet itself, not only the (also filtered) ARP request.
Everything made here is named lab-as*, and removed at the end, also on failure.

Run (root): python3 tests/lab/test_e2e_antispoof.py
Env: NIC_AGENT_BIN (default target/debug/nic-agent), LAB_WAIT (poll bound, s, default 20).
"""
import os
import re
import signal
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit as lk  # noqa: E402

grpc, pb, rpc = lk.stubs()

PREFIX = "lab-as"
BRIDGE = "lab-asbr0"
SUBNET = 71
HOST_IP = f"10.77.{SUBNET}.1"
GUEST_IP = f"10.77.{SUBNET}.20"
SPOOF_IP = f"10.77.{SUBNET}.21"
MAC = "52:54:00:a5:00:01"
SPOOF_MAC = "52:54:00:a5:00:99"
OUT = os.path.join(lk.WORK, "guest")
WAIT = float(os.environ.get("LAB_WAIT", "20"))
RPC_TIMEOUT = 90
PINGS = 5
AGENT_LOG = os.path.join(lk.WORK, "lab-as-agent.stderr.log")
STATE = {"agent": None, "cleaned": False}
# Filled in as the steps run; later steps need earlier facts.
FACTS = {}


def cleanup_all():
    """Idempotent: stops our agent (by PID) and removes every lab-as* thing."""
    if STATE["cleaned"]:
        return
    STATE["cleaned"] = True
    if STATE["agent"] is not None:
        STATE["agent"].stop()
    lk.script("teardown.sh", PREFIX, check=False)
    lk.script("net.sh", "down", BRIDGE, check=False)


def in_echos():
    """The host's Icmp InEchos: echo requests its IP stack received."""
    with open("/proc/net/snmp", encoding="ascii") as f:
        rows = [l.split() for l in f if l.startswith("Icmp:")]
    names, values = rows[0], rows[1]
    return int(values[names.index("InEchos")])


def rx_packets(dev):
    with open(f"/sys/class/net/{dev}/statistics/rx_packets", encoding="ascii") as f:
        return int(f.read())


def ebtables_nat():
    return lk.run(["ebtables", "-t", "nat", "-L"], check=False).stdout


def nft_ruleset():
    return lk.run(["nft", "list", "ruleset"], check=False).stdout


class AntiSpoofE2E(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            lk.script("start-libvirtd.sh")
            filters = lk.virsh("nwfilter-list").stdout
            if "no-ipv6-spoofing" not in filters:
                raise RuntimeError("libvirtd lists no standard nwfilters: run tests/lab/install-deps.sh, "
                                   "then start-libvirtd.sh (it restarts a lab-started libvirtd)")
            lk.script("build-guest.sh", OUT, timeout=600)
            lk.script("teardown.sh", PREFIX)
            lk.script("net.sh", "up", BRIDGE, "--subnet", str(SUBNET))
            STATE["agent"] = lk.Agent(AGENT_LOG, "--host-network", "off", "--anti-spoofing", "nwfilter")
            cls.stub = STATE["agent"].stub
            cls.g = lk.Guest(f"{PREFIX}-pc", "pc", OUT)
            cls.g.define()
        except BaseException:
            sys.stderr.write(f"setUpClass failed; agent stderr:\n{STATE['agent'].stderr() if STATE['agent'] else ''}")
            cleanup_all()
            raise

    @classmethod
    def tearDownClass(cls):
        cleanup_all()

    def gx(self, cmd, timeout=30):
        rc, out = self.g.exec(cmd, timeout=timeout)
        lk.log(f"guest$ {cmd} -> rc={rc} {out.strip()[:300]}")
        return rc, out

    def need(self, *keys):
        missing = [k for k in keys if k not in FACTS]
        if missing:
            self.fail(f"an earlier step failed (no {missing})")

    def ping_counted(self):
        """Pings the host from the guest; returns (rc, host InEchos delta, tap rx delta)."""
        tap = FACTS["tap"]
        e0, r0 = in_echos(), rx_packets(tap)
        rc, out = self.gx(f"ping -c {PINGS} -W 1 -I {FACTS['ifname']} {HOST_IP}", timeout=30)
        e1, r1 = in_echos(), rx_packets(tap)
        lk.log(f"ping rc={rc}: host InEchos +{e1 - e0}, tap {tap} rx +{r1 - r0}")
        return rc, e1 - e0, r1 - r0

    def test_1_attach_instantiates_the_filter_on_the_tap(self):
        mark = self.g.console.mark()
        r = self.stub.AttachNic(pb.AttachNicRequest(vm=self.g.name, nic=pb.NicSpec(
            mac=MAC, bridge=BRIDGE, anti_spoofing=True, ips=[GUEST_IP])), timeout=RPC_TIMEOUT)
        self.assertEqual(r.nic.filter, "nic-agent-clean", r)
        self.assertEqual(list(r.notes), [])
        self.assertTrue(r.nic.target_dev, r)
        FACTS["tap"] = r.nic.target_dev
        xml = lk.virsh("dumpxml", self.g.name).stdout
        self.assertIn("filterref filter='nic-agent-clean'", xml)
        self.assertIn(f"name='IP' value='{GUEST_IP}'", xml)
        m = self.g.console.wait(rf"LAB: nic-add name=(\S+) mac={MAC}", timeout=WAIT, after=mark)
        FACTS["ifname"] = m.group(1)
        # The guest asks DHCP on its own; wait for that to end (DHCP from
        # 0.0.0.0 is let through), then give it the address the filter knows.
        self.g.console.wait(rf"LAB: dhcp(-fail)? name={FACTS['ifname']}", timeout=WAIT, after=mark)
        eb = ebtables_nat()
        lk.log(f"ebtables -t nat -L after attach:\n{eb}")
        self.assertRegex(eb, rf"I-{re.escape(FACTS['tap'])}-(mac|ipv4-ip|arp)", "no nwfilter chains for the tap")
        nft = nft_ruleset()
        self.assertIn(f"I-{FACTS['tap']}", nft, "the chains are not in the nft ruleset")
        FACTS["rules_seen"] = True

    def test_2_own_mac_and_ip_reach_the_host(self):
        self.need("tap", "ifname")
        ifn = FACTS["ifname"]
        with open(f"/sys/class/net/{BRIDGE}/address", encoding="ascii") as f:
            br_mac = f.read().strip()
        FACTS["br_mac"] = br_mac
        rc, _ = self.gx(f"ip addr flush dev {ifn} && ip addr add {GUEST_IP}/24 dev {ifn} && ip link set {ifn} up")
        self.assertEqual(rc, 0)
        # A fixed neighbour entry: later, spoofed packets go out as IP, not
        # as ARP requests (which the filter also drops).
        rc, out = self.gx(f"ip neigh replace {HOST_IP} lladdr {br_mac} nud permanent dev {ifn}"
                          f" || arp -i {ifn} -s {HOST_IP} {br_mac}")
        self.assertEqual(rc, 0, out)
        rc, echos, rx = self.ping_counted()
        self.assertEqual(rc, 0, "ping with the NIC's own MAC and IP failed")
        self.assertGreaterEqual(echos, PINGS)
        FACTS["clean_ok"] = True

    def test_3_spoofed_ip_is_dropped_before_the_host(self):
        self.need("clean_ok")
        ifn = FACTS["ifname"]
        rc, _ = self.gx(f"ip addr flush dev {ifn} && ip addr add {SPOOF_IP}/24 dev {ifn}")
        self.assertEqual(rc, 0)
        try:
            rc, echos, rx = self.ping_counted()
            self.assertNotEqual(rc, 0, "ping from a spoofed IP got answers")
            self.assertGreaterEqual(rx, PINGS, "the guest did not send: the test would prove nothing")
            self.assertEqual(echos, 0, "the host received echo requests from a spoofed IP")
        finally:
            self.gx(f"ip addr flush dev {ifn}; ip addr add {GUEST_IP}/24 dev {ifn}")
        # And the NIC works again with its own address.
        rc, echos, _ = self.ping_counted()
        self.assertEqual(rc, 0)
        self.assertGreaterEqual(echos, PINGS)

    def test_4_spoofed_mac_is_dropped_before_the_host(self):
        self.need("clean_ok")
        ifn = FACTS["ifname"]
        rc, _ = self.gx(f"ip link set {ifn} down && ip link set {ifn} address {SPOOF_MAC} && "
                        f"ip link set {ifn} up && ip addr replace {GUEST_IP}/24 dev {ifn} && "
                        f"(ip neigh replace {HOST_IP} lladdr {FACTS['br_mac']} nud permanent dev {ifn}"
                        f" || arp -i {ifn} -s {HOST_IP} {FACTS['br_mac']})")
        self.assertEqual(rc, 0)
        try:
            rc, echos, rx = self.ping_counted()
            self.assertNotEqual(rc, 0, "ping from a spoofed MAC got answers")
            self.assertGreaterEqual(rx, PINGS, "the guest did not send: the test would prove nothing")
            self.assertEqual(echos, 0, "the host received echo requests from a spoofed MAC")
        finally:
            self.gx(f"ip link set {ifn} down; ip link set {ifn} address {MAC}; ip link set {ifn} up; "
                    f"ip addr replace {GUEST_IP}/24 dev {ifn}")

    def test_5_detach_removes_the_rules(self):
        self.need("rules_seen")
        r = self.stub.DetachNic(pb.DetachNicRequest(vm=self.g.name, mac=MAC, timeout_ms=30000),
                                timeout=RPC_TIMEOUT)
        self.assertEqual(r.state, pb.DETACH_STATE_REMOVED)
        tap = FACTS["tap"]
        lk.wait_until(lambda: tap not in ebtables_nat(), WAIT, what=f"ebtables chains of {tap} gone")
        eb = ebtables_nat()
        lk.log(f"ebtables -t nat -L after detach:\n{eb}")
        self.assertNotIn(tap, eb)
        self.assertNotIn(f"I-{tap}", nft_ruleset())


def main():
    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    try:
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(AntiSpoofE2E)
        result = unittest.TextTestRunner(verbosity=2).run(suite)
    finally:
        cleanup_all()
    print(f"lab-antispoof: total {time.monotonic() - t0:.1f}s")
    return lk.finish("test_e2e_antispoof", result, label="lab-antispoof")


if __name__ == "__main__":
    sys.exit(main())
