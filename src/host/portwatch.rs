//! Follows the ports of Linux bridges with netlink events, so the IDS
//! mirror set stays in step with ports that come and go without any call
//! of ours: cloudstack-agent's own plugs, libvirt re-creating a tap, an
//! operator's `ip link set ... master`.
//!
//! It subscribes to RTNLGRP_LINK (RTM_NEWLINK/RTM_DELLINK of a port carry
//! its master) and RTNLGRP_TC (libvirt deleting a tap's ingress qdisc, and
//! with it the agent's filters, when it clears a `<bandwidth>`). Events come
//! in bursts, so affected bridges are collected and re-synced once after a
//! short quiet period, each under its lock, from the sensor list saved in
//! the state dir: no libvirt call on this path. Bridges without sensors are
//! skipped. The agent's own `tc` changes raise TC events too; the re-sync
//! they cause finds nothing to change, so it settles.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;

use super::HostNet;
use crate::nic::BridgeName;

/// Quiet time after the last event before bridges are re-synced.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

fn master_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(c) => Some(*c),
        _ => None,
    })
}

fn name_of(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// What one event points at: a bridge index (a port's master) or a port
/// index whose master must be looked up.
enum Hint {
    Bridge(u32),
    Port(u32),
}

fn hint(msg: &RouteNetlinkMessage) -> Option<Hint> {
    match msg {
        RouteNetlinkMessage::NewLink(m) | RouteNetlinkMessage::DelLink(m) => {
            master_of(m).map(Hint::Bridge)
        }
        RouteNetlinkMessage::NewQueueDiscipline(t)
        | RouteNetlinkMessage::DelQueueDiscipline(t)
        | RouteNetlinkMessage::DelTrafficFilter(t) => {
            u32::try_from(t.header.index).ok().map(Hint::Port)
        }
        _ => None,
    }
}

async fn link_by_index(h: &rtnetlink::Handle, index: u32) -> Option<LinkMessage> {
    h.link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
}

/// Runs until the netlink socket closes. Failures are logged: the
/// reconcile keeps the mirror sets in step too, only later.
pub async fn follow_bridge_ports(host: Arc<dyn HostNet>) {
    let (conn, handle, mut events) = match rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Tc,
    ]) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow bridge ports (netlink); IDS mirror sets follow the reconcile only");
            return;
        }
    };
    tokio::spawn(conn);
    loop {
        let Some((first, _)) = events.next().await else {
            tracing::warn!(
                "netlink event socket closed; IDS mirror sets follow the reconcile only"
            );
            return;
        };
        let mut hints = Vec::new();
        if let NetlinkPayload::InnerMessage(m) = first.payload {
            hints.extend(hint(&m));
        }
        // Debounce: take everything until the burst is quiet.
        while let Ok(Some((ev, _))) = tokio::time::timeout(DEBOUNCE, events.next()).await {
            if let NetlinkPayload::InnerMessage(m) = ev.payload {
                hints.extend(hint(&m));
            }
        }
        let mut bridges = BTreeSet::new();
        for h in hints {
            let idx = match h {
                Hint::Bridge(i) => Some(i),
                Hint::Port(p) => link_by_index(&handle, p).await.as_ref().and_then(master_of),
            };
            if let Some(i) = idx {
                bridges.insert(i);
            }
        }
        for i in bridges {
            let Some(name) = link_by_index(&handle, i).await.as_ref().and_then(name_of) else {
                continue;
            };
            let Ok(b) = BridgeName::try_from(name.as_str()) else {
                continue;
            };
            match host.ids_sensors(&b).await {
                Ok(s) if s.is_empty() => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(bridge = %b, error = %e, "port change: IDS sensor list");
                    continue;
                }
            }
            let r = match host.objects().lock(&[b.as_str()]).await {
                Ok(_g) => host.ids_mirror_sync(&b, None).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(bridge = %b, changed = n, "ports changed: IDS mirror filters in step")
                }
                Err(e) => {
                    tracing::warn!(bridge = %b, error = %e, "ports changed: IDS mirror filters")
                }
            }
        }
    }
}
