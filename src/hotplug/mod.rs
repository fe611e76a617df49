//! Attach and detach as transactions.
//!
//! An attach is planned against a fresh read of the domain (idempotency by
//! MAC, PCI capacity, NIC limit, queue bounds), then applied step by step.
//! Every step that changes something pushes its undo onto a stack that runs
//! in reverse when a later step fails, so a failed attach leaves neither a
//! half-attached NIC nor host links behind. After success the live domain is
//! read again and the report says what libvirt really did.
//!
//! All libvirt calls run on tokio's blocking pool; work on one domain is
//! serialised by [`locks::VmLocks`], different domains run in parallel.
//!
//! Every libvirt call has a deadline ([`HotplugConfig::call_timeout`]); a
//! call that outlives it leaves its VM "in doubt" (see `doubt`).
//!
//! One file per transaction: `attach`, `detach`, `update`, `moves`, plus
//! `ghosts` (NICs QEMU holds but libvirt lost), `pending` (unplugs the
//! guest has not finished yet) and `doubt` (calls past their deadline).
//! This file holds what they share: domain lookups and views, the undo
//! runner, and the engine itself.

mod antispoof;
mod attach;
mod detach;
mod doubt;
mod error;
mod ghosts;
pub mod locks;
mod moves;
mod pending;
pub mod replug;
pub(crate) mod report;
mod update;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use error::HotplugError;
pub use moves::MoveOutcome;
pub use pending::detach_poll_reads;
pub use report::{NicReport, VmReport};
pub use update::{BandwidthChange, NicUpdate};

use crate::config::AntiSpoofing;
use crate::host::objects::{decide_removal, Intent, IntentRecord, Removal, Usage};
use crate::host::{HostNet, HostUndo};
use crate::hypervisor::{DomainRef, HvErrorKind, Hypervisor, Target};
use crate::nic::{Alias, BridgeName, BridgePattern};
use crate::pci::{self, Capacity};
use crate::xml::domain::{DomainView, InterfaceView};

/// How long undo and read-back keep retrying while libvirtd restarts.
const RECONNECT_GRACE: Duration = Duration::from_secs(15);

/// Tunables for hot-plug, from the agent's configuration.
#[derive(Debug, Clone)]
pub struct HotplugConfig {
    /// Upper bound for the default virtio queue count (default queues are
    /// min(vCPUs, cap)).
    pub queue_cap: u16,
    /// Per-VM NIC limit; `None` means no limit beyond PCI capacity.
    pub nic_limit: Option<u32>,
    /// Whether /dev/vhost-net exists on this host (for `vhost=auto`).
    pub vhost_net_present: bool,
    /// Default time to wait for a guest to release a NIC.
    pub detach_timeout: Duration,
    /// How often the live XML is polled while waiting for an unplug.
    pub poll_interval: Duration,
    /// Raise a bridge's MTU (undoably) instead of refusing a larger NIC MTU.
    pub raise_bridge_mtu: bool,
    /// Bridges never removed on detach, like CloudStack's persistent networks.
    pub keep_bridges: Vec<String>,
    /// Bridges on which promiscuous (IDS) NICs are refused.
    pub forbid_promisc: Vec<String>,
    /// An agent-made bridge that was made or lost its last port less than
    /// this long ago is not removed (cloudstack-agent may be about to use
    /// it); the reconcile collects it later. Zero removes at once.
    pub bridge_grace: Duration,
    /// Deadline of one libvirt call. Past it the caller gets UNAVAILABLE
    /// and the VM is in doubt until the call returns. Longer than the
    /// ~5 s libvirt itself blocks in a detach from a guest that cannot ack.
    pub call_timeout: Duration,
    /// How often a timed-out unplug is checked in the background when the
    /// driver has no events (with events, DEVICE_REMOVED ends it).
    pub pending_recheck: Duration,
    /// How long a running guest may hold a NIC after an unplug request
    /// before it is asked again (see `pending`); zero never asks again.
    pub unplug_retry: Duration,
    /// Bridges NICs may use: both the bridge a request names and the
    /// bridge the NIC finally lands on must match one of these.
    pub allow_bridges: Vec<BridgePattern>,
    /// Bridges an IDS (promiscuous) NIC may land on.
    pub allow_promisc_bridges: Vec<BridgePattern>,
    /// Requests that may wait for one VM behind the running one; more are
    /// RESOURCE_EXHAUSTED.
    pub vm_queue_limit: usize,
    /// Who enforces anti-spoofing on NICs that ask for it.
    pub anti_spoofing: AntiSpoofing,
    /// CloudStack's security-group script; under `auto`, its presence
    /// leaves anti-spoofing to cloudstack-agent.
    pub cloudstack_sg_script: std::path::PathBuf,
    /// What the kernel lets libvirt do to a running guest's `<bandwidth>`,
    /// probed once beside start-up; the default (not probed) refuses nothing.
    pub tc: crate::host::tc::TcProbe,
    /// libvirt makes real host taps for bridge NICs (every driver but the
    /// test driver, also with host networking off): `tx_queue_len` needs
    /// one. Off by default, so an engine nobody configured refuses it.
    pub real_taps: bool,
}

fn any_bridge() -> BridgePattern {
    // "*" is a valid pattern by construction; `unwrap_or_else` only keeps
    // the library free of panicking calls.
    BridgePattern::try_from("*").unwrap_or_else(|e| unreachable!("{e}"))
}

impl Default for HotplugConfig {
    fn default() -> Self {
        HotplugConfig {
            queue_cap: 8,
            nic_limit: None,
            vhost_net_present: std::path::Path::new("/dev/vhost-net").exists(),
            detach_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
            raise_bridge_mtu: false,
            keep_bridges: Vec::new(),
            forbid_promisc: Vec::new(),
            bridge_grace: Duration::from_secs(60),
            call_timeout: Duration::from_secs(10),
            pending_recheck: Duration::from_secs(2),
            unplug_retry: pending::DEFAULT_UNPLUG_RETRY,
            allow_bridges: vec![any_bridge()],
            allow_promisc_bridges: vec![any_bridge()],
            vm_queue_limit: locks::DEFAULT_QUEUE_LIMIT,
            anti_spoofing: AntiSpoofing::Auto,
            cloudstack_sg_script: crate::config::CLOUDSTACK_SG_SCRIPT.into(),
            tc: crate::host::tc::TcProbe::default(),
            real_taps: false,
        }
    }
}

/// What an attach did.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachOutcome {
    /// The NIC as libvirt reports it after the change.
    pub nic: NicReport,
    /// True when nothing had to be done (idempotent retry).
    pub already_present: bool,
    /// Which definitions were changed by this call.
    pub applied: Vec<Target>,
    /// Decisions the caller should know about, e.g. anti-spoofing left to
    /// cloudstack-agent on this host.
    pub notes: Vec<String>,
}

/// The final state of a detach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachState {
    /// The guest released the NIC; it is gone from the live domain.
    Removed,
    /// No NIC with that MAC was attached.
    AlreadyAbsent,
}

/// A single undo step of the attach transaction.
enum Undo {
    Device {
        target: Target,
        xml: String,
    },
    Host(HostUndo),
    /// An intent on a shared bridge; undone by dropping it, after which the
    /// bridge is collected if this attach had created links on it.
    Intent(Intent),
}

/// The hot-plug engine: one per agent, shared by all requests.
pub struct Hotplug {
    hv: Arc<dyn Hypervisor>,
    pub(crate) host: Option<Arc<dyn HostNet>>,
    cfg: HotplugConfig,
    // The state below is behind Arcs so that background work (a pending
    // unplug's clean-up) can run on an engine that shares it; see `share`.
    locks: Arc<locks::VmLocks>,
    /// Unplugs sent to a guest and not yet completed, by (domain UUID,
    /// device alias). A retried detach waits on these instead of sending
    /// its own device_del; the request is repeated only on the schedule in
    /// `pending`, whoever is waiting.
    pending: Arc<Mutex<HashMap<pending::Key, pending::Pending>>>,
    /// VMs (by UUID) whose live attach lost libvirtd mid-call: QEMU may
    /// hold a NIC libvirt never recorded. See `ghosts`.
    suspects: Arc<Mutex<HashSet<String>>>,
    /// Netdevs (by domain UUID) of lost NICs whose unplug a paused or hung
    /// guest had not finished: their device_del is sent, their netdev_del
    /// (which closes the host's tap) is owed. See `ghosts`.
    lost_netdevs: Arc<Mutex<HashMap<String, Vec<String>>>>,
    /// VMs with a libvirt call still outstanding past its deadline.
    doubt: Arc<doubt::InDoubt>,
    /// Whether the anti-spoofing nwfilter was defined in this run; the
    /// lock also serialises the define.
    filter_defined: Arc<tokio::sync::Mutex<bool>>,
}

impl Hotplug {
    /// Builds the engine. `host` is `None` when the agent does not manage
    /// host networking (the embedded test-driver lab).
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        host: Option<Arc<dyn HostNet>>,
        cfg: HotplugConfig,
    ) -> Self {
        Hotplug {
            hv,
            host,
            locks: Arc::new(locks::VmLocks::new(cfg.vm_queue_limit)),
            cfg,
            pending: Arc::default(),
            suspects: Arc::default(),
            lost_netdevs: Arc::default(),
            doubt: Arc::default(),
            filter_defined: Arc::default(),
        }
    }

    /// Another handle on the same engine: same hypervisor, host, locks
    /// and bookkeeping. For background tasks, which need an owned engine.
    fn share(&self) -> Hotplug {
        Hotplug {
            hv: self.hv.clone(),
            host: self.host.clone(),
            cfg: self.cfg.clone(),
            locks: self.locks.clone(),
            pending: self.pending.clone(),
            suspects: self.suspects.clone(),
            lost_netdevs: self.lost_netdevs.clone(),
            doubt: self.doubt.clone(),
            filter_defined: self.filter_defined.clone(),
        }
    }

    /// The hypervisor this engine drives.
    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hv
    }

    /// The engine's configuration.
    pub fn config(&self) -> &HotplugConfig {
        &self.cfg
    }

    /// Runs one libvirt call on the blocking pool, with the call deadline.
    /// Past it the caller gets UNAVAILABLE while the call may still
    /// complete: its VM is in doubt until it has (see `doubt`).
    async fn blocking<T, F>(&self, f: F) -> Result<T, HotplugError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T, crate::hypervisor::HvError> + Send + 'static,
    {
        doubt::run(&self.hv, &self.doubt, self.cfg.call_timeout, f).await
    }

    pub(crate) async fn lookup(&self, vm: &str) -> Result<DomainRef, HotplugError> {
        let name = vm.to_string();
        match self.blocking(move |hv| hv.lookup(&name)).await {
            Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::NotFound => {
                Err(HotplugError::VmNotFound(vm.to_string()))
            }
            // Every request starts with a lookup: a VM in doubt is refused
            // here, before the request waits for its lock.
            Ok(d) => self.doubt.check(&d).map(|_| d),
            other => other,
        }
    }

    /// Runs `op` on a VM under its lock; `op` gets the VM's UUID and reads
    /// the domain again by it.
    ///
    /// A name answered from the hypervisor's cache can be stale: the domain
    /// was undefined and another defined under the same name with a new
    /// UUID (`virsh undefine` and `define`, or a VM re-created by its
    /// orchestrator), and `op` then finds no domain by the old UUID. That
    /// failed lookup drops the stale entry, so the name is resolved afresh,
    /// once, and `op` runs again under the new domain's lock. A VM named by
    /// its UUID, or one that really is gone, answers NOT_FOUND as before.
    pub(crate) async fn under_lock<T, F, Fut>(&self, vm: &str, op: F) -> Result<T, HotplugError>
    where
        // The UUID is passed owned: a future borrowing its argument would
        // not be Send for every lifetime, which the gRPC handlers need.
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, HotplugError>>,
    {
        let first = self.resolve(vm).await?;
        let r = {
            let _guard = self.locks.lock(&first).await?;
            op(first.uuid.clone()).await
        };
        if !matches!(r, Err(HotplugError::VmNotFound(_))) {
            return r.map_err(|e| named(e, &first));
        }
        // Only a name that now resolves to another domain is tried again; a
        // UUID, or a name whose domain is really gone, resolves to the same
        // UUID or to nothing.
        let Some(again) = self.defined_again(vm, &first).await? else {
            return r.map_err(|e| named(e, &first));
        };
        let _guard = self.locks.lock(&again).await?;
        op(again.uuid.clone()).await.map_err(|e| named(e, &again))
    }

    /// The domain `vm` names now, when that is no longer `old` (its name
    /// was defined again with a new UUID); `None` when it still is, or
    /// when `vm` is a UUID. See [`Hotplug::under_lock`].
    pub(crate) async fn defined_again(
        &self,
        vm: &str,
        old: &DomainRef,
    ) -> Result<Option<DomainRef>, HotplugError> {
        let again = self.resolve(vm).await?;
        if again.uuid == old.uuid {
            return Ok(None);
        }
        tracing::info!(vm, old_uuid = %old.uuid, uuid = %again.uuid, "vm was defined again under its name; using the new domain");
        Ok(Some(again))
    }

    /// Name and UUID of a VM, for its lock (see [`Hypervisor::resolve`]):
    /// its state is read again under the lock with [`Hotplug::lookup`], so
    /// the caller must not use `state` or `persistent` of this one. A VM in
    /// doubt is refused here, before the request waits for its lock.
    pub(crate) async fn resolve(&self, vm: &str) -> Result<DomainRef, HotplugError> {
        // Known already: no trip through the blocking pool at all.
        if let Some(d) = self.hv.resolve_cached(vm) {
            return self.doubt.check(&d).map(|_| d);
        }
        let name = vm.to_string();
        match self.blocking(move |hv| hv.resolve(&name)).await {
            Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::NotFound => {
                Err(HotplugError::VmNotFound(vm.to_string()))
            }
            Ok(d) => self.doubt.check(&d).map(|_| d),
            other => other,
        }
    }

    async fn view(&self, dom: &DomainRef, target: Target) -> Result<DomainView, HotplugError> {
        let d = dom.clone();
        let xml = match self.blocking(move |hv| hv.xml(&d, target)).await {
            Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::NotFound => {
                return Err(HotplugError::VmNotFound(dom.name.clone()))
            }
            other => other?,
        };
        tracing::debug!(vm = %dom.name, %target, xml = %xml, "domain xml");
        Ok(DomainView::parse(&xml)?)
    }

    /// The domain read afresh under its lock, with the views of the
    /// definitions that exist, in one trip through the blocking pool: the
    /// start of every attach. A VM suspected of holding NICs libvirt lost is
    /// settled first (see `ghosts`), which may change its live XML, so it
    /// takes the long way.
    pub(crate) async fn fresh_views(
        &self,
        uuid: &str,
    ) -> Result<(DomainRef, Option<DomainView>, Option<DomainView>), HotplugError> {
        if self.is_suspect(uuid) {
            let dom = self.lookup(uuid).await?;
            self.settle(&dom).await?;
            let (live, config) = self.views(&dom).await?;
            return Ok((dom, live, config));
        }
        let id = uuid.to_string();
        let read = self
            .blocking(move |hv| {
                let dom = hv.lookup(&id)?;
                let live = match dom.state.is_live() {
                    true => Some(hv.xml(&dom, Target::Live)?),
                    false => None,
                };
                let config = match dom.persistent {
                    true => Some(hv.xml(&dom, Target::Config)?),
                    false => None,
                };
                Ok((dom, live, config))
            })
            .await;
        let (dom, live, config) = match read {
            Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::NotFound => {
                return Err(HotplugError::VmNotFound(uuid.to_string()))
            }
            other => other?,
        };
        self.doubt.check(&dom)?;
        let parse = |target: Target, xml: Option<String>| -> Result<_, HotplugError> {
            xml.map(|x| {
                tracing::debug!(vm = %dom.name, %target, xml = %x, "domain xml");
                DomainView::parse(&x)
            })
            .transpose()
            .map_err(HotplugError::from)
        };
        let live = parse(Target::Live, live)?;
        let config = parse(Target::Config, config)?;
        Ok((dom, live, config))
    }

    /// Views of the definitions that exist: (live, config).
    pub(crate) async fn views(
        &self,
        dom: &DomainRef,
    ) -> Result<(Option<DomainView>, Option<DomainView>), HotplugError> {
        let live = if dom.state.is_live() {
            Some(self.view(dom, Target::Live).await?)
        } else {
            None
        };
        let config = if dom.persistent {
            Some(self.view(dom, Target::Config).await?)
        } else {
            None
        };
        Ok((live, config))
    }

    /// Every domain on this host.
    pub(crate) async fn domains(&self) -> Result<Vec<DomainRef>, HotplugError> {
        self.blocking(|hv| hv.list()).await
    }

    /// Lists the domains on this host with their NIC counts.
    pub async fn list_vms(&self) -> Result<Vec<VmReport>, HotplugError> {
        let doms = self.blocking(|hv| hv.list()).await?;
        let mut out = Vec::with_capacity(doms.len());
        for d in doms {
            let target = if d.state.is_live() {
                Target::Live
            } else {
                Target::Config
            };
            let v = match self.view(&d, target).await {
                Ok(v) => v,
                Err(HotplugError::VmNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            out.push(VmReport::new(&d, &v));
        }
        Ok(out)
    }

    /// Lists the NICs of one domain, marking which definitions hold each.
    pub async fn list_nics(&self, vm: &str) -> Result<Vec<NicReport>, HotplugError> {
        let dom = self.lookup(vm).await?;
        let (live, config) = self.views(&dom).await?;
        Ok(report::merge(live.as_ref(), config.as_ref()))
    }

    /// PCI capacity of one domain, with the NIC limit applied.
    pub async fn capacity(&self, vm: &str) -> Result<(Capacity, u32, u32), HotplugError> {
        let dom = self.lookup(vm).await?;
        let target = if dom.state.is_live() {
            Target::Live
        } else {
            Target::Config
        };
        let v = self.view(&dom, target).await?;
        let cap = pci::capacity(&v);
        let nics = v.interfaces.len() as u32;
        let attachable = pci::attachable(&cap, nics, self.cfg.nic_limit);
        Ok((cap, nics, attachable))
    }

    /// Runs undo steps in reverse. An undo failure is logged, not returned:
    /// the caller reports the original error.
    ///
    /// Links this attach created and the IDS state it set are shared
    /// objects: another VM's attach may have started using them meanwhile.
    /// So they are not deleted or restored blindly, but collected by the
    /// one "in use" rule ([`Hotplug::collect_bridge`],
    /// [`Hotplug::restore_ids_if_unused`]) once this attach's own intent
    /// is gone.
    async fn rollback(&self, dom: &DomainRef, undo: Vec<Undo>) {
        let mut created_links = false;
        let mut restore_ids = Vec::new();
        let mut objects = Vec::new();
        for step in undo.into_iter().rev() {
            match step {
                Undo::Device { target, xml } => {
                    let r = self
                        .until_reachable(|| {
                            let d = dom.clone();
                            let x = xml.clone();
                            self.blocking(move |hv| hv.detach(&d, &x, target))
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::warn!(vm = %dom.name, %target, error = %e, "undo: detach failed");
                    }
                }
                Undo::Host(HostUndo::DeleteLink { .. }) => created_links = true,
                Undo::Host(HostUndo::RestorePromisc { bridge, .. }) => restore_ids.push(bridge),
                Undo::Host(h) => {
                    if let Some(host) = &self.host {
                        if let Err(e) = host.undo(h).await {
                            tracing::warn!(vm = %dom.name, error = %e, "undo: host step failed");
                        }
                    }
                }
                Undo::Intent(i) => {
                    if let Some(host) = &self.host {
                        host.objects().drop_intent(&i).await;
                    }
                    objects.push(i.object);
                }
            }
        }
        for b in restore_ids {
            if let Ok(b) = BridgeName::try_from(b.as_str()) {
                if let Err(e) = self.restore_ids_if_unused(&b).await {
                    tracing::warn!(vm = %dom.name, bridge = %b, error = %e, "undo: restoring IDS state failed");
                }
                // The rolled-back sensor's filters go with it.
                self.ids_sync_if_tracked(&b).await;
            }
        }
        if created_links {
            for b in objects {
                if let Ok(b) = BridgeName::try_from(b.as_str()) {
                    if let Err(e) = self.collect_bridge(&b).await {
                        tracing::warn!(vm = %dom.name, bridge = %b, error = %e, "undo: bridge clean-up failed");
                    }
                }
            }
        }
    }

    /// Drops the intents of a finished attach.
    async fn drop_intents(&self, undo: &[Undo]) {
        let Some(host) = &self.host else { return };
        for u in undo {
            if let Undo::Intent(i) = u {
                host.objects().drop_intent(i).await;
            }
        }
    }

    /// NICs in any domain's live or persistent XML whose source is `bridge`.
    async fn xml_refs(&self, bridge: &str) -> Result<usize, HotplugError> {
        let doms = self.blocking(|hv| hv.list()).await?;
        let mut n = 0;
        for d in doms {
            let (live, config) = match self.views(&d).await {
                Ok(v) => v,
                Err(HotplugError::VmNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            for v in [live, config].into_iter().flatten() {
                n += v
                    .interfaces
                    .iter()
                    .filter(|i| i.source.as_deref() == Some(bridge))
                    .count();
            }
        }
        Ok(n)
    }

    /// Removes an agent-made bridge (and its segment device) when nothing
    /// uses it, by the one rule in [`crate::host::objects::decide_removal`].
    /// libvirt is read before the bridge's lock is taken, never under it;
    /// the object's [`crate::host::objects::Watch`] tells whether an attach
    /// was in flight or came along in between.
    pub(crate) async fn collect_bridge(
        &self,
        bridge: &BridgeName,
    ) -> Result<Removal, HotplugError> {
        let Some(host) = &self.host else {
            return Ok(Removal::Keep("host networking is off".into()));
        };
        if self.cfg.keep_bridges.iter().any(|k| k == bridge.as_str()) {
            return Ok(Removal::Keep("on the keep-list".into()));
        }
        let objects = host.objects();
        let name = bridge.as_str();
        match host.bridge_ports(bridge).await? {
            None => return Ok(Removal::Keep("no such bridge".into())),
            Some(p) if !p.ours => return Ok(Removal::Keep("not made by the agent".into())),
            Some(p) if !p.others.is_empty() => {
                objects.settled(name).await;
                return Ok(Removal::Keep(format!("port {} is on it", p.others[0])));
            }
            Some(_) => {}
        }
        let watch = objects.watch(name).await;
        let xml_refs = self.xml_refs(name).await?;
        let _guard = objects.lock(&[name]).await?;
        let ports = match host.bridge_ports(bridge).await? {
            Some(p) if p.ours => p.others,
            _ => return Ok(Removal::Keep("gone or replaced meanwhile".into())),
        };
        let usage = Usage {
            ports,
            xml_refs,
            intents: objects.live_intents(name).await.len(),
            came_along: objects.came_along(name, &watch).await,
            since_change: objects.since_change(name).await,
        };
        let verdict = decide_removal(&usage, self.cfg.bridge_grace);
        match &verdict {
            Removal::Delete => {
                if host
                    .remove_bridge_if_unused(bridge, &self.cfg.keep_bridges)
                    .await?
                {
                    objects.settled(name).await;
                    tracing::info!(%bridge, "removed agent-made bridge: nothing uses it");
                }
            }
            Removal::Wait => {
                if usage.since_change.is_none() {
                    objects.touch(name).await?;
                }
                tracing::info!(%bridge, grace_s = self.cfg.bridge_grace.as_secs(), "bridge unused but changed recently; the reconcile collects it after the grace period");
            }
            Removal::Keep(why) => tracing::debug!(%bridge, why = %why, "bridge kept"),
        }
        Ok(verdict)
    }

    /// Puts a Linux bridge's saved pre-IDS state back once no IDS NIC on it
    /// is left in any running domain and no attach is in flight on it.
    /// Returns whether it restored.
    pub(crate) async fn restore_ids_if_unused(
        &self,
        bridge: &BridgeName,
    ) -> Result<bool, HotplugError> {
        let Some(host) = &self.host else {
            return Ok(false);
        };
        let objects = host.objects();
        let name = bridge.as_str();
        if host.saved_promisc_state(bridge).await?.is_none() {
            return Ok(false);
        }
        let watch = objects.watch(name).await;
        let sensors = self.ids_count(name).await?;
        if sensors > 0 {
            tracing::info!(%bridge, ids_nics = sensors, "bridge stays in IDS state");
            return Ok(false);
        }
        let _guard = objects.lock(&[name]).await?;
        if objects.came_along(name, &watch).await || !objects.live_intents(name).await.is_empty() {
            tracing::info!(%bridge, "an attach came along; IDS state left for the reconcile to judge");
            return Ok(false);
        }
        let Some(orig) = host.saved_promisc_state(bridge).await? else {
            return Ok(false);
        };
        host.promisc_restore(bridge, orig).await?;
        tracing::info!(%bridge, "no IDS NIC left; bridge flags restored");
        Ok(true)
    }

    /// Runs a libvirt step, retrying while libvirtd is unreachable (it is
    /// being restarted) for up to [`RECONNECT_GRACE`]. Used where giving up
    /// would leave a half-done change behind (undo) or misreport a change
    /// that happened (read-back).
    async fn until_reachable<T, F, Fut>(&self, mut f: F) -> Result<T, HotplugError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, HotplugError>>,
    {
        let start = Instant::now();
        loop {
            match f().await {
                Err(HotplugError::Hypervisor(e))
                    if e.kind == HvErrorKind::Unavailable && start.elapsed() < RECONNECT_GRACE =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    /// After a failed libvirt call, says what happened to the domain: gone
    /// (destroyed meanwhile) is NOT_FOUND, no longer running is a
    /// precondition; otherwise the original error stands.
    async fn reclassify(&self, dom: &DomainRef, e: HotplugError) -> HotplugError {
        if !matches!(e, HotplugError::Hypervisor(_) | HotplugError::Internal(_)) {
            return e;
        }
        match self.lookup(&dom.uuid).await {
            Err(HotplugError::VmNotFound(_)) => HotplugError::VmNotFound(dom.name.clone()),
            Ok(now) if dom.state.is_live() && !now.state.is_live() => {
                HotplugError::Precondition(format!(
                    "vm {} stopped during the attach ({}); nothing was left attached",
                    dom.name,
                    now.state.as_str()
                ))
            }
            _ => e,
        }
    }

    async fn read_back(&self, dom: &DomainRef, mac: &str) -> Result<NicReport, HotplugError> {
        let (live, config) = self.views(dom).await?;
        report::merge(live.as_ref(), config.as_ref())
            .into_iter()
            .find(|n| n.mac.eq_ignore_ascii_case(mac))
            .ok_or_else(|| {
                HotplugError::Internal(format!(
                    "libvirt accepted NIC {mac} but it is not in the domain"
                ))
            })
    }

    /// IDS NICs on a bridge across every running domain, read from libvirt.
    pub async fn ids_count(&self, bridge: &str) -> Result<usize, HotplugError> {
        Ok(self.ids_nics(bridge).await?.0)
    }

    /// IDS NICs on a bridge across every running domain, and the taps
    /// (`<target dev>`) of those that have one, sorted.
    pub async fn ids_nics(&self, bridge: &str) -> Result<(usize, Vec<String>), HotplugError> {
        let doms = self.blocking(|hv| hv.list()).await?;
        let mut n = 0;
        let mut taps = Vec::new();
        for d in doms.into_iter().filter(|d| d.state.is_live()) {
            let v = match self.view(&d, Target::Live).await {
                Ok(v) => v,
                Err(HotplugError::VmNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            for i in v.interfaces.iter().filter(|i| {
                i.source.as_deref() == Some(bridge)
                    && i.alias
                        .as_deref()
                        .is_some_and(|a| a.starts_with(IDS_ALIAS_PREFIX))
            }) {
                n += 1;
                taps.extend(i.target.clone());
            }
        }
        taps.sort();
        taps.dedup();
        Ok((n, taps))
    }

    /// Recomputes a Linux bridge's mirror set (its IDS sensors' taps, read
    /// from libvirt) and brings the `tc` filters in step, under the
    /// bridge's lock. Idempotent. Returns how many filters changed.
    pub async fn ids_sync(&self, bridge: &BridgeName) -> Result<usize, HotplugError> {
        let Some(host) = &self.host else {
            return Ok(0);
        };
        let ticket = host.objects().read_ticket();
        let (_, taps) = self.ids_nics(bridge.as_str()).await?;
        self.ids_apply(bridge, ticket, &taps).await
    }

    /// Applies sensor taps read from libvirt with `ticket` to a bridge's
    /// mirror filters, under its lock, unless a sync that began reading
    /// later has applied already (see [`HostObjects::read_ticket`]).
    ///
    /// [`HostObjects::read_ticket`]: crate::host::objects::HostObjects::read_ticket
    pub(crate) async fn ids_apply(
        &self,
        bridge: &BridgeName,
        ticket: u64,
        taps: &[String],
    ) -> Result<usize, HotplugError> {
        let Some(host) = &self.host else {
            return Ok(0);
        };
        let objects = host.objects();
        let _guard = objects.lock(&[bridge.as_str()]).await?;
        if objects.stale_read(bridge.as_str(), ticket) {
            tracing::debug!(%bridge, "IDS sensors read before a later sync's; left as it applied them");
            return Ok(0);
        }
        let n = host.ids_mirror_sync(bridge, Some(taps)).await?;
        objects.applied_read(bridge.as_str(), ticket);
        Ok(n)
    }

    /// [`Hotplug::ids_sync`] for a bridge whose ports changed, when it has
    /// (or had) sensors; failures are logged, the NIC change stands.
    pub(crate) async fn ids_sync_if_tracked(&self, bridge: &BridgeName) {
        let Some(host) = &self.host else { return };
        match host.ids_sensors(bridge).await {
            Ok(s) if s.is_empty() => return,
            Ok(_) => {}
            Err(e) => tracing::warn!(%bridge, error = %e, "reading IDS sensor list"),
        }
        if let Err(e) = self.ids_sync(bridge).await {
            tracing::warn!(%bridge, error = %e, "IDS mirror filters not in step");
        }
    }

    fn unsupported(&self, op: &'static str, e: HotplugError) -> HotplugError {
        match e {
            HotplugError::Hypervisor(h) if h.kind == HvErrorKind::Unsupported => {
                HotplugError::Unsupported {
                    op,
                    driver: self.hv.driver(),
                }
            }
            other => other,
        }
    }
}

/// Alias prefix that marks an IDS (promiscuous) NIC. The mark lives in the
/// domain XML itself, so the per-bridge IDS count is recomputed from
/// libvirt's live state after an agent restart, never from memory.
pub const IDS_ALIAS_PREFIX: &str = "ua-ids-";

/// The intent an attach leaves on its bridge while it works.
fn intent_record(dom: &DomainRef, mac: &str) -> IntentRecord {
    IntentRecord {
        vm: dom.uuid.clone(),
        what: mac.to_string(),
        pid: std::process::id(),
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// A domain that vanished while a request waited for its lock was looked up
/// by UUID; report it by the name the caller used.
fn named(e: HotplugError, first: &DomainRef) -> HotplugError {
    match e {
        HotplugError::VmNotFound(id) if id == first.uuid => {
            HotplugError::VmNotFound(first.name.clone())
        }
        other => other,
    }
}

/// Finds the NIC to detach in one view; several NICs with the same MAC need
/// the alias.
fn pick(
    v: &DomainView,
    mac: &str,
    alias: Option<&Alias>,
    vm: &str,
) -> Result<Option<InterfaceView>, HotplugError> {
    let mut found: Vec<&InterfaceView> = v.interface_by_mac(mac);
    if let Some(a) = alias {
        found.retain(|i| i.alias.as_deref() == Some(a.as_str()));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(Some(found[0].clone())),
        n => Err(HotplugError::Precondition(format!(
            "vm {vm} has {n} NICs with MAC {mac}; pass the alias (ua-...) of the one to detach"
        ))),
    }
}

#[cfg(test)]
mod event_tests;
#[cfg(test)]
mod tests;
