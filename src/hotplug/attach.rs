//! The attach transaction: plan against a fresh read of the domain
//! (idempotency by MAC, PCI capacity, NIC limit, queue bounds, MTU), then
//! apply step by step, pushing an undo for every change, and read back what
//! libvirt really did.

use super::antispoof::Protection;
use super::report;
use super::{intent_record, AttachOutcome, Hotplug, HotplugError, Undo, IDS_ALIAS_PREFIX};
use crate::host::objects::SegmentRecord;
use crate::host::{HostPlan, HostUndo};
use crate::hypervisor::{DomainRef, HvErrorKind, Target};
use crate::nic::{
    Alias, BridgeName, BridgePattern, LinkState, NicSpec, QueueCount, Segment, SwitchType,
    TxQueueLen,
};
use crate::pci::{self, Capacity, PciAddress};
use crate::xml::domain::{DomainView, InterfaceView, MachineFamily};
use crate::xml::interface::{choose_driver, InterfaceDef};

/// The definitions an attach changed, each as read right after its step.
#[derive(Default)]
struct After {
    live: Option<DomainView>,
    config: Option<DomainView>,
}

impl After {
    /// The live domain as read after the live attach, or read now when
    /// that read failed; kept for the next user.
    async fn live_view(
        &mut self,
        hp: &Hotplug,
        dom: &DomainRef,
    ) -> Result<&DomainView, HotplugError> {
        if self.live.is_none() {
            self.live = Some(hp.view(dom, Target::Live).await?);
        }
        self.live
            .as_ref()
            .ok_or_else(|| HotplugError::Internal("live view missing after a read".into()))
    }
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
    /// Set on the live tap right after the live attach.
    tx_queue_len: Option<TxQueueLen>,
}

impl Hotplug {
    /// Attaches a NIC, or confirms it is already there with the same spec.
    pub async fn attach(&self, vm: &str, spec: &NicSpec) -> Result<AttachOutcome, HotplugError> {
        self.under_lock(
            vm,
            |uuid| async move { self.attach_locked(&uuid, spec).await },
        )
        .await
    }

    /// The body of [`Hotplug::attach`]; the caller holds the VM's lock.
    pub(super) async fn attach_locked(
        &self,
        uuid: &str,
        spec: &NicSpec,
    ) -> Result<AttachOutcome, HotplugError> {
        self.attach_locked_at(uuid, spec, None).await
    }

    /// [`Hotplug::attach_locked`] at a given PCI address (any bus), for a
    /// NIC that gets back the slot it had (ReplugNic's unplug way).
    pub(super) async fn attach_locked_at(
        &self,
        uuid: &str,
        spec: &NicSpec,
        at: Option<PciAddress>,
    ) -> Result<AttachOutcome, HotplugError> {
        // Re-read after waiting for the lock: the state may have changed.
        let (dom, live, config) = self.fresh_views(uuid).await?;
        let targets =
            self.change_targets(&dom, "attaching to a stopped VM's persistent definition")?;
        let primary = live.as_ref().or(config.as_ref()).ok_or_else(|| {
            HotplugError::Internal("domain has neither live nor config XML".into())
        })?;

        // Policy before anything else: a caller that may not use the
        // bridge learns nothing about the host from the answer.
        allowed(
            &self.cfg.allow_bridges,
            "allow_bridges",
            "bridge",
            spec.bridge.as_str(),
        )?;
        // Host side first, read-only: where does the NIC's traffic go?
        let mut plan = match &self.host {
            Some(h) => Some(h.resolve(&spec.bridge, spec.switch, &spec.segment).await?),
            None => None,
        };
        let source = source_bridge(spec, plan.as_ref())?;
        self.landing_allowed(&spec.bridge, &source, spec.promiscuous)?;
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
        self.tx_queue_len_possible(spec, &dom, &targets)?;

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
                .complete_existing(&dom, live.as_ref(), config.as_ref(), &mac, spec)
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
            if let Some(full) = cap.full {
                return Err(room_error(&dom.name, &cap, full));
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
        if let Some(a) = at {
            pinned = Some(pci::check_address(primary, a).map_err(|e| {
                HotplugError::Precondition(format!("PCI address {a} held before: {e}"))
            })?);
        }

        // Anti-spoofing: the filter must exist before a NIC references it,
        // or libvirt refuses the attach (or, worse, a missing driver would
        // leave the NIC unprotected). Checked before anything changes.
        let protection = self.protection(spec);
        if protection == Protection::Nwfilter {
            self.ensure_filter().await?;
        }
        let notes: Vec<String> = protection
            .note(&self.cfg.cloudstack_sg_script)
            .into_iter()
            .collect();
        if let Some(n) = notes.first() {
            tracing::info!(vm = %dom.name, mac = %mac, "{n}");
        }

        if live.is_some() && (spec.inbound.is_some() || spec.outbound.is_some()) {
            // libvirt shapes the new tap with tc as it plugs it; see update.rs.
            let missing = self
                .cfg
                .tc
                .get()
                .await
                .missing_for(spec.inbound.is_some(), spec.outbound.is_some());
            if !missing.is_empty() {
                return Err(HotplugError::Precondition(format!(
                    "this host's kernel lacks {} (probed at start-up), so libvirt cannot shape a NIC plugged into running vm {}; \
                     attach without inbound/outbound, or load the module",
                    missing.join(" and "),
                    dom.name
                )));
            }
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
            filter: (protection == Protection::Nwfilter).then(|| Hotplug::filter_ref(spec)),
            pxe_disable: spec.pxe_disable,
            packed: spec.packed && spec.model.is_virtio(),
        };

        let mut undo: Vec<Undo> = Vec::new();
        let mut after = After::default();
        let result = self
            .apply(
                &Step {
                    dom: &dom,
                    def: &def,
                    targets: &targets,
                    plan: plan.as_ref(),
                    config: config.as_ref(),
                    promiscuous: spec.promiscuous && dom.state.is_live(),
                    tx_queue_len: spec.tx_queue_len,
                },
                &mut undo,
                &mut after,
            )
            .await;
        match result {
            // The NIC is in the domain XML now, which keeps its bridge in
            // use from here on: the intents have done their job. An unplug
            // of an earlier NIC with this MAC that is still pending is not
            // this NIC's (CloudStack reuses MACs): forget it.
            Ok(()) => {
                self.drop_intents(&undo).await;
                self.forget_pending(&dom.uuid, &mac);
            }
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
        // The read-back: the reads made right after each attach step serve
        // here (nothing else changes the domain under the VM's lock); a
        // definition this attach did not change is as it was read before.
        // Only a read that failed is made again.
        let config_changed = targets.contains(&Target::Config);
        let nic = self
            .until_reachable(|| async {
                let lv = match &after.live {
                    Some(v) => Some(v.clone()),
                    None if live.is_some() => Some(self.view(&dom, Target::Live).await?),
                    None => None,
                };
                let cv = match (&config, &after.config) {
                    (Some(_), Some(v)) if config_changed => Some(v.clone()),
                    (Some(_), None) if config_changed => {
                        Some(self.view(&dom, Target::Config).await?)
                    }
                    (Some(c), _) => Some(c.clone()),
                    (None, _) => None,
                };
                report::merge(lv.as_ref(), cv.as_ref())
                    .into_iter()
                    .find(|n| n.mac.eq_ignore_ascii_case(&mac))
                    .ok_or_else(|| {
                        HotplugError::Internal(format!(
                            "libvirt accepted NIC {mac} but it is not in the domain"
                        ))
                    })
            })
            .await?;
        Ok(AttachOutcome {
            nic,
            already_present: false,
            applied: targets,
            notes,
        })
    }

    /// The steps of an attach; each success pushes its undo. `after` gets
    /// each changed definition as read right after its attach step: one
    /// live read serves the persistent copy's PCI address, the tap that
    /// tx_queue_len is set on and the read-back.
    async fn apply(
        &self,
        step: &Step<'_>,
        undo: &mut Vec<Undo>,
        after: &mut After,
    ) -> Result<(), HotplugError> {
        let Step {
            dom,
            def,
            targets,
            plan,
            config,
            promiscuous,
            tx_queue_len,
        } = *step;
        if let Some(plan) = plan {
            self.prepare_host(dom, &def.mac.to_string(), plan, undo)
                .await?;
        }
        let mut def = def.clone();
        for &target in targets {
            if target == Target::Config && targets.contains(&Target::Live) {
                // Give the persistent definition the address the live device
                // really got, so the NIC keeps its slot (and guest name)
                // across a reboot. If that slot is taken in the config, let
                // libvirt pick. The live read made right after the live
                // attach serves here.
                let got = after
                    .live_view(self, dom)
                    .await?
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
            let read = self.attach_step(dom, &def, &xml, target).await?;
            undo.push(Undo::Device { target, xml });
            match target {
                Target::Live => after.live = read,
                Target::Config => after.config = read,
            }
            if let (Target::Live, Some(len)) = (target, tx_queue_len) {
                // No undo of its own: the tap is this NIC's and goes with
                // the device, whose undo is already pushed. A failure here
                // rolls the whole attach back, so no NIC is left running
                // with a txqueuelen the caller did not ask for.
                let live = after.live_view(self, dom).await?;
                self.apply_tx_queue_len(dom, live, &def.mac.to_string(), len)
                    .await?;
            }
        }
        if let (Some(_), Some(plan), true) = (&self.host, plan, promiscuous) {
            let mac = def.mac.to_string();
            if let Some(step) = self.ids_on(dom, plan.switch, &plan.bridge, &mac).await? {
                undo.push(Undo::Host(step));
            }
        } else if let (Some(_), Some(plan)) = (&self.host, plan) {
            // A new port on a bridge with sensors: its frames must reach them.
            if plan.switch == SwitchType::LinuxBridge {
                self.ids_sync_if_tracked(&plan.bridge).await;
            }
        }
        Ok(())
    }

    /// The bridge a NIC lands on is checked too, after the one the request
    /// names: a VLAN or VXLAN segment of an allowed label lands on a bridge
    /// of its own (br<pif>-<vlan>, brvx-<vni>), which must be allowed as
    /// well, and an IDS NIC needs it in `allow_promisc_bridges`.
    pub(super) fn landing_allowed(
        &self,
        requested: &BridgeName,
        source: &BridgeName,
        promiscuous: bool,
    ) -> Result<(), HotplugError> {
        if source.as_str() != requested.as_str() {
            let what = format!("segment bridge (for {requested})");
            allowed(
                &self.cfg.allow_bridges,
                "allow_bridges",
                &what,
                source.as_str(),
            )?;
        }
        if promiscuous {
            allowed(
                &self.cfg.allow_promisc_bridges,
                "allow_promisc_bridges",
                "promiscuous (IDS) NIC on bridge",
                source.as_str(),
            )?;
        }
        Ok(())
    }

    /// Builds the host side of `plan` for NIC `mac` of `dom`. The bridge is
    /// shared: it is prepared under its lock, with an intent left on it so
    /// that no deleter takes it away between here and the moment the NIC
    /// is in the domain XML. Every change pushes its undo.
    pub(super) async fn prepare_host(
        &self,
        dom: &DomainRef,
        mac: &str,
        plan: &HostPlan,
        undo: &mut Vec<Undo>,
    ) -> Result<(), HotplugError> {
        let Some(host) = &self.host else {
            return Ok(());
        };
        let objects = host.objects();
        let guard = objects.lock(&[plan.bridge.as_str()]).await?;
        let intent = objects
            .add_intent(&guard, plan.bridge.as_str(), &intent_record(dom, mac))
            .await?;
        undo.push(Undo::Intent(intent));
        for step in host.prepare(plan).await? {
            undo.push(Undo::Host(step));
        }
        if plan.segment_device.is_some() {
            // Remember what the bridge carries, so the libvirt hook can
            // rebuild it after a reboot from the domain XML alone.
            objects
                .remember(&SegmentRecord {
                    bridge: plan.bridge.to_string(),
                    label: plan.label.to_string(),
                    segment: plan_segment(plan),
                })
                .await?;
        }
        Ok(())
    }

    /// Puts a bridge into IDS state for the sensor NIC `mac` of `dom`:
    /// promiscuous plus `tc` mirror filters to the sensor's tap for a Linux
    /// bridge, a mirror to the sensor's port on OVS. Under the bridge's lock. Returns the undo, if anything changed.
    pub(crate) async fn ids_on(
        &self,
        dom: &DomainRef,
        switch: SwitchType,
        bridge: &BridgeName,
        mac: &str,
    ) -> Result<Option<HostUndo>, HotplugError> {
        let Some(host) = &self.host else {
            return Ok(None);
        };
        // The tap name needs a libvirt read: do it before taking the lock.
        let tap = match switch {
            SwitchType::LinuxBridge => None,
            SwitchType::OpenVswitch => Some(
                self.view(dom, Target::Live)
                    .await?
                    .interface_by_mac(mac)
                    .first()
                    .and_then(|i| i.target.clone())
                    .ok_or_else(|| {
                        HotplugError::Internal("IDS NIC has no tap to mirror to".into())
                    })?,
            ),
        };
        let guard = host.objects().lock(&[bridge.as_str()]).await?;
        let step = match tap {
            None => host.promisc_enable(bridge).await?,
            Some(tap) => Some(host.ovs_mirror_add(bridge, &tap).await?),
        };
        drop(guard);
        if switch == SwitchType::LinuxBridge {
            // The sensor's tap is in the live XML now: copy every other
            // port's ingress to it (and to the bridge's other sensors).
            if let Err(e) = self.ids_sync(bridge).await {
                if let Some(s) = step.clone() {
                    if let Err(u) = host.undo(s).await {
                        tracing::warn!(%bridge, error = %u, "undo: restoring promiscuous state failed");
                    }
                }
                return Err(e);
            }
        }
        Ok(step)
    }

    /// Refuses `tx_queue_len` where it cannot be applied, before anything
    /// changes. It is a property of the host tap, not of the domain XML
    /// (libvirt has no element for it), so a stopped VM, whose attach only
    /// edits the persistent definition, has no tap to set it on. Carrying
    /// it until the VM starts would need a record outside libvirt and a
    /// hook that might not run; an operator is better served by a clear
    /// refusal than by a value that silently never arrives.
    fn tx_queue_len_possible(
        &self,
        spec: &NicSpec,
        dom: &DomainRef,
        targets: &[Target],
    ) -> Result<(), HotplugError> {
        if spec.tx_queue_len.is_none() {
            return Ok(());
        }
        if !targets.contains(&Target::Live) {
            return Err(HotplugError::Precondition(format!(
                "tx_queue_len sets the host tap's txqueuelen, and stopped vm {} has no tap; \
                 attach without tx_queue_len, or start the VM first",
                dom.name
            )));
        }
        if !self.cfg.real_taps {
            return Err(HotplugError::Precondition(format!(
                "tx_queue_len sets the host tap's txqueuelen, and libvirt's {} driver makes no taps; \
                 attach without tx_queue_len",
                self.hv.driver()
            )));
        }
        Ok(())
    }

    /// Sets the txqueuelen of the live tap of NIC `mac`, as `live` (the
    /// live XML read after the NIC's live attach) names it in `<target
    /// dev>`: libvirt names the tap, not the agent.
    async fn apply_tx_queue_len(
        &self,
        dom: &DomainRef,
        live: &DomainView,
        mac: &str,
        len: TxQueueLen,
    ) -> Result<(), HotplugError> {
        let tap = live
            .interface_by_mac(mac)
            .first()
            .and_then(|i| i.target.clone())
            .ok_or_else(|| {
                HotplugError::Precondition(format!(
                    "libvirt reported no host tap (<target dev>) for NIC {mac} of vm {}, so tx_queue_len {len} cannot be set; \
                     attach without tx_queue_len",
                    dom.name
                ))
            })?;
        match &self.host {
            Some(host) => host.set_tx_queue_len(&tap, len).await?,
            None => crate::host::set_tap_tx_queue_len(&tap, len).await?,
        }
        Ok(())
    }

    /// One virDomainAttachDeviceFlags of the attach; Ok when the device is
    /// in `target`'s definition afterwards, with that definition as read
    /// right after the attach when the read worked.
    ///
    /// Every attach step is followed by a read of the same definition (the
    /// read-back, or the live PCI address the persistent copy takes), so
    /// the read rides in the attach's trip through the blocking pool: on
    /// the test driver a trip costs more than the two calls in it (measured
    /// 60-110 µs per trip against 15-50 µs of libvirt work). The trip's
    /// deadline covers both calls, as `fresh_views`' covers its three. A
    /// failed read is not a failed attach: the caller reads again, the
    /// usual way, and that read reports its own error.
    async fn attach_step(
        &self,
        dom: &DomainRef,
        def: &InterfaceDef,
        xml: &str,
        target: Target,
    ) -> Result<Option<DomainView>, HotplugError> {
        let mut ghosts_removed = false;
        loop {
            let d = dom.clone();
            let x = xml.to_string();
            let trip = self
                .blocking(move |hv| {
                    hv.attach(&d, &x, target)?;
                    Ok(hv.xml(&d, target))
                })
                .await;
            match trip {
                Ok(read) => {
                    let view = read
                        .map_err(HotplugError::from)
                        .and_then(|x| DomainView::parse(&x).map_err(HotplugError::from));
                    return Ok(match view {
                        Ok(v) => Some(v),
                        Err(e) => {
                            tracing::debug!(vm = %dom.name, %target, error = %e, "read after attach failed; reading again");
                            None
                        }
                    });
                }
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
                        return Ok(None);
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

    /// Same MAC, same spec: nothing to attach, but finish a half-done
    /// earlier attach (NIC live but missing from the persistent config).
    async fn complete_existing(
        &self,
        dom: &DomainRef,
        live: Option<&DomainView>,
        config: Option<&DomainView>,
        mac: &str,
        spec: &NicSpec,
    ) -> Result<AttachOutcome, HotplugError> {
        let mut applied = Vec::new();
        // txqueuelen is not in the XML, so the comparison above cannot see
        // it: a retry sets it again (setting it is idempotent), and a tap
        // someone changed since gets the requested value back.
        if let (Some(lv), Some(len)) = (live, spec.tx_queue_len) {
            self.apply_tx_queue_len(dom, lv, mac, len).await?;
        }
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
        // An earlier attach of this sensor may have been cut short before
        // its IDS step, or the bridge lost its state since: put it back.
        if let Some(lv) = live {
            if let Some(i) = lv.interface_by_mac(mac).first() {
                let ids = i
                    .alias
                    .as_deref()
                    .is_some_and(|a| a.starts_with(IDS_ALIAS_PREFIX));
                let bridge = i
                    .source
                    .as_deref()
                    .and_then(|b| BridgeName::try_from(b).ok());
                if let (true, Some(b)) = (ids, bridge) {
                    let switch = if i.virtualport.as_deref() == Some("openvswitch") {
                        SwitchType::OpenVswitch
                    } else {
                        SwitchType::LinuxBridge
                    };
                    if self.ids_on(dom, switch, &b, mac).await?.is_some() {
                        tracing::info!(vm = %dom.name, mac, bridge = %b, "re-applied IDS state for an existing sensor NIC");
                    }
                }
            }
        }
        let nic = self.read_back(dom, mac).await?;
        Ok(AttachOutcome {
            nic,
            already_present: applied.is_empty(),
            applied,
            notes: Vec::new(),
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
}

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

/// The bridge that goes into `<source bridge=...>`.
/// Refuses `bridge` unless one of `patterns` (the value of `key`) matches.
pub(super) fn allowed(
    patterns: &[BridgePattern],
    key: &'static str,
    what: &str,
    bridge: &str,
) -> Result<(), HotplugError> {
    if crate::nic::bridge::any_matches(patterns, bridge) {
        return Ok(());
    }
    let list: Vec<&str> = patterns.iter().map(BridgePattern::as_str).collect();
    Err(HotplugError::BridgeNotAllowed {
        what: what.to_string(),
        bridge: bridge.to_string(),
        key,
        patterns: if list.is_empty() {
            "empty".into()
        } else {
            list.join(", ")
        },
    })
}

pub(super) fn source_bridge(
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
    if have.rom_off != spec.pxe_disable {
        d.push("pxe_disable");
    }
    if have.packed != (spec.packed && spec.model.is_virtio()) {
        d.push("packed");
    }
    if let Some(a) = spec.acpi_index {
        if have.acpi_index != Some(a.get()) {
            d.push(if spec.device_id.is_some() {
                "device_id"
            } else {
                "acpi_index"
            });
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

/// The refusal for a domain with no hot-plug room. A pc machine without
/// ACPI has free slots that QEMU refuses: that is a precondition to fix in
/// the definition, not exhaustion, and "0 of 30 used" must not read as full.
fn room_error(vm: &str, cap: &Capacity, full: pci::FullReason) -> HotplugError {
    match full {
        pci::FullReason::AcpiMissing => HotplugError::Precondition(format!(
            "vm {vm} is a pc (i440fx) machine without ACPI, and QEMU refuses PCI hot-plug \
             there ({} of {} slots used); {}",
            cap.used,
            cap.total,
            pci::ENABLE_ACPI
        )),
        pci::FullReason::NoSlot => HotplugError::NoCapacity(no_room_message(vm, cap)),
    }
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

/// The segment a plan's bridge carries, as a broadcast URI.
fn plan_segment(plan: &HostPlan) -> String {
    match &plan.segment_device {
        Some(crate::host::SegmentDevice::Vxlan(v)) => format!("vxlan://{}", v.vni.get()),
        Some(crate::host::SegmentDevice::Vlan { id, .. }) => format!("vlan://{}", id.get()),
        None => "plain".into(),
    }
}

#[cfg(test)]
mod room_tests {
    use super::*;
    use crate::xml::domain::DomainView;

    fn fixture(xml: &str) -> Capacity {
        pci::capacity(&DomainView::parse(xml).expect("fixture parses"))
    }

    /// A real running qemu pc domain without ACPI (captured by
    /// fixtures/capture): QEMU refused every hot-plug there, and the
    /// operator's fix is ACPI plus a restart, not fewer devices.
    #[test]
    fn qemu_pc_without_acpi_is_failed_precondition_saying_how_to_enable_it() {
        let cap = fixture(include_str!("../../fixtures/domains/pc-noacpi.xml"));
        let full = cap.full.expect("blocked");
        assert_eq!(full, pci::FullReason::AcpiMissing);
        let e = room_error("fx-pc-noacpi", &cap, full);
        assert_eq!(
            crate::api::status::code(&e),
            tonic::Code::FailedPrecondition
        );
        let m = e.to_string();
        assert!(m.contains("<features><acpi/></features>"), "{m}");
        assert!(m.contains("restart the VM"), "{m}");
    }

    #[test]
    fn qemu_pc_with_every_slot_used_stays_resource_exhausted() {
        let cap = fixture(include_str!("../../fixtures/domains/pc-full.xml"));
        let full = cap.full.expect("full");
        assert_eq!(full, pci::FullReason::NoSlot);
        let e = room_error("fx-pc-full", &cap, full);
        assert_eq!(crate::api::status::code(&e), tonic::Code::ResourceExhausted);
    }
}
