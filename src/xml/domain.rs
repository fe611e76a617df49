//! A read-only view of a libvirt domain's XML (`virsh dumpxml`).
//!
//! The agent reads the live definition before every change (PCI capacity,
//! MAC uniqueness, MTU fit) and again afterwards to report what libvirt
//! really did. This module picks out only what those checks need and ignores
//! everything else, so new libvirt elements and attributes never break it.
//!
//! The document is first read into a small element tree (bounded depth, so
//! hostile input cannot exhaust the stack) and then queried. Nothing here
//! panics on any input: malformed XML is an error, malformed values inside
//! well-formed XML become `None`/defaults.

use std::borrow::Cow;

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};

use crate::pci::PciAddress;

/// Deeper nesting than this is not a libvirt domain; refusing it keeps tree
/// building and dropping free of stack exhaustion on hostile input.
const MAX_DEPTH: usize = 64;

/// Why a domain's XML could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    /// The text is not well-formed XML.
    #[error("domain XML is malformed: {0}")]
    Malformed(String),
    /// The root element is not `<domain>`.
    #[error("not a libvirt domain: root element is <{0}>")]
    NotADomain(String),
    /// The document has no root element at all.
    #[error("domain XML is empty")]
    Empty,
    /// Elements nest deeper than any libvirt domain does.
    #[error("domain XML nests deeper than {MAX_DEPTH} elements")]
    TooDeep,
}

/// The parts of a domain definition that NIC hot-plug decisions depend on.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct DomainView {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: String,
    /// `<domain type=…>`: `kvm`, `qemu`, `test`, …
    pub domain_type: String,
    /// `<vcpu>`: the `current=` attribute if present, else the element text.
    pub vcpus: u32,
    /// `<os><type machine=…>`, e.g. `pc-i440fx-10.0` or `pc-q35-10.0`; may be empty.
    pub machine: String,
    /// `<features><acpi/>` is present. Without it QEMU refuses every hot-plug
    /// on a pc machine's `pci.0` (measured: "Bus 'pci.0' does not support
    /// hotplugging"), so PCI capacity depends on it.
    pub acpi: bool,
    /// Every `<devices><interface>`, in document order.
    pub interfaces: Vec<InterfaceView>,
    /// Every `<controller type='pci'>`, in document order.
    pub controllers: Vec<PciController>,
    /// The guest PCI address of every device that has one.
    pub pci_in_use: Vec<PciUse>,
}

/// Broad machine type; decides how PCI hot-plug works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MachineFamily {
    /// i440fx (`pc-*`): conventional PCI, hot-plug into `pci.0` and pci-bridges.
    Pc,
    /// Q35: PCIe, hot-plug only into empty root/downstream ports.
    Q35,
}

/// One `<interface>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct InterfaceView {
    /// `type=`: bridge, network, ethernet, direct, vhostuser, user, …
    pub kind: String,
    /// `<mac address>`, lowercased.
    pub mac: Option<String>,
    /// Whatever names the source: `bridge=`, `network=`, `dev=` or `path=`
    /// (vhostuser), or `address:port` for socket types.
    pub source: Option<String>,
    /// `<target dev>`: the host-side device (tap, macvtap).
    pub target: Option<String>,
    /// `<alias name>`, e.g. `net0` or a user alias `ua-…`.
    pub alias: Option<String>,
    /// `<model type>`, e.g. `virtio`.
    pub model: Option<String>,
    /// `<driver name>`, e.g. `qemu` or `vhost`.
    pub driver: Option<String>,
    /// `<driver queues>`.
    pub queues: Option<u32>,
    /// `<mtu size>`.
    pub mtu: Option<u32>,
    /// `<link state>`: `up` or `down`.
    pub link: Option<String>,
    /// The first `<vlan><tag id>`.
    pub vlan: Option<u32>,
    /// `<virtualport type>`, e.g. `openvswitch`.
    pub virtualport: Option<String>,
    /// `<virtualport><parameters interfaceid>`.
    pub interface_id: Option<String>,
    /// `<bandwidth><inbound>`.
    pub inbound: Option<BandwidthView>,
    /// `<bandwidth><outbound>`.
    pub outbound: Option<BandwidthView>,
    /// `<acpi index>`.
    pub acpi_index: Option<u32>,
    /// `<rom bar='off'>` or `<rom enabled='no'>`: no option ROM exposed.
    pub rom_off: bool,
    /// `<driver packed='on'>`.
    pub packed: bool,
    /// The guest PCI address (`<address type='pci'>`), once libvirt assigned one.
    pub pci: Option<PciAddress>,
    /// `<filterref filter>`: the nwfilter libvirt applies to the NIC.
    pub filter: Option<String>,
    /// The filter's `<parameter name value>` pairs, in document order.
    pub filter_params: Vec<(String, String)>,
}

/// One direction of `<bandwidth>`; values as libvirt writes them (KiB/s, KiB).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct BandwidthView {
    /// `average=`.
    pub average: Option<u64>,
    /// `peak=`.
    pub peak: Option<u64>,
    /// `burst=`.
    pub burst: Option<u64>,
}

/// One `<controller type='pci'>`: a PCI bus of the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PciController {
    /// `index=`; equals the bus number devices behind it use.
    pub index: u32,
    /// `model=`: pci-root, pcie-root, pci-bridge, pcie-root-port,
    /// pcie-to-pci-bridge, dmi-to-pci-bridge, pcie-switch-*, …
    pub model: String,
    /// `<target hotplug='on|off'/>`; `None` when not set.
    pub hotplug: Option<bool>,
    /// Where the controller itself sits (none for the root bus).
    pub address: Option<PciAddress>,
}

/// A PCI address occupied by some device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PciUse {
    /// The occupied address.
    pub address: PciAddress,
    /// The device's element name: `interface`, `controller`, `video`, …
    pub device: String,
}

impl DomainView {
    /// Reads `virsh dumpxml` output. Unknown elements and attributes are
    /// ignored; unparsable values are left out rather than failing the read.
    pub fn parse(xml: &str) -> Result<Self, DomainXmlError> {
        let root = parse_tree(xml)?;
        if root.name != "domain" {
            return Err(DomainXmlError::NotADomain(root.name.into_owned()));
        }
        let mut view = DomainView {
            name: root.child_text("name").unwrap_or_default(),
            uuid: root.child_text("uuid").unwrap_or_default(),
            domain_type: root.attr("type").unwrap_or_default().to_owned(),
            vcpus: root.child("vcpu").map(vcpu_count).unwrap_or(0),
            machine: root
                .child("os")
                .and_then(|os| os.child("type"))
                .and_then(|t| t.attr("machine"))
                .unwrap_or_default()
                .to_owned(),
            acpi: root
                .child("features")
                .is_some_and(|f| f.child("acpi").is_some()),
            ..Self::default()
        };
        for devices in root.children_named("devices") {
            for dev in &devices.children {
                if let Some(address) = dev.child("address").and_then(pci_address) {
                    view.pci_in_use.push(PciUse {
                        address,
                        device: dev.name.to_string(),
                    });
                }
                match dev.name.as_ref() {
                    "interface" => view.interfaces.push(interface(dev)),
                    "controller" if dev.attr("type") == Some("pci") => {
                        if let Some(c) = pci_controller(dev) {
                            view.controllers.push(c);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(view)
    }

    /// i440fx or Q35: the machine name says `q35`, or a `pcie-root` exists.
    pub fn family(&self) -> MachineFamily {
        if self.machine.contains("q35") || self.controllers.iter().any(|c| c.model == "pcie-root") {
            MachineFamily::Q35
        } else {
            MachineFamily::Pc
        }
    }

    /// All interfaces with this MAC (case-insensitive). libvirt accepts
    /// duplicate MACs, so there can be more than one.
    pub fn interface_by_mac(&self, mac: &str) -> Vec<&InterfaceView> {
        let wanted = mac.trim();
        self.interfaces
            .iter()
            .filter(|i| {
                i.mac
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(wanted))
            })
            .collect()
    }
}

fn vcpu_count(vcpu: &Element) -> u32 {
    vcpu.attr("current")
        .and_then(parse_u32)
        .or_else(|| parse_u32(&vcpu.text))
        .unwrap_or(0)
}

fn interface(el: &Element) -> InterfaceView {
    let attr_of = |child: &str, attr: &str| -> Option<String> {
        el.child(child)
            .and_then(|c| c.attr(attr))
            .map(str::to_owned)
    };
    let num_of = |child: &str, attr: &str| -> Option<u32> {
        el.child(child)
            .and_then(|c| c.attr(attr))
            .and_then(parse_u32)
    };
    let bandwidth = el.child("bandwidth");
    let direction = |name: &str| bandwidth.and_then(|b| b.child(name)).map(bandwidth_view);
    let virtualport = el.child("virtualport");
    InterfaceView {
        kind: el.attr("type").unwrap_or_default().to_owned(),
        mac: attr_of("mac", "address").map(|m| m.trim().to_ascii_lowercase()),
        source: el.child("source").and_then(source_name),
        target: attr_of("target", "dev"),
        alias: attr_of("alias", "name"),
        model: attr_of("model", "type"),
        driver: attr_of("driver", "name"),
        queues: num_of("driver", "queues"),
        mtu: num_of("mtu", "size"),
        link: attr_of("link", "state"),
        vlan: el
            .child("vlan")
            .and_then(|v| v.child("tag"))
            .and_then(|t| t.attr("id"))
            .and_then(parse_u32),
        virtualport: virtualport.and_then(|v| v.attr("type")).map(str::to_owned),
        interface_id: virtualport
            .and_then(|v| v.child("parameters"))
            .and_then(|p| p.attr("interfaceid"))
            .map(str::to_owned),
        inbound: direction("inbound"),
        outbound: direction("outbound"),
        acpi_index: num_of("acpi", "index"),
        rom_off: attr_of("rom", "bar").as_deref() == Some("off")
            || attr_of("rom", "enabled").as_deref() == Some("no"),
        packed: attr_of("driver", "packed").as_deref() == Some("on"),
        pci: el.child("address").and_then(pci_address),
        filter: attr_of("filterref", "filter"),
        filter_params: el
            .child("filterref")
            .map(|f| {
                f.children_named("parameter")
                    .filter_map(|p| Some((p.attr("name")?.to_owned(), p.attr("value")?.to_owned())))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The attribute that names an interface's source, which differs per type.
fn source_name(source: &Element) -> Option<String> {
    for key in ["bridge", "network", "dev", "path"] {
        if let Some(v) = source.attr(key) {
            return Some(v.to_owned());
        }
    }
    // udp/mcast/server/client sockets.
    match (source.attr("address"), source.attr("port")) {
        (Some(a), Some(p)) => Some(format!("{a}:{p}")),
        (Some(a), None) => Some(a.to_owned()),
        (None, Some(p)) => Some(format!(":{p}")),
        (None, None) => None,
    }
}

fn bandwidth_view(el: &Element) -> BandwidthView {
    let num = |k: &str| el.attr(k).and_then(parse_u64);
    BandwidthView {
        average: num("average"),
        peak: num("peak"),
        burst: num("burst"),
    }
}

fn pci_controller(el: &Element) -> Option<PciController> {
    let hotplug = match el.child("target").and_then(|t| t.attr("hotplug")) {
        Some("on") => Some(true),
        Some("off") => Some(false),
        _ => None,
    };
    Some(PciController {
        index: el.attr("index").and_then(parse_u32)?,
        model: el.attr("model").unwrap_or_default().to_owned(),
        hotplug,
        address: el.child("address").and_then(pci_address),
    })
}

/// `<address type='pci' …>`; missing fields are 0 as in libvirt, values out
/// of range make the whole address unreadable.
fn pci_address(el: &Element) -> Option<PciAddress> {
    if el.attr("type") != Some("pci") {
        return None;
    }
    let field = |k: &str| el.attr(k).map_or(Some(0), parse_u64);
    Some(PciAddress {
        domain: u16::try_from(field("domain")?).ok()?,
        bus: u8::try_from(field("bus")?).ok()?,
        slot: u8::try_from(field("slot")?).ok()?,
        function: u8::try_from(field("function")?).ok()?,
    })
}

/// libvirt writes PCI fields in hex (`0x1f`), other numbers in decimal;
/// hand-written XML mixes both. Accept either everywhere.
fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_u32(s: &str) -> Option<u32> {
    parse_u64(s).and_then(|v| u32::try_from(v).ok())
}

/// A minimal element tree: enough to query a domain, nothing more. Names
/// and attribute values borrow from the document wherever quick-xml hands
/// out slices of it (values without entities), so reading a domain
/// allocates little beyond the tree's own vectors.
#[derive(Debug, Default)]
struct Element<'a> {
    name: Cow<'a, str>,
    attrs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The element's own text, kept only where it is read: the children of
    /// the root (`<name>`, `<uuid>`, `<vcpu>`).
    text: String,
    children: Vec<Element<'a>>,
}

impl<'a> Element<'a> {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    fn child(&self, name: &str) -> Option<&Element<'a>> {
        self.children.iter().find(|c| c.name == name)
    }

    fn children_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s Element<'a>> + 's {
        self.children.iter().filter(move |c| c.name == name)
    }

    fn child_text(&self, name: &str) -> Option<String> {
        self.child(name).map(|c| c.text.trim().to_owned())
    }

    fn from_start(doc: &'a str, start: &BytesStart<'_>) -> Self {
        let attrs = start
            .attributes()
            .filter_map(Result::ok)
            .map(|a| {
                let value = a
                    .normalized_value(XmlVersion::Implicit1_0)
                    .unwrap_or_else(|_| a.value.clone());
                (in_doc(doc, a.key.as_ref()), in_doc(doc, &value))
            })
            .collect();
        Element {
            name: in_doc(doc, start.name().as_ref()),
            attrs,
            ..Element::default()
        }
    }
}

/// `part` as a slice of `doc` when it is one, else a copy. quick-xml's
/// `from_str` reader hands out slices of its input for names and for
/// values that needed no unescaping; only those borrow.
fn in_doc<'a>(doc: &'a str, part: &str) -> Cow<'a, str> {
    let start = (part.as_ptr() as usize).wrapping_sub(doc.as_ptr() as usize);
    match start
        .checked_add(part.len())
        .and_then(|end| doc.get(start..end))
    {
        Some(s) if std::ptr::eq(s.as_ptr(), part.as_ptr()) => Cow::Borrowed(s),
        _ => Cow::Owned(part.to_owned()),
    }
}

/// Whether an element named `name`, whose open ancestors are `path` (root
/// first), goes into the tree. What [`DomainView::parse`] never queries is
/// skipped: every part of `<devices>` except a device's `<address>` unless
/// the device is an `<interface>` or a `<controller>`, everything under the
/// root except `name`, `uuid`, `vcpu`, `os/type`, `features/acpi` and
/// `devices`. Skipped parts are still read by the tokenizer, so a
/// malformed document fails exactly as before; they only cost no
/// allocations (a QEMU domain's disks, CPU model, seclabels, consoles…).
fn wanted(path: &[Element<'_>], name: &str) -> bool {
    match path {
        [] => true,
        [_] => matches!(
            name,
            "name" | "uuid" | "vcpu" | "os" | "features" | "devices"
        ),
        [_, parent] => match parent.name.as_ref() {
            "os" => name == "type",
            "features" => name == "acpi",
            "devices" => true,
            _ => false,
        },
        [_, top, device, rest @ ..] => {
            top.name == "devices"
                && (matches!(device.name.as_ref(), "interface" | "controller")
                    || (rest.is_empty() && name == "address"))
        }
    }
}

fn malformed(e: impl std::fmt::Display) -> DomainXmlError {
    DomainXmlError::Malformed(e.to_string())
}

/// Reads the document into a tree and returns its root element.
fn parse_tree(xml: &str) -> Result<Element<'_>, DomainXmlError> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    // Open elements in the tree; the root is stack[0] once seen.
    let mut stack: Vec<Element<'_>> = Vec::new();
    // Open elements below the top of `stack` that the tree skips.
    let mut skipped: usize = 0;
    let mut root: Option<Element<'_>> = None;
    loop {
        let event = reader.read_event().map_err(malformed)?;
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(malformed("content after the root element"));
                }
                if stack.len() + skipped >= MAX_DEPTH {
                    return Err(DomainXmlError::TooDeep);
                }
                if skipped > 0 || !wanted(&stack, start.name().as_ref()) {
                    skipped += 1;
                } else {
                    stack.push(Element::from_start(xml, &start));
                }
            }
            Event::Empty(start) => {
                if root.is_some() {
                    return Err(malformed("content after the root element"));
                }
                if skipped > 0 || !wanted(&stack, start.name().as_ref()) {
                    continue;
                }
                let el = Element::from_start(xml, &start);
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) if skipped > 0 => skipped -= 1,
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| malformed("unexpected closing tag"))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => push_text(&mut stack, skipped, || t.xml10_content()),
            Event::CData(t) => push_text(&mut stack, skipped, || t.xml10_content()),
            Event::GeneralRef(r) => {
                // Resolved even where the text is not kept, so that an
                // unknown entity fails every document alike.
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => Some(c.to_string()),
                    Ok(None) => predefined_entity(&r).map(str::to_owned),
                    Err(e) => return Err(malformed(e)),
                };
                let text = resolved.ok_or_else(|| malformed("unknown entity reference"))?;
                push_text(&mut stack, skipped, || Cow::Owned(text));
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() || skipped > 0 {
        return Err(malformed("unclosed element at end of document"));
    }
    root.ok_or(DomainXmlError::Empty)
}

/// Appends text to the innermost open element, when that element's text is
/// read (see [`Element::text`]). Text outside the root element (whitespace)
/// has nowhere to go.
fn push_text<'t>(stack: &mut [Element<'_>], skipped: usize, text: impl FnOnce() -> Cow<'t, str>) {
    if skipped == 0 && stack.len() == 2 {
        if let Some(el) = stack.last_mut() {
            el.text.push_str(&text());
        }
    }
}

fn predefined_entity(name: &str) -> Option<&'static str> {
    match name {
        "amp" => Some("&"),
        "lt" => Some("<"),
        "gt" => Some(">"),
        "quot" => Some("\""),
        "apos" => Some("'"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain_with_devices(devices: &str) -> String {
        format!(
            "<domain type='kvm'><name>vm</name><uuid>u</uuid><vcpu>2</vcpu>\
             <os><type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type></os>\
             <devices>{devices}</devices></domain>"
        )
    }

    fn only_interface(devices: &str) -> InterfaceView {
        let view = DomainView::parse(&domain_with_devices(devices)).expect("parses");
        assert_eq!(view.interfaces.len(), 1, "exactly one interface");
        view.interfaces[0].clone()
    }

    #[test]
    fn bridge_interface_reads_every_optional_field() {
        let nic = only_interface(
            "<interface type='bridge'>
               <mac address='52:54:00:AB:cd:01'/>
               <source bridge='cloudbr0'/>
               <target dev='vnet3'/>
               <model type='virtio'/>
               <driver name='qemu' queues='4'/>
               <mtu size='1450'/>
               <link state='down'/>
               <vlan><tag id='100'/><tag id='200'/></vlan>
               <virtualport type='openvswitch'><parameters interfaceid='0f3c-11'/></virtualport>
               <bandwidth><inbound average='1000' peak='2000' burst='512'/><outbound average='500'/></bandwidth>
               <alias name='ua-nic1'/>
               <acpi index='7'/>
               <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/>
             </interface>",
        );
        assert_eq!(nic.kind, "bridge");
        assert_eq!(nic.mac.as_deref(), Some("52:54:00:ab:cd:01"));
        assert_eq!(nic.source.as_deref(), Some("cloudbr0"));
        assert_eq!(nic.target.as_deref(), Some("vnet3"));
        assert_eq!(nic.model.as_deref(), Some("virtio"));
        assert_eq!(nic.driver.as_deref(), Some("qemu"));
        assert_eq!(nic.queues, Some(4));
        assert_eq!(nic.mtu, Some(1450));
        assert_eq!(nic.link.as_deref(), Some("down"));
        assert_eq!(nic.vlan, Some(100), "first tag wins");
        assert_eq!(nic.virtualport.as_deref(), Some("openvswitch"));
        assert_eq!(nic.interface_id.as_deref(), Some("0f3c-11"));
        assert_eq!(
            nic.inbound,
            Some(BandwidthView {
                average: Some(1000),
                peak: Some(2000),
                burst: Some(512)
            })
        );
        assert_eq!(
            nic.outbound,
            Some(BandwidthView {
                average: Some(500),
                peak: None,
                burst: None
            })
        );
        assert_eq!(nic.alias.as_deref(), Some("ua-nic1"));
        assert_eq!(nic.acpi_index, Some(7));
        assert_eq!(
            nic.pci,
            Some(PciAddress {
                domain: 0,
                bus: 0,
                slot: 0x1f,
                function: 0
            })
        );
    }

    #[test]
    fn rom_off_and_packed_are_read_in_either_rom_spelling() {
        for rom in ["<rom bar='off' file=''/>", "<rom enabled='no'/>"] {
            let nic = only_interface(&format!(
                "<interface type='bridge'><source bridge='br0'/><driver packed='on'/>{rom}</interface>"
            ));
            assert!(nic.rom_off && nic.packed, "{rom}");
        }
        let nic = only_interface("<interface type='bridge'><rom bar='on'/></interface>");
        assert!(!nic.rom_off && !nic.packed);
    }

    #[test]
    fn bare_interface_leaves_optional_fields_empty() {
        let nic = only_interface("<interface type='bridge'><source bridge='br0'/></interface>");
        assert_eq!(
            nic,
            InterfaceView {
                kind: "bridge".into(),
                source: Some("br0".into()),
                ..InterfaceView::default()
            }
        );
    }

    #[test]
    fn network_interface_names_its_network() {
        let nic = only_interface(
            "<interface type='network'><mac address='52:54:00:00:00:02'/>\
             <source network='default' portid='abc'/></interface>",
        );
        assert_eq!(nic.kind, "network");
        assert_eq!(nic.mac.as_deref(), Some("52:54:00:00:00:02"));
        assert_eq!(nic.source.as_deref(), Some("default"));
    }

    #[test]
    fn ethernet_interface_has_mac_and_target_but_no_source() {
        let nic = only_interface(
            "<interface type='ethernet'><mac address='52:54:00:00:00:03'/>\
             <target dev='tap-x' managed='no'/><model type='virtio'/></interface>",
        );
        assert_eq!(nic.kind, "ethernet");
        assert_eq!(nic.mac.as_deref(), Some("52:54:00:00:00:03"));
        assert_eq!(nic.target.as_deref(), Some("tap-x"));
        assert_eq!(nic.source, None);
    }

    #[test]
    fn direct_interface_mac_and_dev_are_read() {
        let nic = only_interface(
            "<interface type='direct'><mac address='52:54:00:00:00:04'/>\
             <source dev='eth0' mode='vepa'/><target dev='macvtap0'/></interface>",
        );
        assert_eq!(nic.kind, "direct");
        assert_eq!(nic.mac.as_deref(), Some("52:54:00:00:00:04"));
        assert_eq!(nic.source.as_deref(), Some("eth0"));
        assert_eq!(nic.target.as_deref(), Some("macvtap0"));
    }

    #[test]
    fn vhostuser_interface_mac_and_socket_path_are_read() {
        let nic = only_interface(
            "<interface type='vhostuser'><mac address='52:54:00:00:00:05'/>\
             <source type='unix' path='/run/vhu/sock0' mode='server'/>\
             <model type='virtio'/></interface>",
        );
        assert_eq!(nic.kind, "vhostuser");
        assert_eq!(nic.mac.as_deref(), Some("52:54:00:00:00:05"));
        assert_eq!(nic.source.as_deref(), Some("/run/vhu/sock0"));
    }

    #[test]
    fn user_interface_has_mac_and_no_source() {
        let nic = only_interface(
            "<interface type='user'><mac address='52:54:00:00:00:06'/><model type='e1000'/></interface>",
        );
        assert_eq!(nic.kind, "user");
        assert_eq!(nic.mac.as_deref(), Some("52:54:00:00:00:06"));
        assert_eq!(nic.source, None);
        assert_eq!(nic.model.as_deref(), Some("e1000"));
    }

    #[test]
    fn socket_interface_source_is_address_and_port() {
        let nic = only_interface(
            "<interface type='udp'><source address='192.0.2.1' port='5558'/></interface>",
        );
        assert_eq!(nic.source.as_deref(), Some("192.0.2.1:5558"));
    }

    #[test]
    fn interface_by_mac_ignores_case_and_finds_duplicates() {
        let view = DomainView::parse(&domain_with_devices(
            "<interface type='bridge'><mac address='52:54:00:aa:bb:cc'/></interface>\
             <interface type='direct'><mac address='52:54:00:AA:BB:CC'/></interface>\
             <interface type='user'><mac address='52:54:00:00:00:01'/></interface>",
        ))
        .expect("parses");
        let found = view.interface_by_mac("52:54:00:Aa:bB:cc");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].kind, "bridge");
        assert_eq!(found[1].kind, "direct");
        assert!(view.interface_by_mac("52:54:00:99:99:99").is_empty());
    }

    #[test]
    fn top_level_fields_are_read() {
        let view = DomainView::parse(
            "<?xml version='1.0'?><!-- c --><domain type='qemu' id='3'>\
             <name>a&amp;b</name><uuid> 1234 </uuid><vcpu placement='static' current='1'>4</vcpu>\
             <os><type arch='x86_64' machine='pc-q35-10.0'>hvm</type></os>\
             <features><acpi/><apic/></features><devices/></domain>",
        )
        .expect("parses");
        assert_eq!(view.name, "a&b");
        assert_eq!(view.uuid, "1234");
        assert_eq!(view.domain_type, "qemu");
        assert_eq!(view.vcpus, 1, "current= wins over the maximum");
        assert_eq!(view.machine, "pc-q35-10.0");
        assert!(view.acpi);
        assert_eq!(view.family(), MachineFamily::Q35);
    }

    #[test]
    fn vcpu_text_is_used_without_current_and_acpi_absent_is_false() {
        let view = DomainView::parse(&domain_with_devices("")).expect("parses");
        assert_eq!(view.vcpus, 2);
        assert!(!view.acpi);
        assert_eq!(view.family(), MachineFamily::Pc);
    }

    #[test]
    fn family_is_q35_when_pcie_root_exists_without_machine_name() {
        let view = DomainView::parse(
            "<domain><devices><controller type='pci' index='0' model='pcie-root'/></devices></domain>",
        )
        .expect("parses");
        assert_eq!(view.machine, "");
        assert_eq!(view.family(), MachineFamily::Q35);
    }

    #[test]
    fn pci_addresses_accept_hex_and_decimal_and_record_every_device() {
        let view = DomainView::parse(&domain_with_devices(
            "<controller type='pci' index='1' model='pci-bridge'>\
               <target chassisNr='1' hotplug='off'/>\
               <address type='pci' domain='0' bus='0' slot='3' function='0'/></controller>\
             <controller type='usb' index='0'><address type='pci' bus='0x00' slot='0x01' function='0x2'/></controller>\
             <video><model type='cirrus'/><address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></video>\
             <memballoon model='virtio'><address type='pci' domain='0x0000' bus='0x01' slot='0x1F' function='0x0'/></memballoon>\
             <disk type='file'><address type='drive' controller='0' bus='0' unit='0'/></disk>\
             <hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x06' slot='0x02' function='0x0'/></source></hostdev>",
        ))
        .expect("parses");
        let uses: Vec<(String, String)> = view
            .pci_in_use
            .iter()
            .map(|u| (u.device.clone(), u.address.to_string()))
            .collect();
        assert_eq!(
            uses,
            vec![
                ("controller".to_string(), "0000:00:03.0".to_string()),
                ("controller".to_string(), "0000:00:01.2".to_string()),
                ("video".to_string(), "0000:00:02.0".to_string()),
                ("memballoon".to_string(), "0000:01:1f.0".to_string()),
            ],
            "drive addresses and host-side hostdev addresses are not guest PCI slots"
        );
        assert_eq!(
            view.controllers,
            vec![PciController {
                index: 1,
                model: "pci-bridge".into(),
                hotplug: Some(false),
                address: Some(PciAddress {
                    domain: 0,
                    bus: 0,
                    slot: 3,
                    function: 0
                }),
            }],
            "only type='pci' controllers are listed"
        );
    }

    #[test]
    fn out_of_range_or_garbage_pci_fields_drop_the_address() {
        let view = DomainView::parse(&domain_with_devices(
            "<video><address type='pci' bus='0x100' slot='0x02'/></video>\
             <sound><address type='pci' bus='zz' slot='0x02'/></sound>\
             <rng><address type='pci' slot='0x05'/></rng>",
        ))
        .expect("parses");
        assert_eq!(view.pci_in_use.len(), 1);
        assert_eq!(view.pci_in_use[0].device, "rng");
        assert_eq!(view.pci_in_use[0].address.to_string(), "0000:00:05.0");
    }

    #[test]
    fn unknown_elements_and_namespaced_metadata_are_ignored() {
        let view = DomainView::parse(
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
             <name>vm</name><metadata><app:x xmlns:app='urn:a'><interface type='fake'/></app:x></metadata>\
             <future-thing a='b'><deep><deeper/></deep></future-thing>\
             <devices><interface type='bridge' newattr='x'><mac address='52:54:00:00:00:01'/>\
             <whatever/></interface></devices><qemu:commandline/></domain>",
        )
        .expect("parses");
        assert_eq!(view.interfaces.len(), 1);
        assert_eq!(view.interfaces[0].kind, "bridge");
    }

    #[test]
    fn malformed_documents_are_errors_not_panics() {
        for bad in [
            "",
            "   ",
            "<domain>",
            "<domain></network>",
            "</domain>",
            "<domain/><domain/>",
            "<domain>&bogus;</domain>",
            "<domain>&#xFFFFFFFF;</domain>",
        ] {
            assert!(DomainView::parse(bad).is_err(), "accepted {bad:?}");
        }
        assert!(matches!(
            DomainView::parse("<network/>"),
            Err(DomainXmlError::NotADomain(n)) if n == "network"
        ));
    }

    #[test]
    fn very_deep_nesting_is_refused() {
        let xml = format!("{}{}", "<a>".repeat(100_000), "</a>".repeat(100_000));
        assert!(matches!(
            DomainView::parse(&xml),
            Err(DomainXmlError::TooDeep)
        ));
        let ok = format!(
            "<domain>{}{}</domain>",
            "<a>".repeat(MAX_DEPTH - 1),
            "</a>".repeat(MAX_DEPTH - 1)
        );
        assert!(DomainView::parse(&ok).is_ok());
    }

    /// The parts the tree skips are tokenized all the same: a document
    /// malformed only there fails as it did when the tree held everything.
    #[test]
    fn skipped_parts_are_checked_like_the_rest() {
        for bad in [
            "<domain><devices><disk><driver></disk></devices></domain>",
            "<domain><cpu><model>&bogus;</model></cpu></domain>",
            "<domain><devices><disk>&#xFFFFFFFF;</disk></devices></domain>",
            "<domain><clock>",
        ] {
            assert!(DomainView::parse(bad).is_err(), "accepted {bad:?}");
        }
        let deep = format!(
            "<domain><devices><disk>{}{}</disk></devices></domain>",
            "<a>".repeat(MAX_DEPTH),
            "</a>".repeat(MAX_DEPTH)
        );
        assert!(matches!(
            DomainView::parse(&deep),
            Err(DomainXmlError::TooDeep)
        ));
    }

    /// What the tree skips cannot leak into the view: a disk's own
    /// `<source>` and `<target>` are not an interface's, and a device's
    /// address is still counted as in use.
    #[test]
    fn skipped_devices_still_hold_their_pci_slots() {
        let view = DomainView::parse(&domain_with_devices(
            "<disk type='file'><source file='/x'/><target dev='vda'/>\
             <address type='pci' bus='0x00' slot='0x04'/></disk>\
             <interface type='bridge'><source bridge='br0'/>\
             <address type='pci' bus='0x00' slot='0x03'/></interface>",
        ))
        .expect("parses");
        assert_eq!(view.interfaces.len(), 1);
        assert_eq!(view.interfaces[0].source.as_deref(), Some("br0"));
        let slots: Vec<(String, u8)> = view
            .pci_in_use
            .iter()
            .map(|u| (u.device.clone(), u.address.slot))
            .collect();
        assert_eq!(slots, vec![("disk".into(), 4), ("interface".into(), 3)]);
        assert_eq!(view.name, "vm");
        assert_eq!(view.vcpus, 2);
    }

    #[test]
    fn names_and_plain_values_borrow_from_the_document() {
        let doc = "<domain type='kvm'/>";
        assert!(matches!(in_doc(doc, &doc[1..7]), Cow::Borrowed("domain")));
        // A value quick-xml had to unescape lives elsewhere: copied.
        let owned = String::from("kvm");
        assert!(matches!(in_doc(doc, &owned), Cow::Owned(o) if o == "kvm"));
    }
}
