//! Bounded integers: each newtype can only hold a value in its range.

use std::fmt;

use super::NicError;

macro_rules! ranged {
    (
        $(#[$doc:meta])*
        $name:ident($inner:ty), field = $field:literal, min = $min:literal, max = $max:literal
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name($inner);

        impl $name {
            /// Smallest accepted value.
            pub const MIN: $inner = $min;
            /// Largest accepted value.
            pub const MAX: $inner = $max;

            /// The value, guaranteed to be within `MIN..=MAX`.
            pub fn get(self) -> $inner {
                self.0
            }
        }

        impl TryFrom<u32> for $name {
            type Error = NicError;

            fn try_from(v: u32) -> Result<Self, NicError> {
                match <$inner>::try_from(v) {
                    Ok(x) if (Self::MIN..=Self::MAX).contains(&x) => Ok($name(x)),
                    _ => Err(NicError::invalid(
                        $field,
                        v,
                        concat!(stringify!($min), "-", stringify!($max)),
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

ranged! {
    /// An 802.1Q VLAN id. 0 means "priority tag only" and 4095 is reserved,
    /// so neither names a VLAN.
    VlanId(u16), field = "vlan", min = 1, max = 4094
}

ranged! {
    /// A VXLAN network identifier (24 bits; 0 is not used as a segment).
    Vni(u32), field = "vni", min = 1, max = 16777215
}

ranged! {
    /// A guest NIC MTU. 68 is the IPv4 minimum; 65535 is the largest value
    /// libvirt's `<mtu size>` (unsignedShort) and virtio-net's config field
    /// (16 bits) can carry.
    Mtu(u32), field = "mtu", min = 68, max = 65535
}

ranged! {
    /// virtio-net queue pairs. 256 is this agent's own cap: queues beyond
    /// the guest's vCPU count bring nothing, no offering has 256 vCPUs, and
    /// the bound keeps a typo (4000) from reaching QEMU.
    QueueCount(u16), field = "queues", min = 1, max = 256
}

ranged! {
    /// A PCI slot for a hot-plugged NIC. Slot 0 holds the host bridge (on
    /// i440fx) or is the only slot a root port's bus has; pinning to it is
    /// never what a caller wants, so 1-31.
    PciSlot(u8), field = "pci_slot", min = 1, max = 31
}

ranged! {
    /// ACPI index (`<acpi index=…/>`): gives the guest a stable `eno<N>`
    /// name. libvirt refuses 0 and anything above 16383 (QEMU's limit for
    /// `acpi-index`).
    AcpiIndex(u32), field = "acpi_index", min = 1, max = 16383
}

ranged! {
    /// The host tap's transmit queue length (`txqueuelen`, IFLA_TXQLEN), in
    /// packets. The kernel takes any u32 and the tap default is 1000; 0
    /// would leave a qdisc without a queue and nothing sane needs more than
    /// 100000, so a typo (a byte count, an extra zero) is refused here.
    TxQueueLen(u32), field = "tx_queue_len", min = 1, max = 100000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks min-1, min, max, max+1 and u32::MAX for one type.
    fn bounds<T>(min: u32, max: u32, field: &str, allowed: &str)
    where
        T: TryFrom<u32, Error = NicError> + fmt::Display,
    {
        if min > 0 {
            let e = T::try_from(min - 1).err().expect("min-1 accepted");
            assert_eq!(e.field(), field);
            assert!(e.to_string().contains(allowed), "{e}");
        }
        assert_eq!(
            T::try_from(min).ok().map(|v| v.to_string()),
            Some(min.to_string())
        );
        assert_eq!(
            T::try_from(max).ok().map(|v| v.to_string()),
            Some(max.to_string())
        );
        let e = T::try_from(max + 1).err().expect("max+1 accepted");
        assert_eq!(
            e.to_string(),
            format!("invalid {field} \"{}\": allowed {allowed}", max + 1)
        );
        assert!(T::try_from(u32::MAX).is_err());
    }

    #[test]
    fn vlan_id_is_1_to_4094() {
        bounds::<VlanId>(1, 4094, "vlan", "1-4094");
        assert_eq!(VlanId::try_from(100).unwrap().get(), 100u16);
    }

    #[test]
    fn vni_is_24_bits_without_zero() {
        bounds::<Vni>(1, 16_777_215, "vni", "1-16777215");
        assert_eq!(Vni::try_from(5000).unwrap().get(), 5000);
    }

    #[test]
    fn mtu_is_68_to_65535() {
        bounds::<Mtu>(68, 65535, "mtu", "68-65535");
        assert_eq!(Mtu::try_from(1450).unwrap().get(), 1450);
    }

    #[test]
    fn queue_count_is_1_to_256() {
        bounds::<QueueCount>(1, 256, "queues", "1-256");
        assert_eq!(QueueCount::try_from(4).unwrap().get(), 4u16);
    }

    #[test]
    fn pci_slot_is_1_to_31() {
        bounds::<PciSlot>(1, 31, "pci_slot", "1-31");
        assert_eq!(PciSlot::try_from(5).unwrap().get(), 5u8);
        // A value that would wrap when narrowed to u8 must not sneak in.
        assert!(PciSlot::try_from(256 + 5).is_err());
    }

    #[test]
    fn tx_queue_len_is_1_to_100000() {
        bounds::<TxQueueLen>(1, 100_000, "tx_queue_len", "1-100000");
        assert_eq!(TxQueueLen::try_from(5000).unwrap().get(), 5000);
    }

    #[test]
    fn acpi_index_is_1_to_16383() {
        bounds::<AcpiIndex>(1, 16383, "acpi_index", "1-16383");
    }
}
