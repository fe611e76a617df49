//! [`NetlinkHost`]: the [`HostNet`] implementation that does all link work
//! through rtnetlink (no `ip`/`brctl` subprocesses) and OVS through ovs-vsctl.
//!
//! The few things netlink cannot do are files: disabling IPv6 on a device
//! is a write under `/proc/sys/net/ipv6/conf/`, and CloudStack's VXLAN lock
//! is a flock on `/var/run/cloud/vxlan.lock`.

use std::net::IpAddr;
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressScope};
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAttribute, RouteProtocol, RouteScope};
use nix::errno::Errno;
use rtnetlink::{
    LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVlan, LinkVxlan,
    RouteMessageBuilder,
};
use tracing::{debug, info, warn};

use super::error::netlink_errno;
use super::vxlan::{self, LinkAddr, VxlanAttrs, VxlanDevice, VxlanFamily, VxlanFlavour, VxlanLock};
use super::{
    naming, ovs, promisc, tcmirror, BridgePorts, HostConfig, HostError, HostNet, HostPlan,
    HostUndo, PlannedChange, PromiscState, SegmentDevice, AGENT_ALIAS,
};
use crate::nic::{BridgeName, Segment, SwitchType, TxQueueLen, Vni};

mod repair;
pub use repair::{RepairAction, RepairOutcome, RepairReport};

/// Kernel default bridge FDB ageing (300 s in centiseconds).
const DEFAULT_AGEING: u32 = 30000;

/// What the agent needs to know about one link.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    kind: Option<InfoKind>,
    controller: Option<u32>,
    parent: Option<u32>,
    mtu: u32,
    alias: Option<String>,
    flags: LinkFlags,
    ageing: Option<u32>,
    /// VXLAN attributes (vxlan links only); `underlay` is not resolved yet,
    /// its ifindex is in `vxlan_dev`.
    vxlan: Option<VxlanAttrs>,
    vxlan_dev: Option<u32>,
}

impl Link {
    fn from_msg(msg: LinkMessage) -> Self {
        let mut l = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            controller: None,
            parent: None,
            mtu: 0,
            alias: None,
            flags: msg.header.flags,
            ageing: None,
            vxlan: None,
            vxlan_dev: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => l.name = n,
                LinkAttribute::Controller(c) => l.controller = Some(c),
                LinkAttribute::Link(p) => l.parent = Some(p),
                LinkAttribute::Mtu(m) => l.mtu = m,
                LinkAttribute::IfAlias(a) => l.alias = Some(a),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => l.kind = Some(k),
                            LinkInfo::Data(InfoData::Bridge(opts)) => {
                                for o in opts {
                                    if let InfoBridge::AgeingTime(a) = o {
                                        l.ageing = Some(a);
                                    }
                                }
                            }
                            LinkInfo::Data(InfoData::Vxlan(opts)) => {
                                let (v, link) = vxlan::parse_attrs(&opts);
                                l.vxlan_dev = link;
                                l.vxlan = Some(v);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    fn is(&self, kind: &InfoKind) -> bool {
        self.kind.as_ref() == Some(kind)
    }

    fn kind_name(&self) -> String {
        match &self.kind {
            Some(k) => k.to_string(),
            None => "device without a link kind".to_string(),
        }
    }

    fn is_ours(&self) -> bool {
        self.alias.as_deref() == Some(AGENT_ALIAS)
    }
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> HostError {
    let op = op.into();
    move |source| HostError::Netlink { op, source }
}

fn has_errno(e: &rtnetlink::Error, errno: Errno) -> bool {
    netlink_errno(e) == Some(errno as i32)
}

/// Where the kernel keeps per-device IPv6 switches.
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// `sysctl -w net.ipv6.conf.<dev>.disable_ipv6=1`, which netlink cannot do.
///
/// A kernel without IPv6 has no such directory and nothing to disable. The
/// write is a plain synchronous one: it is a procfs write that never waits
/// on I/O, and a blocking-pool thread might not share the network namespace
/// of the caller (tests run the host backend on a thread that `setns`-ed).
pub(crate) fn disable_ipv6(dev: &str) -> Result<(), HostError> {
    if !Path::new(IPV6_CONF).is_dir() {
        return Ok(());
    }
    let path = Path::new(IPV6_CONF).join(dev).join("disable_ipv6");
    std::fs::write(&path, b"1").map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                "; the agent must be able to write /proc/sys/net/ipv6/conf (in the systemd \
                 unit: no ProtectKernelTunables=, or ReadWritePaths=/proc/sys/net/ipv6/conf)"
                    .to_string()
            }
            _ => String::new(),
        };
        HostError::Sysctl {
            path: path.display().to_string(),
            source,
            hint,
        }
    })?;
    debug!(dev, "disabled IPv6");
    Ok(())
}

/// Addresses on link `index`, with whether each is scope global. The
/// caller serialises dumps on the socket.
pub(crate) async fn link_addrs(
    handle: &rtnetlink::Handle,
    index: u32,
) -> Result<Vec<LinkAddr>, HostError> {
    let msgs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("dump addresses"))?;
    Ok(msgs
        .into_iter()
        // The dump filter is applied in user space by rtnetlink only
        // for some kernels; check the index again.
        .filter(|m| m.header.index == index)
        .flat_map(|m| {
            let global = m.header.scope == AddressScope::Universe;
            m.attributes.into_iter().filter_map(move |a| match a {
                AddressAttribute::Address(addr) => Some(LinkAddr { addr, global }),
                _ => None,
            })
        })
        .collect())
}

fn bridge_name(name: &str) -> Result<BridgeName, HostError> {
    BridgeName::try_from(name)
        .map_err(|_| HostError::Internal(format!("generated bridge name {name:?} is not valid")))
}

/// The link named `name`, or `None` when there is none (ENODEV), through
/// `handle`: a [`NetlinkHost`]'s, or a socket of its own.
async fn link_by_name(handle: &rtnetlink::Handle, name: &str) -> Result<Option<Link>, HostError> {
    let res = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await;
    match res {
        Ok(m) => Ok(m.map(Link::from_msg)),
        Err(e) if has_errno(&e, Errno::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

/// Sets the txqueuelen (IFLA_TXQLEN) of `tap` through `handle`.
async fn tx_queue_len_via(
    handle: &rtnetlink::Handle,
    tap: &str,
    len: TxQueueLen,
) -> Result<(), HostError> {
    let index = link_by_name(handle, tap)
        .await?
        .ok_or_else(|| tap_not_found(tap))?
        .index;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .txqueuelen(len.get())
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("set txqueuelen {len} on {tap}")))?;
    info!(link = %tap, txqueuelen = len.get(), "set tap txqueuelen");
    Ok(())
}

fn tap_not_found(tap: &str) -> HostError {
    HostError::NotFound {
        what: "tap",
        name: tap.to_string(),
        hint: "; the NIC's tap went away right after the attach".into(),
    }
}

/// Sets a tap's txqueuelen through a netlink socket of its own. For an
/// agent that leaves host networking to CloudStack (`host_network off`):
/// libvirt's taps are just as real there, only no [`NetlinkHost`] exists.
pub async fn set_tap_tx_queue_len(tap: &str, len: TxQueueLen) -> Result<(), HostError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| HostError::Io {
        op: "open rtnetlink socket".into(),
        source,
    })?;
    let task = tokio::spawn(conn);
    let r = tx_queue_len_via(&handle, tap, len).await;
    task.abort();
    r
}

/// A tap's txqueuelen as sysfs shows it, or `None` when the name is not a
/// plain link name or the tap is gone. Read from sysfs rather than netlink
/// because the caller (a replug by unplug) only needs one number before the
/// tap disappears, with or without a [`NetlinkHost`].
pub fn tap_tx_queue_len(tap: &str) -> Option<u32> {
    // ".." and "." pass `link_name`, and would leave /sys/class/net.
    let tap = ovs::link_name("tap", tap)
        .ok()
        .filter(|t| !t.starts_with('.'))?;
    std::fs::read_to_string(format!("/sys/class/net/{tap}/tx_queue_len"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Host networking through rtnetlink, in the network namespace of the thread
/// that created it.
pub struct NetlinkHost {
    handle: rtnetlink::Handle,
    config: HostConfig,
    objects: super::objects::HostObjects,
    /// The kernel runs one dump at a time per netlink socket and answers a
    /// second one with EBUSY; requests of concurrent attaches share this
    /// socket, so dumps take turns.
    dump: tokio::sync::Mutex<()>,
}

impl NetlinkHost {
    /// Open a netlink socket in the calling thread's network namespace and
    /// spawn its connection task. Must be called inside a tokio runtime.
    pub fn new(config: HostConfig) -> Result<Self, HostError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(HostError::Internal(
                "NetlinkHost::new must be called inside a tokio runtime".into(),
            ));
        }
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| HostError::Io {
            op: "open rtnetlink socket".into(),
            source,
        })?;
        tokio::spawn(conn);
        let objects = super::objects::HostObjects::new(&config.state_dir, &config.persist_dir);
        Ok(Self {
            handle,
            config,
            objects,
            dump: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration this host was built with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    async fn link(&self, name: &str) -> Result<Option<Link>, HostError> {
        link_by_name(&self.handle, name).await
    }

    async fn links(&self) -> Result<Vec<Link>, HostError> {
        let _turn = self.dump.lock().await;
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump links"))?;
        Ok(msgs.into_iter().map(Link::from_msg).collect())
    }

    async fn ports_of(&self, bridge: &Link) -> Result<Vec<Link>, HostError> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .filter(|l| l.controller == Some(bridge.index))
            .collect())
    }

    /// The bridge named `name`: NotFound if missing, NameConflict if not a bridge.
    async fn need_bridge(&self, name: &str) -> Result<Link, HostError> {
        match self.link(name).await? {
            Some(l) if l.is(&InfoKind::Bridge) => Ok(l),
            Some(l) => Err(HostError::NameConflict {
                name: name.to_string(),
                found: l.kind_name(),
                wanted: "bridge",
            }),
            None => Err(HostError::NotFound {
                what: "bridge",
                name: name.to_string(),
                hint: "; create the traffic label's bridge on this host".into(),
            }),
        }
    }

    async fn need_link(&self, name: &str) -> Result<Link, HostError> {
        self.link(name).await?.ok_or_else(|| HostError::NotFound {
            what: "link",
            name: name.to_string(),
            hint: String::new(),
        })
    }

    async fn set(&self, msg: LinkMessage, op: String) -> Result<(), HostError> {
        self.handle.link().set(msg).execute().await.map_err(nl(op))
    }

    async fn set_ageing(&self, bridge: &Link, ageing: u32) -> Result<(), HostError> {
        let msg = LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
            .index(bridge.index)
            .ageing_time(ageing)
            .build();
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(nl(format!("set ageing_time {ageing} on {}", bridge.name)))
    }

    async fn delete(&self, link: &Link) -> Result<(), HostError> {
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if has_errno(&e, Errno::ENODEV) => Ok(()),
            Err(e) => Err(nl(format!("delete {}", link.name))(e)),
        }
    }

    /// CloudStack's VXLAN lock (a no-op guard where CloudStack is absent).
    pub(crate) async fn vxlan_lock(&self) -> Result<VxlanLock, HostError> {
        let cfg = &self.config.vxlan;
        let lock = VxlanLock::acquire(&cfg.lock_file, cfg.lock_wait).await?;
        if lock.is_held() {
            debug!(path = %cfg.lock_file.display(), "holding CloudStack's VXLAN lock");
        }
        Ok(lock)
    }

    /// Addresses on link `index`.
    async fn addresses(&self, index: u32) -> Result<Vec<LinkAddr>, HostError> {
        let _turn = self.dump.lock().await;
        link_addrs(&self.handle, index).await
    }

    /// Whether traffic to `dst` already leaves through link `index`
    /// (`ip route get DST | grep "dev UNDERLAY"`, the script's test).
    async fn routed_via(&self, dst: IpAddr, index: u32) -> bool {
        let msg = match RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, if dst.is_ipv4() { 32 } else { 128 })
        {
            Ok(b) => b.build(),
            Err(_) => return false,
        };
        // Unreachable is the usual answer on a fresh host: not routed.
        match self.handle.route().get(msg).execute().try_next().await {
            Ok(Some(r)) => r
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index)),
            _ => false,
        }
    }

    /// `ip route add GROUP/32 dev DEV` (scope link, proto boot, as `ip`
    /// makes it). `false` when it already existed.
    async fn add_route(&self, group: IpAddr, dev: &str) -> Result<bool, HostError> {
        let l = self.need_link(dev).await?;
        let op = format!("add route {group} dev {dev}");
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(group, if group.is_ipv4() { 32 } else { 128 })
            .map_err(|e| HostError::Internal(format!("{op}: {e}")))?
            .output_interface(l.index)
            .protocol(RouteProtocol::Boot);
        if group.is_ipv4() {
            b = b.scope(RouteScope::Link);
        }
        match self.handle.route().add(b.build()).execute().await {
            Ok(()) => Ok(true),
            Err(e) if has_errno(&e, Errno::EEXIST) => Ok(false),
            Err(e) => Err(nl(op)(e)),
        }
    }

    /// `ip route del GROUP/32 dev DEV`; a route that is not there is fine.
    async fn del_route(&self, group: IpAddr, dev_index: u32) -> Result<(), HostError> {
        let op = format!("delete route {group} dev #{dev_index}");
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(group, if group.is_ipv4() { 32 } else { 128 })
            .map_err(|e| HostError::Internal(format!("{op}: {e}")))?
            .output_interface(dev_index)
            // The builder defaults to proto static, which the kernel would
            // match against the route's proto boot and find nothing;
            // unspecified matches any, like `ip route del`.
            .protocol(RouteProtocol::Unspec);
        if group.is_ipv4() {
            b = b.scope(RouteScope::Link);
        }
        match self.handle.route().del(b.build()).execute().await {
            Ok(()) => {
                info!(%group, "removed multicast route");
                Ok(())
            }
            Err(e) if has_errno(&e, Errno::ESRCH) || has_errno(&e, Errno::ENOENT) => Ok(()),
            Err(e) => Err(nl(op)(e)),
        }
    }

    /// The VXLAN attributes of `l` with its underlay resolved to a name.
    async fn vxlan_attrs(&self, l: &Link) -> Result<VxlanAttrs, HostError> {
        let mut v = l.vxlan.clone().unwrap_or_default();
        if let Some(i) = l.vxlan_dev {
            v.underlay = self
                .links()
                .await?
                .into_iter()
                .find(|x| x.index == i)
                .map(|x| x.name);
        }
        Ok(v)
    }

    /// Refuse an existing VXLAN device that is not what this host makes.
    async fn check_vxlan(&self, found: &Link, want: &VxlanDevice) -> Result<(), HostError> {
        let attrs = self.vxlan_attrs(found).await?;
        let diffs = want.differences(&attrs, vxlan::kernel_default_port());
        if diffs.is_empty() {
            return Ok(());
        }
        Err(HostError::SegmentMismatch {
            device: found.name.clone(),
            differences: diffs.join("; "),
            fix: want.mismatch_fix(found.is_ours()),
        })
    }

    /// The VXLAN device this host's configuration makes for `vni` over the
    /// label bridge `label` ([`VxlanSettings::device`]); reads only the
    /// addresses that decision needs.
    async fn vxlan_device(&self, vni: Vni, label: &Link) -> Result<VxlanDevice, HostError> {
        let cfg = &self.config.vxlan;
        let (under, lo) = match (cfg.flavour, cfg.family) {
            (VxlanFlavour::Multicast, VxlanFamily::Auto) => {
                (self.addresses(label.index).await?, Vec::new())
            }
            (VxlanFlavour::Multicast, _) => (Vec::new(), Vec::new()),
            (VxlanFlavour::Evpn, _) => {
                let lo = self.need_link("lo").await?;
                (Vec::new(), self.addresses(lo.index).await?)
            }
        };
        cfg.device(vni, &label.name, &under, &lo)
    }

    /// Resolve a Linux-bridge segment device + bridge into a plan.
    async fn plan_segment(
        &self,
        label_name: &BridgeName,
        dev: SegmentDevice,
        bridge: String,
        mtu_without_bridge: u32,
        underlay: Option<(String, u32)>,
        overhead: u32,
    ) -> Result<HostPlan, HostError> {
        let wanted_kind = match &dev {
            SegmentDevice::Vlan { .. } => InfoKind::Vlan,
            SegmentDevice::Vxlan(_) => InfoKind::Vxlan,
        };
        let mut changes = Vec::new();
        let existing_dev = match self.link(dev.name()).await? {
            Some(l) if l.is(&wanted_kind) => Some(l),
            Some(l) => {
                return Err(HostError::NameConflict {
                    name: dev.name().to_string(),
                    found: l.kind_name(),
                    wanted: if wanted_kind == InfoKind::Vlan {
                        "vlan device"
                    } else {
                        "vxlan device"
                    },
                })
            }
            None => {
                changes.push(PlannedChange::CreateSegmentDevice(dev.name().to_string()));
                None
            }
        };
        if let SegmentDevice::Vxlan(want) = &dev {
            if let Some(found) = &existing_dev {
                self.check_vxlan(found, want).await?;
            }
            // modifyvxlan.sh routes the group first, unless it already
            // leaves through the underlay.
            if let Some((group, _, underlay)) = want.route() {
                let u = self.need_link(underlay).await?;
                if !self.routed_via(group, u.index).await {
                    changes.insert(
                        0,
                        PlannedChange::AddRoute {
                            group,
                            dev: underlay.to_string(),
                        },
                    );
                }
            }
        }
        let existing_br = match self.link(&bridge).await? {
            Some(l) if l.is(&InfoKind::Bridge) => Some(l),
            Some(l) => {
                return Err(HostError::NameConflict {
                    name: bridge,
                    found: l.kind_name(),
                    wanted: "bridge",
                })
            }
            None => {
                changes.push(PlannedChange::CreateBridge(bridge.clone()));
                None
            }
        };
        let enslaved = match (&existing_dev, &existing_br) {
            (Some(d), Some(b)) => d.controller == Some(b.index),
            _ => false,
        };
        if !enslaved {
            changes.push(PlannedChange::Enslave {
                port: dev.name().to_string(),
                bridge: bridge.clone(),
            });
        }
        let dev_mtu = existing_dev
            .as_ref()
            .map(|d| d.mtu)
            .unwrap_or(mtu_without_bridge);
        // A bridge whose segment device is not enslaved yet (made a moment
        // ago by a concurrent attach, still empty at 1500) takes the
        // device's lower MTU once it is: plan with what it will have.
        let bridge_mtu = match &existing_br {
            Some(b) if enslaved => b.mtu,
            Some(b) => b.mtu.min(dev_mtu),
            None => dev_mtu,
        };
        Ok(HostPlan {
            switch: SwitchType::LinuxBridge,
            label: label_name.clone(),
            bridge: bridge_name(&bridge)?,
            segment_device: Some(dev),
            changes,
            ovs_vlan_tag: None,
            underlay_mtu: underlay.as_ref().map(|u| u.1),
            underlay: underlay.map(|u| u.0),
            overhead,
            bridge_mtu,
        })
    }

    async fn resolve_linux(
        &self,
        label: &BridgeName,
        segment: &Segment,
    ) -> Result<HostPlan, HostError> {
        let lb = self.need_bridge(label.as_str()).await?;
        match segment {
            Segment::Plain | Segment::Untagged => Ok(HostPlan {
                switch: SwitchType::LinuxBridge,
                label: label.clone(),
                bridge: label.clone(),
                segment_device: None,
                changes: Vec::new(),
                ovs_vlan_tag: None,
                underlay: None,
                overhead: 0,
                bridge_mtu: lb.mtu,
                underlay_mtu: None,
            }),
            Segment::Vlan(id) => {
                let mut ports = self.ports_of(&lb).await?;
                let classes: Vec<(String, naming::PortClass, u32)> = ports
                    .iter()
                    .map(|p| {
                        let kind = p.kind.as_ref().map(|k| k.to_string());
                        (
                            p.name.clone(),
                            naming::PortClass::of_kind(kind.as_deref()),
                            p.index,
                        )
                    })
                    .collect();
                let chosen = naming::pick_uplink(&classes).map(str::to_string);
                let port = chosen
                    .and_then(|n| {
                        let i = ports.iter().position(|p| p.name == n)?;
                        Some(ports.swap_remove(i))
                    })
                    .ok_or_else(|| HostError::NoPhysicalPort {
                        bridge: label.to_string(),
                        vlan: id.get(),
                    })?;
                // A label bridge may sit on a VLAN sub-interface (eth0.10);
                // the new VLAN goes on its parent, not stacked (QinQ).
                let pif = if port.is(&InfoKind::Vlan) {
                    match port.parent {
                        Some(p) => self
                            .links()
                            .await?
                            .into_iter()
                            .find(|l| l.index == p)
                            .ok_or_else(|| HostError::NotFound {
                                what: "link",
                                name: format!("parent of {}", port.name),
                                hint: String::new(),
                            })?,
                        None => port,
                    }
                } else {
                    port
                };
                let dev = SegmentDevice::Vlan {
                    name: naming::vlan_device(&pif.name, id.get()),
                    parent: pif.name.clone(),
                    id: *id,
                };
                let bridge = naming::vlan_bridge(&pif.name, id.get());
                self.plan_segment(label, dev, bridge, pif.mtu, None, 0)
                    .await
            }
            Segment::Vxlan(vni) => {
                let dev = self.vxlan_device(*vni, &lb).await?;
                // The outer header is IPv4 (50 bytes) or IPv6 (70 bytes).
                let overhead = dev.overhead();
                let bridge = naming::vxlan_bridge(vni.get());
                let mtu = lb.mtu.saturating_sub(overhead);
                // EVPN gives no `dev`, but its packets still leave through
                // the label's uplink in CloudStack's layout; the label is
                // the best MTU bound the agent knows.
                let underlay = Some((label.to_string(), lb.mtu));
                self.plan_segment(
                    label,
                    SegmentDevice::Vxlan(dev),
                    bridge,
                    mtu,
                    underlay,
                    overhead,
                )
                .await
            }
        }
    }

    async fn resolve_ovs(
        &self,
        label: &BridgeName,
        segment: &Segment,
    ) -> Result<HostPlan, HostError> {
        let bin = &self.config.ovs_vsctl;
        let tag = match segment {
            Segment::Plain | Segment::Untagged => None,
            Segment::Vlan(v) => Some(*v),
            Segment::Vxlan(_) => {
                return Err(HostError::Unsupported(format!(
                    "VXLAN segments are not supported on Open vSwitch bridge {label}; \
                     use a Linux bridge traffic label for VXLAN"
                )))
            }
        };
        if !ovs::bridge_exists(bin, label.as_str()).await? {
            return Err(HostError::NotFound {
                what: "OVS bridge",
                name: label.to_string(),
                hint: "; create it with ovs-vsctl add-br (datapath_type=netdev here)".into(),
            });
        }
        let bridge_mtu = ovs::bridge_mtu(bin, label.as_str()).await.unwrap_or(1500);
        Ok(HostPlan {
            switch: SwitchType::OpenVswitch,
            label: label.clone(),
            bridge: label.clone(),
            segment_device: None,
            changes: Vec::new(),
            ovs_vlan_tag: tag,
            underlay: None,
            overhead: 0,
            bridge_mtu,
            underlay_mtu: None,
        })
    }

    /// Create the segment device (or accept the existing one). Returns the
    /// link and whether this call created it.
    async fn ensure_segment_device(
        &self,
        dev: &SegmentDevice,
        undo: &mut Vec<HostUndo>,
    ) -> Result<(Link, bool), HostError> {
        if let Some(l) = self.link(dev.name()).await? {
            let ok = match dev {
                SegmentDevice::Vlan { .. } => l.is(&InfoKind::Vlan),
                SegmentDevice::Vxlan(_) => l.is(&InfoKind::Vxlan),
            };
            if !ok {
                return Err(HostError::NameConflict {
                    name: l.name.clone(),
                    found: l.kind_name(),
                    wanted: "segment device",
                });
            }
            if let SegmentDevice::Vxlan(want) = dev {
                self.check_vxlan(&l, want).await?;
            }
            return Ok((l, false));
        }
        let (msg, op, feature) = match dev {
            SegmentDevice::Vlan { name, parent, id } => {
                let p = self.need_link(parent).await?;
                (
                    LinkVlan::new(name, p.index, id.get()).build(),
                    format!("create VLAN device {name} on {parent}"),
                    "802.1Q VLAN (8021q)",
                )
            }
            SegmentDevice::Vxlan(v) => {
                // Exactly the attributes the CloudStack script gives, and no
                // others: an attribute the script leaves out (the port, for
                // the multicast flavour) must stay the kernel's default.
                let mut b = LinkVxlan::new(&v.name, v.vni.get());
                if let Some(u) = &v.underlay {
                    b = b.dev(self.need_link(u).await?.index);
                }
                match v.group {
                    Some(IpAddr::V4(g)) => b = b.group(g),
                    Some(IpAddr::V6(g)) => b = b.group6(g),
                    None => {}
                }
                match v.local {
                    Some(IpAddr::V4(a)) => b = b.local(a),
                    Some(IpAddr::V6(a)) => b = b.local6(a),
                    None => {}
                }
                if let Some(t) = v.ttl {
                    b = b.ttl(t);
                }
                if let Some(p) = v.port {
                    b = b.port(p);
                }
                if !v.learning {
                    b = b.learning(false);
                }
                (
                    b.build(),
                    format!("create VXLAN device: {}", v.ip_command()),
                    "VXLAN (vxlan)",
                )
            }
        };
        match self.handle.link().add(msg).execute().await {
            Ok(()) => {}
            // Classified by errno: "Unknown device type" is EOPNOTSUPP.
            Err(e) if has_errno(&e, Errno::EOPNOTSUPP) => {
                return Err(HostError::KernelFeatureMissing { op, feature })
            }
            Err(e) if has_errno(&e, Errno::EEXIST) => {
                // Lost a race with a concurrent attach: use theirs, if it is
                // what this host makes.
                let l = self.need_link(dev.name()).await?;
                if let SegmentDevice::Vxlan(want) = dev {
                    self.check_vxlan(&l, want).await?;
                }
                return Ok((l, false));
            }
            Err(e) => return Err(nl(op)(e)),
        }
        undo.push(HostUndo::DeleteLink {
            name: dev.name().to_string(),
        });
        info!(link = dev.name(), "created segment device");
        let l = self.mark(dev.name()).await?;
        // Both CloudStack scripts disable IPv6 on the devices they make: a
        // segment device is a bridge port and must not autoconfigure
        // addresses or answer neighbour discovery on the tenant's segment.
        disable_ipv6(dev.name())?;
        Ok((l, true))
    }

    async fn ensure_bridge(
        &self,
        name: &str,
        no_ipv6: bool,
        undo: &mut Vec<HostUndo>,
    ) -> Result<(Link, bool), HostError> {
        if let Some(l) = self.link(name).await? {
            if !l.is(&InfoKind::Bridge) {
                return Err(HostError::NameConflict {
                    name: name.to_string(),
                    found: l.kind_name(),
                    wanted: "bridge",
                });
            }
            return Ok((l, false));
        }
        let msg = LinkMessageBuilder::<LinkBridge>::new(name).build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => {}
            Err(e) if has_errno(&e, Errno::EEXIST) => {
                let l = self.need_bridge(name).await?;
                return Ok((l, false));
            }
            Err(e) => return Err(nl(format!("create bridge {name}"))(e)),
        }
        undo.push(HostUndo::DeleteLink {
            name: name.to_string(),
        });
        info!(bridge = name, "created bridge");
        let l = self.mark(name).await?;
        if no_ipv6 {
            disable_ipv6(name)?;
        }
        Ok((l, true))
    }

    /// `bridge link set dev DEV neigh_suppress on learning off`, which
    /// `modifyvxlan-evpn.sh` runs on its VXLAN device once it is a bridge
    /// port: with EVPN, FRR's BGP fills the FDB and answers ARP/ND from its
    /// routes, so the port must neither flood neighbour requests over the
    /// fabric nor learn MACs from it. `IFLA_BRPORT_NEIGH_SUPPRESS` and
    /// `IFLA_BRPORT_LEARNING` in a change (RTM_NEWLINK) request, as
    /// `ip link set DEV type bridge_slave ...` sends them; RTM_SETLINK
    /// ignores port data.
    async fn evpn_bridge_port(&self, port: &Link) -> Result<(), HostError> {
        let msg = LinkBridgePort::new(port.index)
            .neigh_suppress(true)
            .learning(false)
            .build();
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(nl(format!(
                "set neigh_suppress on, learning off on bridge port {}",
                port.name
            )))?;
        debug!(port = %port.name, "EVPN bridge port: neigh_suppress on, learning off");
        Ok(())
    }

    /// Set [`AGENT_ALIAS`] on a link just created (the kernel ignores
    /// IFLA_IFALIAS in a create request, so it is a second request).
    async fn mark(&self, name: &str) -> Result<Link, HostError> {
        let l = self.need_link(name).await?;
        self.set(
            LinkUnspec::new_with_index(l.index)
                .alias(AGENT_ALIAS)
                .build(),
            format!("set alias on {name}"),
        )
        .await?;
        Ok(l)
    }

    async fn prepare_steps(
        &self,
        plan: &HostPlan,
        undo: &mut Vec<HostUndo>,
    ) -> Result<(), HostError> {
        if plan.switch == SwitchType::OpenVswitch {
            return Ok(());
        }
        let Some(dev) = &plan.segment_device else {
            // Plain/untagged: the label bridge must still be there.
            self.need_bridge(plan.bridge.as_str()).await?;
            return self.apply_mtu_raises(plan, undo).await;
        };
        for c in &plan.changes {
            if let PlannedChange::AddRoute { group, dev } = c {
                if self.add_route(*group, dev).await? {
                    info!(%group, dev = %dev, "added multicast route");
                    undo.push(HostUndo::DeleteRoute {
                        group: *group,
                        dev: dev.clone(),
                    });
                }
            }
        }
        let (d, d_new) = self.ensure_segment_device(dev, undo).await?;
        // modifyvlan.sh and modifyvxlan-evpn.sh disable IPv6 on the bridge
        // they make; modifyvxlan.sh (multicast) does not.
        let bridge_no_ipv6 = match dev {
            SegmentDevice::Vlan { .. } => true,
            SegmentDevice::Vxlan(v) => v.flavour == VxlanFlavour::Evpn,
        };
        let (b, b_new) = self
            .ensure_bridge(plan.bridge.as_str(), bridge_no_ipv6, undo)
            .await?;
        let enslave_now = d.controller != Some(b.index);
        if enslave_now {
            self.set(
                LinkUnspec::new_with_index(d.index)
                    .controller(b.index)
                    .build(),
                format!("enslave {} to {}", d.name, b.name),
            )
            .await?;
            if !d_new && !b_new {
                undo.push(HostUndo::Release {
                    port: d.name.clone(),
                });
            }
        }
        // The port settings go with the port: a release or a delete in the
        // undo takes them away, so they need no undo of their own. An
        // agent-made device enslaved before this existed gets them too; a
        // device someone else enslaved is left as it is.
        if let SegmentDevice::Vxlan(v) = dev {
            if v.flavour == VxlanFlavour::Evpn && (enslave_now || d.is_ours()) {
                self.evpn_bridge_port(&d).await?;
            }
        }
        for l in [&d, &b] {
            let r = self
                .handle
                .link()
                .set(LinkUnspec::new_with_index(l.index).up().build())
                .execute()
                .await;
            match r {
                Ok(()) => {}
                // A VXLAN device joins its multicast group when it comes
                // up; past net.ipv4.igmp_max_memberships (20 by default)
                // the kernel answers ENOBUFS. CloudStack hosts with many
                // VNIs raise that limit.
                Err(e) if has_errno(&e, Errno::ENOBUFS) && l.is(&InfoKind::Vxlan) => {
                    return Err(HostError::Unsupported(format!(
                        "{} cannot join its multicast group: this host has reached net.ipv4.igmp_max_memberships; raise it (sysctl -w net.ipv4.igmp_max_memberships=512) and retry",
                        l.name
                    )))
                }
                Err(e) => return Err(nl(format!("set {} up", l.name))(e)),
            }
        }
        self.apply_mtu_raises(plan, undo).await
    }

    async fn apply_mtu_raises(
        &self,
        plan: &HostPlan,
        undo: &mut Vec<HostUndo>,
    ) -> Result<(), HostError> {
        for c in &plan.changes {
            if let PlannedChange::RaiseMtu { link, to, .. } = c {
                let l = self.need_link(link).await?;
                if l.mtu >= *to {
                    continue;
                }
                self.set(
                    LinkUnspec::new_with_index(l.index).mtu(*to).build(),
                    format!("raise MTU of {link} from {} to {to}", l.mtu),
                )
                .await?;
                info!(link = %link, from = l.mtu, to = *to, "raised MTU");
                undo.push(HostUndo::SetMtu {
                    link: link.clone(),
                    mtu: l.mtu,
                });
            }
        }
        Ok(())
    }

    /// One undo step, without taking CloudStack's lock (the caller holds
    /// it when the step touches VXLAN).
    async fn undo_step(&self, step: HostUndo) -> Result<(), HostError> {
        match step {
            HostUndo::DeleteRoute { group, dev } => match self.link(&dev).await? {
                None => Ok(()),
                Some(l) => self.del_route(group, l.index).await,
            },

            HostUndo::DeleteLink { name } => match self.link(&name).await? {
                None => Ok(()),
                Some(l) if l.is_ours() => {
                    self.delete(&l).await?;
                    info!(link = %name, "removed link");
                    Ok(())
                }
                Some(_) => {
                    warn!(link = %name, "not deleting link: it no longer carries the agent alias");
                    Ok(())
                }
            },
            HostUndo::Release { port } => match self.link(&port).await? {
                None => Ok(()),
                Some(l) => {
                    self.set(
                        LinkUnspec::new_with_index(l.index).nocontroller().build(),
                        format!("release {port}"),
                    )
                    .await
                }
            },
            HostUndo::SetMtu { link, mtu } => match self.link(&link).await? {
                None => Ok(()),
                Some(l) => {
                    self.set(
                        LinkUnspec::new_with_index(l.index).mtu(mtu).build(),
                        format!("set MTU {mtu} on {link}"),
                    )
                    .await
                }
            },
            HostUndo::RestorePromisc { bridge, original } => {
                let b = bridge_name(&bridge)?;
                self.promisc_restore(&b, original).await
            }
            HostUndo::OvsMirrorRemove { bridge, mirror } => {
                let b = bridge_name(&bridge)?;
                self.ovs_mirror_remove(&b, &mirror).await
            }
        }
    }

    /// The saved sensors of `bridge` whose tap is still the same link.
    async fn saved_sensors(
        &self,
        bridge: &BridgeName,
    ) -> Result<Vec<tcmirror::SavedSensor>, HostError> {
        let mut out = Vec::new();
        for s in tcmirror::load_sensors(&self.config.state_dir, bridge.as_str()).await? {
            if self
                .link(&s.tap)
                .await?
                .is_some_and(|l| l.index == s.ifindex)
            {
                out.push(s);
            }
        }
        Ok(out)
    }

    async fn apply_promisc(&self, bridge: &Link, state: PromiscState) -> Result<(), HostError> {
        self.set(
            LinkUnspec::new_with_index(bridge.index)
                .promiscuous(state.promisc)
                .build(),
            format!("set promisc {} on {}", state.promisc, bridge.name),
        )
        .await?;
        // Ageing is put back only where the old IDS mode left it at 0: the
        // agent no longer changes it, and an operator's later setting wins.
        if bridge.ageing == Some(0) && state.ageing_time != 0 {
            self.set_ageing(bridge, state.ageing_time).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl HostNet for NetlinkHost {
    async fn resolve(
        &self,
        label: &BridgeName,
        switch: SwitchType,
        segment: &Segment,
    ) -> Result<HostPlan, HostError> {
        match switch {
            SwitchType::LinuxBridge => self.resolve_linux(label, segment).await,
            SwitchType::OpenVswitch => self.resolve_ovs(label, segment).await,
        }
    }

    async fn prepare(&self, plan: &HostPlan) -> Result<Vec<HostUndo>, HostError> {
        // CloudStack's lock covers creating the device and its route, and
        // the rollback of both; an already prepared segment takes nothing.
        let vxlan_change = matches!(plan.segment_device, Some(SegmentDevice::Vxlan(_)))
            && plan.changes.iter().any(|c| {
                matches!(
                    c,
                    PlannedChange::CreateSegmentDevice(_) | PlannedChange::AddRoute { .. }
                )
            });
        let _lock = if vxlan_change {
            Some(self.vxlan_lock().await?)
        } else {
            None
        };
        let mut undo = Vec::new();
        match self.prepare_steps(plan, &mut undo).await {
            Ok(()) => Ok(undo),
            Err(e) => {
                for step in undo.into_iter().rev() {
                    let desc = format!("{step:?}");
                    if let Err(u) = self.undo_step(step).await {
                        warn!(step = %desc, error = %u, "undo after failed prepare failed");
                    }
                }
                Err(e)
            }
        }
    }

    async fn undo(&self, step: HostUndo) -> Result<(), HostError> {
        let vxlan = match &step {
            HostUndo::DeleteRoute { .. } => true,
            HostUndo::DeleteLink { name } => self
                .link(name)
                .await?
                .is_some_and(|l| l.is(&InfoKind::Vxlan)),
            _ => false,
        };
        let _lock = if vxlan {
            Some(self.vxlan_lock().await?)
        } else {
            None
        };
        self.undo_step(step).await
    }

    async fn promisc_state(&self, bridge: &BridgeName) -> Result<PromiscState, HostError> {
        let b = self.need_bridge(bridge.as_str()).await?;
        Ok(PromiscState {
            promisc: b.flags.contains(LinkFlags::Promisc),
            ageing_time: b.ageing.unwrap_or(DEFAULT_AGEING),
        })
    }

    async fn promisc_enable(&self, bridge: &BridgeName) -> Result<Option<HostUndo>, HostError> {
        let b = self.need_bridge(bridge.as_str()).await?;
        let now = self.promisc_state(bridge).await?;
        let dir = &self.config.state_dir;
        if now.promisc {
            // Already promiscuous. A bridge the old IDS mode left at ageing
            // 0 gets its saved ageing back: the copies now come from tc.
            if let Some(a) = self.repair_ageing(bridge).await? {
                info!(bridge = %bridge, ageing_time = a, "restored ageing_time the old IDS mode set to 0");
            }
            return Ok(None);
        }
        let saved_before = promisc::load(dir, bridge.as_str()).await?.is_some();
        let original = promisc::save_original(dir, bridge.as_str(), now).await?;
        let on = self
            .set(
                LinkUnspec::new_with_index(b.index)
                    .promiscuous(true)
                    .build(),
                format!("set promisc on on {bridge}"),
            )
            .await;
        if let Err(e) = on {
            if !saved_before {
                // Nothing changed after all: do not leave a saved original
                // that a later restore would wrongly apply.
                promisc::forget(dir, bridge.as_str()).await?;
            }
            return Err(e);
        }
        info!(bridge = %bridge, ?original, "bridge promiscuous (IDS); ageing left alone");
        Ok(Some(HostUndo::RestorePromisc {
            bridge: bridge.to_string(),
            original,
        }))
    }

    async fn promisc_restore(
        &self,
        bridge: &BridgeName,
        original: PromiscState,
    ) -> Result<(), HostError> {
        if let Some(b) = self.link(bridge.as_str()).await? {
            if b.is(&InfoKind::Bridge) {
                self.apply_promisc(&b, original).await?;
                info!(bridge = %bridge, ?original, "restored promiscuous state");
            }
        }
        promisc::forget(&self.config.state_dir, bridge.as_str()).await
    }

    async fn repair_ageing(&self, bridge: &BridgeName) -> Result<Option<u32>, HostError> {
        let Some(saved) = promisc::load(&self.config.state_dir, bridge.as_str()).await? else {
            return Ok(None);
        };
        let Some(b) = self.link(bridge.as_str()).await? else {
            return Ok(None);
        };
        if !b.is(&InfoKind::Bridge) || b.ageing != Some(0) || saved.ageing_time == 0 {
            return Ok(None);
        }
        self.set_ageing(&b, saved.ageing_time).await?;
        Ok(Some(saved.ageing_time))
    }

    async fn ids_sensors(&self, bridge: &BridgeName) -> Result<Vec<String>, HostError> {
        Ok(self
            .saved_sensors(bridge)
            .await?
            .into_iter()
            .map(|s| s.tap)
            .collect())
    }

    async fn ids_tracked_bridges(&self) -> Result<Vec<String>, HostError> {
        Ok(tcmirror::tracked_bridges(&self.config.state_dir).await)
    }

    async fn ids_mirror_sync(
        &self,
        bridge: &BridgeName,
        sensors: Option<&[String]>,
    ) -> Result<usize, HostError> {
        let dir = &self.config.state_dir;
        // The list from libvirt (`Some`) is the truth: its taps are bound to
        // their ifindex now. The saved list (`None`) keeps only taps that
        // are still the same link; a sensor whose tap is gone gets no
        // copies, and its name on another VM's tap makes no sensor.
        let saved = match sensors {
            Some(names) => {
                let mut v = Vec::with_capacity(names.len());
                for n in names {
                    if let Some(l) = self.link(n).await? {
                        v.push(tcmirror::SavedSensor {
                            tap: n.clone(),
                            ifindex: l.index,
                        });
                    }
                }
                v
            }
            None => self.saved_sensors(bridge).await?,
        };
        let mut list: Vec<String> = saved.iter().map(|s| s.tap.clone()).collect();
        list.sort();
        list.dedup();
        if list.len() > tcmirror::MAX_SENSORS {
            warn!(bridge = %bridge, sensors = list.len(), max = tcmirror::MAX_SENSORS, "too many IDS sensors on one bridge; the rest get no copies");
        }
        tcmirror::save_sensors(dir, bridge.as_str(), &saved).await?;
        let Some(b) = self.link(bridge.as_str()).await? else {
            return Ok(0);
        };
        if !b.is(&InfoKind::Bridge) {
            return Ok(0);
        }
        let mut n = 0;
        let mut first_err = None;
        for p in self.ports_of(&b).await? {
            match tcmirror::sync_port(&p.name, &list).await {
                Ok(k) => n += k,
                // A port can vanish between the dump and tc (a tap going
                // away); keep the other ports in step and report once.
                Err(e) => {
                    if self.link(&p.name).await?.is_some() {
                        warn!(bridge = %bridge, port = %p.name, error = %e, "IDS mirror filters on a port");
                        if first_err.is_none() {
                            first_err = Some(e);
                        }
                    }
                }
            }
        }
        if n > 0 {
            info!(bridge = %bridge, sensors = ?list, changed = n, "IDS mirror filters in step");
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    async fn saved_promisc_state(
        &self,
        bridge: &BridgeName,
    ) -> Result<Option<PromiscState>, HostError> {
        promisc::load(&self.config.state_dir, bridge.as_str()).await
    }

    async fn ovs_mirror_add(&self, bridge: &BridgeName, port: &str) -> Result<HostUndo, HostError> {
        let mirror = ovs::mirror_add(&self.config.ovs_vsctl, bridge.as_str(), port).await?;
        info!(bridge = %bridge, port, mirror = %mirror, "OVS mirror added");
        Ok(HostUndo::OvsMirrorRemove {
            bridge: bridge.to_string(),
            mirror,
        })
    }

    async fn ovs_mirror_remove(&self, bridge: &BridgeName, mirror: &str) -> Result<(), HostError> {
        ovs::mirror_remove(&self.config.ovs_vsctl, bridge.as_str(), mirror).await
    }

    async fn set_tx_queue_len(&self, tap: &str, len: TxQueueLen) -> Result<(), HostError> {
        tx_queue_len_via(&self.handle, tap, len).await
    }

    async fn inspect(&self, query: &super::InspectQuery) -> Result<super::HostFacts, HostError> {
        let _turn = self.dump.lock().await;
        super::inspect::inspect(&self.handle, &self.config, query).await
    }

    fn objects(&self) -> &super::objects::HostObjects {
        &self.objects
    }

    async fn agent_bridges(&self) -> Result<Vec<String>, HostError> {
        let mut v: Vec<String> = self
            .links()
            .await?
            .into_iter()
            .filter(|l| l.is(&InfoKind::Bridge) && l.is_ours())
            .map(|l| l.name)
            .collect();
        v.sort();
        Ok(v)
    }

    async fn saved_promisc_bridges(&self) -> Result<Vec<String>, HostError> {
        Ok(promisc::saved_bridges(&self.config.state_dir).await)
    }

    async fn bridge_ports(&self, bridge: &BridgeName) -> Result<Option<BridgePorts>, HostError> {
        let Some(b) = self.link(bridge.as_str()).await? else {
            return Ok(None);
        };
        if !b.is(&InfoKind::Bridge) {
            return Ok(None);
        }
        let mut out = BridgePorts {
            ours: b.is_ours(),
            ..BridgePorts::default()
        };
        for p in self.ports_of(&b).await? {
            if p.is_ours() && (p.is(&InfoKind::Vlan) || p.is(&InfoKind::Vxlan)) {
                out.segment_devices.push(p.name);
            } else {
                out.others.push(p.name);
            }
        }
        Ok(Some(out))
    }

    async fn remove_bridge_if_unused(
        &self,
        bridge: &BridgeName,
        keep: &[String],
    ) -> Result<bool, HostError> {
        if keep.iter().any(|k| k == bridge.as_str()) {
            return Ok(false);
        }
        let Some(b) = self.link(bridge.as_str()).await? else {
            return Ok(false);
        };
        if !b.is(&InfoKind::Bridge) || !b.is_ours() {
            return Ok(false);
        }
        let mut segment_devices = Vec::new();
        for p in self.ports_of(&b).await? {
            if p.is_ours() && (p.is(&InfoKind::Vlan) || p.is(&InfoKind::Vxlan)) {
                segment_devices.push(p);
            } else {
                return Ok(false);
            }
        }
        let _lock = if segment_devices.iter().any(|d| d.is(&InfoKind::Vxlan)) {
            Some(self.vxlan_lock().await?)
        } else {
            None
        };
        for d in &segment_devices {
            // modifyvxlan.sh's delete: the group's route, then the device.
            if let (Some(v), Some(dev)) = (&d.vxlan, d.vxlan_dev) {
                if let Some(group) = v.group.filter(|g| g.is_multicast()) {
                    self.del_route(group, dev).await?;
                }
            }
            self.delete(d).await?;
            info!(link = %d.name, "removed segment device");
        }
        self.delete(&b).await?;
        info!(bridge = %bridge, "removed unused bridge");
        Ok(true)
    }
}
