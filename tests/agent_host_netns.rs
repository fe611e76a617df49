//! The gRPC attach path with host networking on: the real agent runs inside
//! a private network namespace this test creates (never the root netns),
//! on the libvirt test driver, and builds CloudStack-style bridges with real
//! kernel links. Needs root, like the agent itself.

mod common;

use std::process::Command;

use common::*;
use tonic::Code;

/// A network namespace with a label bridge `cloudbr1` whose "physical"
/// port is a veth (this kernel has no dummy links). Deleted on drop.
struct Netns {
    name: String,
    dir: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?} failed");
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("nat-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        let n = name.as_str();
        for args in [
            vec!["-n", n, "link", "set", "lo", "up"],
            vec!["-n", n, "link", "add", "cloudbr1", "type", "bridge"],
            vec!["-n", n, "link", "add", "cloudbr2", "type", "bridge"],
            vec![
                "-n", n, "link", "add", "eth1", "type", "veth", "peer", "name", "wire1",
            ],
            vec!["-n", n, "link", "set", "eth1", "master", "cloudbr1"],
            vec!["-n", n, "link", "set", "eth1", "up"],
            vec!["-n", n, "link", "set", "wire1", "up"],
            vec!["-n", n, "link", "set", "cloudbr1", "up"],
            vec!["-n", n, "link", "set", "cloudbr2", "up"],
            vec!["-n", n, "addr", "add", "10.199.0.1/24", "dev", "cloudbr1"],
        ] {
            ip(&args);
        }
        Netns {
            name,
            dir: tempfile::tempdir().expect("tmp"),
        }
    }

    fn links(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            })
            .collect()
    }

    fn details(&self, link: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-d", "link", "show", link])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        let sock = self.dir.path().join("agent.sock");
        let state = self.dir.path().join("state");
        let mut args = vec![
            "--host-network",
            "on",
            "--state-dir",
            state.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        start_agent_in_netns(&self.name, &lab_uri(), sock.to_str().expect("utf8"), &args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test]
async fn vxlan_attach_builds_the_bridge_and_writes_the_bridge_mtu() {
    let ns = Netns::new("vx");
    let a = ns.agent(&[]);
    let mut c = client(&a).await;
    let mut n = nic("02:00:0d:00:00:01", "cloudbr1");
    n.broadcast_uri = "vxlan://5000".into();
    let r = attach(&mut c, "i-2-10-VM", n).await.expect("attach");
    let got = r.nic.expect("nic");
    assert_eq!(got.bridge, "brvx-5000");
    // The guest gets the bridge's MTU (underlay 1500 - 50), never a silent 1500.
    assert_eq!(got.mtu, 1450);
    let links = ns.links();
    assert!(links.contains(&"brvx-5000".to_string()), "{links:?}");
    let d = ns.details("vxlan5000");
    assert!(d.contains("vxlan id 5000"), "{d}");
    assert!(d.contains("239.0.19.136"), "{d}");
    assert!(d.contains("dstport 4789"), "{d}");
    assert!(d.contains("master brvx-5000"), "{d}");
}

#[tokio::test]
async fn vxlan_mtu_without_room_for_overhead_is_refused_and_leaves_nothing() {
    let ns = Netns::new("mtu");
    let a = ns.agent(&[]);
    let mut c = client(&a).await;
    let before = ns.links();
    let mut n = nic("02:00:0d:00:00:02", "cloudbr1");
    n.broadcast_uri = "vxlan://5001".into();
    n.mtu = Some(1500);
    let e = attach(&mut c, "i-2-10-VM", n.clone())
        .await
        .expect_err("1500 cannot fit");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("1550") || e.message().contains("50"),
        "{}",
        e.message()
    );
    assert_eq!(ns.links(), before, "refused attach left links behind");
    // The same NIC at 1450 fits.
    n.mtu = Some(1450);
    let r = attach(&mut c, "i-2-10-VM", n).await.expect("1450 fits");
    assert_eq!(r.nic.expect("nic").mtu, 1450);
}

#[tokio::test]
async fn libvirt_failure_after_prepare_rolls_back_the_new_bridge() {
    let ns = Netns::new("rb");
    let a = ns.agent(&[]);
    let mut c = client(&a).await;
    let mut first = nic("02:00:0d:00:00:03", "cloudbr1");
    first.alias = "ua-dup".into();
    attach(&mut c, "i-2-10-VM", first).await.expect("first");
    let before = ns.links();
    // libvirt refuses a second NIC with the same user alias, after the host
    // side (vxlan5002 in brvx-5002) was already built.
    let mut n = nic("02:00:0d:00:00:04", "cloudbr1");
    n.alias = "ua-dup".into();
    n.broadcast_uri = "vxlan://5002".into();
    let e = attach(&mut c, "i-2-10-VM", n)
        .await
        .expect_err("duplicate alias");
    assert_ne!(e.code(), Code::Ok);
    let after = ns.links();
    assert!(
        !after.contains(&"brvx-5002".to_string()),
        "orphaned bridge: {after:?}"
    );
    assert!(
        !after.contains(&"vxlan5002".to_string()),
        "orphaned vxlan: {after:?}"
    );
    assert_eq!(after, before);
}

#[tokio::test]
async fn ids_nic_turns_its_bridge_promiscuous_and_flooding() {
    let ns = Netns::new("ids");
    let a = ns.agent(&["--forbid-promisc", "cloudbr2"]);
    let mut c = client(&a).await;
    assert!(!ns.details("cloudbr1").contains("PROMISC"));
    let mut n = nic("02:00:0d:00:00:05", "cloudbr1");
    n.promiscuous = true;
    let r = attach(&mut c, "i-2-10-VM", n).await.expect("attach");
    assert!(r.nic.expect("nic").alias.starts_with("ua-ids-"));
    let d = ns.details("cloudbr1");
    assert!(d.contains("PROMISC"), "{d}");
    assert!(d.contains("ageing_time 0 "), "{d}");
    // Config can forbid IDS guests per bridge.
    let mut n = nic("02:00:0d:00:00:06", "cloudbr2");
    n.promiscuous = true;
    let e = attach(&mut c, "i-2-10-VM", n).await.expect_err("forbidden");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(!ns.details("cloudbr2").contains("PROMISC"));
}

#[tokio::test]
async fn vlan_on_a_kernel_without_8021q_is_a_clear_precondition_and_leaves_nothing() {
    let ns = Netns::new("vl");
    let a = ns.agent(&[]);
    let mut c = client(&a).await;
    let before = ns.links();
    let mut n = nic("02:00:0d:00:00:07", "cloudbr1");
    n.broadcast_uri = "vlan://100".into();
    match attach(&mut c, "i-2-10-VM", n).await {
        // A kernel with 8021q builds eth1.100 in breth1-100.
        Ok(r) => assert_eq!(r.nic.expect("nic").bridge, "breth1-100"),
        Err(e) => {
            assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
            assert!(e.message().contains("8021q"), "{}", e.message());
            assert_eq!(ns.links(), before);
        }
    }
}
