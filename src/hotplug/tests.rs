//! Orchestration tests of attach/detach against the recording fake
//! hypervisor. Most paths are also proven on the libvirt test driver
//! (tests/agent_testdriver.rs) and on real QEMU (tests/lab); the ones only
//! the fake proves are listed in `hypervisor::fake`'s module comment.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::hypervisor::fake::{Call, FakeHypervisor, Unplug};
use crate::hypervisor::{HvErrorKind, RunState, Target};
use crate::nic::{MacAddr, NicSpec, RawNic};

fn spec(mac: &str) -> NicSpec {
    NicSpec::try_from(RawNic {
        mac: mac.into(),
        bridge: "cloudbr0".into(),
        ..Default::default()
    })
    .expect("valid spec")
}

fn engine(fake: Arc<FakeHypervisor>) -> Hotplug {
    let cfg = HotplugConfig {
        detach_timeout: Duration::from_millis(300),
        poll_interval: Duration::from_millis(10),
        vhost_net_present: false,
        ..HotplugConfig::default()
    };
    Hotplug::new(fake, None, cfg)
}

fn mac(s: &str) -> MacAddr {
    MacAddr::try_from(s).expect("mac")
}

#[tokio::test]
async fn running_persistent_vm_gets_live_then_config() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 2);
    let hp = engine(fake.clone());
    let out = hp
        .attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect("attach");
    assert_eq!(out.applied, vec![Target::Live, Target::Config]);
    assert!(out.nic.in_live && out.nic.in_config);
    let ops: Vec<(&str, Target)> = fake.calls().iter().map(|c| (c.op, c.target)).collect();
    assert_eq!(
        ops,
        vec![("attach", Target::Live), ("attach", Target::Config)]
    );
}

/// The read after an attach rides in the attach's trip; when only that
/// read fails, the attach stands and the read-back reads again.
#[tokio::test]
async fn a_failed_read_after_the_attach_is_read_again_not_undone() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, false, 2);
    let hp = engine(fake.clone());
    // Live read 1 is the fresh read before the change, 2 the one after it.
    *fake.fail_live_read.lock().expect("lock") = Some((2, HvErrorKind::Internal));
    let before = fake.live_reads();
    let out = hp
        .attach("vm1", &spec("52:54:00:00:00:0a"))
        .await
        .expect("attach stands");
    assert!(out.nic.in_live, "{:?}", out.nic);
    assert_eq!(
        fake.live_reads() - before,
        3,
        "the failed read is made again"
    );
    let ops: Vec<&str> = fake.calls().iter().map(|c| c.op).collect();
    assert_eq!(ops, vec!["attach"], "nothing undone");
    // Without the failure the read after the attach serves the read-back.
    let before = fake.live_reads();
    hp.attach("vm1", &spec("52:54:00:00:00:0b"))
        .await
        .expect("attach");
    assert_eq!(fake.live_reads() - before, 2);
}

#[tokio::test]
async fn config_failure_undoes_the_live_half() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 2);
    *fake.fail_next.lock().expect("lock") = Some(("attach", Target::Config, HvErrorKind::Internal));
    let hp = engine(fake.clone());
    let err = hp
        .attach("vm1", &spec("52:54:00:00:00:02"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, HotplugError::Hypervisor(_)), "{err:?}");
    let calls = fake.calls();
    assert_eq!(
        calls.last(),
        Some(&Call {
            op: "detach",
            target: Target::Live,
            mac: "52:54:00:00:00:02".into()
        }),
        "live half must be undone: {calls:?}"
    );
    assert!(
        hp.list_nics("vm1").await.expect("list").is_empty(),
        "no half-attached NIC"
    );
}

#[tokio::test]
async fn detach_removes_config_before_live_and_waits_for_the_guest() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 2);
    let hp = engine(fake.clone());
    hp.attach("vm1", &spec("52:54:00:00:00:03"))
        .await
        .expect("attach");
    *fake.unplug.lock().expect("lock") = Unplug::AfterReads(3);
    let st = hp
        .detach("vm1", &mac("52:54:00:00:00:03"), None, None)
        .await
        .expect("detach");
    assert_eq!(st, DetachState::Removed);
    let detaches: Vec<Target> = fake
        .calls()
        .iter()
        .filter(|c| c.op == "detach")
        .map(|c| c.target)
        .collect();
    assert_eq!(detaches, vec![Target::Config, Target::Live]);
    assert!(hp.list_nics("vm1").await.expect("list").is_empty());
}

#[tokio::test]
async fn hung_guest_gives_pending_and_a_retry_sends_no_second_device_del() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Paused, false, 1);
    let hp = engine(fake.clone());
    hp.attach("vm1", &spec("52:54:00:00:00:04"))
        .await
        .expect("attach");
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let err = hp
        .detach(
            "vm1",
            &mac("52:54:00:00:00:04"),
            None,
            Some(Duration::from_millis(100)),
        )
        .await
        .expect_err("pending");
    assert!(matches!(err, HotplugError::DetachPending { .. }), "{err:?}");
    // The guest is resumed and acks; a retry waits without a new device_del.
    fake.guest_release("vm1", "52:54:00:00:00:04");
    let st = hp
        .detach("vm1", &mac("52:54:00:00:00:04"), None, None)
        .await
        .expect("retry");
    assert_eq!(st, DetachState::AlreadyAbsent);
    let live_detaches = fake
        .calls()
        .iter()
        .filter(|c| c.op == "detach" && c.target == Target::Live)
        .count();
    assert_eq!(live_detaches, 1, "exactly one device_del");
}

#[tokio::test]
async fn retry_while_still_pending_waits_on_the_first_request() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, false, 1);
    let hp = engine(fake.clone());
    hp.attach("vm1", &spec("52:54:00:00:00:05"))
        .await
        .expect("attach");
    *fake.unplug.lock().expect("lock") = Unplug::Never;
    let _ = hp
        .detach(
            "vm1",
            &mac("52:54:00:00:00:05"),
            None,
            Some(Duration::from_millis(50)),
        )
        .await
        .expect_err("pending");
    let hp = Arc::new(hp);
    let h2 = hp.clone();
    let waiter = tokio::spawn(async move {
        h2.detach(
            "vm1",
            &mac("52:54:00:00:00:05"),
            None,
            Some(Duration::from_secs(5)),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    fake.guest_release("vm1", "52:54:00:00:00:05");
    let st = waiter.await.expect("join").expect("detach");
    assert_eq!(st, DetachState::Removed);
    let live_detaches = fake
        .calls()
        .iter()
        .filter(|c| c.op == "detach" && c.target == Target::Live)
        .count();
    assert_eq!(live_detaches, 1);
}

#[tokio::test]
async fn absent_mac_is_already_absent_without_libvirt_calls() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 1);
    let hp = engine(fake.clone());
    let st = hp
        .detach("vm1", &mac("52:54:00:00:00:06"), None, None)
        .await
        .expect("detach");
    assert_eq!(st, DetachState::AlreadyAbsent);
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn live_detach_failure_puts_the_config_nic_back() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 2);
    let hp = engine(fake.clone());
    hp.attach("vm1", &spec("52:54:00:00:00:07"))
        .await
        .expect("attach");
    *fake.fail_next.lock().expect("lock") = Some(("detach", Target::Live, HvErrorKind::Internal));
    let _ = hp
        .detach("vm1", &mac("52:54:00:00:00:07"), None, None)
        .await
        .expect_err("fails");
    let nics = hp.list_nics("vm1").await.expect("list");
    assert_eq!(nics.len(), 1);
    assert!(
        nics[0].in_live && nics[0].in_config,
        "config half restored: {nics:?}"
    );
}

#[tokio::test]
async fn stopped_transient_vm_is_not_found() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("gone", RunState::ShutOff, false, 1);
    let hp = engine(fake.clone());
    let e = hp
        .attach("gone", &spec("52:54:00:00:00:08"))
        .await
        .expect_err("nothing to attach to");
    // A transient domain that is not running is being destroyed.
    assert!(matches!(e, HotplugError::VmNotFound(_)), "{e:?}");
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn undo_waits_for_a_restarting_libvirtd_instead_of_leaving_a_half_attached_nic() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 2);
    // libvirtd goes away after the live half: the config attach and the
    // first two undo attempts find it unreachable, then it is back.
    *fake.fail_queue.lock().expect("lock") = vec![
        ("attach", Target::Config, HvErrorKind::Unavailable),
        ("detach", Target::Live, HvErrorKind::Unavailable),
        ("detach", Target::Live, HvErrorKind::Unavailable),
    ];
    let hp = engine(fake.clone());
    let e = hp
        .attach("vm1", &spec("52:54:00:00:00:09"))
        .await
        .expect_err("fails");
    assert!(
        matches!(e, HotplugError::Hypervisor(ref h) if h.kind == HvErrorKind::Unavailable),
        "{e:?}"
    );
    let live_detaches = fake
        .calls()
        .iter()
        .filter(|c| c.op == "detach" && c.target == Target::Live)
        .count();
    assert_eq!(live_detaches, 3, "undo retried until libvirtd answered");
    assert!(
        hp.list_nics("vm1").await.expect("list").is_empty(),
        "no half-attached NIC"
    );
}

#[tokio::test]
async fn a_nic_libvirt_lost_is_unplugged_and_the_attach_retried() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, false, 2);
    fake.add_ghost("vm1", "ua-lost", "52:54:00:00:00:99", true);
    let hp = engine(fake.clone());
    let out = hp
        .attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect("attach after removing the lost NIC");
    assert!(out.nic.in_live);
    assert!(
        fake.ghosts("vm1").is_empty(),
        "the lost NIC is still in QEMU"
    );
    let calls = fake.calls();
    let ops: Vec<(&str, &str)> = calls.iter().map(|c| (c.op, c.mac.as_str())).collect();
    assert_eq!(
        ops,
        vec![
            ("attach", "52:54:00:00:00:01"),
            ("device_del", "ua-lost"),
            ("netdev_del", "hostua-lost"),
            ("attach", "52:54:00:00:00:01"),
        ]
    );
}

#[tokio::test]
async fn a_nic_that_is_not_ours_is_never_unplugged() {
    // A <qemu:commandline> NIC, or one cloudstack-agent is plugging right
    // now: QEMU has it, the live XML does not (yet), and its id is not ua-.
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, false, 2);
    fake.add_ghost("vm1", "net7", "52:54:00:00:00:98", true);
    *fake.fail_next.lock().expect("lock") = Some(("attach", Target::Live, HvErrorKind::Internal));
    let hp = engine(fake.clone());
    let err = hp
        .attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect_err("QEMU refused, and no NIC of ours was lost");
    assert!(matches!(err, HotplugError::Hypervisor(_)), "{err:?}");
    assert_eq!(fake.ghosts("vm1").len(), 1, "a foreign NIC was unplugged");
    assert!(
        !fake.calls().iter().any(|c| c.op == "device_del"),
        "{:?}",
        fake.calls()
    );
}

#[tokio::test]
async fn a_lost_nic_the_guest_keeps_fails_the_attach_naming_it() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, false, 2);
    fake.add_ghost("vm1", "ua-lost", "52:54:00:00:00:99", false);
    let hp = engine(fake.clone());
    let err = hp
        .attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect_err("the slot is still held");
    let msg = err.to_string();
    assert!(matches!(err, HotplugError::Precondition(_)), "{err:?}");
    assert!(
        msg.contains("ua-lost") && msg.contains("52:54:00:00:00:99"),
        "{msg}"
    );
    // No netdev_del while the device is still there, and nothing attached.
    assert!(!fake.calls().iter().any(|c| c.op == "netdev_del"));
    assert!(hp.list_nics("vm1").await.expect("list").is_empty());
    // The guest resumes and lets the device go. The netdev_del is still
    // owed (it closes the host's tap), though QEMU now lists no lost NIC:
    // the retried attach sends it, once, and goes through.
    fake.release_ghosts("vm1");
    hp.attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect("retry after resume");
    let netdev_dels: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| c.op == "netdev_del")
        .map(|c| c.mac)
        .collect();
    assert_eq!(netdev_dels, vec!["hostua-lost".to_string()]);
    hp.attach("vm1", &spec("52:54:00:00:00:02"))
        .await
        .expect("next attach");
    assert_eq!(
        fake.calls().iter().filter(|c| c.op == "netdev_del").count(),
        1,
        "owed netdev_del sent once"
    );
}

#[tokio::test]
async fn a_refused_attach_with_no_lost_nic_keeps_its_own_error() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, false, 2);
    *fake.fail_next.lock().expect("lock") = Some(("attach", Target::Live, HvErrorKind::Internal));
    let hp = engine(fake.clone());
    let err = hp
        .attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect_err("scripted failure");
    assert!(
        matches!(err, HotplugError::Hypervisor(ref e) if e.message == "scripted failure"),
        "{err:?}"
    );
    assert!(!fake.calls().iter().any(|c| c.op == "device_del"));
    assert_eq!(fake.calls().iter().filter(|c| c.op == "attach").count(), 1);
}

#[tokio::test]
async fn libvirtd_lost_mid_attach_removes_what_qemu_kept_before_answering() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, false, 2);
    // QEMU ran device_add; libvirtd died before recording it.
    fake.add_ghost("vm1", "ua-half", "52:54:00:00:00:01", true);
    *fake.fail_next.lock().expect("lock") =
        Some(("attach", Target::Live, HvErrorKind::Unavailable));
    let hp = engine(fake.clone());
    let err = hp
        .attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect_err("libvirtd went away");
    assert!(
        matches!(err, HotplugError::Hypervisor(ref e) if e.kind == HvErrorKind::Unavailable),
        "{err:?}"
    );
    assert!(
        fake.ghosts("vm1").is_empty(),
        "QEMU still holds the half-attached NIC"
    );
    // The retry is an ordinary attach.
    let out = hp
        .attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect("retry");
    assert!(!out.already_present);
    assert_eq!(
        fake.calls().iter().filter(|c| c.op == "device_del").count(),
        1
    );
}

#[tokio::test]
async fn a_suspect_vm_is_checked_before_a_detach_answers_already_absent() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, false, 2);
    // libvirtd stays away past the check after the failed attach: the
    // ghost is found only at the next change, here a detach.
    *fake.fail_queue.lock().expect("lock") = vec![
        ("attach", Target::Live, HvErrorKind::Unavailable),
        ("qemu_nics", Target::Live, HvErrorKind::Internal),
    ];
    let hp = engine(fake.clone());
    hp.attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect_err("libvirtd went away");
    fake.add_ghost("vm1", "ua-half", "52:54:00:00:00:01", true);
    let state = hp
        .detach("vm1", &mac("52:54:00:00:00:01"), None, None)
        .await
        .expect("detach");
    assert_eq!(state, DetachState::AlreadyAbsent);
    assert!(
        fake.ghosts("vm1").is_empty(),
        "detach left the lost NIC in QEMU"
    );
}

#[tokio::test]
async fn a_step_libvirt_recorded_before_it_went_away_counts_as_done() {
    for lost in [Target::Live, Target::Config] {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, true, 2);
        *fake.lose_reply.lock().expect("lock") = vec![("attach", lost)];
        let hp = engine(fake.clone());
        let out = hp
            .attach("vm1", &spec("52:54:00:00:00:01"))
            .await
            .unwrap_or_else(|e| panic!("attach with the {lost} reply lost: {e}"));
        assert!(out.nic.in_live && out.nic.in_config, "{lost}: {out:?}");
        // One attach per definition: nothing was sent twice, nothing undone.
        let ops: Vec<(&str, Target)> = fake.calls().iter().map(|c| (c.op, c.target)).collect();
        assert_eq!(
            ops,
            vec![("attach", Target::Live), ("attach", Target::Config)],
            "{lost}"
        );
    }
}

#[tokio::test]
async fn a_live_attach_lost_with_nothing_recorded_answers_unavailable_and_leaves_nothing() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 2);
    *fake.fail_next.lock().expect("lock") =
        Some(("attach", Target::Live, HvErrorKind::Unavailable));
    let hp = engine(fake.clone());
    let err = hp
        .attach("vm1", &spec("52:54:00:00:00:01"))
        .await
        .expect_err("libvirtd went away");
    assert!(
        matches!(err, HotplugError::Hypervisor(ref e) if e.kind == HvErrorKind::Unavailable),
        "{err:?}"
    );
    assert!(hp.list_nics("vm1").await.expect("list").is_empty());
    assert!(!fake.calls().iter().any(|c| c.target == Target::Config));
}

#[tokio::test]
async fn shaped_attach_to_a_running_vm_without_kernel_support_is_refused_before_libvirt() {
    use crate::host::tc::{Ability, TcAbilities, TcProbe};
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 2);
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
    let shaped = NicSpec::try_from(RawNic {
        mac: "52:54:00:00:00:01".into(),
        bridge: "cloudbr0".into(),
        outbound: Some(crate::nic::RawBandwidth {
            average_kbps: 100,
            ..Default::default()
        }),
        ..Default::default()
    })
    .expect("spec");
    let err = hp.attach("vm1", &shaped).await.expect_err("no act_police");
    assert_eq!(
        crate::api::status::code(&err),
        tonic::Code::FailedPrecondition
    );
    assert!(err.to_string().contains("act_police"), "{err}");
    assert!(
        fake.calls().is_empty(),
        "libvirt was asked: {:?}",
        fake.calls()
    );
    // Unshaped NICs still attach.
    hp.attach("vm1", &spec("52:54:00:00:00:02"))
        .await
        .expect("plain attach");
}

fn with_tx_queue_len(mac: &str, len: u32) -> NicSpec {
    NicSpec::try_from(RawNic {
        mac: mac.into(),
        bridge: "cloudbr0".into(),
        tx_queue_len: Some(len),
        ..Default::default()
    })
    .expect("valid spec")
}

#[tokio::test]
async fn tx_queue_len_on_a_stopped_vm_is_refused_before_libvirt() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::ShutOff, true, 1);
    let hp = engine(fake.clone());
    let err = hp
        .attach("vm1", &with_tx_queue_len("52:54:00:00:00:31", 5000))
        .await
        .expect_err("a stopped VM has no tap");
    assert_eq!(
        crate::api::status::code(&err),
        tonic::Code::FailedPrecondition
    );
    let msg = err.to_string();
    assert!(
        msg.contains("tx_queue_len") && msg.contains("no tap"),
        "{msg}"
    );
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    assert!(hp.list_nics("vm1").await.expect("list").is_empty());
    // The same NIC without it attaches to the persistent definition.
    hp.attach("vm1", &spec("52:54:00:00:00:31"))
        .await
        .expect("config-only attach");
}

#[tokio::test]
async fn tx_queue_len_where_libvirt_makes_no_taps_is_refused_before_libvirt() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 2);
    let hp = engine(fake.clone());
    let err = hp
        .attach("vm1", &with_tx_queue_len("52:54:00:00:00:32", 5000))
        .await
        .expect_err("nothing to set it on");
    assert_eq!(
        crate::api::status::code(&err),
        tonic::Code::FailedPrecondition
    );
    assert!(err.to_string().contains("makes no taps"), "{err}");
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
}

#[tokio::test]
async fn tx_queue_len_without_a_reported_tap_rolls_the_live_attach_back() {
    let fake = Arc::new(FakeHypervisor::default());
    fake.add("vm1", RunState::Running, true, 2);
    // Taps are real, but this NIC's live XML names none (the fake writes
    // no <target dev>): the value cannot be set, so the NIC must not stay.
    let hp = Hotplug::new(
        fake.clone(),
        None,
        HotplugConfig {
            real_taps: true,
            vhost_net_present: false,
            ..HotplugConfig::default()
        },
    );
    let err = hp
        .attach("vm1", &with_tx_queue_len("52:54:00:00:00:33", 5000))
        .await
        .expect_err("no tap to set");
    assert_eq!(
        crate::api::status::code(&err),
        tonic::Code::FailedPrecondition
    );
    assert!(err.to_string().contains("<target dev>"), "{err}");
    let ops: Vec<(&str, Target)> = fake.calls().iter().map(|c| (c.op, c.target)).collect();
    assert_eq!(
        ops,
        vec![("attach", Target::Live), ("detach", Target::Live)],
        "the config half must never be written"
    );
    assert!(hp.list_nics("vm1").await.expect("list").is_empty());
}
