//! PCI capacity and the domain reader, checked against XML captured from real
//! running domains (libvirt 11.3, QEMU 10.0.2, TCG) by
//! `fixtures/capture/capture.sh`, and against what libvirt/QEMU then really
//! accepted by hot-plug.

use std::path::{Path, PathBuf};

use nic_agent::pci::{capacity, check_address, PciAddress, PciError};
use nic_agent::xml::domain::{DomainView, MachineFamily};
use proptest::prelude::*;

fn domains_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/domains")
}

/// Rows of a fixture TSV, without comments and the header line.
fn tsv_rows(name: &str) -> Vec<Vec<String>> {
    let path = domains_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let rows: Vec<Vec<String>> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .skip(1)
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect();
    assert!(!rows.is_empty(), "{name} has no rows");
    rows
}

fn fixture(file: &str) -> DomainView {
    let path = domains_dir().join(file);
    let xml = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    DomainView::parse(&xml).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn capacity_free_equals_what_qemu_really_accepted() {
    let mut failures = Vec::new();
    for row in tsv_rows("counts.tsv") {
        let (file, machine, real) = (&row[0], &row[1], &row[2]);
        let real: u32 = real.parse().expect("real_remaining is a number");
        let dom = fixture(file);
        let cap = capacity(&dom);
        let want_family = if machine == "q35" {
            MachineFamily::Q35
        } else {
            MachineFamily::Pc
        };
        assert_eq!(cap.family, want_family, "{file}");
        if cap.free != real {
            failures.push(format!(
                "{file}: capacity says {} free, QEMU took {real}",
                cap.free
            ));
        }
        if real == 0 {
            assert!(
                !cap.notes.is_empty(),
                "{file}: full but no hint for the operator"
            );
        }
        assert!(cap.used + cap.free <= cap.total, "{file}: {cap:?}");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn capacity_next_is_the_address_libvirt_really_assigned() {
    for row in tsv_rows("next.tsv") {
        let (file, next) = (&row[0], &row[1]);
        let want: Option<PciAddress> = match next.as_str() {
            "-" => None,
            a => Some(a.parse().expect("next.tsv holds PCI addresses")),
        };
        assert_eq!(capacity(&fixture(file)).next, want, "{file}");
    }
}

#[test]
fn check_address_agrees_with_libvirt_on_every_pinned_attach() {
    for row in tsv_rows("pinned.tsv") {
        let (file, address, outcome, message) = (&row[0], &row[1], &row[2], &row[3]);
        let dom = fixture(file);
        let addr: PciAddress = match address.parse() {
            Ok(a) => a,
            // Slot 0x20 does not fit PciAddress's own syntax check; build it.
            Err(_) => {
                let slot = u8::from_str_radix(&address[8..10], 16).expect("hex slot");
                let bus = u8::from_str_radix(&address[5..7], 16).expect("hex bus");
                PciAddress {
                    domain: 0,
                    bus,
                    slot,
                    function: 0,
                }
            }
        };
        let got = check_address(&dom, addr);
        if addr == PciAddress::default() {
            // libvirt reads 0000:00:00.0 as "no address" and auto-assigns;
            // we refuse it as the host bridge rather than guess.
            assert!(
                matches!(&got, Err(PciError::Taken { device, .. }) if device == "host-bridge"),
                "{file} {address}: {got:?}"
            );
            continue;
        }
        match outcome.as_str() {
            "accepted" => assert_eq!(got, Ok(addr), "{file} {address}: {message}"),
            "refused" => {
                let err = got.expect_err(&format!("{file} {address} accepted; libvirt: {message}"));
                let kind_matches = match &err {
                    PciError::Taken { .. } => message.contains("double use"),
                    PciError::NoSuchBus { .. } => message.contains("buses up to"),
                    PciError::OutOfRange { .. } => message.contains("must be"),
                    PciError::NotHotpluggable { .. } => {
                        message.contains("hotplug capability")
                            || message.contains("does not support hotplugging")
                    }
                    PciError::Syntax(_) => false,
                };
                assert!(
                    kind_matches,
                    "{file} {address}: we said {err:?}, libvirt said {message}"
                );
            }
            other => panic!("unknown outcome {other}"),
        }
    }
}

#[test]
fn live_mixed_domain_reads_every_interface_type_with_its_mac() {
    let dom = fixture("pc-mixed-nics.xml");
    assert_eq!(dom.domain_type, "qemu");
    assert_eq!(dom.vcpus, 1, "<vcpu current='1'>2</vcpu>");
    assert!(dom.machine.starts_with("pc-i440fx"), "{}", dom.machine);
    assert!(dom.acpi);
    let kinds: Vec<(&str, Option<&str>)> = dom
        .interfaces
        .iter()
        .map(|i| (i.kind.as_str(), i.mac.as_deref()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("bridge", Some("52:54:00:fc:10:01")),
            ("ethernet", Some("52:54:00:fc:10:02")),
            ("user", Some("52:54:00:fc:10:03")),
            ("direct", Some("52:54:00:fc:10:04")),
        ]
    );
    let bridge = dom.interface_by_mac("52:54:00:FC:10:01");
    assert_eq!(bridge.len(), 1);
    let b = bridge[0];
    assert_eq!(b.source.as_deref(), Some("fxbr0"));
    assert_eq!(
        (b.queues, b.mtu, b.acpi_index),
        (Some(2), Some(1450), Some(7))
    );
    assert_eq!(b.link.as_deref(), Some("down"));
    assert_eq!(b.alias.as_deref(), Some("net0"));
    assert!(b.target.as_deref().is_some_and(|t| t.starts_with("vnet")));
    let direct = dom.interface_by_mac("52:54:00:fc:10:04")[0];
    assert_eq!(direct.source.as_deref(), Some("fxveth0"));
    assert!(direct
        .target
        .as_deref()
        .is_some_and(|t| t.starts_with("macvtap")));
    assert_eq!(
        dom.interface_by_mac("52:54:00:fc:10:02")[0]
            .target
            .as_deref(),
        Some("fx-tap-eth")
    );
    // Every NIC got a PCI slot and each shows up in pci_in_use.
    for nic in &dom.interfaces {
        let pci = nic.pci.expect("live NICs have a PCI address");
        assert!(dom
            .pci_in_use
            .iter()
            .any(|u| u.address == pci && u.device == "interface"));
    }
}

#[test]
fn live_q35_fixture_lists_root_ports_and_hotplug_off() {
    let dom = fixture("q35-rootports-hotplug-off.xml");
    assert_eq!(dom.family(), MachineFamily::Q35);
    let models: Vec<(u32, &str, Option<bool>)> = dom
        .controllers
        .iter()
        .map(|c| (c.index, c.model.as_str(), c.hotplug))
        .collect();
    assert_eq!(
        models,
        vec![
            (0, "pcie-root", None),
            (1, "pcie-root-port", None),
            (2, "pcie-root-port", None),
            (3, "pcie-root-port", Some(false)),
        ]
    );
}

proptest! {
    #[test]
    fn parse_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(dom) = DomainView::parse(&text) {
            let _ = capacity(&dom);
        }
    }

    #[test]
    fn parse_never_panics_on_xmlish_strings(s in "(<|>|/|=|'|\"|&|;|#|x|domain|devices|interface|controller|address|type|pci|bus|slot|0x1f|mac| )*") {
        if let Ok(dom) = DomainView::parse(&s) {
            let _ = capacity(&dom);
        }
    }

    #[test]
    fn capacity_and_checks_never_panic_on_random_domains(
        q35 in any::<bool>(),
        acpi in any::<bool>(),
        controllers in proptest::collection::vec(
            (0u32..300, prop_oneof![
                Just("pci-root"), Just("pcie-root"), Just("pci-bridge"), Just("pcie-root-port"),
                Just("pcie-to-pci-bridge"), Just("dmi-to-pci-bridge"), Just("pcie-switch-downstream-port"), Just("bogus")
            ], prop_oneof![Just(""), Just("on"), Just("off"), Just("maybe")]),
            0..8),
        devices in proptest::collection::vec((any::<u16>(), any::<u16>(), 0u16..300, 0u16..10), 0..40),
        probe in (any::<u8>(), any::<u8>(), 0u8..8),
    ) {
        let mut xml = format!(
            "<domain><os><type machine='{}'/></os>{}<devices>",
            if q35 { "q35" } else { "pc" },
            if acpi { "<features><acpi/></features>" } else { "" }
        );
        for (index, model, hotplug) in &controllers {
            xml.push_str(&format!(
                "<controller type='pci' index='{index}' model='{model}'><target hotplug='{hotplug}'/></controller>"
            ));
        }
        for (domain, bus, slot, function) in &devices {
            xml.push_str(&format!(
                "<interface type='bridge'><address type='pci' domain='{domain:#x}' bus='{bus}' slot='{slot:#x}' function='{function}'/></interface>"
            ));
        }
        xml.push_str("</devices></domain>");
        let dom = DomainView::parse(&xml).expect("generated XML is well-formed");
        let cap = capacity(&dom);
        prop_assert!(cap.used + cap.free <= cap.total);
        if let Some(next) = cap.next {
            // Where libvirt would put the next NIC must pass our own check.
            prop_assert_eq!(check_address(&dom, next), Ok(next));
        } else {
            prop_assert_eq!(cap.free, 0);
        }
        let (bus, slot, function) = probe;
        let _ = check_address(&dom, PciAddress { domain: 0, bus, slot, function });
    }
}
