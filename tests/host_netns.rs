//! Host networking against real kernel objects, each test inside its own
//! network namespace (never the root one). Needs root.

use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Output};

use nic_agent::host::naming;
use nic_agent::host::{
    mtu_preflight, HostConfig, HostErrorKind, HostNet, HostUndo, NetlinkHost, PlannedChange,
    PromiscState, SegmentDevice, VxlanFlavour, VxlanSettings,
};
use nic_agent::nic::{BridgeName, Mtu, Segment, SwitchType, TxQueueLen, VlanId, Vni};
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

    /// A file under /proc/sys as seen from inside the namespace.
    fn sysctl(&self, key: &str) -> String {
        let out = self.exec(&["cat", &format!("/proc/sys/{key}")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn exists(&self, link: &str) -> bool {
        self.try_ip(&["link", "show", "dev", link]).status.success()
    }

    /// A bridge port flag under /sys/class/net/<port>/brport, as seen from
    /// inside the namespace (`ip netns exec` mounts its own sysfs), and the
    /// same flag from `bridge -d -j link show dev <port>`.
    fn brport(&self, port: &str, flag: &str) -> (String, Value) {
        let out = self.exec(&["cat", &format!("/sys/class/net/{port}/brport/{flag}")]);
        assert!(out.status.success(), "{out:?}");
        let sys = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = self.exec(&["bridge", "-d", "-j", "link", "show", "dev", port]);
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).expect("bridge -j output is JSON");
        (sys, v[0][flag].clone())
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

/// The port a VXLAN device without `dstport` gets on this kernel.
fn kernel_port() -> u64 {
    std::fs::read_to_string("/sys/module/vxlan/parameters/udp_port")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(8472)
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
        // CloudStack's lock lives in a directory the test owns (absent
        // unless a test creates it), never in the real /var/run/cloud.
        vxlan: VxlanSettings {
            lock_file: dir.path().join("cloud/vxlan.lock"),
            ..VxlanSettings::default()
        },
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
        assert_eq!(
            spec.group.map(|g| g.to_string()).as_deref(),
            Some("239.0.19.136")
        );
        // No port at all, like modifyvxlan.sh: the kernel default applies.
        assert_eq!((spec.ttl, spec.port, spec.learning), (Some(10), None, true));
        assert_eq!(spec.underlay.as_deref(), Some("cloudbr1"));
        assert_eq!(plan.underlay.as_deref(), Some("cloudbr1"));
        assert_eq!(plan.overhead, 50);
        assert_eq!(plan.underlay_mtu, Some(1500));
        assert_eq!(plan.bridge_mtu, 1450);
        assert_eq!(
            plan.changes,
            vec![
                PlannedChange::AddRoute {
                    group: "239.0.19.136".parse().unwrap(),
                    dev: "cloudbr1".into()
                },
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
            HostUndo::DeleteRoute {
                group: "239.0.19.136".parse().unwrap(),
                dev: "cloudbr1".into()
            },
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
    // Intended change (issue 12): CloudStack's modifyvxlan.sh gives no
    // dstport, so the device has the kernel's default, not 4789.
    assert_eq!(data["port"], kernel_port());
    assert_eq!(ns.sysctl("net/ipv6/conf/vxlan5000/disable_ipv6"), "1");
    assert!(
        ns.ip(&["route", "show", "239.0.19.136"])
            .contains("dev cloudbr1"),
        "modifyvxlan.sh's group route"
    );
    assert_eq!(data["ttl"], 10);
    assert_eq!(data["learning"], true);
    assert_eq!(data["link"], "cloudbr1");
    assert_eq!(vx["master"], "brvx-5000");
    // modifyvxlan.sh leaves the bridge port as the kernel makes it; only
    // the EVPN flavour suppresses neighbours and learning there.
    assert_eq!(
        ns.brport("vxlan5000", "neigh_suppress"),
        ("0".into(), false.into())
    );
    assert_eq!(
        ns.brport("vxlan5000", "learning"),
        ("1".into(), true.into())
    );
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
    assert_eq!(
        ns.ip(&["route", "show", "239.0.19.136"]),
        "",
        "route undone"
    );
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
        // Intended change (issue 13): IDS no longer sets ageing_time 0 (a
        // hub for every tenant); the bridge keeps learning.
        assert_eq!(
            now,
            PromiscState {
                promisc: true,
                ageing_time: 30000
            }
        );
        // Already promiscuous: a second IDS guest changes nothing.
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
    assert_eq!(j["linkinfo"]["info_data"]["ageing_time"], 30000);
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

/// A VXLAN device the agent made before this version (port 4789), in its
/// bridge: what `repair-vxlan` is for.
fn old_agent_vxlan(ns: &Netns, vni: u32, alias: bool) {
    let dev = format!("vxlan{vni}");
    let br = format!("brvx-{vni}");
    let group = format!("239.0.{}.{}", vni >> 8 & 255, vni & 255);
    let id = vni.to_string();
    ns.ip(&[
        "link", "add", &dev, "type", "vxlan", "id", &id, "group", &group, "ttl", "10", "dstport",
        "4789", "dev", "cloudbr1",
    ]);
    ns.ip(&["link", "add", &br, "type", "bridge"]);
    if alias {
        ns.ip(&["link", "set", &dev, "alias", "nic-agent"]);
        ns.ip(&["link", "set", &br, "alias", "nic-agent"]);
    }
    ns.ip(&["link", "set", &dev, "master", &br, "up"]);
    ns.ip(&["link", "set", &br, "up"]);
}

#[test]
fn a_vxlan_device_with_another_port_is_refused_with_the_difference_and_the_fix() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    old_agent_vxlan(&ns, 1001, true);
    old_agent_vxlan(&ns, 1002, false);
    let before = ns.link_names();
    let dir = tempfile::tempdir().expect("tmp");
    let (ours, foreign) = ns.run(config(&dir), |host| async move {
        let ours = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(1001))
            .await
            .expect_err("port 4789 differs");
        let foreign = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(1002))
            .await
            .expect_err("port 4789 differs");
        (ours, foreign)
    });
    let port = kernel_port();
    assert_eq!(ours.kind(), HostErrorKind::FailedPrecondition, "{ours}");
    let m = ours.to_string();
    assert!(
        m.starts_with(&format!(
            "vxlan1001 uses UDP port 4789, this host is configured for {port}"
        )),
        "{m}"
    );
    assert!(m.contains("nic-agent repair-vxlan --vni 1001"), "{m}");
    let m = foreign.to_string();
    assert_eq!(foreign.kind(), HostErrorKind::FailedPrecondition, "{m}");
    assert!(m.contains("not made by nic-agent"), "{m}");
    assert!(
        !m.contains("repair-vxlan"),
        "repair never touches foreign devices: {m}"
    );
    assert_eq!(ns.link_names(), before, "nothing was changed");
    assert_eq!(
        ns.link_json("vxlan1001")["linkinfo"]["info_data"]["port"],
        4789
    );
}

#[test]
fn repair_vxlan_recreates_only_agent_devices_in_the_same_bridge() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    old_agent_vxlan(&ns, 1001, true);
    old_agent_vxlan(&ns, 1003, true);
    old_agent_vxlan(&ns, 1002, false);
    let dir = tempfile::tempdir().expect("tmp");
    let lock_dir = dir.path().join("cloud");
    std::fs::create_dir(&lock_dir).expect("lock dir");
    let lock = lock_dir.join("vxlan.lock");
    let run = |extra: &[&str]| {
        let mut args = vec![
            env!("CARGO_BIN_EXE_nic-agent"),
            "repair-vxlan",
            "--config",
            "/dev/null",
            "--vxlan-lock-file",
            lock.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        let out = ns.exec(&args);
        assert!(
            out.status.success(),
            "repair-vxlan failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // --vni limits it to one device.
    let out = run(&["--vni", "1003"]);
    assert!(
        out.contains("vxlan1003 in brvx-1003: uses UDP port 4789"),
        "{out}"
    );
    assert!(out.contains("interrupted for"), "{out}");
    assert!(!out.contains("vxlan1001"), "{out}");
    assert_eq!(
        ns.link_json("vxlan1001")["linkinfo"]["info_data"]["port"],
        4789
    );

    let out = run(&[]);
    let port = kernel_port();
    assert!(
        out.contains("vxlan1001 in brvx-1001: uses UDP port 4789"),
        "{out}"
    );
    assert!(
        out.contains("vxlan1003 in brvx-1003: as configured"),
        "{out}"
    );
    assert!(
        out.contains("vxlan1002 in brvx-1002: uses UDP port 4789"),
        "{out}"
    );
    assert!(out.contains("not made by nic-agent, left alone"), "{out}");
    for vni in [1001, 1003] {
        let v = ns.link_json(&format!("vxlan{vni}"));
        let data = &v["linkinfo"]["info_data"];
        assert_eq!(data["port"], port, "{v}");
        assert_eq!(data["id"], vni);
        assert_eq!(data["link"], "cloudbr1");
        assert_eq!(v["master"], format!("brvx-{vni}"), "re-enslaved: {v}");
        assert_eq!(v["ifalias"], "nic-agent");
        assert!(has_flag(&v, "UP"), "{v}");
        assert_eq!(
            ns.sysctl(&format!("net/ipv6/conf/vxlan{vni}/disable_ipv6")),
            "1"
        );
    }
    assert_eq!(
        ns.link_json("vxlan1002")["linkinfo"]["info_data"]["port"],
        4789
    );
    assert!(lock.exists(), "CloudStack's lock was taken");
    // And an attach now accepts the repaired device.
    ns.run(config(&dir), |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(1001))
            .await
            .expect("repaired device is accepted");
        assert!(
            plan.changes
                .iter()
                .all(|c| matches!(c, PlannedChange::AddRoute { .. })),
            "{:?}",
            plan.changes
        );
    });
}

#[test]
fn ipv6_underlay_gets_cloudstacks_ff05_group_route_and_overhead() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    ns.ip(&["addr", "add", "fd00:77::1/64", "dev", "cloudbr1", "nodad"]);
    let dir = tempfile::tempdir().expect("tmp");
    let before = ns.link_names();
    let steps = ns.run(config(&dir), |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(1001))
            .await
            .expect("resolve");
        assert_eq!(plan.overhead, 70, "IPv6 outer header");
        assert_eq!(plan.bridge_mtu, 1430);
        host.prepare(&plan).await.expect("prepare")
    });
    let data = ns.link_json("vxlan1001")["linkinfo"]["info_data"].clone();
    assert_eq!(data["group6"], "ff05::3:233", "{data}");
    assert_eq!(data["port"], kernel_port());
    assert!(
        ns.ip(&["-6", "route", "show", "ff05::3:233"])
            .contains("dev cloudbr1"),
        "{}",
        ns.ip(&["-6", "route", "show"])
    );
    ns.run(config(&dir), |host| undo_all_owned(host, steps));
    assert_eq!(ns.link_names(), before);
    assert_eq!(ns.ip(&["-6", "route", "show", "ff05::3:233"]), "");
}

#[test]
fn evpn_flavour_pins_4789_without_learning_group_or_route() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = config(&dir);
    cfg.vxlan.flavour = VxlanFlavour::Evpn;
    // No VTEP address on lo: refused, naming what to add.
    let e = ns.run(cfg.clone(), |host| async move {
        host.resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(7001))
            .await
            .expect_err("no VTEP on lo")
    });
    assert_eq!(e.kind(), HostErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("dev lo"), "{e}");
    ns.ip(&["addr", "add", "10.255.0.7/32", "dev", "lo"]);
    let cfg2 = cfg.clone();
    let steps = ns.run(cfg, |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(7001))
            .await
            .expect("resolve");
        assert!(
            !plan
                .changes
                .iter()
                .any(|c| matches!(c, PlannedChange::AddRoute { .. })),
            "{:?}",
            plan.changes
        );
        host.prepare(&plan).await.expect("prepare")
    });
    let data = ns.link_json("vxlan7001")["linkinfo"]["info_data"].clone();
    assert_eq!(data["port"], 4789, "{data}");
    assert_eq!(data["learning"], false, "{data}");
    assert_eq!(data["local"], "10.255.0.7", "{data}");
    assert!(
        data.get("group").is_none() && data.get("link").is_none(),
        "{data}"
    );
    assert_eq!(ns.sysctl("net/ipv6/conf/vxlan7001/disable_ipv6"), "1");
    assert_eq!(ns.sysctl("net/ipv6/conf/brvx-7001/disable_ipv6"), "1");
    // modifyvxlan-evpn.sh: `bridge link set dev vxlanN neigh_suppress on
    // learning off` on the device's bridge port.
    assert_eq!(
        ns.brport("vxlan7001", "neigh_suppress"),
        ("1".into(), true.into())
    );
    assert_eq!(
        ns.brport("vxlan7001", "learning"),
        ("0".into(), false.into())
    );
    assert_eq!(steps.len(), 2, "{steps:?}");

    // An agent-made port that lost them (an agent before this change
    // enslaved it without) gets them back on the next attach.
    ns.exec(&[
        "bridge",
        "link",
        "set",
        "dev",
        "vxlan7001",
        "neigh_suppress",
        "off",
        "learning",
        "on",
    ]);
    assert_eq!(
        ns.brport("vxlan7001", "learning"),
        ("1".into(), true.into())
    );
    let again = ns.run(cfg2, |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(7001))
            .await
            .expect("resolve");
        host.prepare(&plan).await.expect("prepare again")
    });
    assert!(again.is_empty(), "nothing new to undo: {again:?}");
    assert_eq!(
        ns.brport("vxlan7001", "neigh_suppress"),
        ("1".into(), true.into())
    );
    assert_eq!(
        ns.brport("vxlan7001", "learning"),
        ("0".into(), false.into())
    );
    // repair-vxlan re-creates an agent-made EVPN device on the wrong port
    // with the port settings too.
    ns.ip(&["link", "del", "vxlan7001"]);
    #[rustfmt::skip]
    ns.ip(&[
        "link", "add", "vxlan7001", "type", "vxlan", "id", "7001", "local", "10.255.0.7",
        "dstport", "4790", "nolearning",
    ]);
    ns.ip(&["link", "set", "vxlan7001", "alias", "nic-agent"]);
    ns.ip(&["link", "set", "vxlan7001", "master", "brvx-7001"]);
    assert_eq!(
        ns.brport("vxlan7001", "learning"),
        ("1".into(), true.into())
    );
    let no_lock = dir.path().join("no-cloud/vxlan.lock");
    #[rustfmt::skip]
    let out = ns.exec(&[
        env!("CARGO_BIN_EXE_nic-agent"), "repair-vxlan", "--config", "/dev/null",
        "--vxlan-flavour", "evpn", "--vni", "7001",
        "--vxlan-lock-file", no_lock.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{out:?}");
    let vx = ns.link_json("vxlan7001");
    assert_eq!(vx["linkinfo"]["info_data"]["port"], 4789, "{vx}");
    assert_eq!(vx["master"], "brvx-7001", "{vx}");
    assert_eq!(
        ns.brport("vxlan7001", "neigh_suppress"),
        ("1".into(), true.into())
    );
    assert_eq!(
        ns.brport("vxlan7001", "learning"),
        ("0".into(), false.into())
    );
}

#[test]
fn vxlan_changes_wait_for_cloudstacks_lock() {
    use nix::fcntl::{Flock, FlockArg};
    let ns = Netns::new();
    ns.label_bridge("cloudbr1", "veth1a", "veth1b");
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(dir.path().join("cloud")).expect("dir");
    let mut cfg = config(&dir);
    cfg.vxlan.lock_wait = std::time::Duration::from_millis(300);
    let file = std::fs::File::create(&cfg.vxlan.lock_file).expect("lock file");
    // cloudstack-agent's modifyvxlan.sh is running (holds the lock).
    let held = Flock::lock(file, FlockArg::LockExclusive).expect("flock");
    let before = ns.link_names();
    let c = cfg.clone();
    let e = ns.run(c, |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(5005))
            .await
            .expect("resolve only reads");
        host.prepare(&plan).await.expect_err("lock held")
    });
    assert_eq!(e.kind(), HostErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("vxlan.lock"), "{e}");
    assert_eq!(ns.link_names(), before, "nothing made without the lock");
    drop(held);
    ns.run(cfg, |host| async move {
        let plan = host
            .resolve(&br("cloudbr1"), SwitchType::LinuxBridge, &vni(5005))
            .await
            .expect("resolve");
        host.prepare(&plan).await.expect("lock free");
    });
    assert!(ns.exists("vxlan5005"));
}

#[test]
fn vlan_parent_is_never_a_tap_even_one_named_like_a_nic() {
    let ns = Netns::new();
    ns.ip(&["link", "add", "cloudbr0", "type", "bridge"]);
    // A tap named like a NIC, listed first, and a tap named like CloudStack's.
    ns.ip(&["tuntap", "add", "eth5", "mode", "tap"]);
    ns.ip(&["tuntap", "add", "vnet7", "mode", "tap"]);
    ns.ip(&["link", "set", "eth5", "master", "cloudbr0"]);
    ns.ip(&["link", "set", "vnet7", "master", "cloudbr0"]);
    let dir = tempfile::tempdir().expect("tmp");
    let vlan = Segment::Vlan(VlanId::try_from(100).expect("vlan"));
    let e = ns.run(config(&dir), move |host| async move {
        host.resolve(&br("cloudbr0"), SwitchType::LinuxBridge, &vlan)
            .await
            .expect_err("only taps")
    });
    assert_eq!(e.kind(), HostErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("no physical port"), "{e}");
    // The lab's stand-in uplink (a veth) is used when nothing better is there.
    ns.ip(&[
        "link", "add", "up0", "type", "veth", "peer", "name", "up0-p",
    ]);
    ns.ip(&["link", "set", "up0", "master", "cloudbr0"]);
    let plan = ns.run(config(&dir), move |host| async move {
        host.resolve(&br("cloudbr0"), SwitchType::LinuxBridge, &vlan)
            .await
            .expect("veth stand-in")
    });
    assert_eq!(plan.bridge.as_str(), "brup0-100");
    assert_eq!(
        plan.segment_device.as_ref().map(|d| d.name()),
        Some("up0.100")
    );
}

#[test]
fn bridge_left_at_ageing_zero_by_the_old_ids_mode_gets_its_ageing_back() {
    let ns = Netns::new();
    ns.label_bridge("cloudbr0", "veth0a", "veth0b");
    let dir = tempfile::tempdir().expect("tmp");
    // What the old version left: its saved original, and a flooding bridge.
    std::fs::write(
        dir.path().join("promisc-cloudbr0.json"),
        br#"{"promisc":false,"ageing_time":30000}"#,
    )
    .expect("write old state");
    ns.ip(&[
        "link",
        "set",
        "cloudbr0",
        "promisc",
        "on",
        "type",
        "bridge",
        "ageing_time",
        "0",
    ]);
    ns.run(config(&dir), move |host| async move {
        // A sensor is still there: the bridge stays promiscuous, stops flooding.
        assert_eq!(
            host.repair_ageing(&br("cloudbr0")).await.expect("repair"),
            Some(30000)
        );
        assert_eq!(
            host.repair_ageing(&br("cloudbr0")).await.expect("repair"),
            None
        );
        let now = host.promisc_state(&br("cloudbr0")).await.expect("state");
        assert_eq!(
            now,
            PromiscState {
                promisc: true,
                ageing_time: 30000
            }
        );
    });
    // And a restore from that state puts everything back.
    ns.ip(&[
        "link",
        "set",
        "cloudbr0",
        "type",
        "bridge",
        "ageing_time",
        "0",
    ]);
    ns.run(config(&dir), move |host| async move {
        let saved = host
            .saved_promisc_state(&br("cloudbr0"))
            .await
            .expect("saved")
            .expect("old state file read");
        host.promisc_restore(&br("cloudbr0"), saved)
            .await
            .expect("restore");
    });
    let j = ns.link_json("cloudbr0");
    assert!(!has_flag(&j, "PROMISC"), "{j}");
    assert_eq!(j["linkinfo"]["info_data"]["ageing_time"], 30000);
}

/// `tc -j filter show dev X ingress` inside the namespace: the agent-range
/// priorities and their mirred targets.
fn agent_filters(ns: &Netns, dev: &str) -> Vec<(u64, String)> {
    let out = ns.exec(&["tc", "-j", "filter", "show", "dev", dev, "ingress"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    let mut found = Vec::new();
    for f in v.as_array().cloned().unwrap_or_default() {
        let pref = f["pref"].as_u64().unwrap_or(0);
        if let Some(acts) = f["options"]["actions"].as_array() {
            for a in acts {
                if a["kind"] == "mirred" {
                    found.push((pref, a["to_dev"].as_str().unwrap_or("").to_string()));
                }
            }
        }
    }
    found
}

fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    let out = ns.exec(&[
        "cat",
        &format!("/sys/class/net/{dev}/statistics/rx_packets"),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("rx_packets")
}

/// Four "guests" on one bridge: veth ports p1..p4, their peers q1..q4 in
/// namespaces of their own. p4 is the IDS sensor. Unicast between guests 1
/// and 2 must reach the sensor (as tc mirror copies) and not guest 3: the
/// bridge keeps learning, so no tenant sees another's unicast.
#[test]
fn ids_copies_reach_the_sensor_and_no_other_tenant() {
    let ns = Netns::new();
    let guests: Vec<Netns> = (0..4).map(|_| Netns::new()).collect();
    // No IPv6 chatter (router solicitations, MLD) to blur the counts.
    for n in std::iter::once(&ns).chain(guests.iter()) {
        let _ = n.exec(&["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"]);
    }
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    let macs = [
        "02:aa:00:00:00:01",
        "02:aa:00:00:00:02",
        "02:aa:00:00:00:03",
        "02:aa:00:00:00:04",
    ];
    for (k, g) in guests.iter().enumerate() {
        let (p, q) = (format!("p{}", k + 1), format!("q{}", k + 1));
        ns.ip(&["link", "add", &p, "type", "veth", "peer", "name", &q]);
        ns.ip(&["link", "set", &q, "address", macs[k], "netns", &g.name]);
        ns.ip(&["link", "set", &p, "master", "br0"]);
        ns.ip(&["link", "set", &p, "up"]);
        g.ip(&["addr", "add", &format!("10.77.0.{}/24", k + 1), "dev", &q]);
        g.ip(&["link", "set", &q, "up"]);
    }
    ns.ip(&["link", "set", "br0", "up"]);
    // Unicast only: static neighbours (no ARP) and static FDB entries (no
    // unknown-unicast flooding while the bridge learns).
    for (k, g) in guests.iter().enumerate() {
        for (j, mac) in macs.iter().enumerate() {
            if j != k {
                g.ip(&[
                    "neigh",
                    "add",
                    &format!("10.77.0.{}", j + 1),
                    "lladdr",
                    mac,
                    "dev",
                    &format!("q{}", k + 1),
                    "nud",
                    "permanent",
                ]);
            }
        }
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "bridge",
                "fdb",
                "add",
                macs[k],
                "dev",
                &format!("p{}", k + 1),
                "master",
                "static",
            ],
        );
    }
    // libvirt's own ingress qdisc with a filter of its own on p2: shared.
    ns.exec(&["tc", "qdisc", "add", "dev", "p2", "ingress"]);
    let foreign = ns.exec(&[
        "tc",
        "filter",
        "add",
        "dev",
        "p2",
        "ingress",
        "prio",
        "1",
        "protocol",
        "ip",
        "u32",
        "match",
        "ip",
        "dst",
        "10.99.0.0/16",
        "flowid",
        "1:1",
    ]);
    assert!(foreign.status.success(), "{foreign:?}");

    let dir = tempfile::tempdir().expect("tmp");
    let changed = ns.run(config(&dir), move |host| async move {
        host.promisc_enable(&br("br0")).await.expect("promisc");
        host.ids_mirror_sync(&br("br0"), Some(&["p4".to_string()]))
            .await
            .expect("sync")
    });
    assert_eq!(changed, 3, "one filter on each of p1..p3");
    for p in ["p1", "p2", "p3"] {
        assert_eq!(
            agent_filters(&ns, p),
            vec![(49152, "p4".to_string())],
            "{p}"
        );
    }
    assert!(
        agent_filters(&ns, "p4").is_empty(),
        "no filter on the sensor's own port"
    );
    let p2 = String::from_utf8_lossy(
        &ns.exec(&["tc", "filter", "show", "dev", "p2", "ingress"])
            .stdout,
    )
    .to_string();
    assert!(p2.contains("pref 1 "), "the foreign filter stays: {p2}");
    let j = ns.link_json("br0");
    assert!(has_flag(&j, "PROMISC"), "{j}");
    assert_ne!(j["linkinfo"]["info_data"]["ageing_time"], 0, "no hub: {j}");

    let (s0, t0) = (rx_packets(&guests[3], "q4"), rx_packets(&guests[2], "q3"));
    const N: u64 = 2000;
    let send = guests[0].exec(&[
        "python3", "-c",
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(2000): s.sendto(b'x'*64,('10.77.0.2',9999))",
    ]);
    assert!(send.status.success(), "{send:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (s1, t1) = (rx_packets(&guests[3], "q4"), rx_packets(&guests[2], "q3"));
    let got2 = rx_packets(&guests[1], "q2");
    assert!(got2 >= N, "guest 2 received its traffic: {got2}");
    assert!(s1 - s0 >= N, "the sensor got the copies: +{}", s1 - s0);
    assert!(t1 - t0 <= 5, "guest 3 stays flat: +{}", t1 - t0);

    // libvirt clearing a bandwidth deletes the qdisc and our filter with
    // it: a sync from the saved list puts it back.
    ns.exec(&["tc", "qdisc", "del", "dev", "p1", "ingress"]);
    let back = ns.run(config(&dir), move |host| async move {
        host.ids_mirror_sync(&br("br0"), None)
            .await
            .expect("resync")
    });
    assert_eq!(back, 1);
    assert_eq!(agent_filters(&ns, "p1"), vec![(49152, "p4".to_string())]);

    // The sensor goes: its filters go from every port, the qdiscs stay.
    ns.run(config(&dir), move |host| async move {
        host.ids_mirror_sync(&br("br0"), Some(&[]))
            .await
            .expect("sync empty")
    });
    for p in ["p1", "p2", "p3"] {
        assert!(agent_filters(&ns, p).is_empty(), "{p}");
    }
    let p2 = String::from_utf8_lossy(
        &ns.exec(&["tc", "filter", "show", "dev", "p2", "ingress"])
            .stdout,
    )
    .to_string();
    assert!(p2.contains("pref 1 "), "the foreign filter stays: {p2}");
    let q =
        String::from_utf8_lossy(&ns.exec(&["tc", "qdisc", "show", "dev", "p1"]).stdout).to_string();
    assert!(q.contains("ingress"), "never delete a qdisc: {q}");
    assert!(!dir.path().join("ids/br0.json").exists());
}

/// A port that joins a bridge with a sensor without any call of ours (as
/// cloudstack-agent's own plugs do) gets its mirror filter from the link
/// event follower, from the sensor list saved in the state dir.
#[test]
fn a_port_plugged_behind_the_agents_back_gets_its_mirror_filter_from_link_events() {
    let ns = Netns::new();
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    for (p, q) in [("p1", "q1"), ("p4", "q4")] {
        ns.ip(&["link", "add", p, "type", "veth", "peer", "name", q]);
        ns.ip(&["link", "set", p, "master", "br0"]);
    }
    let dir = tempfile::tempdir().expect("tmp");
    let name = ns.name.clone();
    let filters = ns.run(config(&dir), move |host| async move {
        let host: std::sync::Arc<dyn HostNet> = std::sync::Arc::new(host);
        host.ids_mirror_sync(&br("br0"), Some(&["p4".to_string()]))
            .await
            .expect("sync");
        tokio::spawn(nic_agent::host::portwatch::follow_bridge_ports(
            host.clone(),
        ));
        // Let the follower subscribe before the port appears.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        for args in [
            vec!["link", "add", "p7", "type", "veth", "peer", "name", "q7"],
            vec!["link", "set", "p7", "master", "br0"],
        ] {
            let mut a = vec!["-n", name.as_str()];
            a.extend(args);
            let out = Command::new("ip").args(&a).output().expect("ip");
            assert!(out.status.success(), "{out:?}");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let out = Command::new("tc")
                .args(["-j", "filter", "show", "dev", "p7", "ingress"])
                .output()
                .expect("tc");
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            if s.contains("\"to_dev\":\"p4\"") || std::time::Instant::now() > deadline {
                return s;
            }
        }
    });
    assert!(filters.contains("\"pref\":49152"), "{filters}");
    assert_eq!(agent_filters(&ns, "p7"), vec![(49152, "p4".to_string())]);
}

/// libvirt reuses tap names: a sensor's `vnetN` that went away and came
/// back as another VM's tap must not make that tenant a sensor.
#[test]
fn a_reused_sensor_tap_name_makes_no_sensor() {
    let ns = Netns::new();
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    for (p, q) in [("p1", "q1"), ("p4", "q4")] {
        ns.ip(&["link", "add", p, "type", "veth", "peer", "name", q]);
        ns.ip(&["link", "set", p, "master", "br0"]);
    }
    let dir = tempfile::tempdir().expect("tmp");
    ns.run(config(&dir), move |host| async move {
        host.ids_mirror_sync(&br("br0"), Some(&["p4".to_string()]))
            .await
            .expect("sync")
    });
    assert_eq!(agent_filters(&ns, "p1"), vec![(49152, "p4".to_string())]);
    // The sensor's VM stops; another VM's NIC gets the same name.
    ns.ip(&["link", "del", "p4"]);
    ns.ip(&["link", "add", "p4", "type", "veth", "peer", "name", "q4"]);
    ns.ip(&["link", "set", "p4", "master", "br0"]);
    let sensors = ns.run(config(&dir), move |host| async move {
        host.ids_mirror_sync(&br("br0"), None)
            .await
            .expect("resync");
        host.ids_sensors(&br("br0")).await.expect("sensors")
    });
    assert!(sensors.is_empty(), "{sensors:?}");
    assert!(agent_filters(&ns, "p1").is_empty());
}

#[test]
fn tx_queue_len_is_set_on_a_real_tap_and_a_missing_tap_is_not_found() {
    let ns = Netns::new();
    // A tap like the one libvirt makes for a bridge NIC (vnetN), on a bridge.
    ns.ip(&["link", "add", "cloudbr0", "type", "bridge"]);
    ns.ip(&["tuntap", "add", "vnet3", "mode", "tap"]);
    ns.ip(&["link", "set", "vnet3", "master", "cloudbr0"]);
    assert_eq!(ns.link_json("vnet3")["txqlen"].as_u64(), Some(1000));
    let dir = tempfile::tempdir().expect("tmp");
    let len = TxQueueLen::try_from(5000).expect("len");
    let missing = ns.run(config(&dir), move |host| async move {
        host.set_tx_queue_len("vnet3", len).await.expect("set");
        host.set_tx_queue_len("vnet9", len)
            .await
            .expect_err("no such tap")
    });
    assert_eq!(ns.link_json("vnet3")["txqlen"].as_u64(), Some(5000));
    // Nothing else changed: the bridge keeps its own value.
    assert_eq!(ns.link_json("cloudbr0")["txqlen"].as_u64(), Some(1000));
    assert_eq!(missing.kind(), HostErrorKind::NotFound, "{missing}");
    assert!(!ns.exists("vnet9"));
}

#[test]
fn inspect_recomputes_a_shortened_vlan_bridge_and_samples_the_uplink() {
    use nic_agent::host::{naming, InspectQuery};
    let ns = Netns::new();
    // A physical port whose CloudStack VLAN bridge name is 18 bytes.
    let pif = "enp0s31f6np0";
    let bridge = naming::vlan_bridge(pif, 100);
    assert_eq!(bridge.len(), 15, "{bridge}");
    ns.ip(&["link", "add", pif, "type", "veth", "peer", "name", "wire9"]);
    ns.ip(&["link", "add", &bridge, "type", "bridge"]);
    // And a plain bridge whose uplink is a veth stand-in, beside a tap.
    ns.ip(&["link", "add", "cloudbr0", "type", "bridge"]);
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "wire0",
    ]);
    ns.ip(&["tuntap", "add", "vnet3", "mode", "tap"]);
    for l in ["eth0", "vnet3"] {
        ns.ip(&["link", "set", l, "master", "cloudbr0"]);
    }
    for l in [pif, "wire9", bridge.as_str(), "cloudbr0", "eth0", "wire0"] {
        ns.ip(&["link", "set", l, "up"]);
    }
    let dir = tempfile::tempdir().expect("tmp");
    let query = |bridge: &str, tap: Option<&str>, intended_vlan| InspectQuery {
        tap: tap.map(str::to_string),
        bridge: bridge.to_string(),
        segment: None,
        vxlan: None,
        ovs: false,
        mac: "02:00:0a:00:00:01".into(),
        intended_vlan,
    };
    let (hashed, intended, plain) = {
        let (a, b, c) = (
            query(&bridge, None, None),
            query(&bridge, None, Some(100)),
            query("cloudbr0", Some("vnet3"), None),
        );
        ns.run(config(&dir), move |host| async move {
            (
                host.inspect(&a).await.expect("inspect"),
                host.inspect(&b).await.expect("inspect"),
                host.inspect(&c).await.expect("inspect"),
            )
        })
    };
    for f in [&hashed, &intended] {
        assert_eq!(
            f.decoded_vlan_bridge,
            Some((pif.to_string(), 100)),
            "{f:#?}"
        );
        // No 802.1Q device in it (this kernel has no 8021q either): the
        // segment is missing, and so is its uplink.
        assert!(f.segment.is_none(), "{f:#?}");
        let why = f.uplink_missing.as_deref().unwrap_or_default();
        assert!(
            why.contains(&format!("{} does not exist", naming::vlan_device(pif, 100))),
            "{f:#?}"
        );
    }
    assert_eq!(plain.decoded_vlan_bridge, None);
    let up = plain.uplink.as_ref().expect("uplink");
    // eth0, never the tap; carrier from the veth peer; two samples.
    assert_eq!(up.link.name, "eth0", "{up:#?}");
    assert!(up.link.up && up.link.lower_up, "{up:#?}");
    assert_eq!(up.via, "port of cloudbr0");
    assert_eq!(up.later.map(|c| c.rx_crc_errors), Some(0), "{up:#?}");
    assert_eq!(up.speed_mbps, Some(10_000), "{up:#?}");
}
