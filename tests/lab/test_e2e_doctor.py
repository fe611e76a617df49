"""End-to-end `Diagnose` / `nic-agent doctor` on a real QEMU guest.

The real agent (`serve --connect qemu:///system --host-network on`) is driven
over gRPC. One pc guest (prefix lab-d) gets a NIC on a Linux bridge with a
dnsmasq (10.77.41.0/24). Once the guest has its lease, every hop must be OK
(the FDB hop proves the guest's MAC was learned). Then one hop at a time is
broken from the host and doctor must name exactly that hop as FAULT:

- the tap detached from its bridge (`ip link set TAP nomaster`) -> tap
  (also through the `nic-agent doctor` CLI: exit 1 and the table);
- the bridge set down -> bridge;
- the bridge MTU lowered below the tap's -> mtu;
- a VXLAN NIC (vxlan://5141 over the same bridge) whose vxlan5141 device is
  deleted -> segment;
- an OVS NIC (vlan://141 on an OVS bridge with the userspace datapath,
  lab-facts) whose port gets a wrong tag, then is removed from the bridge
  -> tap, naming the tag and the bridge.

Run as root: python3 tests/lab/test_e2e_doctor.py [path/to/nic-agent]
Env: NIC_AGENT_BIN, LAB_DOCTOR_EXAMPLE=path (write the CLI output of the
broken NIC there; packaging/doctor-example.txt was made that way).
Last line: `lab-doctor: N passed, M failed`.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit  # noqa: E402
from labkit import log, script, run  # noqa: E402

PREFIX = "lab-d"
GUEST = "lab-d-g1"
BR, SUBNET = "lab-dbr1", 41
VNI = 5141
VX_BR, VX_DEV = f"brvx-{VNI}", f"vxlan{VNI}"
MAC = "02:d0:00:41:00:01"
MAC_VX = "02:d0:00:41:00:02"
MAC_OVS = "02:d0:00:41:00:03"
OVS_BR, OVS_VLAN = "lab-dovs", 141
GUEST_DIR = os.path.join(labkit.WORK, "guest")
HOPS = ["xml", "tap", "bridge", "segment", "uplink", "mtu", "promisc", "counters", "fdb"]
# A veth stands in for the bridge's physical uplink (no dummy links here);
# its peer's state is the far end's carrier.
UPLINK, UPLINK_PEER = "lab-dup0", "lab-dup1"


def ip(*args):
    run(["ip", *args])


def link_exists(name):
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def link_alias(name):
    out = run(["ip", "-d", "link", "show", "dev", name], check=False).stdout
    for line in out.splitlines():
        if line.strip().startswith("alias "):
            return line.strip()[len("alias "):]
    return None


class DoctorE2E(unittest.TestCase):
    agent = None
    tap = None

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root")
        cls.workdir = tempfile.mkdtemp(prefix="lab-d-doctor-")
        try:
            script("start-libvirtd.sh")
            script("start-ovs.sh")
            script("build-guest.sh", GUEST_DIR, timeout=600)
            cls.cleanup()
            script("net.sh", "up", BR, "--subnet", str(SUBNET), "--mtu", "1500")
            ip("link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK_PEER)
            ip("link", "set", UPLINK, "master", BR)
            for name in (UPLINK, UPLINK_PEER):
                run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"])
                ip("link", "set", name, "up")
            cls.guest = labkit.Guest(GUEST, "pc", GUEST_DIR)
            took = cls.guest.define()
            log(f"{GUEST} booted in {took:.1f}s")
            cls.agent = labkit.Agent(os.path.join(cls.workdir, "agent.stderr"),
                                     "--host-network", "on",
                                     "--state-dir", os.path.join(cls.workdir, "state"),
                                     "--persist-dir", os.path.join(cls.workdir, "persist"),
                                     # Test 5 waits for the agent-made bridge to go
                                     # after its NIC; the grace period is not its topic.
                                     "--bridge-grace-s", "0")
            _, cls.pb, _ = labkit.stubs()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def cleanup(cls):
        script("teardown.sh", PREFIX, check=False)
        if link_exists(UPLINK):
            run(["ip", "link", "del", "dev", UPLINK], check=False)
        script("net.sh", "down", BR, check=False)
        if shutil.which("ovs-vsctl"):
            run(["ovs-vsctl", "--if-exists", "del-br", OVS_BR], check=False)
        # The agent's VXLAN links, only when they carry its mark.
        for name in (VX_DEV, VX_BR):
            if link_exists(name) and link_alias(name) == "nic-agent":
                run(["ip", "link", "del", "dev", name], check=False)

    @classmethod
    def tearDownClass(cls):
        if cls.agent:
            cls.agent.stop()
        cls.cleanup()
        shutil.rmtree(getattr(cls, "workdir", ""), ignore_errors=True)

    def fail_dump(self):
        return (f"\n--- console tail ---\n{self.guest.console.text()[-3000:]}"
                f"\n--- agent stderr tail ---\n{self.agent.stderr()[-4000:]}")

    # -- helpers

    def diagnose(self, mac):
        r = self.agent.stub.Diagnose(self.pb.DiagnoseRequest(vm=GUEST, mac=mac), timeout=30)
        self.assertEqual([h.name for h in r.hops], HOPS, str(r))
        return r

    def status(self, r, name):
        h = next(h for h in r.hops if h.name == name)
        return self.pb.HopStatus.Name(h.status).replace("HOP_STATUS_", ""), h

    def assert_only_fault(self, r, name):
        for h in r.hops:
            st = self.pb.HopStatus.Name(h.status)
            if h.name == name:
                self.assertEqual(st, "HOP_STATUS_FAULT", f"{name} should be FAULT:\n{r}")
                self.assertTrue(h.fix, f"a FAULT needs a fix: {h}")
            else:
                self.assertNotEqual(st, "HOP_STATUS_FAULT", f"unexpected FAULT on {h.name}:\n{r}")

    def doctor_cli(self, *extra):
        return run([labkit.BIN, "doctor", "--server", self.agent.addr, "--vm", GUEST, *extra],
                   check=False)

    def attach_with_lease(self):
        r = self.agent.stub.AttachNic(self.pb.AttachNicRequest(
            vm=GUEST, nic=self.pb.NicSpec(mac=MAC, bridge=BR)), timeout=60)
        type(self).tap = r.nic.target_dev
        self.assertTrue(self.tap, str(r))
        m = self.guest.console.wait(rf"LAB: (dhcp|dhcp-fail) name=\S+ mac={MAC}\b", timeout=30)
        self.assertEqual(m.group(1), "dhcp", f"no lease: {m.group(0)}{self.fail_dump()}")

    # -- tests, in order: one healthy NIC, then one broken hop at a time

    def test_1_healthy_nic_with_a_lease_is_ok_on_every_hop(self):
        self.attach_with_lease()
        # The FDB entry and counters are there once DHCP went both ways.
        r = labkit.wait_until(
            lambda: (lambda r: r if all(
                self.pb.HopStatus.Name(h.status) == "HOP_STATUS_OK" for h in r.hops) else None)(
                self.diagnose(MAC)),
            timeout=15, interval=0.5, what="every hop OK")
        _, fdb = self.status(r, "fdb")
        self.assertIn(f"learned on {self.tap}", fdb.evidence)
        _, tap = self.status(r, "tap")
        self.assertIn(f"enslaved to {BR}", tap.evidence)
        self.assertEqual(r.nic.mac, MAC)
        log("healthy: " + " | ".join(f"{h.name}: {h.evidence}" for h in r.hops))
        out = self.doctor_cli("--mac", MAC)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("0 FAULT, 0 WARNING, 9 OK", out.stdout)
        _, up = self.status(r, "uplink")
        self.assertIn(f"{UPLINK} (port of {BR}): 10000 Mb/s", up.evidence)
        self.assertIn("no new errors within 1 s", up.evidence)

    def test_2_tap_detached_from_the_bridge_is_a_tap_fault(self):
        self.assertTrue(self.tap, "test_1 must attach the NIC first")
        ip("link", "set", "dev", self.tap, "nomaster")
        try:
            r = self.diagnose(MAC)
            self.assert_only_fault(r, "tap")
            _, h = self.status(r, "tap")
            self.assertIn(f"{self.tap} has no master (expected bridge {BR})", h.evidence)
            self.assertEqual(h.fix, f"ip link set {self.tap} master {BR}")
            # The CLI: exit 1, a table naming the hop and the fix.
            out = self.doctor_cli("--mac", MAC)
            self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
            self.assertRegex(out.stdout, r"\ntap\s+FAULT\s+")
            self.assertIn(f"fix: ip link set {self.tap} master {BR}", out.stdout)
            self.assertRegex(out.stdout, r"\nbridge\s+OK\s+")
            example = os.environ.get("LAB_DOCTOR_EXAMPLE")
            if example:
                with open(example, "w") as f:
                    f.write(f"$ nic-agent doctor --vm {GUEST} --mac {MAC}\n{out.stdout}"
                            f"$ echo $?\n{out.returncode}\n")
        finally:
            ip("link", "set", "dev", self.tap, "master", BR)
        self.assertEqual(self.status(self.diagnose(MAC), "tap")[0], "OK")

    def test_3_bridge_down_is_a_bridge_fault(self):
        ip("link", "set", "dev", BR, "down")
        try:
            r = self.diagnose(MAC)
            self.assert_only_fault(r, "bridge")
            self.assertEqual(self.status(r, "bridge")[1].fix, f"ip link set {BR} up")
        finally:
            ip("link", "set", "dev", BR, "up")
        self.assertEqual(self.status(self.diagnose(MAC), "bridge")[0], "OK")

    def test_4_bridge_mtu_below_the_tap_is_an_mtu_fault(self):
        ip("link", "set", "dev", BR, "mtu", "1400")
        try:
            r = self.diagnose(MAC)
            self.assert_only_fault(r, "mtu")
            _, h = self.status(r, "mtu")
            self.assertIn(f"tap {self.tap} MTU 1500 > bridge {BR} MTU 1400", h.evidence)
            self.assertIn(f"raise {BR} MTU to 1500", h.fix)
        finally:
            ip("link", "set", "dev", BR, "mtu", "1500")
        self.assertEqual(self.status(self.diagnose(MAC), "mtu")[0], "OK")

    def test_5_deleted_vxlan_device_is_a_segment_fault(self):
        r = self.agent.stub.AttachNic(self.pb.AttachNicRequest(
            vm=GUEST, nic=self.pb.NicSpec(mac=MAC_VX, bridge=BR,
                                          broadcast_uri=f"vxlan://{VNI}")), timeout=60)
        self.assertEqual(r.nic.bridge, VX_BR)
        try:
            d = self.diagnose(MAC_VX)
            st, seg = self.status(d, "segment")
            self.assertEqual(st, "OK", str(d))
            for want in (VX_DEV, f"vni {VNI}", "group 239.0.20.21", f"underlay {BR} up"):
                self.assertIn(want, seg.evidence)
            for name in ("tap", "bridge", "mtu"):
                self.assertEqual(self.status(d, name)[0], "OK", str(d))
            self.assertIn("needs ≥ 1500", self.status(d, "mtu")[1].evidence)
            ip("link", "del", "dev", VX_DEV)
            d = self.diagnose(MAC_VX)
            self.assert_only_fault(d, "segment")
            _, seg = self.status(d, "segment")
            self.assertIn(f"{VX_DEV} does not exist", seg.evidence)
            self.assertIn(f"type vxlan id {VNI} group 239.0.20.21", seg.fix)
        finally:
            r = self.agent.stub.DetachNic(self.pb.DetachNicRequest(
                vm=GUEST, mac=MAC_VX, timeout_ms=20000), timeout=60)
            self.assertEqual(r.state, self.pb.DETACH_STATE_REMOVED)
        labkit.wait_until(lambda: not link_exists(VX_BR), 10, what=f"{VX_BR} removed")
        # The first NIC is untouched by all this.
        d = self.diagnose(MAC)
        self.assertFalse([h.name for h in d.hops
                          if self.pb.HopStatus.Name(h.status) == "HOP_STATUS_FAULT"], str(d))

    def test_6_ovs_port_with_a_wrong_tag_or_off_its_bridge_is_a_tap_fault(self):
        run(["ovs-vsctl", "--may-exist", "add-br", OVS_BR, "--", "set", "bridge", OVS_BR,
             "datapath_type=netdev"])
        run(["ip", "link", "set", "dev", OVS_BR, "up"])
        r = self.agent.stub.AttachNic(self.pb.AttachNicRequest(
            vm=GUEST, nic=self.pb.NicSpec(mac=MAC_OVS, bridge=OVS_BR,
                                          switch_type=self.pb.SWITCH_TYPE_OPEN_VSWITCH,
                                          broadcast_uri=f"vlan://{OVS_VLAN}")), timeout=60)
        tap = r.nic.target_dev
        self.assertEqual((r.nic.bridge, r.nic.vlan), (OVS_BR, OVS_VLAN), str(r))

        def faults(d):
            return {h.name for h in d.hops if self.pb.HopStatus.Name(h.status) == "HOP_STATUS_FAULT"}

        try:
            d = self.diagnose(MAC_OVS)
            st, h = self.status(d, "tap")
            self.assertEqual(st, "OK", str(d))
            self.assertIn(f"port of OVS bridge {OVS_BR}", h.evidence)
            self.assertIn(f"VLAN tag {OVS_VLAN}", h.evidence)
            base = faults(d)
            self.assertNotIn("tap", base)

            run(["ovs-vsctl", "set", "port", tap, "tag=999"])
            d = self.diagnose(MAC_OVS)
            self.assertEqual(faults(d), base | {"tap"}, str(d))
            _, h = self.status(d, "tap")
            self.assertIn(f"VLAN tag 999 on the port, XML says {OVS_VLAN}", h.evidence)
            self.assertEqual(h.fix, f"ovs-vsctl set port {tap} tag={OVS_VLAN}")
            out = run([labkit.BIN, "doctor", "--server", self.agent.addr, "--vm", GUEST,
                       "--mac", MAC_OVS], check=False)
            self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
            self.assertRegex(out.stdout, r"\ntap\s+FAULT\s+")
            run(["ovs-vsctl", "set", "port", tap, f"tag={OVS_VLAN}"])
            self.assertEqual(self.status(self.diagnose(MAC_OVS), "tap")[0], "OK")

            run(["ovs-vsctl", "del-port", OVS_BR, tap])
            d = self.diagnose(MAC_OVS)
            self.assertIn("tap", faults(d), str(d))
            _, h = self.status(d, "tap")
            self.assertIn(f"{tap} is not a port of any OVS bridge (expected {OVS_BR})",
                          h.evidence)
            self.assertEqual(h.fix, f"ovs-vsctl add-port {OVS_BR} {tap} tag={OVS_VLAN}")
            run(["ovs-vsctl", "add-port", OVS_BR, tap, f"tag={OVS_VLAN}"])
            self.assertEqual(self.status(self.diagnose(MAC_OVS), "tap")[0], "OK")
        finally:
            self.agent.stub.DetachNic(self.pb.DetachNicRequest(
                vm=GUEST, mac=MAC_OVS, timeout_ms=20000), timeout=60)

    def test_7_uplink_without_carrier_is_an_uplink_fault(self):
        self.assertTrue(self.tap, "test_1 must attach the NIC first")
        # The far end goes: the uplink stays up without carrier, as with a
        # pulled cable or a dead switch port.
        ip("link", "set", "dev", UPLINK_PEER, "down")
        try:
            r = self.diagnose(MAC)
            self.assert_only_fault(r, "uplink")
            _, h = self.status(r, "uplink")
            self.assertIn(f"{UPLINK} has no carrier", h.evidence)
            out = self.doctor_cli("--mac", MAC)
            self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
            self.assertRegex(out.stdout, r"\nuplink\s+FAULT\s+")
        finally:
            ip("link", "set", "dev", UPLINK_PEER, "up")
        labkit.wait_until(lambda: self.status(self.diagnose(MAC), "uplink")[0] == "OK", 10,
                          what="uplink OK again")

    def test_8_a_segment_other_than_the_intended_one_is_the_intent_fault(self):
        """CloudStack's intent against what the host carries: an OVS port
        tagged 141 diagnosed as vlan://142, and a VXLAN NIC on VNI 5141
        diagnosed as vxlan://5142, are each named as the broken hop; the
        intent they were attached with is OK."""
        run(["ovs-vsctl", "--may-exist", "add-br", OVS_BR, "--", "set", "bridge", OVS_BR,
             "datapath_type=netdev"])
        run(["ip", "link", "set", "dev", OVS_BR, "up"])
        self.agent.stub.AttachNic(self.pb.AttachNicRequest(
            vm=GUEST, nic=self.pb.NicSpec(mac=MAC_OVS, bridge=OVS_BR,
                                          switch_type=self.pb.SWITCH_TYPE_OPEN_VSWITCH,
                                          broadcast_uri=f"vlan://{OVS_VLAN}")), timeout=60)
        self.agent.stub.AttachNic(self.pb.AttachNicRequest(
            vm=GUEST, nic=self.pb.NicSpec(mac=MAC_VX, bridge=BR,
                                          broadcast_uri=f"vxlan://{VNI}")), timeout=60)
        try:
            # Through the CLI, as the operator runs it.
            wrong = self.doctor_cli("--mac", MAC_OVS, "--broadcast-uri", f"vlan://{OVS_VLAN + 1}")
            self.assertEqual(wrong.returncode, 1, wrong.stdout + wrong.stderr)
            self.assertRegex(wrong.stdout, r"\nintent\s+FAULT\s+")
            self.assertIn(f"CloudStack intended vlan://{OVS_VLAN + 1}, but the OVS port tag on "
                          f"{OVS_BR} carries vlan://{OVS_VLAN}", wrong.stdout)
            right = self.doctor_cli("--mac", MAC_OVS, "--broadcast-uri", f"vlan://{OVS_VLAN}")
            self.assertRegex(right.stdout, r"\nintent\s+OK\s+")
            self.assertNotRegex(right.stdout, r"\nintent\s+FAULT")

            def intent(uri):
                r = self.agent.stub.Diagnose(self.pb.DiagnoseRequest(
                    vm=GUEST, mac=MAC_VX, broadcast_uri=uri), timeout=30)
                self.assertEqual([h.name for h in r.hops], HOPS + ["intent"], str(r))
                return self.status(r, "intent")

            st, h = intent(f"vxlan://{VNI + 1}")
            self.assertEqual(st, "FAULT", str(h))
            # Both what the bridge's name says and what its device carries.
            self.assertIn(f"bridge {VX_BR} carries vxlan://{VNI}", h.evidence)
            self.assertIn(f"{VX_DEV} in {VX_BR} carries vxlan://{VNI}", h.evidence)
            self.assertIn(f"--broadcast-uri vxlan://{VNI + 1}", h.fix)
            st, h = intent(f"vxlan://{VNI}")
            self.assertEqual(st, "OK", str(h))
        finally:
            for m in (MAC_OVS, MAC_VX):
                self.agent.stub.DetachNic(self.pb.DetachNicRequest(
                    vm=GUEST, mac=m, timeout_ms=20000), timeout=60)
        labkit.wait_until(lambda: not link_exists(VX_BR), 10, what=f"{VX_BR} removed")


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        labkit.BIN = sys.argv.pop(1)
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(labkit.finish("test_e2e_doctor", result, label="lab-doctor"))
