//! Fuzz target `spec_render`: arbitrary request → `NicSpec::try_from` →
//! `InterfaceDef` → XML → `DomainView::parse`.
//!
//! Invariants: nothing panics; a rejection names a field; every accepted
//! spec renders, and the rendered `<interface>`, wrapped in a minimal domain,
//! reads back with the same MAC, bridge, MTU, queues, model, link state,
//! OVS VLAN tag, alias, driver, shaping, ACPI index and PCI address.
//!
//! The input is structured (`arbitrary`): each string field is either
//! "shaped" (built from a byte alphabet that usually passes validation, so
//! the render path is reached often) or raw arbitrary text (hostile input).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nic_agent::nic::{Alias, BridgeName, NicSpec, RawBandwidth, RawNic};
use nic_agent::pci::PciAddress;
use nic_agent::xml::domain::DomainView;
use nic_agent::xml::interface::InterfaceDef;

/// Maps bytes onto an alphabet: mostly characters validation accepts,
/// with a few hostile ones (markup, quotes, space, slash, non-ASCII).
fn shaped(bytes: &[u8], alphabet: &str) -> String {
    const HOSTILE: [&str; 10] = ["<", ">", "&", "'", "\"", " ", "/", ":", "é", "\u{0}"];
    let chars: Vec<char> = alphabet.chars().collect();
    bytes
        .iter()
        .map(|&b| {
            if b >= 0xF6 {
                HOSTILE[usize::from(b - 0xF6)].to_string()
            } else {
                chars[usize::from(b) % chars.len()].to_string()
            }
        })
        .collect()
}

const NAME_CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-";
const ALIAS_CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";

#[derive(Arbitrary, Debug)]
enum MacIn {
    Octets { o: [u8; 6], dash: bool, upper: bool },
    Raw(String),
}

impl MacIn {
    fn text(&self) -> String {
        match self {
            MacIn::Octets { o, dash, upper } => {
                let sep = if *dash { "-" } else { ":" };
                let s = o
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(sep);
                if *upper {
                    s.to_ascii_uppercase()
                } else {
                    s
                }
            }
            MacIn::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum TextIn {
    Empty,
    Shaped(Vec<u8>),
    Raw(String),
}

impl TextIn {
    fn text(&self, alphabet: &str, prefix: &str) -> String {
        match self {
            TextIn::Empty => String::new(),
            TextIn::Shaped(b) => format!("{prefix}{}", shaped(b, alphabet)),
            TextIn::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Pick {
    Index(u8),
    Raw(String),
}

impl Pick {
    fn text(&self, options: &[&str]) -> String {
        match self {
            Pick::Index(i) => options[usize::from(*i) % options.len()].to_string(),
            Pick::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum UriIn {
    None,
    Vlan(u32),
    Untagged { upper: bool },
    Vxlan(u32),
    Raw(String),
}

impl UriIn {
    fn text(&self) -> String {
        match self {
            UriIn::None => String::new(),
            UriIn::Vlan(n) => format!("vlan://{n}"),
            UriIn::Untagged { upper: false } => "vlan://untagged".into(),
            UriIn::Untagged { upper: true } => "VLAN://UNTAGGED".into(),
            UriIn::Vxlan(n) => format!("vxlan://{n}"),
            UriIn::Raw(s) => s.clone(),
        }
    }
}

/// A number biased towards the small values the fields accept.
#[derive(Arbitrary, Debug)]
enum NumIn {
    None,
    Small(u16),
    Any(u32),
}

impl NumIn {
    fn get(&self) -> Option<u32> {
        match self {
            NumIn::None => None,
            NumIn::Small(v) => Some(u32::from(*v)),
            NumIn::Any(v) => Some(*v),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum IidIn {
    None,
    Uuid([u8; 16]),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct BwIn {
    average: NumIn,
    peak: NumIn,
    burst: NumIn,
    rate: NumIn,
}

impl BwIn {
    fn raw(&self) -> RawBandwidth {
        RawBandwidth {
            average_kbps: self.average.get().map_or(0, u64::from),
            peak_kbps: self.peak.get().map_or(0, u64::from),
            burst_kb: self.burst.get().map_or(0, u64::from),
            rate_mbps: self.rate.get().unwrap_or(0),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    mac: MacIn,
    bridge: TextIn,
    ovs: bool,
    vlan: NumIn,
    vni: NumIn,
    uri: UriIn,
    mtu: NumIn,
    queues: NumIn,
    model: Pick,
    link_down: bool,
    promiscuous: bool,
    alias: TextIn,
    inbound: Option<BwIn>,
    outbound: Option<BwIn>,
    pci_slot: NumIn,
    acpi_index: NumIn,
    vhost: Pick,
    interface_id: IidIn,
    vhost_net_present: bool,
    pxe_disable: bool,
    packed: bool,
    device_id: NumIn,
    nic_uuid: IidIn,
}

impl Input {
    fn raw(&self) -> RawNic {
        RawNic {
            mac: self.mac.text(),
            bridge: self.bridge.text(NAME_CHARS, ""),
            ovs: self.ovs,
            vlan: self.vlan.get(),
            vni: self.vni.get(),
            broadcast_uri: self.uri.text(),
            mtu: self.mtu.get(),
            queues: self.queues.get(),
            model: self
                .model
                .text(&["", "virtio", "e1000", "e1000e", "rtl8139", "VirtIO"]),
            link_down: self.link_down,
            promiscuous: self.promiscuous,
            alias: self.alias.text(ALIAS_CHARS, "ua-"),
            inbound: self.inbound.as_ref().map(BwIn::raw),
            outbound: self.outbound.as_ref().map(BwIn::raw),
            pci_slot: self.pci_slot.get(),
            acpi_index: self.acpi_index.get(),
            vhost: self.vhost.text(&["", "auto", "on", "off", "ON"]),
            interface_id: match &self.interface_id {
                IidIn::None => String::new(),
                IidIn::Uuid(b) => {
                    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
                    format!(
                        "{}-{}-{}-{}-{}",
                        &h[0..8],
                        &h[8..12],
                        &h[12..16],
                        &h[16..20],
                        &h[20..32]
                    )
                }
                IidIn::Raw(s) => s.clone(),
            },
            pxe_disable: self.pxe_disable,
            packed: self.packed,
            device_id: self.device_id.get(),
            nic_uuid: iid_text(&self.nic_uuid),
            ..RawNic::default()
        }
    }
}

fn iid_text(i: &IidIn) -> String {
    match i {
        IidIn::None => String::new(),
        IidIn::Uuid(b) => {
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &h[0..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32]
            )
        }
        IidIn::Raw(s) => s.clone(),
    }
}

fuzz_target!(|input: Input| {
    let raw = input.raw();
    let spec = match NicSpec::try_from(raw) {
        Ok(s) => s,
        Err(e) => {
            assert!(!e.field().is_empty(), "rejection without a field: {e:?}");
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(spec.diff(&spec).is_empty(), "a spec differs from itself");

    let alias = spec
        .alias
        .clone()
        .unwrap_or_else(|| Alias::try_from("ua-fuzz").expect("constant alias"));
    let bridge: BridgeName = spec.bridge.clone();
    let mut def = InterfaceDef::from_spec(&spec, bridge, alias.clone(), input.vhost_net_present);
    def.pci = spec.pci_slot.map(|s| PciAddress {
        domain: 0,
        bus: 0,
        slot: s.get(),
        function: 0,
    });
    let xml = match def.to_xml() {
        Ok(x) => x,
        Err(e) => panic!("accepted spec does not render: {e}\n{spec:?}"),
    };
    let doc = format!("<domain type='kvm'><name>fuzz</name><devices>{xml}</devices></domain>");
    let view = match DomainView::parse(&doc) {
        Ok(v) => v,
        Err(e) => panic!("rendered interface does not parse: {e}\n{doc}"),
    };
    assert_eq!(view.interfaces.len(), 1, "{doc}");
    let got = &view.interfaces[0];

    assert_eq!(got.kind, "bridge");
    assert_eq!(
        got.mac.as_deref(),
        Some(spec.mac.to_string().as_str()),
        "{doc}"
    );
    assert_eq!(got.source.as_deref(), Some(spec.bridge.as_str()), "{doc}");
    assert_eq!(got.mtu, def.mtu.map(|m| m.get()), "{doc}");
    assert_eq!(got.mtu, spec.mtu.map(|m| m.get()), "mtu dropped: {doc}");
    assert_eq!(got.queues, def.queues.map(|q| u32::from(q.get())), "{doc}");
    assert_eq!(
        got.queues,
        spec.queues.map(|q| u32::from(q.get())),
        "queues dropped: {doc}"
    );
    assert_eq!(got.model.as_deref(), Some(spec.model.as_str()), "{doc}");
    assert_eq!(got.link.as_deref(), Some(spec.link.as_str()), "{doc}");
    assert_eq!(got.alias.as_deref(), Some(alias.as_str()), "{doc}");
    assert_eq!(
        got.driver.as_deref(),
        def.driver.map(|d| d.as_str()),
        "{doc}"
    );

    let ovs = spec.switch == nic_agent::nic::SwitchType::OpenVswitch;
    let want_vlan = match spec.segment {
        nic_agent::nic::Segment::Vlan(v) if ovs => Some(u32::from(v.get())),
        _ => None,
    };
    assert_eq!(got.vlan, want_vlan, "{doc}");
    assert_eq!(
        got.virtualport.as_deref(),
        ovs.then_some("openvswitch"),
        "{doc}"
    );
    assert_eq!(
        got.interface_id,
        spec.interface_id.map(|i| i.to_string()),
        "{doc}"
    );
    for (want, have) in [
        (&spec.inbound, &got.inbound),
        (&spec.outbound, &got.outbound),
    ] {
        match (want, have) {
            (None, None) => {}
            (Some(w), Some(h)) => {
                assert_eq!(h.average, Some(w.average()), "{doc}");
                assert_eq!(h.peak, w.peak(), "{doc}");
                assert_eq!(h.burst, w.burst(), "{doc}");
            }
            _ => panic!("bandwidth lost or invented: {want:?} vs {have:?}\n{doc}"),
        }
    }
    assert_eq!(got.acpi_index, spec.acpi_index.map(|a| a.get()), "{doc}");
    assert_eq!(got.pci, def.pci, "{doc}");
    assert_eq!(got.rom_off, spec.pxe_disable, "pxe_disable dropped: {doc}");
    assert_eq!(got.packed, spec.packed, "packed dropped: {doc}");
    if let Some(u) = spec.nic_uuid {
        let a = got.alias.as_deref().unwrap_or_default();
        assert_eq!(nic_agent::nic::plug::uuid_from_alias(a), Some(u), "{doc}");
    }
});
