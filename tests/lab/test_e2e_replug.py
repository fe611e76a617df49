"""ReplugNic end to end on qemu:///system, proven from inside a guest.

1. In place: a NIC on Linux bridge A (lease from A's dnsmasq) is re-plugged
   to Linux bridge B. The guest keeps its device: same ifindex, same PCI
   address, no nic-remove/nic-add on its console, only the carrier going
   down and up (its carrier_changes counter). It then leases from B's dnsmasq on the same ethN and pings
   B's gateway through it.
2. The failure path: a re-plug onto a segment whose host side cannot be
   prepared (vxlan:// on A's label with no room for VXLAN's 50 bytes) is
   FAILED_PRECONDITION, and the NIC stays on A with its link up: no carrier
   change, still pinging A.
3. Unplug: a Linux-bridge NIC re-plugged to an Open vSwitch bridge (VLAN
   100, dnsmasq on that VLAN). The guest sees exactly one nic-remove and one
   nic-add, the NIC ends on the same PCI address, tagged 100 on OVS, with
   its link up, and leases on the VLAN.

Bridges lab-kbr1 (10.77.81.0/24), lab-kbr2 (10.77.82.0/24), OVS lab-kovs
with internal port lab-kv100 (tag 100, 10.77.83.0/24); guest lab-k-a (pc).
Everything is removed at the end, also on failure. Traffic goes only to
these bridges' own addresses.

Run (root): python3 tests/lab/test_e2e_replug.py
Env: NIC_AGENT_BIN (default target/debug/nic-agent), LAB_WAIT (poll bound, s, default 20).
"""
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

PREFIX = "lab-k"
BR1, NET1 = "lab-kbr1", 81
BR2, NET2 = "lab-kbr2", 82
OVS_BR, OVS_PORT, OVS_NET, OVS_VLAN = "lab-kovs", "lab-kv100", 83, 100
OUT = os.path.join(lk.WORK, "guest")
WAIT = float(os.environ.get("LAB_WAIT", "20"))
RPC_TIMEOUT = 90
# A guest reports a NIC change within about 0.6 s; nothing after this long
# means nothing happened.
NO_EVENT_WINDOW = 2.0
STATE = {"agent": None, "cleaned": False, "workdir": None, "dnsmasq": None}


def mac(test, n):
    return f"52:54:00:c8:{test:02x}:{n:02x}"


def sh(*cmd, check=True):
    return lk.run(list(cmd), check=check).stdout


def ovs_pidfile():
    return os.path.join(lk.LAB_STATE, "lab-k-ovs-dnsmasq.pid")


def stop_ovs_dnsmasq():
    """Ends only the dnsmasq this suite started, by the PID in its pidfile."""
    try:
        with open(ovs_pidfile()) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "dnsmasq":
                return
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass
    try:
        os.unlink(ovs_pidfile())
    except OSError:
        pass


def cleanup_all():
    if STATE["cleaned"]:
        return
    STATE["cleaned"] = True
    if STATE["agent"] is not None:
        STATE["agent"].stop()
    lk.script("teardown.sh", PREFIX, check=False)
    for br in (BR1, BR2):
        lk.script("net.sh", "down", br, check=False)
    stop_ovs_dnsmasq()
    sh("ovs-vsctl", "--if-exists", "del-br", OVS_BR, check=False)
    if STATE["workdir"] and not os.environ.get("LAB_KEEP_WORKDIR"):
        shutil.rmtree(STATE["workdir"], ignore_errors=True)


def make_ovs(workdir):
    sh("ovs-vsctl", "--may-exist", "add-br", OVS_BR, "--", "set", "bridge", OVS_BR,
       "datapath_type=netdev")
    # add-br without netdev prints an error but exits 0: check for real.
    got = sh("ovs-vsctl", "get", "bridge", OVS_BR, "datapath_type").strip()
    if got != "netdev":
        raise RuntimeError(f"{OVS_BR} datapath_type is {got}")
    sh("ovs-vsctl", "--may-exist", "add-port", OVS_BR, OVS_PORT, f"tag={OVS_VLAN}", "--",
       "set", "interface", OVS_PORT, "type=internal")
    lk.wait_until(lambda: os.path.exists(f"/sys/class/net/{OVS_PORT}"), 10,
                  what=f"{OVS_PORT} to appear")
    net = f"10.77.{OVS_NET}"
    sh("ip", "addr", "replace", f"{net}.1/24", "dev", OVS_PORT)
    sh("ip", "link", "set", "dev", OVS_PORT, "up")
    # Same flags as net.sh.
    sh("dnsmasq", "--conf-file=/dev/null", "--no-hosts", f"--pid-file={ovs_pidfile()}",
       "--bind-interfaces", f"--interface={OVS_PORT}", "--except-interface=lo",
       f"--dhcp-range={net}.50,{net}.150,255.255.255.0,12h", "--dhcp-authoritative",
       "--no-ping", "--port=0", "--no-resolv",
       f"--dhcp-leasefile={os.path.join(workdir, 'ovs-leases')}",
       "--user=root", "--group=root", "--log-dhcp",
       f"--log-facility={os.path.join(workdir, 'ovs-dnsmasq.log')}")
    lk.wait_until(lambda: os.path.exists(ovs_pidfile()), 10, what="dnsmasq pidfile")


class ReplugE2E(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            STATE["workdir"] = tempfile.mkdtemp(prefix="lab-k-")
            wd = STATE["workdir"]
            lk.script("start-libvirtd.sh")
            lk.script("start-ovs.sh")
            lk.script("build-guest.sh", OUT, timeout=600)
            lk.script("teardown.sh", PREFIX)
            lk.script("net.sh", "up", BR1, "--subnet", str(NET1))
            lk.script("net.sh", "up", BR2, "--subnet", str(NET2))
            stop_ovs_dnsmasq()
            sh("ovs-vsctl", "--if-exists", "del-br", OVS_BR, check=False)
            make_ovs(wd)
            # Host networking on: the refusal in test 2 is the host side's
            # own preflight. The lab's bridges carry no agent alias, so the
            # agent never removes them.
            STATE["agent"] = lk.Agent(os.path.join(wd, "agent.stderr"), "--host-network", "on",
                                      "--state-dir", os.path.join(wd, "state"),
                                      "--persist-dir", os.path.join(wd, "persist"),
                                      "--bridge-grace-s", "0")
            cls.stub = STATE["agent"].stub
            cls.g = lk.Guest(f"{PREFIX}-a", "pc", OUT)
            cls.g.define()
        except BaseException:
            cleanup_all()
            raise

    @classmethod
    def tearDownClass(cls):
        cleanup_all()

    def tearDown(self):
        try:
            res = self._outcome.result
            failed = any(t is self for t, _ in res.errors + res.failures)
        except AttributeError:
            failed = True
        if failed:
            lab = [l for l in self.g.console.lines() if "LAB:" in l]
            sys.stderr.write(f"== {self.g.name} LAB lines ==\n" + "\n".join(lab[-30:]) + "\n")
            err = STATE["agent"].stderr() if STATE["agent"] else ""
            sys.stderr.write("== agent stderr (tail) ==\n" + "\n".join(err.splitlines()[-40:]) + "\n")

    # ---- helpers -------------------------------------------------------

    def attach(self, m, bridge, **spec):
        return self.stub.AttachNic(
            pb.AttachNicRequest(vm=self.g.name, nic=pb.NicSpec(mac=m, bridge=bridge, **spec)),
            timeout=RPC_TIMEOUT)

    @staticmethod
    def qlen(tap):
        with open(f"/sys/class/net/{tap}/tx_queue_len") as f:
            return int(f.read())

    def replug(self, m, bridge, **kw):
        t0 = time.monotonic()
        r = self.stub.ReplugNic(pb.ReplugNicRequest(vm=self.g.name, mac=m, bridge=bridge, **kw),
                                timeout=RPC_TIMEOUT)
        lk.log(f"ReplugNic {m} -> {bridge}: {time.monotonic() - t0:.3f}s")
        return r

    def detach(self, m):
        r = self.stub.DetachNic(pb.DetachNicRequest(vm=self.g.name, mac=m, timeout_ms=20000),
                                timeout=RPC_TIMEOUT)
        self.assertEqual(r.state, pb.DETACH_STATE_REMOVED, r)

    def nics(self):
        return {n.mac.lower(): n for n in
                self.stub.ListNics(pb.ListNicsRequest(vm=self.g.name), timeout=RPC_TIMEOUT).nics}

    def wait_add(self, m, after):
        return self.g.console.wait(rf"LAB: nic-add name=(\S+) mac={m} ", timeout=WAIT,
                                   after=after).group(1)

    def lease(self, ifname, m, after, net):
        hit = self.g.console.wait(rf"LAB: (dhcp|dhcp-fail) name={ifname} mac={m}(?: ip=(\S+))?",
                                  timeout=WAIT, after=after)
        self.assertEqual(hit.group(1), "dhcp", hit.group(0))
        ip = hit.group(2).split("/")[0]
        self.assertTrue(ip.startswith(f"10.77.{net}."), ip)
        return ip

    def relase(self, ifname, m, net):
        """One more DHCP exchange on ifname, as the guest's /init does on add."""
        mark = self.g.console.mark()
        rc, out = self.g.exec(f"udhcpc -i {ifname} -n -q -t 5 -T 1 -s /bin/lab-dhcp", timeout=30)
        self.assertEqual(rc, 0, out)
        return self.lease(ifname, m, mark, net)

    def ping(self, ifname, net):
        rc, out = self.g.exec(f"ping -c 2 -W 3 -I {ifname} 10.77.{net}.1", timeout=20)
        self.assertEqual(rc, 0, f"ping 10.77.{net}.1 via {ifname}: {out}")

    def ifindex(self, m):
        rc, out = self.g.exec("for d in /sys/class/net/*; do echo $(cat $d/address) $(cat $d/ifindex); done")
        self.assertEqual(rc, 0, out)
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].lower() == m:
                return int(parts[1])
        return 0

    def no_line(self, regex, after, what):
        deadline = time.monotonic() + NO_EVENT_WINDOW
        while time.monotonic() < deadline:
            self.assertEqual(self.g.console.find(regex, after), [], what)
            time.sleep(0.1)

    def guest_read(self, path):
        rc, out = self.g.exec(f"cat {path}")
        self.assertEqual(rc, 0, out)
        return out.strip().splitlines()[-1].strip()

    def carrier_changes(self, ifname):
        return int(self.guest_read(f"/sys/class/net/{ifname}/carrier_changes"))

    def pci(self, n):
        return (n.pci.domain, n.pci.bus, n.pci.slot, n.pci.function)

    def tap_master(self, tap):
        link = f"/sys/class/net/{tap}/master"
        return os.path.basename(os.readlink(link)) if os.path.islink(link) else ""

    # ---- tests ---------------------------------------------------------

    def test_1_in_place_to_another_bridge_keeps_the_device_and_leases_from_the_new_dhcp(self):
        m = mac(1, 1)
        mark = self.g.console.mark()
        r = self.attach(m, BR1)
        ifname = self.wait_add(m, mark)
        ip1 = self.lease(ifname, m, mark, NET1)
        self.ping(ifname, NET1)
        before, idx = r.nic, self.ifindex(m)
        self.assertGreater(idx, 0)
        self.assertEqual(self.tap_master(before.target_dev), BR1)

        mark = self.g.console.mark()
        flaps0 = self.carrier_changes(ifname)
        out = self.replug(m, BR2)
        self.assertEqual(out.way, pb.REPLUG_WAY_IN_PLACE, out)
        self.assertEqual(out.old_bridge, BR1)
        n = out.nic
        self.assertEqual((n.bridge, n.link_state, n.alias), (BR2, "up", before.alias))
        self.assertEqual(self.pci(n), self.pci(before), "same PCI address")
        self.assertEqual(n.target_dev, before.target_dev, "same tap, moved by libvirt")
        self.assertTrue(n.in_live and n.in_config, n)
        self.assertEqual(self.tap_master(n.target_dev), BR2, "the tap is in B now")
        # libvirt's persistent definition follows.
        inactive = lk.virsh("dumpxml", "--inactive", self.g.name).stdout
        el = re.search(rf"<interface[^>]*>(?:(?!</interface>).)*{m}.*?</interface>", inactive, re.S)
        self.assertIsNotNone(el, inactive)
        self.assertIn(f"<source bridge='{BR2}'/>", el.group(0))
        self.assertNotIn("state='down'", el.group(0))
        # The guest's kernel saw the link go down and up (the flap lasts a
        # few ms, too short for /init's carrier poll, so its own counter is
        # the witness), and never an unplug.
        flaps = self.carrier_changes(ifname) - flaps0
        self.assertGreaterEqual(flaps, 2, "the guest never saw its link go down and up")
        self.assertEqual(flaps % 2, 0, f"odd carrier changes ({flaps}): link left down?")
        self.assertEqual(self.guest_read(f"/sys/class/net/{ifname}/carrier"), "1")
        self.no_line(rf"LAB: nic-(remove|add) name=\S+ mac={m}", mark, "the guest saw an unplug")
        self.assertEqual(self.ifindex(m), idx, "same device in the guest")
        ip2 = self.relase(ifname, m, NET2)
        self.ping(ifname, NET2)
        lk.log(f"in place: {ifname} {ip1} on {BR1} -> {ip2} on {BR2}")

        # A retry of the same replug changes nothing.
        again = self.replug(m, BR2)
        self.assertEqual(again.way, pb.REPLUG_WAY_NOTHING, again)
        self.detach(m)

    def test_2_a_segment_that_cannot_be_prepared_leaves_the_nic_on_its_bridge_and_up(self):
        m = mac(2, 1)
        mark = self.g.console.mark()
        self.attach(m, BR1)
        ifname = self.wait_add(m, mark)
        self.lease(ifname, m, mark, NET1)
        mark = self.g.console.mark()
        # A 1500-byte NIC on a 1500-byte label has no room for VXLAN's 50.
        with self.assertRaises(grpc.RpcError) as cm:
            self.replug(m, BR1, broadcast_uri="vxlan://5801")
        self.assertEqual(cm.exception.code(), grpc.StatusCode.FAILED_PRECONDITION,
                         cm.exception.details())
        self.assertIn("1550", cm.exception.details())
        n = self.nics()[m]
        self.assertEqual((n.bridge, n.link_state), (BR1, "up"))
        self.assertTrue(n.in_live and n.in_config, n)
        self.assertFalse(os.path.exists("/sys/class/net/brvx-5801"), "no bridge left behind")
        self.assertFalse(os.path.exists("/sys/class/net/vxlan5801"), "no device left behind")
        self.no_line(rf"LAB: (carrier|nic-remove|nic-add) name=\S+ mac={m}", mark,
                     "the refused replug touched the guest's NIC")
        self.ping(ifname, NET1)
        # Bad input names the field and the range; nothing changes.
        with self.assertRaises(grpc.RpcError) as cm:
            self.replug(m, BR1, vlan=4095, switch_type=pb.SWITCH_TYPE_OPEN_VSWITCH)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("vlan", cm.exception.details())
        self.detach(m)

    def test_3_linux_bridge_to_ovs_unplugs_once_and_ends_on_the_same_pci_slot(self):
        m = mac(3, 1)
        mark = self.g.console.mark()
        # A txqueuelen is not in the XML: the unplug must carry it to the
        # new tap itself.
        r = self.attach(m, BR1, tx_queue_len=4000)
        ifname = self.wait_add(m, mark)
        self.lease(ifname, m, mark, NET1)
        before = r.nic
        self.assertEqual(self.qlen(before.target_dev), 4000)

        mark = self.g.console.mark()
        out = self.replug(m, OVS_BR, switch_type=pb.SWITCH_TYPE_OPEN_VSWITCH, vlan=OVS_VLAN)
        self.assertEqual(out.way, pb.REPLUG_WAY_UNPLUG, out)
        self.assertEqual(out.old_bridge, BR1)
        n = out.nic
        self.assertEqual((n.bridge, n.vlan, n.link_state, n.alias),
                         (OVS_BR, OVS_VLAN, "up", before.alias))
        self.assertEqual(self.pci(n), self.pci(before), "re-plugged at the same PCI address")
        self.assertTrue(n.in_live and n.in_config, n)
        self.assertEqual(sh("ovs-vsctl", "port-to-br", n.target_dev).strip(), OVS_BR)
        self.assertEqual(self.qlen(n.target_dev), 4000, "txqueuelen carried to the new tap")
        self.assertEqual(sh("ovs-vsctl", "get", "port", n.target_dev, "tag").strip(),
                         str(OVS_VLAN))
        self.g.console.wait(rf"LAB: nic-remove name=\S+ mac={m}", timeout=WAIT, after=mark)
        new_if = self.wait_add(m, mark)
        # The guest's /init leases on add; the link may still have been
        # down for its first try, so one more exchange is allowed.
        hit = self.g.console.wait(rf"LAB: (dhcp|dhcp-fail) name={new_if} mac={m}", timeout=WAIT,
                                  after=mark)
        ip = (self.lease(new_if, m, mark, OVS_NET) if hit.group(1) == "dhcp"
              else self.relase(new_if, m, OVS_NET))
        self.ping(new_if, OVS_NET)
        time.sleep(NO_EVENT_WINDOW)
        self.assertEqual(len(self.g.console.find(rf"LAB: nic-remove name=\S+ mac={m}", mark)), 1)
        self.assertEqual(len(self.g.console.find(rf"LAB: nic-add name=\S+ mac={m}", mark)), 1)
        inactive = lk.virsh("dumpxml", "--inactive", self.g.name).stdout
        el = re.search(rf"<interface[^>]*>(?:(?!</interface>).)*{m}.*?</interface>", inactive, re.S)
        self.assertIsNotNone(el, inactive)
        self.assertIn("openvswitch", el.group(0))
        self.assertIn(f"<tag id='{OVS_VLAN}'/>", el.group(0))
        lk.log(f"unplug: {ifname} on {BR1} -> {new_if} on {OVS_BR} tag {OVS_VLAN}, lease {ip}, "
               f"pci {self.pci(n)}")
        self.detach(m)


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        lk.BIN = sys.argv.pop(1)
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(lk.finish("test_e2e_replug", result, label="lab-replug"))
