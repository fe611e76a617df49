//! Host networking against real kernel objects, each test inside its own
//! network namespace (never the root one). Needs root.

use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Output};

use nic_agent::host::naming;
use nic_agent::host::{
    mtu_preflight, HostConfig, HostErrorKind, HostNet, HostUndo, NetlinkHost, PlannedChange,
    PromiscState, SegmentDevice,
};
use nic_agent::nic::{BridgeName, Mtu, Segment, SwitchType, VlanId, Vni};
use serde_json::Value;

/// A named network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = format!("nicagent-t-{:08x}", rand::random::<u32>());
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args`, must succeed.
    fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// `ip -n <ns> args`, may fail.
    fn try_ip(&self, args: &[&str]) -> Output {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        Command::new("ip").args(&a).output().expect("spawn ip")
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut a = vec!["netns", "exec", self.name.as_str()];
        a.extend_from_slice(args);
        Command::new("ip")
            .args(&a)
            .output()
            .expect("spawn ip netns exec")
    }

    fn exists(&self, link: &str) -> bool {
        self.try_ip(&["link", "show", "dev", link]).status.success()
    }

    /// `ip -d -j link show dev <link>` as JSON.
    fn link_json(&self, link: &str) -> Value {
        let out = self.ip(&["-d", "-j", "link", "show", "dev", link]);
        let v: Value = serde_json::from_str(&out).expect("ip -j output is JSON");
        v.get(0).cloned().expect("one link")
    }

    fn link_names(&self) -> Vec<String> {
        let out = self.ip(&["-j", "link", "show"]);
        let v: Value = serde_json::from_str(&out).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }

    /// A label bridge with a veth standing in for the physical uplink.
    fn label_bridge(&self, bridge: &str, uplink: &str, peer: &str) {
        self.ip(&["link", "add", bridge, "type", "bridge"]);
        self.ip(&["link", "add", uplink, "type", "veth", "peer", "name", peer]);
        self.ip(&["link", "set", uplink, "master", bridge]);
        for l in [bridge, uplink, peer] {
            self.ip(&["link", "set", l, "up"]);
        }
    }

    /// Run `f` with a [`NetlinkHost`] bound inside this namespace, on a
    /// dedicated thread with its own current-thread runtime.
    fn run<T, F, Fut>(&self, config: HostConfig, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(NetlinkHost) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let path = format!("/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || {
            let fd = File::open(&path).expect("open netns");
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let host = NetlinkHost::new(config).expect("netlink host");
                f(host).await
            })
        });
        match handle.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn config(dir: &tempfile::TempDir) -> HostConfig {
    HostConfig {
        state_dir: dir.path().to_path_buf(),
        ..HostConfig::default()
    }
}

fn br(s: &str) -> BridgeName {
    BridgeName::try_from(s).expect("bridge name")
}

fn vni(n: u32) -> Segment {
    Segment::Vxlan(Vni::try_from(n).expect("vni"))
}

fn mtu(n: u32) -> Mtu {
    Mtu::try_from(n).expect("mtu")
}

async fn undo_all(host: &NetlinkHost, steps: Vec<HostUndo>) {
    for s in steps.into_iter().rev() {
        host.undo(s).await.expect("undo");
    }
}

#[test]
fn plain_and_untagged_resolve_to_the_label_bridge_itself() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr0", "veth0a", "veth0b");
    ns.ip(&[
        "link", "add", "notabr", "type", "veth", "peer", "name", "notabr-p",
    ]);
    let dir = tempfile::tempdir().expect("tmp");
    ns.run(config(&dir), |host| async move {
        for seg in [Segment::Plain, Segment::Untagged] {
            let plan = host
                .resolve(&br("cloudbr0"), SwitchType::LinuxBridge, &seg)
                .await
                .expect("resolve");
            assert_eq!(plan.bridge.as_str(), "cloudbr0");
            assert!(plan.changes.is_empty(), "{:?}", plan.changes);
            assert_eq!(plan.segment_device, None);
            assert_eq!(plan.bridge_mtu, 1500);
            assert_eq!(plan.overhead, 0);
            assert_eq!(host.prepare(&plan).await.expect("prepare"), vec![]);
        }
        let missing = host
            .resolve(&br("cloudbr9"), SwitchType::LinuxBridge, &Segment::Plain)
            .await
            .expect_err("missing label");
        assert_eq!(missing.kind(), HostErrorKind::NotFound, "{missing}");
        assert!(missing.to_string().contains("cloudbr9"), "{missing}");
        let wrong = host
            .resolve(&br("notabr"), SwitchType::LinuxBridge, &Segment::Plain)
            .await
            .expect_err("not a bridge");
        assert_eq!(wrong.kind(), HostErrorKind::FailedPrecondition, "{wrong}");
        assert!(wrong.to_string().contains("veth"), "{wrong}");
    });
}

#[test]
fn vxlan_resolve_plans_cloudstack_names_and_changes_nothing() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    let dir = tempfile::tempdir().expect("tmp");
    let before = ns.link_names();
    ns.run(config(&dir), |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(5000))
            .await
            .expect("resolve");
        assert_eq!(plan.bridge.as_str(), "brvx-5000");
        let Some(SegmentDevice::Vxlan(spec)) = &plan.segment_device else {
            panic!("expected vxlan device, got {:?}", plan.segment_device)
        };
        assert_eq!(spec.name, "vxlan5000");
        assert_eq!(spec.group.to_string(), "239.0.19.136");
        assert_eq!((spec.ttl, spec.dstport, spec.learning), (10, 4789, true));
        assert_eq!(spec.underlay, "cloudbr1");
        assert_eq!(plan.underlay.as_deref(), Some("cloudbr1"));
        assert_eq!(plan.overhead, 50);
        assert_eq!(plan.underlay_mtu, Some(1500));
        assert_eq!(plan.bridge_mtu, 1450);
        assert_eq!(
            plan.changes,
            vec![
                PlannedChange::CreateSegmentDevice("vxlan5000".into()),
                PlannedChange::CreateBridge("brvx-5000".into()),
                PlannedChange::Enslave {
                    port: "vxlan5000".into(),
                    bridge: "brvx-5000".into()
                },
            ]
        );
    });
    assert_eq!(ns.link_names(), before, "resolve must not change the host");
}

#[test]
fn vxlan_prepare_creates_marked_bridge_and_device_and_undo_removes_them() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    let dir = tempfile::tempdir().expect("tmp");
    let before = ns.link_names();
    let steps = ns.run(config(&dir), |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(5000))
            .await
            .expect("resolve");
        host.prepare(&plan).await.expect("prepare")
    });
    assert_eq!(
        steps,
        vec![
            HostUndo::DeleteLink {
                name: "vxlan5000".into()
            },
            HostUndo::DeleteLink {
                name: "brvx-5000".into()
            },
        ]
    );
    let vx = ns.link_json("vxlan5000");
    let data = &vx["linkinfo"]["info_data"];
    assert_eq!(vx["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(data["id"], 5000);
    assert_eq!(data["group"], "239.0.19.136");
    assert_eq!(data["port"], 4789);
    assert_eq!(data["ttl"], 10);
    assert_eq!(data["learning"], true);
    assert_eq!(data["link"], "cloudbr1");
    assert_eq!(vx["master"], "brvx-5000");
    assert_eq!(vx["ifalias"], "nic-agent");
    assert_eq!(vx["mtu"], 1450);
    let b = ns.link_json("brvx-5000");
    assert_eq!(b["linkinfo"]["info_kind"], "bridge");
    assert_eq!(b["ifalias"], "nic-agent");
    assert!(b["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .any(|f| f == "UP"));

    // Second attach on the same VNI: nothing left to do, nothing to undo.
    let again = ns.run(config(&dir), |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(5000))
            .await
            .expect("resolve");
        assert!(plan.changes.is_empty(), "{:?}", plan.changes);
        assert_eq!(plan.bridge_mtu, 1450);
        let steps2 = host.prepare(&plan).await.expect("prepare again");
        undo_all(&host, steps).await;
        steps2
    });
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(ns.link_names(), before, "undo leaves the host as it was");
}

#[test]
fn vxlan_traffic_passes_between_two_vteps() {
    let a = Netns::new();
    let b = Netns::new();
    // Underlay: cloudbr1 in each namespace, joined by a veth across them.
    for ns in [&a, &b] {
        ns.ip(&["link", "add", "cloudbr1", "type", "bridge"]);
        ns.ip(&["link", "set", "cloudbr1", "up"]);
    }
    a.ip(&[
        "link", "add", "veth-u", "type", "veth", "peer", "name", "veth-v",
    ]);
    a.ip(&["link", "set", "veth-v", "netns", &b.name]);
    a.ip(&["link", "set", "veth-u", "master", "cloudbr1", "up"]);
    b.ip(&["link", "set", "veth-v", "master", "cloudbr1", "up"]);
    a.ip(&["addr", "add", "10.77.0.1/24", "dev", "cloudbr1"]);
    b.ip(&["addr", "add", "10.77.0.2/24", "dev", "cloudbr1"]);
    let dir = tempfile::tempdir().expect("tmp");
    for ns in [&a, &b] {
        ns.run(config(&dir), |host| async move {
            let plan = host
                .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(5001))
                .await
                .expect("resolve");
            host.prepare(&plan).await.expect("prepare");
        });
    }
    a.ip(&["addr", "add", "192.168.77.1/24", "dev", "brvx-5001"]);
    b.ip(&["addr", "add", "192.168.77.2/24", "dev", "brvx-5001"]);
    let out = a.exec(&["busybox", "ping", "-c", "3", "-W", "3", "192.168.77.2"]);
    assert!(
        out.status.success(),
        "ping over VXLAN failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Negative: an address on a VNI nobody else joined is unreachable.
    let out = a.exec(&["busybox", "ping", "-c", "1", "-W", "1", "192.168.77.9"]);
    assert!(
        !out.status.success(),
        "ping to a non-existent VTEP peer must fail"
    );
}

#[test]
fn mtu_preflight_against_real_bridge_mtus() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    let dir = tempfile::tempdir().expect("tmp");
    ns.run(config(&dir), |host| async move {
        let mut plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(5002))
            .await
            .expect("resolve");
        // No requested MTU: the NIC is told the VXLAN bridge's 1450.
        assert_eq!(plan.plan_mtu(None, false).map(Mtu::get), Ok(1450));
        assert_eq!(
            plan.plan_mtu(Some(mtu(1400)), false).map(Mtu::get),
            Ok(1400)
        );
        // The new brvx bridge is capped at underlay - 50, so the error names
        // the underlay, not a bridge that does not exist yet.
        let e = plan
            .plan_mtu(Some(mtu(1500)), false)
            .expect_err("underlay too small");
        assert_eq!(
            e.to_string(),
            "mtu 1500 does not fit VXLAN 5002: underlay cloudbr1 has 1500, needs 1550 \
             (50 bytes VXLAN/IPv4 overhead); lower the NIC MTU to 1450 or raise cloudbr1's MTU"
        );
        // Raising the bridge cannot help: the 1500 underlay cannot carry 1550.
        let e = plan.plan_mtu(Some(mtu(1500)), true).expect_err("underlay");
        assert_eq!(
            e.to_string(),
            "mtu 1500 does not fit VXLAN 5002: underlay cloudbr1 has 1500, needs 1550 \
             (50 bytes VXLAN/IPv4 overhead); lower the NIC MTU to 1450 or raise cloudbr1's MTU"
        );
        // Plain bridge: refused, with both numbers.
        let mut plain = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &Segment::Plain)
            .await
            .expect("resolve plain");
        let e = plain
            .plan_mtu(Some(mtu(9000)), false)
            .expect_err("9000 on 1500");
        assert!(
            e.to_string().contains("9000") && e.to_string().contains("1500"),
            "{e}"
        );
    });
    // Jumbo underlay: now 1500 fits with a planned (undoable) raise.
    ns.ip(&["link", "set", "veth1a", "mtu", "1600"]);
    ns.ip(&["link", "set", "cloudbr1", "mtu", "1600"]);
    let before = ns.link_names();
    let steps = ns.run(config(&dir), |host| async move {
        let mut plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(5002))
            .await
            .expect("resolve");
        assert_eq!(plan.underlay_mtu, Some(1600));
        assert_eq!(
            plan.plan_mtu(Some(mtu(1500)), false).map(Mtu::get),
            Ok(1500)
        );
        assert_eq!(
            mtu_preflight(Some(mtu(1551)), 1550, Some(1600), 50).ok(),
            None
        );
        host.prepare(&plan).await.expect("prepare")
    });
    assert_eq!(ns.link_json("brvx-5002")["mtu"], 1550);
    ns.run(config(&dir), |host| undo_all_owned(host, steps));
    assert_eq!(ns.link_names(), before);
}

async fn undo_all_owned(host: NetlinkHost, steps: Vec<HostUndo>) {
    undo_all(&host, steps).await
}

#[test]
fn raise_bridge_mtu_option_plans_an_undoable_raise() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr0", "veth0a", "veth0b");
    ns.ip(&["link", "set", "veth0a", "mtu", "9000"]);
    ns.ip(&["link", "set", "cloudbr0", "mtu", "1500"]);
    let dir = tempfile::tempdir().expect("tmp");
    let steps = ns.run(config(&dir), |host| async move {
        let mut plan = host
            .resolve(&br("cloudbr0"), SwitchType::LinuxBridge, &Segment::Plain)
            .await
            .expect("resolve");
        assert!(plan.plan_mtu(Some(mtu(9000)), false).is_err());
        assert_eq!(plan.plan_mtu(Some(mtu(9000)), true).map(Mtu::get), Ok(9000));
        assert_eq!(
            plan.changes,
            vec![PlannedChange::RaiseMtu {
                link: "cloudbr0".into(),
                from: 1500,
                to: 9000
            }]
        );
        host.prepare(&plan).await.expect("prepare")
    });
    assert_eq!(
        steps,
        vec![HostUndo::SetMtu {
            link: "cloudbr0".into(),
            mtu: 1500
        }]
    );
    assert_eq!(ns.link_json("cloudbr0")["mtu"], 9000);
    ns.run(config(&dir), |host| undo_all_owned(host, steps));
    assert_eq!(ns.link_json("cloudbr0")["mtu"], 1500);
}

fn has_flag(v: &Value, flag: &str) -> bool {
    v["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .any(|f| f == flag)
}

#[test]
fn promiscuous_mode_reads_back_and_restores_even_after_agent_restart() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr0", "veth0a", "veth0b");
    let dir = tempfile::tempdir().expect("tmp");
    let state_dir: PathBuf = dir.path().to_path_buf();
    let original = PromiscState {
        promisc: false,
        ageing_time: 30000,
    };
    let undo = ns.run(config(&dir), move |host| async move {
        assert_eq!(
            host.promisc_state(&br("cloudbr0")).await.expect("state"),
            original
        );
        let undo = host.promisc_enable(&br("cloudbr0")).await.expect("enable");
        let now = host.promisc_state(&br("cloudbr0")).await.expect("state");
        assert_eq!(
            now,
            PromiscState {
                promisc: true,
                ageing_time: 0
            }
        );
        // Already flooding: a second IDS guest changes nothing.
        assert_eq!(
            host.promisc_enable(&br("cloudbr0")).await.expect("enable"),
            None
        );
        undo
    });
    assert_eq!(
        undo,
        Some(HostUndo::RestorePromisc {
            bridge: "cloudbr0".into(),
            original
        })
    );
    let j = ns.link_json("cloudbr0");
    assert!(has_flag(&j, "PROMISC"), "{j}");
    assert_eq!(j["linkinfo"]["info_data"]["ageing_time"], 0);
    assert!(state_dir.join("promisc-cloudbr0.json").exists());

    // A new agent process (new NetlinkHost) finds the original in the state dir.
    ns.run(config(&dir), move |host| async move {
        let saved = host
            .saved_promisc_state(&br("cloudbr0"))
            .await
            .expect("saved");
        assert_eq!(saved, Some(original));
        host.promisc_restore(&br("cloudbr0"), original)
            .await
            .expect("restore");
        assert_eq!(
            host.promisc_state(&br("cloudbr0")).await.expect("state"),
            original
        );
        assert_eq!(
            host.saved_promisc_state(&br("cloudbr0"))
                .await
                .expect("saved"),
            None
        );
    });
    let j = ns.link_json("cloudbr0");
    assert!(!has_flag(&j, "PROMISC"), "{j}");
    assert_eq!(j["linkinfo"]["info_data"]["ageing_time"], 30000);
    assert!(!state_dir.join("promisc-cloudbr0.json").exists());
}

#[test]
fn failed_prepare_rolls_back_and_leaves_no_links() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    let dir = tempfile::tempdir().expect("tmp");
    let plan = ns.run(config(&dir), |host| async move {
        host.resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(6000))
            .await
            .expect("resolve")
    });
    // Someone takes the bridge's name with a non-bridge link after the plan.
    ns.ip(&[
        "link",
        "add",
        "brvx-6000",
        "type",
        "veth",
        "peer",
        "name",
        "squat-p",
    ]);
    let before = ns.link_names();
    let err = ns.run(config(&dir), move |host| async move {
        host.prepare(&plan).await.expect_err("name conflict")
    });
    assert_eq!(err.kind(), HostErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("brvx-6000"), "{err}");
    assert!(
        !ns.exists("vxlan6000"),
        "vxlan device created before the failure must be gone"
    );
    assert!(
        ns.exists("brvx-6000"),
        "a link that is not ours must never be removed"
    );
    assert_eq!(ns.link_names(), before);
    // And resolve now refuses up front.
    let err = ns.run(config(&dir), |host| async move {
        host.resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(6000))
            .await
            .expect_err("conflict")
    });
    assert_eq!(err.kind(), HostErrorKind::FailedPrecondition);
}

#[test]
fn vlan_prepare_without_8021q_is_failed_precondition_and_leaves_nothing() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr0", "veth0a", "veth0b");
    ns.ip(&["link", "add", "cloudbr5", "type", "bridge"]);
    let kernel_has_vlan = ns
        .try_ip(&[
            "link", "add", "link", "veth0b", "name", "probe.7", "type", "vlan", "id", "7",
        ])
        .status
        .success();
    if kernel_has_vlan {
        ns.ip(&["link", "del", "probe.7"]);
    }
    let before = ns.link_names();
    let dir = tempfile::tempdir().expect("tmp");
    let result = ns.run(config(&dir), |host| async move {
        let vlan = Segment::Vlan(VlanId::try_from(100).expect("vlan"));
        let no_port = host
            .resolve(&br("cloudbr5"), SwitchType::LinuxBridge, &vlan)
            .await
            .expect_err("no physical port");
        assert_eq!(no_port.kind(), HostErrorKind::FailedPrecondition);
        assert!(
            no_port.to_string().contains("no physical port"),
            "{no_port}"
        );
        let plan = host
            .resolve(&br("cloudbr0"), SwitchType::LinuxBridge, &vlan)
            .await
            .expect("resolve");
        assert_eq!(plan.bridge.as_str(), "brveth0a-100");
        assert_eq!(
            plan.segment_device.as_ref().map(|d| d.name()),
            Some("veth0a.100")
        );
        let r = host.prepare(&plan).await;
        if let Ok(steps) = &r {
            undo_all(&host, steps.clone()).await;
        }
        r
    });
    if kernel_has_vlan {
        assert!(result.is_ok(), "{result:?}");
    } else {
        let err = result.expect_err("no 8021q here");
        assert_eq!(err.kind(), HostErrorKind::FailedPrecondition, "{err}");
        assert!(err.to_string().contains("8021q"), "{err}");
        assert!(err.to_string().contains("veth0a.100"), "{err}");
    }
    assert_eq!(ns.link_names(), before, "nothing left behind");
}

#[test]
fn cleanup_removes_only_agent_bridges_without_ports_and_respects_keep() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    // A same-named bridge made by someone else (CloudStack's scripts, an operator).
    ns.ip(&["link", "add", "brvx-7001", "type", "bridge"]);
    let dir = tempfile::tempdir().expect("tmp");
    ns.run(config(&dir), |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(7000))
            .await
            .expect("resolve");
        host.prepare(&plan).await.expect("prepare");
    });
    // A tap stand-in still plugged in.
    ns.ip(&[
        "link", "add", "vnet0", "type", "veth", "peer", "name", "vnet0-p",
    ]);
    ns.ip(&["link", "set", "vnet0", "master", "brvx-7000"]);
    let removed = ns.run(config(&dir), |host| async move {
        host.remove_bridge_if_unused(&br("brvx-7000"), &[])
            .await
            .expect("cleanup")
    });
    assert!(!removed, "bridge with a tap must stay");
    assert!(ns.exists("brvx-7000") && ns.exists("vxlan7000"));

    ns.ip(&["link", "del", "vnet0"]);
    let removed = ns.run(config(&dir), |host| async move {
        let keep = vec!["brvx-7000".to_string()];
        host.remove_bridge_if_unused(&br("brvx-7000"), &keep)
            .await
            .expect("cleanup")
    });
    assert!(!removed, "kept bridge must stay");
    assert!(ns.exists("brvx-7000"));

    let (ours, foreign, label, absent) = ns.run(config(&dir), |host| async move {
        (
            host.remove_bridge_if_unused(&br("brvx-7000"), &[])
                .await
                .expect("ours"),
            host.remove_bridge_if_unused(&br("brvx-7001"), &[])
                .await
                .expect("foreign"),
            host.remove_bridge_if_unused(&br("cloudbr1"), &[])
                .await
                .expect("label"),
            host.remove_bridge_if_unused(&br("brvx-7999"), &[])
                .await
                .expect("absent"),
        )
    });
    assert!(ours, "agent bridge without ports is removed");
    assert!(!foreign && !label && !absent);
    assert!(!ns.exists("brvx-7000") && !ns.exists("vxlan7000"));
    assert!(ns.exists("brvx-7001") && ns.exists("cloudbr1"));
}

#[test]
fn long_port_names_get_the_deterministic_short_form() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr0", "enp0s31f6longx", "enp-peer");
    let dir = tempfile::tempdir().expect("tmp");
    let plan = ns.run(config(&dir), |host| async move {
        host.resolve(
            &br("cloudbr0"),
            SwitchType::LinuxBridge,
            &Segment::Vlan(VlanId::try_from(4000).expect("vlan")),
        )
        .await
        .expect("resolve")
    });
    let dev = plan
        .segment_device
        .as_ref()
        .map(|d| d.name().to_string())
        .expect("dev");
    assert!(dev.len() <= 15 && plan.bridge.as_str().len() <= 15);
    assert_eq!(dev, naming::vlan_device("enp0s31f6longx", 4000));
    assert_eq!(
        plan.bridge.as_str(),
        naming::vlan_bridge("enp0s31f6longx", 4000)
    );
    assert_ne!(dev, "enp0s31f6longx.4000");
    assert!(plan.bridge.as_str().starts_with("brenp0s31f"));
}
