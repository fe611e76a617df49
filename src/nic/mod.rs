//! The validated NIC request model.
//!
//! Everything a caller asks for (over gRPC or the CLI) arrives as a
//! [`RawNic`]: plain strings and integers, unchecked. [`NicSpec::try_from`]
//! is the one place that checks it. Every field of a [`NicSpec`] is a newtype
//! that can only be built through `TryFrom`/`FromStr`, so code past this
//! boundary (the XML writer, host networking, hot-plug) trusts its inputs and
//! never re-validates them.
//!
//! Nothing here panics on any input, and nothing does I/O.
//!
//! Layout: [`error`] holds the single error type; [`mac`], [`bridge`],
//! [`ranged`] (bounded integers), [`ids`] (alias and OVS interface id),
//! [`kinds`] (small enums), [`bandwidth`] hold the field types; [`spec`]
//! assembles them and applies the cross-field rules.

pub mod bandwidth;
pub mod bridge;
pub mod error;
pub mod ids;
pub mod kinds;
pub mod mac;
pub mod plug;
pub mod ranged;
pub mod spec;

pub use bandwidth::Bandwidth;
pub use bridge::{BridgeName, BridgePattern};
pub use error::NicError;
pub use ids::{Alias, InterfaceId};
pub use kinds::{LinkState, NicModel, Segment, SwitchType, VhostMode};
pub use mac::MacAddr;
pub use plug::{MacPolicy, PlugDetails, RawAddresses};
pub use ranged::{AcpiIndex, Mtu, PciSlot, QueueCount, TxQueueLen, VlanId, Vni};
pub use spec::{parse_broadcast_uri, parse_segment_uri, NicSpec, RawBandwidth, RawNic};

#[cfg(test)]
mod never_panics {
    //! Arbitrary input into every constructor: an `Err` is fine, a panic
    //! is not.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn string_constructors_never_panic(s in any::<String>(), t in "[0-9a-fA-F:.\\-ua]{0,20}") {
            for s in [s.as_str(), t.as_str()] {
                let _ = MacAddr::try_from(s);
                let _ = BridgeName::try_from(s);
                let _ = Alias::try_from(s);
                let _ = InterfaceId::try_from(s);
                let _ = s.parse::<LinkState>();
                let _ = s.parse::<NicModel>();
                let _ = s.parse::<VhostMode>();
            }
        }

        #[test]
        fn integer_constructors_never_panic(v in any::<u32>(), w in any::<u64>(), x in any::<u64>(), y in any::<u64>()) {
            let _ = VlanId::try_from(v);
            let _ = Vni::try_from(v);
            let _ = Mtu::try_from(v);
            let _ = QueueCount::try_from(v);
            let _ = PciSlot::try_from(v);
            let _ = AcpiIndex::try_from(v);
            let _ = TxQueueLen::try_from(v);
            let _ = Bandwidth::new("inbound", w, Some(x), Some(y));
            let _ = Bandwidth::from_mbps("outbound", v);
        }

        #[test]
        fn raw_nic_never_panics(
            mac in prop_oneof![Just("52:54:00:12:34:56".to_string()), any::<String>()],
            bridge in prop_oneof![Just("cloudbr0".to_string()), any::<String>()],
            ovs in any::<bool>(),
            vlan in proptest::option::of(any::<u32>()),
            vni in proptest::option::of(any::<u32>()),
            uri in prop_oneof![Just(String::new()), "(vlan|vxlan|pvlan)://[0-9a-z+]{0,12}", any::<String>()],
            mtu in proptest::option::of(any::<u32>()),
            queues in proptest::option::of(any::<u32>()),
            model in prop_oneof![Just(String::new()), Just("e1000".to_string()), any::<String>()],
            alias in any::<String>(),
            bw in (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()),
            slots in (proptest::option::of(any::<u32>()), proptest::option::of(any::<u32>())),
            vhost in prop_oneof![Just("on".to_string()), any::<String>()],
            iid in any::<String>(),
            plug in (any::<String>(), any::<String>(), any::<String>(), proptest::option::of(any::<u32>()), any::<u32>(), any::<String>()),
        ) {
            let raw = RawNic {
                mac, bridge, ovs, vlan, vni, broadcast_uri: uri, mtu, queues, model,
                link_down: false, promiscuous: false, alias,
                inbound: Some(RawBandwidth { average_kbps: bw.0, peak_kbps: bw.1, burst_kb: bw.2, rate_mbps: bw.3 }),
                outbound: None,
                pci_slot: slots.0, acpi_index: slots.1, vhost, interface_id: iid,
                anti_spoofing: false, ips: vec![],
                nic_uuid: plug.0,
                addresses: RawAddresses { ipv4_cidr: plug.1, ipv6_cidr: plug.2, secondary_ips: vec![plug.5], ..RawAddresses::default() },
                device_id: plug.3,
                multicast_rate_mbps: plug.4,
                packed: true,
                pxe_disable: true,
                ..RawNic::default()
            };
            if let Err(e) = NicSpec::try_from(raw) {
                // Every rejection names a field and renders a message.
                prop_assert!(!e.field().is_empty());
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}
