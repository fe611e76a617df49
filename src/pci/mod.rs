//! PCI hot-plug slot accounting: pure functions over a domain's XML view.
//! Nothing here does I/O, so every case can be tested against captured
//! fixtures.

use std::fmt;

/// A PCI address as libvirt writes it: `<address type='pci' domain='0x0000'
/// bus='0x00' slot='0x03' function='0x0'/>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
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
