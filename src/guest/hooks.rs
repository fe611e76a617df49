//! Policy routing for a secondary NIC: the commands for a static address,
//! and for a DHCP address the hooks that add the rule when the lease
//! arrives and remove it when it goes. Every hook wraps the same two shell
//! functions ([`functions`]), so the four DHCP clients cannot disagree on
//! what the table holds.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::{GuestConfig, GuestFile, Ipv4Cidr, RouteTable};

macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
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

/// Every policy-routing file for `c`: none without `--table`.
pub fn render(c: &GuestConfig) -> Vec<GuestFile> {
    let n = &c.name;
    let mut v = Vec::new();
    let Some(t) = c.table else {
        return v;
    };
    v.push(GuestFile {
        path: format!("/etc/iproute2/rt_tables.d/nic-agent-{n}.conf"),
        mode: 0o644,
        purpose: "a name for the table in `ip` output (optional: numbers work)".into(),
        content: format!("{} nic-agent-{n}\n", t.get()),
    });
    if let Some((ip, gw, t)) = c.static_policy() {
        let mut o = String::from("#!/bin/sh\n");
        line!(o, "set -e");
        for l in routing_lines(n, ip, gw, t) {
            line!(o, "{l}");
        }
        v.push(GuestFile {
            path: format!("/usr/local/sbin/nic-agent-routing-{n}"),
            mode: 0o755,
            purpose: format!(
                "policy routing for {n}: run as root when no interface file above does it"
            ),
            content: o,
        });
    }
    if let Some(t) = c.dhcp_policy() {
        v.push(nm_dispatcher(c, t));
        v.push(dhclient_exit(c, t));
        for state in ["routable", "off", "no-carrier", "degraded"] {
            v.push(networkd_dispatcher(c, t, state));
        }
        v.push(udhcpc(c, t));
    }
    v
}

/// `nic_agent_up ADDR [ROUTER]` and `nic_agent_down`: the table's routes
/// and the rule, for the lease's address. The connected route is copied
/// from the main table (the kernel made it when the address was added),
/// so no subnet arithmetic in shell. `down` works without the old address:
/// it removes every rule pointing at the NIC's own table.
fn functions(c: &GuestConfig, t: RouteTable) -> String {
    let n = &c.name;
    let t = t.get();
    let mut o = String::new();
    line!(
        o,
        "# Policy routing for {n}, table {t}: traffic from {n}'s leased address leaves through {n}."
    );
    line!(o, "nic_agent_down() {{");
    line!(o, "\twhile ip rule del lookup {t} 2>/dev/null; do :; done");
    line!(o, "\tip route flush table {t} 2>/dev/null || true");
    line!(o, "}}");
    line!(o, "nic_agent_up() {{");
    line!(o, "\tnic_agent_down");
    line!(
        o,
        "\tip -4 route show table main dev {n} proto kernel scope link | while read -r net _; do"
    );
    line!(
        o,
        "\t\tip route replace \"$net\" dev {n} src \"$1\" table {t}"
    );
    line!(o, "\tdone");
    line!(o, "\tif [ -n \"${{2:-}}\" ]; then");
    line!(
        o,
        "\t\tip route replace default via \"$2\" dev {n} table {t}"
    );
    line!(o, "\tfi");
    line!(o, "\tip rule add from \"$1\" lookup {t}");
    line!(o, "}}");
    o
}

/// The shared functions, for the test that every hook carries them.
#[cfg(test)]
pub(super) fn functions_for_test(c: &GuestConfig) -> String {
    functions(c, c.table.expect("a table"))
}

fn nm_dispatcher(c: &GuestConfig, t: RouteTable) -> GuestFile {
    let n = &c.name;
    let mut o = String::from("#!/bin/sh\n");
    line!(
        o,
        "# NetworkManager dispatcher: $1 is the interface, $2 the action."
    );
    line!(o, "[ \"$1\" = \"{n}\" ] || exit 0");
    o.push_str(&functions(c, t));
    line!(o, "case \"$2\" in");
    line!(o, "up|dhcp4-change)");
    line!(
        o,
        "\t[ -n \"${{DHCP4_IP_ADDRESS:-}}\" ] && nic_agent_up \"$DHCP4_IP_ADDRESS\" \"${{DHCP4_ROUTERS%% *}}\" ;;"
    );
    line!(o, "down|pre-down) nic_agent_down ;;");
    line!(o, "esac");
    line!(o, "exit 0");
    GuestFile {
        path: format!("/etc/NetworkManager/dispatcher.d/60-nic-agent-{n}"),
        mode: 0o755,
        purpose: "NetworkManager (RHEL 8/9, ifcfg or keyfile): rule follows the DHCP lease".into(),
        content: o,
    }
}

fn dhclient_exit(c: &GuestConfig, t: RouteTable) -> GuestFile {
    let n = &c.name;
    let mut o = String::new();
    line!(
        o,
        "# Sourced by dhclient-script (Debian ifupdown): it must not end that script or set -e."
    );
    line!(o, "if [ \"$interface\" = \"{n}\" ]; then");
    o.push_str(&functions(c, t));
    line!(o, "case \"$reason\" in");
    line!(o, "BOUND|RENEW|REBIND|REBOOT)");
    // Without --default the enter hook moved the router aside.
    line!(
        o,
        "\tnic_agent_up \"$new_ip_address\" \"${{nic_agent_router:-${{new_routers%% *}}}}\" ;;"
    );
    line!(o, "EXPIRE|FAIL|RELEASE|STOP) nic_agent_down ;;");
    line!(o, "esac");
    line!(o, "fi");
    GuestFile {
        path: format!(
            "/etc/dhcp/dhclient-exit-hooks.d/nic-agent-{}",
            super::run_parts_name(n)
        ),
        mode: 0o644,
        purpose: "Debian ifupdown (dhclient): rule follows the DHCP lease".into(),
        content: o,
    }
}

/// networkd-dispatcher runs `STATE.d/*` with `IFACE` and `STATE` set. The
/// lease file networkd keeps per ifindex has the address and the router
/// even when `UseGateway=no` kept the router out of the main table.
fn networkd_dispatcher(c: &GuestConfig, t: RouteTable, state: &str) -> GuestFile {
    let n = &c.name;
    let mut o = String::from("#!/bin/sh\n");
    line!(
        o,
        "# networkd-dispatcher: the same script in routable.d, off.d, no-carrier.d, degraded.d."
    );
    line!(o, "[ \"$IFACE\" = \"{n}\" ] || exit 0");
    o.push_str(&functions(c, t));
    line!(
        o,
        "lease=/run/systemd/netif/leases/$(cat /sys/class/net/{n}/ifindex 2>/dev/null)"
    );
    line!(o, "addr=$(sed -n 's/^ADDRESS=//p' \"$lease\" 2>/dev/null)");
    line!(
        o,
        "router=$(sed -n 's/^ROUTER=//p' \"$lease\" 2>/dev/null | cut -d' ' -f1)"
    );
    line!(o, "if [ \"$STATE\" = routable ] && [ -n \"$addr\" ]; then");
    line!(o, "\tnic_agent_up \"$addr\" \"$router\"");
    line!(o, "else");
    line!(o, "\tnic_agent_down");
    line!(o, "fi");
    GuestFile {
        path: format!("/etc/networkd-dispatcher/{state}.d/60-nic-agent-{n}"),
        mode: 0o755,
        purpose: "systemd-networkd (networkd-dispatcher): rule follows the DHCP lease".into(),
        content: o,
    }
}

/// busybox udhcpc: `-s` replaces the default script, so this one also
/// applies the lease (address; the default route only with `--default`).
fn udhcpc(c: &GuestConfig, t: RouteTable) -> GuestFile {
    let n = &c.name;
    let mut o = String::from("#!/bin/sh\n");
    line!(
        o,
        "# udhcpc -i {n} -s THIS: $1 is the event; interface, ip, mask, router come from udhcpc."
    );
    line!(o, "# shellcheck disable=SC2154");
    line!(o, "[ \"$interface\" = \"{n}\" ] || exit 0");
    o.push_str(&functions(c, t));
    line!(o, "case \"$1\" in");
    line!(o, "deconfig)");
    line!(o, "\tnic_agent_down");
    line!(o, "\tip -4 addr flush dev {n} scope global ;;");
    line!(o, "bound|renew)");
    line!(o, "\tip -4 addr flush dev {n} scope global");
    line!(o, "\tip addr add \"$ip/${{mask:-24}}\" dev {n}");
    if c.default_route {
        line!(o, "\tif [ -n \"${{router:-}}\" ]; then");
        line!(
            o,
            "\t\tip route replace default via \"${{router%% *}}\" dev {n} metric {}",
            super::DEFAULT_ROUTE_METRIC
        );
        line!(o, "\tfi");
    }
    line!(o, "\tnic_agent_up \"$ip\" \"${{router%% *}}\" ;;");
    line!(o, "esac");
    line!(o, "exit 0");
    GuestFile {
        path: format!("/usr/share/udhcpc/nic-agent-{n}.script"),
        mode: 0o755,
        purpose: format!("busybox udhcpc: run udhcpc -i {n} -s THIS_FILE"),
        content: o,
    }
}
