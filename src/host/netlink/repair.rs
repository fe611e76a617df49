//! `nic-agent repair-vxlan`: re-create the VXLAN devices this agent made
//! whose port, group, underlay or local address differ from the host's
//! configuration.
//!
//! Why it exists: agents before this version made `vxlan<VNI>` with UDP
//! port 4789, while CloudStack's `modifyvxlan.sh` uses the kernel default
//! (8472). Those devices keep working among themselves but exchange
//! nothing with hosts CloudStack prepared, and attach now refuses them
//! (FAILED_PRECONDITION) rather than changing a live segment behind the
//! operator's back. A VXLAN device's port and group cannot be changed in
//! place, so repair deletes and re-creates it, under CloudStack's lock,
//! in the same bridge; the VNI is cut off on this host meanwhile, and the
//! report says for how long.
//!
//! Only devices with the agent's alias are touched. A foreign device that
//! differs is reported, never changed.

use std::fmt;
use std::time::{Duration, Instant};

use netlink_packet_route::link::InfoKind;
use rtnetlink::LinkUnspec;
use tracing::{info, warn};

use super::{Link, NetlinkHost};
use crate::host::vxlan::{self, VxlanDevice, VxlanFlavour};
use crate::host::{HostError, SegmentDevice};
use crate::nic::Vni;

/// What repair did with one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairAction {
    /// Already as configured.
    Unchanged,
    /// Deleted and re-created; the VNI was cut off on this host for the
    /// given time.
    Recreated {
        /// From delete to the new device being up in its bridge.
        interrupted: Duration,
    },
    /// Differs, but was not made by the agent: left alone.
    SkippedForeign,
}

/// One VXLAN device looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairOutcome {
    /// Device name.
    pub device: String,
    /// The bridge it is a port of.
    pub bridge: Option<String>,
    /// How it differed from the configuration (empty when unchanged).
    pub differences: Vec<String>,
    /// The command that makes it as configured.
    pub command: String,
    /// What was done.
    pub action: RepairAction,
}

/// Everything `repair-vxlan` looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// One entry per VXLAN device considered, in link order.
    pub outcomes: Vec<RepairOutcome>,
}

impl RepairReport {
    /// Devices re-created.
    pub fn recreated(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o.action, RepairAction::Recreated { .. }))
            .count()
    }
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.outcomes.is_empty() {
            return writeln!(f, "no VXLAN devices to repair");
        }
        for o in &self.outcomes {
            let br = o
                .bridge
                .as_deref()
                .map_or(String::new(), |b| format!(" in {b}"));
            match &o.action {
                RepairAction::Unchanged => {
                    writeln!(f, "{}{br}: as configured, unchanged", o.device)?
                }
                RepairAction::Recreated { interrupted } => writeln!(
                    f,
                    "{}{br}: {}; re-created as `{}`. Traffic on this VNI between this host and \
                     the others was interrupted for {} ms while the device was replaced.",
                    o.device,
                    o.differences.join("; "),
                    o.command,
                    interrupted.as_millis()
                )?,
                RepairAction::SkippedForeign => writeln!(
                    f,
                    "{}{br}: {}; not made by nic-agent, left alone (re-create it with `{}` once \
                     its owner agrees)",
                    o.device,
                    o.differences.join("; "),
                    o.command
                )?,
            }
        }
        Ok(())
    }
}

impl NetlinkHost {
    /// Re-create every agent-made VXLAN device (only VNI `only`, when
    /// given) whose port, group, underlay or local address differ from this
    /// host's configuration. See the module docs.
    pub async fn repair_vxlan(&self, only: Option<Vni>) -> Result<RepairReport, HostError> {
        let kernel_port = vxlan::kernel_default_port();
        let mut report = RepairReport::default();
        let links = self.links().await?;
        for l in links.iter().filter(|l| l.is(&InfoKind::Vxlan)) {
            let attrs = self.vxlan_attrs(l).await?;
            let Some(vni) = attrs.vni.and_then(|n| Vni::try_from(n).ok()) else {
                continue;
            };
            if only.is_some_and(|o| o != vni) {
                continue;
            }
            let bridge = l
                .controller
                .and_then(|c| links.iter().find(|b| b.index == c))
                .map(|b| b.name.clone());
            let want = match self.config.vxlan.flavour {
                VxlanFlavour::Multicast => {
                    // The agent's multicast devices run over their label
                    // bridge; that stays, only how they are built changes.
                    let Some(u) = attrs.underlay.as_deref() else {
                        warn!(device = %l.name, "VXLAN device without an underlay: not repaired");
                        continue;
                    };
                    let label = self.need_link(u).await?;
                    self.vxlan_device(vni, &label).await?
                }
                VxlanFlavour::Evpn => self.vxlan_device(vni, l).await?,
            };
            let differences = want.differences(&attrs, kernel_port);
            let mut outcome = RepairOutcome {
                device: l.name.clone(),
                bridge: bridge.clone(),
                differences,
                command: want.ip_command(),
                action: RepairAction::Unchanged,
            };
            if !outcome.differences.is_empty() {
                outcome.action = if l.is_ours() {
                    let interrupted = self.recreate(l, &want, bridge.as_deref()).await?;
                    info!(device = %l.name, ms = interrupted.as_millis() as u64,
                        "re-created VXLAN device as configured");
                    RepairAction::Recreated { interrupted }
                } else {
                    RepairAction::SkippedForeign
                };
            }
            report.outcomes.push(outcome);
        }
        Ok(report)
    }

    /// Delete `old` and make `want` in its place, in the same bridge, with
    /// the same MTU, under CloudStack's lock. Returns how long the VNI was
    /// cut off.
    async fn recreate(
        &self,
        old: &Link,
        want: &VxlanDevice,
        bridge: Option<&str>,
    ) -> Result<Duration, HostError> {
        let _lock = self.vxlan_lock().await?;
        let start = Instant::now();
        if let (Some(v), Some(dev)) = (&old.vxlan, old.vxlan_dev) {
            if let Some(group) = v.group.filter(|g| g.is_multicast()) {
                self.del_route(group, dev).await?;
            }
        }
        self.delete(old).await?;
        let cut = |e: HostError| {
            warn!(device = %old.name, error = %e,
                "VXLAN device deleted but not re-created: the VNI is down on this host");
            e
        };
        if let Some((group, _, underlay)) = want.route() {
            let u = self.need_link(underlay).await.map_err(cut)?;
            if !self.routed_via(group, u.index).await {
                self.add_route(group, underlay).await.map_err(cut)?;
            }
        }
        // ensure_segment_device records undo steps; repair has no
        // transaction to roll back into (the old device is gone), so they
        // are dropped.
        let mut undo = Vec::new();
        let (d, _) = self
            .ensure_segment_device(&SegmentDevice::Vxlan(want.clone()), &mut undo)
            .await
            .map_err(cut)?;
        if d.mtu != old.mtu {
            // A raised MTU (raise_bridge_mtu) is kept; if the new device
            // cannot carry it the bridge will say so at the next attach.
            if let Err(e) = self
                .set(
                    LinkUnspec::new_with_index(d.index).mtu(old.mtu).build(),
                    format!("set MTU {} on {}", old.mtu, d.name),
                )
                .await
            {
                warn!(device = %d.name, error = %e, "could not keep the old MTU");
            }
        }
        if let Some(b) = bridge {
            let b = self.need_bridge(b).await.map_err(cut)?;
            self.set(
                LinkUnspec::new_with_index(d.index)
                    .controller(b.index)
                    .build(),
                format!("enslave {} to {}", d.name, b.name),
            )
            .await
            .map_err(cut)?;
            if want.flavour == VxlanFlavour::Evpn {
                self.evpn_bridge_port(&d).await.map_err(cut)?;
            }
        }
        self.set(
            LinkUnspec::new_with_index(d.index).up().build(),
            format!("set {} up", d.name),
        )
        .await
        .map_err(cut)?;
        Ok(start.elapsed())
    }
}
