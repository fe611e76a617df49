//! The agent's own libvirt nwfilter, `nic-agent-clean`, and the
//! `<filterref>` a protected NIC carries.
//!
//! The filter is defined once per host through `virNWFilterDefineXML`
//! ([`FILTER_XML`]); each protected NIC's `<interface>` then references it
//! with its MAC and addresses as parameters ([`FilterRef`]). Because the
//! reference lives in the domain XML, libvirt itself re-instantiates the
//! rules when the VM starts, restarts or migrates: the agent does not have
//! to be running for the protection to follow the NIC.
//!
//! Why not libvirt's `clean-traffic`: it ends with `no-other-l2-traffic`,
//! which drops every frame that is not IPv4 or ARP, so all IPv6. This
//! filter is built from the same standard pieces, minus that one, plus
//! IPv6:
//!
//! - `no-mac-spoofing` (chain `mac`, priority -800): frames from the guest
//!   must carry `$MAC` as source. It runs first, so every later accept only
//!   ever sees the NIC's own MAC.
//! - `no-ip-spoofing` (chain `ipv4-ip`, -710): IPv4 from the guest must come
//!   from one of `$IP` (or be a DHCP request from 0.0.0.0).
//! - `no-ipv6-spoofing` (chain `ipv6-ip`, -610): IPv6 from the guest must
//!   come from one of `$IPV6`; it lets UDP from link-local through (DHCPv6).
//! - `no-arp-spoofing`: ARP from the guest must carry `$MAC` and `$IP`
//!   (no gratuitous ARP for someone else's address).
//! - `allow-dhcp`, `allow-dhcpv6`: the DHCP and DHCPv6 *client* exchange
//!   (requests out, replies in). No server side.
//! - IPv6 neighbour discovery: libvirt ships no filter for it, and
//!   `no-ipv6-spoofing` would drop it (ND comes from link-local `fe80::/10`
//!   or, during duplicate address detection, from `::`). The rules below
//!   accept router solicitation (133), neighbour solicitation and
//!   advertisement (135, 136) and MLDv2 reports (143) from those sources,
//!   before the `ipv6-ip` chain runs, and drop router advertisements (134)
//!   from the guest so that a tenant cannot become everyone's router.
//!
//! Whatever is not dropped is accepted (the root chain's policy), incoming
//! traffic included: this filter stops spoofing, it is not a firewall.
//!
//! Parameters: `MAC` always. `IP` once per IPv4 address; with none, the
//! reference sets `CTRL_IP_LEARNING=dhcp` so libvirt learns the address from
//! the guest's DHCP lease only (never from whatever the guest sends first).
//! `IPV6` once per IPv6 address; with none, `IPV6=::`, because libvirt
//! refuses to instantiate a filter whose variable has no value and has no
//! learning for IPv6; `::` only admits what duplicate address detection
//! sends anyway.

use std::net::IpAddr;

use serde::Serialize;

use crate::nic::MacAddr;

/// The filter's name, as NICs reference it.
pub const FILTER_NAME: &str = "nic-agent-clean";

/// Fixed UUID: `virNWFilterDefineXML` of a filter whose name exists under
/// another UUID fails, and a definition without one gets a random UUID. A
/// fixed one makes every define after the first an in-place update, so the
/// start-up define is idempotent (and upgrades of this text take effect).
pub const FILTER_UUID: &str = "5f3e8c1a-6d2b-4b7e-9a41-6e1c0a9d2b77";

/// The standard filters [`FILTER_XML`] references; they come with
/// `libvirt-daemon-config-nwfilter`.
pub const STANDARD_PIECES: &[&str] = &[
    "no-mac-spoofing",
    "no-ip-spoofing",
    "no-ipv6-spoofing",
    "no-arp-spoofing",
    "allow-dhcp",
    "allow-dhcpv6",
];

/// The definition passed to `virNWFilterDefineXML`. Priorities place the
/// root-chain rules after the `mac` chain (-800) and before `ipv6-ip`
/// (-610); see the module documentation for why each piece is there.
pub const FILTER_XML: &str = r#"<filter name='nic-agent-clean' chain='root'>
  <uuid>5f3e8c1a-6d2b-4b7e-9a41-6e1c0a9d2b77</uuid>
  <filterref filter='no-mac-spoofing'/>
  <filterref filter='no-ip-spoofing'/>
  <filterref filter='no-ipv6-spoofing'/>
  <filterref filter='no-arp-spoofing'/>
  <filterref filter='allow-dhcp'/>
  <filterref filter='allow-dhcpv6'/>
  <rule action='drop' direction='out' priority='-640'>
    <ipv6 protocol='icmpv6' type='134'/>
  </rule>
  <rule action='accept' direction='out' priority='-630'>
    <ipv6 srcipaddr='fe80::' srcipmask='10' protocol='icmpv6' type='133'/>
  </rule>
  <rule action='accept' direction='out' priority='-630'>
    <ipv6 srcipaddr='fe80::' srcipmask='10' protocol='icmpv6' type='135' typeend='136'/>
  </rule>
  <rule action='accept' direction='out' priority='-630'>
    <ipv6 srcipaddr='fe80::' srcipmask='10' protocol='icmpv6' type='143'/>
  </rule>
  <rule action='accept' direction='out' priority='-630'>
    <ipv6 srcipaddr='::' protocol='icmpv6' type='135'/>
  </rule>
  <rule action='accept' direction='out' priority='-630'>
    <ipv6 srcipaddr='::' protocol='icmpv6' type='143'/>
  </rule>
</filter>
"#;

/// A NIC's reference to [`FILTER_NAME`] with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRef {
    /// The NIC's MAC (`$MAC`).
    pub mac: MacAddr,
    /// Its addresses: IPv4 ones become `$IP`, IPv6 ones `$IPV6`.
    pub ips: Vec<IpAddr>,
}

impl FilterRef {
    /// The `(name, value)` parameters in output order: MAC, the IPv4
    /// addresses (or DHCP learning), the IPv6 addresses (or `::`).
    pub fn parameters(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("MAC", self.mac.to_string())];
        let v4: Vec<_> = self.ips.iter().filter(|a| a.is_ipv4()).collect();
        let v6: Vec<_> = self.ips.iter().filter(|a| a.is_ipv6()).collect();
        if v4.is_empty() {
            out.push(("CTRL_IP_LEARNING", "dhcp".into()));
        }
        out.extend(v4.into_iter().map(|a| ("IP", a.to_string())));
        if v6.is_empty() {
            out.push(("IPV6", "::".into()));
        }
        out.extend(v6.into_iter().map(|a| ("IPV6", a.to_string())));
        out
    }

    pub(crate) fn element(&self) -> XFilterRef {
        XFilterRef {
            filter: FILTER_NAME,
            parameter: self
                .parameters()
                .into_iter()
                .map(|(name, value)| XParameter { name, value })
                .collect(),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct XFilterRef {
    #[serde(rename = "@filter")]
    filter: &'static str,
    parameter: Vec<XParameter>,
}

#[derive(Serialize)]
struct XParameter {
    #[serde(rename = "@name")]
    name: &'static str,
    #[serde(rename = "@value")]
    value: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac() -> MacAddr {
        MacAddr::try_from("52:54:00:aa:bb:01").unwrap()
    }

    #[test]
    fn filter_is_named_and_keyed_by_its_constants() {
        assert!(FILTER_XML.starts_with(&format!("<filter name='{FILTER_NAME}' chain='root'>")));
        assert!(FILTER_XML.contains(&format!("<uuid>{FILTER_UUID}</uuid>")));
        for piece in STANDARD_PIECES {
            assert!(FILTER_XML.contains(&format!("<filterref filter='{piece}'/>")));
        }
    }

    #[test]
    fn filter_never_drops_all_ipv6() {
        assert!(!FILTER_XML.contains("no-other-l2-traffic"));
        assert!(!FILTER_XML.contains("clean-traffic"));
    }

    #[test]
    fn parameters_carry_one_ip_per_address_by_family() {
        let r = FilterRef {
            mac: mac(),
            ips: vec![
                "10.1.1.5".parse().unwrap(),
                "2001:db8::5".parse().unwrap(),
                "10.1.1.6".parse().unwrap(),
            ],
        };
        assert_eq!(
            r.parameters(),
            vec![
                ("MAC", "52:54:00:aa:bb:01".to_string()),
                ("IP", "10.1.1.5".to_string()),
                ("IP", "10.1.1.6".to_string()),
                ("IPV6", "2001:db8::5".to_string()),
            ]
        );
    }

    #[test]
    fn without_addresses_ipv4_is_learned_from_dhcp_and_ipv6_is_unspecified() {
        let r = FilterRef {
            mac: mac(),
            ips: vec![],
        };
        assert_eq!(
            r.parameters(),
            vec![
                ("MAC", "52:54:00:aa:bb:01".to_string()),
                ("CTRL_IP_LEARNING", "dhcp".to_string()),
                ("IPV6", "::".to_string()),
            ]
        );
    }
}
