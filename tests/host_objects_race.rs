//! Shared host objects under concurrent requests: several VMs attach to the
//! same new VXLAN segment at the same moment while one attach fails after
//! its host side was built. The failed attach's rollback must never take
//! the bridge from an attach that was answered OK.
//!
//! The real agent runs on the libvirt test driver inside a private network
//! namespace with real kernel links. The test driver creates no taps, so a
//! veth is enslaved for each NIC that was answered OK, standing in for its
//! tap. Needs root, like the agent.

mod common;

use common::netns::{ip, Netns};
use common::*;
use tonic::Code;

const ROUNDS: u32 = 50;
/// The test driver's VMs have ~27 free slots; a fresh agent (a fresh
/// test-driver state) every so many rounds keeps them from filling up.
const ROUNDS_PER_AGENT: u32 = 20;

fn vxlan_nic(mac: String, vni: u32, alias: Option<&str>) -> nic_agent::api::pb::NicSpec {
    let mut n = nic(&mac, "cloudbr1");
    n.broadcast_uri = format!("vxlan://{vni}");
    if let Some(a) = alias {
        n.alias = a.into();
    }
    n
}

/// i-2-10-VM gets a NIC with alias `ua-taken`, so another NIC with that
/// alias is refused by libvirt itself: after the agent built the host side.
async fn seed(a: &Agent) {
    let mut c = client(a).await;
    let mut keep = nic("02:00:0e:ff:00:01", "cloudbr2");
    keep.alias = "ua-taken".into();
    attach(&mut c, "i-2-10-VM", keep).await.expect("seed NIC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_attach_never_takes_the_bridge_from_a_concurrent_one() {
    let ns = Netns::new("race");
    // One multicast group per VNI: past the default 20 memberships the
    // kernel refuses to bring a VXLAN device up (CloudStack hosts with many
    // VNIs raise this limit too).
    let st = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-qw",
            "net.ipv4.igmp_max_memberships=1024",
        ])
        .status()
        .expect("sysctl");
    assert!(st.success());
    let mut agent = Some(ns.agent(&[]));
    seed(agent.as_ref().unwrap()).await;
    let mut stand_ins = 0u32;
    let mut ok_attaches = 0u32;
    for r in 0..ROUNDS {
        if r > 0 && r % ROUNDS_PER_AGENT == 0 {
            drop(agent.take());
            agent = Some(ns.agent(&[]));
            seed(agent.as_ref().unwrap()).await;
        }
        let a = agent.as_ref().unwrap();
        let vni = 7000 + r;
        let bridge = format!("brvx-{vni}");
        // Every fifth round only the failing attach runs: then nothing may
        // be left behind at all.
        let alone = r % 5 == 4;
        let (mut c1, mut c2, mut c3) = (client(a).await, client(a).await, client(a).await);
        let failing = attach(
            &mut c1,
            "i-2-10-VM",
            vxlan_nic(format!("02:00:0e:{:02x}:00:01", r), vni, Some("ua-taken")),
        );
        let ok1 = async {
            if alone {
                return None;
            }
            Some(
                attach(
                    &mut c2,
                    "i-3-20-VM",
                    vxlan_nic(format!("02:00:0e:{:02x}:00:02", r), vni, None),
                )
                .await,
            )
        };
        let ok2 = async {
            if alone {
                return None;
            }
            Some(
                attach(
                    &mut c3,
                    "r-4-VM",
                    vxlan_nic(format!("02:00:0e:{:02x}:00:03", r), vni, None),
                )
                .await,
            )
        };
        let (f, o1, o2) = tokio::join!(failing, ok1, ok2);
        let e = f.expect_err("a second ua-taken alias must be refused");
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "round {r}: {}",
            e.message()
        );

        let answered_ok: Vec<_> = [o1, o2]
            .into_iter()
            .flatten()
            .map(|o| o.unwrap_or_else(|e| panic!("round {r}: attach failed: {e:?}")))
            .collect();
        if alone {
            let links = ns.links();
            assert!(
                !links.contains(&bridge) && !links.contains(&format!("vxlan{vni}")),
                "round {r}: a rolled-back attach with nobody else on the segment left {links:?}"
            );
            continue;
        }
        for got in &answered_ok {
            let n = got.nic.as_ref().expect("nic");
            assert_eq!(n.bridge, bridge, "round {r}");
            ok_attaches += 1;
            // The NIC's stand-in tap: enslaving fails if the bridge the
            // answer named is gone.
            let v = format!("sti{stand_ins}");
            let p = format!("stp{stand_ins}");
            stand_ins += 1;
            ip(&[
                "-n", &ns.name, "link", "add", &v, "type", "veth", "peer", "name", &p,
            ]);
            ip(&["-n", &ns.name, "link", "set", &v, "master", &bridge, "up"]);
        }
        let links = ns.links();
        assert!(
            links.contains(&bridge),
            "round {r}: {bridge} is gone: {links:?}"
        );
        let d = ns.details(&format!("vxlan{vni}"));
        assert!(
            d.contains(&format!("master {bridge}")),
            "round {r}: vxlan{vni} not in its bridge: {d}"
        );
    }
    assert!(ok_attaches >= ROUNDS, "too few attaches ran: {ok_attaches}");

    // All NICs gone: a new agent's test-driver state has none of them, and
    // the stand-in taps go. The start-up reconcile then removes every
    // agent-made bridge and segment device.
    drop(agent.take());
    for i in 0..stand_ins {
        ip(&["-n", &ns.name, "link", "del", &format!("sti{i}")]);
    }
    let _a = ns.agent(&[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left: Vec<String> = ns
            .links()
            .into_iter()
            .filter(|l| l.starts_with("brvx-") || l.starts_with("vxlan"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reconcile left agent-made links behind: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
