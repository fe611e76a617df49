//! Unplugs the guest has not finished yet.
//!
//! A live detach only *asks* the guest; the device leaves when the guest
//! acks, which a paused or hung guest never does in time. Such a detach
//! answers PENDING and its unplug is remembered here, keyed by (domain
//! UUID, device alias): the alias names one device for its whole life,
//! while CloudStack reuses MACs, so a MAC can name a new NIC while the old
//! one's unplug is still pending.
//!
//! A retried detach waits on the pending unplug instead of sending a second
//! device_del at once. A guest can lose the request, though: Linux clears
//! the ACPI hot-plug status while it boots, so a request sent before that
//! is never seen (the lab shows it), and an event raised while the guest
//! still handles the one before can be missed. QEMU lets a request be
//! repeated once the first is no longer fresh (the lab: a request lost at
//! boot, repeated after it, removed the NIC at once), and refuses a repeat
//! while it still counts one as under way ("already in the process of
//! unplug"; on native PCIe a second press of the attention button within
//! 5 s would cancel the unplug). So an unplug that a *running* guest has sat
//! on for `unplug_retry` (10 s, more than a Linux guest's 5 s PCIe blink)
//! is asked for again, up to [`MAX_ASKS`] requests in all, like nova's
//! `device_detach_attempts`. Time paused does not count: such a guest could
//! not have acted. Every waiter (the detach's own wait, a retried detach,
//! the background watch) holds the VM's lock when it asks, so the schedule
//! is the unplug's, not each waiter's.
//!
//! And the unplug's host clean-up (the agent-made bridge, the
//! IDS state) must run when the removal really lands, not only when a
//! caller retries: so every PENDING starts a background watch that ends on
//! DEVICE_REMOVED for the alias, or, without events, on a re-check that
//! finds the device gone. Whoever takes the entry out of the map (the
//! watch, a retried detach, or [`Hotplug::forget_pending`]) owns the
//! clean-up, so it runs once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;

use super::{report, Hotplug, HotplugError};
use crate::hypervisor::{DomainRef, HvEvent, Lifecycle, RunState, Target};
use crate::xml::domain::{DomainView, InterfaceView};

/// With events, the watch still reads the domain this often: an event can
/// be lost without a reconnect being noticed (a libvirtd restart between
/// two health probes).
const SAFETY_RECHECK: Duration = Duration::from_secs(30);

/// The default `unplug_retry`.
pub const DEFAULT_UNPLUG_RETRY: Duration =
    Duration::from_millis(crate::config::DEFAULT_UNPLUG_RETRY_MS);

/// Unplug requests sent for one device at most, the first included.
pub const MAX_ASKS: u32 = 8;

/// How long libvirt's detach call itself may block, waiting for QEMU's
/// DEVICE_DELETED before it returns with the unplug still in progress.
/// A detach's own wait asks again only with this much time left, so that
/// the request does not stretch the caller's deadline.
const LIBVIRT_UNPLUG_WAIT: Duration = Duration::from_secs(5);

/// (domain UUID, device alias; `mac:<MAC>` for a device without one).
pub(super) type Key = (String, String);

/// One unplug sent to a guest and not yet seen to complete.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// The NIC's MAC.
    pub mac: String,
    /// The NIC as it was in the live XML, for the host clean-up.
    pub nic: InterfaceView,
    /// Whether the host clean-up runs when it lands (false for a move,
    /// whose NIC goes to another VM on the same bridge).
    pub host_cleanup: bool,
    /// The caller asked to keep the bridge and its segment device
    /// (DetachNicRequest.keep_bridge); IDS clean-up still runs.
    pub keep_bridge: bool,
    /// Whether a background watch already follows it.
    watched: bool,
    /// When the guest was last asked, or last seen unable to act (paused):
    /// the start of the time it has had to act on the request.
    asked: Instant,
    /// Unplug requests sent so far.
    asks: u32,
}

impl Pending {
    /// This pending unplug, keeping its bridge when it lands.
    pub(super) fn keeping_bridge(mut self, keep_bridge: bool) -> Self {
        self.keep_bridge = keep_bridge;
        self
    }

    pub(super) fn new(mac: String, nic: InterfaceView, host_cleanup: bool) -> Self {
        Pending {
            mac,
            nic,
            host_cleanup,
            keep_bridge: false,
            watched: false,
            asked: Instant::now(),
            asks: 1,
        }
    }
}

/// The key of a live NIC.
pub(super) fn key(uuid: &str, nic: &InterfaceView, mac: &str) -> Key {
    (
        uuid.to_string(),
        nic.alias.clone().unwrap_or_else(|| format!("mac:{mac}")),
    )
}

static POLL_READS: AtomicU64 = AtomicU64::new(0);

/// How many times a detach (or a pending watch) read the live XML to see
/// whether a device was gone. Zero while events flow.
pub fn detach_poll_reads() -> u64 {
    POLL_READS.load(Ordering::Relaxed)
}

/// How a wait for an unplug ended.
pub(super) enum Wait {
    /// The device left the live domain.
    Removed,
    /// The guest refused (DEVICE_REMOVAL_FAILED).
    Refused,
    /// The deadline passed; the receiver, when events were used, goes on
    /// to the background watch so that nothing published meanwhile is lost.
    TimedOut(Option<broadcast::Receiver<HvEvent>>),
}

impl Hotplug {
    fn pending_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Key, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn is_pending(&self, key: &Key) -> bool {
        self.pending_lock().contains_key(key)
    }

    pub(super) fn pending_insert(&self, key: Key, p: Pending) {
        self.pending_lock().insert(key, p);
    }

    pub(super) fn pending_take(&self, key: &Key) -> Option<Pending> {
        self.pending_lock().remove(key)
    }

    /// Takes every pending unplug of a VM's NIC with this MAC.
    pub(super) fn pending_take_mac(&self, uuid: &str, mac: &str) -> Vec<Pending> {
        let mut g = self.pending_lock();
        let keys: Vec<Key> = g
            .iter()
            .filter(|((u, _), p)| u == uuid && p.mac.eq_ignore_ascii_case(mac))
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| g.remove(k)).collect()
    }

    /// Forgets the pending unplugs of a VM's NICs with this MAC, without
    /// clean-up. For the attach path: once a NIC with that MAC has been
    /// attached to the VM again (CloudStack reuses MACs), an old unplug
    /// must neither make a later detach skip its device_del nor clean up
    /// the host side the new NIC uses.
    pub fn forget_pending(&self, vm_uuid: &str, mac: &str) {
        let gone = self.pending_take_mac(vm_uuid, mac);
        if !gone.is_empty() {
            tracing::info!(vm = %vm_uuid, %mac, n = gone.len(), "forgot pending unplugs of a MAC attached again");
        }
    }

    /// Whether the NIC with this key has left the live domain: the domain
    /// is gone or not running, or its live XML no longer has the device.
    /// Counted as a poll read.
    pub(super) async fn device_gone(
        &self,
        dom: &DomainRef,
        key: &Key,
        mac: &str,
    ) -> Result<bool, HotplugError> {
        POLL_READS.fetch_add(1, Ordering::Relaxed);
        let now = match self.lookup(&dom.uuid).await {
            Err(HotplugError::VmNotFound(_)) => return Ok(true),
            other => other?,
        };
        if !now.state.is_live() {
            return Ok(true);
        }
        self.gone_from(&now, key, mac).await
    }

    /// Whether the live XML of this (live) domain no longer has the device.
    async fn gone_from(&self, now: &DomainRef, key: &Key, mac: &str) -> Result<bool, HotplugError> {
        let v = match self.view(now, Target::Live).await {
            Err(HotplugError::VmNotFound(_)) => return Ok(true),
            other => other?,
        };
        Ok(!holds(&v, key, mac))
    }

    /// When the pending unplug with this key is next due to be asked for
    /// again; `None` when it never will be: asking again is off, the
    /// requests are used up, or nothing is pending.
    fn next_ask(&self, key: &Key) -> Option<Instant> {
        if self.cfg.unplug_retry.is_zero() {
            return None;
        }
        let g = self.pending_lock();
        let p = g.get(key)?;
        (p.asks < MAX_ASKS).then(|| p.asked + self.cfg.unplug_retry)
    }

    /// Whether the pending unplug with this key is due to be asked again.
    fn ask_due(&self, key: &Key) -> bool {
        self.next_ask(key).is_some_and(|t| Instant::now() >= t)
    }

    /// [`Hotplug::next_ask`] for a detach's own wait, which ends at
    /// `deadline`: only a request that leaves libvirt's own wait before the
    /// deadline. A later one is the background watch's.
    fn ask_in_time(&self, key: &Key, deadline: Instant) -> Option<Instant> {
        self.next_ask(key)
            .map(|t| t.max(Instant::now()))
            .filter(|t| *t + LIBVIRT_UNPLUG_WAIT <= deadline)
    }

    /// When the background watch, with events, wakes up next: for the
    /// safety re-check, or sooner to ask again.
    fn watch_wake(&self, key: &Key) -> Instant {
        let recheck = Instant::now() + SAFETY_RECHECK;
        self.next_ask(key)
            .map_or(recheck, |t| t.max(Instant::now()).min(recheck))
    }

    /// Restarts the time the guest has to act on the request; `sent`
    /// counts a request sent now. Returns the requests sent so far.
    fn restart_clock(&self, key: &Key, sent: bool) -> u32 {
        let mut g = self.pending_lock();
        let Some(p) = g.get_mut(key) else { return 0 };
        p.asked = Instant::now();
        p.asks += u32::from(sent);
        p.asks
    }

    /// Asks the guest again to release the device when the request is
    /// due (see the module's comment). The caller holds the VM's lock.
    /// True when the device was seen gone on the way; every other outcome,
    /// a failed request included, only restarts the clock, so that a
    /// libvirt that keeps failing is not asked in a loop.
    pub(super) async fn ask_again_if_due(&self, dom: &DomainRef, key: &Key) -> bool {
        if !self.ask_due(key) {
            return false;
        }
        let Some(p) = self.pending_lock().get(key).cloned() else {
            return false;
        };
        self.restart_clock(key, false);
        POLL_READS.fetch_add(1, Ordering::Relaxed);
        let now = match self.lookup(&dom.uuid).await {
            Err(HotplugError::VmNotFound(_)) => return true,
            Err(e) => {
                tracing::debug!(vm = %dom.name, error = %e, "cannot read the domain to ask again for an unplug");
                return false;
            }
            Ok(d) => d,
        };
        match now.state {
            RunState::Running => {}
            // Paused (or suspended): the clock restarted above, so the
            // guest gets the whole interval once it runs again.
            s if s.is_live() => return false,
            _ => return true,
        }
        match self.gone_from(&now, key, &p.mac).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(vm = %dom.name, error = %e, "cannot read the domain to ask again for an unplug");
                return false;
            }
        }
        let xml = report::detach_xml(&p.nic);
        let d = now.clone();
        let res = self
            .blocking(move |hv| hv.detach(&d, &xml, Target::Live))
            .await;
        // Counted from the answer: libvirt may have waited for the guest.
        let asks = self.restart_clock(key, true);
        match res {
            Ok(()) => {
                tracing::info!(vm = %dom.name, mac = %p.mac, alias = %key.1, request = asks, of = MAX_ASKS, "the running guest still holds the NIC; asked it again to release it")
            }
            // QEMU refuses a repeat while it counts the first as under
            // way ("already in the process of unplug", or "guest is busy"
            // on a PCIe slot): the next due time asks once more.
            Err(e) => {
                tracing::info!(vm = %dom.name, mac = %p.mac, alias = %key.1, request = asks, of = MAX_ASKS, error = %e, "asking the guest again to release the NIC failed; waiting on")
            }
        }
        false
    }

    /// Waits for the unplug by events, until `deadline`. `reread` reads
    /// the domain once first: needed when the state was read before the
    /// subscription was made (a retried, already pending unplug). A
    /// reconnect, a lagging receiver or the domain stopping read it once
    /// more; a subscription that is gone falls back to polling.
    pub(super) async fn wait_by_events(
        &self,
        dom: &DomainRef,
        key: &Key,
        mac: &str,
        mut rx: broadcast::Receiver<HvEvent>,
        deadline: tokio::time::Instant,
        mut reread: bool,
    ) -> Result<Wait, HotplugError> {
        loop {
            if reread {
                reread = false;
                if self.hv.events().is_none() {
                    return self.wait_by_polling(dom, key, mac, deadline).await;
                }
                if self.device_gone(dom, key, mac).await.unwrap_or(false) {
                    return Ok(Wait::Removed);
                }
            }
            let ask = self.ask_in_time(key, deadline);
            match tokio::time::timeout_at(ask.unwrap_or(deadline), rx.recv()).await {
                Err(_) if ask.is_some() => {
                    if self.ask_again_if_due(dom, key).await {
                        return Ok(Wait::Removed);
                    }
                }
                Err(_) => return Ok(Wait::TimedOut(Some(rx))),
                Ok(Ok(ev)) => match about(&ev, key) {
                    Seen::Removed => return Ok(Wait::Removed),
                    Seen::Refused => return Ok(Wait::Refused),
                    Seen::LookAgain => reread = true,
                    Seen::Other => {}
                },
                Ok(Err(RecvError::Lagged(n))) => {
                    tracing::debug!(missed = n, "event receiver lagged; reading the domain");
                    reread = true;
                }
                Ok(Err(RecvError::Closed)) => {
                    return self.wait_by_polling(dom, key, mac, deadline).await
                }
            }
        }
    }

    /// Waits for the unplug by reading the live XML every poll interval:
    /// for drivers without events.
    pub(super) async fn wait_by_polling(
        &self,
        dom: &DomainRef,
        key: &Key,
        mac: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Wait, HotplugError> {
        loop {
            // A due request reads the domain itself: no second read.
            let ask = self
                .ask_in_time(key, deadline)
                .is_some_and(|t| Instant::now() >= t);
            let gone = if ask {
                self.ask_again_if_due(dom, key).await
            } else {
                self.device_gone(dom, key, mac).await.unwrap_or(false)
            };
            if gone {
                return Ok(Wait::Removed);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Wait::TimedOut(None));
            }
            tokio::time::sleep(self.cfg.poll_interval).await;
        }
    }

    /// Follows a pending unplug in the background until it lands, then
    /// runs its host clean-up. At most one watch per unplug.
    pub(super) fn watch_pending(
        &self,
        dom: &DomainRef,
        key: Key,
        rx: Option<broadcast::Receiver<HvEvent>>,
    ) {
        {
            let mut g = self.pending_lock();
            match g.get_mut(&key) {
                Some(p) if !p.watched => p.watched = true,
                _ => return,
            }
        }
        let me = self.share();
        let dom = dom.clone();
        tokio::spawn(async move { me.pending_watch(dom, key, rx).await });
    }

    async fn pending_watch(
        self,
        dom: DomainRef,
        key: Key,
        mut rx: Option<broadcast::Receiver<HvEvent>>,
    ) {
        loop {
            let mut removed = false;
            match rx.as_mut() {
                Some(r) => match tokio::time::timeout_at(self.watch_wake(&key), r.recv()).await {
                    Ok(Ok(ev)) => match about(&ev, &key) {
                        Seen::Removed => removed = true,
                        Seen::Refused => {
                            // The guest said no: nothing is pending any
                            // more, and the NIC stays. A new DetachNic
                            // sends a new request.
                            if self.pending_take(&key).is_some() {
                                tracing::warn!(vm = %dom.name, alias = %key.1, "guest refused a pending unplug; the NIC stays");
                            }
                            return;
                        }
                        Seen::LookAgain => {}
                        Seen::Other => continue,
                    },
                    Ok(Err(RecvError::Lagged(_))) | Err(_) => {}
                    Ok(Err(RecvError::Closed)) => rx = None,
                },
                None => tokio::time::sleep(self.cfg.pending_recheck).await,
            }
            if !self.is_pending(&key) {
                return;
            }
            // The VM lock orders this clean-up with requests on the VM: a
            // retried detach that finishes the unplug itself, or an attach
            // of the same MAC that forgets it.
            let _guard = match self.locks.lock(&dom).await {
                Ok(g) => g,
                // Requests fill the VM's queue; one of them may finish the
                // unplug itself. Look again at the next wake-up.
                Err(_) => continue,
            };
            let Some(p) = self.pending_lock().get(&key).cloned() else {
                return;
            };
            if !removed {
                // A due request reads the domain itself: no second read.
                let gone = if self.ask_due(&key) {
                    Ok(self.ask_again_if_due(&dom, &key).await)
                } else {
                    self.device_gone(&dom, &key, &p.mac).await
                };
                match gone {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::debug!(vm = %dom.name, error = %e, "re-check of a pending unplug failed; trying again later");
                        continue;
                    }
                }
            }
            if self.pending_take(&key).is_none() {
                return;
            }
            tracing::info!(vm = %dom.name, mac = %p.mac, alias = %key.1, host_cleanup = p.host_cleanup, "pending unplug landed");
            if p.host_cleanup {
                self.host_after_detach(&p.nic, p.keep_bridge).await;
            }
            return;
        }
    }
}

/// Whether a live view still has the device with this key. The alias
/// names the device; the MAC confirms it (a fake or an old libvirt may
/// repeat an alias across NICs).
fn holds(v: &DomainView, key: &Key, mac: &str) -> bool {
    let mut same_mac = v.interface_by_mac(mac).into_iter();
    match key.1.strip_prefix("mac:") {
        Some(_) => same_mac.next().is_some(),
        None => same_mac.any(|i| i.alias.as_deref() == Some(key.1.as_str())),
    }
}

enum Seen {
    Removed,
    Refused,
    LookAgain,
    Other,
}

/// What an event means for the unplug with this key.
fn about(ev: &HvEvent, key: &Key) -> Seen {
    let (uuid, alias) = (key.0.as_str(), key.1.as_str());
    match ev {
        HvEvent::DeviceRemoved { uuid: u, alias: a } if u == uuid && a == alias => Seen::Removed,
        HvEvent::DeviceRemovalFailed { uuid: u, alias: a } if u == uuid && a == alias => {
            Seen::Refused
        }
        // The domain stopped: its live devices are gone with it.
        HvEvent::Lifecycle {
            uuid: u,
            event: Lifecycle::Stopped | Lifecycle::Crashed | Lifecycle::Undefined,
            ..
        } if u == uuid => Seen::LookAgain,
        // Events may have been lost while the connection was down.
        HvEvent::Resubscribed => Seen::LookAgain,
        _ => Seen::Other,
    }
}
