"""The libvirt connection pool on the real libvirtd: more than five slow calls proceed.

libvirtd serves at most `max_client_requests` (5 by default) calls of one
client connection at a time and leaves the rest unread on the socket. A
detach on a paused guest is such a slow call: the guest cannot ack the
unplug, and libvirt waits about 5 s before it returns "request sent".

Seven guests are started paused (QEMU is up, the guest never runs, so no
unplug is ever acked), and each gets one NIC through the agent. Then all
seven are detached at once (timeout_ms 6000: each ends DEADLINE_EXCEEDED,
the unplug left pending, about a second after its libvirt call returned),
and 1.5 s later an eighth guest, not in the burst, is asked for its NICs:

- `libvirt_connections = 1` (the old behaviour, as a control that the limit
  is real on this libvirtd): the 6th and 7th detach wait for a free request
  slot, so the slowest answer after about 10 s (DEADLINE_EXCEEDED, or
  UNAVAILABLE when their libvirt call ran past the 10 s call deadline), and
  the other VM's ListNics waits about 3.5 s behind them;
- `libvirt_connections = 4`: every detach answers after about 6 s, and the
  other VM's ListNics answers at once.

(A ListVms is no such witness: its live XML reads of the seven guests wait
for their detach jobs inside libvirt, whatever the connection.)

Each agent's connections are counted with `virt-admin client-list` /
`client-info` (clients whose unix_process_id is the agent's PID).

Events ride on one of the pooled connections only. With four connections,
defining and undefining a domain gives exactly two lifecycle events (not
eight). Then every connection of the agent is cut (`virt-admin
client-disconnect`, which leaves libvirtd and its other clients alone, as a
libvirtd restart would not): the agent resubscribes, is back to four
connections, and the same define/undefine gives exactly two events again.

Everything made here is named lab-p* and removed at the end. libvirtd is
only used, never restarted. Run (root, under
`flock /tmp/nic-agent-lab.lock`): python3 tests/lab/test_e2e_pool.py
"""
import os
import subprocess
import sys
import tempfile
import time
import unittest
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import labkit as lk  # noqa: E402

grpc, pb, rpc = lk.stubs()

PREFIX = "lab-p"
BRIDGE = "lab-pbr1"
SUBNET = 71
OUT = os.path.join(lk.WORK, "guest")
GUESTS = [f"{PREFIX}-g{i}" for i in range(1, 8)]
IDLE = f"{PREFIX}-idle"
EV = f"{PREFIX}-ev"
DETACH_TIMEOUT_MS = 6000
WORKDIR = tempfile.mkdtemp(prefix="lab-p-")
AGENT = {}
# A definition only, never started: its define and undefine are the events.
EV_XML = os.path.join(WORKDIR, f"{EV}.xml")
with open(EV_XML, "w") as _f:
    _f.write(f"<domain type='qemu'><name>{EV}</name><memory unit='MiB'>64</memory>"
             "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")


def mac(round_, i):
    return f"52:54:00:7e:{round_:02x}:{i:02x}"


def agent_clients(pid):
    """The ids of the libvirtd clients opened by process `pid`, by virt-admin."""
    ids = [line.split()[0] for line in
           lk.run(["virt-admin", "client-list", "libvirtd"]).stdout.splitlines()[2:]
           if line.strip()]
    mine = []
    for cid in ids:
        info = lk.run(["virt-admin", "client-info", "libvirtd", cid], check=False).stdout
        for line in info.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "unix_process_id" and v.strip() == str(pid):
                mine.append(cid)
    return mine


def agent_connections(pid):
    return len(agent_clients(pid))


def cleanup():
    a = AGENT.pop("agent", None)
    if a is not None and a.alive():
        a.stop()
    lk.script("teardown.sh", PREFIX, check=False)
    lk.script("net.sh", "down", BRIDGE, check=False)


class PoolE2E(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if subprocess.run(["which", "virt-admin"], capture_output=True).returncode != 0:
            raise unittest.SkipTest("virt-admin (libvirt-clients) is not installed")
        try:
            lk.script("build-guest.sh", OUT, timeout=600)
            cleanup()
            lk.script("net.sh", "up", BRIDGE, "--subnet", str(SUBNET), "--mtu", "1500")
            for g in GUESTS + [IDLE]:
                lk.script("define-guest.sh", g, "pc", OUT, "--no-start")
                # Paused from the start: QEMU is there for hot-plug, the guest
                # never runs, so no unplug is ever acked.
                lk.virsh("start", "--paused", g)
        except BaseException:
            cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cleanup()

    def start_agent(self, connections, *extra):
        conf = os.path.join(WORKDIR, f"pool-{connections}.toml")
        with open(conf, "w") as f:
            f.write(f"[limits]\nlibvirt_connections = {connections}\n")
        state = os.path.join(WORKDIR, f"state-{connections}")
        a = lk.Agent(os.path.join(WORKDIR, f"agent-{connections}.stderr"),
                     "--config", conf, "--host-network", "off",
                     "--state-dir", state, "--persist-dir", state + "-persist", *extra)
        AGENT["agent"] = a
        return a

    def stop_agent(self):
        AGENT.pop("agent").stop()

    def burst(self, agent, round_):
        """Attaches one NIC per guest, then detaches all at once and asks
        for the idle guest's NICs 1.5 s later. Returns ([(duration,
        outcome)] of the detaches, the ListNics latency)."""
        for i, g in enumerate(GUESTS, 1):
            agent.stub.AttachNic(pb.AttachNicRequest(
                vm=g, nic=pb.NicSpec(mac=mac(round_, i), bridge=BRIDGE)), timeout=60)

        def detach(i, g):
            t0 = time.monotonic()
            try:
                r = agent.stub.DetachNic(pb.DetachNicRequest(
                    vm=g, mac=mac(round_, i), timeout_ms=DETACH_TIMEOUT_MS), timeout=60)
                outcome = pb.DetachState.Name(r.state)
            except grpc.RpcError as e:
                outcome = e.code().name
            return time.monotonic() - t0, outcome

        with ThreadPoolExecutor(max_workers=len(GUESTS)) as ex:
            futures = [ex.submit(detach, i, g) for i, g in enumerate(GUESTS, 1)]
            time.sleep(1.5)
            t0 = time.monotonic()
            agent.stub.ListNics(pb.ListNicsRequest(vm=IDLE), timeout=60)
            list_latency = time.monotonic() - t0
            results = [f.result() for f in futures]
        lk.log(f"round {round_}: detaches {[(round(d, 1), o) for d, o in results]}, "
               f"ListNics of {IDLE} during them {list_latency:.2f}s")
        return results, list_latency

    def test_1_one_connection_queues_the_sixth_slow_call(self):
        """The control: with one connection libvirtd's per-connection limit
        shows, so the next test can tell a pool from no pool."""
        a = self.start_agent(1)
        self.assertEqual(agent_connections(a.proc.pid), 1)
        results, list_latency = self.burst(a, 1)
        slowest = max(d for d, _ in results)
        self.stop_agent()
        self.assertGreater(slowest, 8.5, f"no call waited for a request slot: {results}")
        self.assertGreater(list_latency, 2.5, "the other VM did not wait behind the detaches")

    def test_2_a_pool_of_four_serves_seven_slow_calls_and_another_vm_at_once(self):
        a = self.start_agent(4)
        # The first connection opens before the agent serves, the other
        # three right after, off the start-up path.
        lk.wait_until(lambda: agent_connections(a.proc.pid) == 4, 10, what="4 connections")
        results, list_latency = self.burst(a, 2)
        self.stop_agent()
        for d, outcome in results:
            self.assertEqual(outcome, "DEADLINE_EXCEEDED", results)
            self.assertLess(d, 8.5, f"a detach waited for a request slot: {results}")
        self.assertLess(list_latency, 1.0, "the other VM waited behind the detaches")

    def test_3_events_come_once_and_again_after_every_connection_was_cut(self):
        a = self.start_agent(4, "--metrics-listen", "127.0.0.1:0")
        pid = a.proc.pid
        try:
            lk.wait_until(lambda: agent_connections(pid) == 4, 10, what="4 connections")

            def events(kind):
                return lk.metrics(a).get(f'nic_agent_libvirt_events_total{{event="{kind}"}}', 0)

            def define_and_undefine():
                base = events("lifecycle")
                lk.virsh("define", EV_XML)
                lk.virsh("undefine", EV)
                lk.wait_until(lambda: events("lifecycle") >= base + 2, 10,
                              what="the defined and undefined events")
                # A subscription per connection would deliver each event
                # four times, within milliseconds of the first: look for
                # duplicates for a bounded second.
                t0 = time.monotonic()
                while time.monotonic() - t0 < 1.0:
                    self.assertEqual(events("lifecycle"), base + 2, "an event came more than once")
                    time.sleep(0.1)

            define_and_undefine()
            resubscribed = events("resubscribed")
            cut = 0
            for cid in agent_clients(pid):
                lk.run(["virt-admin", "client-disconnect", "libvirtd", cid])
                cut += 1
            self.assertEqual(cut, 4)
            lk.wait_until(lambda: events("resubscribed") > resubscribed, 10,
                          what="the event connection to be subscribed again")
            lk.wait_until(lambda: agent_connections(pid) == 4, 10,
                          what="all 4 connections to be reopened")
            define_and_undefine()
            # And calls work on the new connections.
            a.stub.ListNics(pb.ListNicsRequest(vm=IDLE), timeout=10)
        finally:
            self.stop_agent()
            lk.virsh("undefine", EV, check=False)


if __name__ == "__main__":
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(PoolE2E)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    sys.exit(lk.finish("test_e2e_pool", result, label="lab-pool"))
