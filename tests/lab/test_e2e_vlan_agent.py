"""The real nic-agent's VLAN bridges (`br<pif>-<N>`), driven over gRPC, inside a
lab guest whose kernel has 8021q.

Why inside a guest: this host's kernel has no 8021q, so on the host AttachNic
with `vlan://N` can only fail cleanly (tests/agent_host_netns.rs). The lab
guest's Debian kernel has 8021q. So the real `nic-agent` binary (NIC_AGENT_BIN,
stripped, with every library `ldd` names) is copied into the guest's initramfs
and serves the libvirt test driver there (`--connect test:///<fixtures/lab-node.xml
copied into the guest> --host-network on`): the domains are the test driver's,
the links are the guest kernel's. iproute2's `ip` (with its libraries) goes in
too, as /sbin/ip, because busybox's `ip` cannot add links or show VLAN details.

The wiring, all made here and named lab-w*:

    host:  lab-wmgmt 10.77.161.1/24 + dnsmasq  <-  guest ethM (lease 10.77.161.x),
           the agent listens on 0.0.0.0:50061 in the guest; gRPC goes there
           lab-wtrunk 10.77.162.1/24 + dnsmasq <-  guest ethT, its lease flushed,
           made the one port of the guest's label bridge cloudbr1 (the trunk)

The test driver makes no taps, so after each successful VLAN NIC the test adds
a veth in the guest to br<ethT>-<N> to stand in for the NIC's tap.

What this proves (the agent's own code, its rollback and "in use" rule of
src/host/objects.rs, against real 8021q links):
  1. an attach refused by libvirt after the host was prepared (a duplicate
     user alias) rolls back the VLAN device and bridge it made; an MTU the
     trunk cannot carry is refused before anything is made;
  2. AttachNic vlan://100 on cloudbr1 builds ethT.100 (802.1Q id 100) in
     brethT-100, both marked with the agent alias and with IPv6 disabled
     (as modifyvlan.sh does);
  3. a second NIC on VLAN 100 reuses both (same ifindexes);
  4. a refused attach on another VM leaves them alone, also when that attach
     had to re-create the VLAN device itself (its rollback then asks the
     "in use" rule, and the stand-in taps on the bridge keep it);
  5. DetachNic cannot run on the test driver (UNIMPLEMENTED) and removes
     nothing; the removal of an unused VLAN bridge is proven through the
     start-up reconcile instead, which uses the same collector as detach: an
     agent restart forgets the test driver's NICs; the bridge stays while a
     stand-in tap is on it, and goes with its VLAN device once none is.
Not proven here: the removal on DetachNic itself (the test driver has no
detach), and traffic on the VLAN (test_e2e_vlan.py does that with the library).

Run as root: python3 tests/lab/test_e2e_vlan_agent.py
Env: NIC_AGENT_BIN (default target/debug/nic-agent), LAB_WORK, LAB_KEEP_GUEST.
Last line: `lab-vlan-agent: N passed, M failed, K skipped`.
"""
import os
import re
import shutil
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit as lk  # noqa: E402
from labkit import log, run, script, virsh, wait_until  # noqa: E402

PREFIX = "lab-w"
GUEST = "lab-w-g1"
GUEST_DIR = os.path.join(lk.WORK, "guest-vlan-agent")
EXTRA_DIR = os.path.join(lk.WORK, "vlan-agent-extra")
MGMT_BR, MGMT_SUBNET = "lab-wmgmt", 161
TRUNK_BR, TRUNK_SUBNET = "lab-wtrunk", 162
MGMT_MAC, TRUNK_MAC = "52:54:00:77:61:01", "52:54:00:77:62:01"
PORT = 50061
LABEL = "cloudbr1"
VLAN, FRESH_VLAN = 100, 101
# Two running pc domains of fixtures/lab-node.xml.
VM_A, VM_B = "i-2-10-VM", "i-3-20-VM"
AGENT = "/bin/nic-agent"
IP = "/sbin/ip"
FIXTURE = "/etc/nic-agent-lab/node.xml"
G_STATE, G_PERSIST = "/run/w-agent/state", "/run/w-agent/persist"
G_LOG, G_PID = "/run/w-agent.log", "/run/w-agent.pid"
AGENT_LOG_COPY = os.path.join(lk.WORK, "lab-w-agent.log")

T_START = time.monotonic()
TIMINGS = []


class VlanAgentE2E(unittest.TestCase):
    guest = None
    channel = None
    leftovers = []

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root")
        try:
            cls._setup()
        except BaseException:
            cls.dump()
            cls.tearDownClass()
            raise

    @classmethod
    def _setup(cls):
        cls.grpc, cls.pb, cls.rpc = lk.stubs()
        if not os.access(lk.BIN, os.X_OK):
            raise RuntimeError(f"{lk.BIN} is not an executable: cargo build, or set NIC_AGENT_BIN")
        script("start-libvirtd.sh")
        cls.cleanup_host()

        shutil.rmtree(EXTRA_DIR, ignore_errors=True)
        libs = lk.stage_binary(lk.BIN, EXTRA_DIR, AGENT)
        log(f"staged {AGENT} ({lk.BIN}) with {len(libs)} libraries")
        ip_bin = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
        libs = lk.stage_binary(ip_bin, EXTRA_DIR, IP)
        log(f"staged {IP} ({ip_bin}) with {len(libs)} libraries")
        fx = os.path.join(EXTRA_DIR, FIXTURE.lstrip("/"))
        os.makedirs(os.path.dirname(fx), exist_ok=True)
        shutil.copy(os.path.join(lk.ROOT, "fixtures", "lab-node.xml"), fx)
        t0 = time.monotonic()
        # bridge and veth are modules in the cloud kernel; 8021q is standard.
        run(["bash", os.path.join(lk.LAB_DIR, "build-guest.sh"), GUEST_DIR, EXTRA_DIR],
            timeout=900, env={"LAB_EXTRA_MODULES": "bridge veth"})
        size = os.path.getsize(os.path.join(GUEST_DIR, "initrd.img"))
        TIMINGS.append(f"build-guest (initrd {size} bytes): {time.monotonic() - t0:.2f}s")

        script("net.sh", "up", MGMT_BR, "--subnet", str(MGMT_SUBNET))
        script("net.sh", "up", TRUNK_BR, "--subnet", str(TRUNK_SUBNET))
        cls.guest = lk.Guest(GUEST, "pc", GUEST_DIR)
        # The agent and its libraries make a ~40 MB initramfs that unpacks to
        # ~100 MB: in 256 MiB the kernel's unpack fails ("write error").
        boot = cls.guest.define("--timeout", "180", "--memory", "768", timeout=240)
        TIMINGS.append(f"boot pc guest: {boot:.2f}s")

        cls.mgmt_if, lease = cls.plug(MGMT_MAC, MGMT_BR)
        if lease is None:
            raise RuntimeError("the management NIC got no lease")
        cls.guest_ip = lease.split("/")[0]
        cls.pif, _ = cls.plug(TRUNK_MAC, TRUNK_BR)
        # The label bridge (CloudStack's cloudbr1): the trunk NIC as its only
        # port, no address (the lease from the trunk's dnsmasq goes).
        cls.gok_cls(f"{IP} -4 addr flush dev {cls.pif} && "
                    f"{IP} link add {LABEL} type bridge && "
                    f"{IP} link set {cls.pif} master {LABEL} && {IP} link set {LABEL} up")
        cls.start_agent()

    @classmethod
    def plug(cls, mac, bridge):
        """Hot-plugs a virtio NIC into the guest with virsh; waits until its one
        DHCP try is over. Returns (guest ifname, lease or None)."""
        xml = os.path.join(GUEST_DIR, f"{GUEST}.{bridge}.xml")
        with open(xml, "w") as f:
            f.write(lk.nic_xml(mac, bridge))
        mark = cls.guest.console.mark()
        virsh("attach-device", GUEST, xml, "--live")
        name = cls.guest.console.wait(rf"LAB: nic-add name=(\S+) mac={mac}\b",
                                      after=mark).group(1)
        m = cls.guest.console.wait(rf"LAB: (dhcp|dhcp-fail) name={name} mac={mac}\b(?: ip=(\S+))?",
                                   timeout=40, after=mark)
        return name, m.group(2)

    @classmethod
    def gok_cls(cls, cmd, timeout=30):
        rc, out = cls.guest.exec(cmd, timeout=timeout)
        if rc != 0:
            raise RuntimeError(f"guest: {cmd!r} -> rc {rc}: {out}")
        return out

    @classmethod
    def start_agent(cls):
        """Starts the agent in the guest (in the background, its PID in G_PID)
        and connects to it from the host. The test driver's state lives in
        the agent's connection: a new agent starts from the fixture again."""
        if cls.channel is not None:
            cls.channel.close()
            cls.channel = None
        mark = cls.agent_log_len()
        t0 = time.monotonic()
        cls.gok_cls(
            f"mkdir -p {G_STATE} {G_PERSIST}; "
            f"RUST_LOG=info,nic_agent::lifecycle=debug {AGENT} serve --connect test://{FIXTURE} "
            f"--host-network on --listen 0.0.0.0:{PORT} --insecure "
            f"--state-dir {G_STATE} --persist-dir {G_PERSIST} --bridge-grace-s 0 "
            f"--reconcile-interval-s 0 --anti-spoofing off "
            f">>{G_LOG} 2>&1 </dev/null & echo $! >{G_PID}")
        wait_until(lambda: "nic-agent listening on" in cls.agent_log()[mark:], 120,
                   interval=0.5, what="the agent in the guest to listen")
        # The start-up reconcile's end: one debug line, or its repairs.
        wait_until(lambda: re.search(r"(INFO|DEBUG) \S+: reconcile: |reconcile failed",
                                     cls.agent_log()[mark:]),
                   120, interval=0.5, what="the agent's start-up reconcile")
        cls.channel = cls.grpc.insecure_channel(f"{cls.guest_ip}:{PORT}",
                                                options=[("grpc.enable_http_proxy", 0)])
        cls.grpc.channel_ready_future(cls.channel).result(timeout=30)
        cls.stub = cls.rpc.NicAgentStub(cls.channel)
        TIMINGS.append(f"agent start in the guest (to reconcile done): {time.monotonic() - t0:.2f}s")
        return mark

    @classmethod
    def stop_agent(cls):
        """SIGTERM to the agent's PID in the guest; waits until it is gone."""
        if cls.channel is not None:
            cls.channel.close()
            cls.channel = None
        cls.guest.exec(f"kill -TERM $(cat {G_PID})")
        wait_until(lambda: cls.guest.exec(f"test -d /proc/$(cat {G_PID})")[0] != 0, 30,
                   interval=0.5, what="the agent in the guest to exit")

    @classmethod
    def agent_log(cls):
        if cls.guest is None:
            return ""
        rc, out = cls.guest.exec(f"cat {G_LOG} 2>/dev/null; true", timeout=30)
        return out if rc == 0 else ""

    @classmethod
    def agent_log_len(cls):
        return len(cls.agent_log())

    @classmethod
    def dump(cls):
        if cls.guest is None:
            return
        log(f"--- {GUEST} console tail ---\n{cls.guest.console.text()[-3000:]}")
        log(f"--- agent log in the guest (tail) ---\n{cls.agent_log()[-6000:]}")

    @classmethod
    def cleanup_host(cls):
        """Removes what this file makes (also what an interrupted run left).
        Everything inside the guest goes with the guest."""
        script("teardown.sh", PREFIX, check=False)
        for br in (MGMT_BR, TRUNK_BR):
            script("net.sh", "down", br, check=False)

    @classmethod
    def tearDownClass(cls):
        if cls.channel is not None:
            cls.channel.close()
        if cls.guest is not None:
            # The agent's log lives in the guest: keep a copy for post-mortems.
            with open(AGENT_LOG_COPY, "w") as f:
                f.write(cls.agent_log())
            log(f"agent log of the guest copied to {AGENT_LOG_COPY}")
        if cls.guest is not None and os.environ.get("LAB_KEEP_GUEST"):
            log(f"kept {GUEST} (LAB_KEEP_GUEST)")
            return
        cls.cleanup_host()
        cls.leftovers = [n for n in (MGMT_BR, TRUNK_BR)
                         if run(["ip", "link", "show", "dev", n], check=False).returncode == 0]
        if virsh("dominfo", GUEST, check=False).returncode == 0:
            cls.leftovers.append(f"domain {GUEST}")

    def run(self, result=None):
        # The guest's console and the agent's log, once, for any failing test.
        before = len(result.failures) + len(result.errors) if result else 0
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            self.dump()
        return out

    # -- helpers

    def gok(self, cmd, timeout=30):
        rc, out = self.guest.exec(cmd, timeout=timeout)
        self.assertEqual(rc, 0, f"guest: {cmd!r} -> rc {rc}: {out}")
        return out

    def names(self, vlan):
        return f"{self.pif}.{vlan}", f"br{self.pif}-{vlan}"

    def links(self):
        """Guest link name -> ifindex (iproute2 in the guest)."""
        out = self.gok(f"{IP} -o link show")
        found = {}
        for line in out.splitlines():
            m = re.match(r"(\d+): ([^:@\s]+)", line)
            if m:
                found[m.group(2)] = int(m.group(1))
        return found

    def details(self, name):
        return self.gok(f"{IP} -d link show dev {name}")

    def attach(self, vm, mac, vlan=None, alias="", mtu=None):
        nic = self.pb.NicSpec(mac=mac, bridge=LABEL, alias=alias,
                              broadcast_uri=f"vlan://{vlan}" if vlan else "")
        if mtu:
            nic.mtu = mtu
        t0 = time.monotonic()
        try:
            return self.stub.AttachNic(self.pb.AttachNicRequest(vm=vm, nic=nic), timeout=60)
        finally:
            TIMINGS.append(f"  AttachNic {vm} {mac} vlan={vlan}: {time.monotonic() - t0:.2f}s")

    def refused(self, vm, mac, vlan, code, alias="", mtu=None):
        with self.assertRaises(self.grpc.RpcError) as cm:
            self.attach(vm, mac, vlan, alias=alias, mtu=mtu)
        e = cm.exception
        log(f"refused {vm} {mac} vlan={vlan}: {e.code().name}: {e.details()}")
        self.assertEqual(e.code(), code, e.details())
        return e

    def stand_in_tap(self, name, vlan):
        """A veth in the VLAN bridge, for the tap the test driver does not make."""
        _, br = self.names(vlan)
        self.gok(f"{IP} link add {name} type veth peer name {name}p && "
                 f"{IP} link set {name} master {br} && {IP} link set {name} up && "
                 f"{IP} link set {name}p up")

    def assert_built(self, vlan):
        """The kernel's view in the guest: the 802.1Q device on the trunk NIC
        with id `vlan`, enslaved to its bridge, both with the agent's alias."""
        dev, br = self.names(vlan)
        d = self.details(dev)
        log(f"guest: {IP} -d link show dev {dev}\n{d.rstrip()}")
        self.assertRegex(d, rf"\d+: {re.escape(dev)}@{self.pif}: .*\bmaster {re.escape(br)}\b")
        self.assertRegex(d, rf"\bvlan protocol 802\.1Q id {vlan}\b")
        self.assertRegex(d, r"(?m)^\s+alias nic-agent$")
        b = self.details(br)
        log(f"guest: {IP} -d link show dev {br}\n{b.rstrip()}")
        self.assertRegex(b, r"\bbridge forward_delay\b")
        self.assertRegex(b, r"(?m)^\s+alias nic-agent$")
        self.assertRegex(self.gok("cat /proc/net/vlan/config"),
                         rf"(?m)^{re.escape(dev)}\s*\|\s*{vlan}\s*\|\s*{self.pif}\s*$")
        # IPv6 off on both, as CloudStack's modifyvlan.sh does.
        for name in (dev, br):
            self.assertEqual(self.gok(f"cat /proc/sys/net/ipv6/conf/{name}/disable_ipv6").strip(),
                             "1", f"IPv6 is on on {name}")

    def assert_log_order(self, mark, wanted):
        """The agent's log since `mark` has each of `wanted`, in this order."""
        text = self.agent_log()[mark:]
        at = 0
        for w in wanted:
            i = text.find(w, at)
            self.assertGreaterEqual(i, 0, f"{w!r} not in the agent's log after {text[at:at + 200]!r}")
            at = i + len(w)
        return text

    def ports_of(self, br):
        out = self.gok(f"{IP} -o link show master {br}")
        return sorted(m.group(1) for m in re.finditer(r"^\d+: ([^:@\s]+)", out, re.M))

    # -- tests

    def test_1_refused_attach_rolls_back_the_vlan_device_and_bridge_it_made(self):
        dev, br = self.names(FRESH_VLAN)
        before = self.links()
        self.assertNotIn(br, before)
        mark = self.agent_log_len()
        # libvirt refuses a second NIC with the same user alias, after the host
        # side (dev in br) was built: the rollback must take both away.
        self.attach(VM_A, "02:00:0d:16:01:01", alias="ua-w-dup")
        e = self.refused(VM_A, "02:00:0d:16:01:02", FRESH_VLAN,
                         self.grpc.StatusCode.INVALID_ARGUMENT, alias="ua-w-dup")
        self.assertIn("ua-w-dup", e.details())
        after = self.links()
        self.assertNotIn(dev, after, "orphaned VLAN device")
        self.assertNotIn(br, after, "orphaned VLAN bridge")
        self.assertEqual(after, before, "the refused attach left links behind")
        self.assertNotIn(dev, self.gok("cat /proc/net/vlan/config"))
        # Not vacuous: the agent did build both before libvirt refused, and
        # its rollback removed them (the agent's log, in this order).
        self.assert_log_order(mark, [f'created segment device link="{dev}"',
                                     f'created bridge bridge="{br}"',
                                     "non unique alias detected",
                                     f"removed segment device link={dev}",
                                     f"removed unused bridge bridge={br}"])
        # An MTU the trunk (1500) cannot carry is refused before anything is made.
        e = self.refused(VM_A, "02:00:0d:16:01:03", FRESH_VLAN,
                         self.grpc.StatusCode.FAILED_PRECONDITION, mtu=9000)
        self.assertIn("9000", e.details())
        self.assertEqual(self.links(), before, "the MTU refusal left links behind")

    def test_2_vlan_attach_builds_the_8021q_device_in_its_bridge(self):
        dev, br = self.names(VLAN)
        self.assertNotIn(br, self.links())
        r = self.attach(VM_A, "02:00:0d:16:00:01", VLAN)
        self.assertEqual(r.nic.bridge, br, str(r))
        self.assert_built(VLAN)
        self.assertEqual(self.ports_of(br), [dev])
        # The label bridge still holds the trunk, and nothing else moved.
        self.assertEqual(self.ports_of(LABEL), [self.pif])
        self.stand_in_tap("lab-wa1", VLAN)
        self.assertEqual(self.ports_of(br), sorted([dev, "lab-wa1"]))

    def test_3_second_nic_on_the_same_vlan_reuses_them(self):
        dev, br = self.names(VLAN)
        before = self.links()
        self.assertIn(br, before, "test_2 must have built the bridge")
        r = self.attach(VM_A, "02:00:0d:16:00:02", VLAN)
        self.assertEqual(r.nic.bridge, br)
        after = self.links()
        self.assertEqual((after[dev], after[br]), (before[dev], before[br]),
                         "the second NIC re-created the VLAN device or bridge")
        self.assertEqual(after, before)
        self.assert_built(VLAN)
        self.stand_in_tap("lab-wa2", VLAN)
        nics = self.stub.ListNics(self.pb.ListNicsRequest(vm=VM_A), timeout=30).nics
        self.assertEqual(sorted(n.mac for n in nics if n.bridge == br),
                         ["02:00:0d:16:00:01", "02:00:0d:16:00:02"])

    def test_4_rollback_on_another_vm_keeps_them_while_in_use(self):
        dev, br = self.names(VLAN)
        ports = sorted([dev, "lab-wa1", "lab-wa2"])
        self.assertEqual(self.ports_of(br), ports)
        before = self.links()
        self.attach(VM_B, "02:00:0d:16:02:01", alias="ua-w-b")
        # (a) The bridge and device are there: VM_B's plan makes no link, and
        # its rollback must not take the shared ones.
        mark = self.agent_log_len()
        self.refused(VM_B, "02:00:0d:16:02:02", VLAN,
                     self.grpc.StatusCode.INVALID_ARGUMENT, alias="ua-w-b")
        text = self.assert_log_order(mark, ["non unique alias detected"])
        for verb in ("created ", "removed "):
            self.assertNotIn(verb, text, "the refused attach changed host links")
        self.assertEqual(self.links(), before)
        self.assertEqual(self.ports_of(br), ports)
        # (b) The VLAN device was lost (deleted behind the agent's back): the
        # refused attach re-creates it, so its rollback runs the "in use"
        # rule on the bridge, which the stand-in taps (and VM_A's NICs in
        # the domain XML) keep. The device stays in its bridge.
        self.gok(f"{IP} link del dev {dev}")
        self.assertNotIn(dev, self.links())
        mark = self.agent_log_len()
        self.refused(VM_B, "02:00:0d:16:02:03", VLAN,
                     self.grpc.StatusCode.INVALID_ARGUMENT, alias="ua-w-b")
        after = self.links()
        self.assertIn(br, after)
        self.assertEqual(after[br], before[br], "the bridge was re-created")
        self.assertIn(dev, after, "the rollback removed the VLAN device of a bridge in use")
        self.assertNotEqual(after[dev], before[dev], "the refused attach did not re-create it")
        text = self.assert_log_order(mark, [f'created segment device link="{dev}"',
                                            "non unique alias detected"])
        self.assertNotIn("removed ", text, "the rollback removed something")
        self.assert_built(VLAN)
        self.assertEqual(self.ports_of(br), ports)

    def test_5_detach_is_unsupported_here_and_the_reconcile_removes_the_unused_bridge(self):
        dev, br = self.names(VLAN)
        # DetachNic's removal of the bridge cannot run: the test driver has
        # no detach. The agent says so and changes nothing.
        with self.assertRaises(self.grpc.RpcError) as cm:
            self.stub.DetachNic(self.pb.DetachNicRequest(vm=VM_A, mac="02:00:0d:16:00:02"),
                                timeout=60)
        self.assertEqual(cm.exception.code(), self.grpc.StatusCode.UNIMPLEMENTED,
                         cm.exception.details())
        self.assertIn(br, self.links())
        # A new agent has a new test-driver connection: the fixture again,
        # without this suite's NICs. Only the stand-in taps use the bridge
        # now, and the start-up reconcile (the collector detach uses) keeps it.
        self.stop_agent()
        mark = self.start_agent()
        nics = self.stub.ListNics(self.pb.ListNicsRequest(vm=VM_A), timeout=30).nics
        self.assertFalse([n for n in nics if n.bridge == br], "the test driver kept NICs")
        self.assertNotIn(f"removed unused bridge {br}", self.agent_log()[mark:])
        self.assert_built(VLAN)
        self.assertEqual(self.ports_of(br), sorted([dev, "lab-wa1", "lab-wa2"]))
        # The last stand-in tap goes: nothing uses the bridge; the next
        # start-up reconcile removes it and its VLAN device.
        self.gok(f"{IP} link del dev lab-wa1 && {IP} link del dev lab-wa2")
        self.stop_agent()
        mark = self.start_agent()
        text = self.agent_log()[mark:]
        self.assertIn(f"reconcile: removed unused bridge {br}", text)
        after = self.links()
        self.assertNotIn(br, after)
        self.assertNotIn(dev, after)
        self.assertNotIn(dev, self.gok("cat /proc/net/vlan/config"))
        # The label bridge and its trunk are not the agent's: they stay.
        self.assertEqual(self.ports_of(LABEL), [self.pif])


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        lk.BIN = sys.argv.pop(1)
    result = unittest.main(exit=False, verbosity=2).result
    for t in TIMINGS:
        print(f"timing: {t}")
    print(f"timing: total {time.monotonic() - T_START:.2f}s")
    leftovers = VlanAgentE2E.leftovers
    if leftovers:
        print(f"cleanup FAILED, left: {', '.join(leftovers)}")
    status = lk.finish("test_e2e_vlan_agent", result, label="lab-vlan-agent")
    sys.exit(1 if leftovers else status)
