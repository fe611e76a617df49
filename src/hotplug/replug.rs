//! ReplugNic, the decision half: which way a plugged NIC can move to
//! another network while keeping its MAC and PCI slot.
//!
//! Only the decision is here so far ([`ReplugPlan::decide`], pure, no I/O).
//! The transaction that acts on it (prepare the new host side under the
//! host-object locks, link down, `virDomainUpdateDeviceFlags` with the new
//! `<source>`/`<vlan>`, link up; or detach, wait for REMOVED, re-attach at
//! the same slot with the link down, link up; roll back to the old network
//! with the link up on any failure), the RPC and the CLI are not written
//! yet.
//!
//! Checked for the test tier: libvirt 11.3's test driver refuses
//! `update-device` of an interface even with `--live` ("persistent update
//! of device 'interface' is not supported"), so the in-place way can be
//! proven only on real QEMU; the unplug way needs a detach, which the test
//! driver does not complete either.

use super::HotplugError;
use crate::nic::{Segment, SwitchType};
use crate::pci::PciAddress;
use crate::xml::domain::InterfaceView;

/// How the NIC moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplugWay {
    /// Same switch type: libvirt changes a live bridge NIC's source bridge
    /// (and an OVS NIC's VLAN tag) with `virDomainUpdateDeviceFlags`; the
    /// guest keeps its device and sees no remove/add.
    InPlace,
    /// Linux bridge ↔ OVS: libvirt refuses to change the virtualport type
    /// of a live NIC, so it is detached and re-attached at `slot`, the way
    /// CloudStack's ReplugNic always does it.
    Unplug {
        /// The PCI address the NIC holds now and gets back.
        slot: Option<PciAddress>,
    },
    /// The NIC already sits on the requested bridge and segment.
    Nothing,
}

/// A decided replug: where the NIC is, where it goes, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplugPlan {
    /// The way taken.
    pub way: ReplugWay,
    /// The bridge the NIC leaves (for `collect_bridge` afterwards).
    pub old_bridge: String,
    /// The bridge the NIC's tap goes into.
    pub new_bridge: String,
}

impl ReplugPlan {
    /// Decides from the NIC as the live XML shows it and the target:
    /// `new_bridge` is the bridge the tap goes into (already resolved by the
    /// host module for a Linux-bridge VLAN/VXLAN), `new_vlan` the OVS tag.
    pub fn decide(
        have: &InterfaceView,
        new_switch: SwitchType,
        new_bridge: &str,
        new_vlan: Option<u16>,
    ) -> Result<Self, HotplugError> {
        if have.kind != "bridge" {
            return Err(HotplugError::Precondition(format!(
                "only type='bridge' NICs can be re-plugged; this one is type='{}'",
                have.kind
            )));
        }
        let old_bridge = have.source.clone().unwrap_or_default();
        let was_ovs = have.virtualport.as_deref() == Some("openvswitch");
        let to_ovs = new_switch == SwitchType::OpenVswitch;
        let same_vlan = have.vlan == new_vlan.map(u32::from);
        let way = if was_ovs != to_ovs {
            ReplugWay::Unplug { slot: have.pci }
        } else if old_bridge == new_bridge && same_vlan {
            ReplugWay::Nothing
        } else {
            ReplugWay::InPlace
        };
        Ok(ReplugPlan {
            way,
            old_bridge,
            new_bridge: new_bridge.to_string(),
        })
    }
}

/// The OVS tag a segment puts on the NIC's `<vlan>`; Linux bridges carry
/// VLANs in a per-VLAN host bridge instead, so they get none.
pub fn ovs_tag(switch: SwitchType, segment: &Segment) -> Option<u16> {
    match (switch, segment) {
        (SwitchType::OpenVswitch, Segment::Vlan(v)) => Some(v.get()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(bridge: &str, ovs: bool, vlan: Option<u32>) -> InterfaceView {
        InterfaceView {
            kind: "bridge".into(),
            mac: Some("52:54:00:00:00:0a".into()),
            source: Some(bridge.into()),
            virtualport: ovs.then(|| "openvswitch".into()),
            vlan,
            pci: Some(PciAddress {
                domain: 0,
                bus: 0,
                slot: 5,
                function: 0,
            }),
            ..InterfaceView::default()
        }
    }

    #[test]
    fn same_switch_type_moves_in_place() {
        let p = ReplugPlan::decide(
            &nic("brvx-5001", false, None),
            SwitchType::LinuxBridge,
            "brvx-5002",
            None,
        )
        .unwrap();
        assert_eq!(p.way, ReplugWay::InPlace);
        assert_eq!(
            (p.old_bridge.as_str(), p.new_bridge.as_str()),
            ("brvx-5001", "brvx-5002")
        );
        // An OVS VLAN change on the same bridge is in place too.
        let p = ReplugPlan::decide(
            &nic("br-ovs0", true, Some(100)),
            SwitchType::OpenVswitch,
            "br-ovs0",
            Some(200),
        )
        .unwrap();
        assert_eq!(p.way, ReplugWay::InPlace);
    }

    #[test]
    fn switch_type_change_unplugs_and_keeps_the_slot() {
        let have = nic("cloudbr0", false, None);
        let p = ReplugPlan::decide(&have, SwitchType::OpenVswitch, "br-ovs0", Some(100)).unwrap();
        assert_eq!(p.way, ReplugWay::Unplug { slot: have.pci });
        let back = ReplugPlan::decide(
            &nic("br-ovs0", true, Some(100)),
            SwitchType::LinuxBridge,
            "cloudbr0",
            None,
        )
        .unwrap();
        assert!(matches!(back.way, ReplugWay::Unplug { .. }));
    }

    #[test]
    fn same_network_is_nothing_and_non_bridge_nics_are_refused() {
        let p = ReplugPlan::decide(
            &nic("br-ovs0", true, Some(100)),
            SwitchType::OpenVswitch,
            "br-ovs0",
            Some(100),
        )
        .unwrap();
        assert_eq!(p.way, ReplugWay::Nothing);
        let direct = InterfaceView {
            kind: "direct".into(),
            ..nic("eth0", false, None)
        };
        let e = ReplugPlan::decide(&direct, SwitchType::LinuxBridge, "cloudbr0", None).unwrap_err();
        assert!(matches!(e, HotplugError::Precondition(_)), "{e:?}");
    }
}
