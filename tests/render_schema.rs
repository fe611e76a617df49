//! Every valid request renders an `<interface>` that libvirt's own RelaxNG
//! schema accepts (checked with `virt-xml-validate`), that is well-formed,
//! and that carries the requested values back out when parsed.
//!
//! Uses only the public API: RawNic → NicSpec → InterfaceDef → XML.

use std::io::ErrorKind;
use std::process::Command;

use nic_agent::nic::{Alias, NicSpec, RawBandwidth, RawNic, Segment, SwitchType};
use nic_agent::pci::PciAddress;
use nic_agent::xml::interface::InterfaceDef;
use proptest::prelude::*;
use quick_xml::events::Event;
use serde::Deserialize;

/// The smallest domain document the schema accepts; the NIC goes in
/// `<devices>`.
fn wrap_in_domain(interface: &str) -> String {
    format!(
        "<domain type='qemu'><name>t</name><memory>131072</memory>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <devices>{interface}</devices></domain>\n"
    )
}

/// Runs `virt-xml-validate FILE domain`. Err carries the validator's output.
/// A missing validator is a test failure, not a skip: without it this file
/// would prove nothing.
fn validate_domain(doc: &str) -> Result<(), String> {
    validate_as(doc, "domain")
}

/// Runs `virt-xml-validate FILE KIND` (`domain`, `nwfilter`).
fn validate_as(doc: &str, kind: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("domain.xml");
    std::fs::write(&path, doc).expect("write domain XML");
    let out = match Command::new("virt-xml-validate")
        .arg(&path)
        .arg(kind)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "virt-xml-validate is not installed: it comes with libvirt-clients \
             (see tests/lab/install-deps.sh); the schema test cannot run without it"
        ),
        Err(e) => panic!("cannot run virt-xml-validate: {e}"),
    };
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "virt-xml-validate rejected the document ({}):\n{}{}\n--- document ---\n{doc}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// ---- parse-back mirror: only what the round-trip checks ----

#[derive(Debug, Deserialize)]
struct PInterface {
    #[serde(rename = "@type")]
    kind: String,
    mac: PMac,
    source: PSource,
    virtualport: Option<PVirtualPort>,
    vlan: Option<PVlan>,
    model: PModel,
    driver: Option<PDriver>,
    mtu: Option<PMtu>,
    link: PLink,
    bandwidth: Option<PBandwidth>,
    alias: PAlias,
    acpi: Option<PAcpi>,
    address: Option<PAddress>,
}

#[derive(Debug, Deserialize)]
struct PMac {
    #[serde(rename = "@address")]
    address: String,
}

#[derive(Debug, Deserialize)]
struct PSource {
    #[serde(rename = "@bridge")]
    bridge: String,
}

#[derive(Debug, Deserialize)]
struct PVirtualPort {
    #[serde(rename = "@type")]
    kind: String,
    parameters: Option<PParameters>,
}

#[derive(Debug, Deserialize)]
struct PParameters {
    #[serde(rename = "@interfaceid")]
    interfaceid: String,
}

#[derive(Debug, Deserialize)]
struct PVlan {
    tag: PTag,
}

#[derive(Debug, Deserialize)]
struct PTag {
    #[serde(rename = "@id")]
    id: u16,
}

#[derive(Debug, Deserialize)]
struct PModel {
    #[serde(rename = "@type")]
    kind: String,
}

#[derive(Debug, Deserialize)]
struct PDriver {
    #[serde(rename = "@name")]
    name: Option<String>,
    #[serde(rename = "@queues")]
    queues: Option<u16>,
}

#[derive(Debug, Deserialize)]
struct PMtu {
    #[serde(rename = "@size")]
    size: u32,
}

#[derive(Debug, Deserialize)]
struct PLink {
    #[serde(rename = "@state")]
    state: String,
}

#[derive(Debug, Deserialize)]
struct PBandwidth {
    inbound: Option<PRate>,
    outbound: Option<PRate>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct PRate {
    #[serde(rename = "@average")]
    average: u64,
    #[serde(rename = "@peak")]
    peak: Option<u64>,
    #[serde(rename = "@burst")]
    burst: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct PAlias {
    #[serde(rename = "@name")]
    name: String,
}

#[derive(Debug, Deserialize)]
struct PAcpi {
    #[serde(rename = "@index")]
    index: u32,
}

#[derive(Debug, Deserialize)]
struct PAddress {
    #[serde(rename = "@slot")]
    slot: String,
    #[serde(rename = "@bus")]
    bus: String,
}

/// Well-formed, exactly one top-level element named `interface`, no XML
/// declaration.
fn assert_single_interface_element(xml: &str) -> Result<(), TestCaseError> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut depth = 0usize;
    let mut roots = 0usize;
    loop {
        match reader.read_event() {
            Err(e) => return Err(TestCaseError::fail(format!("not well-formed: {e}\n{xml}"))),
            Ok(Event::Eof) => break,
            Ok(Event::Decl(_)) => return Err(TestCaseError::fail("unexpected XML declaration")),
            Ok(Event::Start(e)) => {
                if depth == 0 {
                    roots += 1;
                    prop_assert!(
                        e.name().into_inner() == "interface",
                        "root is not <interface>"
                    );
                }
                depth += 1;
            }
            Ok(Event::Empty(_)) => prop_assert!(depth > 0, "empty element at top level"),
            Ok(Event::End(_)) => depth -= 1,
            Ok(Event::Text(t)) => prop_assert!(
                depth > 0 || t.into_inner().chars().all(char::is_whitespace),
                "text outside the element"
            ),
            Ok(_) => {}
        }
    }
    prop_assert_eq!(depth, 0);
    prop_assert_eq!(roots, 1);
    Ok(())
}

// ---- strategies for VALID raw requests ----

fn mac() -> impl Strategy<Value = String> {
    any::<[u8; 6]>().prop_map(|mut o| {
        // Unicast (bit 0 clear) and never all-zero (bit 1 set).
        o[0] = (o[0] & 0xfe) | 0x02;
        let s: Vec<String> = o.iter().map(|b| format!("{b:02x}")).collect();
        // Exercise case folding too.
        if o[1] % 2 == 0 {
            s.join(":").to_uppercase()
        } else {
            s.join(":")
        }
    })
}

fn bridge() -> impl Strategy<Value = String> {
    // A leading '-' is refused (it would read as an option to ovs-vsctl).
    "[A-Za-z0-9_.][A-Za-z0-9_.-]{0,14}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn raw_bandwidth() -> impl Strategy<Value = Option<RawBandwidth>> {
    let max = u64::from(u32::MAX);
    prop_oneof![
        Just(None),
        Just(Some(RawBandwidth::default())),
        (1..=34_359_738u32).prop_map(|m| Some(RawBandwidth {
            rate_mbps: m,
            ..RawBandwidth::default()
        })),
        (1..=max, 0..=max, 0..=max).prop_map(move |(avg, extra, burst)| Some(RawBandwidth {
            average_kbps: avg,
            // 0 = unset, else peak ≥ average.
            peak_kbps: if extra % 3 == 0 { 0 } else { avg.max(extra) },
            burst_kb: burst,
            rate_mbps: 0,
        })),
    ]
}

/// (vlan, vni, broadcast_uri), consistent with each other and with `ovs`.
fn segment(ovs: bool) -> BoxedStrategy<(Option<u32>, Option<u32>, String)> {
    let vlan_like = prop_oneof![
        Just((None, None, String::new())),
        (1..=4094u32).prop_map(|v| (Some(v), None, String::new())),
        (1..=4094u32).prop_map(|v| (None, None, format!("vlan://{v}"))),
        (1..=4094u32).prop_map(|v| (Some(v), None, format!("vlan://{v}"))),
        Just((None, None, "vlan://untagged".to_string())),
        Just((None, None, "vlan://4095".to_string())),
    ];
    if ovs {
        vlan_like.boxed()
    } else {
        prop_oneof![
            vlan_like,
            (1..=16_777_215u32).prop_map(|v| (None, Some(v), String::new())),
            (1..=16_777_215u32).prop_map(|v| (None, None, format!("vxlan://{v}"))),
        ]
        .boxed()
    }
}

fn valid_raw_nic() -> impl Strategy<Value = RawNic> {
    any::<bool>().prop_flat_map(|ovs| {
        let virtio_bits = prop_oneof![
            3 => (
                Just("virtio".to_string()).boxed(),
                proptest::option::of(68..=65535u32),
                proptest::option::of(1..=256u32),
                prop_oneof![Just(""), Just("auto"), Just("on"), Just("off")].prop_map(String::from),
            ),
            1 => (
                prop_oneof![Just(""), Just("virtio")].prop_map(String::from).boxed(),
                Just(None),
                Just(None),
                Just(String::new()),
            ),
            1 => (
                prop_oneof![Just("e1000"), Just("e1000e"), Just("rtl8139")].prop_map(String::from).boxed(),
                Just(None),
                Just(None),
                prop_oneof![Just(""), Just("auto"), Just("off")].prop_map(String::from),
            ),
        ];
        let iid = if ovs {
            prop_oneof![
                Just(String::new()),
                (1..=u128::MAX).prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
            ]
            .boxed()
        } else {
            Just(String::new()).boxed()
        };
        (
            (mac(), bridge(), segment(ovs), virtio_bits),
            (
                any::<bool>(),
                any::<bool>(),
                proptest::option::of("ua-[A-Za-z0-9_-]{1,61}"),
                raw_bandwidth(),
                raw_bandwidth(),
                any::<bool>(),
                any::<bool>(),
            ),
            (proptest::option::of(1..=31u32), proptest::option::of(1..=16383u32), iid),
        )
            .prop_map(
                move |(
                    (mac, bridge, (vlan, vni, broadcast_uri), (model, mtu, queues, vhost)),
                    (link_down, promiscuous, alias, inbound, outbound, pxe_disable, packed),
                    (pci_slot, acpi_index, interface_id),
                )| RawNic {
                    // Packed virtqueues are virtio-only (refused otherwise).
                    packed: packed && (model.is_empty() || model == "virtio"),
                    pxe_disable,
                    mac,
                    bridge,
                    ovs,
                    vlan,
                    vni,
                    broadcast_uri,
                    mtu,
                    queues,
                    model,
                    link_down,
                    promiscuous,
                    alias: alias.unwrap_or_default(),
                    inbound,
                    outbound,
                    pci_slot,
                    acpi_index,
                    vhost,
                    interface_id,
                    ..RawNic::default()
                },
            )
    })
}

fn check_case(raw: RawNic, vhost_net: bool, bus: u8) -> Result<(), TestCaseError> {
    let spec = NicSpec::try_from(raw.clone())
        .map_err(|e| TestCaseError::fail(format!("valid request rejected: {e}\n{raw:?}")))?;
    let alias = spec.alias.clone().unwrap_or_else(Alias::generate);
    let mut def = InterfaceDef::from_spec(&spec, spec.bridge.clone(), alias.clone(), vhost_net);
    def.pci = spec.pci_slot.map(|s| PciAddress {
        domain: 0,
        bus,
        slot: s.get(),
        function: 0,
    });
    let xml = def
        .to_xml()
        .map_err(|e| TestCaseError::fail(format!("render failed: {e}")))?;

    assert_single_interface_element(&xml)?;

    // Round-trip: the values come back out.
    let p: PInterface = quick_xml::de::from_str(&xml)
        .map_err(|e| TestCaseError::fail(format!("parse back: {e}\n{xml}")))?;
    prop_assert_eq!(&p.kind, "bridge");
    prop_assert_eq!(&p.mac.address, &raw.mac.to_lowercase());
    prop_assert_eq!(&p.source.bridge, &raw.bridge);
    prop_assert_eq!(p.mtu.map(|m| m.size), raw.mtu);
    prop_assert_eq!(
        p.driver.as_ref().and_then(|d| d.queues).map(u32::from),
        raw.queues
    );
    let expect_model = if raw.model.is_empty() {
        "virtio"
    } else {
        raw.model.as_str()
    };
    prop_assert_eq!(&p.model.kind, expect_model);
    prop_assert_eq!(p.driver.is_some(), expect_model == "virtio");
    if let Some(d) = &p.driver {
        let want = match (raw.vhost.as_str(), vhost_net) {
            ("on", _) | ("" | "auto", true) => "vhost",
            _ => "qemu",
        };
        prop_assert_eq!(d.name.as_deref(), Some(want));
    }
    prop_assert_eq!(&p.link.state, if raw.link_down { "down" } else { "up" });
    prop_assert_eq!(&p.alias.name, alias.as_str());
    if !raw.alias.is_empty() {
        prop_assert_eq!(&p.alias.name, &raw.alias);
    }
    prop_assert_eq!(p.acpi.map(|a| a.index), raw.acpi_index);
    prop_assert_eq!(
        p.address.as_ref().map(|a| (a.slot.clone(), a.bus.clone())),
        raw.pci_slot
            .map(|s| (format!("0x{s:02x}"), format!("0x{bus:02x}")))
    );
    // OVS-only parts.
    prop_assert_eq!(p.virtualport.is_some(), raw.ovs);
    if let Some(vp) = &p.virtualport {
        prop_assert_eq!(&vp.kind, "openvswitch");
        prop_assert_eq!(
            vp.parameters.as_ref().map(|x| x.interfaceid.clone()),
            (!raw.interface_id.is_empty()).then(|| raw.interface_id.clone())
        );
    }
    let ovs_vlan = match spec.segment {
        Segment::Vlan(v) if spec.switch == SwitchType::OpenVswitch => Some(v.get()),
        _ => None,
    };
    prop_assert_eq!(p.vlan.map(|v| v.tag.id), ovs_vlan);
    // Bandwidth as given (rate_mbps expands to average = peak = mbps*125).
    let expect_rate = |b: &Option<RawBandwidth>| -> Option<PRate> {
        let b = b.as_ref()?;
        if *b == RawBandwidth::default() {
            None
        } else if b.rate_mbps != 0 {
            let k = u64::from(b.rate_mbps) * 125;
            Some(PRate {
                average: k,
                peak: Some(k),
                burst: None,
            })
        } else {
            let nz = |v: u64| (v != 0).then_some(v);
            Some(PRate {
                average: b.average_kbps,
                peak: nz(b.peak_kbps),
                burst: nz(b.burst_kb),
            })
        }
    };
    let (pin, pout) = match p.bandwidth {
        Some(b) => (b.inbound, b.outbound),
        None => (None, None),
    };
    prop_assert_eq!(pin, expect_rate(&raw.inbound));
    prop_assert_eq!(pout, expect_rate(&raw.outbound));

    // And libvirt's schema accepts it.
    validate_domain(&wrap_in_domain(&xml)).map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    // Each case spawns virt-xml-validate (~15 ms); 64 cases per test keeps
    // the file well under a few seconds.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_valid_request_renders_schema_valid_round_tripping_xml(
        raw in valid_raw_nic(),
        vhost_net in any::<bool>(),
        bus in any::<u8>(),
    ) {
        check_case(raw, vhost_net, bus)?;
    }

    #[test]
    fn every_valid_ovs_request_renders_schema_valid_xml(
        raw in valid_raw_nic().prop_filter("ovs only", |r| r.ovs),
        vhost_net in any::<bool>(),
    ) {
        check_case(raw, vhost_net, 0)?;
    }
}

#[test]
fn domain_wrapper_alone_is_schema_valid() {
    validate_domain(&wrap_in_domain("")).unwrap();
}

#[test]
fn validator_rejects_a_broken_interface() {
    // Proves the schema check can fail: an alias with a space and an
    // unknown link state are both outside libvirt's schema.
    for bad in [
        "<interface type='bridge'><source bridge='br0'/><alias name='ua- x'/></interface>",
        "<interface type='bridge'><source bridge='br0'/><link state='sideways'/></interface>",
        "<interface type='bridge'><mac address='01:00:5e:00:00:01'/></interface>",
    ] {
        assert!(
            validate_domain(&wrap_in_domain(bad)).is_err(),
            "accepted: {bad}"
        );
    }
}

#[test]
fn agents_nwfilter_is_valid_for_libvirts_nwfilter_schema() {
    validate_as(nic_agent::xml::nwfilter::FILTER_XML, "nwfilter").unwrap();
}

#[test]
fn anti_spoofing_interface_is_valid_with_and_without_addresses() {
    for ips in [
        vec![],
        vec!["10.1.1.5".to_string()],
        vec!["10.1.1.5".into(), "10.1.1.6".into(), "2001:db8::5".into()],
        vec!["fd00::5".to_string()],
    ] {
        let spec = NicSpec::try_from(RawNic {
            mac: "52:54:00:aa:00:01".into(),
            bridge: "cloudbr0".into(),
            anti_spoofing: true,
            ips: ips.clone(),
            ..RawNic::default()
        })
        .unwrap();
        let mut def = InterfaceDef::from_spec(&spec, spec.bridge.clone(), Alias::generate(), false);
        def.filter = Some(nic_agent::xml::nwfilter::FilterRef {
            mac: spec.mac,
            ips: spec.ips.clone(),
        });
        let xml = def.to_xml().unwrap();
        assert!(
            xml.contains(r#"<filterref filter="nic-agent-clean">"#),
            "{xml}"
        );
        for ip in &ips {
            assert!(xml.contains(&format!(r#"value="{ip}""#)), "{ip}: {xml}");
        }
        validate_domain(&wrap_in_domain(&xml)).unwrap();
    }
}
