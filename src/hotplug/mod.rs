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

mod diagnose;
mod error;
mod ghosts;
pub mod locks;
mod moves;
mod report;
mod update;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use diagnose::{
    expected_segment, hop, hops, DiagnoseInput, Diagnosis, ExpectedSegment, Hop, HopStatus,
    HostInput,
};
pub use error::HotplugError;
pub use moves::MoveOutcome;
pub use report::{NicReport, VmReport};
pub use update::{BandwidthChange, NicUpdate};

use crate::host::{HostNet, HostPlan, HostUndo};
use crate::hypervisor::{DomainRef, HvErrorKind, Hypervisor, Target};
use crate::nic::{Alias, LinkState, MacAddr, NicSpec, QueueCount, Segment, SwitchType};
use crate::pci::{self, Capacity, PciAddress};
use crate::xml::domain::{DomainView, InterfaceView, MachineFamily};
use crate::xml::interface::{choose_driver, InterfaceDef};

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
}

/// The final state of a detach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachState {
    /// The guest released the NIC; it is gone from the live domain.
    Removed,
    /// No NIC with that MAC was attached.
    AlreadyAbsent,
}

/// Everything the apply phase of an attach needs, decided beforehand.
#[derive(Clone, Copy)]
struct Step<'a> {
    dom: &'a DomainRef,
    def: &'a InterfaceDef,
    targets: &'a [Target],
    plan: Option<&'a HostPlan>,
    config: Option<&'a DomainView>,
    promiscuous: bool,
}

/// A single undo step of the attach transaction.
enum Undo {
    Device { target: Target, xml: String },
    Host(HostUndo),
}

/// The hot-plug engine: one per agent, shared by all requests.
pub struct Hotplug {
    hv: Arc<dyn Hypervisor>,
    host: Option<Arc<dyn HostNet>>,
    cfg: HotplugConfig,
    locks: locks::VmLocks,
    /// Unplugs sent to a guest and not yet completed, by (domain UUID, MAC).
    /// A retried detach waits on these instead of sending a second
    /// device_del, which QEMU would reject or queue twice.
    pending: Mutex<HashSet<(String, String)>>,
    /// VMs (by UUID) whose live attach lost libvirtd mid-call: QEMU may
    /// hold a NIC libvirt never recorded. See `ghosts`.
    suspects: Mutex<HashSet<String>>,
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
            cfg,
            locks: locks::VmLocks::default(),
            pending: Mutex::new(HashSet::new()),
            suspects: Mutex::new(HashSet::new()),
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

    async fn blocking<T, F>(&self, f: F) -> Result<T, HotplugError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T, crate::hypervisor::HvError> + Send + 'static,
    {
        let hv = self.hv.clone();
        tokio::task::spawn_blocking(move || f(hv.as_ref()))
            .await
            .map_err(|e| HotplugError::Internal(format!("blocking task failed: {e}")))?
            .map_err(HotplugError::from)
    }

    async fn lookup(&self, vm: &str) -> Result<DomainRef, HotplugError> {
        let name = vm.to_string();
        match self.blocking(move |hv| hv.lookup(&name)).await {
            Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::NotFound => {
                Err(HotplugError::VmNotFound(vm.to_string()))
            }
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

    /// Views of the definitions that exist: (live, config).
    async fn views(
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

    /// Attaches a NIC, or confirms it is already there with the same spec.
    pub async fn attach(&self, vm: &str, spec: &NicSpec) -> Result<AttachOutcome, HotplugError> {
        let first = self.lookup(vm).await?;
        let _guard = self.locks.lock(&first.uuid).await;
        self.attach_locked(&first.uuid, spec)
            .await
            .map_err(|e| named(e, &first))
    }

    /// The body of [`Hotplug::attach`]; the caller holds the VM's lock.
    async fn attach_locked(
        &self,
        uuid: &str,
        spec: &NicSpec,
    ) -> Result<AttachOutcome, HotplugError> {
        // Re-read after waiting for the lock: the state may have changed.
        let dom = self.lookup(uuid).await?;
        self.settle(&dom).await?;
        let targets =
            self.change_targets(&dom, "attaching to a stopped VM's persistent definition")?;
        let (live, config) = self.views(&dom).await?;
        let primary = live.as_ref().or(config.as_ref()).ok_or_else(|| {
            HotplugError::Internal("domain has neither live nor config XML".into())
        })?;

        // Host side first, read-only: where does the NIC's traffic go?
        let mut plan = match &self.host {
            Some(h) => Some(h.resolve(&spec.bridge, spec.switch, &spec.segment).await?),
            None => None,
        };
        let source = source_bridge(spec, plan.as_ref())?;
        let vlan_tag = match (spec.switch, &spec.segment, &plan) {
            (_, _, Some(p)) => p.ovs_vlan_tag,
            (SwitchType::OpenVswitch, Segment::Vlan(v), None) => Some(*v),
            _ => None,
        };
        // MTU preflight: the guest MTU must fit the bridge (and, for VXLAN,
        // the underlay plus encapsulation). A request without an MTU gets
        // the bridge's, because a NIC without <mtu> on a 1450 bridge makes
        // the guest use 1500 silently.
        let mtu = match (&mut plan, spec.model.is_virtio()) {
            (Some(p), true) => Some(p.plan_mtu(spec.mtu, self.cfg.raise_bridge_mtu)?),
            _ => spec.mtu,
        };
        let queues = self.queues(spec, primary)?;

        // Idempotency by MAC, against the fresh read.
        let mac = spec.mac.to_string();
        let existing = primary.interface_by_mac(&mac);
        if existing.len() > 1 {
            return Err(HotplugError::Precondition(format!(
                "vm {} already has {} NICs with MAC {mac}; detach them by alias first",
                dom.name,
                existing.len()
            )));
        }
        if let Some(have) = existing.first() {
            let diff = differences(
                spec,
                have,
                source.as_str(),
                vlan_tag.map(|v| v.get()),
                mtu,
                queues,
            );
            if !diff.is_empty() {
                return Err(HotplugError::AlreadyExists {
                    mac,
                    vm: dom.name.clone(),
                    fields: diff.join(", "),
                });
            }
            return self
                .complete_existing(&dom, live.as_ref(), config.as_ref(), &mac)
                .await;
        }

        // Capacity, before libvirt is asked: libvirt's own "No more
        // available PCI slots" must never be the answer an operator sees.
        let nic_count = primary.interfaces.len() as u32;
        if let Some(limit) = self.cfg.nic_limit {
            if nic_count >= limit {
                return Err(HotplugError::NoCapacity(format!(
                    "NIC limit reached: vm {} has {nic_count} of {limit} NICs allowed by nic_limit; detach one or raise the limit",
                    dom.name
                )));
            }
        }
        let mut pinned: Option<PciAddress> = None;
        if let Some(lv) = &live {
            let cap = pci::capacity(lv);
            if cap.free == 0 {
                return Err(HotplugError::NoCapacity(no_room_message(&dom.name, &cap)));
            }
            if let Some(slot) = spec.pci_slot {
                if lv.family() == MachineFamily::Q35 {
                    return Err(HotplugError::Precondition(
                        "pci_slot pins a slot on bus 0, which q35 cannot hot-plug into; on q35 use acpi_index for a stable guest name".into(),
                    ));
                }
                pinned = Some(pci::check_pinned(lv, slot.get()).map_err(|e| {
                    HotplugError::Precondition(format!("pci_slot {}: {e}", slot.get()))
                })?);
            }
        } else if let (Some(slot), Some(cv)) = (spec.pci_slot, &config) {
            pinned = Some(pci::check_pinned(cv, slot.get()).map_err(|e| {
                HotplugError::Precondition(format!("pci_slot {}: {e}", slot.get()))
            })?);
        }

        let alias = ids_alias(spec)?;
        if spec.promiscuous && self.cfg.forbid_promisc.iter().any(|b| b == source.as_str()) {
            return Err(HotplugError::Precondition(format!(
                "promiscuous (IDS) NICs are forbidden on bridge {source} by configuration"
            )));
        }
        let def = InterfaceDef {
            mac: spec.mac,
            source_bridge: source,
            ovs: spec.switch == SwitchType::OpenVswitch,
            interface_id: spec.interface_id,
            vlan_tag: if spec.switch == SwitchType::OpenVswitch {
                vlan_tag
            } else {
                None
            },
            model: spec.model,
            driver: spec
                .model
                .is_virtio()
                .then(|| choose_driver(spec.vhost, self.cfg.vhost_net_present)),
            queues,
            mtu,
            link: spec.link,
            inbound: spec.inbound,
            outbound: spec.outbound,
            alias,
            pci: pinned,
            acpi_index: spec.acpi_index,
        };

        let mut undo: Vec<Undo> = Vec::new();
        let result = self
            .apply(
                &Step {
                    dom: &dom,
                    def: &def,
                    targets: &targets,
                    plan: plan.as_ref(),
                    config: config.as_ref(),
                    promiscuous: spec.promiscuous && dom.state.is_live(),
                },
                &mut undo,
            )
            .await;
        match result {
            Ok(()) => {}
            Err(e) => {
                // libvirtd went away during the live attach: once it is
                // back, remove what QEMU may have kept, so the caller's
                // UNAVAILABLE leaves nothing in the guest.
                if let Err(ge) = self.until_reachable(|| self.settle(&dom)).await {
                    tracing::warn!(vm = %dom.name, error = %ge, "could not check QEMU for a NIC libvirt lost; checked again before the next change");
                }
                self.rollback(&dom, undo).await;
                return Err(self.reclassify(&dom, e).await);
            }
        }
        let nic = self.until_reachable(|| self.read_back(&dom, &mac)).await?;
        Ok(AttachOutcome {
            nic,
            already_present: false,
            applied: targets,
        })
    }

    /// The steps of an attach; each success pushes its undo.
    async fn apply(&self, step: &Step<'_>, undo: &mut Vec<Undo>) -> Result<(), HotplugError> {
        let Step {
            dom,
            def,
            targets,
            plan,
            config,
            promiscuous,
        } = *step;
        if let (Some(host), Some(plan)) = (&self.host, plan) {
            for step in host.prepare(plan).await? {
                undo.push(Undo::Host(step));
            }
        }
        let mut def = def.clone();
        for &target in targets {
            if target == Target::Config && targets.contains(&Target::Live) {
                // Give the persistent definition the address the live device
                // really got, so the NIC keeps its slot (and guest name)
                // across a reboot. If that slot is taken in the config, let
                // libvirt pick.
                let live = self.view(dom, Target::Live).await?;
                let got = live
                    .interface_by_mac(&def.mac.to_string())
                    .first()
                    .and_then(|i| i.pci);
                def.pci = got.filter(|a| {
                    config.is_none_or(|c| !c.pci_in_use.iter().any(|u| u.address == *a))
                });
            }
            let xml = def
                .to_xml()
                .map_err(|e| HotplugError::Internal(format!("rendering interface XML: {e}")))?;
            tracing::debug!(vm = %dom.name, %target, xml = %xml, "attach device");
            self.attach_step(dom, &def, &xml, target).await?;
            undo.push(Undo::Device { target, xml });
        }
        if let (Some(host), Some(plan), true) = (&self.host, plan, promiscuous) {
            match plan.switch {
                SwitchType::LinuxBridge => {
                    if let Some(step) = host.promisc_enable(&plan.bridge).await? {
                        undo.push(Undo::Host(step));
                    }
                }
                SwitchType::OpenVswitch => {
                    let live = self.view(dom, Target::Live).await?;
                    let tap = live
                        .interface_by_mac(&def.mac.to_string())
                        .first()
                        .and_then(|i| i.target.clone())
                        .ok_or_else(|| {
                            HotplugError::Internal("IDS NIC has no tap to mirror to".into())
                        })?;
                    undo.push(Undo::Host(host.ovs_mirror_add(&plan.bridge, &tap).await?));
                }
            }
        }
        Ok(())
    }

    /// One virDomainAttachDeviceFlags of the attach; Ok when the device is
    /// in `target`'s definition afterwards.
    async fn attach_step(
        &self,
        dom: &DomainRef,
        def: &InterfaceDef,
        xml: &str,
        target: Target,
    ) -> Result<(), HotplugError> {
        let mut ghosts_removed = false;
        loop {
            let d = dom.clone();
            let x = xml.to_string();
            match self.blocking(move |hv| hv.attach(&d, &x, target)).await {
                Ok(()) => return Ok(()),
                Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::NotFound => {
                    return Err(HotplugError::VmNotFound(dom.name.clone()))
                }
                Err(HotplugError::Hypervisor(e)) if e.kind == HvErrorKind::Unavailable => {
                    // libvirtd went away mid-call. It may have recorded the
                    // device before it died: then the step happened, and
                    // undo must know it. If not, QEMU may still have run
                    // device_add (see `ghosts`).
                    if self.recorded(dom, target, def).await {
                        tracing::info!(vm = %dom.name, %target, "libvirtd went away after recording the attach; continuing");
                        return Ok(());
                    }
                    if target == Target::Live {
                        self.suspect(dom);
                    }
                    return Err(e.into());
                }
                Err(HotplugError::Hypervisor(e))
                    if target == Target::Live
                        && e.kind == HvErrorKind::Internal
                        && !ghosts_removed =>
                {
                    // QEMU refused a device that fits by libvirt's books.
                    // The usual cause is a NIC libvirt lost holding the slot:
                    // remove it and try once more.
                    match self.remove_ghosts(dom).await {
                        Ok(g) if !g.is_empty() => ghosts_removed = true,
                        Err(ge @ HotplugError::Precondition(_)) => return Err(ge),
                        _ => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether `target`'s definition has the NIC of `def` (by its alias,
    /// unique to this request), once libvirtd answers again.
    async fn recorded(&self, dom: &DomainRef, target: Target, def: &InterfaceDef) -> bool {
        let alias = def.alias.as_str();
        let found = self
            .until_reachable(|| async {
                let v = self.view(dom, target).await?;
                Ok(v.interfaces
                    .iter()
                    .any(|i| i.alias.as_deref() == Some(alias)))
            })
            .await;
        matches!(found, Ok(true))
    }

    /// Runs undo steps in reverse. An undo failure is logged, not returned:
    /// the caller reports the original error.
    async fn rollback(&self, dom: &DomainRef, undo: Vec<Undo>) {
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
                Undo::Host(h) => {
                    if let Some(host) = &self.host {
                        if let Err(e) = host.undo(h).await {
                            tracing::warn!(vm = %dom.name, error = %e, "undo: host step failed");
                        }
                    }
                }
            }
        }
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

    /// Same MAC, same spec: nothing to attach, but finish a half-done
    /// earlier attach (NIC live but missing from the persistent config).
    async fn complete_existing(
        &self,
        dom: &DomainRef,
        live: Option<&DomainView>,
        config: Option<&DomainView>,
        mac: &str,
    ) -> Result<AttachOutcome, HotplugError> {
        let mut applied = Vec::new();
        if let (Some(_), Some(cv), true) = (live, config, self.hv.edits_config()) {
            if cv.interface_by_mac(mac).is_empty() {
                tracing::info!(vm = %dom.name, mac, "NIC is live but not in config; completing");
                let xml = self
                    .blocking({
                        let d = dom.clone();
                        move |hv| hv.xml(&d, Target::Live)
                    })
                    .await?;
                let snippet = report::interface_snippet(&xml, mac).ok_or_else(|| {
                    HotplugError::Internal("NIC vanished while completing attach".into())
                })?;
                let d = dom.clone();
                self.blocking(move |hv| hv.attach(&d, &snippet, Target::Config))
                    .await?;
                applied.push(Target::Config);
            }
        }
        let nic = self.read_back(dom, mac).await?;
        Ok(AttachOutcome {
            nic,
            already_present: applied.is_empty(),
            applied,
        })
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

    fn queues(&self, spec: &NicSpec, dom: &DomainView) -> Result<Option<QueueCount>, HotplugError> {
        if !spec.model.is_virtio() {
            return Ok(None);
        }
        let vcpus = dom.vcpus.max(1);
        if let Some(q) = spec.queues {
            if u32::from(q.get()) > vcpus {
                return Err(HotplugError::OutOfRange {
                    field: "queues",
                    value: q.get().to_string(),
                    allowed: format!("1-{vcpus} (vm has {vcpus} vCPUs)"),
                });
            }
            return Ok(Some(q));
        }
        let n = vcpus.min(u32::from(self.cfg.queue_cap)).max(1);
        // One queue pair is virtio's default; writing queues='1' would only
        // make the XML differ from what libvirt reports back.
        if n <= 1 {
            return Ok(None);
        }
        Ok(QueueCount::try_from(n).ok())
    }

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
        let _guard = self.locks.lock(&first.uuid).await;
        self.detach_locked(&first.uuid, mac, alias, timeout, true)
            .await
            .map_err(|e| named(e, &first))
    }

    /// The body of [`Hotplug::detach`]; the caller holds the VM's lock.
    /// `host_cleanup` false keeps the bridge (and IDS flags) as they are,
    /// for a NIC that is about to be attached elsewhere on the same bridge.
    async fn detach_locked(
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

    /// IDS NICs on a bridge across every running domain, read from libvirt.
    pub async fn ids_count(&self, bridge: &str) -> Result<usize, HotplugError> {
        let doms = self.blocking(|hv| hv.list()).await?;
        let mut n = 0;
        for d in doms.into_iter().filter(|d| d.state.is_live()) {
            let v = match self.view(&d, Target::Live).await {
                Ok(v) => v,
                Err(HotplugError::VmNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            n += v
                .interfaces
                .iter()
                .filter(|i| {
                    i.source.as_deref() == Some(bridge)
                        && i.alias
                            .as_deref()
                            .is_some_and(|a| a.starts_with(IDS_ALIAS_PREFIX))
                })
                .count();
        }
        Ok(n)
    }

    fn pending_remove(&self, uuid: &str, mac: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&(uuid.to_string(), mac.to_string()));
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

/// The alias to write: the requested one, or a generated one; IDS NICs
/// carry [`IDS_ALIAS_PREFIX`] and nothing else may.
fn ids_alias(spec: &NicSpec) -> Result<Alias, HotplugError> {
    let bad = |v: &str, allowed: &str| {
        HotplugError::Invalid(crate::nic::NicError::Invalid {
            field: "alias",
            value: v.to_string(),
            allowed: allowed.to_string(),
        })
    };
    match (&spec.alias, spec.promiscuous) {
        (Some(a), true) if !a.as_str().starts_with(IDS_ALIAS_PREFIX) => {
            Err(bad(a.as_str(), "ua-ids-... for a promiscuous (IDS) NIC"))
        }
        (Some(a), false) if a.as_str().starts_with(IDS_ALIAS_PREFIX) => Err(bad(
            a.as_str(),
            "ua-... not starting with ua-ids- (reserved for promiscuous NICs)",
        )),
        (Some(a), _) => Ok(a.clone()),
        (None, false) => Ok(Alias::generate()),
        (None, true) => {
            let id = Alias::generate();
            let rest = id.as_str().trim_start_matches("ua-");
            Alias::try_from(format!("{IDS_ALIAS_PREFIX}{rest}").as_str())
                .map_err(|e| HotplugError::Internal(e.to_string()))
        }
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

/// The bridge that goes into `<source bridge=...>`.
fn source_bridge(
    spec: &NicSpec,
    plan: Option<&HostPlan>,
) -> Result<crate::nic::BridgeName, HotplugError> {
    if let Some(p) = plan {
        return Ok(p.bridge.clone());
    }
    match (&spec.segment, spec.switch) {
        (Segment::Plain | Segment::Untagged, _) => Ok(spec.bridge.clone()),
        (Segment::Vlan(_), SwitchType::OpenVswitch) => Ok(spec.bridge.clone()),
        (seg, _) => Err(HotplugError::Precondition(format!(
            "{} on a Linux bridge needs host networking, which is off for this agent (test driver lab or --host-network off); attach to the segment's bridge directly",
            match seg {
                Segment::Vxlan(v) => format!("vxlan://{}", v.get()),
                Segment::Vlan(v) => format!("vlan://{}", v.get()),
                _ => String::new(),
            }
        ))),
    }
}

/// Compares a request with the NIC already attached; returns the names of
/// the fields that differ (empty when the request is a faithful retry).
fn differences(
    spec: &NicSpec,
    have: &InterfaceView,
    source: &str,
    vlan: Option<u16>,
    mtu: Option<crate::nic::Mtu>,
    queues: Option<QueueCount>,
) -> Vec<&'static str> {
    let mut d = Vec::new();
    if have.source.as_deref() != Some(source) {
        d.push("bridge");
    }
    let ovs = have.virtualport.as_deref() == Some("openvswitch");
    if ovs != (spec.switch == SwitchType::OpenVswitch) {
        d.push("switch_type");
    }
    if have.vlan != vlan.map(u32::from) {
        d.push("vlan");
    }
    if have.model.as_deref().unwrap_or("") != spec.model.as_str() {
        d.push("model");
    }
    if let Some(m) = mtu {
        if have.mtu.is_some_and(|h| h != m.get()) || (spec.mtu.is_some() && have.mtu.is_none()) {
            d.push("mtu");
        }
    }
    if spec.queues.is_some() {
        let want = queues.map(|q| u32::from(q.get())).unwrap_or(1);
        if have.queues.unwrap_or(1) != want {
            d.push("queues");
        }
    }
    let down = have.link.as_deref() == Some("down");
    if down != (spec.link == LinkState::Down) {
        d.push("link_down");
    }
    if let Some(a) = &spec.alias {
        if have.alias.as_deref() != Some(a.as_str()) {
            d.push("alias");
        }
    }
    if let Some(b) = &spec.inbound {
        if have.inbound.as_ref().and_then(|h| h.average) != Some(b.average()) {
            d.push("inbound");
        }
    }
    if let Some(b) = &spec.outbound {
        if have.outbound.as_ref().and_then(|h| h.average) != Some(b.average()) {
            d.push("outbound");
        }
    }
    d
}

fn no_room_message(vm: &str, cap: &Capacity) -> String {
    let hint = match cap.family {
        MachineFamily::Pc => "stop the VM and add a pci-bridge controller to its definition",
        MachineFamily::Q35 => {
            "stop the VM and add pcie-root-port controllers (root ports cannot be hot-added)"
        }
    };
    format!(
        "no free PCI hot-plug slot in vm {vm}: {} of {} used; {hint}",
        cap.used, cap.total
    )
}

#[cfg(test)]
mod tests;
