//! UpdateNic: change a plugged NIC's link state and bandwidth in place,
//! through virDomainUpdateDeviceFlags, without unplugging it.
//!
//! libvirt finds the device to update by MAC and refuses any change to the
//! parts it cannot change on a running device (model, source, PCI address,
//! ...). So the update XML is the NIC's own element cut from the current
//! definition, with only `<link>` and `<bandwidth>` rewritten, event by
//! event, and everything else passed through byte for byte. The live and
//! the persistent definitions differ (tap name, auto alias), so each target
//! is rewritten from its own XML.

use quick_xml::events::{BytesEnd, BytesStart, Event};
use quick_xml::{Reader, Writer};

use super::report::{self, NicReport};
use super::{Hotplug, HotplugError};
use crate::hypervisor::{DomainRef, HvErrorKind, Target};
use crate::nic::{Alias, Bandwidth, LinkState, MacAddr, NicError, RawBandwidth};

/// What to do with one direction of a NIC's shaping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BandwidthChange {
    /// Shape to these values (replaces what was there).
    Set(Bandwidth),
    /// Remove shaping in this direction.
    Clear,
}

impl BandwidthChange {
    /// From a request's raw values: all zero clears the direction; anything
    /// else is validated by the same rules as an attach's bandwidth.
    pub fn from_raw(prefix: &'static str, raw: &RawBandwidth) -> Result<Self, NicError> {
        match crate::nic::spec::bandwidth(prefix, Some(raw))? {
            Some(b) => Ok(BandwidthChange::Set(b)),
            None => Ok(BandwidthChange::Clear),
        }
    }
}

/// The changes an UpdateNic asks for; `None` leaves a part as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NicUpdate {
    /// New link state.
    pub link: Option<LinkState>,
    /// New shaping towards the guest.
    pub inbound: Option<BandwidthChange>,
    /// New shaping from the guest.
    pub outbound: Option<BandwidthChange>,
}

impl NicUpdate {
    /// True when the request changes nothing.
    pub fn is_empty(&self) -> bool {
        self.link.is_none() && self.inbound.is_none() && self.outbound.is_none()
    }

    fn touches_bandwidth(&self) -> bool {
        self.inbound.is_some() || self.outbound.is_some()
    }
}

impl Hotplug {
    /// Changes link state and/or bandwidth of an attached NIC in place and
    /// reports the NIC as libvirt has it afterwards. The live and persistent
    /// definitions are changed by the same rules as an attach; if the second
    /// fails, the first is put back.
    pub async fn update(
        &self,
        vm: &str,
        mac: &MacAddr,
        alias: Option<&Alias>,
        change: &NicUpdate,
    ) -> Result<NicReport, HotplugError> {
        if change.is_empty() {
            return Err(HotplugError::Invalid(NicError::Invalid {
                field: "link_down",
                value: String::new(),
                allowed: "at least one of link_down, inbound, outbound".into(),
            }));
        }
        self.under_lock(vm, |uuid| async move {
            self.update_locked(&uuid, mac, alias, change).await
        })
        .await
    }

    /// The body of [`Hotplug::update`]; the caller holds the VM's lock.
    async fn update_locked(
        &self,
        uuid: &str,
        mac: &MacAddr,
        alias: Option<&Alias>,
        change: &NicUpdate,
    ) -> Result<NicReport, HotplugError> {
        let dom = self.lookup(uuid).await?;
        let targets = self.change_targets(&dom, "updating a stopped VM's persistent definition")?;
        let mac_s = mac.to_string();

        // Work out every rewrite before changing anything.
        let mut plan: Vec<(Target, String, String)> = Vec::new();
        for target in targets {
            let d = dom.clone();
            let xml = self.blocking(move |hv| hv.xml(&d, target)).await?;
            let found = interface_elements(&xml, &mac_s, alias.map(|a| a.as_str()));
            let old = match found.len() {
                0 => continue,
                1 => found.into_iter().next().unwrap_or_default(),
                n => {
                    return Err(HotplugError::Precondition(format!(
                        "vm {} has {n} NICs with MAC {mac_s}; pass the alias (ua-...) of the one to update",
                        dom.name
                    )))
                }
            };
            let new = rewrite(&old, change).map_err(|e| {
                HotplugError::Internal(format!("rewriting interface XML of {mac_s}: {e}"))
            })?;
            if target == Target::Live && change.touches_bandwidth() && old != new {
                self.check_live_shaping(&dom.name, &mac_s, &new).await?;
            }
            plan.push((target, old, new));
        }
        if plan.is_empty() {
            return Err(HotplugError::NicNotFound {
                mac: mac_s,
                vm: dom.name.clone(),
            });
        }

        let mut done: Vec<(Target, String)> = Vec::new();
        for (target, old, new) in plan {
            if old == new {
                continue;
            }
            tracing::debug!(vm = %dom.name, %target, xml = %new, "update device");
            let d = dom.clone();
            if let Err(e) = self.blocking(move |hv| hv.update(&d, &new, target)).await {
                self.update_undo(&dom, done).await;
                return Err(match e {
                    HotplugError::Hypervisor(h) if h.kind == HvErrorKind::NotFound => {
                        HotplugError::VmNotFound(dom.name.clone())
                    }
                    other => self.unsupported("updating a NIC", other),
                });
            }
            done.push((target, old));
        }
        self.report_nic(&dom, &mac_s, alias).await
    }

    /// libvirt re-applies the whole `<bandwidth>` of a running NIC with `tc`
    /// on its tap. Where the start-up probe found the kernel without what
    /// that needs, refuse before anything changes: libvirt's failure would
    /// come back only as message text and read as INTERNAL.
    async fn check_live_shaping(&self, vm: &str, mac: &str, new: &str) -> Result<(), HotplugError> {
        let view = crate::xml::domain::DomainView::parse(&format!(
            "<domain><devices>{new}</devices></domain>"
        ))
        .map_err(|e| HotplugError::Internal(format!("reading rewritten XML of {mac}: {e}")))?;
        let Some(nic) = view.interfaces.first() else {
            return Ok(());
        };
        let missing = self
            .cfg
            .tc
            .get()
            .await
            .missing_for(nic.inbound.is_some(), nic.outbound.is_some());
        if missing.is_empty() {
            return Ok(());
        }
        Err(HotplugError::Precondition(format!(
            "this host's kernel lacks {} (probed at start-up), so libvirt cannot shape the running NIC {mac} of vm {vm}; \
             load the module, or change the bandwidth in the stopped VM's definition",
            missing.join(" and ")
        )))
    }

    /// Puts back the definitions already updated, newest first. Failures are
    /// logged: the caller reports the original error.
    pub(super) async fn update_undo(&self, dom: &DomainRef, done: Vec<(Target, String)>) {
        for (target, old) in done.into_iter().rev() {
            let d = dom.clone();
            if let Err(e) = self.blocking(move |hv| hv.update(&d, &old, target)).await {
                tracing::warn!(vm = %dom.name, %target, error = %e, "undo: restoring NIC definition failed");
            }
        }
    }

    /// Which definitions a device change applies to, by the attach rules:
    /// a running persistent VM gets LIVE and CONFIG (LIVE only on a driver
    /// that cannot edit CONFIG), a transient VM LIVE, a stopped VM CONFIG.
    /// Attach and update share this rule.
    pub(super) fn change_targets(
        &self,
        dom: &DomainRef,
        op: &'static str,
    ) -> Result<Vec<Target>, HotplugError> {
        let config = dom.persistent && self.hv.edits_config();
        match (dom.state.is_live(), dom.persistent) {
            (true, true) if config => Ok(vec![Target::Live, Target::Config]),
            (true, _) => Ok(vec![Target::Live]),
            (false, true) if config => Ok(vec![Target::Config]),
            (false, true) => Err(HotplugError::Unsupported {
                op,
                driver: self.hv.driver(),
            }),
            // A transient domain that is not running is being destroyed:
            // for the caller it is gone.
            (false, false) => Err(HotplugError::VmNotFound(dom.name.clone())),
        }
    }

    /// The NIC with this MAC (and alias, when given) as libvirt reports it.
    pub(super) async fn report_nic(
        &self,
        dom: &DomainRef,
        mac: &str,
        alias: Option<&Alias>,
    ) -> Result<NicReport, HotplugError> {
        let (live, config) = self.views(dom).await?;
        report::merge(live.as_ref(), config.as_ref())
            .into_iter()
            .find(|n| {
                n.mac.eq_ignore_ascii_case(mac) && alias.is_none_or(|a| n.alias == a.as_str())
            })
            .ok_or_else(|| HotplugError::NicNotFound {
                mac: mac.to_string(),
                vm: dom.name.clone(),
            })
    }
}

/// Every raw `<interface>` element of a domain XML with this MAC (and this
/// alias, when given), verbatim.
pub(super) fn interface_elements(domain_xml: &str, mac: &str, alias: Option<&str>) -> Vec<String> {
    let mut r = Reader::from_str(domain_xml);
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    let (mut mac_ok, mut alias_ok) = (false, false);
    loop {
        let before = r.buffer_position() as usize;
        let ev = match r.read_event() {
            Ok(Event::Eof) | Err(_) => return out,
            Ok(ev) => ev,
        };
        match ev {
            Event::Start(e) if depth == 0 && e.name().0 == "interface" => {
                depth = 1;
                start = before;
                mac_ok = false;
                alias_ok = alias.is_none();
            }
            Event::Start(e) if depth > 0 => {
                if depth == 1 {
                    check_child(&e, mac, alias, &mut mac_ok, &mut alias_ok);
                }
                depth += 1;
            }
            Event::Empty(e) if depth == 1 => {
                check_child(&e, mac, alias, &mut mac_ok, &mut alias_ok)
            }
            Event::End(_) if depth > 0 => {
                depth -= 1;
                if depth == 0 && mac_ok && alias_ok {
                    let end = r.buffer_position() as usize;
                    if let Some(s) = domain_xml.get(start..end) {
                        out.push(s.trim().to_string());
                    }
                }
            }
            _ => {}
        }
    }
}

fn check_child(
    e: &BytesStart<'_>,
    mac: &str,
    alias: Option<&str>,
    mac_ok: &mut bool,
    alias_ok: &mut bool,
) {
    let attr = |key: &str| {
        e.attributes()
            .flatten()
            .find(|a| a.key.0 == key)
            .map(|a| a.value.into_owned())
    };
    match e.name().0 {
        "mac" => *mac_ok = attr("address").is_some_and(|v| v.eq_ignore_ascii_case(mac)),
        "alias" => {
            if let Some(want) = alias {
                *alias_ok = attr("name").as_deref() == Some(want);
            }
        }
        _ => {}
    }
}

/// Rewrites one `<interface>` element: `<link>` replaced when the link
/// changes; in `<bandwidth>`, only the directions that change are replaced
/// or dropped, the other one is kept verbatim. Every other event passes
/// through unchanged.
pub(super) fn rewrite(element: &str, change: &NicUpdate) -> Result<String, RewriteError> {
    let mut r = Reader::from_str(element);
    let mut w = Writer::new(Vec::new());
    let mut depth = 0usize;
    // Depth at which events are being dropped (a replaced element's subtree).
    let mut skip_until: Option<usize> = None;
    // Events of the current <bandwidth> being rebuilt, written at its end.
    let mut bw: Option<Vec<Event<'static>>> = None;
    let mut saw_bandwidth = false;
    loop {
        let ev = r.read_event()?;
        if let Some(d) = skip_until {
            match ev {
                Event::Start(_) => depth += 1,
                Event::End(_) => {
                    depth -= 1;
                    if depth == d {
                        skip_until = None;
                    }
                }
                Event::Eof => break,
                _ => {}
            }
            continue;
        }
        match ev {
            Event::Eof => break,
            Event::Start(e) => {
                let name = e.name().0.to_string();
                if depth == 1 && drops_child(&name, change) {
                    skip_until = Some(depth);
                    depth += 1;
                    continue;
                }
                if depth == 1 && name == "bandwidth" && change.touches_bandwidth() {
                    saw_bandwidth = true;
                    bw = Some(Vec::new());
                    depth += 1;
                    continue;
                }
                if depth == 2 && bw.is_some() && bandwidth_dir_changes(&name, change) {
                    skip_until = Some(depth);
                    depth += 1;
                    continue;
                }
                depth += 1;
                emit(&mut w, &mut bw, Event::Start(e.into_owned()))?;
            }
            Event::Empty(e) => {
                let name = e.name().0.to_string();
                if depth == 1 && drops_child(&name, change) {
                    continue;
                }
                if depth == 1 && name == "bandwidth" && change.touches_bandwidth() {
                    // An empty <bandwidth/> holds nothing worth keeping.
                    saw_bandwidth = true;
                    write_bandwidth(&mut w, Vec::new(), change)?;
                    continue;
                }
                if depth == 2 && bw.is_some() && bandwidth_dir_changes(&name, change) {
                    continue;
                }
                emit(&mut w, &mut bw, Event::Empty(e.into_owned()))?;
            }
            Event::End(e) => {
                depth = depth.saturating_sub(1);
                if depth == 1 && bw.is_some() && e.name().0 == "bandwidth" {
                    let kept = bw.take().unwrap_or_default();
                    write_bandwidth(&mut w, kept, change)?;
                    continue;
                }
                if depth == 0 && e.name().0 == "interface" {
                    if let Some(l) = change.link {
                        let mut link = BytesStart::new("link");
                        link.push_attribute(("state", l.as_str()));
                        w.write_event(Event::Empty(link))?;
                    }
                    if change.touches_bandwidth() && !saw_bandwidth {
                        write_bandwidth(&mut w, Vec::new(), change)?;
                    }
                }
                emit(&mut w, &mut bw, Event::End(e.into_owned()))?;
            }
            other => emit(&mut w, &mut bw, other.into_owned())?,
        }
    }
    Ok(String::from_utf8(w.into_inner())?)
}

/// Why an interface element could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// The element is not well-formed XML.
    #[error("{0}")]
    Xml(#[from] quick_xml::Error),
    /// Writing the new element failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The result is not UTF-8.
    #[error("{0}")]
    Utf8(#[from] std::string::FromUtf8Error),
}

/// A direct child of `<interface>` that is replaced whole.
fn drops_child(name: &str, change: &NicUpdate) -> bool {
    name == "link" && change.link.is_some()
}

fn bandwidth_dir_changes(name: &str, change: &NicUpdate) -> bool {
    match name {
        "inbound" => change.inbound.is_some(),
        "outbound" => change.outbound.is_some(),
        _ => false,
    }
}

fn emit(
    w: &mut Writer<Vec<u8>>,
    bw: &mut Option<Vec<Event<'static>>>,
    ev: Event<'static>,
) -> Result<(), RewriteError> {
    match bw {
        Some(buf) => {
            buf.push(ev);
            Ok(())
        }
        None => Ok(w.write_event(ev)?),
    }
}

/// Writes `<bandwidth>` with the kept events plus the directions being
/// set; nothing at all when that leaves it empty (libvirt then removes the
/// shaping).
fn write_bandwidth(
    w: &mut Writer<Vec<u8>>,
    kept: Vec<Event<'static>>,
    change: &NicUpdate,
) -> Result<(), RewriteError> {
    let mut new: Vec<Event<'static>> = Vec::new();
    for (name, dir) in [("inbound", change.inbound), ("outbound", change.outbound)] {
        if let Some(BandwidthChange::Set(b)) = dir {
            let mut e = BytesStart::new(name);
            e.push_attribute(("average", b.average().to_string().as_str()));
            if let Some(p) = b.peak() {
                e.push_attribute(("peak", p.to_string().as_str()));
            }
            if let Some(x) = b.burst() {
                e.push_attribute(("burst", x.to_string().as_str()));
            }
            new.push(Event::Empty(e));
        }
    }
    let has_element = kept
        .iter()
        .any(|e| matches!(e, Event::Start(_) | Event::Empty(_)));
    if !has_element && new.is_empty() {
        return Ok(());
    }
    w.write_event(Event::Start(BytesStart::new("bandwidth")))?;
    for e in kept.into_iter().chain(new) {
        w.write_event(e)?;
    }
    w.write_event(Event::End(BytesEnd::new("bandwidth")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = "<domain><devices>\
<interface type='bridge'>\n  <mac address='52:54:00:aa:00:01'/>\n  <source bridge='br0'/>\n  <target dev='vnet3'/>\n  <model type='virtio'/>\n  <bandwidth>\n    <inbound average='100' peak='200'/>\n    <outbound average='50'/>\n  </bandwidth>\n  <link state='up'/>\n  <alias name='ua-one'/>\n  <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>\n</interface>\
<interface type='bridge'><mac address='52:54:00:aa:00:02'/><source bridge='br1'/><alias name='ua-two'/></interface>\
</devices></domain>";

    fn one() -> String {
        interface_elements(LIVE, "52:54:00:AA:00:01", None)
            .pop()
            .expect("found")
    }

    fn bw(avg: u64) -> Bandwidth {
        Bandwidth::new("inbound", avg, None, None).expect("bw")
    }

    #[test]
    fn elements_match_by_mac_case_insensitively_and_by_alias() {
        assert_eq!(interface_elements(LIVE, "52:54:00:aa:00:02", None).len(), 1);
        assert_eq!(
            interface_elements(LIVE, "52:54:00:aa:00:02", Some("ua-two")).len(),
            1
        );
        assert!(interface_elements(LIVE, "52:54:00:aa:00:02", Some("ua-one")).is_empty());
        assert!(interface_elements(LIVE, "52:54:00:aa:00:09", None).is_empty());
        assert!(one().contains("vnet3") && !one().contains("br1"));
    }

    #[test]
    fn link_down_replaces_only_the_link_element() {
        let c = NicUpdate {
            link: Some(LinkState::Down),
            ..Default::default()
        };
        let out = rewrite(&one(), &c).expect("rewrite");
        assert_eq!(out.matches("<link").count(), 1, "{out}");
        assert!(out.contains(r#"<link state="down"/>"#), "{out}");
        assert!(!out.contains("state='up'"), "{out}");
        // Everything else is passed through verbatim.
        for keep in [
            "<target dev='vnet3'/>",
            "<alias name='ua-one'/>",
            "<inbound average='100' peak='200'/>",
            "slot='0x03'",
        ] {
            assert!(out.contains(keep), "lost {keep}: {out}");
        }
    }

    #[test]
    fn link_is_added_when_the_element_had_none() {
        let el = interface_elements(LIVE, "52:54:00:aa:00:02", None)
            .pop()
            .expect("found");
        let out = rewrite(
            &el,
            &NicUpdate {
                link: Some(LinkState::Up),
                ..Default::default()
            },
        )
        .expect("rewrite");
        assert!(out.ends_with(r#"<link state="up"/></interface>"#), "{out}");
    }

    #[test]
    fn inbound_change_keeps_outbound_verbatim() {
        let c = NicUpdate {
            inbound: Some(BandwidthChange::Set(
                Bandwidth::new("inbound", 300, Some(400), Some(64)).expect("bw"),
            )),
            ..Default::default()
        };
        let out = rewrite(&one(), &c).expect("rewrite");
        assert!(out.contains("<outbound average='50'/>"), "{out}");
        assert!(
            out.contains(r#"<inbound average="300" peak="400" burst="64"/>"#),
            "{out}"
        );
        assert!(!out.contains("average='100'"), "{out}");
        assert_eq!(out.matches("<bandwidth>").count(), 1, "{out}");
        assert!(out.contains("<link state='up'/>"), "{out}");
    }

    #[test]
    fn clearing_both_directions_drops_bandwidth() {
        let c = NicUpdate {
            inbound: Some(BandwidthChange::Clear),
            outbound: Some(BandwidthChange::Clear),
            ..Default::default()
        };
        let out = rewrite(&one(), &c).expect("rewrite");
        assert!(!out.contains("bandwidth"), "{out}");
        assert!(
            !out.contains("inbound") && !out.contains("outbound"),
            "{out}"
        );
        assert!(out.contains("<model type='virtio'/>"), "{out}");
    }

    #[test]
    fn bandwidth_is_added_when_there_was_none() {
        let el = interface_elements(LIVE, "52:54:00:aa:00:02", None)
            .pop()
            .expect("found");
        let c = NicUpdate {
            outbound: Some(BandwidthChange::Set(bw(125))),
            ..Default::default()
        };
        let out = rewrite(&el, &c).expect("rewrite");
        assert!(
            out.contains(r#"<bandwidth><outbound average="125"/></bandwidth>"#),
            "{out}"
        );
        // Clearing what is not there writes nothing.
        let none = rewrite(
            &el,
            &NicUpdate {
                outbound: Some(BandwidthChange::Clear),
                ..Default::default()
            },
        )
        .expect("rewrite");
        assert_eq!(none, el);
    }

    #[test]
    fn rewrite_of_nothing_is_identity() {
        assert_eq!(rewrite(&one(), &NicUpdate::default()).expect("rw"), one());
    }

    #[test]
    fn malformed_element_is_an_error_not_a_panic() {
        let c = NicUpdate {
            link: Some(LinkState::Down),
            ..Default::default()
        };
        assert!(rewrite("<interface><mac></interface>", &c).is_err());
    }
}

#[cfg(test)]
mod engine_tests {
    use std::sync::Arc;

    use super::*;
    use crate::api::status;
    use crate::hotplug::HotplugConfig;
    use crate::hypervisor::fake::FakeHypervisor;
    use crate::hypervisor::{HvErrorKind, Hypervisor, RunState};
    use crate::nic::{NicSpec, RawNic};

    const M: &str = "52:54:00:0d:00:01";

    async fn setup(state: RunState) -> (Arc<FakeHypervisor>, Hotplug) {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", state, true, 2);
        let hp = Hotplug::new(fake.clone(), None, HotplugConfig::default());
        let spec = NicSpec::try_from(RawNic {
            mac: M.into(),
            bridge: "cloudbr0".into(),
            alias: "ua-upd".into(),
            outbound: Some(RawBandwidth {
                average_kbps: 500,
                ..Default::default()
            }),
            ..Default::default()
        })
        .expect("spec");
        hp.attach("vm1", &spec).await.expect("attach");
        (fake, hp)
    }

    fn mac() -> MacAddr {
        MacAddr::try_from(M).expect("mac")
    }

    fn link(l: LinkState) -> NicUpdate {
        NicUpdate {
            link: Some(l),
            ..Default::default()
        }
    }

    fn xml(fake: &FakeHypervisor, t: Target) -> String {
        fake.xml(&fake.lookup("vm1").expect("vm"), t).expect("xml")
    }

    #[tokio::test]
    async fn link_down_then_up_changes_live_and_config_without_unplugging() {
        let (fake, hp) = setup(RunState::Running).await;
        let n0 = fake.calls().len();
        let nic = hp
            .update("vm1", &mac(), None, &link(LinkState::Down))
            .await
            .expect("down");
        assert_eq!(nic.link_state, "down");
        assert!(nic.in_live && nic.in_config && nic.alias == "ua-upd");
        let nic = hp
            .update("vm1", &mac(), None, &link(LinkState::Up))
            .await
            .expect("up");
        assert_eq!(nic.link_state, "up");
        let ops: Vec<(&str, Target)> = fake.calls()[n0..]
            .iter()
            .map(|c| (c.op, c.target))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("update", Target::Live),
                ("update", Target::Config),
                ("update", Target::Live),
                ("update", Target::Config)
            ],
            "updated in place, never detached"
        );
        // The outbound shaping set at attach is untouched by a link change.
        assert!(xml(&fake, Target::Live).contains("outbound average=\"500\""));
    }

    #[tokio::test]
    async fn bandwidth_update_replaces_one_direction_and_keeps_the_other() {
        let (fake, hp) = setup(RunState::Running).await;
        let change = NicUpdate {
            inbound: Some(
                BandwidthChange::from_raw(
                    "inbound",
                    &RawBandwidth {
                        rate_mbps: 8,
                        ..Default::default()
                    },
                )
                .expect("valid"),
            ),
            ..Default::default()
        };
        hp.update("vm1", &mac(), None, &change)
            .await
            .expect("update");
        for t in [Target::Live, Target::Config] {
            let x = xml(&fake, t);
            assert!(
                x.contains("<inbound average=\"1000\" peak=\"1000\"/>"),
                "{t}: {x}"
            );
            assert!(x.contains("outbound average=\"500\""), "{t}: {x}");
        }
        // All-zero clears a direction.
        let clear = NicUpdate {
            outbound: Some(
                BandwidthChange::from_raw("outbound", &RawBandwidth::default()).expect("clear"),
            ),
            ..Default::default()
        };
        hp.update("vm1", &mac(), None, &clear).await.expect("clear");
        let x = xml(&fake, Target::Live);
        assert!(
            !x.contains("outbound") && x.contains("inbound average"),
            "{x}"
        );
    }

    /// Where the start-up probe found no sch_sfq/act_police (this lab's
    /// kernel: tests/lab/test_e2e_day2.py proves it on real QEMU), a live
    /// bandwidth change is refused up front and nothing changes; a link
    /// change still works, and so does a stopped VM's definition.
    #[tokio::test]
    async fn live_bandwidth_without_kernel_support_is_failed_precondition_naming_it() {
        use crate::host::tc::{Ability, TcAbilities, TcProbe};
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, true, 2);
        let cfg = HotplugConfig {
            tc: TcProbe::known(TcAbilities {
                sfq: Ability::Missing,
                police: Ability::Present,
            }),
            ..HotplugConfig::default()
        };
        let hp = Hotplug::new(fake.clone(), None, cfg);
        let spec = NicSpec::try_from(RawNic {
            mac: M.into(),
            bridge: "cloudbr0".into(),
            ..Default::default()
        })
        .expect("spec");
        hp.attach("vm1", &spec).await.expect("attach");
        let n0 = fake.calls().len();
        let inbound = NicUpdate {
            inbound: Some(
                BandwidthChange::from_raw(
                    "inbound",
                    &RawBandwidth {
                        rate_mbps: 8,
                        ..Default::default()
                    },
                )
                .expect("valid"),
            ),
            ..Default::default()
        };
        let e = hp
            .update("vm1", &mac(), None, &inbound)
            .await
            .expect_err("no sfq");
        assert_eq!(status::code(&e), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("sch_sfq"), "{e}");
        assert_eq!(fake.calls().len(), n0, "nothing was changed");
        // Outbound alone needs only police, which is there.
        let outbound = NicUpdate {
            outbound: Some(
                BandwidthChange::from_raw(
                    "outbound",
                    &RawBandwidth {
                        average_kbps: 100,
                        ..Default::default()
                    },
                )
                .expect("valid"),
            ),
            ..Default::default()
        };
        hp.update("vm1", &mac(), None, &outbound)
            .await
            .expect("police is present");
        hp.update("vm1", &mac(), None, &link(LinkState::Down))
            .await
            .expect("link needs no tc");

        // A stopped VM: only the definition changes, no tc is involved.
        let (fake, _) = setup(RunState::ShutOff).await;
        let hp = Hotplug::new(
            fake.clone(),
            None,
            HotplugConfig {
                tc: TcProbe::known(TcAbilities {
                    sfq: Ability::Missing,
                    police: Ability::Missing,
                }),
                ..HotplugConfig::default()
            },
        );
        hp.update("vm1", &mac(), None, &inbound)
            .await
            .expect("persistent definition");
        assert!(xml(&fake, Target::Config).contains("<inbound average=\"1000\""));
    }

    #[test]
    fn bad_bandwidth_names_the_field() {
        let e = BandwidthChange::from_raw(
            "outbound",
            &RawBandwidth {
                peak_kbps: 10,
                ..Default::default()
            },
        )
        .expect_err("peak without average");
        assert!(e.to_string().contains("outbound.average_kbps"), "{e}");
    }

    #[tokio::test]
    async fn unknown_mac_is_not_found_and_nothing_is_called() {
        let (fake, hp) = setup(RunState::Running).await;
        let n0 = fake.calls().len();
        let other = MacAddr::try_from("52:54:00:0d:00:99").expect("mac");
        let e = hp
            .update("vm1", &other, None, &link(LinkState::Down))
            .await
            .expect_err("unknown");
        assert!(matches!(e, HotplugError::NicNotFound { .. }), "{e:?}");
        assert_eq!(status::code(&e), tonic::Code::NotFound);
        let alias = Alias::try_from("ua-other").expect("alias");
        let e = hp
            .update("vm1", &mac(), Some(&alias), &link(LinkState::Down))
            .await
            .expect_err("wrong alias");
        assert!(matches!(e, HotplugError::NicNotFound { .. }), "{e:?}");
        let e = hp
            .update("vm1", &mac(), None, &NicUpdate::default())
            .await
            .expect_err("empty");
        assert_eq!(status::code(&e), tonic::Code::InvalidArgument);
        assert_eq!(fake.calls().len(), n0);
    }

    #[tokio::test]
    async fn config_failure_puts_the_live_definition_back() {
        let (fake, hp) = setup(RunState::Running).await;
        *fake.fail_next.lock().expect("lock") =
            Some(("update", Target::Config, HvErrorKind::Internal));
        let e = hp
            .update("vm1", &mac(), None, &link(LinkState::Down))
            .await
            .expect_err("config fails");
        assert!(matches!(e, HotplugError::Hypervisor(_)), "{e:?}");
        let calls: Vec<(&str, Target)> = fake.calls().iter().map(|c| (c.op, c.target)).collect();
        assert_eq!(
            calls[calls.len() - 3..],
            [
                ("update", Target::Live),
                ("update", Target::Config),
                ("update", Target::Live)
            ]
        );
        let nics = hp.list_nics("vm1").await.expect("list");
        assert_eq!(nics[0].link_state, "up", "live link restored");
    }

    #[tokio::test]
    async fn stopped_vm_updates_config_only_and_unsupported_driver_is_unimplemented() {
        let (fake, hp) = setup(RunState::ShutOff).await;
        let n0 = fake.calls().len();
        let nic = hp
            .update("vm1", &mac(), None, &link(LinkState::Down))
            .await
            .expect("config update");
        assert!(!nic.in_live && nic.in_config && nic.link_state == "down");
        let ops: Vec<(&str, Target)> = fake.calls()[n0..]
            .iter()
            .map(|c| (c.op, c.target))
            .collect();
        assert_eq!(ops, vec![("update", Target::Config)]);
        // A driver without device update (libvirt's test driver) answers
        // UNIMPLEMENTED, not INTERNAL.
        *fake.fail_next.lock().expect("lock") =
            Some(("update", Target::Config, HvErrorKind::Unsupported));
        let e = hp
            .update("vm1", &mac(), None, &link(LinkState::Up))
            .await
            .expect_err("unsupported");
        assert_eq!(status::code(&e), tonic::Code::Unimplemented, "{e}");
    }
}
