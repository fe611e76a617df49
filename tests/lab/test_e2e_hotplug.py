"""End-to-end hot-plug through the real agent on qemu:///system, proven from inside guests.

Builds the lab guest, brings up bridge lab-abr0 (10.77.11.1/24 + dnsmasq), starts
`nic-agent serve --connect qemu:///system --host-network off` and drives it over
gRPC (Python grpcio, stubs generated from proto/ at test time). Each check that
matters is made where the truth is: the guest console (`LAB: nic-add/dhcp/
nic-remove` lines), `virsh`, the host's tap, and libvirt itself for PCI capacity.
Everything made here is named lab-a* and removed at the end, also on failure.

Run (root): python3 tests/lab/test_e2e_hotplug.py
Env: NIC_AGENT_BIN (default target/debug/nic-agent), LAB_WAIT (poll bound, s, default 20).
"""
import json
import os
import re
import signal
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit as lk  # noqa: E402

grpc, pb, rpc = lk.stubs()

PREFIX = "lab-a"
BRIDGE = "lab-abr0"
SUBNET = 11
OUT = os.path.join(lk.WORK, "guest")
WAIT = float(os.environ.get("LAB_WAIT", "20"))
RPC_TIMEOUT = 90
AGENT_LOG = os.path.join(lk.WORK, "lab-a-agent.stderr.log")
# The guest polls /sys/class/net every 0.2 s and reports a new NIC 0.25-0.6 s
# after attach; a NIC that has not shown up after this long never will.
NO_EVENT_WINDOW = 2.0

TIMINGS = []
LOGS = {}  # test id -> console log paths of the guests it used
STATE = {"agent": None, "cleaned": False}


def mac(test, n):
    return f"52:54:00:a1:{test:02x}:{n:02x}"


def nic_add_re(m):
    return rf"LAB: nic-add name=(\S+) mac={m} mtu=(\d+) queues=(\d+)"


def cleanup_all():
    """Idempotent: stops our agent (by PID) and removes every lab-a* thing."""
    if STATE["cleaned"]:
        return
    STATE["cleaned"] = True
    if STATE["agent"] is not None:
        STATE["agent"].stop()
    lk.script("teardown.sh", PREFIX, check=False)
    lk.script("net.sh", "down", BRIDGE, check=False)


def tail(path, n):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except FileNotFoundError:
        return f"(no {path})\n"


def dump(test_id):
    out = sys.stderr
    for p in dict.fromkeys(LOGS.get(test_id, [])):
        lines = lk.Console(p).lines()
        lab = [l for l in lines if "LAB:" in l]
        out.write(f"===== console {p}: LAB lines =====\n" + "\n".join(lab[-80:]) + "\n")
        out.write(f"===== console {p}: last lines =====\n" + "\n".join(lines[-15:]) + "\n")
    dl = os.path.join(lk.LAB_STATE, "net", BRIDGE, "dnsmasq.log")
    if os.path.exists(dl):
        out.write(f"===== {dl} (tail) =====\n{tail(dl, 30)}")
    out.write(f"===== agent stderr {AGENT_LOG} (tail) =====\n{tail(AGENT_LOG, 120)}")
    out.flush()


class DumpingResult(unittest.TextTestResult):
    """Prints the guest consoles and the agent's stderr right when a test fails,
    while the bridge (and its dnsmasq log) still exists."""

    def addFailure(self, test, err):
        super().addFailure(test, err)
        dump(test.id())

    def addError(self, test, err):
        super().addError(test, err)
        dump(test.id())

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            dump(test.id())


class HotplugE2E(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            lk.script("start-libvirtd.sh")
            lk.script("build-guest.sh", OUT, timeout=600)
            # Leftovers of an interrupted earlier run.
            lk.script("teardown.sh", PREFIX)
            lk.script("net.sh", "up", BRIDGE, "--subnet", str(SUBNET))
            STATE["agent"] = lk.Agent(AGENT_LOG, "--host-network", "off")
            cls.stub = STATE["agent"].stub
            cls.pc = lk.Guest(f"{PREFIX}-pc", "pc", OUT)
            cls.q35 = lk.Guest(f"{PREFIX}-q35", "q35", OUT)
            for g in (cls.pc, cls.q35):
                TIMINGS.append(f"{g.machine}: boot {g.define():.2f}s")
        except BaseException:
            sys.stderr.write(f"setUpClass failed; agent stderr:\n{tail(AGENT_LOG, 80)}")
            cleanup_all()
            raise

    @classmethod
    def tearDownClass(cls):
        cleanup_all()

    # ---- helpers -------------------------------------------------------

    def track(self, *guests):
        LOGS.setdefault(self.id(), []).extend(g.console.path for g in guests)

    def attach(self, vm, m, **spec):
        spec.setdefault("bridge", BRIDGE)
        return self.stub.AttachNic(pb.AttachNicRequest(vm=vm, nic=pb.NicSpec(mac=m, **spec)),
                                   timeout=RPC_TIMEOUT)

    def detach(self, vm, m, timeout_ms=0):
        return self.stub.DetachNic(pb.DetachNicRequest(vm=vm, mac=m, timeout_ms=timeout_ms),
                                   timeout=RPC_TIMEOUT)

    def nics(self, vm):
        return list(self.stub.ListNics(pb.ListNicsRequest(vm=vm), timeout=RPC_TIMEOUT).nics)

    def macs(self, vm):
        return [n.mac.lower() for n in self.nics(vm)]

    def vm(self, name):
        """The ListVms entry for name (AssertionError when absent)."""
        vms = [v for v in self.stub.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT).vms
               if v.name == name]
        self.assertEqual(len(vms), 1, f"ListVms has {len(vms)} entries named {name}")
        return vms[0]

    def capacity(self, vm):
        return self.stub.GetPciCapacity(pb.GetPciCapacityRequest(vm=vm), timeout=RPC_TIMEOUT)

    def rpc_fails(self, code, fn, *args, **kw):
        with self.assertRaises(grpc.RpcError) as cm:
            fn(*args, **kw)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        return cm.exception

    def wait_nic_add(self, g, m, after, mtu=None, queues=None, timeout=WAIT):
        """Waits for the guest's nic-add of MAC m; returns its interface name."""
        hit = g.console.wait(nic_add_re(m), timeout=timeout, after=after)
        if mtu is not None:
            self.assertEqual(int(hit.group(2)), mtu, hit.group(0))
        if queues is not None:
            self.assertEqual(int(hit.group(3)), queues, hit.group(0))
        return hit.group(1)

    def wait_lease(self, g, ifname, m, after):
        """Waits for the guest's DHCP result for the NIC; asserts a lease from our dnsmasq."""
        hit = g.console.wait(rf"LAB: (dhcp|dhcp-fail) name={ifname} mac={m}(?: ip=(\S+))?",
                             timeout=WAIT, after=after)
        self.assertEqual(hit.group(1), "dhcp", f"DHCP failed in the guest: {hit.group(0)}")
        ip = hit.group(2).split("/")[0]
        self.assertRegex(ip, rf"^10\.77\.{SUBNET}\.([5-9][0-9]|1[0-4][0-9]|150)$")
        leases = os.path.join(lk.LAB_STATE, "net", BRIDGE, "leases")
        lk.wait_until(lambda: f"{m} {ip}" in open(leases).read(), 5,
                      what=f"dnsmasq lease {m} {ip}")
        return ip

    def assert_tap_on_bridge(self, tap, mtu):
        master = os.path.basename(os.readlink(f"/sys/class/net/{tap}/master"))
        self.assertEqual(master, BRIDGE, f"{tap} is enslaved to {master}")
        with open(f"/sys/class/net/{tap}/mtu") as f:
            self.assertEqual(int(f.read()), mtu, f"host tap {tap} MTU")

    def assert_no_new_nic_add(self, g, m, after):
        """Negative check: no further nic-add for m shows up within the window."""
        deadline = time.monotonic() + NO_EVENT_WINDOW
        while time.monotonic() < deadline:
            self.assertEqual(g.console.find(nic_add_re(m), after), [],
                             f"guest saw MAC {m} plugged again")
            time.sleep(0.1)

    # ---- tests ---------------------------------------------------------

    def test_1_attach_to_running_pc_and_q35_guest_sees_mtu_queues_and_lease(self):
        for n, g in enumerate((self.pc, self.q35), 1):
            with self.subTest(machine=g.machine):
                self.track(g)
                m = mac(1, n)
                self.assertNotIn(m, self.macs(g.name))
                mark = g.console.mark()
                t0 = time.monotonic()
                r = self.attach(g.name, m, mtu=1400, queues=2)
                t_attach = time.monotonic() - t0
                self.assertFalse(r.already_present)
                self.assertEqual(r.applied, "live+config")
                self.assertEqual(r.nic.mac.lower(), m)
                self.assertRegex(r.nic.target_dev, r"^vnet\d+$")
                self.assertTrue(r.nic.HasField("pci"), r)
                if g.machine == "pc":
                    self.assertEqual(r.nic.pci.bus, 0)
                    self.assertTrue(2 <= r.nic.pci.slot <= 31, r.nic.pci)
                else:
                    # q35: a NIC goes behind a pcie-root-port (bus >= 1), slot 0.
                    self.assertGreaterEqual(r.nic.pci.bus, 1)
                    self.assertEqual(r.nic.pci.slot, 0)
                self.assertEqual(r.nic.mtu, 1400)
                self.assertEqual(r.nic.queues, 2)
                self.assertEqual(r.nic.bridge, BRIDGE)
                self.assertTrue(r.nic.in_live and r.nic.in_config, r.nic)
                self.assert_tap_on_bridge(r.nic.target_dev, 1400)

                ifname = self.wait_nic_add(g, m, mark, mtu=1400, queues=2)
                t_seen = time.monotonic() - t0
                ip = self.wait_lease(g, ifname, m, mark)
                t_dhcp = time.monotonic() - t0
                # The NIC carries traffic to our bridge.
                rc, out = g.exec(f"ping -c 1 -W 5 -I {ifname} 10.77.{SUBNET}.1", timeout=20)
                self.assertEqual(rc, 0, out)
                self.assertIn(m, g.iflist())
                self.assertIn(m, g.iflist(inactive=True))
                TIMINGS.append(f"{g.machine}: AttachNic {t_attach:.2f}s, ->nic-add {t_seen:.2f}s, "
                               f"->dhcp {t_dhcp:.2f}s ({ifname} {ip}, {r.nic.target_dev}, "
                               f"pci {r.nic.pci.bus:02x}:{r.nic.pci.slot:02x})")

    def test_2_detach_removes_nic_from_guest_listnics_and_domiflist(self):
        for n, g in enumerate((self.pc, self.q35), 1):
            with self.subTest(machine=g.machine):
                self.track(g)
                m = mac(2, n)
                mark = g.console.mark()
                self.attach(g.name, m, mtu=1400)
                ifname = self.wait_nic_add(g, m, mark)
                # Present everywhere first, so the absence checks below can fail.
                self.assertIn(m, self.macs(g.name))
                self.assertIn(m, g.iflist())
                mark = g.console.mark()
                t0 = time.monotonic()
                r = self.detach(g.name, m)
                t_detach = time.monotonic() - t0
                self.assertEqual(r.state, pb.DETACH_STATE_REMOVED)
                self.assertEqual(r.mac.lower(), m)
                g.console.wait(rf"LAB: nic-remove name={ifname} mac={m}", timeout=WAIT, after=mark)
                t_gone = time.monotonic() - t0
                self.assertNotIn(m, self.macs(g.name))
                self.assertNotIn(m, g.iflist())
                self.assertNotIn(m, g.iflist(inactive=True))
                rc, out = g.exec("cat /sys/class/net/*/address")
                self.assertEqual(rc, 0, out)
                self.assertNotIn(m, out.lower())
                # A retry after success is a no-op, not an error.
                again = self.detach(g.name, m)
                self.assertEqual(again.state, pb.DETACH_STATE_ALREADY_ABSENT)
                TIMINGS.append(f"{g.machine}: DetachNic {t_detach:.2f}s (returns after the guest "
                               f"released it), ->nic-remove {t_gone:.2f}s")

    def test_2b_detach_through_the_cli_removes_the_nic_and_exits_zero(self):
        # The real binary's `detach` subcommand against the lab agent.
        g, m = self.pc, mac(2, 0x0b)
        self.track(g)
        mark = g.console.mark()
        self.attach(g.name, m)
        ifname = self.wait_nic_add(g, m, mark)
        server = STATE["agent"].addr
        mark = g.console.mark()
        p = lk.run([lk.BIN, "detach", "--server", server, "--vm", g.name, "--mac", m],
                   timeout=RPC_TIMEOUT + 10, check=False)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, rf"^REMOVED {m} from {g.name}: request \S+\n$")
        g.console.wait(rf"LAB: nic-remove name={ifname} mac={m}", timeout=WAIT, after=mark)
        self.assertNotIn(m, self.macs(g.name))
        self.assertNotIn(m, g.iflist(inactive=True))
        p = lk.run([lk.BIN, "detach", "--server", server, "--vm", g.name, "--mac", m, "--json"],
                   timeout=RPC_TIMEOUT + 10, check=False)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout)["state"], "ALREADY_ABSENT", p.stdout)
        p = lk.run([lk.BIN, "detach", "--server", server, "--vm", "lab-a-nope", "--mac", m],
                   timeout=RPC_TIMEOUT + 10, check=False)
        self.assertEqual(p.returncode, 1, p.stdout)
        self.assertTrue(p.stderr.startswith("error: NOT_FOUND: "), p.stderr)

    def test_3_detach_from_paused_guest_is_pending_then_completes_without_second_device_del(self):
        g = self.pc
        self.track(g)
        agent = STATE["agent"]
        m = mac(3, 1)
        mark = g.console.mark()
        self.attach(g.name, m)
        ifname = self.wait_nic_add(g, m, mark)

        def pending_lines():
            return [l for l in agent.stderr().splitlines() if "already pending" in l and m in l]

        self.assertEqual(pending_lines(), [])
        lk.virsh("suspend", g.name)
        self.addCleanup(lambda: g.state() == "paused" and lk.virsh("resume", g.name, check=False))
        self.assertEqual(g.state(), "paused")

        t0 = time.monotonic()
        err = self.rpc_fails(grpc.StatusCode.DEADLINE_EXCEEDED, self.detach, g.name, m,
                             timeout_ms=3000)
        t_pending = time.monotonic() - t0
        # Server-side deadline, not ours: the agent says the unplug is pending.
        self.assertEqual(lk.rpc_error_metadata(err).get("x-detach-state"), "PENDING",
                         err.trailing_metadata())
        self.assertGreaterEqual(t_pending, 3.0)
        self.assertLess(t_pending, RPC_TIMEOUT - 5)
        # The paused guest has not released it: still in the live domain.
        live = [n for n in self.nics(g.name) if n.mac.lower() == m]
        self.assertEqual(len(live), 1, live)
        self.assertTrue(live[0].in_live)
        self.assertIn(m, g.iflist())
        self.assertEqual(pending_lines(), [])

        # The retry is started while the guest is still paused, so it cannot
        # race the guest's release: it must find the unplug pending and wait.
        # (Retrying after resume could see the NIC already gone: ALREADY_ABSENT.)
        retry = self.stub.DetachNic.future(
            pb.DetachNicRequest(vm=g.name, mac=m, timeout_ms=30000), timeout=RPC_TIMEOUT)
        lk.wait_until(pending_lines, WAIT, what="'already pending' in the agent's stderr")
        self.assertFalse(retry.done(), "retry returned while the guest was still paused")
        mark = g.console.mark()
        t1 = time.monotonic()
        lk.virsh("resume", g.name)
        r = retry.result(timeout=RPC_TIMEOUT)
        t_done = time.monotonic() - t1
        self.assertEqual(r.state, pb.DETACH_STATE_REMOVED)
        g.console.wait(rf"LAB: nic-remove name={ifname} mac={m}", timeout=WAIT, after=mark)
        self.assertNotIn(m, self.macs(g.name))
        self.assertNotIn(m, g.iflist())
        self.assertEqual(len(pending_lines()), 1, pending_lines())
        TIMINGS.append(f"paused pc: DetachNic(timeout 3 s) -> DEADLINE_EXCEEDED after "
                       f"{t_pending:.2f}s; retry -> REMOVED {t_done:.2f}s after resume")

    def test_4_capacity_prediction_matches_real_pci_slots(self):
        for machine, flags in (("pc", []), ("q35", ["--root-ports", "4"])):
            with self.subTest(machine=machine):
                g = lk.Guest(f"{PREFIX}-cap-{machine}", machine, OUT)
                self.track(g)
                try:
                    self._capacity_case(g, flags)
                finally:
                    g.remove()

    def _capacity_case(self, g, flags):
        g.define(*flags)
        have = len(self.nics(g.name))
        # define-guest: pc has usb none and no balloon -> slots 0x02-0x1f; q35 one per root port.
        expect = 30 - have if g.machine == "pc" else 4 - have
        cap = self.capacity(g.name)
        self.assertEqual(cap.machine_family, g.machine)
        self.assertEqual(cap.nic_count, have)
        self.assertEqual(cap.attachable, expect, cap)
        self.assertEqual(cap.free_slots, expect, cap)
        n = cap.attachable

        mark = g.console.mark()
        t0 = time.monotonic()
        addrs = set()
        for i in range(n):
            r = self.attach(g.name, mac(4, i + 1), queues=1)
            self.assertFalse(r.already_present)
            addrs.add((r.nic.pci.bus, r.nic.pci.slot, r.nic.pci.function))
        t_all = time.monotonic() - t0
        self.assertEqual(len(addrs), n, f"PCI addresses not distinct: {sorted(addrs)}")
        self.assertEqual(len(self.nics(g.name)), have + n)
        after = self.capacity(g.name)
        self.assertEqual((after.attachable, after.free_slots), (0, 0), after)

        extra = mac(4, 0xff)
        err = self.rpc_fails(grpc.StatusCode.RESOURCE_EXHAUSTED, self.attach, g.name, extra,
                             queues=1)
        self.assertNotIn("No more available PCI slots", err.details())
        self.assertTrue(err.details().strip(), "empty RESOURCE_EXHAUSTED message")
        self.assertNotIn(extra, self.macs(g.name))
        self.assertEqual(len(self.nics(g.name)), have + n)

        # The real number: libvirt itself has no slot left either. If the
        # agent under-predicted, this attach would succeed.
        xml = os.path.join(OUT, f"{g.name}.extra-nic.xml")
        with open(xml, "w") as f:
            f.write(lk.nic_xml(extra, BRIDGE, queues=1))
        p = lk.virsh("attach-device", g.name, xml, "--live", check=False)
        self.assertNotEqual(p.returncode, 0, f"libvirt still had a free slot: {p.stdout}")
        self.assertIn("No more available PCI slots", p.stderr)

        # And the guest really got every one of them.
        want = {mac(4, i + 1) for i in range(n)}
        r = re.compile(r"LAB: nic-add name=\S+ mac=(\S+) ")

        def seen():
            got = {x.group(1) for x in g.console.find(r.pattern, mark)}
            return want <= got

        lk.wait_until(seen, max(WAIT, 2.0 * n), what=f"{n} nic-add lines in {g.name}")
        t_seen = time.monotonic() - t0
        TIMINGS.append(f"capacity {g.machine}: predicted and attached {n}, #{n + 1} refused; "
                       f"{n} AttachNic in {t_all:.2f}s, all in guest after {t_seen:.2f}s")

    def test_5_attach_to_stopped_vm_goes_to_config_and_appears_at_boot(self):
        g = lk.Guest(f"{PREFIX}-stopped", "pc", OUT)
        self.track(g)
        try:
            g.define("--no-start")
            self.assertEqual(g.state(), "shut off")
            v = self.vm(g.name)
            self.assertTrue(v.persistent)
            self.assertEqual(v.nic_count, 0)
            # txqueuelen lives on the host tap, and a stopped VM has none:
            # refused before libvirt is asked, nothing written.
            err = self.rpc_fails(grpc.StatusCode.FAILED_PRECONDITION, self.attach, g.name,
                                 mac(5, 2), tx_queue_len=5000)
            self.assertIn("tx_queue_len", err.details())
            self.assertEqual(self.vm(g.name).nic_count, 0)
            m = mac(5, 1)
            r = self.attach(g.name, m, mtu=1400, queues=2)
            self.assertEqual(r.applied, "config")
            self.assertFalse(r.already_present)
            self.assertTrue(r.nic.in_config)
            self.assertFalse(r.nic.in_live)
            self.assertEqual(r.nic.target_dev, "")
            self.assertIn(m, g.iflist(inactive=True))
            self.assertEqual(self.vm(g.name).nic_count, 1)

            t0 = time.monotonic()
            lk.virsh("start", g.name)
            g.console.wait(r"LAB: boot ok", timeout=90)
            t_boot = time.monotonic() - t0
            # /init polls /sys/class/net from the start, so a NIC present at
            # boot is reported like a hot-plugged one.
            ifname = self.wait_nic_add(g, m, 0, mtu=1400, queues=2)
            self.wait_lease(g, ifname, m, 0)
            self.assertEqual(len(g.console.find(r"LAB: nic-add ")), 1, g.console.text())
            now = [n for n in self.nics(g.name) if n.mac.lower() == m]
            self.assertEqual(len(now), 1)
            self.assertTrue(now[0].in_live and now[0].in_config, now[0])
            self.assertRegex(now[0].target_dev, r"^vnet\d+$")
            TIMINGS.append(f"stopped pc: boot with config NIC {t_boot:.2f}s")
        finally:
            g.remove()

    def test_6_attach_to_transient_vm_is_live_only(self):
        g = lk.Guest(f"{PREFIX}-transient", "q35", OUT)
        self.track(g)
        try:
            g.define("--transient")
            self.assertRegex(lk.virsh("dominfo", g.name).stdout, r"Persistent:\s+no")
            self.assertFalse(self.vm(g.name).persistent)
            m = mac(6, 1)
            mark = g.console.mark()
            r = self.attach(g.name, m, mtu=1400, queues=2)
            self.assertEqual(r.applied, "live")
            self.assertTrue(r.nic.in_live)
            self.assertFalse(r.nic.in_config)
            self.assertRegex(r.nic.target_dev, r"^vnet\d+$")
            ifname = self.wait_nic_add(g, m, mark, mtu=1400, queues=2)
            self.wait_lease(g, ifname, m, mark)
            mark = g.console.mark()
            self.assertEqual(self.detach(g.name, m).state, pb.DETACH_STATE_REMOVED)
            g.console.wait(rf"LAB: nic-remove name={ifname} mac={m}", timeout=WAIT, after=mark)
        finally:
            g.remove()

    def test_7_reattach_same_spec_is_idempotent_and_different_spec_conflicts(self):
        g = self.q35
        self.track(g)
        m = mac(7, 1)
        mark = g.console.mark()
        first = self.attach(g.name, m, mtu=1400, queues=2)
        self.assertFalse(first.already_present)
        self.wait_nic_add(g, m, mark, mtu=1400, queues=2)
        count = len(self.nics(g.name))

        mark = g.console.mark()
        again = self.attach(g.name, m, mtu=1400, queues=2)
        self.assertTrue(again.already_present)
        self.assertEqual(again.applied, "")
        self.assertEqual(again.nic.target_dev, first.nic.target_dev)
        self.assertEqual(again.nic.pci, first.nic.pci)
        self.assertEqual(len(self.nics(g.name)), count)
        self.assertEqual(g.iflist().count(m), 1)
        rc, out = g.exec("cat /sys/class/net/*/address")
        self.assertEqual(rc, 0, out)
        self.assertEqual(out.lower().count(m), 1, out)
        self.assert_no_new_nic_add(g, m, mark)

        err = self.rpc_fails(grpc.StatusCode.ALREADY_EXISTS, self.attach, g.name, m,
                             mtu=1300, queues=2)
        self.assertIn("mtu", err.details())
        self.assertEqual(len(self.nics(g.name)), count)
        mine = [n for n in self.nics(g.name) if n.mac.lower() == m]
        self.assertEqual([n.mtu for n in mine], [1400])
        self.assert_no_new_nic_add(g, m, mark)


    def test_8_tx_queue_len_lands_on_the_host_tap_and_a_retry_puts_it_back(self):
        g = self.pc
        self.track(g)
        m = mac(8, 1)
        mark = g.console.mark()
        r = self.attach(g.name, m, tx_queue_len=5000)
        self.assertFalse(r.already_present)
        tap = r.nic.target_dev
        self.assertRegex(tap, r"^vnet\d+$")
        qlen = f"/sys/class/net/{tap}/tx_queue_len"
        with open(qlen) as f:
            self.assertEqual(int(f.read()), 5000, f"host tap {tap} txqueuelen")
        self.wait_nic_add(g, m, mark)
        # Someone puts the kernel default back; the idempotent retry sets
        # the requested value again (txqueuelen is not in the XML).
        lk.run(["ip", "link", "set", "dev", tap, "txqueuelen", "1000"])
        again = self.attach(g.name, m, tx_queue_len=5000)
        self.assertTrue(again.already_present)
        with open(qlen) as f:
            self.assertEqual(int(f.read()), 5000, f"host tap {tap} txqueuelen after retry")
        self.assertEqual(self.detach(g.name, m).state, pb.DETACH_STATE_REMOVED)


def main():
    # SIGTERM (e.g. a runner's timeout) must still tear the lab down.
    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    try:
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(HotplugE2E)
        if len(sys.argv) > 1:
            suite = unittest.TestSuite(t for t in suite if any(a in t.id() for a in sys.argv[1:]))
        result = unittest.TextTestRunner(verbosity=2, resultclass=DumpingResult).run(suite)
    finally:
        cleanup_all()
    for t in TIMINGS:
        print(f"lab-hotplug timing: {t}")
    # Subtest failures are listed per subtest; count each test once.
    failed = len({getattr(t, "test_case", t).id() for t, _ in result.failures + result.errors})
    print(f"lab-hotplug: total {time.monotonic() - t0:.1f}s")
    return lk.finish("test_e2e_hotplug", result, label="lab-hotplug", failed=failed)


if __name__ == "__main__":
    sys.exit(main())
