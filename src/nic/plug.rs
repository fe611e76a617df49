//! The PlugNic fields of CloudStack's NicTO that go beyond "a tap on a
//! bridge": the NIC's identity and order, its addresses, and the flags the
//! management server passes through. Validated here like every other field;
//! which of them reach libvirt is decided in [`super::spec`] and the README
//! table "PlugNicCommand field → NicSpec field → libvirt XML / host action".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use uuid::Uuid;

use super::bandwidth::MAX_MBPS;
use super::NicError;

/// Prefix of an alias that carries a CloudStack NIC uuid (after `ua-` or
/// `ua-ids-`). A plain generated alias is `ua-<uuid>` too, so a distinct
/// marker is needed to tell "the caller's NIC uuid" from "random".
pub const NIC_UUID_MARK: &str = "nic-";

/// Most secondary addresses one NIC may carry. CloudStack has no limit; a
/// bound keeps the request (and any filter built from it) small.
pub const MAX_SECONDARY_IPS: usize = 64;

/// Largest `device_id`: ACPI index `device_id + 1` must stay within
/// libvirt's 1-16383.
pub const MAX_DEVICE_ID: u32 = 16382;

/// CloudStack's NIC uuid: hyphenated, not nil.
pub fn nic_uuid(s: &str) -> Result<Uuid, NicError> {
    match Uuid::try_parse(s) {
        Ok(u) if !u.is_nil() && s.len() == 36 => Ok(u),
        _ => Err(NicError::invalid(
            "nic_uuid",
            s,
            "a hyphenated non-nil UUID (8-4-4-4-12 hex digits)",
        )),
    }
}

/// The alias that stores `uuid`: `ua-nic-<uuid>`, or `ua-ids-nic-<uuid>`
/// for a promiscuous NIC (IDS aliases are reserved for those).
pub fn alias_for_uuid(uuid: Uuid, ids: bool) -> String {
    let ids = if ids { "ids-" } else { "" };
    format!("ua-{ids}{NIC_UUID_MARK}{}", uuid.hyphenated())
}

/// The NIC uuid stored in an alias by [`alias_for_uuid`], if any.
pub fn uuid_from_alias(alias: &str) -> Option<Uuid> {
    let rest = alias.strip_prefix("ua-")?;
    let rest = rest.strip_prefix("ids-").unwrap_or(rest);
    let id = rest.strip_prefix(NIC_UUID_MARK)?;
    nic_uuid(id).ok()
}

/// CloudStack's deviceId, checked to 0-[`MAX_DEVICE_ID`].
pub fn device_id(v: u32) -> Result<u32, NicError> {
    if v <= MAX_DEVICE_ID {
        Ok(v)
    } else {
        Err(NicError::invalid(
            "device_id",
            v,
            format!("0-{MAX_DEVICE_ID} (stored as ACPI index device_id+1, at most 16383)"),
        ))
    }
}

/// An interface address with its prefix and optional gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpConfig<A> {
    /// The address.
    pub addr: A,
    /// Prefix length.
    pub prefix: u8,
    /// Gateway, when given.
    pub gateway: Option<A>,
}

/// CloudStack's MAC-policy details. Each is "unset", true or false.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MacPolicy {
    /// `PromiscuousMode`: becomes the IDS flag.
    pub promiscuous_mode: Option<bool>,
    /// `MacAddressChanges`: carried only (no Linux-bridge equivalent).
    pub mac_address_changes: Option<bool>,
    /// `ForgedTransmits`: carried only.
    pub forged_transmits: Option<bool>,
    /// `MacLearning`: carried only.
    pub mac_learning: Option<bool>,
}

/// The PlugNic fields that libvirt cannot hold: validated and carried for
/// anti-spoofing, security groups and guest-config, never applied here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlugDetails {
    /// The guest's default NIC.
    pub default_nic: bool,
    /// Primary IPv4 address.
    pub ipv4: Option<IpConfig<Ipv4Addr>>,
    /// Primary IPv6 address.
    pub ipv6: Option<IpConfig<Ipv6Addr>>,
    /// Secondary addresses, in request order, no duplicates.
    pub secondary_ips: Vec<IpAddr>,
    /// Security groups apply to this NIC (nwfilter's business).
    pub security_group_enabled: bool,
    /// Multicast rate in Mbit/s; libvirt has no multicast QoS.
    pub multicast_rate_mbps: Option<u32>,
    /// MAC-policy details.
    pub mac_policy: MacPolicy,
}

/// The raw address fields, as the proto carries them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawAddresses {
    /// `a.b.c.d/p`.
    pub ipv4_cidr: String,
    /// IPv4 gateway.
    pub ipv4_gateway: String,
    /// `x::y/p`.
    pub ipv6_cidr: String,
    /// IPv6 gateway.
    pub ipv6_gateway: String,
    /// Secondary addresses.
    pub secondary_ips: Vec<String>,
}

/// A unicast address a guest may own: not unspecified, loopback,
/// multicast or (IPv4) broadcast.
fn usable(ip: IpAddr) -> bool {
    let common = !ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast();
    match ip {
        IpAddr::V4(v4) => common && !v4.is_broadcast(),
        IpAddr::V6(_) => common,
    }
}

fn same_net(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

/// Parses `addr/prefix` plus an optional gateway for one family.
fn ip_config<A>(
    cidr_field: &'static str,
    gw_field: &'static str,
    cidr: &str,
    gateway: &str,
    max_prefix: u8,
    allowed: &'static str,
) -> Result<Option<IpConfig<A>>, NicError>
where
    A: std::str::FromStr + Copy + Into<IpAddr>,
{
    if cidr.is_empty() {
        if !gateway.is_empty() {
            return Err(NicError::conflict(
                gw_field,
                format!("a gateway needs an address: set {cidr_field} too"),
            ));
        }
        return Ok(None);
    }
    let bad = || NicError::invalid(cidr_field, cidr, allowed);
    let (a, p) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: A = a.parse().map_err(|_| bad())?;
    let prefix = if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) {
        p.parse::<u8>().map_err(|_| bad())?
    } else {
        return Err(bad());
    };
    if prefix == 0 || prefix > max_prefix || !usable(addr.into()) {
        return Err(bad());
    }
    let gateway = if gateway.is_empty() {
        None
    } else {
        let g: A = gateway.parse().map_err(|_| {
            NicError::invalid(gw_field, gateway, "a unicast address of the same family")
        })?;
        let gi: IpAddr = g.into();
        // An IPv6 gateway is usually link-local (fe80::/10), outside the
        // NIC's prefix; an IPv4 gateway must be on the NIC's subnet.
        let link_local = matches!(gi, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        if !usable(gi) || gi == addr.into() || !(link_local || same_net(gi, addr.into(), prefix)) {
            return Err(NicError::invalid(
                gw_field,
                gateway,
                format!("a unicast address inside {cidr} other than the NIC's own (IPv6: or link-local)"),
            ));
        }
        Some(g)
    };
    Ok(Some(IpConfig {
        addr,
        prefix,
        gateway,
    }))
}

/// Validates the address fields.
#[allow(clippy::type_complexity)]
pub fn addresses(
    raw: &RawAddresses,
) -> Result<
    (
        Option<IpConfig<Ipv4Addr>>,
        Option<IpConfig<Ipv6Addr>>,
        Vec<IpAddr>,
    ),
    NicError,
> {
    let v4 = ip_config::<Ipv4Addr>(
        "ipv4_cidr",
        "ipv4_gateway",
        &raw.ipv4_cidr,
        &raw.ipv4_gateway,
        32,
        "a.b.c.d/1-32, a unicast address",
    )?;
    let v6 = ip_config::<Ipv6Addr>(
        "ipv6_cidr",
        "ipv6_gateway",
        &raw.ipv6_cidr,
        &raw.ipv6_gateway,
        128,
        "x:x::x/1-128, a unicast address",
    )?;
    if raw.secondary_ips.len() > MAX_SECONDARY_IPS {
        return Err(NicError::invalid(
            "secondary_ips",
            format!("{} addresses", raw.secondary_ips.len()),
            format!("at most {MAX_SECONDARY_IPS}"),
        ));
    }
    let mut seen: Vec<IpAddr> = Vec::with_capacity(raw.secondary_ips.len());
    seen.extend(v4.map(|c| IpAddr::from(c.addr)));
    seen.extend(v6.map(|c| IpAddr::from(c.addr)));
    let primaries = seen.len();
    for s in &raw.secondary_ips {
        let ip: IpAddr = s.parse().ok().filter(|ip| usable(*ip)).ok_or_else(|| {
            NicError::invalid(
                "secondary_ips",
                s,
                "unicast IPv4 or IPv6 addresses without prefix",
            )
        })?;
        if seen.contains(&ip) {
            return Err(NicError::conflict(
                "secondary_ips",
                format!("{ip} is listed twice or is the primary address"),
            ));
        }
        seen.push(ip);
    }
    Ok((v4, v6, seen.split_off(primaries)))
}

/// CloudStack's `networkRateMulticastMbps`; 0 means unset.
pub fn multicast_rate(v: u32) -> Result<Option<u32>, NicError> {
    match v {
        0 => Ok(None),
        v if v <= MAX_MBPS => Ok(Some(v)),
        v => Err(NicError::invalid(
            "multicast_rate_mbps",
            v,
            format!("0 (unset) or 1-{MAX_MBPS}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v4: &str, gw4: &str, v6: &str, gw6: &str, sec: &[&str]) -> RawAddresses {
        RawAddresses {
            ipv4_cidr: v4.into(),
            ipv4_gateway: gw4.into(),
            ipv6_cidr: v6.into(),
            ipv6_gateway: gw6.into(),
            secondary_ips: sec.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn addresses_with_prefix_gateway_and_secondaries_are_accepted() {
        let (v4, v6, sec) = addresses(&raw(
            "10.1.1.5/24",
            "10.1.1.1",
            "2001:db8::5/64",
            "fe80::1",
            &["10.1.1.6", "2001:db8::6"],
        ))
        .unwrap();
        let v4 = v4.unwrap();
        assert_eq!((v4.addr.to_string(), v4.prefix), ("10.1.1.5".into(), 24));
        assert_eq!(v4.gateway.unwrap().to_string(), "10.1.1.1");
        assert_eq!(v6.unwrap().prefix, 64);
        assert_eq!(sec.len(), 2);
    }

    #[test]
    fn hostile_addresses_name_their_field() {
        let cases = [
            (raw("10.1.1.5", "", "", "", &[]), "ipv4_cidr"),
            (raw("10.1.1.5/33", "", "", "", &[]), "ipv4_cidr"),
            (raw("10.1.1.5/0", "", "", "", &[]), "ipv4_cidr"),
            (raw("10.1.1.5/+8", "", "", "", &[]), "ipv4_cidr"),
            (raw("224.0.0.1/24", "", "", "", &[]), "ipv4_cidr"),
            (raw("2001:db8::5/64", "", "", "", &[]), "ipv4_cidr"),
            (raw("10.1.1.5/24", "10.2.0.1", "", "", &[]), "ipv4_gateway"),
            (raw("10.1.1.5/24", "10.1.1.5", "", "", &[]), "ipv4_gateway"),
            (raw("", "10.1.1.1", "", "", &[]), "ipv4_gateway"),
            (raw("", "", "::/64", "", &[]), "ipv6_cidr"),
            (raw("", "", "2001:db8::5/129", "", &[]), "ipv6_cidr"),
            (
                raw("", "", "2001:db8::5/64", "2001:db9::1", &[]),
                "ipv6_gateway",
            ),
            (raw("", "", "", "", &["10.0.0.1/24"]), "secondary_ips"),
            (
                raw("", "", "", "", &["10.0.0.1", "10.0.0.1"]),
                "secondary_ips",
            ),
            (
                raw("10.1.1.5/24", "", "", "", &["10.1.1.5"]),
                "secondary_ips",
            ),
        ];
        for (r, field) in cases {
            let e = addresses(&r).expect_err(&format!("{r:?}"));
            assert_eq!(e.field(), field, "{r:?}: {e}");
        }
        let many: Vec<String> = (0..=MAX_SECONDARY_IPS)
            .map(|i| format!("10.9.{}.{}", i / 200, i % 200 + 1))
            .collect();
        let r = RawAddresses {
            secondary_ips: many,
            ..RawAddresses::default()
        };
        assert_eq!(addresses(&r).unwrap_err().field(), "secondary_ips");
    }

    #[test]
    fn nic_uuid_round_trips_through_the_alias() {
        let u = nic_uuid("1b4e28ba-2fa1-11d2-883f-0016d3cca427").unwrap();
        for ids in [false, true] {
            let a = alias_for_uuid(u, ids);
            assert!(a.len() <= 64);
            assert_eq!(uuid_from_alias(&a), Some(u));
        }
        // A generated alias (ua-<random uuid>) is not a NIC uuid.
        assert_eq!(
            uuid_from_alias("ua-1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
            None
        );
        assert!(nic_uuid("00000000-0000-0000-0000-000000000000").is_err());
        assert!(nic_uuid("1b4e28ba2fa111d2883f0016d3cca427").is_err());
    }

    #[test]
    fn device_id_and_multicast_rate_bounds() {
        assert_eq!(device_id(0).unwrap(), 0);
        assert_eq!(device_id(MAX_DEVICE_ID).unwrap(), MAX_DEVICE_ID);
        assert_eq!(
            device_id(MAX_DEVICE_ID + 1).unwrap_err().field(),
            "device_id"
        );
        assert_eq!(multicast_rate(0).unwrap(), None);
        assert_eq!(multicast_rate(MAX_MBPS).unwrap(), Some(MAX_MBPS));
        assert_eq!(
            multicast_rate(MAX_MBPS + 1).unwrap_err().field(),
            "multicast_rate_mbps"
        );
    }
}
