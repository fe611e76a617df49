//! How many NICs a running domain can still take, and where they would go.
//!
//! The model follows what libvirt 11.3 and QEMU 10.0 did when measured
//! (`fixtures/domains/counts.tsv`, `errors.txt`):
//!
//! - libvirt auto-assigns a hot-plugged NIC to the lowest free slot, bus by
//!   bus in controller-index order, on buses it considers hot-pluggable and
//!   suitable: conventional buses (`pci-root`, `pci-bridge`) on pc, PCIe
//!   ports (`pcie-root-port`, downstream ports) on q35. On q35 it never
//!   picks a slot behind a `pcie-to-pci-bridge` for a virtio NIC, though an
//!   explicit address there is accepted.
//! - libvirt does not know that a pc machine without `<acpi/>` cannot
//!   hot-plug into `pci.0`; it picks the slot and QEMU refuses. So free slots
//!   only count up to the first slot QEMU would refuse. That rule is QEMU's:
//!   it holds for `qemu`/`kvm` domains, not for the libvirt test driver's
//!   `type='test'` domains (test:///default's own VM `test` has no ACPI and
//!   takes hot-plugged NICs).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use super::{PciAddress, PciError, MAX_SLOT};
use crate::xml::domain::{DomainView, MachineFamily, PciController};

/// Hot-plug room of one domain, as QEMU would really accept it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    /// i440fx or Q35.
    pub family: MachineFamily,
    /// How many devices can be hot-plugged now without an explicit address.
    pub free: u32,
    /// Occupied slots among those libvirt would auto-assign from.
    pub used: u32,
    /// All slots libvirt would auto-assign from (used, free, or refused by QEMU).
    pub total: u32,
    /// The address libvirt would give the next device; `None` when full.
    pub next: Option<PciAddress>,
    /// Why nothing can be hot-plugged; `None` while `free > 0`.
    pub full: Option<FullReason>,
    /// Hints for an operator: why it is full and what to do.
    pub notes: Vec<String>,
}

/// Why a domain takes no hot-plugged device now. The two need different
/// operator actions, and attach answers them with different codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FullReason {
    /// Every auto-assignable slot is taken: RESOURCE_EXHAUSTED.
    NoSlot,
    /// Slots are free, but QEMU refuses hot-plug on an i440fx `pci.0`
    /// without ACPI: FAILED_PRECONDITION until ACPI is on and the VM restarted.
    AcpiMissing,
}

impl FullReason {
    /// Stable name for the API and the CLI (`no_slot`, `acpi_missing`).
    pub fn as_str(self) -> &'static str {
        match self {
            FullReason::NoSlot => "no_slot",
            FullReason::AcpiMissing => "acpi_missing",
        }
    }
}

/// How to turn ACPI on; said by attach and by `capacity`.
pub const ENABLE_ACPI: &str =
    "add <features><acpi/></features> to the domain definition, then restart the VM \
     (ACPI cannot be turned on in a running guest)";

/// What a bus accepts, derived from its controller model.
struct BusRule {
    /// Slots libvirt accepts on this bus at all.
    slots: RangeInclusive<u8>,
    /// Said when a slot is outside `slots`.
    slot_rule: &'static str,
    /// libvirt auto-assigns a hot-plugged NIC here.
    auto: bool,
    /// libvirt itself refuses hot-plug here (and so skips the bus).
    libvirt_refuses: Option<&'static str>,
    /// libvirt would pick the bus but QEMU refuses the device.
    qemu_refuses: Option<&'static str>,
}

const ALL_SLOTS: RangeInclusive<u8> = 0..=MAX_SLOT;
const BRIDGE_SLOTS: RangeInclusive<u8> = 1..=MAX_SLOT;
const NO_ACPI: &str =
    "pc machine without <acpi/>; add <features><acpi/></features> and restart the VM";

fn rule_for(family: MachineFamily, acpi: bool, c: &PciController) -> BusRule {
    let pc = family == MachineFamily::Pc;
    let mut rule = match c.model.as_str() {
        "pci-root" => BusRule {
            slots: ALL_SLOTS,
            slot_rule: "slot must be <= 0x1f",
            auto: pc,
            libvirt_refuses: None,
            qemu_refuses: (pc && !acpi).then_some(NO_ACPI),
        },
        "pcie-root" => BusRule {
            slots: ALL_SLOTS,
            slot_rule: "slot must be <= 0x1f",
            auto: false,
            libvirt_refuses: Some("use an empty pcie-root-port instead"),
            qemu_refuses: None,
        },
        "pci-bridge" | "pcie-to-pci-bridge" => BusRule {
            slots: BRIDGE_SLOTS,
            slot_rule: "slot must be >= 1 on a PCI bridge",
            // A virtio NIC on q35 is a PCIe device; libvirt places it only on
            // PCIe ports, never behind a bridge, unless the address is given.
            auto: pc,
            libvirt_refuses: None,
            qemu_refuses: None,
        },
        "pcie-root-port" | "pcie-switch-downstream-port" => BusRule {
            slots: 0..=0,
            slot_rule: "slot must be 0 on a PCIe port",
            auto: true,
            libvirt_refuses: None,
            qemu_refuses: None,
        },
        _ => BusRule {
            slots: ALL_SLOTS,
            slot_rule: "slot must be <= 0x1f",
            auto: false,
            libvirt_refuses: Some("this controller model takes no hot-plugged devices"),
            qemu_refuses: None,
        },
    };
    if c.hotplug == Some(false) && rule.libvirt_refuses.is_none() {
        rule.libvirt_refuses = Some("the controller has hotplug='off'");
    }
    rule
}

/// The slots every machine of a family occupies without listing them.
fn implicit_uses(family: MachineFamily) -> &'static [(u8, &'static str)] {
    match family {
        // The i440fx host bridge and the PIIX3 (ISA, IDE, USB functions).
        MachineFamily::Pc => &[(0, "host-bridge"), (1, "piix3")],
        // The Q35 host bridge and the ICH9 LPC/SATA/SMBus functions.
        MachineFamily::Q35 => &[(0, "host-bridge"), (MAX_SLOT, "ich9")],
    }
}

/// The domain's PCI buses with their occupants, in controller-index order.
struct Topology<'a> {
    family: MachineFamily,
    acpi: bool,
    buses: Vec<PciController>,
    /// (bus, slot) -> device element name; a slot is used if any function is.
    used: BTreeMap<(u8, u8), &'a str>,
}

impl<'a> Topology<'a> {
    fn new(dom: &'a DomainView) -> Self {
        let family = dom.family();
        let mut buses: Vec<PciController> = dom
            .controllers
            .iter()
            .filter(|c| c.index <= u32::from(u8::MAX))
            .cloned()
            .collect();
        buses.sort_by_key(|c| c.index);
        buses.dedup_by_key(|c| c.index);
        if buses.first().map(|c| c.index) != Some(0) {
            // Hand-written XML may omit the root bus; libvirt always adds it.
            let model = match family {
                MachineFamily::Pc => "pci-root",
                MachineFamily::Q35 => "pcie-root",
            };
            buses.insert(
                0,
                PciController {
                    index: 0,
                    model: model.to_owned(),
                    hotplug: None,
                    address: None,
                },
            );
        }
        let mut used = BTreeMap::new();
        for &(slot, name) in implicit_uses(family) {
            used.insert((0, slot), name);
        }
        for u in dom.pci_in_use.iter().filter(|u| u.address.domain == 0) {
            used.entry((u.address.bus, u.address.slot))
                .or_insert(u.device.as_str());
        }
        Topology {
            family,
            // QEMU's rule; the test driver runs no QEMU and hot-plugs anyway.
            acpi: dom.acpi || dom.domain_type == "test",
            buses,
            used,
        }
    }

    fn bus(&self, index: u8) -> Option<&PciController> {
        self.buses.iter().find(|c| c.index == u32::from(index))
    }

    fn max_bus(&self) -> u32 {
        self.buses.last().map_or(0, |c| c.index)
    }
}

fn bus_name(c: &PciController) -> String {
    match c.model.as_str() {
        "pcie-root" => "pcie.0".to_owned(),
        _ => format!("pci.{}", c.index),
    }
}

/// Works out how many devices QEMU would accept by hot-plug right now and
/// where libvirt would put the first one.
pub fn capacity(dom: &DomainView) -> Capacity {
    let topo = Topology::new(dom);
    let implicit = implicit_uses(topo.family);
    let mut total = 0u32;
    let mut used = 0u32;
    // Free auto-assignable slots in libvirt's order, with QEMU's verdict.
    let mut candidates: Vec<(PciAddress, Option<&'static str>)> = Vec::new();
    let mut auto_buses: Vec<String> = Vec::new();
    let mut notes = Vec::new();

    for c in &topo.buses {
        let Ok(bus) = u8::try_from(c.index) else {
            continue;
        };
        let rule = rule_for(topo.family, topo.acpi, c);
        if let Some(why) = rule.libvirt_refuses {
            if c.hotplug == Some(false) {
                notes.push(format!("{} ({}): {why}; not counted", bus_name(c), c.model));
            }
            continue;
        }
        let mut free_here = Vec::new();
        let mut slots_here = 0u32;
        for slot in rule.slots.clone() {
            if bus == 0 && implicit.iter().any(|&(s, _)| s == slot) {
                continue;
            }
            slots_here += 1;
            if !topo.used.contains_key(&(bus, slot)) {
                free_here.push(PciAddress {
                    domain: 0,
                    bus,
                    slot,
                    function: 0,
                });
            }
        }
        if rule.auto {
            auto_buses.push(bus_name(c));
            total += slots_here;
            used += slots_here - free_here.len() as u32;
            candidates.extend(free_here.into_iter().map(|a| (a, rule.qemu_refuses)));
        } else if !free_here.is_empty() {
            notes.push(format!(
                "{} free slot(s) on {} ({}) take a NIC only with an explicit <address>; \
                 libvirt puts virtio NICs on PCIe ports",
                free_here.len(),
                bus_name(c),
                c.model
            ));
        }
    }

    // After the first refusal libvirt keeps offering the same slot, so
    // nothing behind it is reachable without an explicit address.
    let free = candidates.iter().take_while(|(_, r)| r.is_none()).count() as u32;
    let next = candidates
        .first()
        .and_then(|(a, refused)| refused.is_none().then_some(*a));
    let full = match candidates.first() {
        _ if free > 0 => None,
        // The only QEMU refusal modelled is pc's pci.0 without ACPI.
        Some((_, Some(_))) => Some(FullReason::AcpiMissing),
        _ => Some(FullReason::NoSlot),
    };
    if let Some((addr, Some(why))) = candidates.first() {
        notes.insert(
            0,
            format!("QEMU refuses hot-plug at {addr} (\"Bus 'pci.{}' does not support hotplugging\"): {why}", addr.bus),
        );
    } else if free == 0 {
        let on = if auto_buses.is_empty() {
            "-".to_owned()
        } else {
            auto_buses.join(", ")
        };
        notes.insert(
            0,
            match topo.family {
                MachineFamily::Pc => format!(
                    "no free PCI slot: {used} of {total} used on {on}; stop the VM to add a pci-bridge"
                ),
                MachineFamily::Q35 => format!(
                    "no free pcie-root-port: {used} of {total} in use; add pcie-root-port \
                     controllers to the domain definition (root ports cannot be hot-added) \
                     and restart the VM"
                ),
            },
        );
    }
    Capacity {
        family: topo.family,
        free,
        used,
        total,
        next,
        full,
        notes,
    }
}

/// NICs that can still be attached: PCI room, further capped by a per-VM
/// NIC limit from configuration (`None` = no limit beyond PCI).
pub fn attachable(cap: &Capacity, nic_count: u32, nic_limit: Option<u32>) -> u32 {
    match nic_limit {
        Some(limit) => cap.free.min(limit.saturating_sub(nic_count)),
        None => cap.free,
    }
}

/// Checks a request pinned to `slot` on bus 0 (`pci.0`). On q35 bus 0 never
/// takes hot-plug, so use [`check_address`] with a root port's bus there.
pub fn check_pinned(dom: &DomainView, slot: u8) -> Result<PciAddress, PciError> {
    check_address(
        dom,
        PciAddress {
            domain: 0,
            bus: 0,
            slot,
            function: 0,
        },
    )
}

/// Checks that a device could be hot-plugged at `address`, in the order
/// libvirt checks: range, bus, slot rule of the bus, hot-plug support,
/// occupancy. Slot 0 of `pci.0` is reported taken by the host bridge
/// (libvirt would silently treat `0000:00:00.0` as "no address").
pub fn check_address(dom: &DomainView, address: PciAddress) -> Result<PciAddress, PciError> {
    if address.slot > MAX_SLOT {
        return Err(PciError::OutOfRange {
            address,
            why: "slot must be <= 0x1f",
        });
    }
    if address.function != 0 {
        return Err(PciError::OutOfRange {
            address,
            why: "a hot-plugged NIC takes function 0",
        });
    }
    if address.domain != 0 {
        return Err(PciError::OutOfRange {
            address,
            why: "only PCI domain 0000 is used",
        });
    }
    let topo = Topology::new(dom);
    let controller = topo.bus(address.bus).ok_or(PciError::NoSuchBus {
        bus: address.bus,
        max: topo.max_bus(),
    })?;
    let rule = rule_for(topo.family, topo.acpi, controller);
    if !rule.slots.contains(&address.slot) {
        return Err(PciError::OutOfRange {
            address,
            why: rule.slot_rule,
        });
    }
    if let Some(why) = rule.libvirt_refuses.or(rule.qemu_refuses) {
        return Err(PciError::NotHotpluggable {
            bus: address.bus,
            model: controller.model.clone(),
            why,
        });
    }
    if let Some(device) = topo.used.get(&(address.bus, address.slot)) {
        return Err(PciError::Taken {
            address,
            device: (*device).to_owned(),
        });
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(bus: u8, slot: u8) -> PciAddress {
        PciAddress {
            domain: 0,
            bus,
            slot,
            function: 0,
        }
    }

    fn pc(devices: &str) -> DomainView {
        DomainView::parse(&format!(
            "<domain type='qemu'><os><type machine='pc-i440fx-10.0'>hvm</type></os>\
             <features><acpi/></features><devices>\
             <controller type='pci' index='0' model='pci-root'/>{devices}</devices></domain>"
        ))
        .expect("test XML parses")
    }

    fn q35(devices: &str) -> DomainView {
        DomainView::parse(&format!(
            "<domain type='qemu'><os><type machine='pc-q35-10.0'>hvm</type></os>\
             <features><acpi/></features><devices>\
             <controller type='pci' index='0' model='pcie-root'/>{devices}</devices></domain>"
        ))
        .expect("test XML parses")
    }

    fn nic_at(bus: u8, slot: u8) -> String {
        format!("<interface type='bridge'><address type='pci' bus='{bus:#04x}' slot='{slot:#04x}'/></interface>")
    }

    fn root_port(index: u8, hotplug: Option<&str>) -> String {
        let target = hotplug.map_or(String::new(), |h| {
            format!("<target chassis='{index}' hotplug='{h}'/>")
        });
        format!(
            "<controller type='pci' index='{index}' model='pcie-root-port'>{target}\
             <address type='pci' bus='0' slot='1' function='{}'/></controller>",
            index - 1
        )
    }

    #[test]
    fn default_pc_offers_slots_two_to_thirty_one_lowest_first() {
        let cap = capacity(&pc(""));
        assert_eq!(cap.family, MachineFamily::Pc);
        assert_eq!((cap.free, cap.used, cap.total), (30, 0, 30));
        assert_eq!(cap.next, Some(addr(0, 2)));
        assert!(cap.notes.is_empty(), "{:?}", cap.notes);
    }

    #[test]
    fn any_function_makes_a_slot_used() {
        let cap = capacity(&pc(
            "<video><address type='pci' bus='0' slot='2' function='0'/></video>\
             <controller type='usb'><address type='pci' bus='0' slot='3' function='2'/></controller>",
        ));
        assert_eq!((cap.free, cap.used), (28, 2));
        assert_eq!(cap.next, Some(addr(0, 4)));
    }

    #[test]
    fn exhausted_pc_has_no_next_and_says_what_to_do() {
        let nics: String = (2..=31).map(|s| nic_at(0, s)).collect();
        let cap = capacity(&pc(&nics));
        assert_eq!((cap.free, cap.used, cap.total), (0, 30, 30));
        assert_eq!(cap.next, None);
        assert_eq!(
            cap.notes,
            vec!["no free PCI slot: 30 of 30 used on pci.0; stop the VM to add a pci-bridge"]
        );
        assert_eq!(attachable(&cap, 30, None), 0);
    }

    #[test]
    fn pci_bridge_adds_slots_one_to_thirty_one_after_bus_zero() {
        let bridge = "<controller type='pci' index='1' model='pci-bridge'>\
                      <address type='pci' bus='0' slot='2'/></controller>";
        let cap = capacity(&pc(bridge));
        assert_eq!((cap.free, cap.used, cap.total), (29 + 31, 1, 61));
        assert_eq!(cap.next, Some(addr(0, 3)));

        let full_bus0: String = (3..=31).map(|s| nic_at(0, s)).collect();
        let cap = capacity(&pc(&format!("{bridge}{full_bus0}")));
        assert_eq!(cap.free, 31);
        assert_eq!(cap.next, Some(addr(1, 1)), "bridge slot 0 is never used");
    }

    #[test]
    fn pci_bridge_with_hotplug_off_is_not_counted() {
        let cap = capacity(&pc("<controller type='pci' index='1' model='pci-bridge'>\
                                <target hotplug='off'/><address type='pci' bus='0' slot='2'/></controller>"));
        assert_eq!(cap.free, 29);
        assert!(cap
            .notes
            .iter()
            .any(|n| n.contains("pci.1") && n.contains("hotplug='off'")));
    }

    #[test]
    fn pc_without_acpi_takes_nothing_until_bus_zero_is_full() {
        let mut dom = pc("<controller type='pci' index='1' model='pci-bridge'>\
                          <address type='pci' bus='0' slot='2'/></controller>");
        dom.acpi = false;
        let cap = capacity(&dom);
        assert_eq!((cap.free, cap.next), (0, None));
        assert!(cap.notes[0].contains("<acpi/>"), "{:?}", cap.notes);
        assert!(matches!(
            check_pinned(&dom, 5),
            Err(PciError::NotHotpluggable { bus: 0, .. })
        ));
        assert_eq!(
            check_address(&dom, addr(1, 1)),
            Ok(addr(1, 1)),
            "SHPC bridge still works"
        );

        for s in 3..=31 {
            dom.pci_in_use.push(crate::xml::domain::PciUse {
                address: addr(0, s),
                device: "interface".into(),
            });
        }
        let cap = capacity(&dom);
        assert_eq!((cap.free, cap.next), (31, Some(addr(1, 1))));
    }

    #[test]
    fn pc_without_acpi_is_blocked_by_acpi_not_full() {
        let mut dom = pc("");
        dom.acpi = false;
        let cap = capacity(&dom);
        assert_eq!((cap.free, cap.used, cap.total), (0, 0, 30));
        assert_eq!(cap.full, Some(FullReason::AcpiMissing));
        assert!(
            cap.notes[0].contains("<features><acpi/></features>"),
            "{:?}",
            cap.notes
        );
    }

    #[test]
    fn exhausted_pc_is_full_for_want_of_slots() {
        let nics: String = (2..=31).map(|s| nic_at(0, s)).collect();
        assert_eq!(capacity(&pc(&nics)).full, Some(FullReason::NoSlot));
        assert_eq!(capacity(&pc("")).full, None);
    }

    /// test:///default's own VM `test`, as `virsh dumpxml test` prints it:
    /// `type='test'`, no machine type, no ACPI. The test driver runs no
    /// QEMU, so QEMU's ACPI rule must not block it.
    #[test]
    fn test_driver_domain_without_machine_or_acpi_takes_nics() {
        let dom = DomainView::parse(
            "<domain type='test' id='1'><name>test</name>\
             <os><type arch='i686'>hvm</type></os><devices>\
             <disk type='file' device='disk'><address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></disk>\
             <interface type='network'><mac address='aa:bb:cc:dd:ee:ff'/>\
             <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/></interface>\
             <memballoon model='virtio'><address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></memballoon>\
             </devices></domain>",
        )
        .expect("parses");
        assert!(!dom.acpi);
        let cap = capacity(&dom);
        assert_eq!(cap.family, MachineFamily::Pc);
        assert_eq!((cap.free, cap.used, cap.total), (29, 1, 30));
        assert_eq!(cap.full, None);
        assert_eq!(cap.next, Some(addr(0, 3)));
        assert!(cap.notes.is_empty(), "{:?}", cap.notes);
        // The same definition as a qemu domain is blocked by ACPI.
        let mut qemu = dom.clone();
        qemu.domain_type = "qemu".into();
        assert_eq!(capacity(&qemu).full, Some(FullReason::AcpiMissing));
    }

    #[test]
    fn q35_counts_one_nic_per_empty_root_port() {
        let dom = q35(&format!(
            "{}{}{}{}",
            root_port(1, None),
            root_port(2, None),
            root_port(3, None),
            nic_at(1, 0)
        ));
        let cap = capacity(&dom);
        assert_eq!(cap.family, MachineFamily::Q35);
        assert_eq!((cap.free, cap.used, cap.total), (2, 1, 3));
        assert_eq!(cap.next, Some(addr(2, 0)));
    }

    #[test]
    fn q35_root_port_with_hotplug_off_is_skipped() {
        let dom = q35(&format!(
            "{}{}",
            root_port(1, Some("off")),
            root_port(2, Some("on"))
        ));
        let cap = capacity(&dom);
        assert_eq!((cap.free, cap.total), (1, 1));
        assert_eq!(cap.next, Some(addr(2, 0)));
        assert!(cap
            .notes
            .iter()
            .any(|n| n.starts_with("pci.1 (pcie-root-port)")));
        assert!(matches!(
            check_address(&dom, addr(1, 0)),
            Err(PciError::NotHotpluggable { bus: 1, .. })
        ));
        assert_eq!(check_address(&dom, addr(2, 0)), Ok(addr(2, 0)));
    }

    #[test]
    fn q35_without_free_root_port_is_exhausted_and_says_root_ports_cannot_be_hot_added() {
        let cap = capacity(&q35(&format!("{}{}", root_port(1, None), nic_at(1, 0))));
        assert_eq!((cap.free, cap.used, cap.total, cap.next), (0, 1, 1, None));
        assert!(
            cap.notes[0].contains("root ports cannot be hot-added"),
            "{:?}",
            cap.notes
        );
        let bare = capacity(&q35(""));
        assert_eq!((bare.free, bare.total), (0, 0));
    }

    #[test]
    fn q35_pcie_to_pci_bridge_slots_are_reachable_only_pinned() {
        let dom = q35(&format!(
            "{}<controller type='pci' index='2' model='pcie-to-pci-bridge'>\
             <address type='pci' bus='1' slot='0'/></controller>",
            root_port(1, None)
        ));
        let cap = capacity(&dom);
        assert_eq!((cap.free, cap.next), (0, None));
        assert!(
            cap.notes
                .iter()
                .any(|n| n.starts_with("31 free slot(s) on pci.2")),
            "{:?}",
            cap.notes
        );
        assert_eq!(check_address(&dom, addr(2, 0x1f)), Ok(addr(2, 0x1f)));
        assert!(matches!(
            check_address(&dom, addr(2, 0)),
            Err(PciError::OutOfRange { why, .. }) if why.contains(">= 1")
        ));
    }

    #[test]
    fn pinned_free_slot_is_accepted() {
        assert_eq!(check_pinned(&pc(""), 5), Ok(addr(0, 5)));
        assert_eq!(check_pinned(&pc(""), 0x1f), Ok(addr(0, 0x1f)));
    }

    #[test]
    fn pinned_taken_slot_names_the_occupant() {
        let dom = pc("<video><address type='pci' bus='0' slot='5' function='1'/></video>");
        assert_eq!(
            check_pinned(&dom, 5),
            Err(PciError::Taken {
                address: addr(0, 5),
                device: "video".into()
            })
        );
        assert!(
            matches!(check_pinned(&dom, 1), Err(PciError::Taken { device, .. }) if device == "piix3")
        );
        assert!(
            matches!(check_pinned(&dom, 0), Err(PciError::Taken { device, .. }) if device == "host-bridge")
        );
    }

    #[test]
    fn pinned_out_of_range_slot_and_missing_bus_are_refused() {
        let dom = pc("");
        assert!(matches!(
            check_pinned(&dom, 0x20),
            Err(PciError::OutOfRange { .. })
        ));
        assert_eq!(
            check_address(&dom, addr(1, 1)),
            Err(PciError::NoSuchBus { bus: 1, max: 0 })
        );
        let mut f1 = addr(0, 5);
        f1.function = 1;
        assert!(matches!(
            check_address(&dom, f1),
            Err(PciError::OutOfRange { .. })
        ));
    }

    #[test]
    fn pinned_on_q35_bus_zero_is_not_hotpluggable_and_root_port_wants_slot_zero() {
        let dom = q35(&root_port(1, None));
        assert!(matches!(
            check_pinned(&dom, 5),
            Err(PciError::NotHotpluggable { bus: 0, model, .. }) if model == "pcie-root"
        ));
        assert!(matches!(
            check_address(&dom, addr(1, 1)),
            Err(PciError::OutOfRange { why, .. }) if why.contains("slot must be 0")
        ));
    }

    #[test]
    fn attachable_applies_the_configured_nic_limit() {
        let cap = capacity(&pc(""));
        assert_eq!(attachable(&cap, 3, None), 30);
        assert_eq!(attachable(&cap, 3, Some(8)), 5);
        assert_eq!(attachable(&cap, 9, Some(8)), 0, "over the limit already");
        assert_eq!(
            attachable(&cap, 0, Some(100)),
            30,
            "PCI room caps a large limit"
        );
    }

    #[test]
    fn pci_address_round_trips_through_display() {
        let a = PciAddress {
            domain: 0,
            bus: 0x1a,
            slot: 0x1f,
            function: 7,
        };
        assert_eq!(a.to_string().parse::<PciAddress>(), Ok(a));
        for bad in [
            "",
            "0000:00:02",
            "0000:00:20.0",
            "00:02.0",
            "0000:00:02.8",
            "x:0:0.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "accepted {bad:?}");
        }
    }
}
