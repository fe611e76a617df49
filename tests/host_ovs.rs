//! OVS side of host networking against a real ovsdb-server/ovs-vswitchd
//! (userspace datapath). Needs root; starts OVS if it is not running.

use std::path::Path;
use std::process::Command;
use std::sync::Once;

use nic_agent::host::{HostConfig, HostErrorKind, HostNet, HostUndo, NetlinkHost};
use nic_agent::nic::{BridgeName, Segment, SwitchType, VlanId, Vni};

static OVS: Once = Once::new();

fn ensure_ovs() {
    OVS.call_once(|| {
        if vsctl_status(&["show"]) {
            return;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/lab/start-ovs.sh");
        let ok = if Path::new(script).exists() {
            Command::new("bash").arg(script).status()
        } else {
            Command::new("/usr/share/openvswitch/scripts/ovs-ctl")
                .args(["start", "--system-id=random"])
                .status()
        }
        .map(|s| s.success())
        .unwrap_or(false);
        assert!(
            ok && vsctl_status(&["show"]),
            "could not start Open vSwitch"
        );
    });
}

fn vsctl_status(args: &[&str]) -> bool {
    Command::new("ovs-vsctl")
        .arg("--timeout=5")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn vsctl(args: &[&str]) -> String {
    let out = Command::new("ovs-vsctl")
        .arg("--timeout=5")
        .args(args)
        .output()
        .expect("spawn ovs-vsctl");
    assert!(
        out.status.success(),
        "ovs-vsctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A netdev-datapath OVS bridge, deleted on drop (also on panic).
struct OvsBridge {
    name: String,
}

impl OvsBridge {
    fn new() -> Self {
        ensure_ovs();
        let name = format!("nat-ovs-{:06x}", rand::random::<u32>() & 0xFF_FFFF);
        vsctl(&[
            "add-br",
            &name,
            "--",
            "set",
            "bridge",
            &name,
            "datapath_type=netdev",
        ]);
        OvsBridge { name }
    }

    fn add_internal_port(&self, port: &str) {
        vsctl(&[
            "add-port",
            &self.name,
            port,
            "--",
            "set",
            "Interface",
            port,
            "type=internal",
        ]);
    }

    fn br(&self) -> BridgeName {
        BridgeName::try_from(self.name.as_str()).expect("bridge name")
    }
}

impl Drop for OvsBridge {
    fn drop(&mut self) {
        let _ = Command::new("ovs-vsctl")
            .args(["--timeout=5", "--if-exists", "del-br", &self.name])
            .status();
    }
}

fn host() -> NetlinkHost {
    let dir = std::env::temp_dir();
    NetlinkHost::new(HostConfig {
        state_dir: dir,
        ..HostConfig::default()
    })
    .expect("host")
}

#[tokio::test]
async fn ovs_resolve_uses_the_bridge_and_turns_vlan_into_a_tag() {
    let b = OvsBridge::new();
    let host = host();
    let vlan = Segment::Vlan(VlanId::try_from(100).expect("vlan"));
    let plan = host
        .resolve(&b.br(), SwitchType::OpenVswitch, &vlan)
        .await
        .expect("resolve");
    assert_eq!(plan.bridge, b.br());
    assert_eq!(plan.ovs_vlan_tag.map(VlanId::get), Some(100));
    assert!(plan.changes.is_empty() && plan.segment_device.is_none());
    assert_eq!(host.prepare(&plan).await.expect("prepare"), vec![]);

    let plan = host
        .resolve(&b.br(), SwitchType::OpenVswitch, &Segment::Untagged)
        .await
        .expect("resolve");
    assert_eq!(plan.ovs_vlan_tag, None);

    let vx = Segment::Vxlan(Vni::try_from(5000).expect("vni"));
    let err = host
        .resolve(&b.br(), SwitchType::OpenVswitch, &vx)
        .await
        .expect_err("vxlan on ovs");
    assert_eq!(err.kind(), HostErrorKind::FailedPrecondition, "{err}");
}

#[tokio::test]
async fn ovs_resolve_of_missing_bridge_is_not_found() {
    ensure_ovs();
    let host = host();
    let name = format!("nat-ovs-{:06x}", rand::random::<u32>() & 0xFF_FFFF);
    let br = BridgeName::try_from(name.as_str()).expect("name");
    let err = host
        .resolve(&br, SwitchType::OpenVswitch, &Segment::Plain)
        .await
        .expect_err("missing");
    assert_eq!(err.kind(), HostErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains(&name), "{err}");
}

#[tokio::test]
async fn ovs_ids_mirror_selects_the_sensors_vlan_to_its_port_and_is_removed() {
    let b = OvsBridge::new();
    let port = format!("nat-ids-{:05x}", rand::random::<u32>() & 0xF_FFFF);
    b.add_internal_port(&port);
    let host = host();

    let undo = host
        .ovs_mirror_add(&b.br(), &port)
        .await
        .expect("mirror add");
    let HostUndo::OvsMirrorRemove { bridge, mirror } = &undo else {
        panic!("unexpected undo {undo:?}")
    };
    assert_eq!(bridge, &b.name);
    let port_uuid = vsctl(&["get", "Port", &port, "_uuid"]);
    assert_eq!(vsctl(&["get", "Mirror", mirror, "select_all"]), "true");
    assert_eq!(vsctl(&["get", "Mirror", mirror, "output_port"]), port_uuid);
    let mirror_uuid = vsctl(&["get", "Mirror", mirror, "_uuid"]);
    assert_eq!(
        vsctl(&["get", "Bridge", &b.name, "mirrors"]),
        format!("[{mirror_uuid}]")
    );

    // A retried add does not stack a second mirror.
    host.ovs_mirror_add(&b.br(), &port)
        .await
        .expect("mirror add again");
    let rows = vsctl(&[
        "--bare",
        "--columns=_uuid",
        "find",
        "Mirror",
        &format!("name={mirror}"),
    ]);
    assert_eq!(rows.split_whitespace().count(), 1, "{rows}");
    // Untagged sensor: every VLAN (OVS has no narrower segment to name).
    assert_eq!(vsctl(&["get", "Mirror", mirror, "select_vlan"]), "[]");

    // A sensor on VLAN 100 gets that VLAN only, never every VLAN (issue 13).
    vsctl(&["set", "Port", &port, "tag=100"]);
    host.ovs_mirror_add(&b.br(), &port)
        .await
        .expect("mirror add tagged");
    assert_eq!(vsctl(&["get", "Mirror", mirror, "select_vlan"]), "[100]");

    host.undo(undo.clone()).await.expect("undo");
    assert_eq!(vsctl(&["get", "Bridge", &b.name, "mirrors"]), "[]");
    assert_eq!(
        vsctl(&[
            "--bare",
            "--columns=_uuid",
            "find",
            "Mirror",
            &format!("name={mirror}")
        ]),
        ""
    );
    host.undo(undo).await.expect("undo twice is fine");
}

#[tokio::test]
async fn ovs_mirror_to_missing_port_fails_and_changes_nothing() {
    let b = OvsBridge::new();
    let host = host();
    let err = host
        .ovs_mirror_add(&b.br(), "nat-no-port")
        .await
        .expect_err("no port");
    assert_eq!(err.kind(), HostErrorKind::Internal, "{err}");
    assert_eq!(vsctl(&["get", "Bridge", &b.name, "mirrors"]), "[]");
}

#[tokio::test]
async fn a_tap_name_that_reads_as_an_option_never_reaches_ovs_vsctl() {
    let b = OvsBridge::new();
    let host = host();
    for tap in ["--if-exists", "-x", "vnet0 vnet1"] {
        let err = host
            .ovs_mirror_add(&b.br(), tap)
            .await
            .expect_err("unsafe tap name");
        assert_eq!(err.kind(), HostErrorKind::FailedPrecondition, "{err}");
        assert!(err.to_string().contains("tap name"), "{err}");
    }
    assert_eq!(vsctl(&["get", "Bridge", &b.name, "mirrors"]), "[]");
}

#[tokio::test]
async fn ovs_down_is_unavailable_not_internal() {
    // An ovs-vsctl whose database socket does not exist: what the agent
    // sees while ovsdb-server is stopped or restarting.
    let dir = tempfile::tempdir().expect("tempdir");
    let wrapper = dir.path().join("ovs-vsctl");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ovs-vsctl --db=unix:{}/no-db.sock \"$@\"\n",
            dir.path().display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let host = NetlinkHost::new(HostConfig {
        state_dir: dir.path().to_path_buf(),
        ovs_vsctl: wrapper,
        ..HostConfig::default()
    })
    .expect("host");
    let br = BridgeName::try_from("nat-ovs-down").expect("name");
    let err = host
        .resolve(&br, SwitchType::OpenVswitch, &Segment::Plain)
        .await
        .expect_err("ovs is down");
    assert_eq!(err.kind(), HostErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains("Open vSwitch is not answering"),
        "{err}"
    );
    let err = host
        .ovs_mirror_add(&br, "nat-port")
        .await
        .expect_err("ovs is down");
    assert_eq!(err.kind(), HostErrorKind::Unavailable, "{err}");
}
