//! Fuzz target `pci_capacity`: a structured random domain (pc or q35,
//! random PCI controllers, hot-plug flags, occupied addresses, ACPI on or
//! off) is written as XML, parsed, and its PCI accounting checked.
//!
//! Invariants, beyond "never panics":
//! - used + free <= total; `next` is present exactly when free > 0;
//! - `next` passes `check_address`, and occupying it (one more device at
//!   that address) lowers free by exactly one, raises used by exactly one,
//!   leaves total alone and makes `check_address(next)` report it taken;
//!   repeated up to 32 times (enough to fill a pc bus 0);
//! - any address `check_address` accepts is taken after a device is put
//!   there, and adding a device never changes total;
//! - `check_pinned(slot)` is `check_address` on bus 0.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nic_agent::pci::{self, PciAddress, PciError};
use nic_agent::xml::domain::DomainView;

const MODELS: [&str; 10] = [
    "pci-root",
    "pcie-root",
    "pci-bridge",
    "pcie-root-port",
    "pcie-to-pci-bridge",
    "dmi-to-pci-bridge",
    "pcie-switch-upstream-port",
    "pcie-switch-downstream-port",
    "pci-expander-bus",
    "",
];
const DEVICES: [&str; 6] = [
    "interface",
    "video",
    "memballoon",
    "hostdev",
    "disk",
    "sound",
];

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Addr {
    domain: u8,
    bus: u8,
    slot: u8,
    function: u8,
}

impl Addr {
    fn pci(self) -> PciAddress {
        PciAddress {
            // Mostly domain 0; sometimes another segment.
            domain: u16::from(self.domain / 250),
            bus: self.bus % 12,
            slot: self.slot % 0x24,
            function: self.function % 9,
        }
    }
}

fn address_xml(a: PciAddress) -> String {
    format!(
        "<address type='pci' domain='{:#06x}' bus='{:#04x}' slot='{:#04x}' function='{:#x}'/>",
        a.domain, a.bus, a.slot, a.function
    )
}

#[derive(Arbitrary, Debug)]
struct Ctrl {
    index: u16,
    model: u8,
    hotplug: Option<bool>,
    address: Option<Addr>,
}

#[derive(Arbitrary, Debug)]
struct Dev {
    kind: u8,
    address: Addr,
}

#[derive(Arbitrary, Debug)]
struct Input {
    q35: bool,
    /// Write the machine name (otherwise only a pcie-root marks q35).
    machine_name: bool,
    acpi: bool,
    controllers: Vec<Ctrl>,
    devices: Vec<Dev>,
    probes: Vec<Addr>,
    pinned: Vec<u8>,
    /// How many times to occupy `next` (each step re-parses the domain, so
    /// the fuzzer picks the depth rather than always filling 30 slots).
    fill_steps: u8,
}

fn domain_xml(input: &Input, devices: &str) -> String {
    let machine = match (input.machine_name, input.q35) {
        (false, _) => String::new(),
        (true, false) => " machine='pc-i440fx-10.0'".into(),
        (true, true) => " machine='pc-q35-10.0'".into(),
    };
    let acpi = if input.acpi {
        "<features><acpi/></features>"
    } else {
        ""
    };
    let mut ctrls = String::new();
    for c in input.controllers.iter().take(40) {
        // Indices cluster at 0-15 so buses line up with device addresses;
        // a few large ones exercise the u8 bound.
        let index = if c.index < 0xF000 {
            c.index % 16
        } else {
            c.index
        };
        let model = MODELS[usize::from(c.model) % MODELS.len()];
        let target = match c.hotplug {
            None => String::new(),
            Some(h) => format!("<target hotplug='{}'/>", if h { "on" } else { "off" }),
        };
        let addr = c.address.map(|a| address_xml(a.pci())).unwrap_or_default();
        ctrls.push_str(&format!(
            "<controller type='pci' index='{index}' model='{model}'>{target}{addr}</controller>"
        ));
    }
    format!(
        "<domain type='qemu'><name>fz</name><vcpu>2</vcpu>\
         <os><type arch='x86_64'{machine}>hvm</type></os>{acpi}\
         <devices>{ctrls}{devices}</devices></domain>"
    )
}

fn device_xml(kind: &str, a: PciAddress) -> String {
    format!("<{kind}>{}</{kind}>", address_xml(a))
}

fn parse(xml: &str) -> DomainView {
    match DomainView::parse(xml) {
        Ok(v) => v,
        Err(e) => panic!("generated domain does not parse: {e}\n{xml}"),
    }
}

fuzz_target!(|input: Input| {
    let mut devices: String = input
        .devices
        .iter()
        .take(80)
        .map(|d| {
            device_xml(
                DEVICES[usize::from(d.kind) % DEVICES.len()],
                d.address.pci(),
            )
        })
        .collect();
    let view = parse(&domain_xml(&input, &devices));
    let cap = pci::capacity(&view);
    let total = cap.total;
    assert!(cap.used + cap.free <= cap.total, "{cap:?}");
    assert_eq!(cap.next.is_some(), cap.free > 0, "{cap:?}");

    for &slot in input.pinned.iter().take(8) {
        let a = PciAddress {
            domain: 0,
            bus: 0,
            slot,
            function: 0,
        };
        assert_eq!(pci::check_pinned(&view, slot), pci::check_address(&view, a));
    }

    // Probes: an accepted address is taken once a device sits there.
    for p in input.probes.iter().take(8) {
        let a = p.pci();
        if let Ok(ok) = pci::check_address(&view, a) {
            assert_eq!(ok, a);
            let more = format!("{devices}{}", device_xml("interface", a));
            let v2 = parse(&domain_xml(&input, &more));
            assert!(
                matches!(pci::check_address(&v2, a), Err(PciError::Taken { .. })),
                "{a} accepted but not taken after use"
            );
            assert_eq!(pci::capacity(&v2).total, total, "a device changed total");
        }
    }

    // Fill the domain one `next` at a time.
    let mut cap = cap;
    let mut view = view;
    for _ in 0..(input.fill_steps % 33) {
        let Some(next) = cap.next else { break };
        assert_eq!(pci::check_address(&view, next), Ok(next), "{cap:?}");
        devices.push_str(&device_xml("interface", next));
        view = parse(&domain_xml(&input, &devices));
        let after = pci::capacity(&view);
        assert_eq!(
            after.total, cap.total,
            "total changed: {cap:?} -> {after:?}"
        );
        assert_eq!(after.free + 1, cap.free, "free: {cap:?} -> {after:?}");
        assert_eq!(after.used, cap.used + 1, "used: {cap:?} -> {after:?}");
        assert!(
            matches!(pci::check_address(&view, next), Err(PciError::Taken { .. })),
            "{next} still free after use"
        );
        assert_ne!(after.next, Some(next));
        cap = after;
    }
});
