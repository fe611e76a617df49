//! Anti-spoofing policy: whether a NIC gets the agent's nwfilter
//! (`xml::nwfilter`), and making sure that filter is defined before any NIC
//! references it.
//!
//! The rules themselves are libvirt's: the agent only defines the filter
//! and puts a `<filterref>` into the NIC's XML. libvirt instantiates it on
//! the tap when the NIC is plugged, re-instantiates it when the VM starts
//! or migrates, and removes it with the tap.

use std::path::Path;

use super::{Hotplug, HotplugError};
use crate::config::AntiSpoofing;
use crate::hypervisor::HvErrorKind;
use crate::nic::NicSpec;
use crate::xml::nwfilter::{FilterRef, FILTER_NAME, FILTER_XML, STANDARD_PIECES};

/// What a NIC gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protection {
    /// The NIC did not ask for anti-spoofing.
    NotAsked,
    /// The agent's nwfilter.
    Nwfilter,
    /// cloudstack-agent's security groups are in charge of this host.
    LeftToCloudStack,
    /// `anti_spoofing = "off"`.
    Off,
}

/// Decides, from the setting, the request and the host, who protects a NIC.
/// Pure, so every combination is unit-tested.
pub(crate) fn decide(mode: AntiSpoofing, asked: bool, cloudstack_sg: bool) -> Protection {
    match (asked, mode) {
        (false, _) => Protection::NotAsked,
        (true, AntiSpoofing::Off) => Protection::Off,
        (true, AntiSpoofing::Nwfilter) => Protection::Nwfilter,
        (true, AntiSpoofing::Auto) if cloudstack_sg => Protection::LeftToCloudStack,
        (true, AntiSpoofing::Auto) => Protection::Nwfilter,
    }
}

impl Protection {
    /// The note an attach reply carries, when there is something to say.
    pub(crate) fn note(self, script: &Path) -> Option<String> {
        match self {
            Protection::NotAsked | Protection::Nwfilter => None,
            Protection::LeftToCloudStack => Some(format!(
                "anti-spoofing left to cloudstack-agent: its security-group script {} is installed on this host (anti_spoofing = \"auto\")",
                script.display()
            )),
            Protection::Off => Some(
                "anti-spoofing not applied: anti_spoofing = \"off\" on this agent".into(),
            ),
        }
    }
}

/// A libvirt nwfilter call that the driver cannot answer (no driver, or
/// no such filter) means the host lacks the nwfilter packages; classified
/// by error number. Anything else is left as it is.
fn no_driver(e: HotplugError, what: &str) -> HotplugError {
    match e {
        HotplugError::Hypervisor(h)
            if matches!(
                h.kind,
                HvErrorKind::Unsupported | HvErrorKind::FilterMissing
            ) =>
        {
            tracing::debug!(error = %h, "{what}");
            driver_missing()
        }
        other => other,
    }
}

fn driver_missing() -> HotplugError {
    HotplugError::Precondition(
        "anti-spoofing needs libvirt's nwfilter driver: install libvirt-daemon-driver-nwfilter and libvirt-daemon-config-nwfilter, then restart libvirtd; or set anti_spoofing = \"off\"".into(),
    )
}

impl Hotplug {
    /// Who protects this NIC, on this host, now.
    pub(crate) fn protection(&self, spec: &NicSpec) -> Protection {
        let script = self.cfg.cloudstack_sg_script.exists();
        // CloudStack asks for protection through security groups; the
        // per-NIC flag asks for it directly. Either one is a request.
        let asked = spec.anti_spoofing || spec.plug.security_group_enabled;
        decide(self.cfg.anti_spoofing, asked, script)
    }

    /// The `<filterref>` for a NIC the agent protects.
    /// The guest may use the `ips` of the request and the addresses
    /// CloudStack sent (primary IPv4 and IPv6, secondary IPs), each once.
    pub(crate) fn filter_ref(spec: &NicSpec) -> FilterRef {
        let p = &spec.plug;
        let mut ips = spec.ips.clone();
        let plugged = p
            .ipv4
            .map(|c| std::net::IpAddr::V4(c.addr))
            .into_iter()
            .chain(p.ipv6.map(|c| std::net::IpAddr::V6(c.addr)))
            .chain(p.secondary_ips.iter().copied());
        for ip in plugged {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        FilterRef { mac: spec.mac, ips }
    }

    /// Defines the agent's nwfilter, once per agent run: at start-up and,
    /// should that have failed (libvirtd down, driver missing), before the
    /// first attach that needs it. Redefining is an in-place update (fixed
    /// UUID), so a restarted agent simply defines it again.
    ///
    /// Refuses with FAILED_PRECONDITION, naming the package, when the
    /// nwfilter driver or libvirt's standard filters are missing: a NIC that
    /// asked for anti-spoofing must not be plugged unprotected.
    pub async fn ensure_filter(&self) -> Result<(), HotplugError> {
        let mut defined = self.filter_defined.lock().await;
        if *defined {
            return Ok(());
        }
        let names = self
            .blocking(|hv| hv.nwfilters())
            .await
            .map_err(|e| no_driver(e, "nwfilter driver unavailable"))?;
        let missing: Vec<&str> = STANDARD_PIECES
            .iter()
            .copied()
            .filter(|p| !names.iter().any(|n| n == p))
            .collect();
        if !missing.is_empty() {
            return Err(HotplugError::Precondition(format!(
                "libvirt's standard network filters are missing ({}): install libvirt-daemon-config-nwfilter and restart libvirtd",
                missing.join(", ")
            )));
        }
        self.blocking(|hv| hv.define_nwfilter(FILTER_XML))
            .await
            .map_err(|e| no_driver(e, "nwfilter define refused"))?;
        tracing::info!(filter = FILTER_NAME, "anti-spoofing nwfilter defined");
        *defined = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nics_that_ask_are_protected() {
        for mode in [
            AntiSpoofing::Auto,
            AntiSpoofing::Nwfilter,
            AntiSpoofing::Off,
        ] {
            for sg in [false, true] {
                assert_eq!(decide(mode, false, sg), Protection::NotAsked);
            }
        }
    }

    #[test]
    fn auto_defers_to_cloudstack_security_groups_only_where_installed() {
        assert_eq!(
            decide(AntiSpoofing::Auto, true, false),
            Protection::Nwfilter
        );
        assert_eq!(
            decide(AntiSpoofing::Auto, true, true),
            Protection::LeftToCloudStack
        );
        assert_eq!(
            decide(AntiSpoofing::Nwfilter, true, true),
            Protection::Nwfilter
        );
        assert_eq!(decide(AntiSpoofing::Off, true, false), Protection::Off);
    }

    // ---- orchestration, against the recording fake ----

    use std::path::PathBuf;
    use std::sync::Arc;

    use crate::hypervisor::fake::FakeHypervisor;
    use crate::hypervisor::{Hypervisor, RunState, Target};
    use crate::nic::RawNic;

    use super::super::HotplugConfig;

    fn asking(mac: &str, ips: &[&str]) -> NicSpec {
        NicSpec::try_from(RawNic {
            mac: mac.into(),
            bridge: "cloudbr0".into(),
            anti_spoofing: true,
            ips: ips.iter().map(|s| s.to_string()).collect(),
            ..RawNic::default()
        })
        .expect("valid spec")
    }

    fn engine(fake: Arc<FakeHypervisor>, mode: AntiSpoofing, script: PathBuf) -> Hotplug {
        let cfg = HotplugConfig {
            vhost_net_present: false,
            anti_spoofing: mode,
            cloudstack_sg_script: script,
            ..HotplugConfig::default()
        };
        Hotplug::new(fake, None, cfg)
    }

    fn no_script() -> PathBuf {
        PathBuf::from("/nonexistent/nic-agent-test/security_group.py")
    }

    fn defines(fake: &FakeHypervisor) -> usize {
        fake.calls()
            .iter()
            .filter(|c| c.op == "define_nwfilter")
            .count()
    }

    fn live_xml(fake: &FakeHypervisor) -> String {
        let dom = fake.lookup("vm1").expect("vm1");
        fake.xml(&dom, Target::Live).expect("live xml")
    }

    #[tokio::test]
    async fn filter_is_defined_once_and_nics_that_ask_reference_it() {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, false, 2);
        let hp = engine(fake.clone(), AntiSpoofing::Nwfilter, no_script());
        // Start-up, then two attaches: one define.
        hp.ensure_filter().await.expect("start-up define");
        let out = hp
            .attach(
                "vm1",
                &asking("52:54:00:00:0a:01", &["10.0.0.5", "fd00::5"]),
            )
            .await
            .expect("attach");
        hp.attach("vm1", &asking("52:54:00:00:0a:02", &[]))
            .await
            .expect("attach");
        assert_eq!(defines(&fake), 1, "{:?}", fake.calls());
        assert_eq!(
            fake.calls()
                .iter()
                .find(|c| c.op == "define_nwfilter")
                .map(|c| c.mac.as_str()),
            Some(FILTER_NAME)
        );
        assert_eq!(out.nic.filter, FILTER_NAME);
        assert!(out.notes.is_empty(), "{:?}", out.notes);
        let xml = live_xml(&fake);
        for p in [
            "name=\"MAC\" value=\"52:54:00:00:0a:01\"",
            "name=\"IP\" value=\"10.0.0.5\"",
            "name=\"IPV6\" value=\"fd00::5\"",
            "name=\"CTRL_IP_LEARNING\" value=\"dhcp\"",
        ] {
            assert!(xml.contains(p), "{p} missing in {xml}");
        }
    }

    #[tokio::test]
    async fn first_attach_defines_the_filter_when_start_up_could_not() {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, false, 2);
        let hp = engine(fake.clone(), AntiSpoofing::Auto, no_script());
        hp.attach("vm1", &asking("52:54:00:00:0a:03", &["10.0.0.6"]))
            .await
            .expect("attach");
        assert_eq!(defines(&fake), 1);
        let ops: Vec<_> = fake.calls().iter().map(|c| c.op).collect();
        let define = ops.iter().position(|o| *o == "define_nwfilter");
        let attach = ops.iter().position(|o| *o == "attach");
        assert!(define < attach, "define before attach: {ops:?}");
    }

    #[tokio::test]
    async fn security_group_enabled_asks_for_the_filter_with_cloudstacks_addresses() {
        // PlugNic's isSecurityGroupEnabled without the per-NIC flag.
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, false, 2);
        let hp = engine(fake.clone(), AntiSpoofing::Auto, no_script());
        let spec = NicSpec::try_from(RawNic {
            mac: "52:54:00:00:0a:07".into(),
            bridge: "cloudbr0".into(),
            security_group_enabled: true,
            addresses: crate::nic::RawAddresses {
                ipv4_cidr: "10.0.0.10/24".into(),
                secondary_ips: vec!["10.0.0.11".into()],
                ..crate::nic::RawAddresses::default()
            },
            ..RawNic::default()
        })
        .expect("valid spec");
        assert!(!spec.anti_spoofing);
        let out = hp.attach("vm1", &spec).await.expect("attach");
        assert_eq!(defines(&fake), 1);
        assert_eq!(out.nic.filter, FILTER_NAME);
        let xml = live_xml(&fake);
        for p in [
            "name=\"MAC\" value=\"52:54:00:00:0a:07\"",
            "name=\"IP\" value=\"10.0.0.10\"",
            "name=\"IP\" value=\"10.0.0.11\"",
        ] {
            assert!(xml.contains(p), "{p} missing in {xml}");
        }
    }

    #[tokio::test]
    async fn nic_that_does_not_ask_gets_no_filter() {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, false, 2);
        let hp = engine(fake.clone(), AntiSpoofing::Nwfilter, no_script());
        let mut spec = asking("52:54:00:00:0a:04", &["10.0.0.7"]);
        spec.anti_spoofing = false;
        let out = hp.attach("vm1", &spec).await.expect("attach");
        assert_eq!(defines(&fake), 0);
        assert_eq!(out.nic.filter, "");
        assert!(!live_xml(&fake).contains("filterref"));
    }

    #[tokio::test]
    async fn off_attaches_without_filterref_and_says_so() {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, false, 2);
        let hp = engine(fake.clone(), AntiSpoofing::Off, no_script());
        let out = hp
            .attach("vm1", &asking("52:54:00:00:0a:05", &["10.0.0.8"]))
            .await
            .expect("attach");
        assert_eq!(defines(&fake), 0);
        assert_eq!(out.nic.filter, "");
        assert!(!live_xml(&fake).contains("filterref"));
        assert_eq!(out.notes.len(), 1);
        assert!(out.notes[0].contains("\"off\""), "{:?}", out.notes);
    }

    #[tokio::test]
    async fn auto_with_cloudstack_security_groups_leaves_rules_to_cloudstack_and_reports_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("security_group.py");
        std::fs::write(&script, "#!/usr/bin/python3\n").expect("script");
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, false, 2);
        let hp = engine(fake.clone(), AntiSpoofing::Auto, script.clone());
        let out = hp
            .attach("vm1", &asking("52:54:00:00:0a:06", &["10.0.0.9"]))
            .await
            .expect("attach");
        assert_eq!(defines(&fake), 0);
        assert_eq!(out.nic.filter, "");
        assert!(!live_xml(&fake).contains("filterref"));
        assert_eq!(out.notes.len(), 1);
        assert!(out.notes[0].contains("cloudstack-agent"), "{:?}", out.notes);
        assert!(
            out.notes[0].contains(&script.display().to_string()),
            "{:?}",
            out.notes
        );
    }

    #[tokio::test]
    async fn missing_nwfilter_driver_refuses_naming_the_package_and_plugs_nothing() {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, false, 2);
        *fake.nwfilters.lock().expect("lock") = None;
        let hp = engine(fake.clone(), AntiSpoofing::Nwfilter, no_script());
        let err = hp
            .attach("vm1", &asking("52:54:00:00:0a:07", &["10.0.0.10"]))
            .await
            .expect_err("must refuse");
        let HotplugError::Precondition(msg) = &err else {
            panic!("want Precondition, got {err:?}");
        };
        assert!(msg.contains("libvirt-daemon-driver-nwfilter"), "{msg}");
        assert!(fake.calls().iter().all(|c| c.op != "attach"));
        assert!(hp.list_nics("vm1").await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn missing_standard_filters_name_the_config_package() {
        let fake = Arc::new(FakeHypervisor::default());
        fake.add("vm1", RunState::Running, false, 2);
        *fake.nwfilters.lock().expect("lock") = Some(vec!["no-mac-spoofing".into()]);
        let hp = engine(fake.clone(), AntiSpoofing::Nwfilter, no_script());
        let err = hp
            .attach("vm1", &asking("52:54:00:00:0a:08", &[]))
            .await
            .expect_err("must refuse");
        let HotplugError::Precondition(msg) = &err else {
            panic!("want Precondition, got {err:?}");
        };
        assert!(msg.contains("libvirt-daemon-config-nwfilter"), "{msg}");
        assert!(msg.contains("no-ipv6-spoofing"), "{msg}");
        assert_eq!(defines(&fake), 0);
        assert!(fake.calls().iter().all(|c| c.op != "attach"));
    }
}
