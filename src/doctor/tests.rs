//! The hop verdicts on plain inputs: a healthy path, then one broken thing
//! at a time, each named as the right hop with a usable fix.

use super::*;
use std::net::Ipv4Addr;

use crate::host::vxlan::{LinkAddr, VxlanSettings};
use crate::host::{
    FdbFacts, LinkCounters, OvsFacts, UplinkFacts, VlanFacts, VxlanExpected, VxlanFacts,
    VxlanFamily, VxlanFlavour,
};

const MAC: &str = "02:00:0d:00:00:01";

fn nic(bridge: &str, tap: &str) -> InterfaceView {
    InterfaceView {
        kind: "bridge".into(),
        mac: Some(MAC.into()),
        source: Some(bridge.into()),
        target: Some(tap.into()),
        alias: Some("ua-web".into()),
        model: Some("virtio".into()),
        mtu: Some(1500),
        ..InterfaceView::default()
    }
}

fn link(name: &str, kind: &str, mtu: u32, master: Option<&str>) -> LinkFacts {
    LinkFacts {
        name: name.into(),
        kind: kind.into(),
        up: true,
        lower_up: true,
        mtu,
        master: master.map(str::to_string),
        ..LinkFacts::default()
    }
}

fn busy() -> Option<LinkCounters> {
    Some(LinkCounters {
        rx_packets: 12,
        tx_packets: 30,
        ..LinkCounters::default()
    })
}

/// eth1, carrier up at 10 Gb/s, with old errors that did not move.
fn uplink_ok(via: &str) -> UplinkFacts {
    let mut l = link("eth1", "", 1500, None);
    let c = LinkCounters {
        rx_errors: 3,
        rx_crc_errors: 2,
        ..LinkCounters::default()
    };
    l.counters = Some(c);
    UplinkFacts {
        link: l,
        via: via.into(),
        later: Some(c),
        speed_mbps: Some(10_000),
        speed_unknown: None,
    }
}

/// vnet3 in cloudbr1, both up at 1500, MAC learned on vnet3.
fn healthy() -> HostFacts {
    let mut tap = link("vnet3", "tun", 1500, Some("cloudbr1"));
    tap.counters = busy();
    let mut br = link("cloudbr1", "bridge", 1500, None);
    br.ageing = Some(30000);
    HostFacts {
        tap: Some(tap),
        bridge: Some(br),
        fdb: FdbFacts {
            read: true,
            learned_on: vec!["vnet3".into()],
            error: None,
        },
        uplink: Some(uplink_ok("port of cloudbr1")),
        ..HostFacts::default()
    }
}

/// vnet4 in brvx-5000 at 1450, vxlan5000 over cloudbr1 (1500).
fn healthy_vxlan() -> (InterfaceView, HostFacts) {
    let mut i = nic("brvx-5000", "vnet4");
    i.mtu = Some(1450);
    let mut f = healthy();
    let mut tap = link("vnet4", "tun", 1450, Some("brvx-5000"));
    tap.counters = busy();
    f.tap = Some(tap);
    let mut br = link("brvx-5000", "bridge", 1450, None);
    br.ageing = Some(30000);
    f.bridge = Some(br);
    let mut vx = link("vxlan5000", "vxlan", 1450, Some("brvx-5000"));
    // As `modifyvxlan.sh` makes it: no dstport, so the kernel's 8472.
    vx.vxlan = Some(VxlanFacts {
        vni: Some(5000),
        group: Some(Ipv4Addr::new(239, 0, 19, 136).into()),
        local: None,
        underlay: Some("cloudbr1".into()),
        port: Some(8472),
        learning: Some(true),
    });
    f.segment = Some(vx);
    f.underlay = Some(link("cloudbr1", "bridge", 1500, None));
    f.fdb.learned_on = vec!["vnet4".into()];
    f.vxlan_expected = Some(expect(
        &VxlanSettings::default(),
        Some("cloudbr1"),
        &[],
        &[],
    ));
    (i, f)
}

fn vni5000() -> Vni {
    Vni::try_from(5000).expect("vni")
}

fn global(a: &str) -> LinkAddr {
    LinkAddr {
        addr: a.parse().expect("addr"),
        global: true,
    }
}

/// What `cfg` makes for VNI 5000, by the host module's own decision, on a
/// host whose kernel default port is 8472.
fn expect(
    cfg: &VxlanSettings,
    underlay: Option<&str>,
    under: &[LinkAddr],
    lo: &[LinkAddr],
) -> VxlanExpected {
    VxlanExpected {
        device: cfg
            .device(
                vni5000(),
                underlay.unwrap_or(crate::host::LABEL_PLACEHOLDER),
                under,
                lo,
            )
            .map_err(|e| e.to_string()),
        kernel_port: 8472,
        family_guessed: underlay.is_none() && cfg.family == VxlanFamily::Auto,
    }
}

/// vxlan5000 as `modifyvxlan-evpn.sh` makes it on a host whose VTEP on lo
/// is 10.0.0.7: dstport 4789, nolearning, no group, no dev.
fn healthy_evpn() -> (InterfaceView, HostFacts) {
    let (i, mut f) = healthy_vxlan();
    if let Some(v) = f.segment.as_mut().and_then(|s| s.vxlan.as_mut()) {
        *v = VxlanFacts {
            vni: Some(5000),
            group: None,
            local: Some("10.0.0.7".parse().expect("ip")),
            underlay: None,
            port: Some(4789),
            learning: Some(false),
        };
    }
    f.underlay = None;
    let evpn = VxlanSettings {
        flavour: VxlanFlavour::Evpn,
        ..VxlanSettings::default()
    };
    f.vxlan_expected = Some(expect(&evpn, None, &[], &[global("10.0.0.7")]));
    (i, f)
}

/// The sensor taps of `ids` IDS NICs on the bridge: `i`'s own first when
/// it is one, then `vnet90`, `vnet91`, ...
fn sensors(i: &InterfaceView, ids: usize) -> Vec<String> {
    let own = i.alias.as_deref().is_some_and(|a| a.starts_with("ua-ids-"));
    let mut v: Vec<String> = Vec::new();
    if own && ids > 0 {
        v.extend(i.target.clone());
    }
    let mut k = 90;
    while v.len() < ids {
        v.push(format!("vnet{k}"));
        k += 1;
    }
    v
}

fn mirrors(pairs: &[(&str, &[&str])]) -> Option<std::collections::BTreeMap<String, Vec<String>>> {
    Some(
        pairs
            .iter()
            .map(|(p, to)| (p.to_string(), to.iter().map(|t| t.to_string()).collect()))
            .collect(),
    )
}

fn run(i: &InterfaceView, f: &HostFacts, ids: usize) -> Vec<Hop> {
    hops(&DiagnoseInput {
        vm: "i-2-10-VM",
        mac: MAC,
        running: true,
        persistent: true,
        live: vec![i],
        config: vec![i],
        ids_on_bridge: ids,
        ids_taps: sensors(i, ids),
        host: HostInput::Facts(f),
        intended: None,
    })
}

fn get<'a>(hops: &'a [Hop], name: &str) -> &'a Hop {
    hops.iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("no hop {name} in {hops:#?}"))
}

fn assert_only_fault(hops: &[Hop], name: &str) {
    for h in hops {
        if h.name == name {
            assert_eq!(h.status, HopStatus::Fault, "{h:#?}");
            assert!(!h.fix.is_empty(), "a fault needs a fix: {h:#?}");
        } else {
            assert_ne!(h.status, HopStatus::Fault, "unexpected fault: {h:#?}");
        }
    }
}

#[test]
fn healthy_linux_bridge_nic_is_ok_on_every_hop_in_order() {
    let h = run(&nic("cloudbr1", "vnet3"), &healthy(), 0);
    let names: Vec<_> = h.iter().map(|h| h.name).collect();
    assert_eq!(
        names,
        vec!["xml", "tap", "bridge", "segment", "uplink", "mtu", "promisc", "counters", "fdb"]
    );
    for hop in &h {
        assert_eq!(hop.status, HopStatus::Ok, "{hop:#?}");
        assert!(hop.fix.is_empty(), "{hop:#?}");
    }
    assert!(get(&h, "tap").evidence.contains("enslaved to cloudbr1"));
    assert!(get(&h, "fdb").evidence.contains("learned on vnet3"));
}

#[test]
fn tap_hop_reports_the_taps_txqueuelen_without_judging_it() {
    let mut f = healthy();
    if let Some(t) = f.tap.as_mut() {
        t.tx_queue_len = Some(5000);
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    let tap = get(&h, "tap");
    assert_eq!(tap.status, HopStatus::Ok, "{tap:#?}");
    assert!(tap.evidence.contains("txqueuelen 5000"), "{tap:#?}");
    // Unknown (not read) is simply not mentioned.
    let h = run(&nic("cloudbr1", "vnet3"), &healthy(), 0);
    assert!(!get(&h, "tap").evidence.contains("txqueuelen"));
}

#[test]
fn host_networking_off_checks_the_xml_and_warns_on_host_hops() {
    let i = nic("cloudbr1", "vnet3");
    let h = hops(&DiagnoseInput {
        vm: "vm",
        mac: MAC,
        running: true,
        persistent: false,
        live: vec![&i],
        config: vec![],
        ids_on_bridge: 0,
        ids_taps: Vec::new(),
        host: HostInput::Off,
        intended: None,
    });
    assert_eq!(h.len(), 9);
    assert_eq!(get(&h, "xml").status, HopStatus::Ok);
    for hop in &h[1..] {
        assert_eq!(hop.status, HopStatus::Warning);
        assert!(hop.evidence.contains("host networking off"), "{hop:#?}");
    }
}

#[test]
fn nic_missing_from_the_domain_is_an_xml_fault() {
    let f = healthy();
    let h = hops(&DiagnoseInput {
        vm: "vm",
        mac: MAC,
        running: true,
        persistent: true,
        live: vec![],
        config: vec![],
        ids_on_bridge: 0,
        ids_taps: Vec::new(),
        host: HostInput::Facts(&f),
        intended: None,
    });
    assert_only_fault(&h, "xml");
    assert!(get(&h, "xml").evidence.contains(MAC));
    assert!(h[1..].iter().all(|x| x.status == HopStatus::Warning));
}

#[test]
fn live_only_nic_of_a_persistent_vm_is_a_warning_and_config_only_is_a_fault() {
    let i = nic("cloudbr1", "vnet3");
    let f = healthy();
    let mut d = DiagnoseInput {
        vm: "vm",
        mac: MAC,
        running: true,
        persistent: true,
        live: vec![&i],
        config: vec![],
        ids_on_bridge: 0,
        ids_taps: Vec::new(),
        host: HostInput::Facts(&f),
        intended: None,
    };
    let h = hops(&d);
    assert_eq!(get(&h, "xml").status, HopStatus::Warning);
    assert!(get(&h, "xml").evidence.contains("persistent"));
    d.live = vec![];
    d.config = vec![&i];
    let h = hops(&d);
    assert_eq!(get(&h, "xml").status, HopStatus::Fault);
    // A stopped VM's NIC in its config is fine; there is no tap to look at.
    d.running = false;
    let h = hops(&d);
    assert_eq!(get(&h, "xml").status, HopStatus::Ok);
    assert!(get(&h, "tap").evidence.contains("not running"));
}

#[test]
fn link_down_in_the_xml_is_a_warning_with_domif_setlink() {
    let mut i = nic("cloudbr1", "vnet3");
    i.link = Some("down".into());
    let h = run(&i, &healthy(), 0);
    let x = get(&h, "xml");
    assert_eq!(x.status, HopStatus::Warning);
    assert!(x.fix.contains("domif-setlink i-2-10-VM vnet3 up"), "{x:#?}");
}

#[test]
fn missing_tap_is_a_tap_fault() {
    let mut f = healthy();
    f.tap = None;
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_only_fault(&h, "tap");
    assert!(get(&h, "tap").evidence.contains("vnet3 does not exist"));
}

#[test]
fn tap_down_is_a_fault_with_link_set_up() {
    let mut f = healthy();
    if let Some(t) = f.tap.as_mut() {
        t.up = false;
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_only_fault(&h, "tap");
    assert_eq!(get(&h, "tap").fix, "ip link set vnet3 up");
}

#[test]
fn tap_without_master_or_in_another_bridge_is_a_tap_fault() {
    let mut f = healthy();
    if let Some(t) = f.tap.as_mut() {
        t.master = None;
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_only_fault(&h, "tap");
    let t = get(&h, "tap");
    assert!(t.evidence.contains("no master"), "{t:#?}");
    // The FDB hop points back at the tap instead of blaming the guest.
    let fdb = get(&h, "fdb");
    assert_eq!(fdb.status, HopStatus::Warning);
    assert!(fdb.evidence.contains("see the tap hop"), "{fdb:#?}");
    assert!(fdb.fix.is_empty(), "{fdb:#?}");
    assert_eq!(t.fix, "ip link set vnet3 master cloudbr1");

    if let Some(t) = f.tap.as_mut() {
        t.master = Some("cloudbr0".into());
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert!(get(&h, "tap").evidence.contains("enslaved to cloudbr0"));
}

#[test]
fn bridge_down_or_missing_is_a_bridge_fault() {
    let mut f = healthy();
    if let Some(b) = f.bridge.as_mut() {
        b.up = false;
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_only_fault(&h, "bridge");
    assert_eq!(get(&h, "bridge").fix, "ip link set cloudbr1 up");

    f.bridge = None;
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_eq!(get(&h, "bridge").status, HopStatus::Fault);
    assert!(get(&h, "bridge").evidence.contains("does not exist"));
}

#[test]
fn expected_segment_follows_cloudstack_names() {
    assert_eq!(
        expected_segment("brvx-5000"),
        Some(ExpectedSegment::Vxlan {
            dev: "vxlan5000".into(),
            vni: 5000,
        })
    );
    assert_eq!(
        expected_segment("breth1-100"),
        Some(ExpectedSegment::Vlan {
            dev: "eth1.100".into(),
            parent: "eth1".into(),
            id: 100,
        })
    );
    for none in [
        "cloudbr1",
        "br-ovs0",
        "br0",
        "brvx-0",
        "brvx-x",
        "breth1-5000",
        "brfoo-10",
    ] {
        assert_eq!(expected_segment(none), None, "{none}");
    }
}

#[test]
fn healthy_vxlan_path_checks_vni_group_underlay_and_mtu() {
    let (i, f) = healthy_vxlan();
    let h = run(&i, &f, 0);
    for hop in &h {
        assert_eq!(hop.status, HopStatus::Ok, "{hop:#?}");
    }
    let s = get(&h, "segment");
    for want in [
        "vni 5000",
        "group 239.0.19.136",
        "port 8472, as vxlan.flavour multicast",
        "underlay cloudbr1 up",
    ] {
        assert!(s.evidence.contains(want), "{want}: {s:#?}");
    }
    assert!(get(&h, "mtu").evidence.contains("needs ≥ 1500"));
}

#[test]
fn ipv6_underlay_device_with_cloudstacks_v6_group_is_ok() {
    // modifyvxlan.sh -6 on an underlay with only a global IPv6 address:
    // group ff05::0:19:136 for VNI 5000 (bytes 0, 19, 136 written as hex).
    let (i, mut f) = healthy_vxlan();
    if let Some(v) = f.segment.as_mut().and_then(|s| s.vxlan.as_mut()) {
        v.group = Some("ff05::19:136".parse().expect("ip"));
    }
    let under = [global("2001:db8::1")];
    f.vxlan_expected = Some(expect(
        &VxlanSettings::default(),
        Some("cloudbr1"),
        &under,
        &[],
    ));
    // IPv6 encapsulation takes 70 bytes: 1450 + 70.
    f.underlay = Some(link("cloudbr1", "bridge", 1520, None));
    let h = run(&i, &f, 0);
    for hop in &h {
        assert_eq!(hop.status, HopStatus::Ok, "{hop:#?}");
    }
    let s = get(&h, "segment");
    assert!(s.evidence.contains("group ff05::19:136"), "{s:#?}");
    assert!(get(&h, "mtu").evidence.contains("needs ≥ 1520"), "{h:#?}");
    // The same device on an IPv4 underlay is the wrong group.
    f.vxlan_expected = Some(expect(
        &VxlanSettings::default(),
        Some("cloudbr1"),
        &[],
        &[],
    ));
    let h = run(&i, &f, 0);
    let s = get(&h, "segment");
    assert_eq!(s.status, HopStatus::Fault, "{s:#?}");
    assert!(
        s.evidence
            .contains("vxlan5000 has group ff05::19:136, expected 239.0.19.136"),
        "{s:#?}"
    );
}

#[test]
fn evpn_device_without_group_or_underlay_is_ok_on_an_evpn_host() {
    let (i, f) = healthy_evpn();
    let h = run(&i, &f, 0);
    for hop in &h {
        assert_eq!(hop.status, HopStatus::Ok, "{hop:#?}");
    }
    let s = get(&h, "segment");
    assert!(
        s.evidence
            .contains("vni 5000, local 10.0.0.7, port 4789, as vxlan.flavour evpn"),
        "{s:#?}"
    );
    // The same device judged as a multicast host would: no group, no dev,
    // the wrong port.
    let mut multicast = f.clone();
    multicast.vxlan_expected = Some(expect(&VxlanSettings::default(), None, &[], &[]));
    let s = get(&run(&i, &multicast, 0), "segment").clone();
    assert_eq!(s.status, HopStatus::Fault, "{s:#?}");
    assert!(
        s.evidence
            .contains("uses UDP port 4789, this host is configured for 8472"),
        "{s:#?}"
    );
    assert!(
        s.evidence.contains("has group none, expected 239.0.19.136"),
        "{s:#?}"
    );
}

#[test]
fn evpn_host_without_a_vtep_on_lo_is_a_segment_fault_naming_lo() {
    let (i, mut f) = healthy_evpn();
    let evpn = VxlanSettings {
        flavour: VxlanFlavour::Evpn,
        ..VxlanSettings::default()
    };
    f.vxlan_expected = Some(expect(&evpn, None, &[], &[]));
    let h = run(&i, &f, 0);
    assert_only_fault(&h, "segment");
    let s = get(&h, "segment");
    assert!(s.evidence.contains("with scope global on lo"), "{s:#?}");
    assert!(s.fix.contains("ip addr add ADDR/32 dev lo"), "{s:#?}");
}

#[test]
fn vxlan_device_on_the_wrong_port_is_a_segment_fault_with_the_repair() {
    let (i, mut f) = healthy_vxlan();
    if let Some(v) = f.segment.as_mut().and_then(|s| s.vxlan.as_mut()) {
        // What the agent made before it followed modifyvxlan.sh's port.
        v.port = Some(4789);
    }
    let h = run(&i, &f, 0);
    assert_only_fault(&h, "segment");
    let s = get(&h, "segment");
    assert!(
        s.evidence.contains(
            "vxlan5000 uses UDP port 4789, this host is configured for 8472 \
             (vxlan.flavour multicast, kernel default)"
        ),
        "{s:#?}"
    );
    // Not the agent's: agree the settings or re-create it by hand.
    assert!(s.fix.contains("not made by nic-agent"), "{s:#?}");
    assert!(
        s.fix.contains(
            "ip -f inet link add vxlan5000 type vxlan id 5000 group 239.0.19.136 ttl 10 dev cloudbr1"
        ),
        "{s:#?}"
    );
    // The agent's own: repair-vxlan.
    if let Some(seg) = f.segment.as_mut() {
        seg.alias = Some(crate::host::AGENT_ALIAS.into());
    }
    let s = get(&run(&i, &f, 0), "segment").clone();
    assert!(
        s.fix.contains("nic-agent repair-vxlan --vni 5000"),
        "{s:#?}"
    );
    // A port pinned on every host (vxlan.port = 4789) makes it right.
    let pinned = VxlanSettings {
        port: Some(4789),
        ..VxlanSettings::default()
    };
    f.vxlan_expected = Some(expect(&pinned, Some("cloudbr1"), &[], &[]));
    let s = get(&run(&i, &f, 0), "segment").clone();
    assert_eq!(s.status, HopStatus::Ok, "{s:#?}");
}

#[test]
fn missing_vxlan_device_is_a_segment_fault() {
    let (i, mut f) = healthy_vxlan();
    f.segment = None;
    f.underlay = None;
    f.vxlan_expected = Some(expect(&VxlanSettings::default(), None, &[], &[]));
    let h = run(&i, &f, 0);
    assert_only_fault(&h, "segment");
    let s = get(&h, "segment");
    assert!(s.evidence.contains("vxlan5000 does not exist"), "{s:#?}");
    assert!(s.fix.contains("attach a NIC with vxlan://5000"), "{s:#?}");
    // modifyvxlan.sh's command: no dstport, the kernel default applies.
    assert!(
        s.fix.contains(
            "ip -f inet link add vxlan5000 type vxlan id 5000 group 239.0.19.136 ttl 10 \
             dev <label bridge> && ip link set vxlan5000 master brvx-5000 up"
        ),
        "{s:#?}"
    );
    assert!(!s.fix.contains("dstport"), "{s:#?}");
    assert!(s.fix.contains("group ff05::19:136"), "{s:#?}");
    // An evpn host's command pins 4789 and takes the VTEP from lo.
    let (_, mut e) = healthy_evpn();
    e.segment = None;
    let s = get(&run(&i, &e, 0), "segment").clone();
    assert!(
        s.fix
            .contains("id 5000 local 10.0.0.7 dstport 4789 nolearning && ip link set"),
        "{s:#?}"
    );
}

/// Breaks one thing about a segment device.
type Breaker = Box<dyn Fn(&mut LinkFacts)>;

#[test]
fn wrong_vni_group_or_detached_vxlan_device_is_a_segment_fault() {
    let (i, f) = healthy_vxlan();
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "has VNI 5001, expected 5000",
            Box::new(|s| {
                if let Some(v) = s.vxlan.as_mut() {
                    v.vni = Some(5001)
                }
            }),
        ),
        (
            "has group 239.1.1.1, expected 239.0.19.136",
            Box::new(|s| {
                if let Some(v) = s.vxlan.as_mut() {
                    v.group = Some(Ipv4Addr::new(239, 1, 1, 1).into())
                }
            }),
        ),
        ("enslaved to nothing", Box::new(|s| s.master = None)),
        ("vxlan5000 is down", Box::new(|s| s.up = false)),
        (
            "no underlay",
            Box::new(|s| {
                if let Some(v) = s.vxlan.as_mut() {
                    v.underlay = None
                }
            }),
        ),
    ];
    for (want, break_it) in cases {
        let mut f = f.clone();
        if let Some(s) = f.segment.as_mut() {
            break_it(s);
        }
        let h = run(&i, &f, 0);
        let s = get(&h, "segment");
        assert_eq!(s.status, HopStatus::Fault, "{want}: {s:#?}");
        assert!(s.evidence.contains(want), "{want}: {s:#?}");
    }
}

#[test]
fn vlan_bridge_needs_its_8021q_device_with_the_right_id() {
    let mut i = nic("breth1-100", "vnet5");
    i.mtu = Some(1500);
    let mut f = healthy();
    let mut tap = link("vnet5", "tun", 1500, Some("breth1-100"));
    tap.counters = busy();
    f.tap = Some(tap);
    f.bridge = Some(link("breth1-100", "bridge", 1500, None));
    f.fdb.learned_on = vec!["vnet5".into()];
    let mut vl = link("eth1.100", "vlan", 1500, Some("breth1-100"));
    vl.vlan = Some(VlanFacts {
        id: Some(100),
        parent: Some("eth1".into()),
    });
    f.segment = Some(vl);
    f.underlay = Some(link("eth1", "veth", 1500, Some("cloudbr1")));
    let h = run(&i, &f, 0);
    assert_eq!(get(&h, "segment").status, HopStatus::Ok, "{h:#?}");
    assert!(get(&h, "segment").evidence.contains("vlan id 100"));

    if let Some(v) = f.segment.as_mut().and_then(|s| s.vlan.as_mut()) {
        v.id = Some(200);
    }
    let h = run(&i, &f, 0);
    assert_only_fault(&h, "segment");
    f.segment = None;
    let h = run(&i, &f, 0);
    assert!(get(&h, "segment").fix.contains("type vlan id 100"));
}

#[test]
fn tap_mtu_above_bridge_is_an_mtu_fault_naming_the_raise() {
    let mut f = healthy();
    if let Some(t) = f.tap.as_mut() {
        t.mtu = 1550;
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_only_fault(&h, "mtu");
    let m = get(&h, "mtu");
    assert!(
        m.evidence
            .contains("tap vnet3 MTU 1550 > bridge cloudbr1 MTU 1500"),
        "{m:#?}"
    );
    assert!(m.fix.contains("raise cloudbr1 MTU to 1550"), "{m:#?}");
}

#[test]
fn nic_without_mtu_on_a_smaller_tap_is_the_silent_1500_fault() {
    let (mut i, f) = healthy_vxlan();
    i.mtu = None;
    let h = run(&i, &f, 0);
    assert_only_fault(&h, "mtu");
    let m = get(&h, "mtu");
    assert!(
        m.evidence.contains("guest MTU 1500 > tap vnet4 MTU 1450"),
        "{m:#?}"
    );
    assert!(m.fix.contains("<mtu size='1450'/>"), "{m:#?}");
}

#[test]
fn vxlan_underlay_without_50_bytes_of_room_is_an_mtu_fault() {
    let (i, mut f) = healthy_vxlan();
    if let Some(u) = f.underlay.as_mut() {
        u.mtu = 1480;
    }
    let h = run(&i, &f, 0);
    assert_only_fault(&h, "mtu");
    let m = get(&h, "mtu");
    assert!(m.fix.contains("raise cloudbr1 MTU to 1500"), "{m:#?}");
    assert!(m.fix.contains("lower brvx-5000 to 1430"), "{m:#?}");
}

// Intended change (issue 13): IDS no longer means ageing_time 0. An IDS
// bridge must be promiscuous and carry the agent's tc mirror filters on
// every other port; a flooding bridge is now a warning, not the goal.
#[test]
fn ids_nic_needs_a_promiscuous_bridge_and_mirror_filters_on_every_other_port() {
    let mut i = nic("cloudbr1", "vnet3");
    i.alias = Some("ua-ids-1".into());
    let mut f = healthy();
    f.mirrors = mirrors(&[("vnet3", &[]), ("vnet5", &["vnet3"])]);
    let h = run(&i, &f, 1);
    assert_only_fault(&h, "promisc");
    assert!(get(&h, "promisc").fix.contains("promisc on"));
    if let Some(b) = f.bridge.as_mut() {
        b.promisc = true;
    }
    let h = run(&i, &f, 1);
    let p = get(&h, "promisc");
    assert_eq!(p.status, HopStatus::Ok, "{p:#?}");
    assert!(p.evidence.contains("1 sensor(s)"), "{p:#?}");
    assert!(!p.fix.contains("ageing_time 0"), "{p:#?}");
    // A port without the filter: the sensor misses its frames.
    f.mirrors = mirrors(&[("vnet3", &[]), ("vnet5", &[]), ("vnet6", &["vnet3"])]);
    let h = run(&i, &f, 1);
    assert_only_fault(&h, "promisc");
    let p = get(&h, "promisc");
    assert!(
        p.fix
            .contains("tc filter add dev vnet5 ingress prio 49152 protocol all u32"),
        "{p:#?}"
    );
    assert!(p.fix.contains("mirred egress mirror dev vnet3"), "{p:#?}");
}

#[test]
fn ids_bridge_at_ageing_zero_floods_every_tenant_and_is_a_warning() {
    let mut i = nic("cloudbr1", "vnet3");
    i.alias = Some("ua-ids-1".into());
    let mut f = healthy();
    f.mirrors = mirrors(&[("vnet3", &[]), ("vnet5", &["vnet3"])]);
    if let Some(b) = f.bridge.as_mut() {
        b.promisc = true;
        b.ageing = Some(0);
    }
    let h = run(&i, &f, 1);
    let p = get(&h, "promisc");
    assert_eq!(p.status, HopStatus::Warning, "{p:#?}");
    assert!(p.evidence.contains("floods every tenant"), "{p:#?}");
    assert!(p.fix.contains("ageing_time 30000"), "{p:#?}");
    // Flooding learns nothing: the FDB hop must not cry wolf.
    assert_eq!(get(&h, "fdb").status, HopStatus::Ok);
    assert!(get(&h, "fdb").evidence.contains("ageing_time 0"));
}

#[test]
fn promiscuous_bridge_without_ids_nics_is_a_warning() {
    let mut f = healthy();
    if let Some(b) = f.bridge.as_mut() {
        b.promisc = true;
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    let p = get(&h, "promisc");
    assert_eq!(p.status, HopStatus::Warning, "{p:#?}");
    assert!(p.fix.contains("promisc off"), "{p:#?}");
    // The same bridge with an IDS NIC elsewhere on it (vnet90), whose
    // filter is on this port, is expected.
    f.mirrors = mirrors(&[("vnet3", &["vnet90"]), ("vnet90", &[])]);
    let h = run(&nic("cloudbr1", "vnet3"), &f, 1);
    assert_eq!(get(&h, "promisc").status, HopStatus::Ok);
    // Without it, a warning on this (non-IDS) NIC.
    f.mirrors = mirrors(&[("vnet3", &[]), ("vnet90", &[])]);
    let h = run(&nic("cloudbr1", "vnet3"), &f, 1);
    assert_eq!(get(&h, "promisc").status, HopStatus::Warning);
}

#[test]
fn guest_sending_but_never_receiving_is_the_dhcp_signature() {
    let mut f = healthy();
    if let Some(t) = f.tap.as_mut() {
        t.counters = Some(LinkCounters {
            rx_packets: 7,
            tx_packets: 0,
            ..LinkCounters::default()
        });
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    let c = get(&h, "counters");
    assert_eq!(c.status, HopStatus::Warning);
    assert!(
        c.evidence.contains("sent 7 frames and received none"),
        "{c:#?}"
    );
    assert!(c.evidence.contains("DHCP"), "{c:#?}");
    // The reverse is a different story: the guest never talks.
    if let Some(t) = f.tap.as_mut() {
        t.counters = Some(LinkCounters {
            rx_packets: 0,
            tx_packets: 9,
            ..LinkCounters::default()
        });
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    let c = get(&h, "counters");
    assert!(!c.evidence.contains("DHCP"), "{c:#?}");
    assert!(c.evidence.contains("sent none"), "{c:#?}");
}

#[test]
fn drops_or_errors_on_the_tap_are_a_warning() {
    let mut f = healthy();
    if let Some(t) = f.tap.as_mut() {
        t.counters = Some(LinkCounters {
            rx_packets: 5,
            tx_packets: 5,
            tx_dropped: 3,
            ..LinkCounters::default()
        });
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    let c = get(&h, "counters");
    assert_eq!(c.status, HopStatus::Warning);
    assert!(c.evidence.contains("3 drops and 0 errors"), "{c:#?}");
}

#[test]
fn mac_missing_or_learned_elsewhere_in_the_fdb_is_a_warning() {
    let mut f = healthy();
    f.fdb.learned_on.clear();
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_eq!(get(&h, "fdb").status, HopStatus::Warning);
    assert!(get(&h, "fdb")
        .evidence
        .contains("not in the FDB of cloudbr1"));
    f.fdb.learned_on = vec!["eth1".into()];
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_eq!(get(&h, "fdb").status, HopStatus::Warning);
    assert!(get(&h, "fdb")
        .evidence
        .contains("learned on eth1, not on tap vnet3"));
}

fn ovs_nic() -> (InterfaceView, HostFacts) {
    let mut i = nic("br-ovs0", "vnet6");
    i.virtualport = Some("openvswitch".into());
    i.vlan = Some(100);
    let mut tap = link("vnet6", "tun", 1500, None);
    tap.counters = busy();
    let f = HostFacts {
        tap: Some(tap),
        ovs: Some(OvsFacts {
            bridge_exists: true,
            port_bridge: Some("br-ovs0".into()),
            tag: Some(100),
            mirror: false,
        }),
        fdb: FdbFacts {
            read: true,
            learned_on: vec!["vnet6 (vlan 100)".into()],
            error: None,
        },
        uplink: Some(uplink_ok("port of OVS bridge br-ovs0")),
        ..HostFacts::default()
    };
    (i, f)
}

#[test]
fn healthy_ovs_port_with_its_tag_is_ok() {
    let (i, f) = ovs_nic();
    let h = run(&i, &f, 0);
    for hop in &h {
        assert_eq!(hop.status, HopStatus::Ok, "{hop:#?}");
    }
    assert!(get(&h, "tap").evidence.contains("VLAN tag 100"));
}

#[test]
fn ovs_port_with_wrong_tag_or_on_no_bridge_is_a_tap_fault() {
    let (i, mut f) = ovs_nic();
    if let Some(o) = f.ovs.as_mut() {
        o.tag = Some(200);
    }
    let h = run(&i, &f, 0);
    assert_only_fault(&h, "tap");
    assert_eq!(get(&h, "tap").fix, "ovs-vsctl set port vnet6 tag=100");
    if let Some(o) = f.ovs.as_mut() {
        o.port_bridge = None;
        o.tag = None;
    }
    let h = run(&i, &f, 0);
    assert_only_fault(&h, "tap");
    assert_eq!(
        get(&h, "tap").fix,
        "ovs-vsctl add-port br-ovs0 vnet6 tag=100"
    );
    if let Some(o) = f.ovs.as_mut() {
        o.bridge_exists = false;
    }
    let h = run(&i, &f, 0);
    assert_eq!(get(&h, "bridge").status, HopStatus::Fault);
}

#[test]
fn unreadable_host_warns_with_the_reason() {
    let i = nic("cloudbr1", "vnet3");
    let h = hops(&DiagnoseInput {
        vm: "vm",
        mac: MAC,
        running: true,
        persistent: false,
        live: vec![&i],
        config: vec![],
        ids_on_bridge: 0,
        ids_taps: Vec::new(),
        host: HostInput::Unreadable("netlink: dump links: EPERM".into()),
        intended: None,
    });
    assert!(h[1..]
        .iter()
        .all(|x| x.status == HopStatus::Warning && x.evidence.contains("EPERM")));
}

#[test]
fn worst_status_orders_fault_above_warning() {
    let mk = |s| Hop {
        name: hop::TAP,
        status: s,
        evidence: String::new(),
        fix: String::new(),
    };
    let d = Diagnosis {
        nic: None,
        hops: vec![
            mk(HopStatus::Ok),
            mk(HopStatus::Fault),
            mk(HopStatus::Warning),
        ],
    };
    assert_eq!(d.worst(), HopStatus::Fault);
    let d = Diagnosis {
        nic: None,
        hops: vec![mk(HopStatus::Ok)],
    };
    assert_eq!(d.worst(), HopStatus::Ok);
}

fn with_intent(i: &InterfaceView, f: &HostFacts, want: &str) -> Vec<Hop> {
    hops(&DiagnoseInput {
        vm: "i-2-10-VM",
        mac: MAC,
        running: true,
        persistent: true,
        live: vec![i],
        config: vec![i],
        ids_on_bridge: 0,
        ids_taps: Vec::new(),
        host: HostInput::Facts(f),
        intended: crate::nic::parse_broadcast_uri(want).expect("uri"),
    })
}

#[test]
fn intent_hop_names_an_ovs_tag_other_than_cloudstacks_as_the_broken_hop() {
    let mut i = nic("br-ovs0", "vnet3");
    i.virtualport = Some("openvswitch".into());
    i.vlan = Some(100);
    let mut f = healthy();
    f.ovs = Some(OvsFacts {
        bridge_exists: true,
        port_bridge: Some("br-ovs0".into()),
        tag: Some(100),
        mirror: false,
    });
    let ok = with_intent(&i, &f, "vlan://100");
    assert_eq!(get(&ok, "intent").status, HopStatus::Ok, "{ok:#?}");
    let h = with_intent(&i, &f, "vlan://200");
    let hop = get(&h, "intent");
    assert_eq!(hop.status, HopStatus::Fault, "{hop:#?}");
    assert!(
        hop.evidence.contains("CloudStack intended vlan://200")
            && hop.evidence.contains("carries vlan://100"),
        "{hop:#?}"
    );
    assert!(hop.fix.contains("--broadcast-uri vlan://200"), "{hop:#?}");
    // Without an intent the hop list is unchanged.
    assert!(run(&i, &f, 0).iter().all(|h| h.name != "intent"));
}

#[test]
fn intent_hop_compares_the_vni_a_linux_bridge_name_encodes() {
    let (i, f) = healthy_vxlan();
    assert_eq!(
        get(&with_intent(&i, &f, "vxlan://5000"), "intent").status,
        HopStatus::Ok
    );
    let h = with_intent(&i, &f, "vxlan://5001");
    assert_eq!(get(&h, "intent").status, HopStatus::Fault, "{h:#?}");
    // A bridge whose name says nothing cannot be compared: a warning, not
    // a guess.
    let h = with_intent(&nic("cloudbr1", "vnet3"), &healthy(), "vlan://300");
    assert_eq!(get(&h, "intent").status, HopStatus::Warning, "{h:#?}");
}

#[test]
fn healthy_uplink_shows_carrier_speed_and_errors_that_did_not_move() {
    let h = run(&nic("cloudbr1", "vnet3"), &healthy(), 0);
    let u = get(&h, "uplink");
    assert_eq!(u.status, HopStatus::Ok, "{u:#?}");
    for want in [
        "eth1 (port of cloudbr1): 10000 Mb/s",
        "carrier up",
        "errors 3/0 (rx/tx), rx_crc_errors 2",
        "no new errors within 1 s",
    ] {
        assert!(u.evidence.contains(want), "{want}: {u:#?}");
    }
}

#[test]
fn crc_errors_rising_between_the_two_samples_are_an_uplink_fault() {
    let mut f = healthy();
    if let Some(u) = f.uplink.as_mut() {
        let mut later = u.link.counters.expect("counters");
        later.rx_crc_errors += 40;
        later.rx_errors += 40;
        u.later = Some(later);
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_only_fault(&h, "uplink");
    let u = get(&h, "uplink");
    assert!(
        u.evidence
            .contains("rx_crc_errors rose 2 -> 42 (+40) within 1 s"),
        "{u:#?}"
    );
    assert!(u.fix.contains("cable or optic of eth1"), "{u:#?}");
    // The CRC errors are the rx errors: no second, weaker verdict for them.
    assert!(!u.evidence.contains("errors rose +"), "{u:#?}");
}

#[test]
fn other_errors_rising_are_a_warning_and_old_ones_are_not() {
    let mut f = healthy();
    if let Some(u) = f.uplink.as_mut() {
        let mut later = u.link.counters.expect("counters");
        later.tx_errors += 5;
        u.later = Some(later);
    }
    let u = get(&run(&nic("cloudbr1", "vnet3"), &f, 0), "uplink").clone();
    assert_eq!(u.status, HopStatus::Warning, "{u:#?}");
    assert!(u.evidence.contains("errors rose +0/+5 (rx/tx)"), "{u:#?}");
}

#[test]
fn an_uplink_down_or_without_carrier_is_a_fault() {
    let mut f = healthy();
    if let Some(u) = f.uplink.as_mut() {
        u.link.lower_up = false;
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_only_fault(&h, "uplink");
    assert!(get(&h, "uplink").evidence.contains("eth1 has no carrier"));
    if let Some(u) = f.uplink.as_mut() {
        u.link.up = false;
    }
    let h = run(&nic("cloudbr1", "vnet3"), &f, 0);
    assert_only_fault(&h, "uplink");
    assert_eq!(get(&h, "uplink").fix, "ip link set eth1 up");
}

#[test]
fn no_uplink_is_a_warning_with_the_reason_and_unknown_speed_says_why() {
    let mut f = healthy();
    f.uplink = None;
    f.uplink_missing = Some("bridge cloudbr1 has no physical port".into());
    let u = get(&run(&nic("cloudbr1", "vnet3"), &f, 0), "uplink").clone();
    assert_eq!(u.status, HopStatus::Warning, "{u:#?}");
    assert!(
        u.evidence
            .contains("no uplink: bridge cloudbr1 has no physical port"),
        "{u:#?}"
    );
    let mut f = healthy();
    if let Some(u) = f.uplink.as_mut() {
        u.speed_mbps = None;
        u.speed_unknown = Some("ethtool is not installed".into());
    }
    let u = get(&run(&nic("cloudbr1", "vnet3"), &f, 0), "uplink").clone();
    assert_eq!(u.status, HopStatus::Ok, "{u:#?}");
    assert!(u
        .evidence
        .contains("speed unknown (ethtool is not installed)"));
}

/// A VLAN bridge whose CloudStack name was too long: `brenp0s31f6np0-100`
/// is 18 bytes, so the agent made it under its 15-byte hash name.
fn hashed_vlan(id: u16) -> (String, InterfaceView, HostFacts) {
    let pif = "enp0s31f6np0";
    let bridge = naming::vlan_bridge(pif, id);
    let dev = naming::vlan_device(pif, id);
    let i = nic(&bridge, "vnet3");
    let mut f = healthy();
    if let Some(t) = f.tap.as_mut() {
        t.master = Some(bridge.clone());
    }
    if let Some(b) = f.bridge.as_mut() {
        b.name = bridge.clone();
    }
    let mut v = link(&dev, "vlan", 1500, Some(&bridge));
    v.vlan = Some(VlanFacts {
        id: Some(id),
        parent: Some(pif.into()),
    });
    f.segment = Some(v);
    f.underlay = Some(link(pif, "", 1500, None));
    f.decoded_vlan_bridge = Some((pif.to_string(), id));
    (bridge, i, f)
}

#[test]
fn a_shortened_vlan_bridge_name_is_still_checked() {
    let (bridge, i, f) = hashed_vlan(100);
    assert_eq!(bridge.len(), 15);
    assert_eq!(
        expected_segment(&bridge),
        None,
        "the name alone says nothing"
    );
    let h = run(&i, &f, 0);
    let s = get(&h, "segment");
    assert_eq!(s.status, HopStatus::Ok, "{s:#?}");
    assert!(
        s.evidence.contains(&format!(
            "{bridge} is the 15-byte name of brenp0s31f6np0-100"
        )),
        "{s:#?}"
    );
    assert!(s.evidence.contains("vlan id 100"), "{s:#?}");
    // The device in it is then judged as on any VLAN bridge.
    let (_, i, mut f) = hashed_vlan(100);
    if let Some(v) = f.segment.as_mut().and_then(|s| s.vlan.as_mut()) {
        v.id = Some(101);
    }
    let h = run(&i, &f, 0);
    assert_only_fault(&h, "segment");
    assert!(get(&h, "segment")
        .evidence
        .contains("vlan id 101, expected 100"));
}

#[test]
fn intent_on_a_shortened_vlan_bridge_compares_the_recomputed_segment() {
    let (_, i, f) = hashed_vlan(100);
    let intent = |want: &str| {
        let h = hops(&DiagnoseInput {
            vm: "vm",
            mac: MAC,
            running: true,
            persistent: false,
            live: vec![&i],
            config: vec![],
            ids_on_bridge: 0,
            ids_taps: Vec::new(),
            host: HostInput::Facts(&f),
            intended: crate::nic::parse_broadcast_uri(want).expect("uri"),
        });
        get(&h, "intent").clone()
    };
    let ok = intent("vlan://100");
    assert_eq!(ok.status, HopStatus::Ok, "{ok:#?}");
    let bad = intent("vlan://200");
    assert_eq!(bad.status, HopStatus::Fault, "{bad:#?}");
    assert!(bad.evidence.contains("carries vlan://100"), "{bad:#?}");
}
