//! The detach wait on libvirt events, pending unplugs that land later, and
//! libvirt calls past their deadline, against the fake hypervisor. The
//! same paths run on real QEMU in `tests/lab/test_e2e_events.py`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::host::testing::RecordingHost;
use crate::host::HostNet;
use crate::hypervisor::fake::{FakeHypervisor, Unplug};
use crate::hypervisor::{HvEvent, RunState, Target};
use crate::nic::MacAddr;

const MAC: &str = "52:54:00:00:00:0a";
const ALIAS: &str = "ua-0a";
const BRIDGE: &str = "brvx-5001";
/// Live reads the bridge clean-up makes after a NIC left: it asks every
/// running domain (vm1, vm2) whether its XML still names the bridge. They
/// come after the wait, never during it.
const CLEANUP_READS: u64 = 2;

fn cfg() -> HotplugConfig {
    HotplugConfig {
        detach_timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(10),
        pending_recheck: Duration::from_millis(20),
        call_timeout: Duration::from_millis(300),
        vhost_net_present: false,
        // These tests check when the clean-up runs, not the grace period.
        bridge_grace: Duration::ZERO,
        ..HotplugConfig::default()
    }
}

/// A running transient VM "vm1" holding one NIC with an alias on an
/// agent-made VXLAN bridge, put there directly (as an earlier attach
/// would have), and an engine over it.
fn setup(fake: FakeHypervisor) -> (Arc<FakeHypervisor>, Arc<RecordingHost>, Arc<Hotplug>) {
    setup_with(fake, cfg())
}

/// [`setup`] with this engine configuration.
fn setup_with(
    fake: FakeHypervisor,
    cfg: HotplugConfig,
) -> (Arc<FakeHypervisor>, Arc<RecordingHost>, Arc<Hotplug>) {
    let fake = Arc::new(fake);
    fake.add("vm1", RunState::Running, false, 2);
    fake.add("vm2", RunState::Running, false, 2);
    let dom = fake.lookup("vm1").expect("vm1");
    fake.attach(
        &dom,
        &format!("<interface type='bridge'><mac address='{MAC}'/><source bridge='{BRIDGE}'/><model type='virtio'/><alias name='{ALIAS}'/></interface>"),
        Target::Live,
    )
    .expect("nic");
    let host = Arc::new(RecordingHost::default());
    let hp = Arc::new(Hotplug::new(
        fake.clone(),
        Some(host.clone() as Arc<dyn HostNet>),
        cfg,
    ));
    (fake, host, hp)
}

fn mac() -> MacAddr {
    MacAddr::try_from(MAC).expect("mac")
}

fn live_detaches(fake: &FakeHypervisor) -> usize {
    fake.calls()
        .iter()
        .filter(|c| c.op == "detach" && c.target == Target::Live)
        .count()
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn event_during_the_unplug_call_is_not_lost_and_nothing_is_polled() {
    // The fake announces DEVICE_REMOVED inside the detach call itself,
    // before the wait begins: only a subscription made before the unplug
    // request sees it.
    let (fake, host, hp) = setup(FakeHypervisor::with_events());
    let reads = fake.live_reads();
    let st = hp.detach("vm1", &mac(), None, None).await.expect("detach");
    assert_eq!(st, DetachState::Removed);
    // One read to plan the detach, none while waiting, then the clean-up's.
    assert_eq!(
        fake.live_reads() - reads,
        1 + CLEANUP_READS,
        "the wait polled"
    );
    assert_eq!(host.cleaned(), vec![BRIDGE.to_string()]);
}

#[tokio::test]
async fn event_after_the_wait_started_ends_it() {
    let (fake, host, hp) = setup(FakeHypervisor::with_events());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let f2 = fake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        f2.guest_release("vm1", MAC);
    });
    let reads = fake.live_reads();
    let t0 = Instant::now();
    let st = hp.detach("vm1", &mac(), None, None).await.expect("detach");
    assert_eq!(st, DetachState::Removed);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        fake.live_reads() - reads,
        1 + CLEANUP_READS,
        "the wait polled"
    );
    assert_eq!(host.cleaned(), vec![BRIDGE.to_string()]);
}

#[tokio::test]
async fn removal_failed_event_ends_the_wait_at_once_and_the_nic_stays() {
    let (fake, host, hp) = setup(FakeHypervisor::with_events());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let f2 = fake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        f2.guest_refuse("vm1", MAC);
    });
    let t0 = Instant::now();
    let err = hp
        .detach("vm1", &mac(), None, None)
        .await
        .expect_err("refused");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(
        matches!(err, HotplugError::DetachRefused { ref alias, .. } if alias == ALIAS),
        "{err:?}"
    );
    assert_eq!(
        crate::api::status::code(&err),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(fake.live_alias("vm1", MAC).as_deref(), Some(ALIAS));
    assert!(
        host.cleaned().is_empty(),
        "clean-up ran for a NIC that stayed"
    );
    // Nothing is pending: a new detach sends a new request.
    *fake.unplug.lock().expect("lock") = Unplug::Immediate;
    let st = hp.detach("vm1", &mac(), None, None).await.expect("detach");
    assert_eq!(st, DetachState::Removed);
    assert_eq!(live_detaches(&fake), 2);
}

#[tokio::test]
async fn deadline_without_event_is_pending_and_nothing_is_polled() {
    let (fake, host, hp) = setup(FakeHypervisor::with_events());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let reads = fake.live_reads();
    let t0 = Instant::now();
    let err = hp
        .detach("vm1", &mac(), None, Some(Duration::from_millis(200)))
        .await
        .expect_err("pending");
    let waited = t0.elapsed();
    assert!(matches!(err, HotplugError::DetachPending { .. }), "{err:?}");
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(fake.live_reads() - reads, 1, "the wait polled");
    assert!(host.cleaned().is_empty());
}

#[tokio::test]
async fn reconnect_in_the_middle_reads_the_domain_again() {
    let (fake, _host, hp) = setup(FakeHypervisor::with_events());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let f2 = fake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The guest acks while the connection is down: the event is lost.
        f2.guest_release_unannounced("vm1", MAC);
        tokio::time::sleep(Duration::from_millis(50)).await;
        f2.emit(HvEvent::Resubscribed);
    });
    let reads = fake.live_reads();
    let st = hp.detach("vm1", &mac(), None, None).await.expect("detach");
    assert_eq!(st, DetachState::Removed);
    assert_eq!(
        fake.live_reads() - reads,
        2 + CLEANUP_READS,
        "one read to plan, one after the reconnect, then the clean-up's"
    );
}

#[tokio::test]
async fn a_stopped_domain_ends_the_wait() {
    let (fake, _host, hp) = setup(FakeHypervisor::with_events());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let f2 = fake.clone();
    let uuid = fake.uuid_of("vm1");
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        f2.guest_release_unannounced("vm1", MAC);
        f2.emit(HvEvent::Lifecycle {
            uuid,
            name: "vm1".into(),
            event: crate::hypervisor::Lifecycle::Stopped,
            detail: 1,
        });
    });
    let st = hp.detach("vm1", &mac(), None, None).await.expect("detach");
    assert_eq!(st, DetachState::Removed);
}

#[tokio::test]
async fn without_events_the_wait_polls() {
    let (fake, host, hp) = setup(FakeHypervisor::default());
    *fake.unplug.lock().expect("lock") = Unplug::AfterReads(3);
    let st = hp.detach("vm1", &mac(), None, None).await.expect("detach");
    assert_eq!(st, DetachState::Removed);
    assert_eq!(host.cleaned(), vec![BRIDGE.to_string()]);
}

#[tokio::test]
async fn a_pending_unplug_is_cleaned_up_when_its_event_comes_without_a_retry() {
    let (fake, host, hp) = setup(FakeHypervisor::with_events());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let err = hp
        .detach("vm1", &mac(), None, Some(Duration::from_millis(100)))
        .await
        .expect_err("pending");
    assert!(matches!(err, HotplugError::DetachPending { .. }), "{err:?}");
    assert!(host.cleaned().is_empty());
    fake.guest_release("vm1", MAC);
    eventually("clean-up after the event", || !host.cleaned().is_empty()).await;
    assert_eq!(host.cleaned(), vec![BRIDGE.to_string()]);
    // A late retry finds nothing to do and cleans nothing twice.
    let st = hp.detach("vm1", &mac(), None, None).await.expect("retry");
    assert_eq!(st, DetachState::AlreadyAbsent);
    assert_eq!(host.cleaned().len(), 1);
    assert_eq!(live_detaches(&fake), 1);
}

#[tokio::test]
async fn without_events_a_background_recheck_cleans_up_a_pending_unplug() {
    let (fake, host, hp) = setup(FakeHypervisor::default());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let _ = hp
        .detach("vm1", &mac(), None, Some(Duration::from_millis(100)))
        .await
        .expect_err("pending");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        host.cleaned().is_empty(),
        "cleaned up while the NIC is there"
    );
    fake.guest_release("vm1", MAC);
    eventually("clean-up by the re-check", || !host.cleaned().is_empty()).await;
    assert_eq!(host.cleaned(), vec![BRIDGE.to_string()]);
}

#[tokio::test]
async fn a_retry_that_finds_the_unplug_landed_runs_the_clean_up_once() {
    let mut c = cfg();
    // No background re-check in time: the retry comes first.
    c.pending_recheck = Duration::from_secs(3600);
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, false, 2);
    let dom = fake.lookup("vm1").expect("vm1");
    fake.attach(
        &dom,
        &format!("<interface type='bridge'><mac address='{MAC}'/><source bridge='{BRIDGE}'/><alias name='{ALIAS}'/></interface>"),
        Target::Live,
    )
    .expect("nic");
    let host = Arc::new(RecordingHost::default());
    let hp = Hotplug::new(fake.clone(), Some(host.clone() as Arc<dyn HostNet>), c);
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let _ = hp
        .detach("vm1", &mac(), None, Some(Duration::from_millis(50)))
        .await
        .expect_err("pending");
    fake.guest_release("vm1", MAC);
    let st = hp.detach("vm1", &mac(), None, None).await.expect("retry");
    assert_eq!(st, DetachState::AlreadyAbsent);
    assert_eq!(host.cleaned(), vec![BRIDGE.to_string()]);
}

#[tokio::test]
async fn an_attach_of_the_same_mac_forgets_the_pending_unplug() {
    let (fake, host, hp) = setup(FakeHypervisor::with_events());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let _ = hp
        .detach("vm1", &mac(), None, Some(Duration::from_millis(50)))
        .await
        .expect_err("pending");
    let uuid = fake.uuid_of("vm1");
    hp.forget_pending(&uuid, MAC);
    fake.guest_release("vm1", MAC);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        host.cleaned().is_empty(),
        "a forgotten unplug must not clean up what a new NIC uses"
    );
}

// ---------------------------------------------------------------- deadlines

#[tokio::test]
async fn a_hung_call_is_unavailable_and_leaves_only_its_vm_in_doubt() {
    let (fake, _host, hp) = setup(FakeHypervisor::default());
    fake.hang("detach", Target::Live);
    let t0 = Instant::now();
    let err = hp
        .detach("vm1", &mac(), None, None)
        .await
        .expect_err("hung");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        crate::api::status::code(&err),
        tonic::Code::Unavailable,
        "{err}"
    );
    let uuid = fake.uuid_of("vm1");
    assert!(hp.doubt.contains(&uuid));

    // The same VM: refused at once, naming the reason.
    let err = hp.list_nics("vm1").await.expect_err("in doubt");
    assert_eq!(crate::api::status::code(&err), tonic::Code::Unavailable);
    assert!(err.to_string().contains("vm vm1 is in doubt"), "{err}");
    // Another VM carries on.
    hp.list_nics("vm2").await.expect("vm2 is not in doubt");

    // The call returns; the domain is read again; the VM is usable.
    fake.release_hangs();
    eventually("vm1 out of doubt", || !hp.doubt.contains(&uuid)).await;
    hp.list_nics("vm1").await.expect("vm1 back");
}

#[tokio::test]
async fn a_dropped_request_leaves_its_vm_in_doubt_too() {
    let (fake, _host, hp) = setup(FakeHypervisor::default());
    fake.hang("xml", Target::Live);
    let h2 = hp.clone();
    let req = tokio::spawn(async move { h2.list_nics("vm1").await });
    let uuid = fake.uuid_of("vm1");
    // Give the call time to reach the fake, then drop the request (what
    // tonic does when a client's deadline passes).
    tokio::time::sleep(Duration::from_millis(100)).await;
    req.abort();
    let _ = req.await;
    assert!(hp.doubt.contains(&uuid));
    fake.release_hangs();
    eventually("vm1 out of doubt", || !hp.doubt.contains(&uuid)).await;
}

#[tokio::test]
async fn keep_bridge_per_call_leaves_the_bridge_and_the_next_detach_collects() {
    let (fake, host, hp) = setup(FakeHypervisor::with_events());
    let st = hp
        .detach_keeping("vm1", &mac(), None, None, true)
        .await
        .expect("detach");
    assert_eq!(st, DetachState::Removed);
    assert!(
        host.cleaned().is_empty(),
        "keep_bridge: the bridge must stay: {:?}",
        host.cleaned()
    );
    // The flag is per call: the same NIC plugged again and detached
    // without it lets the clean-up take the bridge.
    let dom = fake.lookup("vm1").expect("vm1");
    fake.attach(
        &dom,
        &format!("<interface type='bridge'><mac address='{MAC}'/><source bridge='{BRIDGE}'/><model type='virtio'/><alias name='{ALIAS}'/></interface>"),
        Target::Live,
    )
    .expect("nic");
    hp.detach("vm1", &mac(), None, None).await.expect("detach");
    assert_eq!(host.cleaned(), vec![BRIDGE.to_string()]);
}

#[tokio::test]
async fn keep_bridge_holds_for_an_unplug_that_lands_later() {
    let (fake, host, hp) = setup(FakeHypervisor::with_events());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let err = hp
        .detach_keeping("vm1", &mac(), None, Some(Duration::from_millis(100)), true)
        .await
        .expect_err("pending");
    assert!(matches!(err, HotplugError::DetachPending { .. }), "{err:?}");
    fake.guest_release("vm1", MAC);
    eventually("the NIC is gone", || {
        fake.lookup("vm1")
            .ok()
            .and_then(|d| fake.xml(&d, Target::Live).ok())
            .is_some_and(|x| !x.contains(MAC))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(host.cleaned().is_empty(), "{:?}", host.cleaned());
}

// ---- asking a guest again (pending.rs, "A guest can lose the request")

/// [`cfg`] asking again after 50 ms.
fn asking_again() -> HotplugConfig {
    HotplugConfig {
        unplug_retry: Duration::from_millis(50),
        ..cfg()
    }
}

/// A wait long enough to ask again inside it: libvirt's own 5 s wait must
/// fit before the deadline.
const LONG_WAIT: Duration = Duration::from_secs(7);

#[tokio::test]
async fn a_request_the_running_guest_lost_is_sent_again_and_the_detach_ends() {
    for fake in [FakeHypervisor::with_events(), FakeHypervisor::default()] {
        let events = fake.events().is_some();
        let (fake, host, hp) = setup_with(fake, asking_again());
        *fake.unplug.lock().expect("lock") = Unplug::LoseRequests(1);
        let t0 = Instant::now();
        let st = hp
            .detach("vm1", &mac(), None, Some(LONG_WAIT))
            .await
            .expect("detach");
        assert_eq!(st, DetachState::Removed, "events {events}");
        assert_eq!(live_detaches(&fake), 2, "events {events}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(host.cleaned(), vec![BRIDGE.to_string()]);
    }
}

#[tokio::test]
async fn without_asking_again_a_lost_request_stays_pending() {
    let cfg = HotplugConfig {
        unplug_retry: Duration::ZERO,
        ..cfg()
    };
    let (fake, host, hp) = setup_with(FakeHypervisor::with_events(), cfg);
    *fake.unplug.lock().expect("lock") = Unplug::LoseRequests(1);
    let err = hp
        .detach("vm1", &mac(), None, Some(Duration::from_millis(300)))
        .await
        .expect_err("pending");
    assert!(matches!(err, HotplugError::DetachPending { .. }), "{err:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(live_detaches(&fake), 1);
    assert!(host.cleaned().is_empty());
    assert!(fake.live_alias("vm1", MAC).is_some(), "the NIC left");
}

#[tokio::test]
async fn a_request_is_not_repeated_inside_a_wait_too_short_for_libvirts_own() {
    let (fake, _host, hp) = setup_with(FakeHypervisor::with_events(), asking_again());
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let t0 = Instant::now();
    let err = hp
        .detach("vm1", &mac(), None, Some(Duration::from_millis(400)))
        .await
        .expect_err("pending");
    assert!(matches!(err, HotplugError::DetachPending { .. }), "{err:?}");
    // A repeat inside this wait could have held it up to 5 s past the
    // deadline; the background watch asks instead.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    eventually("the background watch asks again", || {
        live_detaches(&fake) >= 2
    })
    .await;
}

#[tokio::test]
async fn a_paused_guest_is_not_asked_again_until_it_runs() {
    let (fake, host, hp) = setup_with(FakeHypervisor::with_events(), asking_again());
    fake.set_state("vm1", RunState::Paused);
    *fake.unplug.lock().expect("lock") = Unplug::LoseRequests(1);
    let _ = hp
        .detach("vm1", &mac(), None, Some(Duration::from_millis(100)))
        .await
        .expect_err("pending");
    // Six retry intervals paused: the background watch looks, and waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(live_detaches(&fake), 1, "a paused guest was asked again");
    assert!(host.cleaned().is_empty());
    fake.set_state("vm1", RunState::Running);
    eventually("asked again once running", || live_detaches(&fake) == 2).await;
    eventually("clean-up after the repeat landed", || {
        !host.cleaned().is_empty()
    })
    .await;
    assert_eq!(host.cleaned(), vec![BRIDGE.to_string()]);
    assert!(fake.live_alias("vm1", MAC).is_none());
}

#[tokio::test]
async fn a_guest_that_never_acts_is_asked_at_most_max_asks_times() {
    let cfg = HotplugConfig {
        unplug_retry: Duration::from_millis(20),
        ..cfg()
    };
    let (fake, host, hp) = setup_with(FakeHypervisor::with_events(), cfg);
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let _ = hp
        .detach("vm1", &mac(), None, Some(Duration::from_millis(50)))
        .await
        .expect_err("pending");
    let max = pending::MAX_ASKS as usize;
    eventually("every request sent", || live_detaches(&fake) == max).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(live_detaches(&fake), max, "asked past the limit");
    // Still followed: a late release is cleaned up.
    fake.guest_release("vm1", MAC);
    eventually("clean-up after the late release", || {
        !host.cleaned().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_retried_detach_shares_the_unplugs_schedule() {
    // The retry does not send its own request at once: the unplug was
    // asked for less than `unplug_retry` ago.
    let cfg = HotplugConfig {
        unplug_retry: Duration::from_secs(60),
        ..cfg()
    };
    let (fake, _host, hp) = setup_with(FakeHypervisor::with_events(), cfg);
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    for _ in 0..2 {
        let _ = hp
            .detach("vm1", &mac(), None, Some(Duration::from_millis(100)))
            .await
            .expect_err("pending");
    }
    assert_eq!(live_detaches(&fake), 1);
}
