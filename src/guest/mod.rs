//! The guest-side files an operator writes after a hot-plug, generated
//! instead of typed by hand. Pure: no libvirt, no host access, so the CLI's
//! `guest-config` and the `GuestConfig` RPC render from the same model.
//!
//! A hot-plugged NIC comes up in the guest unconfigured. Each distribution
//! wants its own file (RHEL ifcfg, Debian ifupdown, netplan, NetworkManager
//! keyfiles, systemd-networkd), and a *secondary* interface also needs
//! policy routing: without it, replies to traffic that arrived on the new
//! NIC leave through the default route's NIC (asymmetric routing), and
//! strict rp_filter on either side drops them. So `--table` gives the NIC
//! its own routing table (connected route + default via the NIC's gateway)
//! and a rule that sends everything from the NIC's address to that table;
//! for a DHCP address the rule follows the lease through a hook
//! ([`hooks`]).
//!
//! Layout: this file holds the request, its validation and the model
//! ([`GuestConfig`]); [`formats`] renders the interface files and
//! [`hooks`] the policy-routing scripts. Every renderer reads the same
//! model, so the formats cannot drift apart.

mod formats;
mod hooks;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::nic::MacAddr;

/// What the caller asks for, as given (strings, not yet validated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestRequest {
    /// MAC of the hot-plugged NIC.
    pub mac: String,
    /// Interface name in the guest.
    pub name: String,
    /// Static address ADDR/PREFIX; `None` means DHCP.
    pub ip: Option<String>,
    /// Gateway of the NIC's subnet (with `ip`).
    pub gateway: Option<String>,
    /// Routing table for the NIC's policy routing, 1-252.
    pub table: Option<u32>,
    /// Static IPv6 address ADDR/PREFIX.
    pub ip6: Option<String>,
    /// IPv6 gateway (with `ip6`).
    pub gateway6: Option<String>,
    /// `static`, `slaac` or `dhcp6`; `None` means static with `ip6`, off
    /// without it.
    pub ip6_mode: Option<String>,
    /// This NIC holds the guest's default route.
    pub default_route: bool,
}

/// A bad `guest-config` input; the message names the flag.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid --{field} {value:?}: {allowed}")]
pub struct GuestConfigError {
    /// The flag, without dashes.
    pub field: &'static str,
    /// The value given.
    pub value: String,
    /// What is allowed.
    pub allowed: String,
}

fn bad(
    field: &'static str,
    value: impl Into<String>,
    allowed: impl Into<String>,
) -> GuestConfigError {
    GuestConfigError {
        field,
        value: value.into(),
        allowed: allowed.into(),
    }
}

/// An IPv4 address with its prefix length, `A.B.C.D/P`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length, 1-32.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The network, `A.B.C.0/P`.
    pub fn network(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix: self.prefix,
        }
    }

    /// Whether `ip` is in this address's subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The digits after `/`, strictly (no sign, no spaces).
fn prefix_digits(p: &str) -> Option<u8> {
    if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) {
        p.parse().ok()
    } else {
        None
    }
}

impl TryFrom<&str> for Ipv4Cidr {
    type Error = GuestConfigError;
    fn try_from(s: &str) -> Result<Self, GuestConfigError> {
        let allowed = "an IPv4 address with prefix length, e.g. 10.0.1.5/24 (prefix 1-32)";
        let (a, p) = s.split_once('/').ok_or_else(|| bad("ip", s, allowed))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad("ip", s, allowed))?;
        let prefix = prefix_digits(p)
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| bad("ip", s, allowed))?;
        if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() || addr.is_loopback()
        {
            return Err(bad("ip", s, "a unicast host address"));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

/// An IPv6 address with its prefix length, `ADDR/P`: a global or unique
/// local unicast address (the kernel makes the link-local one itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Cidr {
    addr: Ipv6Addr,
    prefix: u8,
}

impl Ipv6Cidr {
    /// The address.
    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    /// The prefix length, 1-128.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl std::fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn is_link_local6(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

impl TryFrom<&str> for Ipv6Cidr {
    type Error = GuestConfigError;
    fn try_from(s: &str) -> Result<Self, GuestConfigError> {
        let allowed = "an IPv6 address with prefix length, e.g. 2001:db8::5/64 (prefix 1-128)";
        let (a, p) = s.split_once('/').ok_or_else(|| bad("ip6", s, allowed))?;
        let addr: Ipv6Addr = a.parse().map_err(|_| bad("ip6", s, allowed))?;
        let prefix = prefix_digits(p)
            .filter(|p| (1..=128).contains(p))
            .ok_or_else(|| bad("ip6", s, allowed))?;
        if addr.is_unspecified()
            || addr.is_multicast()
            || addr.is_loopback()
            || is_link_local6(addr)
        {
            return Err(bad(
                "ip6",
                s,
                "a global or unique-local unicast address (not link-local)",
            ));
        }
        Ok(Ipv6Cidr { addr, prefix })
    }
}

/// A policy routing table id: 1-252 (253 default, 254 main, 255 local and
/// 0 unspec are the kernel's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTable(u8);

impl RouteTable {
    /// The table id.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<u32> for RouteTable {
    type Error = GuestConfigError;
    fn try_from(v: u32) -> Result<Self, GuestConfigError> {
        match v {
            1..=252 => Ok(RouteTable(v as u8)),
            253..=255 => Err(bad(
                "table",
                v.to_string(),
                "1-252 (253 default, 254 main and 255 local are reserved)",
            )),
            _ => Err(bad("table", v.to_string(), "1-252")),
        }
    }
}

/// A guest interface name as Linux allows it: 1-15 bytes, no `/`, no
/// whitespace, not `.` or `..`. Narrowed to `[A-Za-z0-9_.-]` so it is safe
/// in file names and shell lines.
fn ifname(s: &str) -> Result<String, GuestConfigError> {
    let ok = (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(bad(
            "name",
            s,
            "an interface name, 1-15 of A-Z a-z 0-9 _ . - (not starting with -)",
        ))
    }
}

/// A hook file name for directories read with `run-parts --list`
/// (Debian's dhclient-script), which skips names containing a dot: the
/// hook for `eth1.100` would silently never run.
fn run_parts_name(ifname: &str) -> String {
    ifname.replace('.', "_")
}

/// The metric of the default route on the NIC made with `--default`.
/// Lower wins; 100 is what NetworkManager and networkd give a wired
/// primary NIC, so ours ties with nothing else the guest installs on
/// purpose and a NIC without `--default` installs no default route at all.
pub const DEFAULT_ROUTE_METRIC: u32 = 100;

/// How the NIC gets its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V4 {
    /// A lease from the segment's DHCP server (CloudStack's virtual router).
    Dhcp,
    /// A fixed address.
    Static {
        /// Address and prefix.
        ip: Ipv4Cidr,
        /// The NIC's gateway, in the address's subnet.
        gateway: Option<Ipv4Addr>,
    },
}

/// How the NIC gets its IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6 {
    /// No IPv6 on this NIC (no SLAAC either, so no router advertisement
    /// can hand it a default route).
    Off,
    /// Stateless autoconfiguration from router advertisements.
    Slaac,
    /// A DHCPv6 lease (router advertisements still bring the route).
    Dhcp6,
    /// A fixed address.
    Static {
        /// Address and prefix.
        ip: Ipv6Cidr,
        /// The IPv6 gateway (often the router's link-local address).
        gateway: Option<Ipv6Addr>,
    },
}

/// A validated `guest-config` request: the one model every format renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// The NIC's MAC.
    pub mac: MacAddr,
    /// Interface name in the guest.
    pub name: String,
    /// IPv4 addressing.
    pub v4: V4,
    /// IPv6 addressing.
    pub v6: V6,
    /// The NIC's own table for IPv4 policy routing.
    pub table: Option<RouteTable>,
    /// Whether this NIC holds the default route (else it never does).
    pub default_route: bool,
}

impl GuestConfig {
    /// The static IPv4 address, if any.
    pub fn static_v4(&self) -> Option<Ipv4Cidr> {
        match self.v4 {
            V4::Static { ip, .. } => Some(ip),
            V4::Dhcp => None,
        }
    }

    /// Static policy routing: address, gateway and table all known now.
    pub fn static_policy(&self) -> Option<(Ipv4Cidr, Ipv4Addr, RouteTable)> {
        match (self.v4, self.table) {
            (
                V4::Static {
                    ip,
                    gateway: Some(gw),
                },
                Some(t),
            ) => Some((ip, gw, t)),
            _ => None,
        }
    }

    /// DHCP policy routing: the address arrives with the lease.
    pub fn dhcp_policy(&self) -> Option<RouteTable> {
        match self.v4 {
            V4::Dhcp => self.table,
            V4::Static { .. } => None,
        }
    }

    /// The IPv4 default gateway in the main table, only with `--default`.
    pub fn default_gw4(&self) -> Option<Ipv4Addr> {
        match self.v4 {
            V4::Static { gateway, .. } if self.default_route => gateway,
            _ => None,
        }
    }

    /// The IPv6 default gateway in the main table, only with `--default`.
    pub fn default_gw6(&self) -> Option<Ipv6Addr> {
        match self.v6 {
            V6::Static { gateway, .. } if self.default_route => gateway,
            _ => None,
        }
    }

    /// One comment line on the route metrics, the same in every format.
    pub fn metric_note(&self) -> String {
        if self.default_route {
            format!(
                "Route metrics: {} holds the default route at metric {DEFAULT_ROUTE_METRIC} \
                 (lower wins); NICs rendered without --default install none, so none competes.",
                self.name
            )
        } else {
            format!(
                "Route metrics: {} never installs a default route in the main table; the NIC \
                 rendered with --default holds it at metric {DEFAULT_ROUTE_METRIC}{}.",
                self.name,
                match self.table {
                    Some(t) => format!(", and this NIC's gateway lives in table {}", t.get()),
                    None => String::new(),
                }
            )
        }
    }
}

fn parse_v6(a: &GuestRequest) -> Result<V6, GuestConfigError> {
    let mode = a.ip6_mode.as_deref();
    let allowed_modes = "static, slaac or dhcp6";
    let v6 = match (mode, a.ip6.as_deref()) {
        (None | Some("static"), Some(s)) => V6::Static {
            ip: Ipv6Cidr::try_from(s)?,
            gateway: None,
        },
        (Some("static"), None) => {
            return Err(bad("ip6-mode", "static", "static needs --ip6 ADDR/PREFIX"));
        }
        (Some(m @ ("slaac" | "dhcp6")), Some(_)) => {
            return Err(bad(
                "ip6-mode",
                m,
                "static (or no --ip6-mode) when --ip6 is given",
            ));
        }
        (Some("slaac"), None) => V6::Slaac,
        (Some("dhcp6"), None) => V6::Dhcp6,
        (Some(m), _) => return Err(bad("ip6-mode", m, allowed_modes)),
        (None, None) => V6::Off,
    };
    let Some(g) = a.gateway6.as_deref() else {
        return Ok(v6);
    };
    let V6::Static { ip, .. } = v6 else {
        return Err(bad(
            "gateway6",
            g,
            "only with --ip6 (router advertisements bring the IPv6 router)",
        ));
    };
    let gw: Ipv6Addr = g
        .parse()
        .map_err(|_| bad("gateway6", g, "an IPv6 address"))?;
    if gw.is_unspecified() || gw.is_multicast() || gw.is_loopback() || gw == ip.addr() {
        return Err(bad(
            "gateway6",
            g,
            "a unicast router address other than --ip6 (link-local is fine)",
        ));
    }
    Ok(V6::Static {
        ip,
        gateway: Some(gw),
    })
}

impl TryFrom<&GuestRequest> for GuestConfig {
    type Error = GuestConfigError;
    fn try_from(a: &GuestRequest) -> Result<Self, GuestConfigError> {
        let mac = MacAddr::try_from(a.mac.as_str())
            .map_err(|e| bad("mac", a.mac.as_str(), e.to_string()))?;
        let name = ifname(&a.name)?;
        let table = a.table.map(RouteTable::try_from).transpose()?;
        let v6 = parse_v6(a)?;
        let v4 = match a.ip.as_deref() {
            None => {
                if let Some(g) = &a.gateway {
                    return Err(bad(
                        "gateway",
                        g.as_str(),
                        "only with --ip (DHCP brings its own router)",
                    ));
                }
                V4::Dhcp
            }
            Some(ip_s) => {
                let ip = Ipv4Cidr::try_from(ip_s)?;
                let gateway = a
                    .gateway
                    .as_deref()
                    .map(|g| {
                        let gw: Ipv4Addr = g
                            .parse()
                            .map_err(|_| bad("gateway", g, "an IPv4 address"))?;
                        if !ip.contains(gw) || gw == ip.addr() {
                            return Err(bad(
                                "gateway",
                                g,
                                format!("another address inside {}", ip.network()),
                            ));
                        }
                        Ok(gw)
                    })
                    .transpose()?;
                match (gateway, table) {
                    (None, Some(t)) => {
                        return Err(bad(
                            "table",
                            t.get().to_string(),
                            "with --ip, needs --gateway: the table's default route goes through it",
                        ));
                    }
                    (Some(g), None) if !a.default_route => {
                        return Err(bad(
                            "gateway",
                            g.to_string(),
                            "needs --default (the main default route) or --table (the NIC's own \
                             table): a NIC without --default never takes the default route",
                        ));
                    }
                    (None, None) if a.default_route => {
                        return Err(bad(
                            "default",
                            "true",
                            "with --ip, needs --gateway: the default route goes through it",
                        ));
                    }
                    _ => {}
                }
                V4::Static { ip, gateway }
            }
        };
        Ok(GuestConfig {
            mac,
            name,
            v4,
            v6,
            table,
            default_route: a.default_route,
        })
    }
}

/// One file for the guest: where it goes, its mode, and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits (`0o600` for files NetworkManager and netplan
    /// refuse or warn about when others can read them).
    pub mode: u32,
    /// What the file is for, one line (shown in the CLI's header).
    pub purpose: String,
    /// The content, ending in a newline.
    pub content: String,
}

/// Validates the request and renders every file.
pub fn files(a: &GuestRequest) -> Result<Vec<GuestFile>, GuestConfigError> {
    Ok(render_files(&GuestConfig::try_from(a)?))
}

/// Validates the request and renders every file as one text, each file
/// under a `# ==> PATH <==` header (the CLI's output).
pub fn run(a: &GuestRequest) -> Result<String, GuestConfigError> {
    Ok(render(&GuestConfig::try_from(a)?))
}

/// Every file for `c`, interface files first, then sysctl, then policy
/// routing.
pub fn render_files(c: &GuestConfig) -> Vec<GuestFile> {
    let mut v = vec![
        formats::ifcfg(c),
        formats::debian(c),
        formats::netplan(c),
        formats::keyfile(c),
        formats::networkd(c),
        formats::sysctl(c),
    ];
    v.extend(formats::ifcfg_policy(c));
    v.extend(formats::debian_dhclient_enter(c));
    v.extend(hooks::render(c));
    v
}

/// All the guest-side text, each file under a header naming its path and
/// mode.
pub fn render(c: &GuestConfig) -> String {
    let mut out = String::new();
    for (i, f) in render_files(c).iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "# ==> {} <== mode {:04o}; {}",
            f.path, f.mode, f.purpose
        );
        out.push_str(&f.content);
    }
    out
}

#[cfg(test)]
mod tests;
