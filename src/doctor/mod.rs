//! `Diagnose` (the CLI's `doctor`): walk one NIC's path hop by hop and say
//! which hop is broken.
//!
//! It lives apart from [`crate::hotplug`] because it changes nothing: it is
//! not a transaction, it only reads the domain and the host.
//!
//! The hops follow the troubleshooting matrix an operator would walk by
//! hand: the NIC in the domain XML, its tap, the bridge, the bridge's
//! VLAN/VXLAN device, MTU along the path, promiscuous (IDS) state, the tap's
//! counters, and the guest MAC in the bridge's FDB. Each hop gets a status,
//! the evidence actually read (names and numbers), and a fix.
//!
//! The verdicts are a pure function ([`hops`]) of the domain's interface
//! view and the host facts read by [`crate::host::HostNet::inspect`], so
//! every verdict is unit-tested on plain inputs; [`Hotplug::diagnose`] only
//! gathers those inputs. Diagnosis never changes anything.

use serde::Serialize;

use crate::host::vxlan::VxlanDevice;
use crate::host::{naming, HostFacts, InspectQuery, LinkFacts, VxlanExpected, AGENT_ALIAS};
use crate::hotplug::report::{self, NicReport};
use crate::hotplug::{Hotplug, HotplugError, IDS_ALIAS_PREFIX};
use crate::nic::{MacAddr, Segment, VlanId, Vni};
use crate::xml::domain::InterfaceView;

/// Hop names, in the order they are reported. Stable: clients match on them.
pub mod hop {
    /// The NIC in the live (and persistent) domain XML.
    pub const XML: &str = "xml";
    /// The tap: exists, up, in the right bridge (and VLAN tag on OVS).
    pub const TAP: &str = "tap";
    /// The bridge exists and is up.
    pub const BRIDGE: &str = "bridge";
    /// The bridge's VXLAN/VLAN device (brvx-N / br<pif>-N bridges).
    pub const SEGMENT: &str = "segment";
    /// The physical uplink the traffic leaves by: carrier, speed, errors,
    /// and CRC errors over two samples a second apart.
    pub const UPLINK: &str = "uplink";
    /// guest <mtu> ≤ tap ≤ bridge, underlay ≥ bridge + 50 for VXLAN (70
    /// on an IPv6 underlay).
    pub const MTU: &str = "mtu";
    /// Promiscuous state and tc mirror filters match the IDS NICs on the
    /// bridge; a flooding bridge (ageing 0) is a warning.
    pub const PROMISC: &str = "promisc";
    /// The tap's packet counters.
    pub const COUNTERS: &str = "counters";
    /// The guest MAC learned in the bridge FDB.
    pub const FDB: &str = "fdb";
    /// What CloudStack intended (the caller's broadcast URI) against what
    /// the host carries; only when the caller gives the URI.
    pub const INTENT: &str = "intent";
}

/// How a hop looks. Ordered: `Ok < Warning < Fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum HopStatus {
    /// Checked and as expected.
    Ok,
    /// Not checked, or suspicious but not proven broken.
    Warning,
    /// Broken: traffic cannot pass this hop as it is.
    Fault,
}

impl HopStatus {
    /// `OK`, `WARNING` or `FAULT`.
    pub fn as_str(self) -> &'static str {
        match self {
            HopStatus::Ok => "OK",
            HopStatus::Warning => "WARNING",
            HopStatus::Fault => "FAULT",
        }
    }
}

/// One hop of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hop {
    /// One of the [`hop`] names.
    pub name: &'static str,
    /// The verdict.
    pub status: HopStatus,
    /// What was read: names and numbers.
    pub evidence: String,
    /// What to do; empty when nothing is to be done.
    pub fix: String,
}

/// The whole report for one NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnosis {
    /// The NIC as libvirt reports it; `None` when no NIC has that MAC.
    pub nic: Option<NicReport>,
    /// The hops, in [`hop`] order.
    pub hops: Vec<Hop>,
}

impl Diagnosis {
    /// The worst status of any hop.
    pub fn worst(&self) -> HopStatus {
        self.hops
            .iter()
            .map(|h| h.status)
            .max()
            .unwrap_or(HopStatus::Ok)
    }
}

/// The VLAN/VXLAN device a bridge's name implies (CloudStack naming).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedSegment {
    /// `brvx-N` carries `vxlanN` with VNI N; its group, port and underlay
    /// follow this host's VXLAN configuration ([`VxlanExpected`]).
    Vxlan {
        /// Device name.
        dev: String,
        /// VNI.
        vni: u32,
    },
    /// `br<pif>-N` carries `<pif>.N`, 802.1Q id N.
    Vlan {
        /// Device name.
        dev: String,
        /// The physical parent.
        parent: String,
        /// VLAN id.
        id: u16,
    },
}

impl ExpectedSegment {
    /// The device's link name.
    pub fn dev(&self) -> &str {
        match self {
            ExpectedSegment::Vxlan { dev, .. } | ExpectedSegment::Vlan { dev, .. } => dev,
        }
    }
}

/// The segment device expected in `bridge`, from its name: `brvx-N` →
/// `vxlanN`, `br<pif>-N` → `<pif>.N`; `None` for any other bridge.
pub fn expected_segment(bridge: &str) -> Option<ExpectedSegment> {
    if let Some(n) = bridge.strip_prefix("brvx-") {
        let vni = Vni::try_from(n.parse::<u32>().ok()?).ok()?;
        return Some(ExpectedSegment::Vxlan {
            dev: naming::vxlan_device(vni.get()),
            vni: vni.get(),
        });
    }
    let (pif, id) = bridge.strip_prefix("br")?.rsplit_once('-')?;
    if pif.is_empty() || !naming::looks_physical(pif) {
        return None;
    }
    let id = VlanId::try_from(id.parse::<u32>().ok()?).ok()?;
    Some(ExpectedSegment::Vlan {
        dev: naming::vlan_device(pif, id.get()),
        parent: pif.to_string(),
        id: id.get(),
    })
}

/// The segment device expected in `bridge`: from its name, or, for a
/// VLAN bridge whose name was shortened to fit 15 bytes, from the
/// `(pif, vlan)` the inspection recomputed it from
/// ([`naming::decode_vlan_bridge`]).
fn expected_in(bridge: &str, ovs: bool, f: &HostFacts) -> Option<ExpectedSegment> {
    if ovs {
        return None;
    }
    expected_segment(bridge).or_else(|| {
        let (pif, id) = f.decoded_vlan_bridge.as_ref()?;
        Some(ExpectedSegment::Vlan {
            dev: naming::vlan_device(pif, *id),
            parent: pif.clone(),
            id: *id,
        })
    })
}

/// What the host side looked like to the diagnosis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostInput<'a> {
    /// The agent does not manage host networking.
    Off,
    /// Host networking is on but the path could not be read (the reason).
    Unreadable(String),
    /// The facts read.
    Facts(&'a HostFacts),
}

/// Everything [`hops`] judges.
#[derive(Debug, Clone)]
pub struct DiagnoseInput<'a> {
    /// Domain name.
    pub vm: &'a str,
    /// The MAC asked about.
    pub mac: &'a str,
    /// The domain is running (has a live definition).
    pub running: bool,
    /// The domain has a persistent definition.
    pub persistent: bool,
    /// NICs with this MAC in the live XML.
    pub live: Vec<&'a InterfaceView>,
    /// NICs with this MAC in the persistent XML.
    pub config: Vec<&'a InterfaceView>,
    /// IDS NICs (alias `ua-ids-…`) on this NIC's bridge across all running
    /// domains, this NIC included.
    pub ids_on_bridge: usize,
    /// The taps of those IDS NICs (the bridge's sensors).
    pub ids_taps: Vec<String>,
    /// The host side.
    pub host: HostInput<'a>,
    /// The segment CloudStack intended (from the caller's broadcast URI).
    pub intended: Option<Segment>,
}

/// A hop under construction: the worst status wins, evidence and fixes
/// accumulate.
struct Acc {
    name: &'static str,
    status: HopStatus,
    evidence: Vec<String>,
    fix: Vec<String>,
}

impl Acc {
    fn new(name: &'static str) -> Self {
        Acc {
            name,
            status: HopStatus::Ok,
            evidence: Vec::new(),
            fix: Vec::new(),
        }
    }
    fn ok(&mut self, e: impl Into<String>) {
        self.evidence.push(e.into());
    }
    fn bad(&mut self, s: HopStatus, e: impl Into<String>, fix: impl Into<String>) {
        self.status = self.status.max(s);
        self.evidence.push(e.into());
        let f = fix.into();
        if !f.is_empty() && !self.fix.contains(&f) {
            self.fix.push(f);
        }
    }
    fn done(self) -> Hop {
        Hop {
            name: self.name,
            status: self.status,
            evidence: self.evidence.join("; "),
            fix: self.fix.join("; "),
        }
    }
}

fn warn_all(names: &[&'static str], why: &str, fix: &str) -> Vec<Hop> {
    names
        .iter()
        .map(|n| Hop {
            name: n,
            status: HopStatus::Warning,
            evidence: why.to_string(),
            fix: fix.to_string(),
        })
        .collect()
}

const HOST_HOPS: [&str; 8] = [
    hop::TAP,
    hop::BRIDGE,
    hop::SEGMENT,
    hop::UPLINK,
    hop::MTU,
    hop::PROMISC,
    hop::COUNTERS,
    hop::FDB,
];

fn is_ids(i: &InterfaceView) -> bool {
    i.alias
        .as_deref()
        .is_some_and(|a| a.starts_with(IDS_ALIAS_PREFIX))
}

fn xml_hop(d: &DiagnoseInput<'_>) -> Hop {
    let mut h = Acc::new(hop::XML);
    let nic = d.live.first().or(d.config.first());
    match (d.running, d.live.first(), d.config.first()) {
        (_, None, None) => h.bad(
            HopStatus::Fault,
            format!("no NIC with MAC {} in vm {}", d.mac, d.vm),
            format!("check the MAC: nic-agent list --vm {}", d.vm),
        ),
        (true, Some(l), c) => {
            h.ok(format!(
                "in the live XML (alias {}, target {}, bridge {})",
                l.alias.as_deref().unwrap_or("-"),
                l.target.as_deref().unwrap_or("-"),
                l.source.as_deref().unwrap_or("-")
            ));
            match (d.persistent, c) {
                (true, Some(_)) => h.ok("in the persistent XML"),
                (true, None) => h.bad(
                    HopStatus::Warning,
                    "not in the persistent XML: the NIC is lost when the VM restarts",
                    format!(
                        "add it to the persistent definition (virsh attach-device {} NIC.xml --config)",
                        d.vm
                    ),
                ),
                (false, _) => h.ok("transient VM: no persistent XML"),
            }
        }
        (true, None, Some(_)) => h.bad(
            HopStatus::Fault,
            "in the persistent XML only: the running guest does not have this NIC",
            format!(
                "hot-plug it (virsh attach-device {} NIC.xml --live) or restart the VM",
                d.vm
            ),
        ),
        // A domain that is not running has no live XML, so `config` holds it.
        (false, _, _) => h.ok(format!(
            "vm {} is not running; the NIC is in its persistent XML",
            d.vm
        )),
    }
    if d.live.len() > 1 || d.config.len() > 1 {
        h.bad(
            HopStatus::Warning,
            format!(
                "{} NICs share MAC {} (live {}, persistent {}); the first is diagnosed",
                d.live.len().max(d.config.len()),
                d.mac,
                d.live.len(),
                d.config.len()
            ),
            "give each NIC a unique MAC",
        );
    }
    if let Some(i) = nic {
        if i.link.as_deref() == Some("down") {
            h.bad(
                HopStatus::Warning,
                "link state is down in the XML: the guest sees no carrier",
                format!(
                    "virsh domif-setlink {} {} up",
                    d.vm,
                    i.target.as_deref().unwrap_or(d.mac)
                ),
            );
        }
    }
    h.done()
}

fn link_summary(l: &LinkFacts) -> String {
    format!(
        "{} ({}, {}, mtu {})",
        l.name,
        if l.kind.is_empty() { "link" } else { &l.kind },
        if l.up { "up" } else { "down" },
        l.mtu
    )
}

fn tap_hop(i: &InterfaceView, tap: Option<&str>, bridge: &str, ovs: bool, f: &HostFacts) -> Hop {
    let mut h = Acc::new(hop::TAP);
    let Some(tap) = tap else {
        h.bad(
            HopStatus::Fault,
            "libvirt reports no <target dev> (tap) for this NIC",
            "detach and attach the NIC again so libvirt creates its tap",
        );
        return h.done();
    };
    let Some(t) = &f.tap else {
        h.bad(
            HopStatus::Fault,
            format!("tap {tap} does not exist on the host"),
            "detach and attach the NIC again so libvirt re-creates its tap",
        );
        return h.done();
    };
    h.ok(link_summary(t));
    // Reported, not judged: the right length depends on the workload, but
    // a tap dropping bursts shows up as tx drops next to this number.
    if let Some(q) = t.tx_queue_len {
        h.ok(format!("txqueuelen {q}"));
    }
    if !t.up {
        h.bad(
            HopStatus::Fault,
            format!("{tap} is down"),
            format!("ip link set {tap} up"),
        );
    } else if !t.lower_up {
        h.bad(
            HopStatus::Warning,
            format!("{tap} has no carrier (QEMU not attached, or link down in the XML)"),
            String::new(),
        );
    }
    if ovs {
        let o = f.ovs.clone().unwrap_or_default();
        match o.port_bridge.as_deref() {
            Some(b) if b == bridge => h.ok(format!("port of OVS bridge {b}")),
            Some(b) => h.bad(
                HopStatus::Fault,
                format!("port of OVS bridge {b}, expected {bridge}"),
                format!("ovs-vsctl del-port {b} {tap} -- add-port {bridge} {tap}"),
            ),
            None => h.bad(
                HopStatus::Fault,
                format!("{tap} is not a port of any OVS bridge (expected {bridge})"),
                format!(
                    "ovs-vsctl add-port {bridge} {tap}{}",
                    i.vlan.map(|v| format!(" tag={v}")).unwrap_or_default()
                ),
            ),
        }
        if o.port_bridge.is_some() {
            match (i.vlan, o.tag) {
                (Some(want), Some(have)) if want == have => h.ok(format!("VLAN tag {have}")),
                (None, None) => h.ok("untagged, as in the XML"),
                (want, have) => h.bad(
                    HopStatus::Fault,
                    format!(
                        "VLAN tag {} on the port, XML says {}",
                        have.map_or("none".into(), |v| v.to_string()),
                        want.map_or("none".into(), |v| v.to_string())
                    ),
                    match want {
                        Some(v) => format!("ovs-vsctl set port {tap} tag={v}"),
                        None => format!("ovs-vsctl remove port {tap} tag {}", have.unwrap_or(0)),
                    },
                ),
            }
        }
    } else {
        match t.master.as_deref() {
            Some(m) if m == bridge => h.ok(format!("enslaved to {m}")),
            Some(m) => h.bad(
                HopStatus::Fault,
                format!("{tap} is enslaved to {m}, expected {bridge}"),
                format!("ip link set {tap} master {bridge}"),
            ),
            None => h.bad(
                HopStatus::Fault,
                format!("{tap} has no master (expected bridge {bridge})"),
                format!("ip link set {tap} master {bridge}"),
            ),
        }
    }
    h.done()
}

fn bridge_hop(bridge: &str, ovs: bool, f: &HostFacts) -> Hop {
    let mut h = Acc::new(hop::BRIDGE);
    if ovs {
        let exists = f.ovs.as_ref().is_some_and(|o| o.bridge_exists);
        if exists {
            h.ok(format!("OVS bridge {bridge} exists"));
        } else {
            h.bad(
                HopStatus::Fault,
                format!("OVS bridge {bridge} does not exist"),
                format!("ovs-vsctl add-br {bridge}"),
            );
        }
        return h.done();
    }
    match &f.bridge {
        None => h.bad(
            HopStatus::Fault,
            format!("bridge {bridge} does not exist"),
            format!("ip link add {bridge} type bridge && ip link set {bridge} up"),
        ),
        Some(b) if b.kind != "bridge" => h.bad(
            HopStatus::Fault,
            format!("{bridge} is a {} link, not a bridge", b.kind),
            format!("rename or remove {bridge}; the NIC needs a bridge of that name"),
        ),
        Some(b) => {
            h.ok(link_summary(b));
            if !b.up {
                h.bad(
                    HopStatus::Fault,
                    format!("{bridge} is down"),
                    format!("ip link set {bridge} up"),
                );
            }
        }
    }
    h.done()
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "none".to_string(), |x| x.to_string())
}

/// Judges a VXLAN device found on the host against the one this host's
/// configuration makes, with the attach's own comparison
/// ([`VxlanDevice::differences`]), so doctor and attach agree on what is
/// wrong.
fn vxlan_against_config(
    h: &mut Acc,
    s: &LinkFacts,
    found: &crate::host::VxlanFacts,
    want: &VxlanDevice,
    e: &VxlanExpected,
    ours: bool,
) {
    let diffs = want.differences(found, e.kernel_port);
    if diffs.is_empty() {
        let mut ev = format!("vni {}", want.vni.get());
        if let Some(g) = want.group {
            ev.push_str(&format!(", group {g}"));
        }
        if let Some(l) = want.local {
            ev.push_str(&format!(", local {l}"));
        }
        let port = want.effective_port(e.kernel_port);
        ev.push_str(&format!(", port {port}, as vxlan.flavour {}", want.flavour));
        h.ok(ev);
        return;
    }
    for d in diffs {
        h.bad(
            HopStatus::Fault,
            format!("{} {d}", s.name),
            want.mismatch_fix(ours),
        );
    }
}

/// The fix for a missing `vxlanN`: let the agent make it again, or the
/// command this host's configuration would run.
fn missing_vxlan_fix(vni: u32, bridge: &str, f: &HostFacts) -> String {
    let again = format!("attach a NIC with vxlan://{vni} (the agent re-creates it)");
    match f.vxlan_expected.as_ref().map(|e| (&e.device, e)) {
        Some((Ok(d), e)) => {
            let mut s = format!(
                "{again}, or: {} && ip link set {} master {bridge} up",
                d.ip_command(),
                d.name
            );
            if e.family_guessed {
                let v6 = crate::host::vxlan::group_v6(d.vni);
                s.push_str(&format!(
                    " (an IPv6 underlay takes `ip -f inet6` and group {v6})"
                ));
            }
            s
        }
        Some((Err(why), _)) => format!("{why}; then {again}"),
        None => again,
    }
}

fn segment_hop(bridge: &str, ovs: bool, f: &HostFacts) -> Hop {
    let mut h = Acc::new(hop::SEGMENT);
    let expected = expected_in(bridge, ovs, f);
    if let (Some(_), None, Some((pif, id))) =
        (&expected, expected_segment(bridge), &f.decoded_vlan_bridge)
    {
        h.ok(format!(
            "{bridge} is the 15-byte name of br{pif}-{id} (recomputed from the segment)"
        ));
    }
    let Some(exp) = expected else {
        h.ok(format!(
            "{bridge} is not a brvx-N or br<pif>-N bridge: no segment device to check"
        ));
        return h.done();
    };
    let dev = exp.dev();
    let Some(s) = &f.segment else {
        let recreate = match &exp {
            ExpectedSegment::Vxlan { vni, .. } => missing_vxlan_fix(*vni, bridge, f),
            ExpectedSegment::Vlan { parent, id, .. } => format!(
                "ip link add link {parent} name {dev} type vlan id {id} && ip link set {dev} master {bridge} up"
            ),
        };
        h.bad(
            HopStatus::Fault,
            format!("{dev} does not exist: {bridge} is cut off from the network"),
            recreate,
        );
        return h.done();
    };
    h.ok(link_summary(s));
    match &exp {
        ExpectedSegment::Vxlan { vni, .. } => {
            let Some(v) = &s.vxlan else {
                h.bad(
                    HopStatus::Fault,
                    format!("{dev} is a {} link, not vxlan", s.kind),
                    format!("remove {dev} and re-attach a NIC with vxlan://{vni}"),
                );
                return h.done();
            };
            let ours = s.alias.as_deref() == Some(AGENT_ALIAS);
            match f.vxlan_expected.as_ref().map(|e| (&e.device, e)) {
                Some((Ok(want), e)) => vxlan_against_config(&mut h, s, v, want, e, ours),
                Some((Err(why), _)) => h.bad(
                    HopStatus::Fault,
                    format!("this host's VXLAN configuration cannot make {dev}: {why}"),
                    why.clone(),
                ),
                // Facts from a host backend that does not say what it would
                // make: only the VNI can be judged.
                None if v.vni == Some(*vni) => h.ok(format!("vni {vni}")),
                None => h.bad(
                    HopStatus::Fault,
                    format!("{dev} has VNI {}, expected {vni}", opt(v.vni)),
                    format!("delete {dev} and re-attach a NIC with vxlan://{vni}"),
                ),
            }
            let want_underlay = f
                .vxlan_expected
                .as_ref()
                .and_then(|e| e.device.as_ref().ok())
                .is_none_or(|d| d.underlay.is_some());
            match (&v.underlay, &f.underlay) {
                // evpn devices have no `dev`: FRR routes the underlay.
                (None, _) if !want_underlay => {}
                (None, _) => h.bad(
                    HopStatus::Fault,
                    format!("{dev} has no underlay device (dev)"),
                    format!("delete {dev} and re-create it with dev <label bridge>"),
                ),
                (Some(u), None) => h.bad(
                    HopStatus::Fault,
                    format!("underlay {u} not found"),
                    format!("bring back {u}"),
                ),
                (Some(u), Some(ul)) if !ul.up => h.bad(
                    HopStatus::Fault,
                    format!("underlay {u} is down"),
                    format!("ip link set {u} up"),
                ),
                (Some(u), Some(_)) => h.ok(format!("underlay {u} up")),
            }
        }
        ExpectedSegment::Vlan { id, parent, .. } => {
            let Some(v) = &s.vlan else {
                h.bad(
                    HopStatus::Fault,
                    format!("{dev} is a {} link, not vlan", s.kind),
                    format!("remove {dev} and re-attach a NIC with vlan://{id}"),
                );
                return h.done();
            };
            if v.id == Some(*id) {
                h.ok(format!("vlan id {id}"));
            } else {
                h.bad(
                    HopStatus::Fault,
                    format!(
                        "vlan id {}, expected {id}",
                        v.id.map_or("none".into(), |n| n.to_string())
                    ),
                    format!("delete {dev} and re-create it with id {id}"),
                );
            }
            if v.parent.as_deref() != Some(parent.as_str()) {
                h.bad(
                    HopStatus::Fault,
                    format!(
                        "parent {}, expected {parent}",
                        v.parent.as_deref().unwrap_or("none")
                    ),
                    format!("delete {dev} and re-create it on {parent}"),
                );
            }
        }
    }
    if !s.up {
        h.bad(
            HopStatus::Fault,
            format!("{dev} is down"),
            format!("ip link set {dev} up"),
        );
    }
    match s.master.as_deref() {
        Some(m) if m == bridge => h.ok(format!("enslaved to {bridge}")),
        other => h.bad(
            HopStatus::Fault,
            format!(
                "{dev} is enslaved to {}, expected {bridge}",
                other.unwrap_or("nothing")
            ),
            format!("ip link set {dev} master {bridge}"),
        ),
    }
    h.done()
}

fn mtu_hop(i: &InterfaceView, bridge: &str, ovs: bool, f: &HostFacts) -> Hop {
    let mut h = Acc::new(hop::MTU);
    // Without <mtu>, virtio-net tells the guest 1500 whatever the tap has.
    let guest = i.mtu.unwrap_or(1500);
    h.ok(match i.mtu {
        Some(m) => format!("guest {m} (<mtu>)"),
        None => "guest 1500 (no <mtu> in the XML)".to_string(),
    });
    let tap = f.tap.as_ref();
    if let Some(t) = tap {
        h.ok(format!("tap {} {}", t.name, t.mtu));
        if guest > t.mtu {
            let fix = if i.mtu.is_none() {
                format!(
                    "give the NIC <mtu size='{}'/> (re-attach with --mtu {})",
                    t.mtu, t.mtu
                )
            } else {
                format!(
                    "re-attach with --mtu {} or raise {} to {guest}",
                    t.mtu, t.name
                )
            };
            h.bad(
                HopStatus::Fault,
                format!("guest MTU {guest} > tap {} MTU {}", t.name, t.mtu),
                fix,
            );
        }
    }
    if ovs {
        if tap.is_none() {
            h.bad(HopStatus::Warning, "tap not found: MTU not compared", "");
        }
        return h.done();
    }
    let Some(b) = &f.bridge else {
        h.bad(
            HopStatus::Warning,
            format!("bridge {bridge} not found: MTU not compared"),
            "",
        );
        return h.done();
    };
    h.ok(format!("bridge {} {}", b.name, b.mtu));
    if let Some(t) = tap {
        if t.mtu > b.mtu {
            h.bad(
                HopStatus::Fault,
                format!(
                    "tap {} MTU {} > bridge {} MTU {}",
                    t.name, t.mtu, b.name, b.mtu
                ),
                format!(
                    "raise {} MTU to {} (ip link set {} mtu {}) or lower {} to {}",
                    b.name, t.mtu, b.name, t.mtu, t.name, b.mtu
                ),
            );
        }
    } else {
        h.bad(
            HopStatus::Warning,
            "tap not found: tap MTU not compared",
            "",
        );
    }
    if let Some(s) = &f.segment {
        h.ok(format!("{} {}", s.name, s.mtu));
        if s.mtu < b.mtu {
            h.bad(
                HopStatus::Fault,
                format!("{} MTU {} < bridge MTU {}", s.name, s.mtu, b.mtu),
                format!("ip link set {} mtu {}", s.name, b.mtu),
            );
        }
        if let Some(v) = &s.vxlan {
            // The encapsulation of the device as configured; IPv6 takes 70.
            let overhead = match f.vxlan_expected.as_ref().map(|e| &e.device) {
                Some(Ok(d)) => d.overhead(),
                _ if v.group.or(v.local).is_some_and(|a| a.is_ipv6()) => {
                    crate::host::mtu::VXLAN_IPV6_OVERHEAD
                }
                _ => crate::host::mtu::VXLAN_IPV4_OVERHEAD,
            };
            if let Some(u) = &f.underlay {
                let need = b.mtu.saturating_add(overhead);
                h.ok(format!("underlay {} {} (needs ≥ {need})", u.name, u.mtu));
                if u.mtu < need {
                    h.bad(
                        HopStatus::Fault,
                        format!(
                            "underlay {} MTU {} < bridge {} + {overhead} VXLAN overhead",
                            u.name, u.mtu, b.mtu
                        ),
                        format!(
                            "raise {} MTU to {need} (ip link set {} mtu {need}) or lower {} to {}",
                            u.name,
                            u.name,
                            b.name,
                            u.mtu.saturating_sub(overhead)
                        ),
                    );
                }
            }
        }
    }
    h.done()
}

fn promisc_hop(
    i: &InterfaceView,
    tap: Option<&str>,
    bridge: &str,
    ovs: bool,
    d: &DiagnoseInput<'_>,
    f: &HostFacts,
) -> Hop {
    let mut h = Acc::new(hop::PROMISC);
    let ids = is_ids(i);
    if ovs {
        let mirror = f.ovs.as_ref().is_some_and(|o| o.mirror);
        match (ids, mirror) {
            (true, true) => h.ok(format!(
                "IDS NIC; mirror to {} on {bridge}",
                tap.unwrap_or("-")
            )),
            (true, false) => h.bad(
                HopStatus::Fault,
                format!("IDS NIC but {bridge} has no mirror to it"),
                "detach and attach the NIC again (the agent adds the mirror)",
            ),
            (false, _) => h.ok("not an IDS NIC"),
        }
        return h.done();
    }
    let Some(b) = &f.bridge else {
        h.bad(
            HopStatus::Warning,
            format!("bridge {bridge} not found: not checked"),
            "",
        );
        return h.done();
    };
    let ageing = b.ageing.unwrap_or(30000);
    let ids_on_bridge = d.ids_on_bridge;
    h.ok(format!(
        "{bridge} promisc {}, ageing_time {ageing} cs, {ids_on_bridge} IDS NIC(s) on it",
        if b.promisc { "on" } else { "off" }
    ));
    if ids_on_bridge == 0 {
        if b.promisc || ageing == 0 {
            h.bad(
                HopStatus::Warning,
                format!("{bridge} is promiscuous/flooding but no IDS NIC is on it"),
                format!("ip link set {bridge} promisc off type bridge ageing_time 30000"),
            );
        }
        return h.done();
    }
    // IDS: the bridge is promiscuous and every other port copies its
    // ingress to each sensor with the agent's tc mirred filter.
    let (worst, whose) = if ids {
        (
            HopStatus::Fault,
            format!("this is an IDS NIC ({})", i.alias.as_deref().unwrap_or("")),
        )
    } else {
        (
            HopStatus::Warning,
            format!("{ids_on_bridge} IDS NIC(s) on {bridge}"),
        )
    };
    if !b.promisc {
        h.bad(
            worst,
            format!("{whose} but {bridge} is not promiscuous"),
            format!("ip link set {bridge} promisc on"),
        );
    }
    match &f.mirrors {
        None => h.bad(
            HopStatus::Warning,
            "mirror filters not read (tc failed)",
            "",
        ),
        Some(ports) => {
            let mut gaps = Vec::new();
            for s in &d.ids_taps {
                for (p, to) in ports {
                    if p != s && !to.contains(s) {
                        gaps.push((p.clone(), s.clone()));
                    }
                }
            }
            if gaps.is_empty() {
                h.ok(format!(
                    "{} port(s) mirror to {} sensor(s)",
                    ports.len(),
                    d.ids_taps.len()
                ));
            } else {
                let (p, s) = &gaps[0];
                h.bad(
                    worst,
                    format!(
                        "{whose} but {} port/sensor pair(s) lack the mirror filter (e.g. {p} to {s})",
                        gaps.len()
                    ),
                    format!(
                        "the agent re-adds them on its next reconcile or port change; by hand: tc filter add dev {p} ingress prio {} protocol all u32 match u32 0 0 action mirred egress mirror dev {s}",
                        crate::host::tcmirror::PRIO_BASE
                    ),
                );
            }
        }
    }
    if ageing == 0 {
        h.bad(
            HopStatus::Warning,
            format!("{bridge} has ageing_time 0: it floods every tenant on it; IDS copies come from tc mirror filters"),
            format!("ip link set {bridge} type bridge ageing_time 30000"),
        );
    }
    h.done()
}

fn uplink_hop(f: &HostFacts) -> Hop {
    let mut h = Acc::new(hop::UPLINK);
    let Some(u) = &f.uplink else {
        h.bad(
            HopStatus::Warning,
            format!(
                "no uplink: {}; traffic cannot leave this host",
                f.uplink_missing.as_deref().unwrap_or("none found")
            ),
            "",
        );
        return h.done();
    };
    let l = &u.link;
    let name = &l.name;
    let speed = match (u.speed_mbps, &u.speed_unknown) {
        (Some(s), _) => format!("{s} Mb/s"),
        (None, Some(why)) => format!("speed unknown ({why})"),
        (None, None) => "speed unknown".to_string(),
    };
    h.ok(format!("{name} ({}): {speed}", u.via));
    if !l.up {
        h.bad(
            HopStatus::Fault,
            format!("{name} is down"),
            format!("ip link set {name} up"),
        );
    } else if !l.lower_up {
        h.bad(
            HopStatus::Fault,
            format!("{name} has no carrier"),
            format!("check the cable and the switch port of {name}"),
        );
    } else {
        h.ok("carrier up");
    }
    let Some(c0) = l.counters else {
        h.bad(HopStatus::Warning, format!("no counters on {name}"), "");
        return h.done();
    };
    h.ok(format!(
        "errors {}/{} (rx/tx), rx_crc_errors {}",
        c0.rx_errors, c0.tx_errors, c0.rx_crc_errors
    ));
    let gap = crate::host::UPLINK_SAMPLE_GAP.as_secs_f32();
    let Some(c1) = u.later else {
        h.bad(
            HopStatus::Warning,
            format!("{name} could not be read a second time {gap} s later"),
            "",
        );
        return h.done();
    };
    let rose = |a: u64, b: u64| b.saturating_sub(a);
    let crc = rose(c0.rx_crc_errors, c1.rx_crc_errors);
    if crc > 0 {
        h.bad(
            HopStatus::Fault,
            format!(
                "rx_crc_errors rose {} -> {} (+{crc}) within {gap} s: frames are corrupted on the wire now",
                c0.rx_crc_errors, c1.rx_crc_errors
            ),
            format!("replace the cable or optic of {name}, or check its switch port"),
        );
    }
    let (rx, tx) = (
        rose(c0.rx_errors, c1.rx_errors),
        rose(c0.tx_errors, c1.tx_errors),
    );
    if rx + tx > crc {
        h.bad(
            HopStatus::Warning,
            format!("errors rose +{rx}/+{tx} (rx/tx) within {gap} s"),
            format!("ip -s -s link show {name}"),
        );
    }
    if crc == 0 && rx + tx == 0 {
        h.ok(format!("no new errors within {gap} s"));
    }
    h.done()
}

fn counters_hop(tap: Option<&str>, f: &HostFacts) -> Hop {
    let mut h = Acc::new(hop::COUNTERS);
    let Some(c) = f.tap.as_ref().and_then(|t| t.counters) else {
        h.bad(
            HopStatus::Warning,
            format!("no counters: tap {} not found", tap.unwrap_or("-")),
            "",
        );
        return h.done();
    };
    // A tap's rx is what the guest sent; its tx is what the guest was given.
    let (from, to) = (c.rx_packets, c.tx_packets);
    h.ok(format!(
        "from guest {from} pkts, to guest {to} pkts, drops {}/{}, errors {}/{} (rx/tx)",
        c.rx_dropped, c.tx_dropped, c.rx_errors, c.tx_errors
    ));
    match (from, to) {
        (0, 0) => h.bad(
            HopStatus::Warning,
            "no frames either way: the guest has not sent anything",
            "check inside the guest that the interface is up and configured",
        ),
        (f, 0) => h.bad(
            HopStatus::Warning,
            format!(
                "the guest sent {f} frames and received none: the \"DHCP request never answered\" signature; nothing comes back from the bridge"
            ),
            "check the tap, bridge and segment hops, and that a DHCP server answers on this network",
        ),
        (0, _) => h.bad(
            HopStatus::Warning,
            "the guest received frames but sent none: its interface is down or unconfigured",
            "check inside the guest (ip link, DHCP client)",
        ),
        _ => {}
    }
    let drops = c.rx_dropped + c.tx_dropped;
    let errors = c.rx_errors + c.tx_errors;
    if drops > 0 || errors > 0 {
        h.bad(
            HopStatus::Warning,
            format!("{drops} drops and {errors} errors on the tap"),
            "tx drops: the guest does not read its queue fast enough (or its link is down); errors: check the host log",
        );
    }
    h.done()
}

fn fdb_hop(mac: &str, tap: Option<&str>, bridge: &str, f: &HostFacts) -> Hop {
    let mut h = Acc::new(hop::FDB);
    if !f.fdb.read {
        h.bad(
            HopStatus::Warning,
            format!(
                "FDB of {bridge} not read{}",
                f.fdb
                    .error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            "",
        );
        return h.done();
    }
    if let Some(b) = &f.bridge {
        if b.kind == "bridge" && b.ageing == Some(0) {
            h.ok(format!(
                "{bridge} has ageing_time 0 (floods, learns nothing): the FDB proves nothing here; see counters"
            ));
            return h.done();
        }
    }
    let tap = tap.unwrap_or("");
    let in_bridge = match &f.ovs {
        Some(o) => o.port_bridge.as_deref() == Some(bridge),
        None => f
            .tap
            .as_ref()
            .is_some_and(|t| t.master.as_deref() == Some(bridge)),
    };
    if !in_bridge {
        // The kernel flushes a port's FDB entries when it leaves the bridge:
        // "not learned" would send the operator to the guest for nothing.
        h.bad(
            HopStatus::Warning,
            format!("tap {tap} is not a port of {bridge} (see the tap hop): nothing can be learned on it"),
            "",
        );
        return h.done();
    }
    let on_tap = f
        .fdb
        .learned_on
        .iter()
        .any(|p| p == tap || p.starts_with(&format!("{tap} ")));
    if f.fdb.learned_on.is_empty() {
        h.bad(
            HopStatus::Warning,
            format!("{mac} is not in the FDB of {bridge}: the guest has sent nothing lately"),
            "check the guest's interface is up; make it send (ping the gateway) and run doctor again",
        );
    } else if on_tap {
        h.ok(format!("{mac} learned on {}", f.fdb.learned_on.join(", ")));
    } else {
        h.bad(
            HopStatus::Warning,
            format!(
                "{mac} learned on {}, not on tap {tap}: another device uses this MAC, or the tap changed",
                f.fdb.learned_on.join(", ")
            ),
            format!("look for a duplicate MAC: bridge fdb show br {bridge} | grep -i {mac}"),
        );
    }
    h.done()
}

/// The verdict for every hop, from plain inputs. Always returns the eight
/// hops in [`hop`] order, plus the intent hop last when the caller gave
/// the intended segment and the host path was read.
pub fn hops(d: &DiagnoseInput<'_>) -> Vec<Hop> {
    let mut out = vec![xml_hop(d)];
    let Some(i) = d.live.first() else {
        let why = if d.config.is_empty() {
            "not inspected: the NIC is not in the domain".to_string()
        } else if d.running {
            "not inspected: the NIC is not in the running guest".to_string()
        } else {
            format!("not inspected: vm {} is not running (no tap)", d.vm)
        };
        out.extend(warn_all(&HOST_HOPS, &why, ""));
        return out;
    };
    let facts = match &d.host {
        HostInput::Off => {
            out.extend(warn_all(
                &HOST_HOPS,
                "host not inspected (host networking off)",
                "run the agent with --host-network on to inspect the host path",
            ));
            return out;
        }
        HostInput::Unreadable(e) => {
            out.extend(warn_all(
                &HOST_HOPS,
                &format!("host not inspected: {e}"),
                "",
            ));
            return out;
        }
        HostInput::Facts(f) => *f,
    };
    let Some(bridge) = i.source.as_deref().filter(|_| i.kind == "bridge") else {
        out.extend(warn_all(
            &HOST_HOPS,
            &format!(
                "not inspected: a type='{}' NIC; only bridge NICs are walked",
                i.kind
            ),
            "",
        ));
        return out;
    };
    let ovs = i.virtualport.as_deref() == Some("openvswitch");
    let tap = i.target.as_deref();
    out.push(tap_hop(i, tap, bridge, ovs, facts));
    out.push(bridge_hop(bridge, ovs, facts));
    out.push(segment_hop(bridge, ovs, facts));
    out.push(uplink_hop(facts));
    out.push(mtu_hop(i, bridge, ovs, facts));
    out.push(promisc_hop(i, tap, bridge, ovs, d, facts));
    out.push(counters_hop(tap, facts));
    out.push(fdb_hop(d.mac, tap, bridge, facts));
    if let Some(want) = d.intended {
        out.push(intent_hop(i, bridge, ovs, facts, want));
    }
    out
}

/// The segment the host gives this NIC: the OVS port's tag (what really
/// forwards; the XML's tag otherwise), or what a Linux bridge's name
/// encodes (`brvx-N`, `br<pif>-N`). `None` when the name encodes nothing
/// (a custom bridge, or a name shortened to a hash).
fn carried_segment(i: &InterfaceView, bridge: &str, ovs: bool, f: &HostFacts) -> Option<Segment> {
    if ovs {
        let tag = f.ovs.as_ref().and_then(|o| o.tag).or(i.vlan);
        return Some(match tag {
            Some(t) => VlanId::try_from(t).map_or(Segment::Untagged, Segment::Vlan),
            None => Segment::Untagged,
        });
    }
    match expected_in(bridge, ovs, f)? {
        ExpectedSegment::Vxlan { vni, .. } => Vni::try_from(vni).ok().map(Segment::Vxlan),
        ExpectedSegment::Vlan { id, .. } => VlanId::try_from(u32::from(id)).ok().map(Segment::Vlan),
    }
}

fn intent_hop(i: &InterfaceView, bridge: &str, ovs: bool, f: &HostFacts, want: Segment) -> Hop {
    let mut h = Acc::new(hop::INTENT);
    // Plain and untagged are the same on the wire: no tag.
    let norm = |s: Segment| match s {
        Segment::Plain => Segment::Untagged,
        s => s,
    };
    let Some(have) = carried_segment(i, bridge, ovs, f) else {
        if matches!(want, Segment::Plain | Segment::Untagged) {
            h.ok(format!(
                "CloudStack intended {want}; {bridge} carries no tag by name"
            ));
        } else {
            h.bad(
                HopStatus::Warning,
                format!(
                    "CloudStack intended {want}; {bridge}'s name does not say which segment it carries, so it cannot be compared"
                ),
                String::new(),
            );
        }
        return h.done();
    };
    let where_ = if ovs {
        format!("the OVS port tag on {bridge}")
    } else {
        format!("bridge {bridge}")
    };
    // The name says what the bridge should carry; the device in it says
    // what it does carry. Both must be the intended segment.
    let device = f.segment.as_ref().filter(|_| !ovs).and_then(|s| {
        let seg = match (&s.vxlan, &s.vlan) {
            (Some(v), _) => v
                .vni
                .and_then(|n| Vni::try_from(n).ok())
                .map(Segment::Vxlan),
            (None, Some(v)) => {
                v.id.and_then(|n| VlanId::try_from(u32::from(n)).ok())
                    .map(Segment::Vlan)
            }
            _ => None,
        }?;
        Some((s.name.clone(), seg))
    });
    if let Some((dev, seg)) = device.filter(|(_, seg)| norm(*seg) != norm(want)) {
        h.bad(
            HopStatus::Fault,
            format!("CloudStack intended {want}, but {dev} in {bridge} carries {seg}"),
            format!("detach the NIC and attach it again with --broadcast-uri {want}"),
        );
    }
    if norm(have) == norm(want) {
        h.ok(format!(
            "CloudStack intended {want}; {where_} carries {have}"
        ));
    } else {
        h.bad(
            HopStatus::Fault,
            format!("CloudStack intended {want}, but {where_} carries {have}"),
            format!("detach the NIC and attach it again with --broadcast-uri {want}"),
        );
    }
    h.done()
}

impl Hotplug {
    /// Walks one NIC's path and reports every hop. Reads only.
    /// `intended` is the segment CloudStack meant (its broadcast URI).
    pub async fn diagnose(
        &self,
        vm: &str,
        mac: &MacAddr,
        intended: Option<Segment>,
    ) -> Result<Diagnosis, HotplugError> {
        let dom = self.lookup(vm).await?;
        let (live, config) = self.views(&dom).await?;
        let mac_s = mac.to_string();
        let live_nics = live
            .as_ref()
            .map(|v| v.interface_by_mac(&mac_s))
            .unwrap_or_default();
        let config_nics = config
            .as_ref()
            .map(|v| v.interface_by_mac(&mac_s))
            .unwrap_or_default();
        let mut facts = None;
        let mut unreadable = None;
        let mut ids_on_bridge = 0;
        let mut ids_taps = Vec::new();
        if let (Some(host), Some(i)) = (&self.host, live_nics.first()) {
            if let Some(bridge) = i.source.clone().filter(|_| i.kind == "bridge") {
                let ovs = i.virtualport.as_deref() == Some("openvswitch");
                let expected = (!ovs).then(|| expected_segment(&bridge)).flatten();
                let q = InspectQuery {
                    intended_vlan: match intended {
                        Some(Segment::Vlan(v)) => Some(v.get()),
                        _ => None,
                    },
                    tap: i.target.clone(),
                    segment: expected.as_ref().map(|s| s.dev().to_string()),
                    vxlan: match &expected {
                        Some(ExpectedSegment::Vxlan { vni, .. }) => Vni::try_from(*vni).ok(),
                        _ => None,
                    },
                    bridge: bridge.clone(),
                    ovs,
                    mac: mac_s.clone(),
                };
                match host.inspect(&q).await {
                    Ok(f) => facts = Some(f),
                    Err(e) => unreadable = Some(e.to_string()),
                }
                (ids_on_bridge, ids_taps) = self.ids_nics(&bridge).await?;
            }
        }
        let host = match (&self.host, &facts, unreadable) {
            (None, _, _) => HostInput::Off,
            (Some(_), Some(f), _) => HostInput::Facts(f),
            (Some(_), None, Some(e)) => HostInput::Unreadable(e),
            // Nothing inspected because the NIC is not a live bridge NIC;
            // hops() says why without looking at host facts.
            (Some(_), None, None) => HostInput::Unreadable("no live bridge NIC".into()),
        };
        let input = DiagnoseInput {
            vm: &dom.name,
            mac: &mac_s,
            running: dom.state.is_live(),
            persistent: dom.persistent,
            live: live_nics.clone(),
            config: config_nics,
            ids_on_bridge,
            ids_taps,
            host,
            intended,
        };
        let hops = hops(&input);
        let nic = report::merge(live.as_ref(), config.as_ref())
            .into_iter()
            .find(|n| n.mac == mac_s);
        let worst = hops.iter().map(|h| h.status).max();
        tracing::info!(vm = %dom.name, mac = %mac_s, worst = ?worst, "diagnosed");
        Ok(Diagnosis { nic, hops })
    }
}

#[cfg(test)]
mod tests;
