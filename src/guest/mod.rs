//! The guest-side files an operator writes after a hot-plug, generated
//! instead of typed by hand. Pure: no libvirt, no host access, so the CLI's
//! `guest-config` and any RPC render from the same model.
//!
//! A hot-plugged NIC comes up in the guest unconfigured. Each distribution
//! wants its own file (RHEL ifcfg, Debian ifupdown, netplan), and a
//! *secondary* interface also needs policy routing: without it, replies to
//! traffic that arrived on the new NIC leave through the default route's
//! NIC (asymmetric routing), and strict rp_filter on either side drops
//! them. So a static address with `--table` also gets its own routing
//! table (connected route + default via the NIC's gateway) and a rule that
//! sends everything from the NIC's address to that table.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

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
    /// Routing table for the NIC's policy routing, 1-252 (with `ip`).
    pub table: Option<u32>,
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

impl TryFrom<&str> for Ipv4Cidr {
    type Error = GuestConfigError;
    fn try_from(s: &str) -> Result<Self, GuestConfigError> {
        let allowed = "an IPv4 address with prefix length, e.g. 10.0.1.5/24 (prefix 1-32)";
        let (a, p) = s.split_once('/').ok_or_else(|| bad("ip", s, allowed))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad("ip", s, allowed))?;
        let prefix: u8 = if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse().map_err(|_| bad("ip", s, allowed))?
        } else {
            return Err(bad("ip", s, allowed));
        };
        if !(1..=32).contains(&prefix) {
            return Err(bad("ip", s, allowed));
        }
        if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() || addr.is_loopback()
        {
            return Err(bad("ip", s, "a unicast host address"));
        }
        Ok(Ipv4Cidr { addr, prefix })
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
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(bad(
            "name",
            s,
            "an interface name, 1-15 of A-Z a-z 0-9 _ . -",
        ))
    }
}

/// Static addressing, and policy routing when a table is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticIp {
    /// Address and prefix.
    pub ip: Ipv4Cidr,
    /// The NIC's gateway, in the address's subnet.
    pub gateway: Option<Ipv4Addr>,
    /// The NIC's own routing table.
    pub table: Option<RouteTable>,
}

/// A validated `guest-config` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// The NIC's MAC.
    pub mac: MacAddr,
    /// Interface name in the guest.
    pub name: String,
    /// `None` means DHCP.
    pub addressing: Option<StaticIp>,
}

impl TryFrom<&GuestRequest> for GuestConfig {
    type Error = GuestConfigError;
    fn try_from(a: &GuestRequest) -> Result<Self, GuestConfigError> {
        let mac = MacAddr::try_from(a.mac.as_str())
            .map_err(|e| bad("mac", a.mac.as_str(), e.to_string()))?;
        let name = ifname(&a.name)?;
        let Some(ip_s) = a.ip.as_deref() else {
            if let Some(g) = &a.gateway {
                return Err(bad(
                    "gateway",
                    g.as_str(),
                    "only with --ip (DHCP brings its own router)",
                ));
            }
            if let Some(t) = a.table {
                return Err(bad("table", t.to_string(), "only with --ip and --gateway"));
            }
            return Ok(GuestConfig {
                mac,
                name,
                addressing: None,
            });
        };
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
        let table = a.table.map(RouteTable::try_from).transpose()?;
        if let (Some(t), None) = (table, gateway) {
            return Err(bad(
                "table",
                t.get().to_string(),
                "needs --gateway: the table's default route goes through it",
            ));
        }
        Ok(GuestConfig {
            mac,
            name,
            addressing: Some(StaticIp { ip, gateway, table }),
        })
    }
}

/// Validates the request and renders every file.
pub fn run(a: &GuestRequest) -> Result<String, GuestConfigError> {
    Ok(render(&GuestConfig::try_from(a)?))
}

fn header(out: &mut String, what: &str) {
    let _ = writeln!(out, "# ==> {what} <==");
}

/// All the guest-side text, each part under a header naming its file.
pub fn render(c: &GuestConfig) -> String {
    let mut out = String::new();
    ifcfg(&mut out, c);
    out.push('\n');
    debian(&mut out, c);
    out.push('\n');
    netplan(&mut out, c);
    if let Some(StaticIp {
        ip,
        gateway: Some(gw),
        table: Some(t),
    }) = c.addressing
    {
        out.push('\n');
        policy_routing(&mut out, &c.name, ip, gw, t);
    }
    out
}

fn ifcfg(out: &mut String, c: &GuestConfig) {
    header(
        out,
        &format!("/etc/sysconfig/network-scripts/ifcfg-{}", c.name),
    );
    let _ = writeln!(out, "DEVICE={}", c.name);
    let _ = writeln!(out, "HWADDR={}", c.mac);
    let _ = writeln!(out, "TYPE=Ethernet");
    let _ = writeln!(out, "ONBOOT=yes");
    match &c.addressing {
        None => {
            let _ = writeln!(out, "BOOTPROTO=dhcp");
            let _ = writeln!(out, "PERSISTENT_DHCLIENT=yes");
            // A secondary NIC must not take over the default route.
            let _ = writeln!(out, "DEFROUTE=no");
        }
        Some(s) => {
            let _ = writeln!(out, "BOOTPROTO=static");
            let _ = writeln!(out, "IPADDR={}", s.ip.addr());
            let _ = writeln!(out, "PREFIX={}", s.ip.prefix());
            match (s.gateway, s.table) {
                // The gateway lives in the NIC's own table (see the policy
                // routing part), not in the main default route.
                (Some(_), Some(_)) | (None, _) => {
                    let _ = writeln!(out, "DEFROUTE=no");
                }
                (Some(g), None) => {
                    let _ = writeln!(out, "GATEWAY={g}");
                }
            }
        }
    }
}

fn debian(out: &mut String, c: &GuestConfig) {
    header(out, &format!("/etc/network/interfaces.d/{}", c.name));
    let n = &c.name;
    let _ = writeln!(out, "auto {n}");
    let _ = writeln!(out, "allow-hotplug {n}");
    match &c.addressing {
        None => {
            let _ = writeln!(out, "iface {n} inet dhcp");
        }
        Some(s) => {
            let _ = writeln!(out, "iface {n} inet static");
            let _ = writeln!(out, "    address {}", s.ip);
            match (s.gateway, s.table) {
                (Some(g), Some(t)) => {
                    for l in routing_lines(n, s.ip, g, t) {
                        let _ = writeln!(out, "    post-up {l}");
                    }
                }
                (Some(g), None) => {
                    let _ = writeln!(out, "    gateway {g}");
                }
                (None, _) => {}
            }
        }
    }
}

fn netplan(out: &mut String, c: &GuestConfig) {
    header(out, &format!("/etc/netplan/60-{}.yaml", c.name));
    let _ = writeln!(out, "network:");
    let _ = writeln!(out, "  version: 2");
    let _ = writeln!(out, "  ethernets:");
    let _ = writeln!(out, "    {}:", c.name);
    let _ = writeln!(out, "      match:");
    let _ = writeln!(out, "        macaddress: \"{}\"", c.mac);
    let _ = writeln!(out, "      set-name: {}", c.name);
    match &c.addressing {
        None => {
            let _ = writeln!(out, "      dhcp4: true");
            let _ = writeln!(out, "      dhcp4-overrides:");
            let _ = writeln!(out, "        use-routes: false");
        }
        Some(s) => {
            let _ = writeln!(out, "      dhcp4: false");
            let _ = writeln!(out, "      addresses: [\"{}\"]", s.ip);
            if let Some(g) = s.gateway {
                let _ = writeln!(out, "      routes:");
                let _ = writeln!(out, "        - to: default");
                let _ = writeln!(out, "          via: {g}");
                if let Some(t) = s.table {
                    let _ = writeln!(out, "          table: {}", t.get());
                    let _ = writeln!(out, "        - to: {}", s.ip.network());
                    let _ = writeln!(out, "          scope: link");
                    let _ = writeln!(out, "          table: {}", t.get());
                    let _ = writeln!(out, "      routing-policy:");
                    let _ = writeln!(out, "        - from: {}", s.ip.addr());
                    let _ = writeln!(out, "          table: {}", t.get());
                }
            }
        }
    }
}

/// The three commands that give a secondary NIC its own routing: the
/// connected route and the default route in table `t`, and a rule sending
/// everything from the NIC's address there.
pub fn routing_lines(dev: &str, ip: Ipv4Cidr, gw: Ipv4Addr, t: RouteTable) -> Vec<String> {
    let t = t.get();
    vec![
        format!(
            "ip route add {} dev {dev} src {} table {t}",
            ip.network(),
            ip.addr()
        ),
        format!("ip route add default via {gw} dev {dev} table {t}"),
        format!("ip rule add from {} lookup {t}", ip.addr()),
    ]
}

fn policy_routing(out: &mut String, dev: &str, ip: Ipv4Cidr, gw: Ipv4Addr, t: RouteTable) {
    header(
        out,
        "/etc/iproute2/rt_tables (append; optional for numeric tables)",
    );
    let _ = writeln!(out, "{} table{}", t.get(), t.get());
    out.push('\n');
    header(
        out,
        &format!("policy routing for {dev}: run as root (or from the interface's up hook)"),
    );
    for l in routing_lines(dev, ip, gw, t) {
        let _ = writeln!(out, "{l}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: &str = "52:54:00:ab:cd:01";

    fn args(ip: Option<&str>, gw: Option<&str>, table: Option<u32>) -> GuestRequest {
        GuestRequest {
            mac: MAC.into(),
            name: "eth1".into(),
            ip: ip.map(Into::into),
            gateway: gw.map(Into::into),
            table,
        }
    }

    /// The lines under the header naming `file` (up to the next blank line).
    fn section(out: &str, file: &str) -> Vec<String> {
        let mut lines = out
            .lines()
            .skip_while(|l| !(l.starts_with("# ==> ") && l.contains(file)));
        assert!(lines.next().is_some(), "no header for {file} in:\n{out}");
        lines
            .take_while(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn dhcp_prints_ifcfg_debian_and_netplan_without_routing() {
        let out = run(&args(None, None, None)).expect("ok");
        let ifcfg = section(&out, "/etc/sysconfig/network-scripts/ifcfg-eth1");
        for want in [
            "DEVICE=eth1",
            "HWADDR=52:54:00:ab:cd:01",
            "ONBOOT=yes",
            "BOOTPROTO=dhcp",
            "PERSISTENT_DHCLIENT=yes",
        ] {
            assert!(ifcfg.iter().any(|l| l == want), "{want} missing: {ifcfg:?}");
        }
        assert!(!ifcfg.iter().any(|l| l.starts_with("IPADDR")));
        assert_eq!(
            section(&out, "/etc/network/interfaces.d/eth1"),
            vec!["auto eth1", "allow-hotplug eth1", "iface eth1 inet dhcp"]
        );
        let np = section(&out, "/etc/netplan/60-eth1.yaml").join("\n");
        assert!(
            np.contains(
                "      match:\n        macaddress: \"52:54:00:ab:cd:01\"\n      set-name: eth1"
            ),
            "{np}"
        );
        assert!(np.contains("dhcp4: true"), "{np}");
        assert!(
            !out.contains("ip rule"),
            "no policy routing for DHCP: {out}"
        );
        assert!(!out.contains("rt_tables"));
    }

    #[test]
    fn static_with_table_prints_policy_routing_everywhere() {
        let out = run(&args(Some("10.77.32.88/24"), Some("10.77.32.1"), Some(100))).expect("ok");
        let ifcfg = section(&out, "ifcfg-eth1");
        for want in [
            "BOOTPROTO=static",
            "IPADDR=10.77.32.88",
            "PREFIX=24",
            "DEFROUTE=no",
        ] {
            assert!(ifcfg.iter().any(|l| l == want), "{want} missing: {ifcfg:?}");
        }
        assert!(
            !ifcfg.iter().any(|l| l.starts_with("GATEWAY=")),
            "main default route untouched"
        );
        assert!(!ifcfg.iter().any(|l| l.starts_with("PERSISTENT_DHCLIENT")));
        let lines = vec![
            "ip route add 10.77.32.0/24 dev eth1 src 10.77.32.88 table 100".to_string(),
            "ip route add default via 10.77.32.1 dev eth1 table 100".to_string(),
            "ip rule add from 10.77.32.88 lookup 100".to_string(),
        ];
        assert_eq!(section(&out, "policy routing for eth1"), lines);
        assert_eq!(
            section(&out, "/etc/iproute2/rt_tables"),
            vec!["100 table100"]
        );
        let deb = section(&out, "/etc/network/interfaces.d/eth1");
        assert_eq!(
            deb[2..4],
            ["iface eth1 inet static", "    address 10.77.32.88/24"]
        );
        for l in &lines {
            assert!(deb.contains(&format!("    post-up {l}")), "{deb:?}");
        }
        let np = section(&out, "/etc/netplan/60-eth1.yaml").join("\n");
        for want in [
            "addresses: [\"10.77.32.88/24\"]",
            "- to: default\n          via: 10.77.32.1\n          table: 100",
            "- to: 10.77.32.0/24\n          scope: link\n          table: 100",
            "routing-policy:\n        - from: 10.77.32.88\n          table: 100",
        ] {
            assert!(np.contains(want), "{want} missing:\n{np}");
        }
    }

    #[test]
    fn static_without_table_uses_the_gateway_as_default_route() {
        let out = run(&args(Some("192.168.5.9/26"), Some("192.168.5.1"), None)).expect("ok");
        assert!(section(&out, "ifcfg-eth1").contains(&"GATEWAY=192.168.5.1".to_string()));
        assert!(section(&out, "interfaces.d/eth1").contains(&"    gateway 192.168.5.1".to_string()));
        assert!(!out.contains("ip rule"));
    }

    #[test]
    fn network_is_masked_for_odd_prefixes() {
        let c = Ipv4Cidr::try_from("10.1.2.77/26").expect("ok");
        assert_eq!(c.network().to_string(), "10.1.2.64/26");
        assert!(c.contains("10.1.2.127".parse().expect("ip")));
        assert!(!c.contains("10.1.2.128".parse().expect("ip")));
        let h = Ipv4Cidr::try_from("10.1.2.77/32").expect("ok");
        assert_eq!(h.network().to_string(), "10.1.2.77/32");
    }

    #[test]
    fn bad_inputs_name_their_field() {
        let cases: Vec<(GuestRequest, &str)> = vec![
            (
                GuestRequest {
                    mac: "01:00:5e:00:00:01".into(),
                    ..args(None, None, None)
                },
                "mac",
            ),
            (
                GuestRequest {
                    mac: "zz".into(),
                    ..args(None, None, None)
                },
                "mac",
            ),
            (
                GuestRequest {
                    name: "eth1; rm -rf /".into(),
                    ..args(None, None, None)
                },
                "name",
            ),
            (
                GuestRequest {
                    name: "a-very-long-ifname".into(),
                    ..args(None, None, None)
                },
                "name",
            ),
            (args(Some("10.0.0.5"), None, None), "ip"),
            (args(Some("10.0.0.5/33"), None, None), "ip"),
            (args(Some("10.0.0.5/0"), None, None), "ip"),
            (args(Some("10.0.0.5/+8"), None, None), "ip"),
            (args(Some("10.0.0.256/24"), None, None), "ip"),
            (args(Some("fe80::1/64"), None, None), "ip"),
            (args(Some("224.0.0.1/24"), None, None), "ip"),
            (args(Some("10.0.0.5/24"), Some("10.0.1.1"), None), "gateway"),
            (args(Some("10.0.0.5/24"), Some("10.0.0.5"), None), "gateway"),
            (args(Some("10.0.0.5/24"), Some("gw"), None), "gateway"),
            (args(None, Some("10.0.0.1"), None), "gateway"),
            (args(None, None, Some(100)), "table"),
            (
                args(Some("10.0.0.5/24"), Some("10.0.0.1"), Some(0)),
                "table",
            ),
            (
                args(Some("10.0.0.5/24"), Some("10.0.0.1"), Some(253)),
                "table",
            ),
            (
                args(Some("10.0.0.5/24"), Some("10.0.0.1"), Some(254)),
                "table",
            ),
            (
                args(Some("10.0.0.5/24"), Some("10.0.0.1"), Some(255)),
                "table",
            ),
            (
                args(Some("10.0.0.5/24"), Some("10.0.0.1"), Some(1000)),
                "table",
            ),
            (args(Some("10.0.0.5/24"), None, Some(100)), "table"),
        ];
        for (a, field) in cases {
            let e = run(&a).expect_err(&format!("{a:?} must fail"));
            assert_eq!(e.field, field, "{a:?}: {e}");
            assert!(
                e.to_string().starts_with(&format!("invalid --{field} ")),
                "{e}"
            );
        }
        // The edges that are allowed.
        assert!(run(&args(Some("10.0.0.5/24"), Some("10.0.0.1"), Some(1))).is_ok());
        assert!(run(&args(Some("10.0.0.5/24"), Some("10.0.0.1"), Some(252))).is_ok());
    }
}
