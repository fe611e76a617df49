//! PCI hot-plug slot accounting: pure functions over a domain's XML view.
//! Nothing here does I/O, so every case can be tested against captured
//! fixtures.

use std::fmt;

/// A PCI address as libvirt writes it: `<address type='pci' domain='0x0000'
/// bus='0x00' slot='0x03' function='0x0'/>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize)]
pub struct PciAddress {
    /// PCI domain (segment), almost always 0.
    pub domain: u16,
    /// Bus number; equals the owning controller's index in libvirt.
    pub bus: u8,
    /// Slot 0..=31.
    pub slot: u8,
    /// Function 0..=7.
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

// STUB until capacity lands.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    pub family: crate::xml::domain::MachineFamily,
    pub free: u32,
    pub used: u32,
    pub total: u32,
    pub next: Option<PciAddress>,
    pub notes: Vec<String>,
}
#[allow(missing_docs)]
pub fn capacity(_d: &crate::xml::domain::DomainView) -> Capacity {
    Capacity {
        family: crate::xml::domain::MachineFamily::Pc,
        free: 0,
        used: 0,
        total: 0,
        next: None,
        notes: vec![],
    }
}
#[allow(missing_docs)]
pub fn attachable(c: &Capacity, _n: u32, _l: Option<u32>) -> u32 {
    c.free
}
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
#[error("pci")]
pub struct PciError;
#[allow(missing_docs)]
pub fn check_pinned(_d: &crate::xml::domain::DomainView, _s: u8) -> Result<PciAddress, PciError> {
    Err(PciError)
}
