//! What the agent reports back: NICs and VMs as libvirt sees them after the
//! change, plus the small XML helpers detach needs.

use quick_xml::events::{BytesEnd, BytesStart, Event};
use quick_xml::{Reader, Writer};
use serde::Serialize;

use crate::hypervisor::DomainRef;
use crate::pci::PciAddress;
use crate::xml::domain::{BandwidthView, DomainView, InterfaceView};

/// A NIC as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct NicReport {
    /// Lower-case MAC.
    pub mac: String,
    /// libvirt alias (`ua-...` for user aliases, `net0` otherwise).
    pub alias: String,
    /// Host-side tap name (`vnetN`); empty when not running.
    pub target: String,
    /// Guest PCI address.
    pub pci: Option<PciAddress>,
    /// NIC model.
    pub model: String,
    /// virtio queue pairs (1 when not set).
    pub queues: u32,
    /// `<mtu>`, 0 when not set.
    pub mtu: u32,
    /// Source bridge (or network/device).
    pub bridge: String,
    /// "up" or "down".
    pub link_state: String,
    /// libvirt interface type (bridge, network, direct, ...).
    pub kind: String,
    /// OVS VLAN tag, 0 when none.
    pub vlan: u32,
    /// Present in the live domain.
    pub in_live: bool,
    /// Present in the persistent definition.
    pub in_config: bool,
    /// Inbound QoS (`<bandwidth><inbound>`), if any.
    pub inbound: Option<BandwidthView>,
    /// Outbound QoS, if any.
    pub outbound: Option<BandwidthView>,
    /// `<driver name=>`: vhost or qemu; empty when not set.
    pub driver: String,
    /// `<acpi index=>`, 0 when not set.
    pub acpi_index: u32,
    /// OVS `<virtualport><parameters interfaceid=>`, empty when none.
    pub interface_id: String,
    /// `<filterref filter=>`: the nwfilter on the NIC, empty when none.
    pub filter: String,
    /// CloudStack NIC uuid read from the alias `ua-nic-<uuid>`; empty when
    /// none.
    pub nic_uuid: String,
    /// CloudStack deviceId: `acpi_index - 1`, when an index is set.
    pub device_id: Option<u32>,
    /// The option ROM is off (`<rom enabled='no'>` or CloudStack's `<rom bar='off'>`).
    pub pxe_disabled: bool,
    /// `<driver packed='on'>`.
    pub packed: bool,
}

impl NicReport {
    fn from_view(i: &InterfaceView) -> Self {
        NicReport {
            mac: i.mac.clone().unwrap_or_default(),
            alias: i.alias.clone().unwrap_or_default(),
            target: i.target.clone().unwrap_or_default(),
            pci: i.pci,
            model: i.model.clone().unwrap_or_default(),
            queues: i.queues.unwrap_or(1),
            mtu: i.mtu.unwrap_or(0),
            bridge: i.source.clone().unwrap_or_default(),
            link_state: i.link.clone().unwrap_or_else(|| "up".into()),
            kind: i.kind.clone(),
            vlan: i.vlan.unwrap_or(0),
            in_live: false,
            in_config: false,
            inbound: i.inbound.clone(),
            outbound: i.outbound.clone(),
            driver: i.driver.clone().unwrap_or_default(),
            acpi_index: i.acpi_index.unwrap_or(0),
            interface_id: i.interface_id.clone().unwrap_or_default(),
            filter: i.filter.clone().unwrap_or_default(),
            nic_uuid: i
                .alias
                .as_deref()
                .and_then(crate::nic::plug::uuid_from_alias)
                .map(|u| u.hyphenated().to_string())
                .unwrap_or_default(),
            device_id: i.acpi_index.and_then(|a| a.checked_sub(1)),
            pxe_disabled: i.rom_off,
            packed: i.packed,
        }
    }
}

/// Merges live and config views: live facts win, config-only NICs are
/// listed too (a stopped VM, or a NIC attached to config only).
pub fn merge(live: Option<&DomainView>, config: Option<&DomainView>) -> Vec<NicReport> {
    let mut out: Vec<NicReport> = Vec::new();
    if let Some(l) = live {
        for i in &l.interfaces {
            let mut r = NicReport::from_view(i);
            r.in_live = true;
            out.push(r);
        }
    }
    if let Some(c) = config {
        for i in &c.interfaces {
            let mac = i.mac.clone().unwrap_or_default();
            if let Some(r) = out.iter_mut().find(|r| {
                r.mac == mac
                    && !r.in_config
                    && (r.alias == i.alias.clone().unwrap_or_default()
                        || !r.alias.starts_with("ua-"))
            }) {
                r.in_config = true;
            } else {
                let mut r = NicReport::from_view(i);
                r.in_config = true;
                out.push(r);
            }
        }
    }
    out
}

/// A VM as listed by ListVms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmReport {
    /// Domain name.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
    /// Run state.
    pub state: String,
    /// Has a persistent definition.
    pub persistent: bool,
    /// vCPU count.
    pub vcpus: u32,
    /// Machine type.
    pub machine: String,
    /// Number of NICs.
    pub nic_count: u32,
}

impl VmReport {
    /// Builds the report from a lookup and a view.
    pub fn new(d: &DomainRef, v: &DomainView) -> Self {
        VmReport {
            name: d.name.clone(),
            uuid: d.uuid.clone(),
            state: d.state.as_str().to_string(),
            persistent: d.persistent,
            vcpus: v.vcpus,
            machine: v.machine.clone(),
            nic_count: v.interfaces.len() as u32,
        }
    }
}

/// The smallest `<interface>` that makes libvirt find the device to
/// detach: type, MAC, source, and the user alias or PCI address when known
/// (they disambiguate NICs that share a MAC).
pub fn detach_xml(i: &InterfaceView) -> String {
    let mut w = Writer::new(Vec::new());
    let kind = if i.kind.is_empty() {
        "bridge"
    } else {
        i.kind.as_str()
    };
    let mut start = BytesStart::new("interface");
    start.push_attribute(("type", kind));
    let _ = w.write_event(Event::Start(start));
    if let Some(mac) = &i.mac {
        let mut e = BytesStart::new("mac");
        e.push_attribute(("address", mac.as_str()));
        let _ = w.write_event(Event::Empty(e));
    }
    let source_attr = match kind {
        "bridge" => Some("bridge"),
        "network" => Some("network"),
        "direct" => Some("dev"),
        _ => None,
    };
    if let (Some(attr), Some(src)) = (source_attr, i.source.as_deref()) {
        let mut e = BytesStart::new("source");
        e.push_attribute((attr, src));
        let _ = w.write_event(Event::Empty(e));
    }
    if let Some(alias) = i.alias.as_deref().filter(|a| a.starts_with("ua-")) {
        let mut e = BytesStart::new("alias");
        e.push_attribute(("name", alias));
        let _ = w.write_event(Event::Empty(e));
    }
    let _ = w.write_event(Event::End(BytesEnd::new("interface")));
    String::from_utf8(w.into_inner()).unwrap_or_default()
}

/// Cuts the raw `<interface>` element with this MAC out of a domain XML, to
/// re-attach it verbatim (undo of a config detach, completing a half-done
/// attach). libvirt drops run-time parts (vnet names, auto aliases) when it
/// parses a device for the persistent config.
pub fn interface_snippet(domain_xml: &str, mac: &str) -> Option<String> {
    let mut r = Reader::from_str(domain_xml);
    let mut depth_in_iface = 0usize;
    let mut start_pos = 0usize;
    let mut matched = false;
    loop {
        let before = r.buffer_position() as usize;
        match r.read_event() {
            Ok(Event::Start(e)) if e.name().0 == "interface" && depth_in_iface == 0 => {
                depth_in_iface = 1;
                start_pos = before;
                matched = false;
            }
            Ok(Event::Start(_)) if depth_in_iface > 0 => depth_in_iface += 1,
            Ok(Event::Empty(e)) if depth_in_iface == 1 && e.name().0 == "mac" => {
                matched = e
                    .attributes()
                    .flatten()
                    .any(|a| a.key.0 == "address" && a.value.eq_ignore_ascii_case(mac));
            }
            Ok(Event::End(_)) if depth_in_iface > 0 => {
                depth_in_iface -= 1;
                if depth_in_iface == 0 && matched {
                    let end = r.buffer_position() as usize;
                    return domain_xml.get(start_pos..end).map(|s| s.trim().to_string());
                }
            }
            Ok(Event::Eof) | Err(_) => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOM: &str = r#"<domain type='qemu'><name>x</name><devices>
<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><target dev='vnet0'/><model type='virtio'/><alias name='net0'/></interface>
<interface type='bridge'><mac address='52:54:00:00:00:02'/><source bridge='br1'/><alias name='ua-x'/></interface>
</devices></domain>"#;

    #[test]
    fn snippet_cuts_exactly_the_matching_interface() {
        let s = interface_snippet(DOM, "52:54:00:00:00:02").expect("found");
        assert!(s.starts_with("<interface type='bridge'>"));
        assert!(s.ends_with("</interface>"));
        assert!(s.contains("br1") && !s.contains("br0"));
        assert!(interface_snippet(DOM, "52:54:00:00:00:09").is_none());
    }

    #[test]
    fn detach_xml_keeps_user_alias_only() {
        let v = DomainView::parse(DOM).expect("parse");
        let a = detach_xml(&v.interfaces[0]);
        assert!(
            a.contains("52:54:00:00:00:01") && !a.contains("net0"),
            "{a}"
        );
        let b = detach_xml(&v.interfaces[1]);
        assert!(b.contains("ua-x"), "{b}");
    }
}
