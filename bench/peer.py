#!/usr/bin/python3
"""The python-libvirt peer for bench/run.sh, and the lab's NIC sweeper.

`run`: what a simple Python hot-plug service does per request -- look the
domain up by name, dump its XML (to check for the MAC, as such services do),
then virDomainAttachDeviceFlags(LIVE) -- with N clients pulling from one
queue over one shared connection. Prints the same JSON as examples/bench.rs.

`clean`: detaches every live <interface> of the given domains (one thread
per domain) and waits until libvirt reports them gone, so each benchmark
phase starts from guests without NICs.

Needs Debian's python3-libvirt, so run it with /usr/bin/python3.
"""
import argparse
import json
import re
import sys
import threading
import time

import libvirt


def read_jobs(path):
    jobs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                sys.exit(f"{path}:{n}: want `VM MAC`")
            jobs.append((parts[0], parts[1]))
    return jobs


def percentile(sorted_s, p):
    if not sorted_s:
        return 0.0
    rank = max(1, -(-len(sorted_s) * p // 100))
    return sorted_s[min(int(rank), len(sorted_s)) - 1] * 1000.0


def run(args):
    jobs = read_jobs(args.jobs)
    with open(args.template) as f:
        template = f.read()
    conn = libvirt.open(args.uri)
    lock = threading.Lock()
    state = {"next": 0, "ok": [], "errors": {}, "first_error": None}

    def worker():
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= len(jobs):
                return
            vm, mac = jobs[i]
            xml = template.replace("{mac}", mac).replace("{alias}",
                                                         "ua-bench-" + mac.replace(":", ""))
            t0 = time.perf_counter()
            try:
                dom = conn.lookupByName(vm)
                if mac.lower() in dom.XMLDesc(0).lower():
                    raise RuntimeError(f"MAC {mac} already in {vm}")
                dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                dt = time.perf_counter() - t0
                with lock:
                    state["ok"].append(dt)
            except (libvirt.libvirtError, RuntimeError) as e:
                kind = str(e.get_error_code()) if isinstance(e, libvirt.libvirtError) else "dup"
                with lock:
                    state["errors"][kind] = state["errors"].get(kind, 0) + 1
                    state["first_error"] = state["first_error"] or str(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(max(1, args.concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    conn.close()
    ok = sorted(state["ok"])
    print(json.dumps({
        "mode": "python-peer",
        "label": args.label,
        "concurrency": args.concurrency,
        "requests": len(jobs),
        "ok": len(ok),
        "errors": state["errors"],
        "first_error": state["first_error"],
        "wall_s": wall,
        "throughput_per_s": len(ok) / wall if wall > 0 else 0.0,
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "mean_ms": (sum(ok) * 1000.0 / len(ok)) if ok else 0.0,
        "max_ms": ok[-1] * 1000.0 if ok else 0.0,
    }))


IFACE = re.compile(r"<interface\b.*?</interface>", re.S)
MAC = re.compile(r"<mac address=['\"]([0-9a-fA-F:]{17})['\"]")


def clean(args):
    conn = libvirt.open(args.uri)
    failures = []

    def sweep(name):
        try:
            dom = conn.lookupByName(name)
            for iface in IFACE.findall(dom.XMLDesc(0)):
                dom.detachDeviceFlags(iface, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            deadline = time.monotonic() + args.timeout
            while IFACE.search(dom.XMLDesc(0)):
                if time.monotonic() >= deadline:
                    left = MAC.findall(dom.XMLDesc(0))
                    failures.append(f"{name}: NICs still present after {args.timeout}s: {left}")
                    return
                time.sleep(0.05)
        except libvirt.libvirtError as e:
            failures.append(f"{name}: {e}")

    threads = [threading.Thread(target=sweep, args=(n,)) for n in args.vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.close()
    if failures:
        sys.exit("clean failed:\n" + "\n".join(failures))


def detach_event(args):
    """raw-event: one client detaches every NIC of the given guests, one at
    a time: virDomainDetachDeviceFlags(LIVE), then a wait on libvirt's
    DEVICE_REMOVED event for that device's alias -- the fastest a caller can
    know that the guest let go. Prints one JSON object like `run`."""
    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open(args.uri)
    removed = {}
    cond = threading.Condition()

    def on_removed(_conn, dom, alias, _opaque):
        with cond:
            removed[(dom.UUIDString(), alias)] = time.perf_counter()
            cond.notify_all()

    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, on_removed, None)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()
    alias_re = re.compile(r"<alias name=['\"]([^'\"]+)['\"]")
    lat, errors, t_start = [], [], time.perf_counter()
    for name in args.vms:
        dom = conn.lookupByName(name)
        for iface in IFACE.findall(dom.XMLDesc(0)):
            m = alias_re.search(iface)
            if not m:
                errors.append(f"{name}: a NIC without alias")
                continue
            key = (dom.UUIDString(), m.group(1))
            t0 = time.perf_counter()
            try:
                dom.detachDeviceFlags(iface, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as e:
                errors.append(f"{name}: {e}")
                continue
            with cond:
                ok = cond.wait_for(lambda: key in removed, timeout=args.timeout)
            if not ok:
                errors.append(f"{name} {key[1]}: no DEVICE_REMOVED in {args.timeout}s")
                continue
            lat.append(removed[key] - t0)
    wall = time.perf_counter() - t_start
    stop.set()
    conn.close()
    lat.sort()
    print(json.dumps({
        "mode": "raw-event", "label": args.label, "concurrency": 1,
        "requests": len(lat) + len(errors), "ok": len(lat), "errors": errors[:5],
        "wall_s": wall,
        "throughput_per_s": len(lat) / wall if wall > 0 else 0.0,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] * 1000.0 if lat else 0.0,
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--uri", required=True)
    r.add_argument("--jobs", required=True)
    r.add_argument("--template", required=True)
    r.add_argument("--concurrency", type=int, default=1)
    r.add_argument("--label", default="")
    c = sub.add_parser("clean")
    c.add_argument("--uri", required=True)
    c.add_argument("--timeout", type=float, default=60)
    c.add_argument("vms", nargs="+")
    d = sub.add_parser("detach-event")
    d.add_argument("--uri", required=True)
    d.add_argument("--timeout", type=float, default=30)
    d.add_argument("--label", default="")
    d.add_argument("vms", nargs="+")
    args = ap.parse_args()
    {"run": run, "clean": clean, "detach-event": detach_event}[args.cmd](args)


if __name__ == "__main__":
    main()
