//! Host-side networking for a NIC attach: which bridge a NIC plugs into,
//! and the host links (VLAN/VXLAN devices, bridges, MTU, promiscuous mode,
//! OVS mirrors) that must exist first.
//!
//! The work is split the way the hot-plug transaction needs it:
//! [`HostNet::resolve`] only reads and returns a [`HostPlan`];
//! [`HostNet::prepare`] makes the plan true and returns one [`HostUndo`] per
//! change, so the transaction can roll back in reverse order. Naming follows
//! CloudStack's KVM scripts (`brvx-<vni>`, `br<pif>-<vlan>`) so bridges are
//! shared with hosts that CloudStack itself prepared.
//!
//! Submodules: [`naming`] (kernel-safe names), [`mtu`] (pure preflight),
//! `netlink` ([`NetlinkHost`], all link work through rtnetlink), `ovs`
//! (ovs-vsctl with argument vectors), `promisc` (saved bridge state),
//! `inspect` (read-only facts about one NIC's path, for `Diagnose`),
//! [`objects`] (locks, intents and the "in use" rule for shared bridges).
//! [`tcmirror`] (the IDS copies: `tc` mirred filters to the sensor taps),
//! [`portwatch`] (netlink link/tc events that keep those filters in step).
//! [`vxlan`] (CloudStack's two VXLAN flavours, its group formulas and its
//! lock file), `netlink::repair` (re-creating agent-made VXLAN devices that differ
//! from the configuration, for `nic-agent repair-vxlan`).

mod error;
mod inspect;
pub mod mtu;
pub mod naming;
mod netlink;
pub mod objects;
mod ovs;
pub mod portwatch;
mod promisc;
pub mod tc;
pub mod tcmirror;
#[cfg(test)]
pub(crate) mod testing;
pub mod vxlan;

use std::net::IpAddr;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::nic::{BridgeName, Mtu, Segment, SwitchType, TxQueueLen, VlanId};

pub use error::{HostError, HostErrorKind};
pub use inspect::{
    parse_ovs_fdb, FdbFacts, HostFacts, InspectQuery, LinkCounters, LinkFacts, OvsFacts,
    UplinkFacts, VlanFacts, VxlanExpected, VxlanFacts, LABEL_PLACEHOLDER, UPLINK_SAMPLE_GAP,
};
pub use mtu::{mtu_preflight, MtuError};
pub use netlink::{
    set_tap_tx_queue_len, tap_tx_queue_len, NetlinkHost, RepairAction, RepairOutcome, RepairReport,
};
pub use ovs::mirror_name;
pub use promisc::PromiscState;
pub use vxlan::{VxlanDevice, VxlanFamily, VxlanFlavour, VxlanSettings};

/// IFLA_IFALIAS written on every link the agent creates.
///
/// Why an alias: it lives on the link itself, so it survives an agent
/// restart, disappears with the link (no stale bookkeeping), shows in
/// `ip link` for the operator, and tells our `brvx-5000` apart from one that
/// CloudStack's own scripts or an operator created with the same name —
/// names alone cannot, because we deliberately use the same names.
pub const AGENT_ALIAS: &str = "nic-agent";

/// Settings of the host backend.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where promiscuous-mode originals are saved (survives agent restarts).
    pub state_dir: PathBuf,
    /// When a NIC's MTU exceeds its bridge's, plan an undoable bridge MTU
    /// raise instead of refusing.
    pub raise_bridge_mtu: bool,
    /// The ovs-vsctl binary.
    pub ovs_vsctl: PathBuf,
    /// What must survive a host reboot (segment records), unlike
    /// `state_dir`, which is under `/run`.
    pub persist_dir: PathBuf,
    /// How VXLAN devices are made (CloudStack flavour, port, family, lock).
    pub vxlan: VxlanSettings,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/run/nic-agent"),
            raise_bridge_mtu: false,
            ovs_vsctl: PathBuf::from("ovs-vsctl"),
            persist_dir: PathBuf::from("/var/lib/nic-agent"),
            vxlan: VxlanSettings::default(),
        }
    }
}

/// The segment device that carries a VLAN/VXLAN into its bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentDevice {
    /// An 802.1Q sub-interface `<parent>.<id>`.
    Vlan {
        /// Device name.
        name: String,
        /// Physical parent.
        parent: String,
        /// VLAN id.
        id: VlanId,
    },
    /// A VXLAN device.
    Vxlan(VxlanDevice),
}

impl SegmentDevice {
    /// The device's link name.
    pub fn name(&self) -> &str {
        match self {
            SegmentDevice::Vlan { name, .. } => name,
            SegmentDevice::Vxlan(v) => &v.name,
        }
    }
}

/// One change [`HostNet::prepare`] will make (as seen by resolve).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedChange {
    /// Add the route `<group> dev <underlay>` (multicast VXLAN), as
    /// `modifyvxlan.sh` does when the group is not already routed there.
    AddRoute {
        /// The multicast group.
        group: IpAddr,
        /// The underlay link.
        dev: String,
    },
    /// Create the segment device.
    CreateSegmentDevice(String),
    /// Create the bridge.
    CreateBridge(String),
    /// Enslave a device to a bridge.
    Enslave {
        /// The port.
        port: String,
        /// The bridge.
        bridge: String,
    },
    /// Raise a link's MTU (bridge, and its agent segment device).
    RaiseMtu {
        /// The link.
        link: String,
        /// Current MTU.
        from: u32,
        /// New MTU.
        to: u32,
    },
}

/// What the host must look like for a NIC, and what is missing. Read-only
/// result of [`HostNet::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// Switch type.
    pub switch: SwitchType,
    /// The traffic label's bridge.
    pub label: BridgeName,
    /// The bridge that goes into `<source bridge=...>`.
    pub bridge: BridgeName,
    /// VLAN/VXLAN device to enslave into `bridge`, if the segment needs one.
    pub segment_device: Option<SegmentDevice>,
    /// Changes prepare will make, in order (empty when the host is ready).
    pub changes: Vec<PlannedChange>,
    /// `<vlan><tag id=.../></vlan>` for OVS; `None` on Linux bridges.
    pub ovs_vlan_tag: Option<VlanId>,
    /// VXLAN underlay link.
    pub underlay: Option<String>,
    /// Encapsulation bytes the underlay must carry on top of the guest MTU.
    pub overhead: u32,
    /// MTU the bridge has (or will have once created).
    pub bridge_mtu: u32,
    /// Underlay MTU (VXLAN only).
    pub underlay_mtu: Option<u32>,
}

impl HostPlan {
    /// Check the NIC's MTU against this plan and return the `<mtu>` to write.
    ///
    /// With `raise_bridge_mtu` a too-small bridge (whose underlay, if any, can
    /// carry the NIC) is not an error: a [`PlannedChange::RaiseMtu`] is added
    /// for the bridge (and its segment device) and prepare performs it.
    pub fn plan_mtu(
        &mut self,
        guest: Option<Mtu>,
        raise_bridge_mtu: bool,
    ) -> Result<Mtu, MtuError> {
        let ctx = mtu::MtuContext {
            bridge: self.bridge.as_str(),
            underlay: self.underlay.as_deref().unwrap_or(""),
            vni: match &self.segment_device {
                Some(SegmentDevice::Vxlan(v)) => v.vni.get(),
                _ => 0,
            },
        };
        match mtu::mtu_preflight_in(
            guest,
            self.bridge_mtu,
            self.underlay_mtu,
            self.overhead,
            &ctx,
        ) {
            Ok(m) => Ok(m),
            Err(MtuError::AboveBridge { guest: want, .. })
                if raise_bridge_mtu && self.switch == SwitchType::LinuxBridge =>
            {
                mtu::check_underlay(want, self.underlay_mtu, self.overhead, &ctx)?;
                let m = Mtu::try_from(want).map_err(|_| MtuError::Invalid(want))?;
                self.changes
                    .retain(|c| !matches!(c, PlannedChange::RaiseMtu { .. }));
                if let Some(dev) = &self.segment_device {
                    self.changes.push(PlannedChange::RaiseMtu {
                        link: dev.name().to_string(),
                        from: self.bridge_mtu,
                        to: want,
                    });
                }
                self.changes.push(PlannedChange::RaiseMtu {
                    link: self.bridge.as_str().to_string(),
                    from: self.bridge_mtu,
                    to: want,
                });
                Ok(m)
            }
            Err(e) => Err(e),
        }
    }
}

/// One undoable change made on the host. Run [`HostNet::undo`] on these in
/// reverse order to roll back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostUndo {
    /// Delete a link the agent created (only if it still carries
    /// [`AGENT_ALIAS`], so a foreign link of the same name is never removed).
    DeleteLink {
        /// Link name.
        name: String,
    },
    /// Delete a route the agent added (`<group> dev <underlay>`).
    DeleteRoute {
        /// The multicast group.
        group: IpAddr,
        /// The underlay link.
        dev: String,
    },
    /// Detach a port from its bridge.
    Release {
        /// Port name.
        port: String,
    },
    /// Put a link's MTU back.
    SetMtu {
        /// Link name.
        link: String,
        /// MTU to restore.
        mtu: u32,
    },
    /// Restore a bridge's promiscuous flag and ageing time.
    RestorePromisc {
        /// Bridge name.
        bridge: String,
        /// State before the agent changed it.
        original: PromiscState,
    },
    /// Remove an OVS IDS mirror.
    OvsMirrorRemove {
        /// OVS bridge.
        bridge: String,
        /// Mirror name.
        mirror: String,
    },
}

/// The ports of a bridge, as a deleter needs to see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgePorts {
    /// The bridge carries [`AGENT_ALIAS`].
    pub ours: bool,
    /// Agent-made VLAN/VXLAN devices enslaved to it.
    pub segment_devices: Vec<String>,
    /// Every other port (taps, uplinks, veths).
    pub others: Vec<String>,
}

/// Host networking as the hot-plug transaction sees it.
#[async_trait]
pub trait HostNet: Send + Sync {
    /// Work out where a NIC on `label`/`segment` plugs in. Reads only.
    async fn resolve(
        &self,
        label: &BridgeName,
        switch: SwitchType,
        segment: &Segment,
    ) -> Result<HostPlan, HostError>;

    /// Make `plan` true on the host. Returns one undo per change, in the
    /// order made. On failure, undoes its own changes before returning.
    async fn prepare(&self, plan: &HostPlan) -> Result<Vec<HostUndo>, HostError>;

    /// Undo one change.
    async fn undo(&self, step: HostUndo) -> Result<(), HostError>;

    /// Current promiscuous flag and ageing time of a Linux bridge.
    async fn promisc_state(&self, bridge: &BridgeName) -> Result<PromiscState, HostError>;

    /// Make a Linux bridge promiscuous (IDS); its ageing is left alone
    /// (copies for the sensors come from [`HostNet::ids_mirror_sync`]).
    /// `None` when it already is (nothing to undo).
    async fn promisc_enable(&self, bridge: &BridgeName) -> Result<Option<HostUndo>, HostError>;

    /// Put a bridge's promiscuous flag and ageing time back.
    async fn promisc_restore(
        &self,
        bridge: &BridgeName,
        original: PromiscState,
    ) -> Result<(), HostError>;

    /// The original state saved by an earlier [`HostNet::promisc_enable`]
    /// (also by a previous agent process), if any.
    async fn saved_promisc_state(
        &self,
        bridge: &BridgeName,
    ) -> Result<Option<PromiscState>, HostError>;

    /// Puts back the saved ageing time of a bridge the old IDS mode left at
    /// `ageing_time 0` (a hub). `Some(ageing)` when it repaired.
    async fn repair_ageing(&self, bridge: &BridgeName) -> Result<Option<u32>, HostError> {
        let _ = bridge;
        Ok(None)
    }

    /// Brings the `tc` mirror filters of a Linux bridge in step: every port
    /// but a sensor's own copies its ingress to each sensor tap. `Some`
    /// sensors replaces the saved list (empty removes every agent filter);
    /// `None` uses the saved list (link events). Idempotent; returns how
    /// many filters it added or removed. Call under the bridge's lock.
    async fn ids_mirror_sync(
        &self,
        bridge: &BridgeName,
        sensors: Option<&[String]>,
    ) -> Result<usize, HostError> {
        let _ = (bridge, sensors);
        Ok(0)
    }

    /// The sensor taps saved for a bridge by [`HostNet::ids_mirror_sync`].
    async fn ids_sensors(&self, bridge: &BridgeName) -> Result<Vec<String>, HostError> {
        let _ = bridge;
        Ok(Vec::new())
    }

    /// Bridges with a saved sensor list.
    async fn ids_tracked_bridges(&self) -> Result<Vec<String>, HostError> {
        Ok(Vec::new())
    }

    /// Mirror all traffic of an OVS bridge to `port` (IDS).
    async fn ovs_mirror_add(&self, bridge: &BridgeName, port: &str) -> Result<HostUndo, HostError>;

    /// Remove a mirror made by [`HostNet::ovs_mirror_add`]. Missing is fine.
    async fn ovs_mirror_remove(&self, bridge: &BridgeName, mirror: &str) -> Result<(), HostError>;

    /// Locks, intents and segment records of the shared host objects.
    fn objects(&self) -> &objects::HostObjects;

    /// Bridges carrying [`AGENT_ALIAS`] (made by this agent).
    async fn agent_bridges(&self) -> Result<Vec<String>, HostError>;

    /// Bridges whose pre-IDS state is saved (not restored yet).
    async fn saved_promisc_bridges(&self) -> Result<Vec<String>, HostError>;

    /// The ports of a bridge; `None` when there is no such bridge.
    async fn bridge_ports(&self, bridge: &BridgeName) -> Result<Option<BridgePorts>, HostError>;

    /// Remove an agent-created VLAN/VXLAN bridge and its segment device when
    /// no other port is left, unless its name is in `keep`. `true` if removed.
    async fn remove_bridge_if_unused(
        &self,
        bridge: &BridgeName,
        keep: &[String],
    ) -> Result<bool, HostError>;

    /// Set the transmit queue length (`txqueuelen`) of a NIC's host tap.
    /// There is no undo: the tap is the NIC's own and goes with it.
    async fn set_tx_queue_len(&self, tap: &str, len: TxQueueLen) -> Result<(), HostError> {
        let _ = (tap, len);
        Err(HostError::Unsupported(
            "this host backend cannot set a tap's txqueuelen".into(),
        ))
    }

    /// Read-only facts about one NIC's host path (tap, bridge, segment
    /// device, underlay, FDB, OVS port), for `Diagnose`. Never changes
    /// anything.
    ///
    /// A default method so that fakes and other backends need not know
    /// about diagnosis: they answer "not supported", and the report says the
    /// host was not inspected instead of failing.
    async fn inspect(&self, query: &InspectQuery) -> Result<HostFacts, HostError> {
        let _ = query;
        Err(HostError::Unsupported(
            "this host backend cannot inspect links".into(),
        ))
    }
}
