"""The agent's Linux-bridge VLAN path, for real, inside a lab guest.

Why inside a guest: this host's kernel has no 8021q, so here the agent can only
prove that a VLAN attach fails cleanly (FAILED_PRECONDITION). The lab guest's
Debian kernel has 8021q, so the library's own code (NetlinkHost::resolve and
prepare, then the undo steps) runs in the guest through examples/vlan_probe.rs,
copied into the guest's initramfs with its shared libraries.

The wiring, all made here and named lab-v*:

    guest: cloudbr1 <- eth0 (trunk) ; eth0.100 -> breth0-100 10.77.151.2/24
             |  802.1Q tagged frames
    host:  OVS lab-vovs (userspace datapath): the guest's tap as a trunk port
           (no tag), internal port lab-vv100 tag=100 with 10.77.151.1/24

VLAN 100 exists on the host side only through OVS (no 8021q here). So a ping
from the guest's breth0-100 to 10.77.151.1 proves that eth0.100 sends and
receives frames tagged 100; the same probe on VLAN 200 must not reach it.

Run as root: python3 tests/lab/test_e2e_vlan.py
Env: VLAN_PROBE_BIN (a prebuilt probe; default: cargo build --release
--example vlan_probe), LAB_WORK.
Last line: `lab-vlan: N passed, M failed`.
"""
import os
import re
import shutil
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit  # noqa: E402
from labkit import log, run, script, virsh, wait_until  # noqa: E402

PREFIX = "lab-v"
GUEST = "lab-v-g1"
GUEST_DIR = os.path.join(labkit.WORK, "guest-vlan")
EXTRA_DIR = os.path.join(labkit.WORK, "vlan-extra")
OVS_BR, OVS_PORT = "lab-vovs", "lab-vv100"
SUBNET, VLAN, OTHER_VLAN = 151, 100, 200
HOST_IP, GUEST_CIDR = f"10.77.{SUBNET}.1", f"10.77.{SUBNET}.2/24"
MAC = "52:54:00:77:51:01"
LABEL, PIF = "cloudbr1", "eth0"
PROBE = "/bin/vlan_probe"
PROBE_BIN = os.environ.get(
    "VLAN_PROBE_BIN", os.path.join(labkit.ROOT, "target", "release", "examples", "vlan_probe"))

TIMINGS = []
T_START = time.monotonic()


def link_exists(name):
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def ovs(*args, check=True):
    return run(["ovs-vsctl", "--timeout=10", *args], check=check).stdout.strip()


def fdb_vlans(mac):
    """VLANs on which the host's OVS bridge has learned MAC (`ovs-appctl fdb/show`)."""
    out = run(["ovs-appctl", "fdb/show", OVS_BR]).stdout
    vlans = set()
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) >= 3 and f[2].lower() == mac:
            vlans.add(int(f[1]))
    return vlans


class VlanE2E(unittest.TestCase):
    guest = None

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root")
        try:
            cls._setup()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _setup(cls):
        script("start-libvirtd.sh")
        script("start-ovs.sh")
        cls.cleanup_host()
        if "VLAN_PROBE_BIN" not in os.environ:
            t0 = time.monotonic()
            run(["cargo", "build", "--release", "--example", "vlan_probe", "--manifest-path",
                 os.path.join(labkit.ROOT, "Cargo.toml")], timeout=1800,
                env={"CARGO_TARGET_DIR": os.path.join(labkit.ROOT, "target")})
            TIMINGS.append(f"cargo build --release --example vlan_probe: {time.monotonic() - t0:.2f}s")
        shutil.rmtree(EXTRA_DIR, ignore_errors=True)
        libs = labkit.stage_binary(PROBE_BIN, EXTRA_DIR, PROBE)
        log(f"staged {PROBE} with {', '.join(libs)}")
        t0 = time.monotonic()
        # The cloud kernel has the bridge as a module; 8021q is standard.
        run(["bash", os.path.join(labkit.LAB_DIR, "build-guest.sh"), GUEST_DIR, EXTRA_DIR],
            timeout=600, env={"LAB_EXTRA_MODULES": "bridge"})
        size = os.path.getsize(os.path.join(GUEST_DIR, "initrd.img"))
        TIMINGS.append(f"build-guest (initrd {size} bytes): {time.monotonic() - t0:.2f}s")

        # Host side: VLAN 100 through OVS only.
        ovs("--may-exist", "add-br", OVS_BR, "--", "set", "bridge", OVS_BR,
            "datapath_type=netdev")
        # add-br without netdev prints an error but exits 0: check for real.
        if ovs("get", "bridge", OVS_BR, "datapath_type") != "netdev":
            raise RuntimeError(f"{OVS_BR} is not on the netdev datapath")
        ovs("--may-exist", "add-port", OVS_BR, OVS_PORT, f"tag={VLAN}", "--",
            "set", "interface", OVS_PORT, "type=internal")
        wait_until(lambda: link_exists(OVS_PORT), 10, what=f"{OVS_PORT} to appear")
        run(["ip", "addr", "replace", f"{HOST_IP}/24", "dev", OVS_PORT])
        run(["ip", "link", "set", "dev", OVS_PORT, "up"])

        cls.guest = labkit.Guest(GUEST, "pc", GUEST_DIR)
        boot = cls.guest.define("--timeout", "120", timeout=180)
        TIMINGS.append(f"boot pc guest (define-guest.sh to 'LAB: boot ok'): {boot:.2f}s")
        boot_line = cls.guest.console.wait(r"LAB: boot ok .* t=(\S+)")
        TIMINGS.append(f"guest uptime at 'boot ok': {boot_line.group(1)}s")

        # A trunk port: an OVS virtualport with no <vlan>, so every tag passes.
        xml = os.path.join(GUEST_DIR, f"{GUEST}.nic.xml")
        with open(xml, "w") as f:
            f.write(f"<interface type='bridge'><mac address='{MAC}'/>"
                    f"<source bridge='{OVS_BR}'/><virtualport type='openvswitch'/>"
                    f"<model type='virtio'/><driver name='qemu'/></interface>")
        mark = cls.guest.console.mark()
        virsh("attach-device", GUEST, xml, "--live")
        m = cls.guest.console.wait(rf"LAB: nic-add name=(\S+) mac={MAC}\b", after=mark)
        cls.ifname = m.group(1)
        # Its one untagged DHCP try must be over before eth0 joins a bridge.
        cls.guest.console.wait(rf"LAB: (dhcp|dhcp-fail) name={cls.ifname} mac={MAC}\b",
                               timeout=40, after=mark)
        cls.tap = next(line.split()[0] for line in cls.guest.iflist().splitlines()
                       if MAC in line)

    @classmethod
    def cleanup_host(cls):
        """Removes what this file makes (also what an interrupted run left)."""
        script("teardown.sh", PREFIX, check=False)
        run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-br", OVS_BR], check=False)

    @classmethod
    def tearDownClass(cls):
        if cls.guest is not None and os.environ.get("LAB_KEEP_GUEST"):
            log(f"kept {GUEST} (LAB_KEEP_GUEST)")
            return
        cls.cleanup_host()
        cls.leftovers = [n for n in (OVS_BR, OVS_PORT) if link_exists(n)]
        if virsh("dominfo", GUEST, check=False).returncode == 0:
            cls.leftovers.append(f"domain {GUEST}")

    # -- helpers

    def gexec(self, cmd, timeout=20):
        return self.guest.exec(cmd, timeout=timeout)

    def gok(self, cmd, timeout=20):
        rc, out = self.gexec(cmd, timeout)
        self.assertEqual(rc, 0, f"guest: {cmd!r} -> rc {rc}: {out}")
        return out

    def start_probe(self, vlan, tag):
        """Starts `vlan_probe --keep` in the background in the guest, its stdin a
        FIFO held open by a `sleep` (stdin EOF is one way to release it), and
        waits for it to be ready. Returns the probe's log path."""
        logf, fifo = f"/run/vp.{tag}.log", f"/run/vp.{tag}.in"
        cmd = (f"rm -f {fifo} {logf}; mkfifo {fifo}; "
               f"( {PROBE} --label {LABEL} --pif {self.ifname} --vlan {vlan} "
               f"--ip {GUEST_CIDR} --keep <{fifo} & echo $! >/run/vp.{tag}.pid; wait $!; "
               f"echo \"VLANPROBE-EXIT rc=$?\" ) >{logf} 2>&1 & "
               f"sleep 3600 >{fifo} 2>/dev/null & echo $! >/run/vp.{tag}.hold")
        t0 = time.monotonic()
        self.gok(cmd)
        out = wait_until(lambda: (lambda o: o if re.search(r"VLANPROBE: ready|VLANPROBE-EXIT", o)
                                  else None)(self.gexec(f"cat {logf}")[1]),
                         60, interval=0.5, what=f"probe vlan {vlan} ready")
        self.assertIn("VLANPROBE: ready", out, f"probe vlan {vlan} did not get ready:\n{out}")
        TIMINGS.append(f"  probe vlan {vlan}: start -> ready {time.monotonic() - t0:.2f}s")
        dev, br = f"{self.ifname}.{vlan}", f"br{self.ifname}-{vlan}"
        self.assertIn(f"VLANPROBE: created dev={dev} bridge={br} vlan={vlan}", out)
        self.assertIn(f"VLANPROBE: verified dev={dev} id={vlan} parent={self.ifname} "
                      f"master={br} alias=nic-agent", out)
        return logf

    def stop_probe(self, logf, how):
        """Releases the probe by SIGTERM or by closing its stdin; returns its log."""
        tag = logf.split(".")[1]
        if how == "SIGTERM":
            self.gok(f"kill -TERM $(cat /run/vp.{tag}.pid)")
        self.gok(f"kill $(cat /run/vp.{tag}.hold) 2>/dev/null; true")
        out = wait_until(lambda: (lambda o: o if "VLANPROBE-EXIT" in o else None)(
            self.gexec(f"cat {logf}")[1]), 30, interval=0.5, what="probe to exit")
        log(f"probe log {logf}:\n{out.strip()}")
        return out

    def assert_guest_vlan_built(self, vlan):
        """Kernel view in the guest, independent of the probe: the 8021q
        device on eth0 with the VLAN id, enslaved in br<pif>-<vlan>."""
        dev, br = f"{self.ifname}.{vlan}", f"br{self.ifname}-{vlan}"
        config = self.gok("cat /proc/net/vlan/config")
        self.assertRegex(config, rf"(?m)^{re.escape(dev)}\s*\|\s*{vlan}\s*\|\s*{self.ifname}\s*$")
        master = self.gok(f"readlink /sys/class/net/{dev}/master").strip()
        self.assertEqual(master.rsplit("/", 1)[-1], br, f"{dev} master")
        self.gok(f"test -d /sys/class/net/{br}/bridge")
        self.assertEqual(self.gok(f"cat /sys/class/net/{dev}/ifalias").strip(), "nic-agent")
        link = self.gok(f"ip link show {dev}")
        self.assertRegex(link, rf"{re.escape(dev)}@{self.ifname}:.*\bmaster {re.escape(br)}\b")
        self.assertIn(GUEST_CIDR, self.gok(f"ip addr show {br}"))
        log(f"guest /proc/net/vlan/config:\n{config.strip()}\nguest: {link.strip()}")
        # The label bridge holds the trunk.
        lm = self.gok(f"readlink /sys/class/net/{self.ifname}/master").strip()
        self.assertEqual(lm.rsplit("/", 1)[-1], LABEL)

    def assert_released_clean(self, out, vlan, why):
        dev, br = f"{self.ifname}.{vlan}", f"br{self.ifname}-{vlan}"
        self.assertIn(f"VLANPROBE: releasing ({why})", out)
        self.assertIn("VLANPROBE: undone", out)
        self.assertIn(f"VLANPROBE: clean dev={dev} bridge={br} label_removed=true", out)
        self.assertIn("VLANPROBE-EXIT rc=0", out, out)
        links = self.gok("ls /sys/class/net").split()
        for gone in (dev, br, LABEL):
            self.assertNotIn(gone, links, f"{gone} left in the guest after undo")
        self.assertIn(self.ifname, links)
        self.assertNotIn(dev, self.gok("cat /proc/net/vlan/config"))

    # -- tests

    def test_1_vlan_100_device_in_its_bridge_reaches_host_vlan_100_then_undo_is_clean(self):
        t0 = time.monotonic()
        # The host side of the trunk: no tag on the guest's port.
        self.assertEqual(ovs("port-to-br", self.tap), OVS_BR)
        self.assertEqual(ovs("get", "port", self.tap, "tag"), "[]")
        logf = self.start_probe(VLAN, "v100")
        try:
            self.assert_guest_vlan_built(VLAN)
            tp = time.monotonic()
            rc, out = self.gexec(f"ping -c 2 -W 3 {HOST_IP}", timeout=20)
            TIMINGS.append(f"  ping vlan {VLAN}: {time.monotonic() - tp:.2f}s")
            log(f"guest ping on VLAN {VLAN}:\n{out.strip()}")
            self.assertEqual(rc, 0, f"guest VLAN {VLAN} -> {HOST_IP} failed: {out}")
            self.assertRegex(out, r"2 packets transmitted, 2 packets received")
            # OVS saw the guest's frames tagged 100 on the trunk.
            self.assertIn(VLAN, fdb_vlans(MAC), "OVS did not learn the guest MAC on VLAN 100")
        finally:
            out = self.stop_probe(logf, "SIGTERM")
        self.assert_released_clean(out, VLAN, "SIGTERM")
        TIMINGS.append(f"test_1 total: {time.monotonic() - t0:.2f}s")

    def test_2_vlan_200_cannot_reach_host_vlan_100(self):
        t0 = time.monotonic()
        logf = self.start_probe(OTHER_VLAN, "v200")
        try:
            self.assert_guest_vlan_built(OTHER_VLAN)
            rc, out = self.gexec(f"ping -c 2 -W 2 {HOST_IP}", timeout=20)
            log(f"guest ping on VLAN {OTHER_VLAN} (must fail):\n{out.strip()}")
            self.assertNotEqual(rc, 0, f"VLAN {OTHER_VLAN} reached VLAN {VLAN}'s host: {out}")
            self.assertRegex(out, r"2 packets transmitted, 0 packets received")
            # Not vacuous: the frames did leave the guest, tagged 200.
            self.assertIn(OTHER_VLAN, fdb_vlans(MAC),
                          "OVS never saw the guest's VLAN 200 frames")
        finally:
            out = self.stop_probe(logf, "stdin")
        self.assert_released_clean(out, OTHER_VLAN, "stdin closed")
        TIMINGS.append(f"test_2 total: {time.monotonic() - t0:.2f}s")

    def test_3_bad_input_fails_with_the_reason_and_leaves_nothing(self):
        before = self.gok("ls /sys/class/net").split()
        cases = [
            (f"--pif {self.ifname} --vlan 4095", r"invalid vlan \"4095\": allowed 1-4094"),
            ("--pif eth9 --vlan 100", r"link eth9 does not exist"),
            (f"--pif {self.ifname} --vlan 100 --ip 10.77.151.2", r"needs a /prefix"),
        ]
        for args, why in cases:
            ip = "" if "--ip" in args else f"--ip {GUEST_CIDR}"
            rc, out = self.gexec(f"{PROBE} --label {LABEL} {args} {ip}")
            self.assertEqual(rc, 1, f"{args}: {out}")
            self.assertRegex(out, rf"VLANPROBE: error: .*{why}", args)
            self.assertEqual(self.gok("ls /sys/class/net").split(), before,
                             f"{args} left links behind")


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    leftovers = getattr(VlanE2E, "leftovers", [])
    for t in TIMINGS:
        print(f"timing: {t}")
    print(f"timing: total {time.monotonic() - T_START:.2f}s")
    if leftovers:
        print(f"cleanup FAILED, left: {', '.join(leftovers)}")
    status = labkit.finish("test_e2e_vlan", result, label="lab-vlan")
    sys.exit(1 if leftovers else status)
