//! [`NetlinkHost`]: the [`HostNet`] implementation that does all link work
//! through rtnetlink (no `ip`/`brctl` subprocesses) and OVS through ovs-vsctl.

use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use nix::errno::Errno;
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVlan, LinkVxlan};
use tracing::{info, warn};

use super::error::netlink_errno;
use super::mtu::VXLAN_IPV4_OVERHEAD;
use super::{
    naming, ovs, promisc, BridgePorts, HostConfig, HostError, HostNet, HostPlan, HostUndo,
    PlannedChange, PromiscState, SegmentDevice, VxlanSpec, AGENT_ALIAS,
};
use crate::nic::{BridgeName, Segment, SwitchType};

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

fn bridge_name(name: &str) -> Result<BridgeName, HostError> {
    BridgeName::try_from(name)
        .map_err(|_| HostError::Internal(format!("generated bridge name {name:?} is not valid")))
}

/// Host networking through rtnetlink, in the network namespace of the thread
/// that created it.
pub struct NetlinkHost {
    handle: rtnetlink::Handle,
    config: HostConfig,
    objects: super::objects::HostObjects,
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
        })
    }

    /// The configuration this host was built with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    async fn link(&self, name: &str) -> Result<Option<Link>, HostError> {
        let res = self
            .handle
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

    async fn links(&self) -> Result<Vec<Link>, HostError> {
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
        let bridge_mtu = existing_br
            .as_ref()
            .map(|b| b.mtu)
            .or(existing_dev.as_ref().map(|d| d.mtu))
            .unwrap_or(mtu_without_bridge);
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
                let ports = self.ports_of(&lb).await?;
                let port = ports
                    .into_iter()
                    .find(|p| naming::looks_physical(&p.name))
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
                let spec = VxlanSpec::for_vni(*vni, label.as_str());
                // The group is always IPv4 (239.x.y.z), so the outer header is
                // IPv4: 50 bytes. An IPv6 group would cost 70.
                let overhead = VXLAN_IPV4_OVERHEAD;
                let bridge = naming::vxlan_bridge(vni.get());
                let mtu = lb.mtu.saturating_sub(overhead);
                let underlay = Some((label.to_string(), lb.mtu));
                self.plan_segment(
                    label,
                    SegmentDevice::Vxlan(spec),
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
                let u = self.need_link(&v.underlay).await?;
                (
                    LinkVxlan::new(&v.name, v.vni.get())
                        .dev(u.index)
                        .group(v.group)
                        .ttl(v.ttl)
                        .port(v.dstport)
                        .learning(v.learning)
                        .build(),
                    format!("create VXLAN device {} over {}", v.name, v.underlay),
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
                // Lost a race with a concurrent attach: use theirs.
                let l = self.need_link(dev.name()).await?;
                return Ok((l, false));
            }
            Err(e) => return Err(nl(op)(e)),
        }
        undo.push(HostUndo::DeleteLink {
            name: dev.name().to_string(),
        });
        info!(link = dev.name(), "created segment device");
        let l = self.mark(dev.name()).await?;
        Ok((l, true))
    }

    async fn ensure_bridge(
        &self,
        name: &str,
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
        Ok((l, true))
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
        let (d, d_new) = self.ensure_segment_device(dev, undo).await?;
        let (b, b_new) = self.ensure_bridge(plan.bridge.as_str(), undo).await?;
        if d.controller != Some(b.index) {
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

    async fn apply_promisc(&self, bridge: &Link, state: PromiscState) -> Result<(), HostError> {
        self.set(
            LinkUnspec::new_with_index(bridge.index)
                .promiscuous(state.promisc)
                .build(),
            format!("set promisc {} on {}", state.promisc, bridge.name),
        )
        .await?;
        self.set_ageing(bridge, state.ageing_time).await
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
        let mut undo = Vec::new();
        match self.prepare_steps(plan, &mut undo).await {
            Ok(()) => Ok(undo),
            Err(e) => {
                for step in undo.into_iter().rev() {
                    let desc = format!("{step:?}");
                    if let Err(u) = self.undo(step).await {
                        warn!(step = %desc, error = %u, "undo after failed prepare failed");
                    }
                }
                Err(e)
            }
        }
    }

    async fn undo(&self, step: HostUndo) -> Result<(), HostError> {
        match step {
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
        if now.is_flooding() {
            return Ok(None);
        }
        let dir = &self.config.state_dir;
        let saved_before = promisc::load(dir, bridge.as_str()).await?.is_some();
        let original = promisc::save_original(dir, bridge.as_str(), now).await?;
        let flood = PromiscState {
            promisc: true,
            ageing_time: 0,
        };
        if let Err(e) = self.apply_promisc(&b, flood).await {
            if let Err(u) = self.apply_promisc(&b, now).await {
                warn!(bridge = %bridge, error = %u, "could not put promiscuous state back");
            } else if !saved_before {
                // Nothing changed after all: do not leave a saved original
                // that a later restore would wrongly apply.
                promisc::forget(dir, bridge.as_str()).await?;
            }
            return Err(e);
        }
        info!(bridge = %bridge, ?original, "bridge floods all frames (IDS)");
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

    async fn inspect(&self, query: &super::InspectQuery) -> Result<super::HostFacts, HostError> {
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
        for d in &segment_devices {
            self.delete(d).await?;
            info!(link = %d.name, "removed segment device");
        }
        self.delete(&b).await?;
        info!(bridge = %bridge, "removed unused bridge");
        Ok(true)
    }
}
