//! Interoperability with hosts that cloudstack-agent prepared, on real
//! kernel links. Two private network namespaces stand for two hypervisor
//! hosts whose label bridges (`cloudbr1`) are joined by a veth underlay:
//!
//! - "cs" is prepared by the exact command sequence of CloudStack's
//!   `modifyvxlan.sh -o add -v VNI -p cloudbr1 -b brvx-VNI [-6]`, written
//!   out below from the script's documented steps;
//! - "agent" is prepared by the real `nic-agent serve` binary's AttachNic
//!   (libvirt test driver, host networking on).
//!
//! An address on each side's `brvx-VNI` bridge then proves that frames
//! cross: a UDP echo (no ping binary on the host) from the cs side to the
//! agent side, which needs ARP across the VXLAN first. The same run with
//! the agent pinned to port 4789 (what the agent did before issue 12) must
//! exchange nothing. Needs root; all traffic stays inside the two
//! namespaces this test makes.

mod common;

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const VNIS: [u32; 4] = [1, 1001, 5001, 16_777_215];

/// A private network namespace, deleted on drop (also on panic).
struct Ns {
    name: String,
}

impl Ns {
    fn new(tag: &str) -> Self {
        let name = format!(
            "ics-{tag}-{}-{:06x}",
            std::process::id(),
            rand::random::<u32>() & 0xffffff
        );
        run("ip", &["netns", "add", &name]);
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// `ip` that may fail (the script's tests), returning its stdout.
    fn try_ip(&self, args: &[&str]) -> Option<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        let out = Command::new("ip").args(&a).output().expect("spawn ip");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Run `f` on a thread inside this namespace.
    fn inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).expect("open netns");
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[derive(Clone, Copy, PartialEq)]
enum Underlay {
    V4,
    V6,
}

/// Two "hosts": `cloudbr1` in each, joined by a veth, with an underlay
/// address of the given family only (so the agent's auto rule picks it).
fn two_hosts(tag: &str, u: Underlay) -> (Ns, Ns) {
    let cs = Ns::new(&format!("{tag}c"));
    let ag = Ns::new(&format!("{tag}a"));
    for (ns, n) in [(&cs, 1), (&ag, 2)] {
        ns.ip(&["link", "add", "cloudbr1", "type", "bridge"]);
        match u {
            Underlay::V4 => ns.ip(&[
                "addr",
                "add",
                &format!("10.201.0.{n}/24"),
                "dev",
                "cloudbr1",
            ]),
            Underlay::V6 => ns.ip(&[
                "addr",
                "add",
                &format!("fd00:201::{n}/64"),
                "dev",
                "cloudbr1",
                "nodad",
            ]),
        };
    }
    cs.ip(&[
        "link", "add", "eth1", "type", "veth", "peer", "name", "eth1", "netns", &ag.name,
    ]);
    for ns in [&cs, &ag] {
        ns.ip(&["link", "set", "eth1", "master", "cloudbr1", "up"]);
        ns.ip(&["link", "set", "cloudbr1", "up"]);
    }
    (cs, ag)
}

/// `modifyvxlan.sh -o add -v VNI -p cloudbr1 -b brvx-VNI [-6]`, step by
/// step (the traffic label is a bridge with no master, so the script's
/// `brif` is cloudbr1 itself).
fn modifyvxlan_add(ns: &Ns, vni: u32, u: Underlay) {
    let (a, b, c) = ((vni >> 16) % 256, (vni >> 8) % 256, vni % 256);
    // The script prints the bytes in decimal; in the IPv6 group they are
    // then read as hex groups.
    let (fam, six, group, plen) = match u {
        Underlay::V4 => ("inet", "-4", format!("239.{a}.{b}.{c}"), 32),
        Underlay::V6 => ("inet6", "-6", format!("ff05::{a}:{b}:{c}"), 128),
    };
    let dev = format!("vxlan{vni}");
    let br = format!("brvx-{vni}");
    let id = vni.to_string();
    // 1. The group's route, unless it already leaves through the label.
    let routed = ns.try_ip(&[six, "route", "get", &group]).is_some_and(|r| {
        r.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w == ["dev", "cloudbr1"])
    });
    if !routed {
        ns.ip(&[
            six,
            "route",
            "add",
            &format!("{group}/{plen}"),
            "dev",
            "cloudbr1",
        ]);
    }
    // 2. The device: no dstport, so the kernel default applies.
    ns.ip(&[
        "-f", fam, "link", "add", &dev, "type", "vxlan", "id", &id, "group", &group, "ttl", "10",
        "dev", "cloudbr1",
    ]);
    ns.ip(&["link", "set", &dev, "up"]);
    // 3. No IPv6 on the device.
    ns.exec(&[
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{dev}.disable_ipv6=1"),
    ]);
    // 4. The bridge (brctl addbr; brctl setfd 0), the device in it, up.
    ns.ip(&["link", "add", &br, "type", "bridge", "forward_delay", "0"]);
    ns.ip(&["link", "set", &dev, "master", &br]);
    ns.ip(&["link", "set", &br, "up"]);
}

/// One UDP datagram from `from` to `to` inside the two namespaces, echoed
/// back. True when the echo arrived within `wait` (retrying: the first
/// packets wait for ARP, which crosses the VXLAN as multicast).
fn udp_echo(from: &Ns, src: &str, to: &Ns, dst: &str, wait: Duration) -> bool {
    let dst_addr: SocketAddr = format!("{dst}:7007").parse().expect("addr");
    let server = to.inside(move || {
        let s = UdpSocket::bind(dst_addr).expect("bind echo");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let end = Instant::now() + wait + Duration::from_secs(1);
        let mut buf = [0u8; 64];
        while Instant::now() < end {
            if let Ok((n, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], peer);
            }
        }
    });
    // Give the server time to bind.
    std::thread::sleep(Duration::from_millis(100));
    let src_addr: SocketAddr = format!("{src}:0").parse().expect("addr");
    let ok = from
        .inside(move || {
            let s = UdpSocket::bind(src_addr).expect("bind client");
            s.set_read_timeout(Some(Duration::from_millis(250)))
                .expect("timeout");
            let end = Instant::now() + wait;
            let mut buf = [0u8; 64];
            while Instant::now() < end {
                let _ = s.send_to(b"over-vxlan", dst_addr);
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    if &buf[..n] == b"over-vxlan" {
                        return true;
                    }
                }
            }
            false
        })
        .join()
        .expect("client thread");
    server.join().expect("server thread");
    ok
}

/// The agent in `ns`, with extra `serve` flags, its lock and state in `dir`.
fn agent_in(ns: &Ns, dir: &tempfile::TempDir, extra: &[&str]) -> Agent {
    let sock = dir.path().join("agent.sock");
    let state = dir.path().join("state");
    // Each agent stands for its own host: its segment records must not be
    // the host's /var/lib/nic-agent, which the IPv4 and IPv6 tests, run in
    // parallel, would share.
    let persist = dir.path().join("persist");
    let lock = dir.path().join("cloud/vxlan.lock");
    let mut args = vec![
        "--host-network",
        "on",
        "--state-dir",
        state.to_str().expect("utf8"),
        "--persist-dir",
        persist.to_str().expect("utf8"),
        "--vxlan-lock-file",
        lock.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    start_agent_in_netns(&ns.name, &lab_uri(), sock.to_str().expect("utf8"), &args)
}

/// Prepares every VNI on both hosts (cs by script, agent by AttachNic),
/// puts 192.168.<i>.1 / .2 on the two brvx bridges, and returns which VNIs
/// passed the echo.
async fn cross(cs: &Ns, ag: &Ns, agent: &Agent, u: Underlay, wait: Duration) -> Vec<(u32, bool)> {
    let mut c = client(agent).await;
    let mut out = Vec::new();
    for (i, vni) in VNIS.iter().enumerate() {
        modifyvxlan_add(cs, *vni, u);
        let mut n = nic(
            &format!("02:00:1c:00:{:02x}:{:02x}", u as u8, i + 1),
            "cloudbr1",
        );
        n.broadcast_uri = format!("vxlan://{vni}");
        let r = attach(&mut c, "i-2-10-VM", n)
            .await
            .unwrap_or_else(|e| panic!("attach vxlan://{vni}: {e:?}"));
        assert_eq!(r.nic.expect("nic").bridge, format!("brvx-{vni}"));
        let br = format!("brvx-{vni}");
        cs.ip(&[
            "addr",
            "add",
            &format!("192.168.{}.1/24", 100 + i),
            "dev",
            &br,
        ]);
        ag.ip(&[
            "addr",
            "add",
            &format!("192.168.{}.2/24", 100 + i),
            "dev",
            &br,
        ]);
    }
    for (i, vni) in VNIS.iter().enumerate() {
        let ok = udp_echo(
            cs,
            &format!("192.168.{}.1", 100 + i),
            ag,
            &format!("192.168.{}.2", 100 + i),
            wait,
        );
        out.push((*vni, ok));
    }
    out
}

/// What `ip -d link show vxlanN` says on each host, for failure messages.
fn devices(cs: &Ns, ag: &Ns) -> String {
    VNIS.iter()
        .map(|v| {
            let d = format!("vxlan{v}");
            format!(
                "cs: {}\nagent: {}",
                cs.try_ip(&["-d", "-o", "link", "show", &d])
                    .unwrap_or_default(),
                ag.try_ip(&["-d", "-o", "link", "show", &d])
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn interop(tag: &str, u: Underlay) {
    let (cs, ag) = two_hosts(tag, u);
    let dir = tempfile::tempdir().expect("tmp");
    let agent = agent_in(&ag, &dir, &[]);
    let got = cross(&cs, &ag, &agent, u, Duration::from_secs(5)).await;
    let failed: Vec<u32> = got.iter().filter(|(_, ok)| !ok).map(|(v, _)| *v).collect();
    assert!(
        failed.is_empty(),
        "no frames crossed between the CloudStack host and the agent host on VNIs {failed:?}\n{}",
        devices(&cs, &ag)
    );
    // The agent's device is the script's, attribute for attribute.
    for vni in VNIS {
        let d = format!("vxlan{vni}");
        let want = cs.ip(&["-d", "-j", "link", "show", &d]);
        let have = ag.ip(&["-d", "-j", "link", "show", &d]);
        let info = |s: &str| -> serde_json::Value {
            let v: serde_json::Value = serde_json::from_str(s).expect("json");
            v[0]["linkinfo"]["info_data"].clone()
        };
        assert_eq!(
            info(&have),
            info(&want),
            "{d} differs from modifyvxlan.sh's"
        );
        let sysctl = format!("/proc/sys/net/ipv6/conf/{d}/disable_ipv6");
        assert_eq!(ag.exec(&["cat", &sysctl]).trim(), "1", "IPv6 on {d}");
    }
}

#[tokio::test]
async fn agent_vxlan_talks_to_a_cloudstack_host_over_ipv4() {
    interop("4", Underlay::V4).await;
}

#[tokio::test]
async fn agent_vxlan_talks_to_a_cloudstack_host_over_ipv6() {
    interop("6", Underlay::V6).await;
}

/// The agent's old behaviour (port 4789) is exactly what this test exists
/// to catch: with it, nothing crosses.
#[tokio::test]
async fn an_agent_pinned_to_4789_exchanges_nothing_with_a_cloudstack_host() {
    let (cs, ag) = two_hosts("p", Underlay::V4);
    let dir = tempfile::tempdir().expect("tmp");
    let agent = agent_in(&ag, &dir, &["--vxlan-port", "4789"]);
    let got = cross(&cs, &ag, &agent, Underlay::V4, Duration::from_millis(1500)).await;
    assert!(
        got.iter().all(|(_, ok)| !ok),
        "frames crossed although the ports differ: {got:?}\n{}",
        devices(&cs, &ag)
    );
}
