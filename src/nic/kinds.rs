//! Small closed sets: link state, NIC model, switch type, vhost mode, and the
//! segment a NIC's traffic goes to.

use std::fmt;
use std::str::FromStr;

use super::{NicError, VlanId, Vni};

/// Administrative link state of the guest NIC (`<link state=…/>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LinkState {
    /// Carrier up (the default).
    #[default]
    Up,
    /// Carrier down: the guest sees the cable unplugged.
    Down,
}

impl LinkState {
    /// libvirt's spelling: `up` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Down => "down",
        }
    }
}

impl FromStr for LinkState {
    type Err = NicError;
    fn from_str(s: &str) -> Result<Self, NicError> {
        match s.to_ascii_lowercase().as_str() {
            "up" => Ok(LinkState::Up),
            "down" => Ok(LinkState::Down),
            _ => Err(NicError::invalid("link", s, "up, down")),
        }
    }
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The emulated NIC model (`<model type=…/>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NicModel {
    /// Paravirtual virtio-net: the only model with multi-queue, MTU
    /// advertisement and vhost-net.
    #[default]
    Virtio,
    /// Intel 82540EM, for guests without virtio drivers.
    E1000,
    /// Intel 82574L.
    E1000e,
    /// Realtek 8139, for very old guests.
    Rtl8139,
}

impl NicModel {
    /// libvirt's model type name.
    pub fn as_str(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "e1000",
            NicModel::E1000e => "e1000e",
            NicModel::Rtl8139 => "rtl8139",
        }
    }

    /// True for virtio-net.
    pub fn is_virtio(self) -> bool {
        self == NicModel::Virtio
    }
}

impl FromStr for NicModel {
    type Err = NicError;
    fn from_str(s: &str) -> Result<Self, NicError> {
        match s.to_ascii_lowercase().as_str() {
            "virtio" => Ok(NicModel::Virtio),
            "e1000" => Ok(NicModel::E1000),
            "e1000e" => Ok(NicModel::E1000e),
            "rtl8139" => Ok(NicModel::Rtl8139),
            _ => Err(NicError::invalid(
                "model",
                s,
                "virtio, e1000, e1000e, rtl8139",
            )),
        }
    }
}

impl fmt::Display for NicModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which kind of host switch the bridge is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SwitchType {
    /// A kernel Linux bridge.
    #[default]
    LinuxBridge,
    /// An Open vSwitch bridge.
    OpenVswitch,
}

impl SwitchType {
    /// Short name for logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchType::LinuxBridge => "linux-bridge",
            SwitchType::OpenVswitch => "openvswitch",
        }
    }
}

impl fmt::Display for SwitchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether to ask for the in-kernel vhost-net backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VhostMode {
    /// Use vhost-net when `/dev/vhost-net` exists (the default).
    #[default]
    Auto,
    /// Require vhost-net.
    On,
    /// Use QEMU's userspace backend.
    Off,
}

impl VhostMode {
    /// `auto`, `on` or `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            VhostMode::Auto => "auto",
            VhostMode::On => "on",
            VhostMode::Off => "off",
        }
    }
}

impl FromStr for VhostMode {
    type Err = NicError;
    fn from_str(s: &str) -> Result<Self, NicError> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(VhostMode::Auto),
            "on" => Ok(VhostMode::On),
            "off" => Ok(VhostMode::Off),
            _ => Err(NicError::invalid("vhost", s, "auto, on, off")),
        }
    }
}

impl fmt::Display for VhostMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a NIC's traffic goes on the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Segment {
    /// Attach to `bridge` as it is.
    #[default]
    Plain,
    /// CloudStack's `vlan://untagged` (or `vlan://4095`): the untagged
    /// network on the traffic label's bridge.
    Untagged,
    /// An 802.1Q VLAN.
    Vlan(VlanId),
    /// A VXLAN segment.
    Vxlan(Vni),
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Segment::Plain => f.write_str("plain"),
            Segment::Untagged => f.write_str("vlan://untagged"),
            Segment::Vlan(v) => write!(f, "vlan://{v}"),
            Segment::Vxlan(v) => write!(f, "vxlan://{v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_parse_and_print_libvirt_names() {
        for (s, m) in [
            ("virtio", NicModel::Virtio),
            ("e1000", NicModel::E1000),
            ("e1000e", NicModel::E1000e),
            ("rtl8139", NicModel::Rtl8139),
        ] {
            assert_eq!(s.parse::<NicModel>().unwrap(), m);
            assert_eq!(m.as_str(), s);
        }
        assert!(NicModel::Virtio.is_virtio());
        assert!(!NicModel::E1000.is_virtio());
    }

    #[test]
    fn unknown_or_empty_model_is_rejected_by_from_str() {
        for s in ["", "ne2k_pci", "virtio-net", "vmxnet3"] {
            let e = s.parse::<NicModel>().unwrap_err();
            assert_eq!(e.field(), "model");
            assert!(
                e.to_string().contains("virtio, e1000, e1000e, rtl8139"),
                "{e}"
            );
        }
    }

    #[test]
    fn link_and_vhost_parse_their_words_only() {
        assert_eq!("down".parse::<LinkState>().unwrap(), LinkState::Down);
        assert_eq!(LinkState::Up.as_str(), "up");
        assert_eq!("UP".parse::<LinkState>().unwrap(), LinkState::Up);
        assert_eq!("link".parse::<LinkState>().unwrap_err().field(), "link");
        assert_eq!("on".parse::<VhostMode>().unwrap(), VhostMode::On);
        assert_eq!("off".parse::<VhostMode>().unwrap(), VhostMode::Off);
        assert_eq!("auto".parse::<VhostMode>().unwrap(), VhostMode::Auto);
        for s in ["", "yes", "1"] {
            assert_eq!(s.parse::<VhostMode>().unwrap_err().field(), "vhost");
        }
    }

    #[test]
    fn segments_display_as_broadcast_uris() {
        assert_eq!(
            Segment::Vlan(VlanId::try_from(100).unwrap()).to_string(),
            "vlan://100"
        );
        assert_eq!(
            Segment::Vxlan(Vni::try_from(5000).unwrap()).to_string(),
            "vxlan://5000"
        );
        assert_eq!(Segment::Untagged.to_string(), "vlan://untagged");
    }
}
