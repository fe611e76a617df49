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
    // The sensor taps below come from this read of every domain.
    let ticket = host.objects().read_ticket();
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
        match hp.ids_apply(&bn, ticket, &taps).await {
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

#[cfg(test)]
mod tests {
    //! The reconcile's decisions, against the fake hypervisor and the
    //! recording host: what it repairs, and what it must leave alone. The
    //! same passes run on real links in the lab lifecycle suite.

    use std::sync::Arc;

    use super::*;
    use crate::host::testing::RecordingHost;
    use crate::host::{HostNet, PromiscState};
    use crate::hotplug::HotplugConfig;
    use crate::hypervisor::fake::FakeHypervisor;
    use crate::hypervisor::{Hypervisor, RunState, Target};

    const ORIGINAL: PromiscState = PromiscState {
        promisc: false,
        ageing_time: 30_000,
    };

    fn nic(mac: &str, bridge: &str, tap: &str, alias: &str) -> String {
        format!(
            "<interface type='bridge'><mac address='{mac}'/><source bridge='{bridge}'/>\
             <target dev='{tap}'/><model type='virtio'/><alias name='{alias}'/></interface>"
        )
    }

    /// A VM of the fake: name, state, persistent, NICs as (target, XML).
    type Vm<'a> = (&'a str, RunState, bool, Vec<(Target, String)>);

    /// The fake with `vms`, and an engine over it and `host`.
    fn engine(vms: &[Vm<'_>], host: RecordingHost) -> (Arc<RecordingHost>, Hotplug) {
        let (_, host, hp) = engine_and_fake(vms, host);
        (host, hp)
    }

    /// [`engine`], and the fake for tests that drive it directly.
    fn engine_and_fake(
        vms: &[Vm<'_>],
        host: RecordingHost,
    ) -> (Arc<FakeHypervisor>, Arc<RecordingHost>, Hotplug) {
        let fake = Arc::new(FakeHypervisor::default());
        for (name, state, persistent, nics) in vms {
            fake.add(name, *state, *persistent, 2);
            let dom = fake.lookup(name).expect("vm");
            for (target, xml) in nics {
                fake.attach(&dom, xml, *target).expect("nic");
            }
        }
        let host = Arc::new(host);
        let cfg = HotplugConfig {
            vhost_net_present: false,
            // The grace period has its own tests (host::objects); here a
            // bridge nothing uses goes at once.
            bridge_grace: Duration::ZERO,
            ..HotplugConfig::default()
        };
        let hp = Hotplug::new(fake.clone(), Some(host.clone() as Arc<dyn HostNet>), cfg);
        (fake, host, hp)
    }

    #[tokio::test]
    async fn a_bridge_whose_saved_ids_state_has_no_sensor_left_gets_it_back() {
        // brids-a's sensor VM is gone; brids-b's sensor runs; brids-c's only
        // sensor is in a shut-off VM's definition, which copies nothing.
        let (host, hp) = engine(
            &[
                (
                    "sensor",
                    RunState::Running,
                    false,
                    vec![(
                        Target::Live,
                        nic("52:54:00:00:01:01", "brids-b", "vnet11", "ua-ids-0101"),
                    )],
                ),
                (
                    "stopped-sensor",
                    RunState::ShutOff,
                    true,
                    vec![(
                        Target::Config,
                        nic("52:54:00:00:01:02", "brids-c", "vnet12", "ua-ids-0102"),
                    )],
                ),
            ],
            RecordingHost::default()
                .with_foreign_bridge("brids-a")
                .with_foreign_bridge("brids-b")
                .with_foreign_bridge("brids-c")
                .with_ids_state("brids-a", ORIGINAL, false)
                .with_ids_state("brids-b", ORIGINAL, false)
                .with_ids_state("brids-c", ORIGINAL, false),
        );
        let r = reconcile(&hp, false).await.expect("reconcile");
        assert!(
            r.lines
                .contains(&"restored brids-a's pre-IDS state: no sensor left".to_string()),
            "{r:?}"
        );
        assert!(
            r.lines
                .contains(&"restored brids-c's pre-IDS state: no sensor left".to_string()),
            "{r:?}"
        );
        assert!(!host.is_promisc("brids-a"));
        assert!(!host.is_promisc("brids-c"));
        assert!(
            host.is_promisc("brids-b"),
            "a live sensor's bridge was restored"
        );
        assert!(
            !host.changes().contains(&"restore brids-b".to_string()),
            "{:?}",
            host.changes()
        );
    }

    #[tokio::test]
    async fn a_live_sensor_gets_its_ids_state_and_mirror_filters_back() {
        // As after a host reboot: the sensor runs, but its bridge lost its
        // promiscuous flag and its tc filters.
        let (host, hp) = engine(
            &[(
                "sensor",
                RunState::Running,
                false,
                vec![
                    (
                        Target::Live,
                        nic("52:54:00:00:02:01", "brids", "vnet21", "ua-ids-0201"),
                    ),
                    (
                        Target::Live,
                        nic("52:54:00:00:02:02", "cloudbr0", "vnet22", "ua-0202"),
                    ),
                ],
            )],
            RecordingHost::default()
                .with_foreign_bridge("brids")
                .with_foreign_bridge("cloudbr0"),
        );
        let r = reconcile(&hp, false).await.expect("reconcile");
        assert!(
            r.lines
                .contains(&"put brids back into IDS state for vm sensor".to_string()),
            "{r:?}"
        );
        assert!(
            r.lines.contains(
                &"brought 1 IDS mirror filter(s) on brids in step (1 sensor(s))".to_string()
            ),
            "{r:?}"
        );
        assert!(host.is_promisc("brids"));
        assert!(
            !host.is_promisc("cloudbr0"),
            "a plain NIC's bridge was made promiscuous"
        );
        assert_eq!(
            host.changes(),
            vec![
                "promisc brids".to_string(),
                "mirror-sync brids vnet21".to_string()
            ]
        );
    }

    #[tokio::test]
    async fn a_gone_sensors_mirror_filters_are_removed() {
        let (host, hp) = engine(
            &[],
            RecordingHost::default()
                .with_foreign_bridge("brids")
                .with_sensors("brids", &["vnet31"]),
        );
        let r = reconcile(&hp, false).await.expect("reconcile");
        assert!(
            r.lines.contains(
                &"brought 1 IDS mirror filter(s) on brids in step (0 sensor(s))".to_string()
            ),
            "{r:?}"
        );
        assert_eq!(host.changes(), vec!["mirror-sync brids ".to_string()]);
    }

    #[tokio::test]
    async fn only_agent_made_bridges_that_nothing_uses_are_removed() {
        let (host, hp) = engine(
            &[
                (
                    "running",
                    RunState::Running,
                    false,
                    vec![(
                        Target::Live,
                        nic("52:54:00:00:04:01", "brvx-5002", "vnet41", "ua-0401"),
                    )],
                ),
                (
                    "stopped",
                    RunState::ShutOff,
                    true,
                    vec![(
                        Target::Config,
                        nic("52:54:00:00:04:02", "brvx-5004", "vnet42", "ua-0402"),
                    )],
                ),
            ],
            RecordingHost::default()
                // Nothing uses it.
                .with_agent_bridge("brvx-5001", &[])
                // A running VM's live XML names it (its tap is not seen).
                .with_agent_bridge("brvx-5002", &[])
                // A port is on it (cloudstack-agent's own plug, say).
                .with_agent_bridge("brvx-5003", &["vnet9"])
                // A stopped VM's definition names it.
                .with_agent_bridge("brvx-5004", &[]),
        );
        let r = reconcile(&hp, false).await.expect("reconcile");
        assert_eq!(
            r.lines,
            vec!["removed unused bridge brvx-5001".to_string()],
            "{r:?}"
        );
        assert_eq!(host.cleaned(), vec!["brvx-5001".to_string()]);
    }

    #[tokio::test]
    async fn an_intent_keeps_an_unused_bridge() {
        let host = RecordingHost::default().with_agent_bridge("brvx-5005", &[]);
        {
            let o = host.objects();
            let g = o.lock(&["brvx-5005"]).await.expect("lock");
            o.add_intent(
                &g,
                "brvx-5005",
                &crate::host::objects::IntentRecord {
                    vm: "u".into(),
                    what: "attach 52:54:00:00:05:01".into(),
                    pid: std::process::id(),
                    created_ms: super::super::now_ms(),
                },
            )
            .await
            .expect("intent");
        }
        let (host, hp) = engine(&[], host);
        let r = reconcile(&hp, false).await.expect("reconcile");
        assert!(r.lines.is_empty(), "{r:?}");
        assert!(host.cleaned().is_empty());
    }

    #[tokio::test]
    async fn ageing_zero_left_by_the_old_ids_mode_is_repaired_even_under_a_live_sensor() {
        let (host, hp) = engine(
            &[(
                "sensor",
                RunState::Running,
                false,
                vec![(
                    Target::Live,
                    nic("52:54:00:00:06:01", "brids-old", "vnet61", "ua-ids-0601"),
                )],
            )],
            RecordingHost::default()
                .with_foreign_bridge("brids-old")
                .with_foreign_bridge("brids-new")
                .with_ids_state("brids-old", ORIGINAL, true)
                // Put into IDS state by this version: its ageing was never 0.
                .with_ids_state("brids-new", ORIGINAL, false)
                .with_sensors("brids-old", &["vnet61"]),
        );
        let r = reconcile(&hp, false).await.expect("reconcile");
        assert!(
            r.lines.contains(
                &"restored brids-old's ageing_time 30000 that the old IDS mode set to 0"
                    .to_string()
            ),
            "{r:?}"
        );
        assert!(!host.is_ageing_zero("brids-old"));
        // The sensor stays a sensor: promiscuous, copies by tc.
        assert!(host.is_promisc("brids-old"));
        assert!(!host
            .changes()
            .iter()
            .any(|c| c == "restore brids-old" || c == "repair-ageing brids-new"));
    }

    #[tokio::test]
    async fn a_second_pass_finds_nothing_to_repair() {
        let (host, hp) = engine(
            &[(
                "sensor",
                RunState::Running,
                false,
                vec![(
                    Target::Live,
                    nic("52:54:00:00:07:01", "brids", "vnet71", "ua-ids-0701"),
                )],
            )],
            RecordingHost::default()
                .with_foreign_bridge("brids")
                .with_agent_bridge("brvx-5007", &[])
                .with_ids_state("brids-gone", ORIGINAL, true),
        );
        let first = reconcile(&hp, false).await.expect("first");
        assert_eq!(first.lines.len(), 5, "{first:?}");
        let changes = host.changes();
        let second = reconcile(&hp, false).await.expect("second");
        assert!(second.lines.is_empty(), "{second:?}");
        assert_eq!(host.changes(), changes, "the second pass changed the host");
    }

    #[tokio::test]
    async fn without_host_networking_nothing_is_looked_at() {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm", RunState::Running, false, 2);
        let hp = Hotplug::new(fake.clone(), None, HotplugConfig::default());
        let r = reconcile(&hp, true).await.expect("reconcile");
        assert!(r.lines.is_empty());
        assert!(fake.calls().is_empty(), "{:?}", fake.calls().len());
    }

    /// The race the diagnose suite hit beside the start-up reconcile: an
    /// attach's intent is live while a deleter reads libvirt (the NIC is
    /// not in the XML yet), and the attach has dropped it by the time the
    /// deleter holds the lock. The deleter must not take the bridge, nor
    /// the sensor's IDS state. The test holds the object lock to stop the
    /// deleter between its libvirt read and its verdict.
    async fn deleter_racing_an_attach<F>(
        host: RecordingHost,
        bridge: &'static str,
        nic_xml: String,
        deleter: impl FnOnce(Arc<Hotplug>, BridgeName) -> F,
    ) -> Arc<RecordingHost>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (fake, host, hp) = engine_and_fake(&[("vm", RunState::Running, false, vec![])], host);
        let hp = Arc::new(hp);
        let dom = fake.lookup("vm").expect("vm");
        let o = host.objects();
        // The attach's intent, taken under the lock as prepare_host does.
        let intent = {
            let g = o.lock(&[bridge]).await.expect("lock");
            o.add_intent(
                &g,
                bridge,
                &crate::host::objects::IntentRecord {
                    vm: fake.uuid_of("vm"),
                    what: "attach".into(),
                    pid: std::process::id(),
                    created_ms: super::super::now_ms(),
                },
            )
            .await
            .expect("intent")
        };
        let held = o.lock(&[bridge]).await.expect("lock");
        let name = BridgeName::try_from(bridge).expect("bridge name");
        let task = tokio::spawn(deleter(hp.clone(), name));
        let start = std::time::Instant::now();
        while fake.live_reads() == 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "no libvirt read");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The attach goes on: its NIC reaches the live XML, it drops the
        // intent. Then the deleter gets the lock.
        fake.attach(&dom, &nic_xml, Target::Live).expect("nic");
        o.drop_intent(&intent).await;
        drop(held);
        task.await.expect("deleter");
        host
    }

    #[tokio::test]
    async fn an_attach_in_flight_during_the_clean_ups_read_keeps_its_bridge() {
        let host = deleter_racing_an_attach(
            RecordingHost::default().with_agent_bridge("brvx-5007", &[]),
            "brvx-5007",
            nic("52:54:00:00:07:01", "brvx-5007", "vnet71", "ua-0701"),
            |hp, b| async move {
                let v = hp.collect_bridge(&b).await.expect("collect");
                assert!(matches!(v, Removal::Keep(_)), "{v:?}");
            },
        )
        .await;
        assert!(host.cleaned().is_empty(), "{:?}", host.cleaned());
    }

    #[tokio::test]
    async fn a_sensor_attach_in_flight_during_the_read_keeps_the_ids_state() {
        let host = deleter_racing_an_attach(
            RecordingHost::default()
                .with_foreign_bridge("brids")
                .with_ids_state("brids", ORIGINAL, false),
            "brids",
            nic("52:54:00:00:07:02", "brids", "vnet72", "ua-ids-0702"),
            |hp, b| async move {
                let restored = hp.restore_ids_if_unused(&b).await.expect("restore");
                assert!(!restored, "the new sensor's bridge was restored");
            },
        )
        .await;
        assert!(host.is_promisc("brids"));
    }

    /// Two mirror syncs of one bridge that take its lock in the other order
    /// than they read libvirt: the one that read before a sensor NIC
    /// reached the XML must not undo the filters of the one that read
    /// after (the sensor's own).
    #[tokio::test]
    async fn a_sync_that_read_before_a_sensor_arrived_leaves_the_later_ones_filters() {
        let (host, hp) = engine(
            &[("vm", RunState::Running, false, vec![])],
            RecordingHost::default().with_foreign_bridge("brids"),
        );
        let b = BridgeName::try_from("brids").expect("name");
        let early = host.objects().read_ticket();
        let (_, stale) = hp.ids_nics("brids").await.expect("read");
        assert!(stale.is_empty());
        let dom = hp.hypervisor().lookup("vm").expect("vm");
        hp.hypervisor()
            .attach(
                &dom,
                &nic("52:54:00:00:07:03", "brids", "vnet73", "ua-ids-0703"),
                Target::Live,
            )
            .expect("nic");
        assert_eq!(hp.ids_sync(&b).await.expect("sync"), 1);
        assert_eq!(hp.ids_apply(&b, early, &stale).await.expect("apply"), 0);
        assert_eq!(
            host.ids_sensors(&b).await.expect("sensors"),
            vec!["vnet73".to_string()]
        );
        // A sync that reads now still applies.
        let now = host.objects().read_ticket();
        assert_eq!(hp.ids_apply(&b, now, &[]).await.expect("apply"), 1);
        assert!(host.ids_sensors(&b).await.expect("sensors").is_empty());
    }
}
