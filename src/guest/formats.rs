//! The interface files, one function per format, all from one
//! [`GuestConfig`]: RHEL ifcfg, Debian ifupdown, netplan, NetworkManager
//! keyfile, systemd-networkd, and the per-NIC sysctl.

use std::fmt::Write as _;

use super::{GuestConfig, GuestFile, DEFAULT_ROUTE_METRIC, V4, V6};

/// Appends one line (the renderers only write to a `String`, which cannot
/// fail).
macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

fn file(path: String, mode: u32, purpose: &str, content: String) -> GuestFile {
    GuestFile {
        path,
        mode,
        purpose: purpose.to_string(),
        content,
    }
}

/// RHEL/CentOS/Rocky ifcfg. On RHEL 8/9 NetworkManager reads it (ifcfg-rh
/// plugin), so `NM_CONTROLLED=yes` is written out: a `no` there would
/// leave the NIC to the removed network-scripts and nothing would bring
/// it up.
pub fn ifcfg(c: &GuestConfig) -> GuestFile {
    let mut o = String::new();
    line!(o, "# {}", c.metric_note());
    line!(o, "DEVICE={}", c.name);
    line!(o, "HWADDR={}", c.mac);
    line!(o, "TYPE=Ethernet");
    line!(o, "ONBOOT=yes");
    line!(o, "NM_CONTROLLED=yes");
    match c.v4 {
        V4::Dhcp => {
            line!(o, "BOOTPROTO=dhcp");
            line!(o, "PERSISTENT_DHCLIENT=yes");
        }
        V4::Static { ip, .. } => {
            line!(o, "BOOTPROTO=none");
            line!(o, "IPADDR={}", ip.addr());
            line!(o, "PREFIX={}", ip.prefix());
        }
    }
    if let Some(g) = c.default_gw4() {
        line!(o, "GATEWAY={g}");
    }
    if c.default_route {
        line!(o, "DEFROUTE=yes");
        line!(o, "IPV4_ROUTE_METRIC={DEFAULT_ROUTE_METRIC}");
    } else {
        line!(o, "DEFROUTE=no");
    }
    match c.v6 {
        V6::Off => line!(o, "IPV6INIT=no"),
        V6::Slaac | V6::Dhcp6 | V6::Static { .. } => {
            line!(o, "IPV6INIT=yes");
            line!(
                o,
                "IPV6_AUTOCONF={}",
                if c.v6 == V6::Slaac { "yes" } else { "no" }
            );
            if c.v6 == V6::Dhcp6 {
                line!(o, "DHCPV6C=yes");
            }
            if let V6::Static { ip, .. } = c.v6 {
                line!(o, "IPV6ADDR={ip}");
            }
            if let Some(g) = c.default_gw6() {
                line!(o, "IPV6_DEFAULTGW={g}%{}", c.name);
            }
            if c.default_route {
                line!(o, "IPV6_DEFROUTE=yes");
                line!(o, "IPV6_ROUTE_METRIC={DEFAULT_ROUTE_METRIC}");
            } else {
                line!(o, "IPV6_DEFROUTE=no");
            }
        }
    }
    file(
        format!("/etc/sysconfig/network-scripts/ifcfg-{}", c.name),
        0o644,
        "RHEL-family (NetworkManager ifcfg-rh or network-scripts)",
        o,
    )
}

/// ifcfg's own policy routing for a static address: `route-NAME` and
/// `rule-NAME` in `ip` syntax, read by both ifcfg-rh and network-scripts.
pub fn ifcfg_policy(c: &GuestConfig) -> Vec<GuestFile> {
    let Some((ip, gw, t)) = c.static_policy() else {
        return Vec::new();
    };
    let t = t.get();
    let n = &c.name;
    vec![
        file(
            format!("/etc/sysconfig/network-scripts/route-{n}"),
            0o644,
            "RHEL-family: the routes of this NIC's table",
            format!(
                "{} dev {n} src {} table {t}\ndefault via {gw} dev {n} table {t}\n",
                ip.network(),
                ip.addr()
            ),
        ),
        file(
            format!("/etc/sysconfig/network-scripts/rule-{n}"),
            0o644,
            "RHEL-family: the rule sending this NIC's traffic to its table",
            format!("from {} table {t}\n", ip.addr()),
        ),
    ]
}

/// Debian/Ubuntu ifupdown.
pub fn debian(c: &GuestConfig) -> GuestFile {
    let n = &c.name;
    let mut o = String::new();
    line!(o, "# {}", c.metric_note());
    line!(o, "auto {n}");
    line!(o, "allow-hotplug {n}");
    match c.v4 {
        V4::Dhcp => {
            line!(o, "iface {n} inet dhcp");
            if c.default_route {
                line!(o, "    metric {DEFAULT_ROUTE_METRIC}");
            }
        }
        V4::Static { ip, .. } => {
            line!(o, "iface {n} inet static");
            line!(o, "    address {ip}");
            if let Some(g) = c.default_gw4() {
                line!(o, "    gateway {g}");
                line!(o, "    metric {DEFAULT_ROUTE_METRIC}");
            }
            if let Some((ip, gw, t)) = c.static_policy() {
                for l in super::hooks::routing_lines(n, ip, gw, t) {
                    line!(o, "    post-up {l}");
                }
            }
        }
    }
    match c.v6 {
        V6::Off => {}
        // The kernel does SLAAC here; without --default the sysctl file
        // sets accept_ra_defrtr=0 so the RA brings no default route.
        V6::Slaac => line!(o, "iface {n} inet6 auto"),
        V6::Dhcp6 => line!(o, "iface {n} inet6 dhcp"),
        V6::Static { ip, .. } => {
            line!(o, "iface {n} inet6 static");
            line!(o, "    address {ip}");
            if let Some(g) = c.default_gw6() {
                line!(o, "    gateway {g}");
            }
        }
    }
    file(
        format!("/etc/network/interfaces.d/{n}"),
        0o644,
        "Debian/Ubuntu ifupdown",
        o,
    )
}

/// ifupdown's dhclient installs the lease's router as the default route;
/// for a NIC without `--default` this enter hook keeps the router aside
/// (the exit hook of the policy routing still sees it) so it never does.
pub fn debian_dhclient_enter(c: &GuestConfig) -> Option<GuestFile> {
    if c.v4 != V4::Dhcp || c.default_route {
        return None;
    }
    let n = &c.name;
    let mut o = String::new();
    line!(
        o,
        "# Sourced by dhclient-script: {n} must not take the default route."
    );
    line!(o, "if [ \"$interface\" = \"{n}\" ]; then");
    line!(o, "    nic_agent_router=\"${{new_routers%% *}}\"");
    line!(o, "    unset new_routers");
    line!(o, "fi");
    Some(file(
        format!(
            "/etc/dhcp/dhclient-enter-hooks.d/nic-agent-{}",
            super::run_parts_name(n)
        ),
        0o644,
        "Debian ifupdown: no default route from this NIC's lease",
        o,
    ))
}

/// netplan (Ubuntu), matched by MAC.
pub fn netplan(c: &GuestConfig) -> GuestFile {
    let n = &c.name;
    let mut o = String::new();
    line!(o, "# {}", c.metric_note());
    line!(o, "network:");
    line!(o, "  version: 2");
    line!(o, "  ethernets:");
    line!(o, "    {n}:");
    line!(o, "      match:");
    line!(o, "        macaddress: \"{}\"", c.mac);
    line!(o, "      set-name: {n}");
    let mut addrs = Vec::new();
    match c.v4 {
        V4::Dhcp => {
            line!(o, "      dhcp4: true");
            line!(o, "      dhcp4-overrides:");
            if c.default_route {
                line!(o, "        route-metric: {DEFAULT_ROUTE_METRIC}");
            } else {
                line!(o, "        use-routes: false");
            }
        }
        V4::Static { ip, .. } => {
            line!(o, "      dhcp4: false");
            addrs.push(ip.to_string());
        }
    }
    match c.v6 {
        V6::Off => {
            line!(o, "      dhcp6: false");
            line!(o, "      accept-ra: false");
            line!(o, "      link-local: []");
        }
        V6::Slaac => {
            line!(o, "      dhcp6: false");
            line!(o, "      accept-ra: true");
            if !c.default_route {
                line!(
                    o,
                    "      # netplan 0.106 has no switch to ignore the RA's default route; \
                     use the networkd or NetworkManager file to keep it off this NIC"
                );
            }
        }
        V6::Dhcp6 => {
            line!(o, "      dhcp6: true");
            line!(o, "      accept-ra: true");
            line!(o, "      dhcp6-overrides:");
            if c.default_route {
                line!(o, "        route-metric: {DEFAULT_ROUTE_METRIC}");
            } else {
                line!(o, "        use-routes: false");
            }
        }
        V6::Static { ip, .. } => {
            line!(o, "      dhcp6: false");
            line!(o, "      accept-ra: false");
            addrs.push(ip.to_string());
        }
    }
    if !addrs.is_empty() {
        let quoted: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        line!(o, "      addresses: [{}]", quoted.join(", "));
    }
    let mut routes = String::new();
    if let Some(g) = c.default_gw4() {
        line!(routes, "        - to: default");
        line!(routes, "          via: {g}");
        line!(routes, "          metric: {DEFAULT_ROUTE_METRIC}");
    }
    if let Some(g) = c.default_gw6() {
        line!(routes, "        - to: \"::/0\"");
        line!(routes, "          via: \"{g}\"");
        line!(routes, "          metric: {DEFAULT_ROUTE_METRIC}");
        if super::is_link_local6(g) {
            line!(routes, "          on-link: true");
        }
    }
    let mut policy = String::new();
    if let Some((ip, gw, t)) = c.static_policy() {
        let t = t.get();
        line!(routes, "        - to: default");
        line!(routes, "          via: {gw}");
        line!(routes, "          table: {t}");
        line!(routes, "        - to: {}", ip.network());
        line!(routes, "          scope: link");
        line!(routes, "          table: {t}");
        line!(policy, "        - from: {}", ip.addr());
        line!(policy, "          table: {t}");
    }
    if !routes.is_empty() {
        line!(o, "      routes:");
        o.push_str(&routes);
    }
    if !policy.is_empty() {
        line!(o, "      routing-policy:");
        o.push_str(&policy);
    }
    if let Some(t) = c.dhcp_policy() {
        line!(
            o,
            "      # table {}: the rule follows the lease through the networkd-dispatcher \
             (or NetworkManager dispatcher) hook",
            t.get()
        );
    }
    file(
        format!("/etc/netplan/60-{n}.yaml"),
        0o600,
        "netplan (netplan warns when others can read it)",
        o,
    )
}

/// A stable UUID for the keyfile, from the MAC: the same NIC renders the
/// same connection, so re-rendering replaces it instead of adding one.
fn uuid_from_mac(c: &GuestConfig) -> String {
    let hex: String = c.mac.to_string().replace(':', "");
    // "nic-ag" in ASCII, version 4 and variant bits set so tools accept it.
    format!("6e69632d-6167-4e74-8000-{hex}")
}

/// NetworkManager keyfile, matched by MAC. NetworkManager ignores a
/// keyfile that others can read, hence mode 0600.
pub fn keyfile(c: &GuestConfig) -> GuestFile {
    let n = &c.name;
    let mut o = String::new();
    line!(o, "# {}", c.metric_note());
    line!(o, "[connection]");
    line!(o, "id={n}");
    line!(o, "uuid={}", uuid_from_mac(c));
    line!(o, "type=ethernet");
    line!(o, "autoconnect=true");
    o.push('\n');
    line!(o, "[ethernet]");
    line!(o, "mac-address={}", c.mac.to_string().to_uppercase());
    o.push('\n');
    line!(o, "[ipv4]");
    match c.v4 {
        V4::Dhcp => line!(o, "method=auto"),
        V4::Static { ip, .. } => {
            line!(o, "method=manual");
            line!(o, "address1={ip}");
        }
    }
    if let Some(g) = c.default_gw4() {
        line!(o, "gateway={g}");
    }
    if c.default_route {
        line!(o, "route-metric={DEFAULT_ROUTE_METRIC}");
    } else {
        line!(o, "never-default=true");
    }
    if let Some((ip, gw, t)) = c.static_policy() {
        let t = t.get();
        line!(o, "route1=0.0.0.0/0,{gw}");
        line!(o, "route1_options=table={t}");
        line!(o, "route2={}", ip.network());
        line!(o, "route2_options=table={t}");
        line!(
            o,
            "routing-rule1=priority {} from {} table {t}",
            1000 + u32::from(t),
            ip.addr()
        );
    }
    o.push('\n');
    line!(o, "[ipv6]");
    match c.v6 {
        V6::Off => line!(o, "method=disabled"),
        V6::Slaac => line!(o, "method=auto"),
        V6::Dhcp6 => line!(o, "method=dhcp"),
        V6::Static { ip, .. } => {
            line!(o, "method=manual");
            line!(o, "address1={ip}");
        }
    }
    if c.v6 != V6::Off {
        if let Some(g) = c.default_gw6() {
            line!(o, "gateway={g}");
        }
        if c.default_route {
            line!(o, "route-metric={DEFAULT_ROUTE_METRIC}");
        } else {
            line!(o, "never-default=true");
        }
    }
    file(
        format!("/etc/NetworkManager/system-connections/{n}.nmconnection"),
        0o600,
        "NetworkManager keyfile (ignored unless mode 0600, owner root)",
        o,
    )
}

/// systemd-networkd `.network`, matched by MAC. networkd does not rename;
/// the name comes from udev (or a `.link` file).
pub fn networkd(c: &GuestConfig) -> GuestFile {
    let n = &c.name;
    let mut o = String::new();
    line!(o, "# {}", c.metric_note());
    line!(o, "[Match]");
    line!(o, "MACAddress={}", c.mac);
    o.push('\n');
    line!(o, "[Network]");
    let dhcp = match (c.v4, c.v6) {
        (V4::Dhcp, V6::Dhcp6) => "yes",
        (V4::Dhcp, _) => "ipv4",
        (_, V6::Dhcp6) => "ipv6",
        _ => "no",
    };
    line!(o, "DHCP={dhcp}");
    if let V4::Static { ip, .. } = c.v4 {
        line!(o, "Address={ip}");
    }
    if let V6::Static { ip, .. } = c.v6 {
        line!(o, "Address={ip}");
    }
    match c.v6 {
        V6::Off => {
            line!(o, "LinkLocalAddressing=no");
            line!(o, "IPv6AcceptRA=no");
        }
        V6::Slaac | V6::Dhcp6 => line!(o, "IPv6AcceptRA=yes"),
        V6::Static { .. } => line!(o, "IPv6AcceptRA=no"),
    }
    for g in c
        .default_gw4()
        .map(|g| g.to_string())
        .into_iter()
        .chain(c.default_gw6().map(|g| g.to_string()))
    {
        o.push('\n');
        line!(o, "[Route]");
        line!(o, "Gateway={g}");
        line!(o, "Metric={DEFAULT_ROUTE_METRIC}");
    }
    if let Some((ip, gw, t)) = c.static_policy() {
        let t = t.get();
        o.push('\n');
        line!(o, "[Route]");
        line!(o, "Gateway={gw}");
        line!(o, "Table={t}");
        o.push('\n');
        line!(o, "[Route]");
        line!(o, "Destination={}", ip.network());
        line!(o, "Scope=link");
        line!(o, "Table={t}");
        o.push('\n');
        line!(o, "[RoutingPolicyRule]");
        line!(o, "From={}", ip.addr());
        line!(o, "Table={t}");
    }
    if c.v4 == V4::Dhcp {
        o.push('\n');
        line!(o, "[DHCPv4]");
        if c.default_route {
            line!(o, "RouteMetric={DEFAULT_ROUTE_METRIC}");
        } else {
            line!(o, "UseGateway=no");
        }
    }
    if matches!(c.v6, V6::Slaac | V6::Dhcp6) {
        o.push('\n');
        line!(o, "[IPv6AcceptRA]");
        if c.default_route {
            line!(o, "RouteMetric={DEFAULT_ROUTE_METRIC}");
        } else {
            line!(o, "UseGateway=no");
        }
    }
    file(
        format!("/etc/systemd/network/60-{n}.network"),
        0o644,
        "systemd-networkd",
        o,
    )
}

/// Loose reverse-path filtering on this NIC. Written with `/` separators
/// so a name with a dot (`eth1.100`) is not read as a sysctl path level.
pub fn sysctl(c: &GuestConfig) -> GuestFile {
    let n = &c.name;
    let mut o = String::new();
    line!(
        o,
        "# Loose rp_filter: replies for {n} may be routed via another NIC, and strict (1) would drop them."
    );
    line!(
        o,
        "# The kernel uses the higher of conf.all and conf.{n}, so 2 here wins; udev applies it when {n} appears."
    );
    line!(o, "net/ipv4/conf/{n}/rp_filter = 2");
    if !c.default_route && matches!(c.v6, V6::Slaac | V6::Dhcp6) {
        line!(
            o,
            "# Kernel SLAAC (ifupdown): take addresses, not the default route, from {n}'s RAs."
        );
        line!(o, "net/ipv6/conf/{n}/accept_ra_defrtr = 0");
    }
    file(
        format!("/etc/sysctl.d/90-nic-agent-{n}.conf"),
        0o644,
        "sysctl (apply now: sysctl -p FILE)",
        o,
    )
}
