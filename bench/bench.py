#!/usr/bin/env python3
"""bench.py: nic-agent's attach benchmark, driven by bench/run.sh.

Compares, on this machine and in one run:
  raw          examples/bench.rs raw: lookup + virDomainAttachDeviceFlags(LIVE),
               in-process, one connection (the limit);
  agent-grpc   examples/bench.rs grpc: AttachNic over gRPC to the release agent;
  python-peer  bench/peer.py run: lookup + dumpxml + attach per request, python3-libvirt;
  grpc-floor   examples/bench.rs ping: grpc.health.v1 Check to the same agent on
               the test driver, the transport's own cost per call.

Phases:
  1. libvirt's test driver, a generated node of pc VMs with ACPI (capacity is
     never the limit there), with 1 and with 16 concurrent clients. Each client
     kind opens its own connection, so each starts from the node file's state.
  2. real QEMU: 20 TCG guests (lab-e-NN, pc, booted 4 at a time); a storm of
     120 attaches (6 per guest). Every NIC is detached between phases.
Also: agent start-up time (exec to grpc.health.v1 SERVING) and its memory idle
and after the storm: VmRSS (the figure the targets are judged on) with
RssAnon, RssFile and Pss (/proc/PID/smaps_rollup) to explain it.

Writes bench/results.json and prints a markdown table (also bench/RESULTS.md
with --write-md). Everything it creates is named lab-e* and removed at the end.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAB = os.path.join(ROOT, "tests", "lab")
sys.path.insert(0, LAB)
import labkit as lk  # noqa: E402

AGENT = os.path.join(ROOT, "target", "release", "nic-agent")
BENCH = os.path.join(ROOT, "target", "release", "examples", "bench")
PEER_PY = os.environ.get("BENCH_PEER_PYTHON", "/usr/bin/python3")
PEER = os.path.join(HERE, "peer.py")
PREFIX = "lab-e"
BRIDGE = "lab-ebr0"
SUBNET = 61
GUEST_DIR = os.path.join(lk.WORK, "guest")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd, timeout=600, check=True):
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout


class Agent:
    """The release agent on a random loopback port; start-up timed to SERVING."""

    def __init__(self, uri, workdir, *extra):
        import grpc

        self.err_path = os.path.join(workdir, f"agent-{int(time.time() * 1000)}.stderr")
        self.err = open(self.err_path, "w")
        cmd = [AGENT, "serve", "--connect", uri, "--listen", "127.0.0.1:0", "--insecure",
               "--metrics-listen", "127.0.0.1:0",
               "--state-dir", os.path.join(workdir, "state"), *extra]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env={**os.environ, "RUST_LOG": "warn"})
        self.addr = self.metrics_addr = None
        for line in self.proc.stdout:
            if line.startswith("nic-agent listening on "):
                self.addr = line.split()[-1]
            elif line.startswith("nic-agent metrics on "):
                self.metrics_addr = line.split()[-1]
            if self.addr and self.metrics_addr:
                break
        if self.addr is None:
            self.stop()
            raise RuntimeError(f"agent did not start: {open(self.err_path).read()}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.channel = grpc.insecure_channel(self.addr, options=[("grpc.enable_http_proxy", 0)])
        deadline = time.monotonic() + 30
        while lk.health(self.channel, 0.5) != lk.SERVING:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("agent never reported SERVING")
            time.sleep(0.002)
        self.startup_ms = (time.perf_counter() - t0) * 1000.0

    def counters(self):
        """libvirt API calls (all, and GetXMLDesc alone) and the detach
        polling reads so far, from the agent's /metrics."""
        import urllib.request
        text = urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=10).read()
        calls = xml = polls = 0
        by_api = {}
        for line in text.decode().splitlines():
            m = re.match(r'nic_agent_libvirt_calls_total\{api="([^"]+)"\} (\d+)', line)
            if m:
                by_api[m.group(1)] = int(m.group(2))
            # The health probe's calls are no request's: virConnectIsAlive
            # (a look at the local socket of every pooled connection) and
            # virConnectGetLibVersion (its round trip), every 500 ms, on a
            # thread of its own. A probe landing among the persistent
            # probe's 5 attaches would add 0.2 "per attach"; by_api keeps
            # every API, these included, for the log line.
            if m and m.group(1) not in ("virConnectIsAlive", "virConnectGetLibVersion"):
                calls += int(m.group(2))
                if m.group(1) == "virDomainGetXMLDesc":
                    xml += int(m.group(2))
            m = re.match(r"nic_agent_detach_poll_reads_total (\d+)", line)
            if m:
                polls = int(m.group(1))
        return {"calls": calls, "xml": xml, "polls": polls, "by_api": by_api}

    def detach_all(self, vms, concurrency, label):
        """DetachNic of every NIC of `vms` (ListNics first, not timed), from
        `concurrency` clients; one result like bench.rs's, with the libvirt
        calls, XML reads and polling reads the detaches made."""
        import grpc
        _, pb, rpc = lk.stubs()
        stub = rpc.NicAgentStub(self.channel)
        work = [(vm, n.mac) for vm in vms
                for n in stub.ListNics(pb.ListNicsRequest(vm=vm), timeout=60).nics]
        lat, errors, lock = [], [], threading.Lock()
        c0 = self.counters()

        def worker(items):
            for vm, mac in items:
                t0 = time.perf_counter()
                try:
                    r = stub.DetachNic(pb.DetachNicRequest(vm=vm, mac=mac, timeout_ms=30000),
                                       timeout=60)
                    ok = r.state == pb.DETACH_STATE_REMOVED
                except grpc.RpcError as e:
                    ok = False
                    with lock:
                        errors.append(f"{vm} {mac}: {e.code().name}")
                with lock:
                    if ok:
                        lat.append(time.perf_counter() - t0)
        t_start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(work[i::concurrency],))
                   for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        c1 = self.counters()
        lat.sort()

        def pct(p):
            return lat[min(len(lat) - 1, max(0, -(-len(lat) * p // 100) - 1))] * 1000 if lat else 0.0
        return {"mode": "agent-grpc", "label": label, "concurrency": concurrency,
                "requests": len(work), "ok": len(lat), "errors": errors[:5], "wall_s": wall,
                "throughput_per_s": len(lat) / wall if wall > 0 else 0.0,
                "p50_ms": pct(50), "p99_ms": pct(99),
                "libvirt_calls": c1["calls"] - c0["calls"], "xml_reads": c1["xml"] - c0["xml"],
                "poll_reads": c1["polls"] - c0["polls"]}

    def rss_kib(self, field="VmRSS"):
        """A memory figure of the agent from /proc/PID/status, in KiB. VmRSS
        counts the mapped libvirt/glib/gnutls libraries and the binary itself
        (file-backed, shared); RssAnon is the agent's own heap and stacks."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None

    def pss_kib(self):
        """Proportional set size from /proc/PID/smaps_rollup, in KiB: each
        page shared with N processes counts 1/N, so libvirt.so and friends
        cost the agent only their share when libvirtd maps them too. None
        when the kernel has no smaps_rollup (before 4.14)."""
        try:
            with open(f"/proc/{self.proc.pid}/smaps_rollup") as f:
                m = re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M)
        except OSError:
            return None
        return int(m.group(1)) if m else None

    def memory(self, when):
        """VmRSS (the figure the targets are judged on) and what it is made of,
        as result keys: agent_rss_kib_WHEN, agent_rss_anon_kib_WHEN,
        agent_rss_file_kib_WHEN, agent_pss_kib_WHEN."""
        return {
            f"agent_rss_kib_{when}": self.rss_kib(),
            f"agent_rss_anon_kib_{when}": self.rss_kib("RssAnon"),
            f"agent_rss_file_kib_{when}": self.rss_kib("RssFile"),
            f"agent_pss_kib_{when}": self.pss_kib(),
        }

    def stop(self):
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def machine(skip_qemu=False):
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    # With --skip-qemu nothing may talk to libvirtd: the library version then
    # comes from the in-process test driver, and QEMU's stays "-".
    uri = "test:///default" if skip_qemu else "qemu:///system"
    ver = sh("virsh", "-c", uri, "version", check=False)
    lv = re.search(r"Using library: libvirt (\S+)", ver)
    qv = re.search(r"Running hypervisor: QEMU (\S+)", ver)
    mem = 0
    with open("/proc/meminfo") as f:
        mem = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) // 1024
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_mib": mem,
        "kernel": platform.release(),
        "libvirt": lv.group(1) if lv else "?",
        "qemu": "-" if skip_qemu else qv.group(1) if qv else "?",
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
    }


def write_jobs(path, vms, per_vm, phase):
    """Round-robin over VMs, so concurrent clients mostly hit different VMs.
    MACs are unique per (phase, VM, index): 52:54:00:PP:VV:NN."""
    with open(path, "w") as f:
        for n in range(per_vm):
            for v, vm in enumerate(vms):
                f.write(f"{vm} 52:54:00:{phase:02x}:{v:02x}:{n:02x}\n")
    return path


def template(workdir, bridge, queues):
    """The XML the agent would attach (nic-agent render), with placeholders."""
    xml = sh(AGENT, "render", "--mac", "02:00:00:00:00:01", "--bridge", bridge,
             "--queues", str(queues))
    xml = xml.replace("02:00:00:00:00:01", "{mac}")
    xml = re.sub(r'<alias name="[^"]*"/>', '<alias name="{alias}"/>', xml)
    path = os.path.join(workdir, f"template-{bridge}.xml")
    with open(path, "w") as f:
        f.write(xml)
    return path


def bench_json(cmd, timeout=600):
    out = sh(*cmd, timeout=timeout)
    r = json.loads(out.strip().splitlines()[-1])
    if r["ok"] != r["requests"]:
        log(f"WARNING {r['mode']} {r['label']}: {r['requests'] - r['ok']} failed: "
            f"{r['errors']} first: {r['first_error']}")
    return r


def run_raw(uri, jobs, tmpl, c, label):
    return bench_json([BENCH, "raw", "--uri", uri, "--jobs", jobs, "--template", tmpl,
                       "--concurrency", str(c), "--label", label])


def run_grpc(agent, jobs, bridge, c, label):
    c0 = agent.counters()
    r = run_grpc_jobs(agent, jobs, bridge, c, label)
    c1 = agent.counters()
    if r.get("ok"):
        r["libvirt_calls_per_op"] = (c1["calls"] - c0["calls"]) / r["ok"]
    return r


def run_grpc_jobs(agent, jobs, bridge, c, label):
    return bench_json([BENCH, "grpc", "--server", agent.addr, "--jobs", jobs, "--bridge", bridge,
                       "--queues", "2", "--concurrency", str(c), "--label", label])


def run_peer(uri, jobs, tmpl, c, label):
    return bench_json([PEER_PY, PEER, "run", "--uri", uri, "--jobs", jobs, "--template", tmpl,
                       "--concurrency", str(c), "--label", label])


# ---------------------------------------------------------------- test driver

def node_xml(path, n_vms):
    doms = []
    for i in range(n_vms):
        doms.append(f"""  <domain type='test'>
    <name>bench-vm-{i:02d}</name>
    <uuid>7b000000-0000-4000-8000-0000000000{i:02x}</uuid>
    <memory unit='MiB'>512</memory>
    <vcpu>2</vcpu>
    <os><type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type></os>
    <features><acpi/></features>
    <devices><controller type='pci' index='0' model='pci-root'/></devices>
  </domain>""")
    with open(path, "w") as f:
        f.write("<node>\n  <cpu><mhz>2400</mhz><model>x86_64</model><active>16</active>"
                "<total>16</total><nodes>1</nodes><sockets>1</sockets><cores>8</cores>"
                "<threads>2</threads></cpu>\n  <memory>33554432</memory>\n"
                + "\n".join(doms) + "\n</node>\n")


def phase_testdriver(workdir, per_vm, n_vms, results):
    node = os.path.join(workdir, "bench-node.xml")
    node_xml(node, n_vms)
    uri = f"test://{node}"
    vms = [f"bench-vm-{i:02d}" for i in range(n_vms)]
    tmpl = template(workdir, "cloudbr0", 2)
    jobs = write_jobs(os.path.join(workdir, "jobs-test.txt"), vms, per_vm, 0x10)
    for c in (1, 16):
        label = f"test driver, {c} client{'s' if c > 1 else ''}"
        log(f"{label}: raw")
        results.append(run_raw(uri, jobs, tmpl, c, label))
        log(f"{label}: agent")
        agent = Agent(uri, workdir)
        try:
            idle = agent.memory("idle")
            # The floor under every agent row: a gRPC call that does no
            # agent work (grpc.health.v1 Check), on the same channel kind.
            log(f"{label}: gRPC floor")
            results.append(bench_json([BENCH, "ping", "--server", agent.addr, "--jobs", jobs,
                                       "--concurrency", str(c), "--label", label]))
            r = run_grpc(agent, jobs, "cloudbr0", c, label)
            r["agent_startup_ms"] = agent.startup_ms
            r.update(idle)
            r.update(agent.memory("after"))
            results.append(r)
        finally:
            agent.stop()
        log(f"{label}: python peer")
        results.append(run_peer(uri, jobs, tmpl, c, label))


# ---------------------------------------------------------------- real QEMU

def boot_guests(names, batch, persistent):
    flags = [] if persistent else ["--transient"]
    for i in range(0, len(names), batch):
        group = names[i:i + batch]
        t0 = time.monotonic()
        procs = [subprocess.Popen(["bash", os.path.join(LAB, "define-guest.sh"), n, "pc",
                                   GUEST_DIR, "--timeout", "180", *flags],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for n in group]
        for n, p in zip(group, procs):
            out, _ = p.communicate(timeout=240)
            if p.returncode != 0:
                raise RuntimeError(f"define-guest {n} failed:\n{out}")
        log(f"booted {', '.join(group)} in {time.monotonic() - t0:.1f}s")


def clean_nics(vms):
    t0 = time.monotonic()
    sh(PEER_PY, PEER, "clean", "--uri", lk.URI, *vms, timeout=180)
    log(f"detached every NIC from {len(vms)} guests in {time.monotonic() - t0:.1f}s")


def phase_qemu(workdir, n_guests, per_vm, results, extra, persistent):
    vms = [f"{PREFIX}-{i:02d}" for i in range(n_guests)]
    lk.script("build-guest.sh", GUEST_DIR, timeout=600)
    lk.script("teardown.sh", PREFIX, check=False)
    lk.script("net.sh", "up", BRIDGE, "--subnet", str(SUBNET))
    t0 = time.monotonic()
    boot_guests(vms, 4, persistent)
    extra["qemu_boot_s"] = time.monotonic() - t0
    tmpl = template(workdir, BRIDGE, 2)
    n = n_guests * per_vm
    phase = 0x20

    # Latency with one client needs fewer samples than the storm: half the
    # attaches keep the whole bench within its 10 minutes on 2 busy cores.
    seq_per_vm = max(1, per_vm // 2)

    def jobs(k):
        nonlocal phase
        phase += 1
        return write_jobs(os.path.join(workdir, f"jobs-qemu-{phase:02x}.txt"), vms, k, phase)

    kind = "persistent" if persistent else "transient"
    storm = f"QEMU storm {n} over {n_guests} {kind} guests"
    single = f"QEMU {n_guests * seq_per_vm} sequential over {n_guests} {kind} guests"
    extra["qemu_guests"] = kind
    clean_nics(vms)
    for c, label, k in ((1, single, seq_per_vm), (8, storm, per_vm)):
        log(f"{label}: raw, {c} client(s)")
        results.append(run_raw(lk.URI, jobs(k), tmpl, c, label))
        clean_nics(vms)
    agent = Agent(lk.URI, workdir, "--host-network", "off")
    detach1 = f"QEMU detach, {n_guests * seq_per_vm} NICs one at a time, {kind} guests"
    detach8 = f"QEMU detach storm, {n} NICs, {kind} guests"
    try:
        # Start-up, median of 5: single starts beside the 20 guests range
        # from 26 to 238 ms in one run of the same code (about 20 ms with
        # libvirtd idle), so one sample says more about the moment than
        # about the agent.
        starts = [agent.startup_ms]
        for _ in range(4):
            extra_agent = Agent(lk.URI, workdir, "--host-network", "off")
            starts.append(extra_agent.startup_ms)
            extra_agent.stop()
        starts.sort()
        extra["agent_startup_ms_qemu"] = starts[len(starts) // 2]
        extra["agent_startup_ms_qemu_all"] = starts
        extra.update(agent.memory("idle"))
        for c, label, k in ((1, single, seq_per_vm), (8, storm, per_vm)):
            log(f"{label}: agent, {c} client(s)")
            r = run_grpc(agent, jobs(k), BRIDGE, c, label)
            r.update(agent.memory("after"))
            results.append(r)
            if c == 8:
                extra.update(agent.memory("after_storm"))
            # DetachNic of what was just attached: one client after the
            # sequential phase, 8 after the storm.
            log(f"{detach1 if c == 1 else detach8}: agent, {c} client(s)")
            results.append(agent.detach_all(vms, c, detach1 if c == 1 else detach8))
            clean_nics(vms)
        persistent_probe(agent, workdir, extra)
    finally:
        agent.stop()
    # The raw floor for a detach: libvirt's own call, then DEVICE_REMOVED.
    log(f"{detach1}: raw with the event wait")
    run_raw(lk.URI, jobs(seq_per_vm), tmpl, 1, "attach for the raw detach")
    results.append(json.loads(sh(PEER_PY, PEER, "detach-event", "--uri", lk.URI,
                                 "--label", detach1, *vms, timeout=600)))
    clean_nics(vms)
    log(f"{storm}: python peer, sequential")
    results.append(run_peer(lk.URI, jobs(per_vm), tmpl, 1, storm))


def persistent_probe(agent, workdir, extra, n=5):
    """libvirt calls per AttachNic on a running persistent guest (LIVE and
    CONFIG), the case the call target names: one more guest, persistent.
    Counted in steady state: the first attach, not counted, is where each
    connection of the pool looks the new domain up once (a handle belongs
    to its connection)."""
    _, pb, rpc = lk.stubs()
    name = f"{PREFIX}-p0"
    lk.script("define-guest.sh", name, "pc", GUEST_DIR, "--timeout", "180", timeout=240)
    try:
        stub = rpc.NicAgentStub(agent.channel)
        stub.AttachNic(pb.AttachNicRequest(vm=name, nic=pb.NicSpec(
            mac="02:e0:00:7f:01:00", bridge=BRIDGE)), timeout=60)
        c0 = agent.counters()
        for i in range(n):
            r = stub.AttachNic(pb.AttachNicRequest(vm=name, nic=pb.NicSpec(
                mac=f"02:e0:00:7f:00:{i:02x}", bridge=BRIDGE)), timeout=60)
            if not (r.nic.in_live and r.nic.in_config):
                raise RuntimeError(f"persistent probe: {r.nic}")
        c1 = agent.counters()
        extra["calls_per_attach_persistent"] = (c1["calls"] - c0["calls"]) / n
        diff = {k: v - c0["by_api"].get(k, 0) for k, v in c1["by_api"].items()}
        extra["calls_persistent_by_api"] = {k: v for k, v in diff.items() if v}
        log(f"persistent probe: {extra['calls_per_attach_persistent']:.1f} libvirt calls per attach "
            f"({n} attaches: {extra['calls_persistent_by_api']})")
    finally:
        lk.virsh("destroy", name, check=False)
        lk.virsh("undefine", name, check=False)


# ---------------------------------------------------------------- report

def find(results, mode, label_part, c):
    for r in results:
        if r["mode"] == mode and label_part in r["label"] and r["concurrency"] == c:
            return r
    return None


def rss_parts(d, key):
    """ " (RssAnon a, RssFile f, Pss p MiB)" for the VmRSS figure d[key]
    (agent_rss_kib_WHEN), from the keys recorded next to it; older JSON
    without them gives what it has."""
    parts = []
    for name, k in (("RssAnon", key.replace("rss_", "rss_anon_")),
                    ("RssFile", key.replace("rss_", "rss_file_")),
                    ("Pss", key.replace("rss_", "pss_"))):
        if d.get(k):
            parts.append(f"{name} {d[k] / 1024:.1f}")
    return f" ({', '.join(parts)} MiB)" if parts else ""


def table(results, extra, mach):
    lines = [
        f"Machine: {mach['nproc']} vCPU ({mach['cpu_model']}), {mach['mem_mib']} MiB, "
        f"kernel {mach['kernel']}, libvirt {mach['libvirt']}, "
        + (f"QEMU {mach['qemu']} (TCG guests); " if mach["qemu"] != "-" else "no QEMU phase; ")
        + f"load average at start {' '.join(mach['loadavg_at_start'])}.",
        "",
        "| scenario | client | concurrency | ok/requests | p50 ms | p99 ms | throughput /s | wall s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['mode']} | {r['concurrency']} | {r['ok']}/{r['requests']} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['throughput_per_s']:.1f} | "
            f"{r['wall_s']:.2f} |")
    lines.append("")
    t = []
    raw1 = find(results, "raw", "QEMU", 1)
    ag1 = find(results, "agent-grpc", "QEMU", 1)
    ag8 = find(results, "agent-grpc", "QEMU storm", 8)
    peer = find(results, "python-peer", "QEMU storm", 1)
    if raw1 and ag1 and raw1["p50_ms"] > 0:
        ov = (ag1["p50_ms"] / raw1["p50_ms"] - 1) * 100
        extra["qemu_p50_overhead_pct"] = ov
        t.append(f"| agent p50 overhead over raw on QEMU (1 client) | ≤ 10 % | {ov:.1f} % | "
                 f"{'met' if ov <= 10 else 'missed'} |")
    if ag8 and peer and ag8["wall_s"] > 0:
        sp = peer["wall_s"] / ag8["wall_s"]
        extra["storm_speedup_vs_peer"] = sp
        t.append(f"| storm: agent (8 clients) vs sequential python peer | ≥ 2× | {sp:.2f}× | "
                 f"{'met' if sp >= 2 else 'missed'} |")
    # VmRSS is the figure the targets are judged on; RssAnon (the agent's own
    # heap and stacks), RssFile (the binary and libvirt's client libraries,
    # mapped from disk) and Pss (shared pages divided among the processes
    # that map them, e.g. libvirtd) explain it.
    for key, name, lim in (("agent_rss_kib_idle", "agent RSS idle", 15),
                           ("agent_rss_kib_after_storm", "agent RSS after the storm", 25)):
        if extra.get(key):
            mib = extra[key] / 1024
            t.append(f"| {name} (VmRSS) | ≤ {lim} MiB | {mib:.1f} MiB{rss_parts(extra, key)} | "
                     f"{'met' if mib <= lim else 'missed'} |")
    td = find(results, "agent-grpc", "test driver", 16)
    if td and td.get("agent_rss_kib_after"):
        for when, name in (("idle", "agent RSS idle, test driver"),
                           ("after", "agent RSS after 16 clients, test driver")):
            key = f"agent_rss_kib_{when}"
            if td.get(key):
                t.append(f"| {name} (VmRSS) | - | {td[key] / 1024:.1f} MiB"
                         f"{rss_parts(td, key)} | - |")
    if extra.get("agent_startup_ms_qemu"):
        all_ms = extra.get("agent_startup_ms_qemu_all") or [extra["agent_startup_ms_qemu"]]
        t.append(f"| agent exec → health SERVING (qemu:///system), median of {len(all_ms)} | - | "
                 f"{extra['agent_startup_ms_qemu']:.0f} ms ({min(all_ms):.0f}-{max(all_ms):.0f}) | - |")
    starts = [r["agent_startup_ms"] for r in results if "agent_startup_ms" in r]
    if starts:
        t.append(f"| agent exec → health SERVING (test driver) | - | "
                 f"{min(starts):.0f}-{max(starts):.0f} ms | - |")
    # Issue 15's targets.
    td1, tp1 = find(results, "agent-grpc", "test driver", 1), find(results, "python-peer", "test driver", 1)
    if td1 and tp1 and tp1["p50_ms"] > 0:
        ratio = td1["p50_ms"] / tp1["p50_ms"]
        met = td1["p50_ms"] <= 0.30 and ratio <= 2.5
        t.append(f"| test driver, 1 client: agent p50 | ≤ 0.30 ms and ≤ 2.5× the peer | "
                 f"{td1['p50_ms']:.2f} ms, {ratio:.1f}× | {'met' if met else 'missed'} |")
    if td:
        t.append(f"| test driver, 16 clients: attaches per second | ≥ 5,000/s | "
                 f"{td['throughput_per_s']:,.0f}/s | "
                 f"{'met' if td['throughput_per_s'] >= 5000 else 'missed'} |")
    fl1 = find(results, "grpc-floor", "test driver", 1)
    if td1 and fl1:
        t.append(f"| test driver, 1 client: gRPC floor (health Check, no agent work) p50 | - | "
                 f"{fl1['p50_ms']:.2f} ms (agent work above it: {td1['p50_ms'] - fl1['p50_ms']:.2f} ms) | - |")
    if td1 and td1.get("libvirt_calls_per_op"):
        t.append(f"| libvirt calls per attach, test driver (LIVE only) | - | "
                 f"{td1['libvirt_calls_per_op']:.1f} | - |")
    if extra.get("calls_per_attach_persistent"):
        c = extra["calls_per_attach_persistent"]
        t.append(f"| libvirt calls per attach, running persistent VM (the health probe's calls not counted) | ≤ 8 | {c:.1f} | "
                 f"{'met' if c <= 8 else 'missed'} |")
    d_ag = next((r for r in results if r["mode"] == "agent-grpc" and r["label"].startswith("QEMU detach,")), None)
    d_raw = next((r for r in results if r["mode"] == "raw-event"), None)
    if d_ag and d_raw and d_raw["p50_ms"] > 0:
        ratio = d_ag["p50_ms"] / d_raw["p50_ms"]
        t.append(f"| QEMU detach (1 client): agent p50 vs raw detach + DEVICE_REMOVED | ≤ 1.05× | "
                 f"{d_ag['p50_ms']:.0f} vs {d_raw['p50_ms']:.0f} ms, {ratio:.2f}× | "
                 f"{'met' if ratio <= 1.05 else 'missed'} |")
    d_st = next((r for r in results if r["label"].startswith("QEMU detach storm")), None)
    if d_st:
        t.append(f"| detach storm ({d_st['ok']} NICs, 8 clients): polling reads | 0 while events flow | "
                 f"{d_st['poll_reads']} ({d_st['xml_reads']} XML reads, {d_st['libvirt_calls']} calls in all) | "
                 f"{'met' if d_st['poll_reads'] == 0 else 'missed'} |")
    if extra.get("agent_startup_ms_qemu"):
        ms = extra["agent_startup_ms_qemu"]
        t.append(f"| exec → health SERVING on qemu:///system | ≤ 100 ms | {ms:.0f} ms | "
                 f"{'met' if ms <= 100 else 'missed'} |")
    for key, name, lim in (("agent_rss_anon_kib_idle", "RssAnon idle", 4),
                           ("agent_rss_anon_kib_after_storm", "RssAnon after the storm", 8),
                           ("agent_pss_kib_idle", "Pss idle", 15),
                           ("agent_pss_kib_after_storm", "Pss after the storm", 20)):
        if extra.get(key):
            mib = extra[key] / 1024
            t.append(f"| {name} | ≤ {lim} MiB | {mib:.1f} MiB | {'met' if mib <= lim else 'missed'} |")
    if t:
        lines += ["| target | goal | measured | |", "| --- | --- | ---: | --- |", *t]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--write-md", action="store_true", help="also write bench/RESULTS.md")
    ap.add_argument("--skip-qemu", action="store_true")
    ap.add_argument("--test-per-vm", type=int, default=25)
    ap.add_argument("--test-vms", type=int, default=40)
    ap.add_argument("--guests", type=int, default=20)
    ap.add_argument("--per-guest", type=int, default=6)
    ap.add_argument("--persistent-guests", action="store_true",
                    help="define the guests (the agent then attaches LIVE and CONFIG); "
                    "default: transient like CloudStack's, LIVE only for every client")
    args = ap.parse_args()
    for p in (AGENT, BENCH):
        if not os.access(p, os.X_OK):
            sys.exit(f"{p} missing: build with cargo build --release --bins --examples")
    # Generate the gRPC stubs now, not inside the first start-up timing.
    lk.stubs()
    workdir = tempfile.mkdtemp(prefix="nic-agent-bench-")
    t_start = time.monotonic()
    mach = machine(args.skip_qemu)
    results, extra = [], {}
    ok = False
    try:
        phase_testdriver(workdir, args.test_per_vm, args.test_vms, results)
        if not args.skip_qemu:
            phase_qemu(workdir, args.guests, args.per_guest, results, extra,
                       args.persistent_guests)
        ok = all(r["ok"] == r["requests"] for r in results)
    finally:
        if not args.skip_qemu:
            lk.script("teardown.sh", PREFIX, check=False)
            lk.script("net.sh", "down", BRIDGE, check=False)
        # A run with a failed request or an abort keeps the agents' logs:
        # they say why (a call timeout, a lost connection, a guest).
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir} (agent-*.stderr: the agents' logs)")
    extra["total_s"] = time.monotonic() - t_start
    md = table(results, extra, mach)
    with open(args.json, "w") as f:
        json.dump({"machine": mach, "results": results, "summary": extra}, f, indent=2)
    print(md)
    print(f"\nJSON: {args.json}  (bench took {extra['total_s']:.0f}s)")
    if args.write_md:
        path = os.path.join(HERE, "RESULTS.md")
        # Hand-written notes (from "## Notes" on) survive a re-run.
        notes = ""
        if os.path.exists(path):
            old = open(path).read()
            if "\n## Notes" in old:
                notes = old[old.index("\n## Notes"):]
        with open(path, "w") as f:
            f.write("# nic-agent attach benchmark\n\nProduced by `bash bench/run.sh --write-md` "
                    f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
                    + md + "\n" + notes)
    failed = sum(r["requests"] - r["ok"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
