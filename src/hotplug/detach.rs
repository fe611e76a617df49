//! The detach transaction: the persistent definition first, then the live
//! unplug, then a wait until the guest has really released the device, and
//! the host clean-up once it has.

use std::time::{Duration, Instant};

use super::report;
use super::{named, pick, DetachState, Hotplug, HotplugError, IDS_ALIAS_PREFIX};
use crate::hypervisor::Target;
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
        let first = self.lookup(vm).await?;
        let _guard = self.locks.lock(&first).await?;
        self.detach_locked(&first.uuid, mac, alias, timeout, true)
            .await
            .map_err(|e| named(e, &first))
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
            self.pending_remove(&dom.uuid, &mac_s);
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
        let removed = iface.clone();
        let key = (dom.uuid.clone(), mac_s.clone());
        let already_pending = self
            .pending
            .lock()
            .map(|p| p.contains(&key))
            .unwrap_or(false);
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
                if let Some(cx) = config_removed {
                    let d = dom.clone();
                    if let Err(u) = self
                        .blocking(move |hv| hv.attach(&d, &cx, Target::Config))
                        .await
                    {
                        tracing::warn!(vm = %dom.name, error = %u, "undo: re-adding config NIC failed");
                    }
                }
                return Err(self.unsupported("detach", e));
            }
            if let Ok(mut p) = self.pending.lock() {
                p.insert(key.clone());
            }
        } else {
            tracing::info!(vm = %dom.name, mac = %mac_s, "unplug already pending; waiting without a second device_del");
        }

        loop {
            let v = self.view(&dom, Target::Live).await;
            let gone = match &v {
                Ok(v) => v.interface_by_mac(&mac_s).is_empty(),
                // The domain stopped: its live NICs are gone with it.
                Err(HotplugError::VmNotFound(_)) => true,
                Err(_) => false,
            };
            if gone {
                self.pending_remove(&dom.uuid, &mac_s);
                if host_cleanup {
                    self.host_after_detach(&removed).await;
                }
                return Ok(DetachState::Removed);
            }
            if start.elapsed() >= timeout {
                return Err(HotplugError::DetachPending {
                    mac: mac_s,
                    vm: dom.name.clone(),
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            tokio::time::sleep(self.cfg.poll_interval).await;
        }
    }

    /// Host clean-up once a NIC has really left: restore the bridge's flags
    /// when the last IDS NIC on it is gone, and remove an agent-created
    /// VLAN/VXLAN bridge with no ports left. Failures are logged: the NIC is
    /// gone, which is what the operator asked for.
    async fn host_after_detach(&self, nic: &InterfaceView) {
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
                    if let Err(e) = host
                        .ovs_mirror_remove(&bridge, &crate::host::mirror_name(tap))
                        .await
                    {
                        tracing::warn!(%bridge, error = %e, "removing IDS mirror failed");
                    }
                }
            } else {
                match self.ids_count(bridge.as_str()).await {
                    Ok(0) => match host.saved_promisc_state(&bridge).await {
                        Ok(Some(orig)) => {
                            if let Err(e) = host.promisc_restore(&bridge, orig).await {
                                tracing::warn!(%bridge, error = %e, "restoring bridge flags failed");
                            } else {
                                tracing::info!(%bridge, "last IDS NIC left; bridge flags restored");
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(%bridge, error = %e, "reading saved bridge flags failed")
                        }
                    },
                    Ok(n) => tracing::info!(%bridge, ids_nics = n, "bridge stays promiscuous"),
                    Err(e) => tracing::warn!(%bridge, error = %e, "counting IDS NICs failed"),
                }
            }
        }
        if !ovs {
            match host
                .remove_bridge_if_unused(&bridge, &self.cfg.keep_bridges)
                .await
            {
                Ok(true) => {
                    tracing::info!(%bridge, "removed agent-created bridge with no ports left")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(%bridge, error = %e, "bridge clean-up failed"),
            }
        }
    }
}
