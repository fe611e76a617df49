//! PCI hot-plug slot accounting: pure functions over a domain's XML view.
//! Nothing here does I/O, so every case can be tested against captured
//! fixtures.
//!
//! [`capacity`] answers "how many more devices can be hot-plugged right now,
//! and where would the next one go"; [`check_pinned`] and [`check_address`]
//! judge a caller-chosen address before libvirt is asked. The rules were
//! measured on libvirt 11.3 / QEMU 10.0 (see `fixtures/capture/capture.sh`).

use std::fmt;
use std::str::FromStr;

mod capacity;

pub use capacity::{
    attachable, capacity, check_address, check_pinned, Capacity, FullReason, ENABLE_ACPI,
};

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

impl FromStr for PciAddress {
    type Err = PciError;

    /// Reads the `dddd:bb:ss.f` form that [`fmt::Display`] writes (hex fields).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PciError::Syntax(s.chars().take(40).collect());
        let (rest, function) = s.trim().rsplit_once('.').ok_or_else(bad)?;
        let mut parts = rest.split(':');
        let (Some(domain), Some(bus), Some(slot), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let hex8 = |v: &str| u8::from_str_radix(v, 16).map_err(|_| bad());
        let addr = PciAddress {
            domain: u16::from_str_radix(domain, 16).map_err(|_| bad())?,
            bus: hex8(bus)?,
            slot: hex8(slot)?,
            function: hex8(function)?,
        };
        if addr.slot > MAX_SLOT || addr.function > 7 {
            return Err(bad());
        }
        Ok(addr)
    }
}

/// Highest PCI slot number on any bus.
pub const MAX_SLOT: u8 = 0x1f;

/// Why a PCI address cannot take a hot-plugged device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    /// The slot or function is outside what the bus accepts.
    #[error("PCI address {address} is out of range: {why}")]
    OutOfRange {
        /// The requested address.
        address: PciAddress,
        /// The bus's rule, e.g. "slot must be 0 on a pcie-root-port".
        why: &'static str,
    },
    /// No controller provides this bus.
    #[error("PCI bus {bus:#04x} does not exist; the domain has buses up to {max:#04x}")]
    NoSuchBus {
        /// The requested bus.
        bus: u8,
        /// The highest bus the domain has.
        max: u32,
    },
    /// Some device already uses this slot (any function).
    #[error("PCI address {address} is taken by <{device}>; pick a free slot or omit it")]
    Taken {
        /// The requested address.
        address: PciAddress,
        /// Element name of the occupant, e.g. `interface`.
        device: String,
    },
    /// The bus exists but QEMU/libvirt will not hot-plug into it.
    #[error("PCI bus {bus:#04x} ({model}) does not support hot-plug: {why}")]
    NotHotpluggable {
        /// The requested bus.
        bus: u8,
        /// Model of the controller providing it.
        model: String,
        /// What makes it so and what to do.
        why: &'static str,
    },
    /// Text that is not a `dddd:bb:ss.f` PCI address.
    #[error("not a PCI address (want dddd:bb:ss.f): {0:?}")]
    Syntax(String),
}
