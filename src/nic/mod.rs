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
pub mod ranged;
pub mod spec;

pub use bandwidth::Bandwidth;
pub use bridge::BridgeName;
pub use error::NicError;
pub use ids::{Alias, InterfaceId};
pub use kinds::{LinkState, NicModel, Segment, SwitchType, VhostMode};
pub use mac::MacAddr;
pub use ranged::{AcpiIndex, Mtu, PciSlot, QueueCount, VlanId, Vni};
pub use spec::{NicSpec, RawBandwidth, RawNic};
