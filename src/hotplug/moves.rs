//! MoveNic: take a NIC out of one VM and plug the same NIC (same MAC,
//! bridge, model, MTU, queues, link, VLAN, bandwidth, alias) into another.
//!
//! The move is detach-then-attach with a compensating step: when the
//! target VM refuses the NIC, it is attached to the source VM again, so
//! the caller finds it on one of the two VMs, never on neither.

use std::time::Duration;

use super::report::NicReport;
use super::update::interface_elements;
use super::{pick, Hotplug, HotplugError, IDS_ALIAS_PREFIX};
use crate::hypervisor::{DomainRef, Target};
use crate::nic::{Alias, MacAddr, NicError, NicSpec, RawBandwidth, RawNic};
use crate::xml::domain::{BandwidthView, InterfaceView};

/// Where a move ended.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveOutcome {
    /// The NIC as libvirt reports it on the VM where it ended.
    pub nic: NicReport,
    /// The VM the NIC is on now.
    pub vm: String,
    /// True when the NIC is on the target VM.
    pub moved: bool,
}

impl Hotplug {
    /// Moves a NIC from `from_vm` to `to_vm`. The unplug from the source is
    /// confirmed (REMOVED) before the target is touched; when the target
    /// refuses the NIC it is plugged back into the source and the error
    /// says so ([`HotplugError::MovedBack`], with the target's code).
    pub async fn move_nic(
        &self,
        from_vm: &str,
        to_vm: &str,
        mac: &MacAddr,
        alias: Option<&Alias>,
        timeout: Option<Duration>,
    ) -> Result<MoveOutcome, HotplugError> {
        let a = self.resolve(from_vm).await?;
        let b = self.resolve(to_vm).await?;
        let r = self
            .move_between(a.clone(), b.clone(), to_vm, mac, alias, timeout)
            .await;
        if !matches!(r, Err(HotplugError::VmNotFound(_))) {
            return r;
        }
        // As in `under_lock`: a name whose domain was defined again under
        // it (a new UUID) was answered from the name cache; the failed
        // lookup dropped that entry. The lookups come before any change,
        // so the move runs again, once, on the domains the names name now.
        let a2 = self.defined_again(from_vm, &a).await?;
        let b2 = self.defined_again(to_vm, &b).await?;
        if a2.is_none() && b2.is_none() {
            return r;
        }
        let (a2, b2) = (a2.unwrap_or(a), b2.unwrap_or(b));
        self.move_between(a2, b2, to_vm, mac, alias, timeout).await
    }

    /// [`Hotplug::move_nic`] between these two resolved domains.
    async fn move_between(
        &self,
        a: DomainRef,
        b: DomainRef,
        to_vm: &str,
        mac: &MacAddr,
        alias: Option<&Alias>,
        timeout: Option<Duration>,
    ) -> Result<MoveOutcome, HotplugError> {
        if a.uuid == b.uuid {
            return Err(HotplugError::Invalid(NicError::Invalid {
                field: "to_vm",
                value: to_vm.to_string(),
                allowed: "a VM other than from_vm".into(),
            }));
        }
        // Both VMs stay locked for the whole move, taken in UUID order so
        // that two moves crossing (A->B and B->A) cannot each hold one lock
        // and wait for the other. Holding both, rather than detaching and
        // attaching as two separately locked steps, is what makes the
        // compensating re-attach safe: nobody can take A's freed PCI slot,
        // or plug the same MAC somewhere, between the unplug and the undo.
        let (lo, hi) = if a.uuid < b.uuid { (&a, &b) } else { (&b, &a) };
        let _g1 = self.locks.lock(lo).await?;
        let _g2 = self.locks.lock(hi).await?;
        let a = self
            .lookup(&a.uuid)
            .await
            .map_err(|e| super::named(e, &a))?;
        let b = self
            .lookup(&b.uuid)
            .await
            .map_err(|e| super::named(e, &b))?;
        let mac_s = mac.to_string();

        let (a_live, a_config) = self.views(&a).await?;
        let (b_live, b_config) = self.views(&b).await?;
        let mut on_a = None;
        for v in [&a_live, &a_config].into_iter().flatten() {
            if let Some(i) = pick(v, &mac_s, alias, &a.name)? {
                on_a = Some(i);
                break;
            }
        }
        let on_b = [&b_live, &b_config]
            .into_iter()
            .flatten()
            .any(|v| !v.interface_by_mac(&mac_s).is_empty());
        let iface = match (on_a, on_b) {
            (Some(i), false) => i,
            // A retry of a move that already happened.
            (None, true) => {
                let nic = self.report_nic(&b, &mac_s, alias).await?;
                return Ok(MoveOutcome {
                    nic,
                    vm: b.name.clone(),
                    moved: true,
                });
            }
            (Some(_), true) => {
                return Err(HotplugError::Precondition(format!(
                    "MAC {mac_s} is on both {} and {}; detach one of them first",
                    a.name, b.name
                )))
            }
            (None, false) => {
                return Err(HotplugError::NicNotFound {
                    mac: mac_s,
                    vm: a.name.clone(),
                })
            }
        };
        let spec = spec_from_view(&iface)?;
        tracing::info!(from = %a.name, to = %b.name, mac = %mac_s, "moving NIC");

        // A's persistent element, verbatim, in case the unplug stays pending.
        let a_config_element = match a_config {
            Some(_) => {
                let d = a.clone();
                let xml = self.blocking(move |hv| hv.xml(&d, Target::Config)).await?;
                interface_elements(&xml, &mac_s, alias.map(|x| x.as_str())).pop()
            }
            None => None,
        };

        // Host clean-up is off: the bridge the NIC leaves is the one it is
        // about to join (on B, or on A again), so it must not be removed.
        match self
            .detach_locked(&a.uuid, mac, alias, timeout, false, false)
            .await
        {
            Ok(_) => {}
            Err(HotplugError::DetachPending { waited_ms, .. }) => {
                // Unlike a plain detach, a move must not lose the NIC: the
                // live unplug cannot be called back, but A's persistent
                // definition gets the NIC again, so when the guest does let
                // go the NIC is still defined on A and a retried MoveNic
                // finds it there and finishes the move.
                if let Some(el) = a_config_element {
                    let d = a.clone();
                    if let Err(e) = self
                        .blocking(move |hv| hv.attach(&d, &el, Target::Config))
                        .await
                    {
                        tracing::warn!(vm = %a.name, error = %e, "re-adding the pending NIC to the persistent config failed");
                    }
                }
                return Err(HotplugError::MovePending {
                    mac: mac_s,
                    from_vm: a.name.clone(),
                    to_vm: b.name.clone(),
                    waited_ms,
                });
            }
            Err(e) => return Err(e),
        }

        let cause = match self.attach_locked(&b.uuid, &spec).await {
            Ok(o) => {
                return Ok(MoveOutcome {
                    nic: o.nic,
                    vm: b.name.clone(),
                    moved: true,
                })
            }
            Err(e) => e,
        };
        tracing::warn!(to = %b.name, error = %cause, "target refused the NIC; plugging it back into the source");
        match self.attach_locked(&a.uuid, &spec).await {
            Ok(_) => Err(HotplugError::MovedBack {
                mac: mac_s,
                from_vm: a.name.clone(),
                to_vm: b.name.clone(),
                cause: Box::new(cause),
            }),
            Err(back) => {
                tracing::error!(from = %a.name, to = %b.name, mac = %mac_s, error = %back, "NIC is on neither VM");
                Err(HotplugError::Internal(format!(
                    "moving NIC {mac_s}: {} refused it ({cause}) and re-attaching it to {} failed ({back}); the NIC is on neither VM, attach it again with AttachNic",
                    b.name, a.name
                )))
            }
        }
    }
}

/// Rebuilds the request that would attach this NIC again, from the element
/// libvirt reports. The PCI address and ACPI index stay behind: they
/// describe a slot in the source VM, not a property of the NIC.
pub(super) fn spec_from_view(i: &InterfaceView) -> Result<NicSpec, HotplugError> {
    let mac = i.mac.clone().unwrap_or_default();
    if i.kind != "bridge" {
        return Err(HotplugError::Precondition(format!(
            "NIC {mac} is of type '{}'; only bridge and Open vSwitch NICs can be moved",
            i.kind
        )));
    }
    let ovs = i.virtualport.as_deref() == Some("openvswitch");
    let alias = i
        .alias
        .clone()
        .filter(|a| a.starts_with("ua-"))
        .unwrap_or_default();
    let raw = RawNic {
        mac: mac.clone(),
        bridge: i.source.clone().unwrap_or_default(),
        ovs,
        vlan: if ovs { i.vlan } else { None },
        mtu: i.mtu,
        queues: i.queues.filter(|q| *q > 1),
        model: i.model.clone().unwrap_or_else(|| "virtio".into()),
        link_down: i.link.as_deref() == Some("down"),
        promiscuous: alias.starts_with(IDS_ALIAS_PREFIX),
        alias,
        inbound: i.inbound.as_ref().and_then(raw_bw),
        outbound: i.outbound.as_ref().and_then(raw_bw),
        vhost: "auto".into(),
        interface_id: if ovs {
            i.interface_id.clone().unwrap_or_default()
        } else {
            String::new()
        },
        // The agent's filter moves with the NIC; `::` is the placeholder
        // for "no IPv6 address" (see xml::nwfilter), not an address.
        anti_spoofing: i.filter.as_deref() == Some(crate::xml::nwfilter::FILTER_NAME),
        ips: i
            .filter_params
            .iter()
            .filter(|(k, v)| (k == "IP" || k == "IPV6") && v != "::")
            .map(|(_, v)| v.clone())
            .collect(),
        ..RawNic::default()
    };
    NicSpec::try_from(raw).map_err(|e| {
        HotplugError::Precondition(format!(
            "NIC {mac} cannot be re-created from its definition ({e}); detach and attach it instead"
        ))
    })
}

fn raw_bw(b: &BandwidthView) -> Option<RawBandwidth> {
    Some(RawBandwidth {
        average_kbps: b.average?,
        peak_kbps: b.peak.unwrap_or(0),
        burst_kb: b.burst.unwrap_or(0),
        rate_mbps: 0,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::api::status;
    use crate::hotplug::HotplugConfig;
    use crate::hypervisor::fake::{FakeHypervisor, Unplug};
    use crate::hypervisor::{Hypervisor, RunState, Target};

    const M: &str = "52:54:00:0c:00:01";

    fn engine(fake: Arc<FakeHypervisor>) -> Hotplug {
        let cfg = HotplugConfig {
            detach_timeout: Duration::from_millis(300),
            poll_interval: Duration::from_millis(10),
            vhost_net_present: false,
            ..HotplugConfig::default()
        };
        Hotplug::new(fake, None, cfg)
    }

    fn rich_spec(mac: &str, queues: u32) -> NicSpec {
        NicSpec::try_from(RawNic {
            mac: mac.into(),
            bridge: "cloudbr1".into(),
            mtu: Some(1450),
            queues: Some(queues),
            link_down: true,
            alias: "ua-moveme".into(),
            inbound: Some(RawBandwidth {
                average_kbps: 1000,
                peak_kbps: 2000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .expect("spec")
    }

    fn mac(s: &str) -> MacAddr {
        MacAddr::try_from(s).expect("mac")
    }

    /// Two running persistent VMs; the NIC is attached to "vm-a".
    async fn setup(b_vcpus: u32) -> (Arc<FakeHypervisor>, Hotplug) {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm-a", RunState::Running, true, 4);
        fake.add("vm-b", RunState::Running, true, b_vcpus);
        let hp = engine(fake.clone());
        hp.attach("vm-a", &rich_spec(M, 2)).await.expect("attach");
        (fake, hp)
    }

    #[tokio::test]
    async fn move_puts_the_same_nic_on_b_and_takes_it_off_a() {
        let (fake, hp) = setup(2).await;
        let before = hp.list_nics("vm-a").await.expect("list")[0].clone();
        let n0 = fake.calls().len();
        let out = hp
            .move_nic("vm-a", "vm-b", &mac(M), None, None)
            .await
            .expect("move");
        assert!(out.moved);
        assert_eq!(out.vm, "vm-b");
        assert!(hp.list_nics("vm-a").await.expect("list").is_empty());
        let on_b = hp.list_nics("vm-b").await.expect("list");
        assert_eq!(on_b.len(), 1);
        let n = &on_b[0];
        assert_eq!(n, &out.nic);
        assert!(n.in_live && n.in_config, "{n:?}");
        // The spec travelled with the NIC.
        for (what, got, want) in [
            ("mac", &n.mac, &before.mac),
            ("alias", &n.alias, &before.alias),
            ("bridge", &n.bridge, &before.bridge),
            ("link", &n.link_state, &before.link_state),
            ("model", &n.model, &before.model),
        ] {
            assert_eq!(got, want, "{what}");
        }
        assert_eq!((n.mtu, n.queues), (1450, 2));
        assert_eq!(n.link_state, "down");
        let xml = fake
            .xml(
                &fake.lookup("vm-b").expect("b"),
                crate::hypervisor::Target::Live,
            )
            .expect("xml");
        assert!(xml.contains("average=\"1000\""), "bandwidth moved: {xml}");
        // Detach from A (config first), then attach to B (live first).
        let ops: Vec<(&str, Target)> = fake.calls()[n0..]
            .iter()
            .map(|c| (c.op, c.target))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("detach", Target::Config),
                ("detach", Target::Live),
                ("attach", Target::Live),
                ("attach", Target::Config)
            ]
        );
        // A retry of a finished move changes nothing and says where it is.
        let n1 = fake.calls().len();
        let again = hp
            .move_nic("vm-a", "vm-b", &mac(M), None, None)
            .await
            .expect("retry");
        assert!(again.moved && again.vm == "vm-b");
        assert_eq!(fake.calls().len(), n1, "a retry makes no libvirt change");
    }

    #[tokio::test]
    async fn b_refusing_the_nic_puts_it_back_on_a() {
        // B has 1 vCPU: the NIC's 2 queues do not fit there.
        let (fake, hp) = setup(1).await;
        let err = hp
            .move_nic("vm-a", "vm-b", &mac(M), None, None)
            .await
            .expect_err("B must refuse");
        assert!(
            matches!(&err, HotplugError::MovedBack { cause, .. }
                if matches!(**cause, HotplugError::OutOfRange { field: "queues", .. })),
            "{err:?}"
        );
        // The code is B's error's; the message says where the NIC is.
        assert_eq!(status::code(&err), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("back on vm-a"), "{err}");
        assert!(hp.list_nics("vm-b").await.expect("b").is_empty());
        let a = hp.list_nics("vm-a").await.expect("a");
        assert_eq!(a.len(), 1);
        assert!(a[0].in_live && a[0].in_config && a[0].alias == "ua-moveme");
        assert_eq!(
            (a[0].mtu, a[0].queues, a[0].link_state.as_str()),
            (1450, 2, "down")
        );
        // B refused before libvirt was asked; A got the NIC back, live first.
        let ops: Vec<(&str, Target)> = fake.calls()[2..].iter().map(|c| (c.op, c.target)).collect();
        assert_eq!(
            ops,
            vec![
                ("detach", Target::Config),
                ("detach", Target::Live),
                ("attach", Target::Live),
                ("attach", Target::Config)
            ]
        );
    }

    #[tokio::test]
    async fn libvirt_failure_on_b_also_rolls_back_to_a() {
        let (fake, hp) = setup(2).await;
        *fake.fail_next.lock().expect("lock") = Some((
            "attach",
            Target::Live,
            crate::hypervisor::HvErrorKind::Internal,
        ));
        let err = hp
            .move_nic("vm-a", "vm-b", &mac(M), None, None)
            .await
            .expect_err("B fails");
        assert_eq!(status::code(&err), tonic::Code::Internal);
        assert!(matches!(err, HotplugError::MovedBack { .. }), "{err:?}");
        assert_eq!(hp.list_nics("vm-a").await.expect("a").len(), 1);
        assert!(hp.list_nics("vm-b").await.expect("b").is_empty());
    }

    #[tokio::test]
    async fn pending_unplug_from_a_is_deadline_exceeded_and_b_gets_nothing() {
        let (fake, hp) = setup(2).await;
        *fake.unplug.lock().expect("lock") = Unplug::Never;
        let err = hp
            .move_nic(
                "vm-a",
                "vm-b",
                &mac(M),
                None,
                Some(Duration::from_millis(100)),
            )
            .await
            .expect_err("pending");
        assert!(matches!(err, HotplugError::MovePending { .. }), "{err:?}");
        let st = status::to_status(&err);
        assert_eq!(st.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            st.metadata()
                .get(status::DETACH_STATE_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("PENDING")
        );
        assert!(hp.list_nics("vm-b").await.expect("b").is_empty());
        // After the setup's two attaches: the unplug from A, then A's
        // persistent definition gets the NIC back; nothing for B.
        let ops: Vec<(&str, Target)> = fake.calls()[2..].iter().map(|c| (c.op, c.target)).collect();
        assert_eq!(
            ops,
            vec![
                ("detach", Target::Config),
                ("detach", Target::Live),
                ("attach", Target::Config)
            ]
        );
        // The NIC stays defined on A while its unplug is pending.
        let a = hp.list_nics("vm-a").await.expect("a");
        assert!(a.len() == 1 && a[0].in_live && a[0].in_config, "{a:?}");
        // Once the guest lets go, a retry finishes the move without a
        // second device_del.
        fake.guest_release("vm-a", M);
        let live_dels = |f: &FakeHypervisor| {
            f.calls()
                .iter()
                .filter(|c| c.op == "detach" && c.target == Target::Live)
                .count()
        };
        let dels = live_dels(&fake);
        let out = hp
            .move_nic("vm-a", "vm-b", &mac(M), None, None)
            .await
            .expect("retry finishes the move");
        assert!(out.moved && out.vm == "vm-b");
        assert_eq!(live_dels(&fake), dels, "no second device_del");
        assert!(hp.list_nics("vm-a").await.expect("a").is_empty());
        assert_eq!(hp.list_nics("vm-b").await.expect("b").len(), 1);
    }

    #[tokio::test]
    async fn move_to_the_same_vm_unknown_mac_and_mac_on_both_are_refused() {
        let (fake, hp) = setup(2).await;
        let n0 = fake.calls().len();
        let same = hp.move_nic("vm-a", "vm-a", &mac(M), None, None).await;
        assert!(
            matches!(
                same,
                Err(HotplugError::Invalid(NicError::Invalid {
                    field: "to_vm",
                    ..
                }))
            ),
            "{same:?}"
        );
        let unknown = hp
            .move_nic("vm-a", "vm-b", &mac("52:54:00:0c:00:99"), None, None)
            .await;
        assert!(
            matches!(unknown, Err(HotplugError::NicNotFound { .. })),
            "{unknown:?}"
        );
        let no_vm = hp.move_nic("vm-a", "vm-x", &mac(M), None, None).await;
        assert!(
            matches!(no_vm, Err(HotplugError::VmNotFound(_))),
            "{no_vm:?}"
        );
        hp.attach("vm-b", &rich_spec(M, 1)).await.expect("dup on b");
        let n1 = fake.calls().len();
        let both = hp.move_nic("vm-a", "vm-b", &mac(M), None, None).await;
        assert!(
            matches!(both, Err(HotplugError::Precondition(_))),
            "{both:?}"
        );
        assert_eq!(fake.calls().len(), n1, "refused moves change nothing");
        assert_eq!(n0 + 2, n1);
    }

    #[tokio::test]
    async fn crossing_moves_do_not_deadlock() {
        let (_fake, hp) = setup(4).await;
        let m2 = "52:54:00:0c:00:02";
        hp.attach("vm-b", &rich_spec(m2, 2))
            .await
            .expect("attach b");
        let hp = Arc::new(hp);
        let (h1, h2) = (hp.clone(), hp.clone());
        let (ma, mb) = (mac(M), mac(m2));
        let both = tokio::time::timeout(Duration::from_secs(10), async move {
            tokio::join!(
                async move { h1.move_nic("vm-a", "vm-b", &ma, None, None).await },
                async move { h2.move_nic("vm-b", "vm-a", &mb, None, None).await },
            )
        })
        .await
        .expect("crossing moves must not deadlock");
        assert!(both.0.expect("a->b").moved && both.1.expect("b->a").moved);
        let a: Vec<String> = hp
            .list_nics("vm-a")
            .await
            .expect("a")
            .into_iter()
            .map(|n| n.mac)
            .collect();
        let b: Vec<String> = hp
            .list_nics("vm-b")
            .await
            .expect("b")
            .into_iter()
            .map(|n| n.mac)
            .collect();
        assert_eq!((a, b), (vec![m2.to_string()], vec![M.to_string()]));
    }

    #[test]
    fn spec_from_view_refuses_non_bridge_nics() {
        let v = InterfaceView {
            kind: "direct".into(),
            mac: Some(M.into()),
            source: Some("eth0".into()),
            ..Default::default()
        };
        assert!(matches!(
            spec_from_view(&v),
            Err(HotplugError::Precondition(_))
        ));
    }
}
