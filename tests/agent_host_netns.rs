//! The gRPC attach path with host networking on: the real agent runs inside
//! a private network namespace this test creates (never the root netns),
//! on the libvirt test driver, and builds CloudStack-style bridges with real
//! kernel links. Needs root, like the agent itself.

mod common;

use common::netns::Netns;
use common::*;
use tonic::Code;

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
    // Intended change (issue 12): no port is given, like CloudStack's
    // modifyvxlan.sh, so the kernel default applies (8472 here).
    let port = std::fs::read_to_string("/sys/module/vxlan/parameters/udp_port")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "8472".into());
    assert!(d.contains(&format!("dstport {port} ")), "{d}");
    assert!(!d.contains("dstport 4789"), "{d}");
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
    // The message carries the real numbers: what the underlay has, what the
    // NIC needs with VXLAN's 50 bytes, and the MTU that would fit.
    for want in ["has 1500", "needs 1550", "lower the NIC MTU to 1450"] {
        assert!(
            e.message().contains(want),
            "missing {want:?} in: {}",
            e.message()
        );
    }
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
    // libvirt says VIR_ERR_CONFIG_UNSUPPORTED ("non unique alias detected"),
    // which api/status.rs maps to INVALID_ARGUMENT: the request is at fault.
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("ua-dup"), "{}", e.message());
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
async fn ids_nic_turns_its_bridge_promiscuous_but_not_into_a_hub() {
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
    // Intended change (issue 13): no ageing_time 0, which flooded every
    // tenant; the sensor's copies come from tc mirror filters.
    assert!(!d.contains("ageing_time 0 "), "{d}");
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

#[tokio::test]
async fn an_idempotent_retry_puts_a_sensors_lost_ids_state_back() {
    let ns = Netns::new("idsre");
    let a = ns.agent(&[]);
    let mut c = client(&a).await;
    let mut n = nic("02:00:0d:00:00:07", "cloudbr1");
    n.promiscuous = true;
    attach(&mut c, "i-2-10-VM", n.clone())
        .await
        .expect("attach");
    assert!(ns.details("cloudbr1").contains("PROMISC"));
    // Someone (a restart of networking, an operator) took it away.
    common::netns::ip(&["-n", &ns.name, "link", "set", "cloudbr1", "promisc", "off"]);
    assert!(!ns.details("cloudbr1").contains("PROMISC"));
    let r = attach(&mut c, "i-2-10-VM", n).await.expect("retry");
    assert!(r.already_present, "{r:?}");
    let d = ns.details("cloudbr1");
    assert!(
        d.contains("PROMISC"),
        "the retry left the sensor blind: {d}"
    );
}
