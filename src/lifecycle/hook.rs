//! `nic-agent hook qemu <domain> <operation> <sub-op> <extra>`: libvirt's
//! qemu hook, installed as the drop-in `/etc/libvirt/hooks/qemu.d/nic-agent`
//! (libvirt ≥ 6.5 runs every executable there). `/etc/libvirt/hooks/qemu`
//! itself belongs to cloudstack-agent and is never touched.
//!
//! Rules a hook lives by, and why:
//! - It never calls libvirt: libvirtd waits for the hook while it holds the
//!   domain's job, so a call back would stall both. It works from the
//!   domain XML on stdin, netlink and the files under the state dirs, and
//!   takes the same per-bridge locks as the daemon.
//! - It prints nothing on stdout: for `migrate` and `restore` libvirt takes
//!   the hook's stdout as the new domain XML.
//! - Only `prepare` may fail (libvirt then does not start the domain, which
//!   could not have reached its bridge anyway). Every other operation exits
//!   0; a failing `reconnect` would make libvirt kill a running QEMU.
//!
//! `prepare begin` runs before a start, a restore and on the destination of
//! an incoming migration, so one operation covers all three.

use std::time::Duration;

use super::{ensure_host_for_domain, ensure_ids_mirrors, Caller};
use crate::host::objects::{decide_removal, Removal, Usage};
use crate::host::{HostError, HostNet};
use crate::nic::BridgeName;
use crate::xml::domain::{DomainView, DomainXmlError};

/// The longest a hook may take before it gives up with a message.
pub const HOOK_DEADLINE: Duration = Duration::from_secs(15);

/// Why a hook invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The arguments are not what libvirt passes.
    #[error("usage: nic-agent hook qemu <domain> <operation> <sub-op> <extra>: {0}")]
    Usage(String),
    /// The domain XML on stdin could not be read.
    #[error("domain XML on stdin: {0}")]
    Xml(#[from] DomainXmlError),
    /// Host networking failed.
    #[error("nic-agent hook: {0}")]
    Host(#[from] HostError),
    /// The hook ran past its deadline.
    #[error("nic-agent hook: gave up after {0:?} (a bridge lock held elsewhere?)")]
    Deadline(Duration),
}

/// The operations this hook acts on; everything else is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `prepare begin`: build the host side before QEMU starts.
    Prepare,
    /// `started begin`: the domain runs; its taps exist.
    Started,
    /// `release end`: the domain is gone; clean up what nothing uses.
    Release,
    /// Any other operation: print nothing, exit 0.
    Ignore,
}

/// One invocation, as libvirt makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookInvocation {
    /// The domain's name.
    pub domain: String,
    /// The operation (`prepare`, `start`, `started`, `stopped`, `release`,
    /// `migrate`, `restore`, `reconnect`, `attach`).
    pub operation: String,
    /// The sub-operation (`begin`, `end`, `-`).
    pub sub_op: String,
    /// The extra argument (`-` or, for release, the reason).
    pub extra: String,
}

impl HookInvocation {
    /// Parses `qemu <domain> <operation> <sub-op> <extra>`. libvirt always
    /// passes all four after the object; `extra` is `-` when empty.
    pub fn parse(args: &[String]) -> Result<Self, HookError> {
        match args {
            [object, domain, op, sub, extra] => {
                if object != "qemu" {
                    return Err(HookError::Usage(format!(
                        "object {object:?}: only the qemu driver's hook is handled"
                    )));
                }
                if domain.is_empty() || op.is_empty() {
                    return Err(HookError::Usage("empty domain or operation".into()));
                }
                Ok(Self {
                    domain: domain.clone(),
                    operation: op.clone(),
                    sub_op: sub.clone(),
                    extra: extra.clone(),
                })
            }
            _ => Err(HookError::Usage(format!(
                "{} arguments, libvirt passes 5",
                args.len()
            ))),
        }
    }

    /// What this invocation asks of the agent.
    pub fn action(&self) -> Action {
        match (self.operation.as_str(), self.sub_op.as_str()) {
            ("prepare", "begin") => Action::Prepare,
            ("started", "begin") => Action::Started,
            ("release", "end") => Action::Release,
            _ => Action::Ignore,
        }
    }
}

/// What a hook run did, for its log line (stderr, which libvirt logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookOutcome {
    /// One line per change.
    pub changes: Vec<String>,
}

/// Runs one hook invocation against `host`. `xml` is stdin; it is only
/// parsed for the operations that act on it.
pub async fn run(
    inv: &HookInvocation,
    xml: &str,
    host: &dyn HostNet,
    grace: Duration,
) -> Result<HookOutcome, HookError> {
    let action = inv.action();
    if action == Action::Ignore {
        return Ok(HookOutcome::default());
    }
    let work = async {
        let dom = DomainView::parse(xml)?;
        let mut out = HookOutcome::default();
        match action {
            Action::Prepare => {
                let e = ensure_host_for_domain(host, &dom, Caller::Hook).await?;
                out.changes
                    .extend(e.built.iter().map(|b| format!("built {b}")));
                out.changes
                    .extend(e.ids.iter().map(|b| format!("{b} in IDS state")));
            }
            Action::Started => {
                // The taps are enslaved now and keep the bridges in use.
                for b in super::bridges_of(&dom) {
                    host.objects().drop_intents_of(&b, &dom.uuid).await;
                }
                let n = ensure_ids_mirrors(host, &dom).await?;
                if n > 0 {
                    out.changes.push(format!("{n} IDS mirror(s)"));
                }
                let f = super::ensure_ids_filters(host, &dom).await?;
                if f > 0 {
                    out.changes.push(format!("{f} IDS mirror filter change(s)"));
                }
            }
            Action::Release => {
                for b in super::bridges_of(&dom) {
                    host.objects().drop_intents_of(&b, &dom.uuid).await;
                    if let Some(line) = release_bridge(host, &b, grace).await? {
                        out.changes.push(line);
                    }
                }
            }
            Action::Ignore => {}
        }
        Ok::<_, HookError>(out)
    };
    tokio::time::timeout(HOOK_DEADLINE, work)
        .await
        .map_err(|_| HookError::Deadline(HOOK_DEADLINE))?
}

/// After a domain is gone: remove an agent-made bridge it used when, by
/// what the hook can see (ports, intents, the grace period), nothing uses
/// it. Another domain's persistent XML is invisible here; that is fine,
/// because the next `prepare` rebuilds the bridge from its record.
async fn release_bridge(
    host: &dyn HostNet,
    bridge: &str,
    grace: Duration,
) -> Result<Option<String>, HostError> {
    let Ok(b) = BridgeName::try_from(bridge) else {
        return Ok(None);
    };
    let objects = host.objects();
    if objects.recall(bridge).await.is_none() {
        return Ok(None);
    }
    let _g = objects.lock(&[bridge]).await?;
    let Some(ports) = host.bridge_ports(&b).await? else {
        return Ok(None);
    };
    if !ports.ours {
        return Ok(None);
    }
    let usage = Usage {
        ports: ports.others,
        xml_refs: 0,
        intents: objects.live_intents(bridge).await.len(),
        came_along: false,
        since_change: objects.since_change(bridge).await,
    };
    match decide_removal(&usage, grace) {
        Removal::Delete => {
            if host.remove_bridge_if_unused(&b, &[]).await? {
                objects.settled(bridge).await;
                return Ok(Some(format!("removed {bridge}")));
            }
            Ok(None)
        }
        Removal::Wait => {
            if usage.since_change.is_none() {
                objects.touch(bridge).await?;
            }
            Ok(Some(format!("{bridge} unused; left to the reconcile")))
        }
        Removal::Keep(_) => {
            if !usage.ports.is_empty() {
                objects.settled(bridge).await;
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn libvirts_five_arguments_parse_and_pick_the_action() {
        for (op, sub, want) in [
            ("prepare", "begin", Action::Prepare),
            ("started", "begin", Action::Started),
            ("release", "end", Action::Release),
            ("start", "begin", Action::Ignore),
            ("stopped", "end", Action::Ignore),
            ("migrate", "begin", Action::Ignore),
            ("restore", "begin", Action::Ignore),
            ("reconnect", "begin", Action::Ignore),
            ("prepare", "end", Action::Ignore),
            ("attach", "begin", Action::Ignore),
            // An operation a later libvirt adds is ignored, never refused.
            ("some-future-op", "begin", Action::Ignore),
        ] {
            let inv = HookInvocation::parse(&args(&["qemu", "i-2-10-VM", op, sub, "-"])).unwrap();
            assert_eq!(inv.domain, "i-2-10-VM");
            assert_eq!(inv.action(), want, "{op} {sub}");
        }
        let inv =
            HookInvocation::parse(&args(&["qemu", "v", "release", "end", "destroyed"])).unwrap();
        assert_eq!(inv.extra, "destroyed");
    }

    #[test]
    fn wrong_arguments_are_refused_with_the_usage() {
        for a in [
            vec![],
            vec!["qemu", "v", "prepare", "begin"],
            vec!["lxc", "v", "prepare", "begin", "-"],
            vec!["qemu", "", "prepare", "begin", "-"],
            vec!["qemu", "v", "prepare", "begin", "-", "more"],
        ] {
            let e = HookInvocation::parse(&args(&a)).unwrap_err();
            assert!(
                e.to_string().starts_with("usage: nic-agent hook qemu"),
                "{e}"
            );
        }
    }

    use crate::host::objects::SegmentRecord;
    use crate::host::testing::RecordingHost;

    const NOT_XML: &str = "this is not a domain";

    fn inv(op: &str, sub: &str) -> HookInvocation {
        HookInvocation::parse(&args(&["qemu", "v", op, sub, "-"])).unwrap()
    }

    fn domain(nics: &str) -> String {
        format!(
            "<domain type='kvm' id='7'><name>v</name><uuid>6a1e3a6c-1d3c-4b6e-9a0e-2f3c4d5e6f70</uuid>\
             <devices>{nics}</devices></domain>"
        )
    }

    const SENSOR: &str = "<interface type='bridge'><mac address='02:00:00:00:00:01'/>\
        <source bridge='brids'/><target dev='vnet1'/><model type='virtio'/><alias name='ua-ids-1'/></interface>";
    const PLAIN: &str = "<interface type='bridge'><mac address='02:00:00:00:00:02'/>\
        <source bridge='cloudbr0'/><target dev='vnet2'/><model type='virtio'/><alias name='net0'/></interface>";

    #[tokio::test]
    async fn operations_that_do_not_act_never_read_stdin_and_change_nothing() {
        let host = RecordingHost::default();
        for (op, sub) in [
            ("migrate", "begin"),
            ("restore", "begin"),
            ("reconnect", "begin"),
            ("start", "begin"),
            ("stopped", "end"),
            ("attach", "begin"),
        ] {
            let out = run(&inv(op, sub), NOT_XML, &host, Duration::ZERO)
                .await
                .unwrap_or_else(|e| panic!("{op} {sub}: {e}"));
            assert!(out.changes.is_empty(), "{op} {sub}: {out:?}");
        }
        assert!(host.changes().is_empty());
    }

    #[tokio::test]
    async fn unreadable_domain_xml_fails_the_operations_that_need_it() {
        let host = RecordingHost::default();
        for (op, sub) in [
            ("prepare", "begin"),
            ("started", "begin"),
            ("release", "end"),
        ] {
            let e = run(&inv(op, sub), NOT_XML, &host, Duration::ZERO)
                .await
                .expect_err(op);
            assert!(matches!(e, HookError::Xml(_)), "{op}: {e:?}");
            assert!(e.to_string().starts_with("domain XML on stdin: "), "{e}");
        }
        assert!(host.changes().is_empty());
    }

    #[tokio::test]
    async fn a_domain_without_agent_made_nics_is_left_alone() {
        let host = RecordingHost::default().with_foreign_bridge("cloudbr0");
        let xml = domain(PLAIN);
        for (op, sub) in [
            ("prepare", "begin"),
            ("started", "begin"),
            ("release", "end"),
        ] {
            let out = run(&inv(op, sub), &xml, &host, Duration::ZERO)
                .await
                .expect(op);
            assert!(out.changes.is_empty(), "{op}: {out:?}");
        }
        assert!(host.changes().is_empty(), "{:?}", host.changes());
        assert!(host.cleaned().is_empty());
    }

    #[tokio::test]
    async fn a_sensor_gets_ids_state_at_prepare_and_its_copies_once_started() {
        let host = RecordingHost::default()
            .with_foreign_bridge("brids")
            .with_foreign_bridge("cloudbr0");
        let xml = domain(&format!("{SENSOR}{PLAIN}"));
        let out = run(&inv("prepare", "begin"), &xml, &host, Duration::ZERO)
            .await
            .expect("prepare");
        assert_eq!(out.changes, vec!["brids in IDS state".to_string()]);
        assert!(host.is_promisc("brids") && !host.is_promisc("cloudbr0"));
        // The domain does not run yet: its intent holds the bridge.
        assert_eq!(host.objects().live_intents("brids").await.len(), 1);

        let out = run(&inv("started", "begin"), &xml, &host, Duration::ZERO)
            .await
            .expect("started");
        assert_eq!(
            out.changes,
            vec!["1 IDS mirror filter change(s)".to_string()]
        );
        assert!(host.objects().live_intents("brids").await.is_empty());
        assert_eq!(
            host.changes(),
            vec![
                "promisc brids".to_string(),
                "mirror-sync brids vnet1".to_string()
            ]
        );
    }

    async fn remember(host: &RecordingHost, bridge: &str, vni: u32) {
        host.objects()
            .remember(&SegmentRecord {
                bridge: bridge.into(),
                label: "cloudbr1".into(),
                segment: format!("vxlan://{vni}"),
            })
            .await
            .expect("record");
    }

    fn vxlan_nic(mac: &str, bridge: &str) -> String {
        format!(
            "<interface type='bridge'><mac address='{mac}'/><source bridge='{bridge}'/>\
             <model type='virtio'/><alias name='ua-{}'/></interface>",
            mac.replace(':', "")
        )
    }

    #[tokio::test]
    async fn release_removes_an_agent_made_bridge_nothing_uses_and_keeps_one_with_a_port() {
        let host = RecordingHost::default()
            .with_agent_bridge("brvx-5001", &[])
            .with_agent_bridge("brvx-5002", &["vnet9"])
            .with_foreign_bridge("cloudbr0");
        remember(&host, "brvx-5001", 5001).await;
        remember(&host, "brvx-5002", 5002).await;
        let xml = domain(&format!(
            "{}{}{PLAIN}",
            vxlan_nic("02:00:00:00:50:01", "brvx-5001"),
            vxlan_nic("02:00:00:00:50:02", "brvx-5002")
        ));
        let out = run(&inv("release", "end"), &xml, &host, Duration::ZERO)
            .await
            .expect("release");
        assert_eq!(out.changes, vec!["removed brvx-5001".to_string()]);
        assert_eq!(host.cleaned(), vec!["brvx-5001".to_string()]);
    }

    #[tokio::test]
    async fn release_within_the_grace_period_leaves_the_bridge_to_the_reconcile() {
        let host = RecordingHost::default().with_agent_bridge("brvx-5003", &[]);
        remember(&host, "brvx-5003", 5003).await;
        let xml = domain(&vxlan_nic("02:00:00:00:50:03", "brvx-5003"));
        let out = run(&inv("release", "end"), &xml, &host, Duration::from_secs(60))
            .await
            .expect("release");
        assert_eq!(
            out.changes,
            vec!["brvx-5003 unused; left to the reconcile".to_string()]
        );
        assert!(host.cleaned().is_empty());
        // The clock starts now, so the reconcile can tell when it is due.
        assert!(host.objects().since_change("brvx-5003").await.is_some());
    }

    #[test]
    fn the_bridges_of_a_domain_come_from_its_bridge_nics_once() {
        let xml = r#"<domain type='kvm'><name>v</name><uuid>u</uuid><devices>
            <interface type='bridge'><mac address='02:00:00:00:00:01'/><source bridge='brvx-5001'/><alias name='ua-ids-1'/></interface>
            <interface type='bridge'><mac address='02:00:00:00:00:02'/><source bridge='brvx-5001'/></interface>
            <interface type='bridge'><mac address='02:00:00:00:00:03'/><source bridge='cloudbr0'/></interface>
            <interface type='network'><mac address='02:00:00:00:00:04'/><source network='default'/></interface>
        </devices></domain>"#;
        let d = DomainView::parse(xml).unwrap();
        assert_eq!(super::super::bridges_of(&d), vec!["brvx-5001", "cloudbr0"]);
    }
}
