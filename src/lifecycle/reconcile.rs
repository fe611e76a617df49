//! The reconcile: compare the host with libvirt's live and persistent state
//! and repair what drifted, by the same rules as detach and the hook. It
//! runs in the background once at start-up (so health is SERVING without
//! waiting for it) and then every few minutes; it logs one line per repair.
//!
//! - Running domains get the host side they need (bridges rebuilt from
//!   their records, IDS state and OVS mirrors for live sensor NICs).
//! - Linux bridges with sensors get their `tc` mirror filters in step.
//! - Bridges the old IDS mode left at `ageing_time 0` get their saved
//!   ageing back.
//! - Bridges whose saved IDS state has no sensor left get it back.
//! - Agent-made bridges nothing uses are removed (after the grace period).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{ensure_host_for_domain, ensure_ids_mirrors, Caller};
use crate::host::objects::Removal;
use crate::hotplug::{Hotplug, HotplugError};
use crate::nic::BridgeName;

/// What one reconcile repaired, one line per repair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Human-readable repairs, in the order made.
    pub lines: Vec<String>,
}

/// One pass. `mirrors` re-applies OVS IDS mirrors too (at start-up only:
/// re-adding replaces a mirror, which would drop a moment of copies every
/// period).
pub async fn reconcile(hp: &Hotplug, mirrors: bool) -> Result<Repairs, HotplugError> {
    let mut out = Repairs::default();
    let Some(host) = hp.host.clone() else {
        return Ok(out);
    };
    let mut sensors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in hp.domains().await? {
        if !d.state.is_live() {
            continue;
        }
        let live = match hp.views(&d).await {
            Ok((Some(live), _)) => live,
            Ok((None, _)) | Err(HotplugError::VmNotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        for (b, taps) in super::linux_sensor_taps(&live) {
            sensors.entry(b).or_default().extend(taps);
        }
        match ensure_host_for_domain(host.as_ref(), &live, Caller::Agent).await {
            Ok(e) => {
                for b in e.built {
                    out.lines
                        .push(format!("rebuilt {b} for running vm {}", d.name));
                }
                for b in e.ids {
                    out.lines
                        .push(format!("put {b} back into IDS state for vm {}", d.name));
                }
            }
            Err(e) => {
                tracing::warn!(vm = %d.name, error = %e, "reconcile: host side of a running vm")
            }
        }
        if mirrors {
            match ensure_ids_mirrors(host.as_ref(), &live).await {
                Ok(0) => {}
                Ok(n) => out.lines.push(format!(
                    "re-applied {n} OVS IDS mirror(s) for vm {}",
                    d.name
                )),
                Err(e) => tracing::warn!(vm = %d.name, error = %e, "reconcile: IDS mirrors"),
            }
        }
    }
    // The mirror set of every bridge with sensors, or that had some: the
    // live XML of the running domains is the truth.
    let mut mirrored: BTreeSet<String> = host.ids_tracked_bridges().await?.into_iter().collect();
    mirrored.extend(sensors.keys().cloned());
    for b in mirrored {
        let Ok(bn) = BridgeName::try_from(b.as_str()) else {
            continue;
        };
        let taps = sensors.get(&b).cloned().unwrap_or_default();
        let r = match host.objects().lock(&[b.as_str()]).await {
            Ok(_g) => host.ids_mirror_sync(&bn, Some(&taps)).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(0) => {}
            Ok(n) => out.lines.push(format!(
                "brought {n} IDS mirror filter(s) on {b} in step ({} sensor(s))",
                taps.len()
            )),
            Err(e) => tracing::warn!(bridge = %b, error = %e, "reconcile: IDS mirror filters"),
        }
    }
    for b in host.saved_promisc_bridges().await? {
        let Ok(b) = BridgeName::try_from(b.as_str()) else {
            continue;
        };
        // The old IDS mode left its bridges at ageing_time 0 (a hub).
        let r = match host.objects().lock(&[b.as_str()]).await {
            Ok(_g) => host.repair_ageing(&b).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(Some(a)) => out.lines.push(format!(
                "restored {b}'s ageing_time {a} that the old IDS mode set to 0"
            )),
            Ok(None) => {}
            Err(e) => tracing::warn!(bridge = %b, error = %e, "reconcile: bridge ageing"),
        }
        match hp.restore_ids_if_unused(&b).await {
            Ok(true) => out
                .lines
                .push(format!("restored {b}'s pre-IDS state: no sensor left")),
            Ok(false) => {}
            Err(e) => tracing::warn!(bridge = %b, error = %e, "reconcile: IDS state"),
        }
    }
    let mut candidates: BTreeSet<String> = host.agent_bridges().await?.into_iter().collect();
    candidates.extend(
        host.objects()
            .remembered()
            .await
            .into_iter()
            .map(|r| r.bridge),
    );
    for b in candidates {
        let Ok(b) = BridgeName::try_from(b.as_str()) else {
            continue;
        };
        match hp.collect_bridge(&b).await {
            Ok(Removal::Delete) => out.lines.push(format!("removed unused bridge {b}")),
            Ok(_) => {}
            Err(e) => tracing::warn!(bridge = %b, error = %e, "reconcile: bridge clean-up"),
        }
    }
    for l in &out.lines {
        tracing::info!("reconcile: {l}");
    }
    Ok(out)
}

/// Runs [`reconcile`] once now, then every `every`, and also right after
/// libvirt reports a domain started or stopped (its lifecycle events): a
/// stopped sensor's bridge gets its state back, a started VM its host side,
/// without waiting for the period. Without events and without a period it
/// runs once.
pub async fn reconcile_loop(hp: std::sync::Arc<Hotplug>, every: Option<Duration>) {
    let mut events = hp.hypervisor().events().map(|h| h.subscribe());
    let mut first = true;
    loop {
        match reconcile(&hp, first).await {
            Ok(r) if r.lines.is_empty() => tracing::debug!("reconcile: nothing to repair"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconcile failed; tried again next period"),
        }
        first = false;
        if every.is_none() && events.is_none() {
            return;
        }
        let period = async {
            match every {
                Some(p) => tokio::time::sleep(p).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = period => {}
            _ = next_lifecycle(&mut events) => {
                // A destroy comes with a burst (stopped, then the release of
                // its devices): let it settle, then look once.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// Waits for a lifecycle event, a reconnect (events were lost) or a lag.
async fn next_lifecycle(
    rx: &mut Option<tokio::sync::broadcast::Receiver<crate::hypervisor::events::HvEvent>>,
) {
    use crate::hypervisor::events::HvEvent;
    use tokio::sync::broadcast::error::RecvError;
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(HvEvent::Lifecycle { .. } | HvEvent::Resubscribed) | Err(RecvError::Lagged(_)) => {
                return
            }
            Ok(_) => {}
            Err(RecvError::Closed) => return std::future::pending().await,
        }
    }
}
