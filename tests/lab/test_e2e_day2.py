"""Day-2 operations end to end on qemu:///system, proven from inside guests.

UpdateNic (link down/up seen as carrier changes by the guest, never an
unplug; bandwidth written to a stopped VM's persistent definition by real
libvirt; live bandwidth refused FAILED_PRECONDITION naming sch_sfq/act_police
where this kernel lacks them), MoveNic between two running guests (nic-remove in A, nic-add and a
DHCP lease in B) and a refused move that leaves the NIC back on A, and the
policy routing printed by `nic-agent guest-config`, run inside a guest with
two NICs on two bridges, and its udhcpc hook following a DHCP lease (test 7:
the busybox guest runs the hook guest-config renders on a hot-plugged second
NIC; the rule `from <lease> lookup 101` appears, and echo replies to requests
arriving on that NIC leave through it, counted by the guest's tx counters;
on release the rule and the table go).

Bridges lab-cbr1 (10.77.31.0/24) and lab-cbr2 (10.77.32.0/24), each with its
own dnsmasq; guests lab-c-*, at most two running at once. Everything is
removed at the end, also on failure. Traffic goes only to the two bridges'
own addresses and, in test 7, from lab-cbr1's address to a lab guest on
lab-cbr2 (the host has no ping binary: raw ICMP from Python).

Run (root): python3 tests/lab/test_e2e_day2.py
Env: NIC_AGENT_BIN (default target/debug/nic-agent), LAB_WAIT (poll bound, s, default 20).
"""
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit as lk  # noqa: E402

grpc, pb, rpc = lk.stubs()

PREFIX = "lab-c"
BR1, NET1 = "lab-cbr1", 31
BR2, NET2 = "lab-cbr2", 32
OUT = os.path.join(lk.WORK, "guest")
WAIT = float(os.environ.get("LAB_WAIT", "20"))
RPC_TIMEOUT = 90
AGENT_LOG = os.path.join(lk.WORK, "lab-c-agent.stderr.log")
# A guest reports a NIC change within about 0.6 s; nothing after this long
# means nothing happened.
NO_EVENT_WINDOW = 2.0
STATE = {"agent": None, "cleaned": False}


def mac(test, n):
    return f"52:54:00:c2:{test:02x}:{n:02x}"


def _icmp_checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def host_ping(src, dst, count, timeout=2.0):
    """ICMP echo from the host's address src to dst, one at a time (each
    waits up to `timeout` s for its reply); returns how many were answered.
    Raw ICMP from Python because the lab host has no ping binary."""
    ident = (os.getpid() ^ int(time.monotonic() * 1000)) & 0xFFFF
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        s.bind((src, 0))
        answered = 0
        for seq in range(count):
            payload = b"nic-agent-lab-day2-%04d" % seq
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            pkt = struct.pack("!BBHHH", 8, 0, _icmp_checksum(hdr + payload), ident, seq) + payload
            s.sendto(pkt, (dst, 0))
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                s.settimeout(left)
                try:
                    data, addr = s.recvfrom(2048)
                except socket.timeout:
                    break
                ihl = (data[0] & 0x0F) * 4
                if len(data) < ihl + 8 or addr[0] != dst:
                    continue
                typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if typ == 0 and rid == ident and rseq == seq:
                    answered += 1
                    break
        return answered
    finally:
        s.close()


def cleanup_all():
    if STATE["cleaned"]:
        return
    STATE["cleaned"] = True
    if STATE["agent"] is not None:
        STATE["agent"].stop()
    lk.script("teardown.sh", PREFIX, check=False)
    for br in (BR1, BR2):
        lk.script("net.sh", "down", br, check=False)


class Day2E2E(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            lk.script("start-libvirtd.sh")
            lk.script("build-guest.sh", OUT, timeout=600)
            lk.script("teardown.sh", PREFIX)
            lk.script("net.sh", "up", BR1, "--subnet", str(NET1))
            lk.script("net.sh", "up", BR2, "--subnet", str(NET2))
            STATE["agent"] = lk.Agent(AGENT_LOG, "--host-network", "off")
            cls.stub = STATE["agent"].stub
            cls.a = lk.Guest(f"{PREFIX}-a", "pc", OUT)
            cls.b = lk.Guest(f"{PREFIX}-b", "pc", OUT)
            for g in (cls.a, cls.b):
                g.define()
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
            for g in (self.a, self.b, *getattr(self, "more_guests", ())):
                lab = [l for l in g.console.lines() if "LAB:" in l]
                sys.stderr.write(f"== {g.name} LAB lines ==\n" + "\n".join(lab[-30:]) + "\n")
            try:
                with open(AGENT_LOG, encoding="utf-8", errors="replace") as f:
                    sys.stderr.write("== agent stderr (tail) ==\n" + "".join(f.readlines()[-40:]))
            except FileNotFoundError:
                pass

    # ---- helpers -------------------------------------------------------

    def attach(self, vm, m, bridge=BR1, **spec):
        return self.stub.AttachNic(
            pb.AttachNicRequest(vm=vm, nic=pb.NicSpec(mac=m, bridge=bridge, **spec)),
            timeout=RPC_TIMEOUT)

    def update(self, vm, m, **kw):
        return self.stub.UpdateNic(pb.UpdateNicRequest(vm=vm, mac=m, **kw), timeout=RPC_TIMEOUT)

    def move(self, src, dst, m):
        return self.stub.MoveNic(pb.MoveNicRequest(from_vm=src, to_vm=dst, mac=m),
                                 timeout=RPC_TIMEOUT)

    def nics(self, vm):
        return {n.mac.lower(): n for n in
                self.stub.ListNics(pb.ListNicsRequest(vm=vm), timeout=RPC_TIMEOUT).nics}

    def wait_add(self, g, m, after):
        hit = g.console.wait(rf"LAB: nic-add name=(\S+) mac={m} ", timeout=WAIT, after=after)
        return hit.group(1)

    def wait_lease(self, g, ifname, m, after, net):
        hit = g.console.wait(rf"LAB: (dhcp|dhcp-fail) name={ifname} mac={m}(?: ip=(\S+))?",
                             timeout=WAIT, after=after)
        self.assertEqual(hit.group(1), "dhcp", hit.group(0))
        ip = hit.group(2).split("/")[0]
        self.assertTrue(ip.startswith(f"10.77.{net}."), ip)
        return ip

    def ifindex(self, g, m):
        """The guest kernel's ifindex of the NIC with MAC m (0 when absent)."""
        rc, out = g.exec("for d in /sys/class/net/*; do echo $(cat $d/address) $(cat $d/ifindex); done")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].lower() == m:
                return int(parts[1])
        return 0

    def assert_no_line(self, g, regex, after, what):
        deadline = time.monotonic() + NO_EVENT_WINDOW
        while time.monotonic() < deadline:
            self.assertEqual(g.console.find(regex, after), [], what)
            time.sleep(0.1)

    # ---- tests ---------------------------------------------------------

    def test_1_update_link_down_and_up_is_seen_as_carrier_without_unplug(self):
        g, m = self.a, mac(1, 1)
        mark = g.console.mark()
        self.attach(g.name, m)
        ifname = self.wait_add(g, m, mark)
        g.console.wait(rf"LAB: carrier name={ifname} mac={m} state=up", timeout=WAIT, after=mark)
        tap = self.nics(g.name)[m].target_dev

        for n, (down, state) in enumerate(((True, "down"), (False, "up"))):
            with self.subTest(link=state):
                mark_l = g.console.mark()
                r = self.update(g.name, m, link_down=down)
                self.assertEqual(r.nic.link_state, state)
                self.assertEqual(r.nic.mac.lower(), m)
                self.assertTrue(r.nic.in_live and r.nic.in_config, r.nic)
                self.assertEqual(r.nic.target_dev, tap, "same device, not a new one")
                g.console.wait(rf"LAB: carrier name={ifname} mac={m} state={state}",
                               timeout=WAIT, after=mark_l)
                # libvirt's own view, live and persistent.
                live = lk.virsh("domif-getlink", g.name, m).stdout
                self.assertIn(state, live)
                inactive = lk.virsh("dumpxml", "--inactive", g.name).stdout
                iface = re.search(rf"<interface[^>]*>(?:(?!</interface>).)*{m}.*?</interface>",
                                  inactive, re.S)
                self.assertIsNotNone(iface, inactive)
                if down:
                    self.assertIn("<link state='down'/>", iface.group(0))
                else:
                    self.assertNotIn("state='down'", iface.group(0))
        # Never unplugged.
        self.assert_no_line(g, rf"LAB: nic-remove name=\S+ mac={m}", mark, "NIC was unplugged")
        self.assertEqual(len(g.console.find(rf"LAB: nic-add name=\S+ mac={m}", mark)), 1)

        # Unknown MAC: NOT_FOUND, nothing changes.
        with self.assertRaises(grpc.RpcError) as cm:
            self.update(g.name, mac(1, 0x99), link_down=True)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_2_update_bandwidth_of_a_stopped_vm_reaches_libvirts_config(self):
        # The lab kernel has no tc sfq/police, so live <bandwidth> cannot be
        # applied here; the persistent definition proves the XML real
        # libvirt accepts from the rewrite.
        off = lk.Guest(f"{PREFIX}-off", "pc", OUT)
        off.define("--no-start")
        try:
            m = mac(2, 1)
            r = self.attach(off.name, m)
            self.assertEqual(r.applied, "config")
            r = self.update(off.name, m, inbound=pb.Bandwidth(average_kbps=1000, peak_kbps=2000),
                            outbound=pb.Bandwidth(rate_mbps=8), link_down=True)
            self.assertEqual(r.nic.link_state, "down")
            x = lk.virsh("dumpxml", "--inactive", off.name).stdout
            self.assertRegex(x, r"<inbound average='1000' peak='2000'/>")
            self.assertRegex(x, r"<outbound average='1000' peak='1000'/>")
            # All zero clears one direction, the other stays.
            self.update(off.name, m, inbound=pb.Bandwidth())
            x = lk.virsh("dumpxml", "--inactive", off.name).stdout
            self.assertNotIn("<inbound", x)
            self.assertRegex(x, r"<outbound average='1000' peak='1000'/>")
        finally:
            off.remove()

    def test_3_move_between_running_guests(self):
        a, b, m = self.a, self.b, mac(3, 1)
        mark_a = a.console.mark()
        self.attach(a.name, m, mtu=1400)
        if_a = self.wait_add(a, m, mark_a)
        self.wait_lease(a, if_a, m, mark_a, NET1)
        self.assertNotIn(m, self.nics(b.name))

        mark_a, mark_b = a.console.mark(), b.console.mark()
        r = self.move(a.name, b.name, m)
        self.assertTrue(r.moved)
        self.assertEqual(r.vm, b.name)
        self.assertEqual(r.nic.mac.lower(), m)
        self.assertEqual(r.nic.mtu, 1400, "spec travelled with the NIC")
        self.assertEqual(r.nic.bridge, BR1)
        a.console.wait(rf"LAB: nic-remove name={if_a} mac={m}", timeout=WAIT, after=mark_a)
        hit = b.console.wait(rf"LAB: nic-add name=(\S+) mac={m} mtu=1400", timeout=WAIT,
                             after=mark_b)
        ip = self.wait_lease(b, hit.group(1), m, mark_b, NET1)
        rc, out = b.exec(f"ping -c 1 -W 5 -I {hit.group(1)} 10.77.{NET1}.1", timeout=20)
        self.assertEqual(rc, 0, out)
        self.assertNotIn(m, self.nics(a.name))
        nb = self.nics(b.name)[m]
        self.assertTrue(nb.in_live and nb.in_config, nb)
        self.assertNotIn(m, a.iflist(inactive=True), "gone from A's persistent definition")
        lk.log(f"moved {m}: {if_a} on A -> {hit.group(1)} on B, lease {ip}")

    def test_4_policy_routing_from_guest_config_steers_the_secondary_nic(self):
        g = self.b
        m1, m2 = mac(4, 1), mac(4, 2)
        mark = g.console.mark()
        self.attach(g.name, m1, bridge=BR1)
        if1 = self.wait_add(g, m1, mark)
        self.wait_lease(g, if1, m1, mark, NET1)
        mark2 = g.console.mark()
        self.attach(g.name, m2, bridge=BR2)
        if2 = self.wait_add(g, m2, mark2)
        ip2 = self.wait_lease(g, if2, m2, mark2, NET2)
        gw1, gw2 = f"10.77.{NET1}.1", f"10.77.{NET2}.1"

        # Before: traffic from the secondary address to the first bridge
        # leaves through the first NIC (asymmetric).
        rc, before = g.exec(f"ip route get {gw1} from {ip2}")
        self.assertEqual(rc, 0, before)
        self.assertRegex(before, r"dev eth\d")
        self.assertNotIn(f"dev {if2}", before)
        self.assertNotIn("table 100", before)

        out = lk.run([lk.BIN, "guest-config", "--mac", m2, "--name", if2,
                      "--ip", f"{ip2}/24", "--gateway", gw2, "--table", "100"]).stdout
        lines = out.split("policy routing for", 1)[1].split("\n")[1:]
        cmds = [l for l in lines if l.startswith("ip ")]
        self.assertEqual(len(cmds), 3, out)
        for c in cmds:
            rc, o = g.exec(c)
            self.assertEqual(rc, 0, f"{c}: {o}")

        # busybox's `ip route get` does not print the table; the route it
        # picks (via the secondary gateway) only exists in table 100.
        rc, after = g.exec(f"ip route get {gw1} from {ip2}")
        self.assertEqual(rc, 0, after)
        self.assertIn(f"via {gw2} dev {if2}", after)
        rc, table = g.exec("ip route show table 100")
        self.assertIn(f"default via {gw2} dev {if2}", table)
        self.assertIn(f"10.77.{NET2}.0/24 dev {if2}", table)
        rc, rules = g.exec("ip rule")
        self.assertRegex(rules, rf"from {re.escape(ip2)} lookup 100")
        rc, after2 = g.exec(f"ip route get {gw2} from {ip2}")
        self.assertIn(f"dev {if2}", after2)
        # Traffic from the secondary address really goes out through it:
        # to its own gateway, and to the other bridge via that gateway.
        for dst in (gw2, gw1):
            rc, o = g.exec(f"ping -c 1 -W 5 -I {ip2} {dst}", timeout=20)
            self.assertEqual(rc, 0, f"ping from {ip2} to {dst}: {o}")
        # Traffic not from the secondary address is untouched by the rule.
        rc, main = g.exec(f"ip route get {gw1}")
        self.assertEqual(rc, 0, main)
        self.assertNotIn(f"dev {if2}", main)
        self.assertNotIn("table 100", main)

    def test_5_refused_move_leaves_the_nic_back_on_a(self):
        a, m = self.a, mac(5, 1)
        # At most two guests: B makes room for a q35 guest with no free
        # root port.
        self.b.remove()
        q = lk.Guest(f"{PREFIX}-q", "q35", OUT)
        q.define("--root-ports", "0")
        try:
            cap = self.stub.GetPciCapacity(pb.GetPciCapacityRequest(vm=q.name),
                                           timeout=RPC_TIMEOUT)
            self.assertEqual(cap.free_slots, 0, cap)
            mark = a.console.mark()
            self.attach(a.name, m, mtu=1400)
            self.wait_add(a, m, mark)
            before = self.ifindex(a, m)
            with self.assertRaises(grpc.RpcError) as cm:
                self.move(a.name, q.name, m)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED,
                             cm.exception.details())
            self.assertIn(f"back on {a.name}", cm.exception.details())
            # The guest's NIC left and came back: a new device (new
            # ifindex) with the same MAC. The whole round trip takes about
            # 0.1 s, inside one 0.2 s poll of the guest's reporter, so the
            # console shows no remove/add pair; the kernel's ifindex does.
            after = lk.wait_until(lambda: self.ifindex(a, m), WAIT, what=f"{m} back in {a.name}")
            self.assertGreater(after, before, "the NIC was re-plugged, not left alone")
            _, out = a.exec(f"ip -o link | grep -i {m}")
            self.assertIn("mtu 1400", out)
            na = self.nics(a.name)[m]
            self.assertTrue(na.in_live and na.in_config, na)
            self.assertEqual(na.mtu, 1400)
            self.assertEqual(self.nics(q.name), {})
            self.assertNotIn(m, q.iflist(inactive=True))
        finally:
            q.remove()

    def test_6_live_bandwidth_is_refused_honestly_where_the_kernel_cannot_shape(self):
        # What this kernel allows, asked the way the agent asks it at
        # start-up: an sfq qdisc and a police action on a veth in a
        # throwaway network namespace.
        probe = lk.run(["unshare", "--net", "--", "sh", "-c",
                        "ip link add nap0 type veth peer name nap1 || exit 90; ip link set nap0 up;"
                        " tc qdisc add dev nap0 root sfq perturb 10 2>/dev/null; echo sfq=$?;"
                        " tc qdisc add dev nap0 ingress 2>/dev/null; tc filter add dev nap0 parent ffff:"
                        " protocol all u32 match u32 0 0 police rate 1mbit burst 10k drop flowid :1"
                        " 2>/dev/null; echo police=$?"], check=False)
        self.assertEqual(probe.returncode, 0, probe.stdout + probe.stderr)
        has = dict(l.split("=") for l in probe.stdout.split())
        a, m = self.a, mac(6, 1)
        mark = a.console.mark()
        self.attach(a.name, m)
        self.wait_add(a, m, mark)
        bw = dict(inbound=pb.Bandwidth(average_kbps=1000), outbound=pb.Bandwidth(average_kbps=500))
        if has["sfq"] == "0" and has["police"] == "0":
            # Where the kernel can, the update goes through as before.
            r = self.update(a.name, m, **bw)
            self.assertEqual(r.nic.inbound.average_kbps, 1000)
            return
        live_before = lk.virsh("dumpxml", a.name).stdout
        with self.assertRaises(grpc.RpcError) as cm:
            self.update(a.name, m, **bw)
        err = cm.exception
        self.assertEqual(err.code(), grpc.StatusCode.FAILED_PRECONDITION, err.details())
        if has["sfq"] != "0":
            self.assertIn("sch_sfq", err.details())
        if has["police"] != "0":
            self.assertIn("act_police", err.details())
        self.assertEqual(lk.virsh("dumpxml", a.name).stdout, live_before, "nothing changed")
        self.assertNotIn("<bandwidth", lk.virsh("dumpxml", "--inactive", a.name).stdout)
        # A link change on the same running NIC needs no tc and still works.
        self.assertEqual(self.update(a.name, m, link_down=True).nic.link_state, "down")
        self.stub.DetachNic(pb.DetachNicRequest(vm=a.name, mac=m), timeout=RPC_TIMEOUT)

    def counters(self, g, *ifnames):
        """{ifname: (rx_packets, tx_packets)} inside guest g, read in one go."""
        cmd = "; ".join(f"echo {n} $(cat /sys/class/net/{n}/statistics/rx_packets)"
                        f" $(cat /sys/class/net/{n}/statistics/tx_packets)" for n in ifnames)
        rc, out = g.exec(cmd)
        self.assertEqual(rc, 0, out)
        got = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] in ifnames:
                got[parts[0]] = (int(parts[1]), int(parts[2]))
        self.assertEqual(sorted(got), sorted(ifnames), out)
        return got

    def echo_path(self, g, if1, if2, ip2, n):
        """The host sends n echo requests from lab-cbr1's address to ip2 (the
        host routes them out of lab-cbr2, so they arrive on if2). Returns
        (answered, rx on if2, tx on if1, tx on if2) over that time: the
        guest's tx counters show which NIC the replies left through."""
        c0 = self.counters(g, if1, if2)
        answered = host_ping(f"10.77.{NET1}.1", ip2, n)
        c1 = self.counters(g, if1, if2)
        return (answered, c1[if2][0] - c0[if2][0],
                c1[if1][1] - c0[if1][1], c1[if2][1] - c0[if2][1])

    def test_7_udhcpc_hook_policy_routing_follows_the_lease(self):
        """guest-config --table with DHCP (no --ip): the udhcpc script it
        renders, run by the busybox guest's udhcpc on a hot-plugged second
        NIC, adds `from <lease> lookup 101` and the table when the lease is
        bound, and removes them on release; while it is there, replies to
        traffic arriving on the second NIC leave through that NIC.

        Restored from 5a3bc4f (its test_6, lost in merge 218a198, which kept
        the live-bandwidth test_6): a fresh guest, so the only NICs are the
        two made here and the counters are exact; the host's echo requests
        are raw ICMP from Python (no ping binary on the host)."""
        n, table = 20, 101
        # At most two guests running: B's slot (test 5 removes B too).
        self.b.remove()
        g = lk.Guest(f"{PREFIX}-h", "pc", OUT)
        self.more_guests = [g]
        root = tempfile.mkdtemp(prefix="lab-c-guestcfg-")
        try:
            g.define()
            # IPv6 link-local chatter (router solicitations, MLD) would add
            # to the tx counters; this proves IPv4 policy routing only.
            # `all` covers the NICs there are, `default` those hot-plugged next.
            rc, out = g.exec("for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do "
                             "[ -e \"$f\" ] && echo 1 >\"$f\"; done; true")
            self.assertEqual(rc, 0, out)
            m1, m2 = mac(7, 1), mac(7, 2)
            mark = g.console.mark()
            self.attach(g.name, m1, bridge=BR1)
            if1 = self.wait_add(g, m1, mark)
            self.wait_lease(g, if1, m1, mark, NET1)
            mark2 = g.console.mark()
            self.attach(g.name, m2, bridge=BR2)
            if2 = self.wait_add(g, m2, mark2)
            ip2 = self.wait_lease(g, if2, m2, mark2, NET2)
            gw2 = f"10.77.{NET2}.1"

            # Before: requests arrive on if2, the replies (to lab-cbr1's
            # address, on if1's subnet) leave through if1: asymmetric.
            answered, rx2, tx1, tx2 = self.echo_path(g, if1, if2, ip2, n)
            line = (f"before hook: {answered}/{n} answered, {if2} rx +{rx2}, "
                    f"tx {if1} +{tx1} {if2} +{tx2}")
            lk.log("udhcpc hook test, " + line)
            self.assertGreaterEqual(rx2, n, f"the requests did not arrive on {if2}: {line}")
            self.assertGreaterEqual(tx1, n, f"replies did not leave through {if1}: {line}")
            self.assertLess(tx2, n // 4, line)

            # The hook, as guest-config renders it, installed where it says.
            lk.run([lk.BIN, "guest-config", "--mac", m2, "--name", if2, "--table", str(table),
                    "--root", root])
            rel = f"usr/share/udhcpc/nic-agent-{if2}.script"
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                hook = f.read()
            self.assertNotIn("NIC_AGENT_EOF", hook)
            rc, out = g.exec(f"mkdir -p /usr/share/udhcpc && cat >/{rel} <<'NIC_AGENT_EOF'\n"
                             + hook + f"NIC_AGENT_EOF\nchmod 755 /{rel}")
            self.assertEqual(rc, 0, out)
            rc, out = g.exec(f"udhcpc -i {if2} -n -q -t 5 -T 1 -s /{rel}", timeout=30)
            self.assertEqual(rc, 0, f"udhcpc with the hook: {out}")
            rc, addr = g.exec(f"ip -4 addr show dev {if2}")
            self.assertIn(f"inet {ip2}/24", addr, "the lease changed address")
            _, rules = g.exec("ip rule")
            self.assertRegex(rules, rf"from {re.escape(ip2)} lookup {table}\b", rules)
            _, routes = g.exec(f"ip route show table {table}")
            self.assertIn(f"default via {gw2} dev {if2}", routes)
            self.assertIn(f"10.77.{NET2}.0/24 dev {if2}", routes)
            _, main = g.exec("ip route show")
            self.assertNotIn("default", main, "no default route in main without --default")

            # After: the replies leave through the NIC the requests came in on.
            answered, rx2, tx1, tx2 = self.echo_path(g, if1, if2, ip2, n)
            line = (f"after hook: {answered}/{n} answered, {if2} rx +{rx2}, "
                    f"tx {if1} +{tx1} {if2} +{tx2}")
            lk.log("udhcpc hook test, " + line)
            self.assertEqual(answered, n, line)
            self.assertGreaterEqual(rx2, n, line)
            self.assertGreaterEqual(tx2, n, f"replies did not leave through {if2}: {line}")
            self.assertLess(tx1, n // 4, f"replies still leave through {if1}: {line}")

            # Released: the hook's deconfig removes the rule and the table.
            rc, out = g.exec(f"udhcpc -i {if2} -n -q -R -t 5 -T 1 -s /{rel}", timeout=30)
            self.assertEqual(rc, 0, f"udhcpc -R with the hook: {out}")
            _, rules = g.exec("ip rule")
            self.assertNotIn(f"lookup {table}", rules)
            _, routes = g.exec(f"ip route show table {table}")
            self.assertNotIn(if2, routes)
            _, addr = g.exec(f"ip -4 addr show dev {if2}")
            self.assertNotIn(ip2, addr, "deconfig flushes the leased address")
        finally:
            shutil.rmtree(root, ignore_errors=True)
            g.remove()


if __name__ == "__main__":
    try:
        result = unittest.main(exit=False, verbosity=2).result
    finally:
        cleanup_all()
    sys.exit(lk.finish("test_e2e_day2", result, label="lab-day2"))
