//! ReplugNic: move a plugged NIC to another network (bridge and segment:
//! VLAN, VXLAN, OVS tag) while it keeps its MAC and PCI slot.
//!
//! The decision is a value, [`ReplugPlan::decide`] (pure, no I/O), made
//! against a fresh read of the domain and the host's plan for the new
//! segment; [`Hotplug::replug`] then applies it as a transaction:
//!
//! - the new host side is prepared first, under its bridge's lock with an
//!   intent on it, so a failure there costs the guest nothing;
//! - **in place** (same switch type): link down, `virDomainUpdateDeviceFlags`
//!   with the new `<source>` (and `<vlan>`), link up again. The guest keeps
//!   its device; libvirt moves the tap. This goes beyond CloudStack, whose
//!   ReplugNic always unplugs;
//! - **unplug** (Linux bridge <-> OVS, which libvirt cannot change on a live
//!   NIC): detach and wait for REMOVED, attach at the same PCI address with
//!   the link down, then link up, as CloudStack's ReplugNic does;
//! - the old bridge is collected afterwards by the one "in use" rule.
//!
//! On any failure the NIC goes back to the old network with its link as it
//! was, and the error says so ([`HotplugError::ReplugRolledBack`]).
//!
//! libvirt 11.3's test driver refuses `update-device` of an interface even
//! with `--live`, and completes no detach, so both ways are proven on real
//! QEMU (tests/lab/test_e2e_replug.py); the test driver proves the
//! validation, the refusals and that they change nothing.

use std::time::Duration;

use super::attach::{allowed, source_bridge};
use super::moves::spec_from_view;
use super::report::NicReport;
use super::update::{interface_elements, rewrite, NicUpdate};
use super::HotplugError;
use super::{pick, Hotplug, Undo, IDS_ALIAS_PREFIX};
use crate::hypervisor::{DomainRef, HvErrorKind, Target};
use crate::nic::{AcpiIndex, Alias, BridgeName, LinkState, MacAddr, NicSpec};
use crate::nic::{Segment, SwitchType};
use crate::pci::PciAddress;
use crate::xml::domain::InterfaceView;
use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, Writer};

/// The kernel's txqueuelen for a new tap.
const DEFAULT_TAP_QLEN: u32 = 1000;

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

impl ReplugWay {
    /// The name the RPC and the CLI report.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReplugWay::InPlace => "in_place",
            ReplugWay::Unplug { .. } => "unplug",
            ReplugWay::Nothing => "nothing",
        }
    }
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

/// Where a NIC is to go: the new network, validated by the same rules as an
/// attach's `bridge`, `switch_type`, `vlan`, `vni` and `broadcast_uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplugTarget {
    /// The bridge, or the traffic label for a VLAN/VXLAN on a Linux bridge.
    pub bridge: BridgeName,
    /// Linux bridge or OVS.
    pub switch: SwitchType,
    /// The segment on it.
    pub segment: Segment,
}

impl ReplugTarget {
    /// From a spec validated as an attach's would be (its MAC and the rest
    /// are ignored).
    pub fn from_spec(spec: &NicSpec) -> Self {
        ReplugTarget {
            bridge: spec.bridge.clone(),
            switch: spec.switch,
            segment: spec.segment,
        }
    }
}

/// What a replug did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplugOutcome {
    /// The NIC as libvirt reports it afterwards.
    pub nic: NicReport,
    /// The way taken.
    pub way: ReplugWay,
    /// The bridge the NIC left (equal to the new one for `Nothing`).
    pub old_bridge: String,
}

impl Hotplug {
    /// Moves NIC `mac` (alias disambiguates) of `vm` onto `to`, keeping its
    /// MAC, alias and PCI slot. `timeout` bounds the unplug way's wait for
    /// the guest; `keep_old_bridge` keeps the bridge the NIC leaves even
    /// when nothing uses it any more.
    pub async fn replug(
        &self,
        vm: &str,
        mac: &MacAddr,
        alias: Option<&Alias>,
        to: &ReplugTarget,
        timeout: Option<Duration>,
        keep_old_bridge: bool,
    ) -> Result<ReplugOutcome, HotplugError> {
        self.under_lock(vm, |uuid| async move {
            self.replug_locked(&uuid, mac, alias, to, timeout, keep_old_bridge)
                .await
        })
        .await
    }

    async fn replug_locked(
        &self,
        uuid: &str,
        mac: &MacAddr,
        alias: Option<&Alias>,
        to: &ReplugTarget,
        timeout: Option<Duration>,
        keep_old_bridge: bool,
    ) -> Result<ReplugOutcome, HotplugError> {
        let dom = self.lookup(uuid).await?;
        self.settle(&dom).await?;
        let targets = self.change_targets(&dom, "re-plugging a stopped VM's NIC")?;
        let (live, config) = self.views(&dom).await?;
        let mac_s = mac.to_string();
        // The NIC as the guest has it; a stopped VM's as it will boot.
        let mut have = None;
        for v in [&live, &config].into_iter().flatten() {
            if let Some(i) = pick(v, &mac_s, alias, &dom.name)? {
                have = Some(i);
                break;
            }
        }
        let Some(have) = have else {
            return Err(HotplugError::NicNotFound {
                mac: mac_s,
                vm: dom.name.clone(),
            });
        };
        let sensor = have
            .alias
            .as_deref()
            .is_some_and(|a| a.starts_with(IDS_ALIAS_PREFIX));

        // Decide, against the host's plan for the new segment, before
        // anything changes.
        allowed(
            &self.cfg.allow_bridges,
            "allow_bridges",
            "bridge",
            to.bridge.as_str(),
        )?;
        let mut spec = spec_from_view(&have)?;
        spec.bridge = to.bridge.clone();
        spec.switch = to.switch;
        spec.segment = to.segment;
        spec.interface_id = None;
        spec.acpi_index = have.acpi_index.and_then(|a| AcpiIndex::try_from(a).ok());
        spec.pxe_disable = have.rom_off;
        spec.packed = have.packed;
        let mut plan = match &self.host {
            Some(h) => Some(h.resolve(&spec.bridge, spec.switch, &spec.segment).await?),
            None => None,
        };
        let source = source_bridge(&spec, plan.as_ref())?;
        self.landing_allowed(&spec.bridge, &source, sensor)?;
        if sensor && self.cfg.forbid_promisc.iter().any(|b| b == source.as_str()) {
            return Err(HotplugError::Precondition(format!(
                "promiscuous (IDS) NICs are forbidden on bridge {source} by configuration"
            )));
        }
        // A running guest's MTU cannot change: the NIC's must fit the new
        // bridge (and underlay) as it is.
        if let (Some(p), true) = (&mut plan, spec.model.is_virtio()) {
            let mtu = p.plan_mtu(spec.mtu, self.cfg.raise_bridge_mtu)?;
            if have.mtu.is_some_and(|m| m != mtu.get()) {
                return Err(HotplugError::Precondition(format!(
                    "NIC {mac_s} has MTU {}, bridge {source} carries {}; a plugged NIC's MTU cannot change, detach it and attach it with mtu {}",
                    have.mtu.unwrap_or_default(),
                    mtu.get(),
                    mtu.get()
                )));
            }
        }
        let new_vlan = match (&plan, spec.switch) {
            (Some(p), _) => p.ovs_vlan_tag.map(|v| v.get()),
            (None, SwitchType::OpenVswitch) => ovs_tag(spec.switch, &spec.segment),
            _ => None,
        };
        let decided = ReplugPlan::decide(&have, spec.switch, source.as_str(), new_vlan)?;
        tracing::info!(vm = %dom.name, mac = %mac_s, from = %decided.old_bridge, to = %decided.new_bridge, way = decided.way.as_str(), "re-plugging NIC");
        if decided.way == ReplugWay::Nothing {
            let nic = self.report_nic(&dom, &mac_s, alias).await?;
            return Ok(ReplugOutcome {
                nic,
                way: decided.way,
                old_bridge: decided.old_bridge,
            });
        }

        let mut undo: Vec<Undo> = Vec::new();
        if let Some(p) = &plan {
            if let Err(e) = self.prepare_host(&dom, &mac_s, p, &mut undo).await {
                self.rollback(&dom, undo).await;
                return Err(e);
            }
        }
        let result = match decided.way {
            ReplugWay::InPlace => {
                self.replug_in_place(&dom, &have, &targets, alias, source.as_str(), new_vlan)
                    .await
            }
            ReplugWay::Unplug { slot } => {
                self.replug_unplug(&dom, &have, &spec, slot, alias, timeout)
                    .await
            }
            ReplugWay::Nothing => Ok(()),
        };
        if let Err(e) = result {
            self.rollback(&dom, undo).await;
            return Err(e);
        }
        // The NIC is in the domain XML on the new bridge: the intent has
        // done its job. A sensor brings its IDS state along (the unplug
        // way's attach has already set it, as every attach does).
        self.drop_intents(&undo).await;
        // The old bridge lost a port, exactly as after a detach. First, so
        // that an OVS sensor that only changed its tag on the same bridge
        // loses its old mirror before it gets the new one.
        self.host_after_detach(&have, keep_old_bridge).await;
        let in_place = decided.way == ReplugWay::InPlace;
        if in_place && sensor && dom.state.is_live() {
            if let Err(e) = self.ids_on(&dom, spec.switch, &source, &mac_s).await {
                tracing::warn!(vm = %dom.name, bridge = %source, error = %e, "IDS state on the new bridge failed; the reconcile retries");
            }
        } else if in_place && spec.switch == SwitchType::LinuxBridge {
            self.ids_sync_if_tracked(&source).await;
        }
        let nic = self
            .until_reachable(|| self.report_nic(&dom, &mac_s, alias))
            .await?;
        Ok(ReplugOutcome {
            nic,
            way: decided.way,
            old_bridge: decided.old_bridge,
        })
    }

    /// The in-place way: per definition, the NIC's own element with only
    /// `<source bridge>` and `<vlan>` rewritten. Live: link down, the new
    /// source (link still down), then the element with its old link state.
    /// On failure every definition already changed is put back.
    async fn replug_in_place(
        &self,
        dom: &DomainRef,
        have: &crate::xml::domain::InterfaceView,
        targets: &[Target],
        alias: Option<&Alias>,
        bridge: &str,
        vlan: Option<u16>,
    ) -> Result<(), HotplugError> {
        let mac = have.mac.clone().unwrap_or_default();
        let was_down = have.link.as_deref() == Some("down");
        let mut steps: Vec<(Target, String, String)> = Vec::new();
        for &target in targets {
            let d = dom.clone();
            let xml = self.blocking(move |hv| hv.xml(&d, target)).await?;
            let Some(old) = interface_elements(&xml, &mac, alias.map(|a| a.as_str())).pop() else {
                continue;
            };
            let moved = retarget(&old, bridge, vlan).map_err(internal_xml(&mac))?;
            if target == Target::Live && !was_down {
                let down = NicUpdate {
                    link: Some(LinkState::Down),
                    ..NicUpdate::default()
                };
                let old_down = rewrite(&old, &down).map_err(internal_xml(&mac))?;
                let moved_down = rewrite(&moved, &down).map_err(internal_xml(&mac))?;
                steps.push((target, old.clone(), old_down));
                steps.push((target, old.clone(), moved_down));
            }
            steps.push((target, old, moved));
        }
        let mut done: Vec<(Target, String)> = Vec::new();
        for (target, old, new) in steps {
            tracing::debug!(vm = %dom.name, %target, xml = %new, "replug: update device");
            let d = dom.clone();
            if let Err(e) = self.blocking(move |hv| hv.update(&d, &new, target)).await {
                // Newest first, each definition back to its own old element
                // (the live one with its old link state).
                let mut restore: Vec<(Target, String)> = Vec::new();
                for (t, o) in done.into_iter() {
                    if !restore.iter().any(|(rt, _)| *rt == t) {
                        restore.push((t, o));
                    }
                }
                self.update_undo(dom, restore).await;
                let cause = match e {
                    HotplugError::Hypervisor(h) if h.kind == HvErrorKind::NotFound => {
                        HotplugError::VmNotFound(dom.name.clone())
                    }
                    other => self.unsupported("re-plugging a NIC in place", other),
                };
                return Err(self.rolled_back(dom, have, cause));
            }
            done.push((target, old));
        }
        Ok(())
    }

    /// The unplug way: detach (confirmed REMOVED), attach the same NIC on
    /// the new network at the PCI address it had, link down, then its old
    /// link state. When the new attach fails, the old NIC is attached again
    /// at that address.
    async fn replug_unplug(
        &self,
        dom: &DomainRef,
        have: &crate::xml::domain::InterfaceView,
        spec: &NicSpec,
        slot: Option<crate::pci::PciAddress>,
        alias: Option<&Alias>,
        timeout: Option<Duration>,
    ) -> Result<(), HotplugError> {
        let mac_s = have.mac.clone().unwrap_or_default();
        let mac = spec.mac;
        // The persistent element, verbatim, in case the unplug stays pending.
        let config_element = if dom.persistent && self.hv.edits_config() {
            let d = dom.clone();
            let xml = self.blocking(move |hv| hv.xml(&d, Target::Config)).await?;
            interface_elements(&xml, &mac_s, alias.map(|a| a.as_str())).pop()
        } else {
            None
        };
        // The tap's txqueuelen is not in the XML: a tap that was given one
        // (tx_queue_len at attach) would come back with the kernel's 1000.
        // Read it before the unplug takes the tap away, and give it to the
        // new tap, and to the old one when the NIC is plugged back.
        let qlen = have
            .target
            .as_deref()
            .and_then(crate::host::tap_tx_queue_len)
            .filter(|q| *q != DEFAULT_TAP_QLEN)
            .and_then(|q| crate::nic::TxQueueLen::try_from(q).ok());
        match self
            .detach_locked(&dom.uuid, &mac, alias, timeout, false, false)
            .await
        {
            Ok(_) => {}
            Err(HotplugError::DetachPending { waited_ms, .. }) => {
                // The live unplug cannot be called back. The persistent
                // definition keeps the NIC on the old network, so a retried
                // ReplugNic finds it there and finishes the move.
                self.restore_config(dom, config_element).await;
                return Err(HotplugError::ReplugPending {
                    mac: mac_s,
                    vm: dom.name.clone(),
                    waited_ms,
                });
            }
            Err(e) => return Err(e),
        }
        let want_down = spec.link == LinkState::Down;
        let mut new = spec.clone();
        new.link = LinkState::Down;
        new.tx_queue_len = new.tx_queue_len.or(qlen);
        let cause = match self.attach_locked_at(&dom.uuid, &new, slot).await {
            Ok(_) if want_down => return Ok(()),
            Ok(_) => match self.link_up(dom, &mac_s).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Off the new network again, then back to the old one.
                    if let Err(d) = self
                        .detach_locked(&dom.uuid, &mac, None, timeout, false, false)
                        .await
                    {
                        tracing::warn!(vm = %dom.name, error = %d, "undo: unplugging the re-plugged NIC failed");
                    }
                    e
                }
            },
            Err(e) => e,
        };
        tracing::warn!(vm = %dom.name, mac = %mac_s, error = %cause, "the new network refused the NIC; plugging it back into the old one");
        let old = spec_from_view(have).map(|mut o| {
            o.acpi_index = spec.acpi_index;
            o.pxe_disable = spec.pxe_disable;
            o.packed = spec.packed;
            o.tx_queue_len = qlen;
            o
        });
        match old {
            Ok(o) => match self.attach_locked_at(&dom.uuid, &o, slot).await {
                Ok(_) => Err(self.rolled_back(dom, have, cause)),
                Err(back) => {
                    tracing::error!(vm = %dom.name, mac = %mac_s, error = %back, "NIC is on neither network");
                    Err(HotplugError::Internal(format!(
                        "re-plugging NIC {mac_s} of {}: the new network refused it ({cause}) and plugging it back failed ({back}); the NIC is unplugged, attach it again with AttachNic",
                        dom.name
                    )))
                }
            },
            Err(e) => Err(e),
        }
    }

    /// Sets a live NIC's link up (its element otherwise verbatim).
    async fn link_up(&self, dom: &DomainRef, mac: &str) -> Result<(), HotplugError> {
        let d = dom.clone();
        let xml = self.blocking(move |hv| hv.xml(&d, Target::Live)).await?;
        let Some(el) = interface_elements(&xml, mac, None).pop() else {
            return Err(HotplugError::Internal(format!(
                "NIC {mac} vanished from the live domain before its link came up"
            )));
        };
        let up = NicUpdate {
            link: Some(LinkState::Up),
            ..NicUpdate::default()
        };
        let new = rewrite(&el, &up).map_err(internal_xml(mac))?;
        let d = dom.clone();
        self.blocking(move |hv| hv.update(&d, &new, Target::Live))
            .await
    }

    fn rolled_back(
        &self,
        dom: &DomainRef,
        have: &crate::xml::domain::InterfaceView,
        cause: HotplugError,
    ) -> HotplugError {
        HotplugError::ReplugRolledBack {
            mac: have.mac.clone().unwrap_or_default(),
            vm: dom.name.clone(),
            bridge: have.source.clone().unwrap_or_default(),
            link: have.link.clone().unwrap_or_else(|| "up".into()),
            cause: Box::new(cause),
        }
    }
}

fn internal_xml(mac: &str) -> impl Fn(super::update::RewriteError) -> HotplugError + '_ {
    move |e| HotplugError::Internal(format!("rewriting interface XML of {mac}: {e}"))
}

/// Rewrites one `<interface>` element for the in-place way: `<source
/// bridge>` set to `bridge`, every `<vlan>` dropped and, for an OVS tag,
/// one `<vlan><tag id/></vlan>` written before `</interface>`. Every other
/// event passes through byte for byte, so libvirt sees no other change.
pub(super) fn retarget(
    element: &str,
    bridge: &str,
    vlan: Option<u16>,
) -> Result<String, super::update::RewriteError> {
    let mut r = Reader::from_str(element);
    let mut w = Writer::new(Vec::new());
    let mut depth = 0usize;
    let mut skipping: Option<usize> = None;
    let source = |e: &BytesStart<'_>| -> BytesStart<'static> {
        let mut s = BytesStart::new("source");
        for a in e.attributes().flatten() {
            if a.key.0 == "bridge" {
                s.push_attribute(("bridge", bridge));
            } else {
                s.push_attribute((a.key.0, a.value.as_ref()));
            }
        }
        s.into_owned()
    };
    loop {
        let ev = r.read_event()?;
        if let Some(d) = skipping {
            match ev {
                Event::Start(_) => depth += 1,
                Event::End(_) => {
                    depth -= 1;
                    if depth == d {
                        skipping = None;
                    }
                }
                Event::Eof => break,
                _ => {}
            }
            continue;
        }
        match ev {
            Event::Eof => break,
            Event::Start(e) if depth == 1 && e.name().0 == "vlan" => {
                skipping = Some(depth);
                depth += 1;
            }
            Event::Empty(e) if depth == 1 && e.name().0 == "vlan" => {}
            Event::Empty(e) if depth == 1 && e.name().0 == "source" => {
                w.write_event(Event::Empty(source(&e)))?;
            }
            Event::Start(e) if depth == 1 && e.name().0 == "source" => {
                depth += 1;
                w.write_event(Event::Start(source(&e)))?;
            }
            Event::Start(e) => {
                depth += 1;
                w.write_event(Event::Start(e))?;
            }
            Event::End(e) => {
                depth = depth.saturating_sub(1);
                if depth == 0 && e.name().0 == "interface" {
                    if let Some(id) = vlan {
                        w.write_event(Event::Start(BytesStart::new("vlan")))?;
                        let mut tag = BytesStart::new("tag");
                        tag.push_attribute(("id", id.to_string().as_str()));
                        w.write_event(Event::Empty(tag))?;
                        w.write_event(Event::End(quick_xml::events::BytesEnd::new("vlan")))?;
                    }
                }
                w.write_event(Event::End(e))?;
            }
            other => w.write_event(other)?,
        }
    }
    Ok(String::from_utf8(w.into_inner())?)
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

    // --- the transaction, against the recording fake ---

    use std::sync::Arc;

    use crate::hotplug::HotplugConfig;
    use crate::hypervisor::fake::FakeHypervisor;
    use crate::hypervisor::{HvErrorKind, Hypervisor, RunState, Target};
    use crate::nic::{MacAddr, RawNic};

    const M: &str = "52:54:00:0d:00:01";

    fn engine(fake: Arc<FakeHypervisor>) -> Hotplug {
        let cfg = HotplugConfig {
            detach_timeout: Duration::from_millis(300),
            poll_interval: Duration::from_millis(10),
            vhost_net_present: false,
            ..HotplugConfig::default()
        };
        Hotplug::new(fake, None, cfg)
    }

    fn target(bridge: &str, ovs: bool, vlan: Option<u32>) -> ReplugTarget {
        ReplugTarget::from_spec(
            &NicSpec::try_from(RawNic {
                mac: M.into(),
                bridge: bridge.into(),
                ovs,
                vlan,
                ..RawNic::default()
            })
            .expect("target"),
        )
    }

    /// A running persistent VM with NIC `M` on cloudbr0.
    async fn setup(link_down: bool) -> (Arc<FakeHypervisor>, Hotplug, MacAddr) {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, true, 2);
        let hp = engine(fake.clone());
        let spec = NicSpec::try_from(RawNic {
            mac: M.into(),
            bridge: "cloudbr0".into(),
            link_down,
            alias: "ua-replug".into(),
            ..RawNic::default()
        })
        .expect("spec");
        hp.attach("vm1", &spec).await.expect("attach");
        (fake, hp, MacAddr::try_from(M).expect("mac"))
    }

    fn ops(fake: &FakeHypervisor, from: usize) -> Vec<(&'static str, Target)> {
        fake.calls()[from..]
            .iter()
            .map(|c| (c.op, c.target))
            .collect()
    }

    fn live_xml(fake: &FakeHypervisor) -> String {
        fake.xml(&fake.lookup("vm1").expect("vm"), Target::Live)
            .expect("xml")
    }

    #[tokio::test]
    async fn in_place_replug_flaps_the_link_around_the_new_source_and_keeps_the_device() {
        let (fake, hp, mac) = setup(false).await;
        let n0 = fake.calls().len();
        let out = hp
            .replug(
                "vm1",
                &mac,
                None,
                &target("cloudbr1", false, None),
                None,
                false,
            )
            .await
            .expect("replug");
        assert_eq!(out.way, ReplugWay::InPlace);
        assert_eq!(out.old_bridge, "cloudbr0");
        assert_eq!(
            ops(&fake, n0),
            vec![
                ("update", Target::Live),
                ("update", Target::Live),
                ("update", Target::Live),
                ("update", Target::Config),
            ],
            "link down, new source, link up; then the persistent definition; no unplug"
        );
        let n = &out.nic;
        assert_eq!(
            (n.bridge.as_str(), n.link_state.as_str()),
            ("cloudbr1", "up")
        );
        assert_eq!(n.alias, "ua-replug");
        assert!(n.in_live && n.in_config, "{n:?}");
        let nics = hp.list_nics("vm1").await.expect("list");
        assert_eq!(nics.len(), 1, "one device, moved, not a second one");
        assert!(!live_xml(&fake).contains("cloudbr0"));
    }

    #[tokio::test]
    async fn a_nic_whose_link_was_down_stays_down() {
        let (fake, hp, mac) = setup(true).await;
        let n0 = fake.calls().len();
        let out = hp
            .replug(
                "vm1",
                &mac,
                None,
                &target("cloudbr1", false, None),
                None,
                false,
            )
            .await
            .expect("replug");
        assert_eq!(
            ops(&fake, n0),
            vec![("update", Target::Live), ("update", Target::Config)]
        );
        assert_eq!(out.nic.link_state, "down");
    }

    #[tokio::test]
    async fn bridge_to_ovs_unplugs_then_plugs_back_link_down_then_up() {
        let (fake, hp, mac) = setup(false).await;
        let n0 = fake.calls().len();
        let out = hp
            .replug(
                "vm1",
                &mac,
                None,
                &target("br-ovs0", true, Some(100)),
                None,
                false,
            )
            .await
            .expect("replug");
        assert_eq!(out.way, ReplugWay::Unplug { slot: None });
        assert_eq!(
            ops(&fake, n0),
            vec![
                ("detach", Target::Config),
                ("detach", Target::Live),
                ("attach", Target::Live),
                ("attach", Target::Config),
                ("update", Target::Live),
            ]
        );
        let n = &out.nic;
        assert_eq!(
            (
                n.bridge.as_str(),
                n.vlan,
                n.link_state.as_str(),
                n.alias.as_str()
            ),
            ("br-ovs0", 100, "up", "ua-replug")
        );
        assert!(n.in_live && n.in_config, "{n:?}");
        assert!(live_xml(&fake).contains("openvswitch"));
    }

    #[tokio::test]
    async fn a_failed_in_place_step_puts_the_nic_back_on_the_old_bridge_with_its_link_up() {
        let (fake, hp, mac) = setup(false).await;
        *fake.fail_next.lock().expect("lock") =
            Some(("update", Target::Config, HvErrorKind::Internal));
        let e = hp
            .replug(
                "vm1",
                &mac,
                None,
                &target("cloudbr1", false, None),
                None,
                false,
            )
            .await
            .expect_err("must fail");
        assert!(matches!(e, HotplugError::ReplugRolledBack { .. }), "{e:?}");
        assert_eq!(crate::api::status::code(&e), tonic::Code::Internal);
        let m = e.to_string();
        assert!(
            m.contains("back on cloudbr0") && m.contains("link up"),
            "{m}"
        );
        let n = &hp.list_nics("vm1").await.expect("list")[0];
        assert_eq!(
            (n.bridge.as_str(), n.link_state.as_str()),
            ("cloudbr0", "up")
        );
        assert!(n.in_live && n.in_config);
    }

    #[tokio::test]
    async fn a_new_network_refusing_the_nic_plugs_it_back_on_the_old_one() {
        let (fake, hp, mac) = setup(false).await;
        *fake.fail_next.lock().expect("lock") =
            Some(("attach", Target::Live, HvErrorKind::BadDefinition));
        let e = hp
            .replug(
                "vm1",
                &mac,
                None,
                &target("br-ovs0", true, Some(100)),
                None,
                false,
            )
            .await
            .expect_err("must fail");
        assert!(matches!(e, HotplugError::ReplugRolledBack { .. }), "{e:?}");
        assert_eq!(crate::api::status::code(&e), tonic::Code::InvalidArgument);
        let nics = hp.list_nics("vm1").await.expect("list");
        assert_eq!(nics.len(), 1, "{nics:?}");
        let n = &nics[0];
        assert_eq!(
            (
                n.bridge.as_str(),
                n.link_state.as_str(),
                n.alias.as_str(),
                n.vlan
            ),
            ("cloudbr0", "up", "ua-replug", 0)
        );
        assert!(n.in_live && n.in_config, "{n:?}");
    }

    #[tokio::test]
    async fn same_network_changes_nothing_and_unknown_mac_is_not_found() {
        let (fake, hp, mac) = setup(false).await;
        let n0 = fake.calls().len();
        let out = hp
            .replug(
                "vm1",
                &mac,
                None,
                &target("cloudbr0", false, None),
                None,
                false,
            )
            .await
            .expect("replug");
        assert_eq!(out.way, ReplugWay::Nothing);
        assert!(ops(&fake, n0).is_empty(), "{:?}", ops(&fake, n0));
        let other = MacAddr::try_from("52:54:00:0d:00:99").expect("mac");
        let e = hp
            .replug(
                "vm1",
                &other,
                None,
                &target("cloudbr1", false, None),
                None,
                false,
            )
            .await
            .expect_err("unknown");
        assert_eq!(crate::api::status::code(&e), tonic::Code::NotFound);
    }

    #[test]
    fn retarget_rewrites_only_source_and_vlan() {
        let el = "<interface type='bridge'><mac address='52:54:00:0d:00:01'/><source bridge='br-ovs0'/><vlan><tag id='100'/></vlan><virtualport type='openvswitch'><parameters interfaceid='x'/></virtualport><target dev='vnet3'/><model type='virtio'/><alias name='ua-a'/><address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></interface>";
        let out = retarget(el, "br-ovs1", Some(200)).expect("rewrite");
        assert!(out.contains("<source bridge=\"br-ovs1\"/>"), "{out}");
        assert!(
            !out.contains("'100'") && out.contains("<vlan><tag id=\"200\"/></vlan></interface>"),
            "{out}"
        );
        for kept in [
            "<virtualport type='openvswitch'><parameters interfaceid='x'/></virtualport>",
            "<target dev='vnet3'/>",
            "<alias name='ua-a'/>",
            "slot='0x05'",
        ] {
            assert!(out.contains(kept), "{kept} kept verbatim: {out}");
        }
        let plain = retarget(el, "cloudbr1", None).expect("rewrite");
        assert!(!plain.contains("<vlan"), "{plain}");
    }
}
