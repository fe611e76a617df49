//! Read-only inspection of one NIC's host path, for `Diagnose`.
//!
//! Everything here only reads: one rtnetlink link dump (names, kinds,
//! flags, masters, MTUs, VXLAN/VLAN parameters, stats64), one AF_BRIDGE
//! neighbour dump (the bridge FDB), and for Open vSwitch a few `ovs-vsctl`
//! and `ovs-appctl fdb/show` runs. The result is plain data
//! ([`HostFacts`]); judging it is the pure hop logic in
//! `doctor`, so the verdicts are unit-tested without a kernel.
//!
//! Why a single link dump rather than one lookup per name: masters and
//! underlays are reported as ifindexes, and a dump resolves them to names
//! from one consistent snapshot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::AddressFamily;
use serde::Serialize;
use tokio::process::Command;

use super::naming::{self, PortClass};
use super::vxlan::{self, VxlanAttrs, VxlanDevice, VxlanFamily, VxlanFlavour};
use super::{ovs, HostConfig, HostError};
use crate::nic::Vni;

/// What to inspect: the NIC's tap, its bridge, the segment device the
/// bridge's name implies, and the guest MAC to look for in the FDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectQuery {
    /// The tap (`<target dev>`), when libvirt reports one.
    pub tap: Option<String>,
    /// The bridge (`<source bridge>`).
    pub bridge: String,
    /// The VLAN/VXLAN device expected in the bridge, if any.
    pub segment: Option<String>,
    /// The VNI when that device is a VXLAN one: the facts then say what
    /// this host's configuration would make for it.
    pub vxlan: Option<Vni>,
    /// The bridge is an Open vSwitch bridge.
    pub ovs: bool,
    /// The guest MAC, lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The VLAN the caller intended, when it said: tried first when a
    /// shortened bridge name has to be recomputed.
    pub intended_vlan: Option<u16>,
}

/// Packet counters of a link (netlink stats64), as the host sees them.
/// On a tap, `rx` is what the guest sent and `tx` what it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct LinkCounters {
    /// Packets received by the host on this link.
    pub rx_packets: u64,
    /// Packets sent by the host on this link.
    pub tx_packets: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Receive drops.
    pub rx_dropped: u64,
    /// Transmit drops.
    pub tx_dropped: u64,
    /// Frames received with a bad CRC (a cable, optic or switch port).
    pub rx_crc_errors: u64,
}

/// VXLAN parameters of a link (`underlay` resolved to a name).
pub type VxlanFacts = VxlanAttrs;

/// 802.1Q parameters of a link.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct VlanFacts {
    /// VLAN id.
    pub id: Option<u16>,
    /// Parent link name.
    pub parent: Option<String>,
}

/// One link as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct LinkFacts {
    /// Link name.
    pub name: String,
    /// Link kind (`bridge`, `vxlan`, `vlan`, `tun`, `veth`, ...); empty
    /// when the kernel reports none.
    pub kind: String,
    /// IFF_UP: administratively up.
    pub up: bool,
    /// IFF_LOWER_UP: carrier.
    pub lower_up: bool,
    /// MTU.
    pub mtu: u32,
    /// Transmit queue length (`txqueuelen`); a tap's default is 1000, and
    /// a burst larger than it is dropped on the host side.
    pub tx_queue_len: Option<u32>,
    /// Name of the master (bridge) this link is enslaved to.
    pub master: Option<String>,
    /// `IFLA_IFALIAS` ([`super::AGENT_ALIAS`] on links the agent made).
    pub alias: Option<String>,
    /// IFF_PROMISC.
    pub promisc: bool,
    /// Bridge FDB ageing time in centiseconds (bridges only).
    pub ageing: Option<u32>,
    /// stats64 counters.
    pub counters: Option<LinkCounters>,
    /// VXLAN parameters (vxlan links only).
    pub vxlan: Option<VxlanFacts>,
    /// VLAN parameters (vlan links only).
    pub vlan: Option<VlanFacts>,
}

/// What Open vSwitch says about the NIC's port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct OvsFacts {
    /// `ovs-vsctl br-exists BRIDGE`.
    pub bridge_exists: bool,
    /// `ovs-vsctl port-to-br TAP`: the bridge the tap is a port of.
    pub port_bridge: Option<String>,
    /// `ovs-vsctl get port TAP tag` (`None` for `[]`).
    pub tag: Option<u32>,
    /// The IDS mirror of this tap exists on the bridge.
    pub mirror: bool,
}

/// Where the guest MAC was found in the bridge's forwarding database.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct FdbFacts {
    /// The FDB could be read.
    pub read: bool,
    /// Ports (link names, or `ofport N` on OVS) the MAC is learned on.
    pub learned_on: Vec<String>,
    /// Why the FDB could not be read, if it could not.
    pub error: Option<String>,
}

/// Everything read about one NIC's host path. `None` links do not exist.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct HostFacts {
    /// The tap.
    pub tap: Option<LinkFacts>,
    /// The bridge's kernel link (for OVS, its internal interface, if any).
    pub bridge: Option<LinkFacts>,
    /// The segment device asked for in the query.
    pub segment: Option<LinkFacts>,
    /// The segment device's underlay (VXLAN `dev` or VLAN parent).
    pub underlay: Option<LinkFacts>,
    /// Open vSwitch's view (OVS bridges only).
    pub ovs: Option<OvsFacts>,
    /// The guest MAC in the FDB.
    pub fdb: FdbFacts,
    /// Linux bridges: each port of the bridge, with the sensor taps its
    /// agent `tc` mirror filters copy to (`None` when not read).
    pub mirrors: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// VXLAN segments: the device this host's configuration makes for the
    /// VNI, decided by the same code as an attach.
    #[serde(skip)]
    pub vxlan_expected: Option<VxlanExpected>,
    /// The physical uplink the NIC's traffic leaves the host by.
    pub uplink: Option<UplinkFacts>,
    /// Why no uplink was found, when none was.
    pub uplink_missing: Option<String>,
    /// `(pif, vlan)` of a Linux bridge whose name is the shortened
    /// `br<pif>-<vlan>` (recomputed, [`naming::decode_vlan_bridge`]); the
    /// query's segment device is then `<pif>.<vlan>`'s kernel name.
    pub decoded_vlan_bridge: Option<(String, u16)>,
}

/// The physical uplink, read twice a second apart.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct UplinkFacts {
    /// The link at the first sample (name, kind, carrier, counters).
    pub link: LinkFacts,
    /// How it was found: "VLAN parent", "port of cloudbr1", ...
    pub via: String,
    /// Its counters [`UPLINK_SAMPLE_GAP`] later; `None` when the second
    /// read failed (the link went away).
    pub later: Option<LinkCounters>,
    /// Link speed in Mb/s (`ethtool`), when the driver reports one.
    pub speed_mbps: Option<u32>,
    /// Why the speed is not known, when it is not.
    pub speed_unknown: Option<String>,
}

/// Time between the uplink's two counter samples: CRC errors that rise
/// within it are happening now, not a count left from last month.
pub const UPLINK_SAMPLE_GAP: Duration = Duration::from_secs(1);

/// What this host's VXLAN configuration makes for one VNI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanExpected {
    /// The device, or why the configuration cannot make one here (an evpn
    /// host without a VTEP address on `lo`).
    pub device: Result<VxlanDevice, String>,
    /// The port a device without `dstport` gets on this host
    /// (`/sys/module/vxlan/parameters/udp_port`).
    pub kernel_port: u16,
    /// The found device's underlay was not known, so `device` is built over
    /// [`LABEL_PLACEHOLDER`], and with `vxlan.family = "auto"` its family is
    /// a guess (IPv4).
    pub family_guessed: bool,
}

/// The placeholder underlay of a [`VxlanExpected`] whose label bridge is
/// not known (the device is missing, or has no `dev`).
pub const LABEL_PLACEHOLDER: &str = "<label bridge>";

fn link_facts(msg: LinkMessage, names: &HashMap<u32, String>) -> (u32, LinkFacts) {
    let flags = msg.header.flags;
    let mut f = LinkFacts {
        up: flags.contains(LinkFlags::Up),
        lower_up: flags.contains(LinkFlags::LowerUp),
        promisc: flags.contains(LinkFlags::Promisc),
        ..LinkFacts::default()
    };
    let mut parent: Option<u32> = None;
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => f.name = n,
            LinkAttribute::Mtu(m) => f.mtu = m,
            LinkAttribute::TxQueueLen(q) => f.tx_queue_len = Some(q),
            LinkAttribute::Controller(c) => f.master = names.get(&c).cloned(),
            LinkAttribute::IfAlias(a) => f.alias = Some(a),
            LinkAttribute::Link(p) => parent = Some(p),
            LinkAttribute::Stats64(s) => {
                f.counters = Some(LinkCounters {
                    rx_packets: s.rx_packets,
                    tx_packets: s.tx_packets,
                    rx_errors: s.rx_errors,
                    tx_errors: s.tx_errors,
                    rx_dropped: s.rx_dropped,
                    tx_dropped: s.tx_dropped,
                    rx_crc_errors: s.rx_crc_errors,
                })
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => f.kind = k.to_string(),
                        LinkInfo::Data(InfoData::Bridge(opts)) => {
                            for o in opts {
                                if let InfoBridge::AgeingTime(a) = o {
                                    f.ageing = Some(a);
                                }
                            }
                        }
                        LinkInfo::Data(InfoData::Vxlan(opts)) => {
                            let (mut v, link) = vxlan::parse_attrs(&opts);
                            v.underlay = link.and_then(|l| names.get(&l).cloned());
                            f.vxlan = Some(v);
                        }
                        LinkInfo::Data(InfoData::Vlan(opts)) => {
                            let mut v = VlanFacts::default();
                            for o in opts {
                                if let InfoVlan::Id(id) = o {
                                    v.id = Some(id);
                                }
                            }
                            f.vlan = Some(v);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if let (Some(v), Some(p)) = (f.vlan.as_mut(), parent) {
        v.parent = names.get(&p).cloned();
    }
    (msg.header.index, f)
}

async fn link_dump(handle: &rtnetlink::Handle) -> Result<Vec<LinkMessage>, HostError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| HostError::Netlink {
            op: "dump links".into(),
            source,
        })
}

async fn bridge_fdb(handle: &rtnetlink::Handle) -> Result<Vec<NeighbourMessage>, HostError> {
    handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(|source| HostError::Netlink {
            op: "dump bridge fdb".into(),
            source,
        })
}

fn mac_bytes(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Ports of `bridge_index` on which `mac` is learned, from an AF_BRIDGE dump.
fn fdb_ports(
    msgs: &[NeighbourMessage],
    mac: &[u8; 6],
    bridge_index: u32,
    names: &HashMap<u32, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for m in msgs {
        let mut lladdr = None;
        let mut master = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::LinkLayerAddress(b) => lladdr = Some(b.as_slice()),
                NeighbourAttribute::Controller(c) => master = Some(*c),
                _ => {}
            }
        }
        // Entries of the bridge device itself carry no master; ports do.
        let on_bridge = master == Some(bridge_index) || m.header.ifindex == bridge_index;
        if on_bridge && lladdr == Some(&mac[..]) {
            let port = names
                .get(&m.header.ifindex)
                .cloned()
                .unwrap_or_else(|| format!("ifindex {}", m.header.ifindex));
            if !out.contains(&port) {
                out.push(port);
            }
        }
    }
    out
}

/// `ovs-appctl` next to the configured `ovs-vsctl` (same install prefix).
fn appctl_path(vsctl: &Path) -> PathBuf {
    match vsctl.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("ovs-appctl"),
        _ => PathBuf::from("ovs-appctl"),
    }
}

async fn appctl(bin: &Path, args: &[&str]) -> Result<String, HostError> {
    // `--` ends ovs-appctl's options: no argument can be read as one.
    let run = Command::new(bin)
        .arg("--timeout=10")
        .arg("--")
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .map_err(|_| HostError::Ovs {
            args: args.join(" "),
            detail: "timed out".into(),
        })?
        .map_err(|e| HostError::Io {
            op: format!("run {}", bin.display()),
            source: e,
        })?;
    if !out.status.success() {
        return Err(HostError::Ovs {
            args: args.join(" "),
            detail: format!(
                "exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Rows of `ovs-appctl fdb/show` whose MAC is `mac`: (ofport, vlan).
///
/// The output is a header line then ` port  VLAN  MAC  Age` rows; the
/// port column is an OpenFlow port number (or `LOCAL`).
pub fn parse_ovs_fdb(text: &str, mac: &str) -> Vec<(String, u32)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols.as_slice() {
                [port, vlan, m, ..] if m.eq_ignore_ascii_case(mac) => {
                    Some(((*port).to_string(), vlan.parse().unwrap_or(0)))
                }
                _ => None,
            }
        })
        .collect()
}

async fn ovs_facts(cfg: &HostConfig, q: &InspectQuery, fdb: &mut FdbFacts) -> OvsFacts {
    let bin = &cfg.ovs_vsctl;
    let mut f = OvsFacts {
        bridge_exists: ovs::bridge_exists(bin, &q.bridge).await.unwrap_or(false),
        ..OvsFacts::default()
    };
    let Some(tap) = &q.tap else { return f };
    // The tap and bridge come from libvirt's XML: checked before they
    // reach ovs-vsctl or ovs-appctl.
    if let Err(e) = ovs::link_name("tap", tap).and(ovs::link_name("bridge", &q.bridge)) {
        fdb.error = Some(e.to_string());
        return f;
    }
    if let Ok(out) = ovs::vsctl(bin, &["port-to-br", tap]).await {
        if out.code == Some(0) && !out.stdout.is_empty() {
            f.port_bridge = Some(out.stdout);
        }
    }
    if f.port_bridge.is_some() {
        if let Ok(t) = ovs::vsctl_ok(bin, &["get", "port", tap, "tag"]).await {
            f.tag = t.trim().parse().ok();
        }
    }
    let mirror = format!("name={}", super::mirror_name(tap));
    if let Ok(m) = ovs::vsctl_ok_with(
        bin,
        &["--bare"],
        &["--columns=_uuid", "find", "Mirror", &mirror],
    )
    .await
    {
        f.mirror = !m.trim().is_empty();
    }
    let ofport = ovs::vsctl_ok(bin, &["get", "Interface", tap, "ofport"])
        .await
        .ok()
        .map(|s| s.trim().to_string());
    match appctl(&appctl_path(bin), &["fdb/show", &q.bridge]).await {
        Ok(text) => {
            fdb.read = true;
            fdb.learned_on = parse_ovs_fdb(&text, &q.mac)
                .into_iter()
                .map(|(port, vlan)| {
                    let who = if ofport.as_deref() == Some(port.as_str()) {
                        tap.clone()
                    } else {
                        format!("ofport {port}")
                    };
                    if vlan == 0 {
                        who
                    } else {
                        format!("{who} (vlan {vlan})")
                    }
                })
                .collect();
        }
        Err(e) => fdb.error = Some(e.to_string()),
    }
    f
}

/// What `cfg` makes for `vni` on this host, by the attach's own decision
/// ([`vxlan::VxlanSettings::device`]), reading the addresses it needs:
/// the underlay's (`underlay`: name and ifindex, when known) and `lo`'s.
async fn vxlan_expected(
    handle: &rtnetlink::Handle,
    cfg: &HostConfig,
    vni: Vni,
    underlay: Option<(&str, u32)>,
    lo: Option<u32>,
) -> VxlanExpected {
    let addrs = |i: Option<u32>| async move {
        match i {
            Some(i) => super::netlink::link_addrs(handle, i).await,
            None => Ok(Vec::new()),
        }
    };
    let v = &cfg.vxlan;
    let device = async {
        let under = match (v.flavour, v.family) {
            (VxlanFlavour::Multicast, VxlanFamily::Auto) => addrs(underlay.map(|u| u.1)).await?,
            _ => Vec::new(),
        };
        let lo = match v.flavour {
            VxlanFlavour::Evpn => addrs(lo).await?,
            VxlanFlavour::Multicast => Vec::new(),
        };
        let name = underlay.map_or(LABEL_PLACEHOLDER, |u| u.0);
        v.device(vni, name, &under, &lo)
    }
    .await
    .map_err(|e: HostError| e.to_string());
    VxlanExpected {
        device,
        kernel_port: vxlan::kernel_default_port(),
        family_guessed: underlay.is_none()
            && v.flavour == VxlanFlavour::Multicast
            && v.family == VxlanFamily::Auto,
    }
}

/// The uplink among `ports` (link names): a real NIC before a stand-in,
/// never a tap or a bridge ([`naming::pick_uplink`], the rule the attach
/// uses to pick a VLAN parent).
fn uplink_among<'a>(
    ports: impl Iterator<Item = &'a str>,
    by_name: &HashMap<String, (u32, LinkFacts)>,
) -> Option<String> {
    let classed: Vec<(String, PortClass, u32)> = ports
        .filter_map(|p| {
            let (idx, f) = by_name.get(p)?;
            let kind = (!f.kind.is_empty()).then_some(f.kind.as_str());
            Some((p.to_string(), PortClass::of_kind(kind), *idx))
        })
        .collect();
    naming::pick_uplink(&classed).map(str::to_string)
}

/// Which link is the NIC's physical uplink, and how it was found; or why
/// there is none.
fn find_uplink(
    q: &InspectQuery,
    facts: &HostFacts,
    by_name: &HashMap<String, (u32, LinkFacts)>,
    ovs_ports: Option<&[String]>,
) -> Result<(String, String), String> {
    let ports_of = |bridge: &str| {
        uplink_among(
            by_name
                .values()
                .filter(|(_, f)| f.master.as_deref() == Some(bridge))
                .map(|(_, f)| f.name.as_str())
                .filter(|p| Some(*p) != q.tap.as_deref()),
            by_name,
        )
    };
    if q.ovs {
        let Some(ports) = ovs_ports else {
            return Err(format!(
                "the ports of OVS bridge {} could not be listed",
                q.bridge
            ));
        };
        let others = ports
            .iter()
            .map(String::as_str)
            .filter(|p| Some(*p) != q.tap.as_deref());
        return uplink_among(others, by_name)
            .map(|u| (u, format!("port of OVS bridge {}", q.bridge)))
            .ok_or_else(|| format!("OVS bridge {} has no physical port", q.bridge));
    }
    if let Some(u) = &facts.underlay {
        if u.kind == "bridge" {
            return ports_of(&u.name)
                .map(|p| (p, format!("port of {}, the segment's underlay", u.name)))
                .ok_or_else(|| format!("underlay bridge {} has no physical port", u.name));
        }
        let via = if facts.segment.as_ref().is_some_and(|s| s.vxlan.is_some()) {
            "the VXLAN underlay"
        } else {
            "the VLAN parent"
        };
        return Ok((u.name.clone(), via.to_string()));
    }
    if let Some(seg) = &q.segment {
        return Err(match &facts.segment {
            None => format!("segment device {seg} does not exist, so neither does its uplink"),
            Some(_) => format!("segment device {seg} has no underlay"),
        });
    }
    ports_of(&q.bridge)
        .map(|p| (p, format!("port of {}", q.bridge)))
        .ok_or_else(|| format!("bridge {} has no physical port", q.bridge))
}

/// `ethtool DEV`'s speed, Mb/s. `ethtool` rather than sysfs: it runs in
/// the caller's network namespace (sysfs shows the one it was mounted in).
async fn ethtool_speed(dev: &str) -> Result<u32, String> {
    let dev = ovs::link_name("uplink", dev).map_err(|e| e.to_string())?;
    let run = Command::new("ethtool").arg(dev).kill_on_drop(true).output();
    let out = match tokio::time::timeout(Duration::from_secs(5), run).await {
        Err(_) => return Err("ethtool timed out".into()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("ethtool is not installed".into())
        }
        Ok(Err(e)) => return Err(format!("ethtool: {e}")),
        Ok(Ok(o)) => o,
    };
    parse_ethtool_speed(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| format!("{dev} reports no speed"))
}

/// The `Speed: 10000Mb/s` line of `ethtool` output.
pub fn parse_ethtool_speed(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Speed:"))
        .and_then(|v| v.trim().strip_suffix("Mb/s"))
        .and_then(|n| n.trim().parse().ok())
}

/// The uplink's facts: the first sample from the dump already taken, the
/// second [`UPLINK_SAMPLE_GAP`] later, and its speed read in between.
async fn sample_uplink(
    handle: &rtnetlink::Handle,
    names: &HashMap<u32, String>,
    link: LinkFacts,
    via: String,
) -> UplinkFacts {
    let name = link.name.clone();
    let (speed, ()) = tokio::join!(ethtool_speed(&name), tokio::time::sleep(UPLINK_SAMPLE_GAP));
    let later = handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
        .and_then(|m| link_facts(m, names).1.counters);
    UplinkFacts {
        link,
        via,
        later,
        speed_mbps: speed.as_ref().ok().copied(),
        speed_unknown: speed.err(),
    }
}

/// Reads the host path of one NIC. Never changes anything.
pub(crate) async fn inspect(
    handle: &rtnetlink::Handle,
    cfg: &HostConfig,
    q: &InspectQuery,
) -> Result<HostFacts, HostError> {
    let msgs = link_dump(handle).await?;
    let mut names: HashMap<u32, String> = HashMap::new();
    for m in &msgs {
        for a in &m.attributes {
            if let LinkAttribute::IfName(n) = a {
                names.insert(m.header.index, n.clone());
            }
        }
    }
    let mut by_name: HashMap<String, (u32, LinkFacts)> = HashMap::new();
    for m in msgs {
        let (idx, f) = link_facts(m, &names);
        by_name.insert(f.name.clone(), (idx, f));
    }
    let get = |n: &str| by_name.get(n).map(|(_, f)| f.clone());
    // A Linux bridge whose name says nothing may be a VLAN bridge whose
    // name was shortened to 15 bytes: recompute it from the host's links.
    let decoded = match (&q.segment, q.ovs) {
        (None, false) => naming::decode_vlan_bridge(
            &q.bridge,
            q.intended_vlan,
            by_name.keys().map(String::as_str),
        ),
        _ => None,
    };
    let mut q = q.clone();
    if let Some((pif, id)) = &decoded {
        q.segment = Some(naming::vlan_device(pif, *id));
    }
    let q = &q;
    let mut facts = HostFacts {
        tap: q.tap.as_deref().and_then(get),
        bridge: get(&q.bridge),
        segment: q.segment.as_deref().and_then(get),
        decoded_vlan_bridge: decoded,
        ..HostFacts::default()
    };
    let underlay_name = facts.segment.as_ref().and_then(|s| {
        s.vxlan
            .as_ref()
            .and_then(|v| v.underlay.clone())
            .or_else(|| s.vlan.as_ref().and_then(|v| v.parent.clone()))
    });
    facts.underlay = underlay_name.as_deref().and_then(get);
    if let Some(vni) = q.vxlan {
        let index = |n: &str| by_name.get(n).map(|(i, _)| *i);
        facts.vxlan_expected = Some(
            vxlan_expected(
                handle,
                cfg,
                vni,
                underlay_name.as_deref().and_then(|n| Some((n, index(n)?))),
                index("lo"),
            )
            .await,
        );
    }

    let ovs_ports = if q.ovs {
        ovs::vsctl_ok(&cfg.ovs_vsctl, &["list-ports", &q.bridge])
            .await
            .ok()
            .map(|out| out.lines().map(str::to_string).collect::<Vec<_>>())
    } else {
        None
    };
    match find_uplink(q, &facts, &by_name, ovs_ports.as_deref()) {
        Ok((name, via)) => match by_name.get(&name) {
            Some((_, link)) => {
                facts.uplink = Some(sample_uplink(handle, &names, link.clone(), via).await);
            }
            None => facts.uplink_missing = Some(format!("uplink {name} vanished")),
        },
        Err(why) => facts.uplink_missing = Some(why),
    }
    if q.ovs {
        let mut fdb = FdbFacts::default();
        facts.ovs = Some(ovs_facts(cfg, q, &mut fdb).await);
        facts.fdb = fdb;
    } else if let Some((bridge_index, _)) = by_name.get(&q.bridge) {
        // Read-only: `tc filter show` on each port of the bridge.
        let mut mirrors = std::collections::BTreeMap::new();
        let mut readable = true;
        for (_, f) in by_name.values() {
            if f.master.as_deref() != Some(q.bridge.as_str()) {
                continue;
            }
            match super::tcmirror::port_mirrors(&f.name).await {
                Ok(m) => {
                    mirrors.insert(f.name.clone(), m.into_values().flatten().collect());
                }
                Err(_) => readable = false,
            }
        }
        facts.mirrors = readable.then_some(mirrors);
        match (mac_bytes(&q.mac), bridge_fdb(handle).await) {
            (Some(mac), Ok(msgs)) => {
                facts.fdb = FdbFacts {
                    read: true,
                    learned_on: fdb_ports(&msgs, &mac, *bridge_index, &names),
                    error: None,
                }
            }
            (None, _) => facts.fdb.error = Some(format!("bad MAC {}", q.mac)),
            (_, Err(e)) => facts.fdb.error = Some(e.to_string()),
        }
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ovs_fdb_rows_are_matched_by_mac_case_insensitively() {
        let text = " port  VLAN  MAC                Age\n\
                    \x20   2   100  52:54:00:AA:00:01    3\n\
                    LOCAL     0  9a:1b:2c:3d:4e:5f    1\n\
                    \x20   3   200  52:54:00:aa:00:01    7\n";
        assert_eq!(
            parse_ovs_fdb(text, "52:54:00:aa:00:01"),
            vec![("2".to_string(), 100), ("3".to_string(), 200)]
        );
        assert!(parse_ovs_fdb(text, "52:54:00:aa:00:02").is_empty());
        assert!(parse_ovs_fdb("", "52:54:00:aa:00:01").is_empty());
    }

    #[test]
    fn mac_bytes_parses_only_six_hex_octets() {
        assert_eq!(
            mac_bytes("02:00:0a:00:00:ff"),
            Some([2, 0, 0x0a, 0, 0, 0xff])
        );
        assert_eq!(mac_bytes("02:00:0a:00:00"), None);
        assert_eq!(mac_bytes("02:00:0a:00:00:ff:01"), None);
        assert_eq!(mac_bytes("zz:00:0a:00:00:ff"), None);
    }

    #[test]
    fn ethtool_speed_is_read_from_its_speed_line() {
        let veth = "Settings for p1:\n\tSupported ports: [ ]\n\tSpeed: 10000Mb/s\n\tDuplex: Full\n";
        assert_eq!(parse_ethtool_speed(veth), Some(10000));
        assert_eq!(
            parse_ethtool_speed("Settings for br0:\n\tSpeed: Unknown!\n"),
            None
        );
        assert_eq!(parse_ethtool_speed(""), None);
    }

    #[test]
    fn appctl_sits_next_to_vsctl() {
        assert_eq!(
            appctl_path(Path::new("/usr/bin/ovs-vsctl")),
            PathBuf::from("/usr/bin/ovs-appctl")
        );
        assert_eq!(
            appctl_path(Path::new("ovs-vsctl")),
            PathBuf::from("ovs-appctl")
        );
    }
}
