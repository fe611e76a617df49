//! `Diagnose` against real kernel links: the agent runs with host
//! networking on inside a private network namespace, on the test driver.
//! The test driver's NICs have no real taps, so each test builds the path
//! of i-2-10-VM's first NIC (target dev `testnet0`, MAC 02:00:0a:00:00:01)
//! itself: `testnet0` is one end of a veth in bridge `cloudbr0`, and the
//! other end plays the guest from a second namespace, with the guest's MAC.
//! Then one hop is broken on purpose and doctor must name it as the FAULT.
//! Needs root, like the agent.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nic_agent::api::pb;

const VM: &str = "i-2-10-VM";
const MAC: &str = "02:00:0a:00:00:01";
const TAP: &str = "testnet0";

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// A host namespace with the NIC's path and a "guest" namespace holding the
/// other end of the tap stand-in. Both deleted on drop.
struct Lab {
    host: String,
    guest: String,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let host = format!("ndx-{tag}-{}", std::process::id());
        let guest = format!("ndg-{tag}-{}", std::process::id());
        for n in [&host, &guest] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
            ip(&["netns", "add", n]);
        }
        let (h, g) = (host.as_str(), guest.as_str());
        for args in [
            vec!["-n", h, "link", "set", "lo", "up"],
            // The NIC's bridge, MTU set explicitly like an operator would.
            vec!["-n", h, "link", "add", "cloudbr0", "type", "bridge"],
            vec!["-n", h, "link", "set", "cloudbr0", "mtu", "1500"],
            vec!["-n", h, "link", "set", "cloudbr0", "up"],
            vec!["-n", h, "addr", "add", "10.198.0.1/24", "dev", "cloudbr0"],
            // Its uplink: with a second port the kernel keeps the bridge at
            // the smallest port MTU, as on a real host.
            vec![
                "-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", "wire0",
            ],
            vec!["-n", h, "link", "set", "eth0", "master", "cloudbr0"],
            vec!["-n", h, "link", "set", "eth0", "up"],
            vec!["-n", h, "link", "set", "wire0", "up"],
            // A label bridge with a veth "uplink", for VXLAN segments.
            vec!["-n", h, "link", "add", "cloudbr1", "type", "bridge"],
            vec![
                "-n", h, "link", "add", "eth1", "type", "veth", "peer", "name", "wire1",
            ],
            vec!["-n", h, "link", "set", "eth1", "master", "cloudbr1"],
            vec!["-n", h, "link", "set", "eth1", "up"],
            vec!["-n", h, "link", "set", "wire1", "up"],
            vec!["-n", h, "link", "set", "cloudbr1", "up"],
            // The tap stand-in and the guest's end, with the guest's MAC.
            vec![
                "-n", h, "link", "add", TAP, "type", "veth", "peer", "name", "gst0",
            ],
            vec!["-n", h, "link", "set", "gst0", "netns", g],
            vec!["-n", h, "link", "set", TAP, "master", "cloudbr0"],
            vec!["-n", h, "link", "set", TAP, "up"],
            vec!["-n", g, "link", "set", "gst0", "address", MAC],
            vec!["-n", g, "link", "set", "gst0", "up"],
            vec!["-n", g, "addr", "add", "10.198.0.2/24", "dev", "gst0"],
        ] {
            ip(&args);
        }
        Lab {
            host,
            guest,
            dir: tempfile::tempdir().expect("tmp"),
        }
    }

    fn ip(&self, args: &[&str]) {
        let mut v = vec!["-n", self.host.as_str()];
        v.extend_from_slice(args);
        ip(&v);
    }

    /// The guest sends a few UDP datagrams to the bridge's address: ARP
    /// from the guest MAC, which the bridge learns and answers.
    fn guest_talks(&self) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.guest, "python3", "-c"])
            .arg(
                "import socket\n\
                 s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 for _ in range(3): s.sendto(b'x', ('10.198.0.1', 9))\n",
            )
            .status()
            .expect("python3");
        assert!(st.success());
    }

    fn agent(&self) -> Agent {
        let sock = self.dir.path().join("agent.sock");
        let state = self.dir.path().join("state");
        let persist = self.dir.path().join("persist");
        start_agent_in_netns(
            &self.host,
            &lab_uri(),
            sock.to_str().expect("utf8"),
            &[
                "--host-network",
                "on",
                "--state-dir",
                state.to_str().expect("utf8"),
                "--persist-dir",
                persist.to_str().expect("utf8"),
                "--bridge-grace-s",
                "0",
            ],
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in [&self.host, &self.guest] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

type Client = pb::nic_agent_client::NicAgentClient<tonic::transport::Channel>;

async fn diagnose(c: &mut Client, mac: &str) -> pb::DiagnoseResponse {
    c.diagnose(pb::DiagnoseRequest {
        vm: VM.into(),
        mac: mac.into(),
        request_id: String::new(),
        ..Default::default()
    })
    .await
    .expect("diagnose")
    .into_inner()
}

fn hop<'a>(r: &'a pb::DiagnoseResponse, name: &str) -> &'a pb::Hop {
    r.hops
        .iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("no hop {name} in {r:#?}"))
}

fn is(h: &pb::Hop, s: pb::HopStatus) -> bool {
    h.status == s as i32
}

/// Asserts `name` is the one FAULT of the report, with a fix.
fn only_fault(r: &pb::DiagnoseResponse, name: &str) {
    for h in &r.hops {
        if h.name == name {
            assert!(
                is(h, pb::HopStatus::Fault),
                "{name} should be FAULT: {r:#?}"
            );
            assert!(!h.fix.is_empty(), "{h:#?}");
        } else {
            assert!(!is(h, pb::HopStatus::Fault), "unexpected FAULT {h:#?}");
        }
    }
}

/// The healthy path, once the guest has spoken: every hop OK.
async fn healthy(lab: &Lab, c: &mut Client) -> pb::DiagnoseResponse {
    lab.guest_talks();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = diagnose(c, MAC).await;
        if r.hops.iter().all(|h| is(h, pb::HopStatus::Ok)) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "path never became all OK: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn healthy_path_reads_real_links_counters_and_fdb() {
    let lab = Lab::new("ok");
    let a = lab.agent();
    let mut c = client(&a).await;
    let r = healthy(&lab, &mut c).await;
    assert!(
        hop(&r, "tap").evidence.contains("enslaved to cloudbr0"),
        "{r:#?}"
    );
    assert!(
        hop(&r, "fdb").evidence.contains("learned on testnet0"),
        "{r:#?}"
    );
    assert!(
        hop(&r, "counters").evidence.contains("from guest"),
        "{r:#?}"
    );
    assert!(
        hop(&r, "mtu").evidence.contains("bridge cloudbr0 1500"),
        "{r:#?}"
    );
    // The uplink is the bridge's veth stand-in, not the tap stand-in (also
    // a veth): CloudStack's name patterns break the tie. ethtool reads a
    // veth's speed as 10000 Mb/s.
    let up = hop(&r, "uplink");
    for want in [
        "eth0 (port of cloudbr0): 10000 Mb/s",
        "carrier up",
        "rx_crc_errors 0",
        "no new errors within 1 s",
    ] {
        assert!(up.evidence.contains(want), "{want}: {up:#?}");
    }
}

#[tokio::test]
async fn an_uplink_without_carrier_is_an_uplink_fault() {
    let lab = Lab::new("up");
    let a = lab.agent();
    let mut c = client(&a).await;
    healthy(&lab, &mut c).await;
    // The far end of the uplink goes away: eth0 stays up but loses carrier,
    // as when a switch port or cable fails.
    lab.ip(&["link", "set", "wire0", "down"]);
    let r = diagnose(&mut c, MAC).await;
    only_fault(&r, "uplink");
    assert!(
        hop(&r, "uplink").evidence.contains("eth0 has no carrier"),
        "{r:#?}"
    );
    lab.ip(&["link", "set", "wire0", "up"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = diagnose(&mut c, MAC).await;
        if is(hop(&r, "uplink"), pb::HopStatus::Ok) {
            break;
        }
        assert!(Instant::now() < deadline, "uplink never OK again: {r:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn tap_detached_from_its_bridge_is_a_tap_fault() {
    let lab = Lab::new("nm");
    let a = lab.agent();
    let mut c = client(&a).await;
    healthy(&lab, &mut c).await;
    lab.ip(&["link", "set", TAP, "nomaster"]);
    let r = diagnose(&mut c, MAC).await;
    only_fault(&r, "tap");
    assert!(
        hop(&r, "tap").evidence.contains("testnet0 has no master"),
        "{r:#?}"
    );
    assert_eq!(hop(&r, "tap").fix, "ip link set testnet0 master cloudbr0");
    // The fix works: back to OK.
    lab.ip(&["link", "set", TAP, "master", "cloudbr0"]);
    let r = diagnose(&mut c, MAC).await;
    assert!(is(hop(&r, "tap"), pb::HopStatus::Ok), "{r:#?}");
}

#[tokio::test]
async fn bridge_down_is_a_bridge_fault() {
    let lab = Lab::new("bd");
    let a = lab.agent();
    let mut c = client(&a).await;
    healthy(&lab, &mut c).await;
    lab.ip(&["link", "set", "cloudbr0", "down"]);
    let r = diagnose(&mut c, MAC).await;
    only_fault(&r, "bridge");
    assert_eq!(hop(&r, "bridge").fix, "ip link set cloudbr0 up");
}

#[tokio::test]
async fn tap_mtu_above_the_bridge_is_an_mtu_fault() {
    let lab = Lab::new("mt");
    let a = lab.agent();
    let mut c = client(&a).await;
    healthy(&lab, &mut c).await;
    lab.ip(&["link", "set", TAP, "mtu", "1600"]);
    let r = diagnose(&mut c, MAC).await;
    only_fault(&r, "mtu");
    let m = hop(&r, "mtu");
    assert!(
        m.evidence
            .contains("tap testnet0 MTU 1600 > bridge cloudbr0 MTU 1500"),
        "{m:#?}"
    );
    assert!(m.fix.contains("raise cloudbr0 MTU to 1600"), "{m:#?}");
}

#[tokio::test]
async fn promiscuous_bridge_without_ids_nic_is_a_warning() {
    let lab = Lab::new("pr");
    let a = lab.agent();
    let mut c = client(&a).await;
    healthy(&lab, &mut c).await;
    lab.ip(&["link", "set", "cloudbr0", "promisc", "on"]);
    let r = diagnose(&mut c, MAC).await;
    assert!(is(hop(&r, "promisc"), pb::HopStatus::Warning), "{r:#?}");
    assert!(
        !r.hops.iter().any(|h| is(h, pb::HopStatus::Fault)),
        "{r:#?}"
    );
}

#[tokio::test]
async fn deleted_vxlan_device_is_a_segment_fault() {
    let lab = Lab::new("vx");
    let a = lab.agent();
    let mut c = client(&a).await;
    let mac = "02:00:0d:0d:00:01";
    let mut n = nic(mac, "cloudbr1");
    n.broadcast_uri = "vxlan://5000".into();
    c.attach_nic(pb::AttachNicRequest {
        vm: VM.into(),
        nic: Some(n),
        request_id: String::new(),
    })
    .await
    .expect("attach");
    let r = diagnose(&mut c, mac).await;
    let s = hop(&r, "segment");
    assert!(is(s, pb::HopStatus::Ok), "{r:#?}");
    for want in [
        "vxlan5000",
        "vni 5000",
        "group 239.0.19.136",
        "underlay cloudbr1 up",
    ] {
        assert!(s.evidence.contains(want), "{want}: {s:#?}");
    }
    assert!(is(hop(&r, "bridge"), pb::HopStatus::Ok), "{r:#?}");
    // The test driver gives hot-plugged NICs no tap, and doctor says so.
    assert!(is(hop(&r, "tap"), pb::HopStatus::Fault), "{r:#?}");

    lab.ip(&["link", "del", "vxlan5000"]);
    let r = diagnose(&mut c, mac).await;
    let s = hop(&r, "segment");
    assert!(is(s, pb::HopStatus::Fault), "{r:#?}");
    assert!(s.evidence.contains("vxlan5000 does not exist"), "{s:#?}");
    assert!(s.fix.contains("type vxlan id 5000"), "{s:#?}");
    assert!(is(hop(&r, "bridge"), pb::HopStatus::Ok), "{r:#?}");
}

/// A vxlan5000 on another UDP port than this host's configuration gives
/// (multicast flavour: no dstport, so the kernel default): a real kernel
/// device, re-made by hand with the IANA port and the agent's alias, as the
/// agent made them before it followed `modifyvxlan.sh`. doctor names the
/// port and, because the device is the agent's, the repair.
#[tokio::test]
async fn vxlan_device_on_the_wrong_port_is_a_segment_fault() {
    let lab = Lab::new("vp");
    let a = lab.agent();
    let mut c = client(&a).await;
    let mac = "02:00:0d:0d:00:02";
    let mut n = nic(mac, "cloudbr1");
    n.broadcast_uri = "vxlan://5000".into();
    c.attach_nic(pb::AttachNicRequest {
        vm: VM.into(),
        nic: Some(n),
        request_id: String::new(),
    })
    .await
    .expect("attach");
    let kernel: u16 = std::fs::read_to_string("/sys/module/vxlan/parameters/udp_port")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(8472);
    let r = diagnose(&mut c, mac).await;
    let s = hop(&r, "segment");
    assert!(is(s, pb::HopStatus::Ok), "{r:#?}");
    assert!(
        s.evidence
            .contains(&format!("port {kernel}, as vxlan.flavour multicast")),
        "{s:#?}"
    );

    let wrong = if kernel == 4789 { 4790 } else { 4789 };
    let wrong_s = wrong.to_string();
    lab.ip(&["link", "del", "vxlan5000"]);
    #[rustfmt::skip]
    lab.ip(&[
        "link", "add", "vxlan5000", "type", "vxlan", "id", "5000", "group", "239.0.19.136",
        "ttl", "10", "dstport", &wrong_s, "dev", "cloudbr1",
    ]);
    lab.ip(&["link", "set", "vxlan5000", "alias", "nic-agent"]);
    lab.ip(&["link", "set", "vxlan5000", "master", "brvx-5000"]);
    lab.ip(&["link", "set", "vxlan5000", "up"]);
    let r = diagnose(&mut c, mac).await;
    let s = hop(&r, "segment");
    assert!(is(s, pb::HopStatus::Fault), "{r:#?}");
    assert!(
        s.evidence.contains(&format!(
            "vxlan5000 uses UDP port {wrong}, this host is configured for {kernel} \
             (vxlan.flavour multicast, kernel default)"
        )),
        "{s:#?}"
    );
    assert!(
        s.fix.contains("nic-agent repair-vxlan --vni 5000"),
        "{s:#?}"
    );
    // Group, VNI and underlay are right, so the port is the only complaint.
    assert!(!s.evidence.contains("expected"), "{s:#?}");
    assert!(is(hop(&r, "bridge"), pb::HopStatus::Ok), "{r:#?}");
}
