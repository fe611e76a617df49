//! Offline tools: `render` prints the `<interface>` XML the agent would
//! attach; `inspect` reads a domain XML and prints NICs and capacity.

use serde::Serialize;

use super::{InspectArgs, NicArgs};
use crate::nic::{Alias, NicSpec, Segment, SwitchType};
use crate::pci;
use crate::xml::domain::DomainView;
use crate::xml::interface::{choose_driver, InterfaceDef};

/// Builds the interface definition from the flags, exactly as the agent
/// would for a Linux bridge or OVS bridge that already exists.
pub fn render(args: &NicArgs) -> Result<String, String> {
    let raw = args.to_raw().map_err(|e| e.to_string())?;
    let spec = NicSpec::try_from(raw).map_err(|e| e.to_string())?;
    let vlan_tag = match (&spec.segment, spec.switch) {
        (Segment::Vlan(v), SwitchType::OpenVswitch) => Some(*v),
        (Segment::Plain | Segment::Untagged, _) => None,
        (Segment::Vlan(v), SwitchType::LinuxBridge) => {
            return Err(format!(
                "invalid vlan {}: a VLAN on a Linux bridge is realised by the per-VLAN host bridge (br<pif>-{}), not by <vlan> (libvirt rejects it there); pass that bridge as --bridge, or use --ovs",
                v.get(),
                v.get()
            ))
        }
        (Segment::Vxlan(v), _) => {
            return Err(format!(
                "invalid vni {}: a VXLAN segment is realised by the host bridge brvx-{}; pass it as --bridge",
                v.get(),
                v.get()
            ))
        }
    };
    let vhost_present = std::path::Path::new("/dev/vhost-net").exists();
    let def = InterfaceDef {
        mac: spec.mac,
        source_bridge: spec.bridge.clone(),
        ovs: spec.switch == SwitchType::OpenVswitch,
        interface_id: spec.interface_id,
        vlan_tag,
        model: spec.model,
        driver: spec
            .model
            .is_virtio()
            .then(|| choose_driver(spec.vhost, vhost_present)),
        queues: spec.queues,
        mtu: spec.mtu,
        link: spec.link,
        inbound: spec.inbound,
        outbound: spec.outbound,
        alias: spec.alias.clone().unwrap_or_else(Alias::generate),
        pci: spec.pci_slot.map(|s| crate::pci::PciAddress {
            domain: 0,
            bus: 0,
            slot: s.get(),
            function: 0,
        }),
        acpi_index: spec.acpi_index,
        filter: spec.anti_spoofing.then(|| crate::xml::nwfilter::FilterRef {
            mac: spec.mac,
            ips: spec.ips.clone(),
        }),
        pxe_disable: spec.pxe_disable,
        packed: spec.packed && spec.model.is_virtio(),
    };
    def.to_xml().map_err(|e| e.to_string())
}

#[derive(Serialize)]
struct InspectNic {
    mac: Option<String>,
    kind: String,
    source: Option<String>,
    target: Option<String>,
    alias: Option<String>,
    model: Option<String>,
    queues: Option<u32>,
    mtu: Option<u32>,
    pci: Option<String>,
}

#[derive(Serialize)]
struct InspectOut {
    name: String,
    uuid: String,
    machine: String,
    family: String,
    vcpus: u32,
    nics: Vec<InspectNic>,
    free_pci_slots: u32,
    used_pci_slots: u32,
    total_pci_slots: u32,
    next_pci_slot: Option<String>,
    /// Why nothing can be hot-plugged (`no_slot`, `acpi_missing`), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    full_reason: Option<&'static str>,
    notes: Vec<String>,
}

/// Reads the file and prints the report (table or JSON).
pub fn inspect(args: &InspectArgs) -> Result<String, String> {
    let xml = std::fs::read_to_string(&args.domain_xml)
        .map_err(|e| format!("domain_xml {}: {e}", args.domain_xml.display()))?;
    let v = DomainView::parse(&xml).map_err(|e| format!("domain_xml: {e}"))?;
    let cap = pci::capacity(&v);
    let out = InspectOut {
        name: v.name.clone(),
        uuid: v.uuid.clone(),
        machine: v.machine.clone(),
        family: format!("{:?}", cap.family).to_lowercase(),
        vcpus: v.vcpus,
        nics: v
            .interfaces
            .iter()
            .map(|i| InspectNic {
                mac: i.mac.clone(),
                kind: i.kind.clone(),
                source: i.source.clone(),
                target: i.target.clone(),
                alias: i.alias.clone(),
                model: i.model.clone(),
                queues: i.queues,
                mtu: i.mtu,
                pci: i.pci.map(|a| a.to_string()),
            })
            .collect(),
        free_pci_slots: cap.free,
        used_pci_slots: cap.used,
        total_pci_slots: cap.total,
        next_pci_slot: cap.next.map(|a| a.to_string()),
        full_reason: cap.full.map(pci::FullReason::as_str),
        notes: cap.notes.clone(),
    };
    if args.json {
        return serde_json::to_string_pretty(&out).map_err(|e| e.to_string());
    }
    let mut s = format!(
        "domain {} ({}), machine {} [{}], {} vCPUs\n",
        out.name, out.uuid, out.machine, out.family, out.vcpus
    );
    s.push_str(&format!(
        "{:<19} {:<10} {:<14} {:<10} {:<40} {:<8} {:>6} {:>5} {}\n",
        "MAC", "TYPE", "SOURCE", "TARGET", "ALIAS", "MODEL", "QUEUES", "MTU", "PCI"
    ));
    for n in &out.nics {
        s.push_str(&format!(
            "{:<19} {:<10} {:<14} {:<10} {:<40} {:<8} {:>6} {:>5} {}\n",
            n.mac.as_deref().unwrap_or("-"),
            n.kind,
            n.source.as_deref().unwrap_or("-"),
            n.target.as_deref().unwrap_or("-"),
            n.alias.as_deref().unwrap_or("-"),
            n.model.as_deref().unwrap_or("-"),
            n.queues
                .map(|q| q.to_string())
                .unwrap_or_else(|| "-".into()),
            n.mtu.map(|q| q.to_string()).unwrap_or_else(|| "-".into()),
            n.pci.as_deref().unwrap_or("-"),
        ));
    }
    s.push_str(&format!(
        "PCI hot-plug capacity: {} free ({} of {} used), next {}\n",
        out.free_pci_slots,
        out.used_pci_slots,
        out.total_pci_slots,
        out.next_pci_slot.as_deref().unwrap_or("none")
    ));
    for n in &out.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    Ok(s)
}
