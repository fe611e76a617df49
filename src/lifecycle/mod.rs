//! The host side following the VM through its life: start, restore,
//! incoming migration, stop, and a host reboot that took every bridge away.
//!
//! One function, [`ensure_host_for_domain`], says "make the host side right
//! for this domain XML". Three callers share it:
//!
//! - the libvirt qemu hook ([`hook`]), which libvirt runs as
//!   `prepare begin` before it starts, restores or receives a domain;
//! - the reconcile ([`crate::hotplug::Hotplug::reconcile`]), at start-up and
//!   every few minutes, for domains that run already;
//! - the consumer of libvirt lifecycle events.
//!
//! Only bridges the agent itself made are rebuilt: their label and segment
//! were remembered when they were made ([`crate::host::objects`]), because a
//! name such as `brvx-5001` does not say which underlay carries the VNI.
//! Bridges CloudStack's own scripts build are cloudstack-agent's to build.

pub mod hook;
pub mod reconcile;

use crate::host::objects::{IntentRecord, SegmentRecord};
use crate::host::{HostError, HostNet};
use crate::hotplug::IDS_ALIAS_PREFIX;
use crate::nic::{BridgeName, NicError, Segment, SwitchType};
use crate::xml::domain::{DomainView, InterfaceView};

/// What [`ensure_host_for_domain`] did, one line per change for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ensured {
    /// Bridges (with their segment devices) that had to be built.
    pub built: Vec<String>,
    /// Bridges put into IDS state for a sensor NIC.
    pub ids: Vec<String>,
    /// Bridges the domain uses that were checked and already right.
    pub present: Vec<String>,
}

/// Who is ensuring: decides what the intent on each bridge looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The libvirt hook at `prepare`: the domain is not running yet, so the
    /// bridge keeps an intent (owner pid 0) until `started` or `release`.
    Hook,
    /// The agent, for a domain that runs already: its NICs are in the live
    /// XML, which keeps the bridge in use; no intent is left behind.
    Agent,
}

fn is_ids(i: &InterfaceView) -> bool {
    i.alias
        .as_deref()
        .is_some_and(|a| a.starts_with(IDS_ALIAS_PREFIX))
}

fn is_ovs(i: &InterfaceView) -> bool {
    i.virtualport.as_deref() == Some("openvswitch")
}

/// The bridges of a domain's bridge-type NICs, each once, sorted.
pub fn bridges_of(dom: &DomainView) -> Vec<String> {
    let mut v: Vec<String> = dom
        .interfaces
        .iter()
        .filter(|i| i.kind == "bridge")
        .filter_map(|i| i.source.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The segment a remembered bridge carries.
fn parse_segment(r: &SegmentRecord) -> Result<Segment, NicError> {
    crate::nic::parse_segment_uri(&r.segment)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Makes the host side right for `dom`: every agent-made bridge its NICs
/// use exists with its segment device, and Linux bridges of IDS NICs are in
/// IDS state. Each bridge is worked on under its lock. OVS mirrors need the
/// sensor's port, which exists only once the domain runs: see
/// [`ensure_ids_mirrors`].
pub async fn ensure_host_for_domain(
    host: &dyn HostNet,
    dom: &DomainView,
    caller: Caller,
) -> Result<Ensured, HostError> {
    let objects = host.objects();
    let mut out = Ensured::default();
    for bridge in bridges_of(dom) {
        let Ok(b) = BridgeName::try_from(bridge.as_str()) else {
            continue;
        };
        let nics: Vec<&InterfaceView> = dom
            .interfaces
            .iter()
            .filter(|i| i.kind == "bridge" && i.source.as_deref() == Some(bridge.as_str()))
            .collect();
        let record = objects.recall(&bridge).await;
        let linux_ids = nics.iter().any(|i| is_ids(i) && !is_ovs(i));
        if record.is_none() && !linux_ids {
            continue;
        }
        let guard = objects.lock(&[bridge.as_str()]).await?;
        if caller == Caller::Hook {
            objects
                .add_intent(
                    &guard,
                    &bridge,
                    &IntentRecord {
                        vm: dom.uuid.clone(),
                        what: format!("start of {}", dom.name),
                        pid: 0,
                        created_ms: now_ms(),
                    },
                )
                .await?;
        }
        if let Some(r) = &record {
            let label = BridgeName::try_from(r.label.as_str()).map_err(|e| {
                HostError::Internal(format!("segment record of {bridge}: label: {e}"))
            })?;
            let segment = parse_segment(r)
                .map_err(|e| HostError::Internal(format!("segment record of {bridge}: {e}")))?;
            let plan = host
                .resolve(&label, SwitchType::LinuxBridge, &segment)
                .await?;
            if plan.bridge.as_str() != bridge {
                return Err(HostError::Internal(format!(
                    "segment record of {bridge} resolves to {}",
                    plan.bridge
                )));
            }
            if plan.changes.is_empty() {
                out.present.push(bridge.clone());
            } else {
                host.prepare(&plan).await?;
                tracing::info!(vm = %dom.name, %bridge, segment = %r.segment, "rebuilt agent-made bridge for the domain");
                out.built.push(bridge.clone());
            }
        }
        if linux_ids && host.promisc_enable(&b).await?.is_some() {
            tracing::info!(vm = %dom.name, %bridge, "bridge put into IDS state for the domain's sensor NIC");
            out.ids.push(bridge.clone());
        }
        drop(guard);
    }
    Ok(out)
}

/// OVS IDS mirrors for the sensor NICs of a running domain (their ports
/// exist now). Idempotent: an existing mirror of the same name is replaced.
pub async fn ensure_ids_mirrors(host: &dyn HostNet, dom: &DomainView) -> Result<usize, HostError> {
    let mut n = 0;
    for i in dom.interfaces.iter().filter(|i| is_ids(i) && is_ovs(i)) {
        let (Some(src), Some(tap)) = (i.source.as_deref(), i.target.as_deref()) else {
            continue;
        };
        let Ok(b) = BridgeName::try_from(src) else {
            continue;
        };
        let _g = host.objects().lock(&[src]).await?;
        host.ovs_mirror_add(&b, tap).await?;
        n += 1;
    }
    Ok(n)
}

/// The IDS sensor taps of a running domain's Linux-bridge NICs, per bridge.
pub fn linux_sensor_taps(dom: &DomainView) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for i in dom.interfaces.iter().filter(|i| is_ids(i) && !is_ovs(i)) {
        if let (Some(src), Some(tap)) = (i.source.as_deref(), i.target.as_deref()) {
            out.entry(src.to_string())
                .or_default()
                .push(tap.to_string());
        }
    }
    out
}

/// `tc` mirror filters for the Linux-bridge sensor NICs of a domain that
/// runs now (its taps exist), without asking libvirt: the domain's sensors
/// are added to each bridge's saved list. Also re-syncs every other Linux
/// bridge of the domain that has sensors, since its taps are new ports.
pub async fn ensure_ids_filters(host: &dyn HostNet, dom: &DomainView) -> Result<usize, HostError> {
    let mine = linux_sensor_taps(dom);
    let mut n = 0;
    for bridge in bridges_of(dom) {
        let Ok(b) = BridgeName::try_from(bridge.as_str()) else {
            continue;
        };
        if dom
            .interfaces
            .iter()
            .any(|i| i.source.as_deref() == Some(bridge.as_str()) && is_ovs(i))
        {
            continue;
        }
        let _g = host.objects().lock(&[bridge.as_str()]).await?;
        let mut sensors = host.ids_sensors(&b).await?;
        if sensors.is_empty() && !mine.contains_key(&bridge) {
            continue;
        }
        sensors.extend(mine.get(&bridge).cloned().unwrap_or_default());
        n += host.ids_mirror_sync(&b, Some(&sensors)).await?;
    }
    Ok(n)
}
