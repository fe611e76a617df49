//! Fuzz target `domain_reader`: arbitrary bytes (lossy UTF-8) →
//! `DomainView::parse`.
//!
//! Invariants: parsing never panics (nor overflows the stack); when it
//! succeeds, PCI accounting never panics and is self-consistent:
//! used + free <= total, `next` is present exactly when something is free,
//! and `next` passes `check_address`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nic_agent::pci;
use nic_agent::xml::domain::DomainView;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(view) = DomainView::parse(&text) else {
        return;
    };
    let _ = view.family();
    for i in &view.interfaces {
        if let Some(mac) = &i.mac {
            assert!(
                !view.interface_by_mac(mac).is_empty(),
                "mac {mac:?} not found again"
            );
        }
    }
    let cap = pci::capacity(&view);
    assert!(
        cap.free <= cap.total,
        "free {} > total {}",
        cap.free,
        cap.total
    );
    assert!(
        u64::from(cap.used) + u64::from(cap.free) <= u64::from(cap.total),
        "used {} + free {} > total {}",
        cap.used,
        cap.free,
        cap.total
    );
    assert_eq!(cap.next.is_some(), cap.free > 0, "{cap:?}");
    if let Some(next) = cap.next {
        assert_eq!(pci::check_address(&view, next), Ok(next), "{cap:?}");
    }
    let n = view.interfaces.len() as u32;
    assert!(pci::attachable(&cap, n, Some(n.saturating_add(1))) <= 1);
    for slot in [0u8, 1, 2, 0x1f, 0x20, 0xff] {
        let _ = pci::check_pinned(&view, slot);
    }
});
