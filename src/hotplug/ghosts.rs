//! NICs that QEMU holds but libvirt lost.
//!
//! libvirt records a hot-plugged device in its state only after QEMU's
//! device_add has returned. A libvirtd killed in between restarts without the
//! device: the guest keeps a NIC that no libvirt XML shows, and libvirt hands
//! its PCI slot to the next attach, which QEMU then refuses ("slot N function
//! 0 not available ... in use by ...,id=ua-..."). libvirt never learns about
//! such a device again, so the agent finds it in QEMU itself and unplugs it.
//!
//! This needs the QEMU monitor passthrough, which libvirt marks as a
//! "custom-monitor" taint on the domain. So the agent only looks when it has
//! a reason: a live attach that lost libvirtd mid-call (the VM becomes a
//! suspect until checked), or a live attach that QEMU refused.

use std::collections::HashSet;
use std::time::Instant;

use crate::hypervisor::{DomainRef, HvErrorKind, QemuNic, Target};

use super::{Hotplug, HotplugError};

impl Hotplug {
    /// Marks a VM whose live attach lost libvirtd mid-call: QEMU may hold a
    /// NIC libvirt never recorded.
    pub(super) fn suspect(&self, dom: &DomainRef) {
        if let Ok(mut s) = self.suspects.lock() {
            s.insert(dom.uuid.clone());
        }
        tracing::warn!(vm = %dom.name, "libvirtd went away during a live attach; QEMU is checked for a NIC libvirt lost before this VM is changed again");
    }

    pub(super) fn is_suspect(&self, uuid: &str) -> bool {
        self.suspects
            .lock()
            .map(|s| s.contains(uuid))
            .unwrap_or(false)
    }

    /// Before changing a suspect VM: remove what QEMU kept and libvirt lost.
    /// A VM that is not running, or a driver without a QEMU monitor, has
    /// nothing to check.
    pub(super) async fn settle(&self, dom: &DomainRef) -> Result<(), HotplugError> {
        if !self.is_suspect(&dom.uuid) {
            return Ok(());
        }
        let result = if dom.state.is_live() {
            self.remove_ghosts(dom).await.map(|_| ())
        } else {
            Ok(())
        };
        match result {
            Ok(()) => {}
            Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::Unsupported => {}
            Err(e) => return Err(e),
        }
        if let Ok(mut s) = self.suspects.lock() {
            s.remove(&dom.uuid);
        }
        Ok(())
    }

    /// The NICs QEMU has for a running VM that libvirt's live XML does not.
    /// QEMU is asked first: a device libvirt is adding right now shows in
    /// QEMU before it shows in the XML, never the other way round.
    pub(super) async fn ghosts(&self, dom: &DomainRef) -> Result<Vec<QemuNic>, HotplugError> {
        let d = dom.clone();
        let in_qemu = self.blocking(move |hv| hv.qemu_nics(&d)).await?;
        let live = self.view(dom, Target::Live).await?;
        let known: HashSet<&str> = live
            .interfaces
            .iter()
            .filter_map(|i| i.alias.as_deref())
            .collect();
        Ok(in_qemu
            .into_iter()
            .filter(|n| is_ours(&n.id) && !known.contains(n.id.as_str()))
            .collect())
    }

    /// Unplugs every NIC libvirt lost: device_del, wait (bounded by the
    /// detach timeout) until the guest has released it, then netdev_del,
    /// which closes the host's tap. Returns what was removed; an error when
    /// the guest keeps one (paused or hung), naming it.
    pub(super) async fn remove_ghosts(
        &self,
        dom: &DomainRef,
    ) -> Result<Vec<QemuNic>, HotplugError> {
        let ghosts = self.ghosts(dom).await?;
        // Netdevs a previous call left owed: their devices were unplugged
        // while the guest was paused, and are gone now or still in `ghosts`.
        let owed: Vec<String> = self
            .lost_netdevs
            .lock()
            .map(|m| m.get(&dom.uuid).cloned().unwrap_or_default())
            .unwrap_or_default();
        if ghosts.is_empty() && owed.is_empty() {
            return Ok(ghosts);
        }
        for g in &ghosts {
            tracing::warn!(
                vm = %dom.name,
                id = %g.id,
                mac = g.mac.as_deref().unwrap_or("?"),
                "QEMU holds a NIC that libvirt lost (libvirtd died during its attach); unplugging it"
            );
            let d = dom.clone();
            let id = g.id.clone();
            match self.blocking(move |hv| hv.qemu_device_del(&d, &id)).await {
                // Gone already, or an unplug is already pending in the guest.
                Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::DeviceMissing => {}
                Err(e) if g.netdev.is_none() => return Err(e),
                Err(e) => {
                    tracing::debug!(vm = %dom.name, id = %g.id, error = %e, "device_del refused; waiting for a pending unplug");
                }
                Ok(()) => {}
            }
        }
        let start = Instant::now();
        loop {
            let d = dom.clone();
            let now = self.blocking(move |hv| hv.qemu_nics(&d)).await?;
            let left: Vec<&QemuNic> = ghosts
                .iter()
                .filter(|g| now.iter().any(|n| n.id == g.id))
                .collect();
            if left.is_empty() {
                break;
            }
            if start.elapsed() >= self.cfg.detach_timeout {
                // The unplug stays requested; once the guest lets go, the
                // netdev (and with it the tap) must still be deleted. Keep
                // the VM a suspect so its next change comes back here.
                let mut netdevs: Vec<String> =
                    ghosts.iter().filter_map(|g| g.netdev.clone()).collect();
                netdevs.extend(owed.iter().cloned());
                netdevs.sort();
                netdevs.dedup();
                if let Ok(mut m) = self.lost_netdevs.lock() {
                    m.insert(dom.uuid.clone(), netdevs);
                }
                if let Ok(mut s) = self.suspects.lock() {
                    s.insert(dom.uuid.clone());
                }
                let names: Vec<String> = left
                    .iter()
                    .map(|g| format!("{} (mac {})", g.id, g.mac.as_deref().unwrap_or("?")))
                    .collect();
                return Err(HotplugError::Precondition(format!(
                    "vm {} still holds NIC {} that libvirt lost when libvirtd restarted; its unplug was requested but the guest has not released it after {} ms (paused or hung); retry when the guest runs",
                    dom.name,
                    names.join(", "),
                    start.elapsed().as_millis()
                )));
            }
            tokio::time::sleep(self.cfg.poll_interval).await;
        }
        let mut netdevs: Vec<String> = ghosts.iter().filter_map(|g| g.netdev.clone()).collect();
        netdevs.extend(owed);
        netdevs.sort();
        netdevs.dedup();
        for netdev in netdevs {
            let d = dom.clone();
            let id = netdev.clone();
            match self.blocking(move |hv| hv.qemu_netdev_del(&d, &id)).await {
                Ok(()) => {}
                Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::DeviceMissing => {}
                Err(e) => {
                    tracing::warn!(vm = %dom.name, %netdev, error = %e, "netdev_del of a lost NIC failed; its tap stays until the VM stops")
                }
            }
        }
        if let Ok(mut m) = self.lost_netdevs.lock() {
            m.remove(&dom.uuid);
        }
        Ok(ghosts)
    }
}

/// Whether a QEMU device id can be one of ours: every NIC the agent plugs
/// has a user alias, and libvirt names the QEMU device after it (`ua-...`).
/// A `<qemu:commandline>` NIC, or one cloudstack-agent is hot-plugging at
/// this moment (libvirt ids `net0`, `hostnet1`, ...), is never ours to
/// unplug.
fn is_ours(id: &str) -> bool {
    id.starts_with("ua-")
}
