//! The `<interface type='bridge'>` writer: turns an [`InterfaceDef`] into
//! the element libvirt's `virDomainAttachDeviceFlags` takes.
//!
//! The document is produced by quick-xml's serde serializer from private
//! structs that mirror libvirt's schema, never by string formatting, so every
//! value is escaped by the serializer and the shape is fixed by types.

use serde::Serialize;

use crate::nic::{
    AcpiIndex, Alias, Bandwidth, BridgeName, InterfaceId, LinkState, MacAddr, Mtu, NicModel,
    NicSpec, QueueCount, Segment, SwitchType, VhostMode, VlanId,
};
use crate::pci::PciAddress;
use crate::xml::nwfilter::{FilterRef, XFilterRef};

/// Which virtio-net backend libvirt should ask QEMU for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverName {
    /// In-kernel vhost-net (`/dev/vhost-net`).
    Vhost,
    /// QEMU's userspace virtio-net backend.
    Qemu,
}

impl DriverName {
    /// libvirt's spelling: `vhost` or `qemu`.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverName::Vhost => "vhost",
            DriverName::Qemu => "qemu",
        }
    }
}

/// Picks the driver: `On` → vhost, `Off` → qemu, `Auto` → vhost iff
/// `/dev/vhost-net` is present.
///
/// `Auto` must not blindly say vhost: on a KVM domain without vhost-net,
/// libvirt refuses the attach ("vhost-net was requested for an interface,
/// but is unavailable"), while `name='qemu'` always works.
pub fn choose_driver(mode: VhostMode, vhost_net_present: bool) -> DriverName {
    match mode {
        VhostMode::On => DriverName::Vhost,
        VhostMode::Off => DriverName::Qemu,
        VhostMode::Auto if vhost_net_present => DriverName::Vhost,
        VhostMode::Auto => DriverName::Qemu,
    }
}

/// Why an [`InterfaceDef`] could not be rendered. The `nic` types are valid
/// by construction, but [`InterfaceDef`] has public fields and
/// [`PciAddress`] is a plain struct, so a caller can still combine them in
/// ways libvirt would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlWriteError {
    /// The PCI address has a slot above 0x1f or a function above 7.
    #[error("PCI address {0} is out of range: slot must be 0x00-0x1f, function 0-7")]
    PciAddressOutOfRange(PciAddress),
    /// `driver`, `queues` or `mtu` set on a non-virtio model.
    #[error("{field} is virtio-only but the model is {model}")]
    VirtioOnly {
        /// `driver`, `queues` or `mtu`.
        field: &'static str,
        /// The non-virtio model.
        model: NicModel,
    },
    /// The serializer failed; a bug in this module, not in the input.
    #[error("XML serializer failed: {0}")]
    Serialize(String),
}

/// Everything needed to render one bridge-type `<interface>`.
///
/// Build it with [`InterfaceDef::from_spec`] and then fill `pci` from the
/// slot accounting, or set the fields directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceDef {
    /// Guest MAC.
    pub mac: MacAddr,
    /// The bridge the tap is plugged into (for a Linux-bridge VLAN/VXLAN:
    /// the per-segment host bridge, not the traffic label).
    pub source_bridge: BridgeName,
    /// True for an Open vSwitch bridge (`<virtualport type='openvswitch'>`).
    pub ovs: bool,
    /// OVS `iface-id`; rendered only with `ovs`.
    pub interface_id: Option<InterfaceId>,
    /// OVS access VLAN; rendered only with `ovs`.
    pub vlan_tag: Option<VlanId>,
    /// NIC model.
    pub model: NicModel,
    /// Backend driver (virtio only).
    pub driver: Option<DriverName>,
    /// Queue pairs (virtio only).
    pub queues: Option<QueueCount>,
    /// Guest MTU (virtio only).
    pub mtu: Option<Mtu>,
    /// Initial link state.
    pub link: LinkState,
    /// Shaping towards the guest.
    pub inbound: Option<Bandwidth>,
    /// Shaping from the guest.
    pub outbound: Option<Bandwidth>,
    /// User alias; always set so the NIC can be found again unambiguously.
    pub alias: Alias,
    /// Explicit PCI address; `None` lets libvirt pick one.
    pub pci: Option<PciAddress>,
    /// ACPI index.
    pub acpi_index: Option<AcpiIndex>,
    /// Anti-spoofing: a reference to the agent's nwfilter.
    pub filter: Option<FilterRef>,
    /// `<rom enabled='no'/>`: no option ROM, so no PXE.
    pub pxe_disable: bool,
    /// `<driver packed='on'>` (virtio only).
    pub packed: bool,
}

impl InterfaceDef {
    /// Maps a validated request onto an interface definition.
    ///
    /// `source_bridge` is passed in because for a VLAN or VXLAN on a Linux
    /// bridge the tap goes into a per-segment bridge that the host module
    /// names, not into `spec.bridge`. `pci` is left `None`: the bus a pinned
    /// slot lives on depends on the machine type and is the PCI module's
    /// decision.
    pub fn from_spec(
        spec: &NicSpec,
        source_bridge: BridgeName,
        alias: Alias,
        vhost_net_present: bool,
    ) -> Self {
        let ovs = spec.switch == SwitchType::OpenVswitch;
        let vlan_tag = match spec.segment {
            Segment::Vlan(v) if ovs => Some(v),
            _ => None,
        };
        let virtio = spec.model.is_virtio();
        InterfaceDef {
            mac: spec.mac,
            source_bridge,
            ovs,
            interface_id: spec.interface_id.filter(|_| ovs),
            vlan_tag,
            model: spec.model,
            driver: virtio.then(|| choose_driver(spec.vhost, vhost_net_present)),
            queues: spec.queues.filter(|_| virtio),
            mtu: spec.mtu.filter(|_| virtio),
            link: spec.link,
            inbound: spec.inbound,
            outbound: spec.outbound,
            alias,
            pci: None,
            acpi_index: spec.acpi_index,
            // Whether the filter is applied is the hot-plug policy's call
            // (anti_spoofing = auto/nwfilter/off), not the request's alone.
            filter: None,
            pxe_disable: spec.pxe_disable,
            packed: spec.packed && virtio,
        }
    }

    /// Renders the element libvirt's `virDomainAttachDeviceFlags` takes:
    /// one `<interface>` element, no XML declaration, indented with two
    /// spaces, children in the order libvirt's `virsh dumpxml` prints them
    /// (mac, source, vlan, virtualport, bandwidth, model, driver, filterref,
    /// link, mtu, alias, acpi, address), so equal definitions give equal
    /// text.
    pub fn to_xml(&self) -> Result<String, XmlWriteError> {
        let doc = self.document()?;
        let mut out = String::new();
        let mut ser = quick_xml::se::Serializer::with_root(&mut out, Some("interface"))
            .map_err(|e| XmlWriteError::Serialize(e.to_string()))?;
        ser.indent(' ', 2);
        doc.serialize(ser)
            .map_err(|e| XmlWriteError::Serialize(e.to_string()))?;
        Ok(out)
    }

    fn document(&self) -> Result<XInterface<'_>, XmlWriteError> {
        if !self.model.is_virtio() {
            let set = [
                ("driver", self.driver.is_some()),
                ("queues", self.queues.is_some()),
                ("mtu", self.mtu.is_some()),
                ("packed", self.packed),
            ];
            if let Some((field, _)) = set.into_iter().find(|(_, is_set)| *is_set) {
                return Err(XmlWriteError::VirtioOnly {
                    field,
                    model: self.model,
                });
            }
        }
        let address = self.pci.map(pci_address).transpose()?;
        // A queues value without a driver name still needs a <driver>.
        let driver = match (self.driver, self.queues, self.packed) {
            (None, None, false) => None,
            (name, queues, packed) => Some(XDriver {
                name: name.map(DriverName::as_str),
                queues: queues.map(QueueCount::get),
                packed: packed.then_some("on"),
            }),
        };
        let bandwidth = match (&self.inbound, &self.outbound) {
            (None, None) => None,
            (i, o) => Some(XBandwidth {
                inbound: i.as_ref().map(XRate::from),
                outbound: o.as_ref().map(XRate::from),
            }),
        };
        Ok(XInterface {
            kind: "bridge",
            mac: XMac {
                address: self.mac.to_string(),
            },
            source: XSource {
                bridge: self.source_bridge.as_str(),
            },
            virtualport: self.ovs.then(|| XVirtualPort {
                kind: "openvswitch",
                parameters: self.interface_id.map(|id| XParameters {
                    interfaceid: id.to_string(),
                }),
            }),
            // On a Linux bridge a VLAN is realised by plugging the tap into
            // a per-VLAN host bridge (traffic label + 802.1Q sub-interface),
            // the way CloudStack does it, so the tap itself carries untagged
            // frames and needs no <vlan>. libvirt documents <vlan> for OVS,
            // SR-IOV hostdevs and macvtap passthrough, not for plain bridges
            // (which would need vlan_filtering, absent without 8021q).
            vlan: self.vlan_tag.filter(|_| self.ovs).map(|v| XVlan {
                tag: XTag { id: v.get() },
            }),
            model: XModel {
                kind: self.model.as_str(),
            },
            driver,
            filterref: self.filter.as_ref().map(FilterRef::element),
            mtu: self.mtu.map(|m| XMtu { size: m.get() }),
            link: XLink {
                state: self.link.as_str(),
            },
            bandwidth,
            alias: XAlias {
                name: self.alias.as_str(),
            },
            // CloudStack writes <rom bar='off' file=''/>. libvirt's parser
            // takes that, but its schema does not (file is an absolute
            // path), so a validating define of the domain would fail.
            // enabled='no' is libvirt's own spelling for the same QEMU
            // result (romfile="": no ROM loaded, no BAR), schema-valid.
            // The reader accepts both.
            rom: self.pxe_disable.then_some(XRom { enabled: "no" }),
            acpi: self.acpi_index.map(|a| XAcpi { index: a.get() }),
            address,
        })
    }
}

fn pci_address(a: PciAddress) -> Result<XAddress, XmlWriteError> {
    if a.slot > 0x1f || a.function > 7 {
        return Err(XmlWriteError::PciAddressOutOfRange(a));
    }
    // libvirt's own spelling, so a rendered address compares equal to what
    // `virsh dumpxml` shows.
    Ok(XAddress {
        kind: "pci",
        domain: format!("0x{:04x}", a.domain),
        bus: format!("0x{:02x}", a.bus),
        slot: format!("0x{:02x}", a.slot),
        function: format!("0x{:x}", a.function),
    })
}

// ---- serde mirror of the element; field order is output order ----
//
// The order is the one libvirt 11.3's `virsh dumpxml` prints for a bridge
// interface (checked by attaching this writer's output on the test driver),
// so a rendered element and libvirt's read-back line up when diffed.

#[derive(Serialize)]
struct XInterface<'a> {
    #[serde(rename = "@type")]
    kind: &'static str,
    mac: XMac,
    source: XSource<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vlan: Option<XVlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    virtualport: Option<XVirtualPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bandwidth: Option<XBandwidth>,
    model: XModel,
    #[serde(skip_serializing_if = "Option::is_none")]
    driver: Option<XDriver>,
    #[serde(skip_serializing_if = "Option::is_none")]
    filterref: Option<XFilterRef>,
    link: XLink,
    #[serde(skip_serializing_if = "Option::is_none")]
    mtu: Option<XMtu>,
    alias: XAlias<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rom: Option<XRom>,
    #[serde(skip_serializing_if = "Option::is_none")]
    acpi: Option<XAcpi>,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<XAddress>,
}

#[derive(Serialize)]
struct XMac {
    #[serde(rename = "@address")]
    address: String,
}

#[derive(Serialize)]
struct XSource<'a> {
    #[serde(rename = "@bridge")]
    bridge: &'a str,
}

#[derive(Serialize)]
struct XVirtualPort {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<XParameters>,
}

#[derive(Serialize)]
struct XParameters {
    #[serde(rename = "@interfaceid")]
    interfaceid: String,
}

#[derive(Serialize)]
struct XVlan {
    tag: XTag,
}

#[derive(Serialize)]
struct XTag {
    #[serde(rename = "@id")]
    id: u16,
}

#[derive(Serialize)]
struct XModel {
    #[serde(rename = "@type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct XDriver {
    #[serde(rename = "@name", skip_serializing_if = "Option::is_none")]
    name: Option<&'static str>,
    #[serde(rename = "@queues", skip_serializing_if = "Option::is_none")]
    queues: Option<u16>,
    #[serde(rename = "@packed", skip_serializing_if = "Option::is_none")]
    packed: Option<&'static str>,
}

#[derive(Serialize)]
struct XRom {
    #[serde(rename = "@enabled")]
    enabled: &'static str,
}

#[derive(Serialize)]
struct XMtu {
    #[serde(rename = "@size")]
    size: u32,
}

#[derive(Serialize)]
struct XLink {
    #[serde(rename = "@state")]
    state: &'static str,
}

#[derive(Serialize)]
struct XBandwidth {
    #[serde(skip_serializing_if = "Option::is_none")]
    inbound: Option<XRate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outbound: Option<XRate>,
}

#[derive(Serialize)]
struct XRate {
    #[serde(rename = "@average")]
    average: u64,
    #[serde(rename = "@peak", skip_serializing_if = "Option::is_none")]
    peak: Option<u64>,
    #[serde(rename = "@burst", skip_serializing_if = "Option::is_none")]
    burst: Option<u64>,
}

impl From<&Bandwidth> for XRate {
    fn from(b: &Bandwidth) -> Self {
        XRate {
            average: b.average(),
            peak: b.peak(),
            burst: b.burst(),
        }
    }
}

#[derive(Serialize)]
struct XAlias<'a> {
    #[serde(rename = "@name")]
    name: &'a str,
}

#[derive(Serialize)]
struct XAcpi {
    #[serde(rename = "@index")]
    index: u32,
}

#[derive(Serialize)]
struct XAddress {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@domain")]
    domain: String,
    #[serde(rename = "@bus")]
    bus: String,
    #[serde(rename = "@slot")]
    slot: String,
    #[serde(rename = "@function")]
    function: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nic::{RawBandwidth, RawNic};

    fn def() -> InterfaceDef {
        InterfaceDef {
            mac: MacAddr::try_from("52:54:00:12:34:56").unwrap(),
            source_bridge: BridgeName::try_from("cloudbr0").unwrap(),
            ovs: false,
            interface_id: None,
            vlan_tag: None,
            model: NicModel::Virtio,
            driver: None,
            queues: None,
            mtu: None,
            link: LinkState::Up,
            inbound: None,
            outbound: None,
            alias: Alias::try_from("ua-net1").unwrap(),
            pci: None,
            acpi_index: None,
            filter: None,
            pxe_disable: false,
            packed: false,
        }
    }

    fn full() -> InterfaceDef {
        InterfaceDef {
            ovs: true,
            interface_id: Some(
                InterfaceId::try_from("09b11c53-8b5c-4eeb-8f00-d84eaa0aaa4f").unwrap(),
            ),
            vlan_tag: Some(VlanId::try_from(100).unwrap()),
            driver: Some(DriverName::Qemu),
            queues: Some(QueueCount::try_from(4).unwrap()),
            mtu: Some(Mtu::try_from(1450).unwrap()),
            link: LinkState::Down,
            inbound: Some(Bandwidth::new("inbound", 1000, Some(2000), Some(512)).unwrap()),
            outbound: Some(Bandwidth::new("outbound", 125, None, None).unwrap()),
            pci: Some(PciAddress {
                domain: 0,
                bus: 0,
                slot: 5,
                function: 0,
            }),
            acpi_index: Some(AcpiIndex::try_from(3).unwrap()),
            pxe_disable: true,
            packed: true,
            ..def()
        }
    }

    #[test]
    fn minimal_interface_renders_exactly() {
        let xml = def().to_xml().unwrap();
        let expected = r#"<interface type="bridge">
  <mac address="52:54:00:12:34:56"/>
  <source bridge="cloudbr0"/>
  <model type="virtio"/>
  <link state="up"/>
  <alias name="ua-net1"/>
</interface>"#;
        assert_eq!(xml, expected);
    }

    #[test]
    fn full_interface_renders_every_element_in_dumpxml_order() {
        let xml = full().to_xml().unwrap();
        let expected = r#"<interface type="bridge">
  <mac address="52:54:00:12:34:56"/>
  <source bridge="cloudbr0"/>
  <vlan>
    <tag id="100"/>
  </vlan>
  <virtualport type="openvswitch">
    <parameters interfaceid="09b11c53-8b5c-4eeb-8f00-d84eaa0aaa4f"/>
  </virtualport>
  <bandwidth>
    <inbound average="1000" peak="2000" burst="512"/>
    <outbound average="125"/>
  </bandwidth>
  <model type="virtio"/>
  <driver name="qemu" queues="4" packed="on"/>
  <link state="down"/>
  <mtu size="1450"/>
  <alias name="ua-net1"/>
  <rom enabled="no"/>
  <acpi index="3"/>
  <address type="pci" domain="0x0000" bus="0x00" slot="0x05" function="0x0"/>
</interface>"#;
        assert_eq!(xml, expected);
    }

    #[test]
    fn rendering_is_deterministic() {
        assert_eq!(full().to_xml().unwrap(), full().to_xml().unwrap());
    }

    #[test]
    fn vlan_tag_is_rendered_only_for_ovs() {
        let linux = InterfaceDef {
            vlan_tag: Some(VlanId::try_from(100).unwrap()),
            ..def()
        };
        let xml = linux.to_xml().unwrap();
        assert!(!xml.contains("<vlan"), "{xml}");
        assert!(!xml.contains("virtualport"), "{xml}");
    }

    #[test]
    fn ovs_without_interface_id_has_a_bare_virtualport() {
        let xml = InterfaceDef { ovs: true, ..def() }.to_xml().unwrap();
        assert!(
            xml.contains(r#"<virtualport type="openvswitch"/>"#),
            "{xml}"
        );
        assert!(!xml.contains("parameters"), "{xml}");
    }

    #[test]
    fn queues_without_driver_name_still_get_a_driver_element() {
        let d = InterfaceDef {
            queues: Some(QueueCount::try_from(2).unwrap()),
            ..def()
        };
        assert!(d.to_xml().unwrap().contains(r#"<driver queues="2"/>"#));
        let d = InterfaceDef {
            driver: Some(DriverName::Vhost),
            ..def()
        };
        assert!(d.to_xml().unwrap().contains(r#"<driver name="vhost"/>"#));
    }

    #[test]
    fn only_outbound_bandwidth_renders_only_outbound() {
        let d = InterfaceDef {
            outbound: Some(Bandwidth::new("outbound", 10, None, Some(20)).unwrap()),
            ..def()
        };
        let xml = d.to_xml().unwrap();
        assert!(
            xml.contains(r#"<outbound average="10" burst="20"/>"#),
            "{xml}"
        );
        assert!(!xml.contains("inbound"), "{xml}");
    }

    #[test]
    fn non_virtio_models_refuse_virtio_only_settings() {
        let e1000 = InterfaceDef {
            model: NicModel::E1000,
            ..def()
        };
        assert!(e1000.to_xml().unwrap().contains(r#"<model type="e1000"/>"#));
        let cases = [
            (
                "driver",
                InterfaceDef {
                    driver: Some(DriverName::Qemu),
                    ..e1000.clone()
                },
            ),
            (
                "queues",
                InterfaceDef {
                    queues: Some(QueueCount::try_from(1).unwrap()),
                    ..e1000.clone()
                },
            ),
            (
                "mtu",
                InterfaceDef {
                    mtu: Some(Mtu::try_from(1500).unwrap()),
                    ..e1000.clone()
                },
            ),
        ];
        for (field, d) in cases {
            assert_eq!(
                d.to_xml(),
                Err(XmlWriteError::VirtioOnly {
                    field,
                    model: NicModel::E1000
                })
            );
        }
    }

    #[test]
    fn pci_address_bounds_are_checked() {
        let at = |slot, function| InterfaceDef {
            pci: Some(PciAddress {
                domain: 0,
                bus: 1,
                slot,
                function,
            }),
            ..def()
        };
        assert!(at(0x1f, 7).to_xml().unwrap().contains(
            r#"<address type="pci" domain="0x0000" bus="0x01" slot="0x1f" function="0x7"/>"#
        ));
        assert!(matches!(
            at(0x20, 0).to_xml(),
            Err(XmlWriteError::PciAddressOutOfRange(_))
        ));
        assert!(matches!(
            at(0, 8).to_xml(),
            Err(XmlWriteError::PciAddressOutOfRange(_))
        ));
    }

    #[test]
    fn driver_choice_follows_vhost_mode_and_host() {
        assert_eq!(choose_driver(VhostMode::On, false), DriverName::Vhost);
        assert_eq!(choose_driver(VhostMode::On, true), DriverName::Vhost);
        assert_eq!(choose_driver(VhostMode::Off, true), DriverName::Qemu);
        assert_eq!(choose_driver(VhostMode::Off, false), DriverName::Qemu);
        assert_eq!(choose_driver(VhostMode::Auto, true), DriverName::Vhost);
        assert_eq!(choose_driver(VhostMode::Auto, false), DriverName::Qemu);
    }

    fn spec(raw: RawNic) -> NicSpec {
        NicSpec::try_from(RawNic {
            mac: "52:54:00:aa:bb:cc".into(),
            bridge: "cloudbr1".into(),
            ..raw
        })
        .unwrap()
    }

    #[test]
    fn from_spec_maps_an_ovs_vlan_request() {
        let s = spec(RawNic {
            ovs: true,
            vlan: Some(42),
            queues: Some(2),
            mtu: Some(9000),
            interface_id: "09b11c53-8b5c-4eeb-8f00-d84eaa0aaa4f".into(),
            outbound: Some(RawBandwidth {
                rate_mbps: 1,
                ..RawBandwidth::default()
            }),
            acpi_index: Some(7),
            pci_slot: Some(6),
            ..RawNic::default()
        });
        let d = InterfaceDef::from_spec(
            &s,
            s.bridge.clone(),
            Alias::try_from("ua-x").unwrap(),
            false,
        );
        assert!(d.ovs);
        assert_eq!(d.vlan_tag.map(VlanId::get), Some(42));
        assert_eq!(d.driver, Some(DriverName::Qemu));
        assert_eq!(d.queues.map(QueueCount::get), Some(2));
        assert_eq!(d.mtu.map(Mtu::get), Some(9000));
        assert_eq!(d.interface_id, s.interface_id);
        assert_eq!(d.outbound.map(|b| b.average()), Some(125));
        assert_eq!(d.acpi_index.map(AcpiIndex::get), Some(7));
        assert_eq!(d.pci, None, "the PCI module decides the bus");
        assert!(d.to_xml().is_ok());
    }

    #[test]
    fn from_spec_uses_the_given_bridge_and_drops_linux_vlan_tag() {
        let s = spec(RawNic {
            vlan: Some(42),
            vhost: "on".into(),
            ..RawNic::default()
        });
        let seg_bridge = BridgeName::try_from("brcloudbr1-42").unwrap();
        let d = InterfaceDef::from_spec(&s, seg_bridge.clone(), Alias::generate(), false);
        assert_eq!(d.source_bridge, seg_bridge);
        assert_eq!(d.vlan_tag, None);
        assert!(!d.ovs);
        assert_eq!(d.driver, Some(DriverName::Vhost));
    }

    #[test]
    fn from_spec_gives_non_virtio_models_no_driver() {
        let s = spec(RawNic {
            model: "rtl8139".into(),
            ..RawNic::default()
        });
        let d = InterfaceDef::from_spec(&s, s.bridge.clone(), Alias::generate(), true);
        assert_eq!(d.driver, None);
        let xml = d.to_xml().unwrap();
        assert!(!xml.contains("<driver"), "{xml}");
    }

    #[test]
    fn anti_spoofing_nic_references_the_agents_filter_with_mac_and_ips() {
        let d = InterfaceDef {
            filter: Some(FilterRef {
                mac: MacAddr::try_from("52:54:00:12:34:56").unwrap(),
                ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            }),
            driver: Some(DriverName::Qemu),
            ..def()
        };
        let xml = d.to_xml().unwrap();
        let expected = r#"  <driver name="qemu"/>
  <filterref filter="nic-agent-clean">
    <parameter name="MAC" value="52:54:00:12:34:56"/>
    <parameter name="IP" value="10.0.0.5"/>
    <parameter name="IPV6" value="fd00::5"/>
  </filterref>
  <link state="up"/>"#;
        assert!(xml.contains(expected), "{xml}");
    }

    #[test]
    fn nic_without_anti_spoofing_has_no_filterref() {
        let xml = def().to_xml().unwrap();
        assert!(!xml.contains("filterref"), "{xml}");
    }
}
