//! The detach transaction: the persistent definition first, then the live
//! unplug, then a wait until the guest has really released the device, and
//! the host clean-up once it has.
//!
//! The wait listens for libvirt's DEVICE_REMOVED event for the device's
//! alias when the driver has events, and polls the live XML otherwise (see
//! `pending`). An unplug still pending at the deadline is followed in the
//! background, so its clean-up runs when it lands.

use std::time::{Duration, Instant};

use super::pending::{self, Wait};
use super::report;
use super::{pick, DetachState, Hotplug, HotplugError, IDS_ALIAS_PREFIX};
use crate::hypervisor::{DomainRef, Target};
use crate::nic::{Alias, MacAddr};
use crate::xml::domain::InterfaceView;

impl Hotplug {
    /// Detaches a NIC by MAC (alias disambiguates) and waits until the
    /// guest has really released it.
    pub async fn detach(
        &self,
        vm: &str,
        mac: &MacAddr,
        alias: Option<&Alias>,
        timeout: Option<Duration>,
    ) -> Result<DetachState, HotplugError> {
        self.detach_keeping(vm, mac, alias, timeout, false).await
    }

    /// [`Hotplug::detach`], with the per-call keep-bridge flag: `true`
    /// keeps the NIC's bridge and segment device even when nothing uses
    /// them any more (CloudStack's UnPlugNic for persistent networks),
    /// beside the static `keep_bridges` list.
    pub async fn detach_keeping(
        &self,
        vm: &str,
        mac: &MacAddr,
        alias: Option<&Alias>,
        timeout: Option<Duration>,
        keep_bridge: bool,
    ) -> Result<DetachState, HotplugError> {
        self.under_lock(vm, |uuid| async move {
            self.detach_locked(&uuid, mac, alias, timeout, true, keep_bridge)
                .await
        })
        .await
    }

    /// The body of [`Hotplug::detach`]; the caller holds the VM's lock.
    /// `host_cleanup` false keeps the bridge (and IDS flags) as they are,
    /// for a NIC that is about to be attached elsewhere on the same bridge.
    pub(super) async fn detach_locked(
        &self,
        uuid: &str,
        mac: &MacAddr,
        alias: Option<&Alias>,
        timeout: Option<Duration>,
        host_cleanup: bool,
        keep_bridge: bool,
    ) -> Result<DetachState, HotplugError> {
        let timeout = timeout.unwrap_or(self.cfg.detach_timeout);
        let dom = self.lookup(uuid).await?;
        // A NIC libvirt lost is invisible to the checks below: remove it
        // first, or this detach would answer ALREADY_ABSENT for a NIC the
        // guest still has.
        self.settle(&dom).await?;
        let (live, config) = self.views(&dom).await?;
        let mac_s = mac.to_string();
        let in_live = match &live {
            Some(v) => pick(v, &mac_s, alias, &dom.name)?,
            None => None,
        };
        let in_config = match &config {
            Some(v) => pick(v, &mac_s, alias, &dom.name)?,
            None => None,
        };
        if in_live.is_none() && in_config.is_none() {
            // An unplug that timed out earlier has landed since; its host
            // clean-up is still due if the background watch has not run it.
            for p in self.pending_take_mac(&dom.uuid, &mac_s) {
                if p.host_cleanup && host_cleanup {
                    self.host_after_detach(&p.nic, keep_bridge || p.keep_bridge)
                        .await;
                }
            }
            return Ok(DetachState::AlreadyAbsent);
        }

        // CONFIG first: removing the persistent definition is instant and
        // certain, while the live unplug depends on the guest. If the guest
        // never acks, the NIC must not come back at the next boot.
        let mut config_removed: Option<String> = None;
        if let Some(iface) = &in_config {
            // Keep the persistent definition's own element, verbatim, to put
            // it back if the live half then fails.
            let d = dom.clone();
            let config_xml = self.blocking(move |hv| hv.xml(&d, Target::Config)).await?;
            let xml = report::detach_xml(iface);
            let d = dom.clone();
            let x = xml.clone();
            self.blocking(move |hv| hv.detach(&d, &x, Target::Config))
                .await
                .map_err(|e| self.unsupported("detach", e))?;
            config_removed = report::interface_snippet(&config_xml, &mac_s);
        }

        let Some(iface) = in_live else {
            return Ok(DetachState::Removed);
        };
        let key = pending::key(&dom.uuid, &iface, &mac_s);
        let already_pending = self.is_pending(&key);
        // Subscribe before the unplug request: a guest that acks at once is
        // announced while libvirt's detach call is still returning. Events
        // need the device's alias; libvirt gives every live device one.
        let events = iface
            .alias
            .as_ref()
            .and_then(|_| self.hv.events())
            .map(|h| h.subscribe());
        // The wait is counted from here, before the unplug request: libvirt
        // itself blocks about 5 s on a guest that cannot ack (paused), and a
        // caller's timeout_ms must bound the whole wait it sees.
        let start = Instant::now();
        if !already_pending {
            let xml = report::detach_xml(&iface);
            let d = dom.clone();
            if let Err(e) = self
                .blocking(move |hv| hv.detach(&d, &xml, Target::Live))
                .await
            {
                // Put the config half back so the VM stays consistent.
                self.restore_config(&dom, config_removed).await;
                return Err(self.unsupported("detach", e));
            }
            self.pending_insert(
                key.clone(),
                pending::Pending::new(mac_s.clone(), iface.clone(), host_cleanup)
                    .keeping_bridge(keep_bridge),
            );
        } else {
            tracing::info!(vm = %dom.name, mac = %mac_s, "unplug already pending; waiting on it (asked again only on its schedule)");
        }

        let deadline = tokio::time::Instant::from_std(start + timeout);
        let end = match events {
            // A pending unplug's state was read before the subscription:
            // read it once more now that nothing can be missed.
            Some(rx) => {
                self.wait_by_events(&dom, &key, &mac_s, rx, deadline, already_pending)
                    .await?
            }
            None => self.wait_by_polling(&dom, &key, &mac_s, deadline).await?,
        };
        match end {
            Wait::Removed => {
                self.pending_take(&key);
                if host_cleanup {
                    self.host_after_detach(&iface, keep_bridge).await;
                }
                Ok(DetachState::Removed)
            }
            Wait::Refused => {
                // Nothing is pending any more: the guest said no, and the
                // NIC stays. Its persistent definition comes back with it.
                self.pending_take(&key);
                self.restore_config(&dom, config_removed).await;
                Err(HotplugError::DetachRefused {
                    mac: mac_s,
                    vm: dom.name.clone(),
                    alias: key.1,
                })
            }
            Wait::TimedOut(rx) => {
                // The clean-up runs when the removal lands, without waiting
                // for the caller to retry.
                self.watch_pending(&dom, key, rx);
                Err(HotplugError::DetachPending {
                    mac: mac_s,
                    vm: dom.name.clone(),
                    waited_ms: start.elapsed().as_millis() as u64,
                })
            }
        }
    }

    /// Puts back a NIC's persistent definition removed by this detach,
    /// when its live half did not go.
    pub(super) async fn restore_config(&self, dom: &DomainRef, config_removed: Option<String>) {
        let Some(cx) = config_removed else { return };
        let d = dom.clone();
        if let Err(u) = self
            .blocking(move |hv| hv.attach(&d, &cx, Target::Config))
            .await
        {
            tracing::warn!(vm = %dom.name, error = %u, "undo: re-adding config NIC failed");
        }
    }

    /// Host clean-up once a NIC has really left: remove the IDS mirror of
    /// an OVS sensor, restore a Linux bridge's flags when the last IDS NIC
    /// on it is gone, and collect an agent-made VLAN/VXLAN bridge nothing
    /// uses any more. Failures are logged: the NIC is gone, which is what
    /// the operator asked for. `keep_bridge` skips only the bridge
    /// collection.
    pub(crate) async fn host_after_detach(&self, nic: &InterfaceView, keep_bridge: bool) {
        let Some(host) = &self.host else { return };
        let Some(bridge) = nic
            .source
            .as_deref()
            .and_then(|b| crate::nic::BridgeName::try_from(b).ok())
        else {
            return;
        };
        let ovs = nic.virtualport.as_deref() == Some("openvswitch");
        if nic
            .alias
            .as_deref()
            .is_some_and(|a| a.starts_with(IDS_ALIAS_PREFIX))
        {
            if ovs {
                if let Some(tap) = &nic.target {
                    let r = match host.objects().lock(&[bridge.as_str()]).await {
                        Ok(_g) => {
                            host.ovs_mirror_remove(&bridge, &crate::host::mirror_name(tap))
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = r {
                        tracing::warn!(%bridge, error = %e, "removing IDS mirror failed");
                    }
                }
            } else if let Err(e) = self.restore_ids_if_unused(&bridge).await {
                tracing::warn!(%bridge, error = %e, "restoring bridge flags failed");
            }
        }
        if !ovs {
            // The mirror set follows the ports: a gone sensor's filters go,
            // and a gone port's filters went with it.
            self.ids_sync_if_tracked(&bridge).await;
        }
        if keep_bridge {
            tracing::info!(%bridge, "bridge kept: the caller asked for keep_bridge");
        } else if !ovs {
            if let Err(e) = self.collect_bridge(&bridge).await {
                tracing::warn!(%bridge, error = %e, "bridge clean-up failed");
            }
        }
    }
}
