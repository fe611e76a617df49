//! The renderer, format by format, and the validation, flag by flag.

use super::*;

const MAC: &str = "52:54:00:ab:cd:01";

fn args(ip: Option<&str>, gw: Option<&str>, table: Option<u32>) -> GuestRequest {
    GuestRequest {
        mac: MAC.into(),
        name: "eth1".into(),
        ip: ip.map(Into::into),
        gateway: gw.map(Into::into),
        table,
        ..GuestRequest::default()
    }
}

fn get<'a>(fs: &'a [GuestFile], path: &str) -> &'a GuestFile {
    fs.iter().find(|f| f.path == path).unwrap_or_else(|| {
        panic!(
            "no {path} in {:?}",
            fs.iter().map(|f| &f.path).collect::<Vec<_>>()
        )
    })
}

fn lines(f: &GuestFile) -> Vec<&str> {
    f.content.lines().collect()
}

fn has(f: &GuestFile, want: &str) {
    assert!(
        f.content.contains(want),
        "{want:?} missing from {}:\n{}",
        f.path,
        f.content
    );
}

fn hasnt(f: &GuestFile, unwanted: &str) {
    assert!(
        !f.content.contains(unwanted),
        "{unwanted:?} in {}:\n{}",
        f.path,
        f.content
    );
}

const IFCFG: &str = "/etc/sysconfig/network-scripts/ifcfg-eth1";
const DEB: &str = "/etc/network/interfaces.d/eth1";
const NETPLAN: &str = "/etc/netplan/60-eth1.yaml";
const KEYFILE: &str = "/etc/NetworkManager/system-connections/eth1.nmconnection";
const NETWORKD: &str = "/etc/systemd/network/60-eth1.network";
const SYSCTL: &str = "/etc/sysctl.d/90-nic-agent-eth1.conf";

#[test]
fn dhcp_secondary_renders_every_format_without_a_default_route() {
    let fs = files(&args(None, None, None)).expect("ok");
    let ifcfg = get(&fs, IFCFG);
    for want in [
        "DEVICE=eth1",
        "HWADDR=52:54:00:ab:cd:01",
        "ONBOOT=yes",
        "NM_CONTROLLED=yes",
        "BOOTPROTO=dhcp",
        "PERSISTENT_DHCLIENT=yes",
        "DEFROUTE=no",
        "IPV6INIT=no",
    ] {
        assert!(
            lines(ifcfg).contains(&want),
            "{want} missing: {}",
            ifcfg.content
        );
    }
    hasnt(ifcfg, "IPADDR");
    assert_eq!(
        lines(get(&fs, DEB))[1..],
        ["auto eth1", "allow-hotplug eth1", "iface eth1 inet dhcp"]
    );
    let np = get(&fs, NETPLAN);
    assert_eq!(np.mode, 0o600);
    has(
        np,
        "      match:\n        macaddress: \"52:54:00:ab:cd:01\"\n      set-name: eth1",
    );
    has(
        np,
        "dhcp4: true\n      dhcp4-overrides:\n        use-routes: false",
    );
    let kf = get(&fs, KEYFILE);
    assert_eq!(kf.mode, 0o600);
    has(kf, "[ethernet]\nmac-address=52:54:00:AB:CD:01");
    has(kf, "[ipv4]\nmethod=auto\nnever-default=true");
    has(kf, "[ipv6]\nmethod=disabled");
    let nd = get(&fs, NETWORKD);
    has(nd, "[Match]\nMACAddress=52:54:00:ab:cd:01");
    has(nd, "DHCP=ipv4");
    has(nd, "[DHCPv4]\nUseGateway=no");
    // dhclient would install the router as default: the enter hook stops it.
    let enter = get(&fs, "/etc/dhcp/dhclient-enter-hooks.d/nic-agent-eth1");
    has(enter, "unset new_routers");
    // No table: no policy routing anywhere.
    for f in &fs {
        hasnt(f, "ip rule");
        hasnt(f, "Table=");
    }
    assert!(!fs.iter().any(|f| f.path.contains("rt_tables")));
}

#[test]
fn every_format_carries_the_metric_order_comment() {
    for a in [
        args(None, None, None),
        GuestRequest {
            default_route: true,
            ..args(Some("10.0.0.5/24"), Some("10.0.0.1"), None)
        },
    ] {
        let fs = files(&a).expect("ok");
        for p in [IFCFG, DEB, NETPLAN, KEYFILE, NETWORKD] {
            let first = lines(get(&fs, p))[0];
            assert!(
                first.starts_with("# Route metrics: eth1 ") && first.contains("metric 100"),
                "{p}: {first}"
            );
        }
    }
}

#[test]
fn default_nic_holds_the_default_route_at_metric_100_in_every_format() {
    let a = GuestRequest {
        default_route: true,
        ip6: Some("2001:db8::5/64".into()),
        gateway6: Some("fe80::1".into()),
        ..args(Some("10.0.0.5/24"), Some("10.0.0.1"), None)
    };
    let fs = files(&a).expect("ok");
    let ifcfg = get(&fs, IFCFG);
    for want in [
        "GATEWAY=10.0.0.1",
        "DEFROUTE=yes",
        "IPV4_ROUTE_METRIC=100",
        "IPV6INIT=yes",
        "IPV6ADDR=2001:db8::5/64",
        "IPV6_DEFAULTGW=fe80::1%eth1",
        "IPV6_DEFROUTE=yes",
    ] {
        assert!(lines(ifcfg).contains(&want), "{want}: {}", ifcfg.content);
    }
    let deb = get(&fs, DEB);
    has(
        deb,
        "iface eth1 inet static\n    address 10.0.0.5/24\n    gateway 10.0.0.1\n    metric 100",
    );
    has(
        deb,
        "iface eth1 inet6 static\n    address 2001:db8::5/64\n    gateway fe80::1",
    );
    let np = get(&fs, NETPLAN);
    has(np, "addresses: [\"10.0.0.5/24\", \"2001:db8::5/64\"]");
    has(
        np,
        "- to: default\n          via: 10.0.0.1\n          metric: 100",
    );
    has(np, "- to: \"::/0\"\n          via: \"fe80::1\"\n          metric: 100\n          on-link: true");
    let kf = get(&fs, KEYFILE);
    has(
        kf,
        "method=manual\naddress1=10.0.0.5/24\ngateway=10.0.0.1\nroute-metric=100",
    );
    has(
        kf,
        "[ipv6]\nmethod=manual\naddress1=2001:db8::5/64\ngateway=fe80::1\nroute-metric=100",
    );
    hasnt(kf, "never-default");
    let nd = get(&fs, NETWORKD);
    has(nd, "[Route]\nGateway=10.0.0.1\nMetric=100");
    has(nd, "[Route]\nGateway=fe80::1\nMetric=100");
    has(nd, "Address=2001:db8::5/64");
}

#[test]
fn ipv6_slaac_and_dhcp6_keep_the_ra_default_off_a_secondary_nic() {
    for (mode, ifcfg_line, nm, nd, np) in [
        (
            "slaac",
            "IPV6_AUTOCONF=yes",
            "method=auto",
            "DHCP=ipv4",
            "accept-ra: true",
        ),
        (
            "dhcp6",
            "DHCPV6C=yes",
            "method=dhcp",
            "DHCP=yes",
            "dhcp6: true",
        ),
    ] {
        let a = GuestRequest {
            ip6_mode: Some(mode.into()),
            ..args(None, None, None)
        };
        let fs = files(&a).expect("ok");
        assert!(lines(get(&fs, IFCFG)).contains(&ifcfg_line), "{mode}");
        assert!(
            lines(get(&fs, IFCFG)).contains(&"IPV6_DEFROUTE=no"),
            "{mode}"
        );
        has(
            get(&fs, KEYFILE),
            &format!("[ipv6]\n{nm}\nnever-default=true"),
        );
        has(get(&fs, NETWORKD), nd);
        has(get(&fs, NETWORKD), "[IPv6AcceptRA]\nUseGateway=no");
        has(get(&fs, NETPLAN), np);
        has(get(&fs, SYSCTL), "net/ipv6/conf/eth1/accept_ra_defrtr = 0");
        let inet6 = if mode == "slaac" { "auto" } else { "dhcp" };
        has(get(&fs, DEB), &format!("iface eth1 inet6 {inet6}"));
    }
}

#[test]
fn rp_filter_is_loose_per_nic_with_its_reason() {
    let fs = files(&GuestRequest {
        name: "eth1.100".into(),
        ..args(None, None, None)
    })
    .expect("ok");
    let s = get(&fs, "/etc/sysctl.d/90-nic-agent-eth1.100.conf");
    // run-parts skips names with dots: Debian's dhclient hooks would never run.
    assert!(fs
        .iter()
        .any(|f| f.path == "/etc/dhcp/dhclient-enter-hooks.d/nic-agent-eth1_100"));
    // Slashes: a dotted name must stay one path component.
    assert!(
        lines(s).contains(&"net/ipv4/conf/eth1.100/rp_filter = 2"),
        "{}",
        s.content
    );
    assert!(
        lines(s)[0].starts_with("# Loose rp_filter: "),
        "{}",
        s.content
    );
}

#[test]
fn static_with_table_prints_policy_routing_everywhere() {
    let out = run(&args(Some("10.77.32.88/24"), Some("10.77.32.1"), Some(100))).expect("ok");
    let fs = files(&args(Some("10.77.32.88/24"), Some("10.77.32.1"), Some(100))).expect("ok");
    let ifcfg = get(&fs, IFCFG);
    for want in [
        "BOOTPROTO=none",
        "IPADDR=10.77.32.88",
        "PREFIX=24",
        "DEFROUTE=no",
    ] {
        assert!(lines(ifcfg).contains(&want), "{want}: {}", ifcfg.content);
    }
    hasnt(ifcfg, "GATEWAY=");
    let cmds = [
        "ip route add 10.77.32.0/24 dev eth1 src 10.77.32.88 table 100",
        "ip route add default via 10.77.32.1 dev eth1 table 100",
        "ip rule add from 10.77.32.88 lookup 100",
    ];
    // The lab test (test_e2e_day2) runs the `ip` lines after this header.
    let after: Vec<&str> = out
        .split("policy routing for")
        .nth(1)
        .expect("header")
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("ip "))
        .collect();
    assert_eq!(after, cmds);
    assert_eq!(
        get(&fs, "/etc/sysconfig/network-scripts/route-eth1").content,
        "10.77.32.0/24 dev eth1 src 10.77.32.88 table 100\ndefault via 10.77.32.1 dev eth1 table 100\n"
    );
    assert_eq!(
        get(&fs, "/etc/sysconfig/network-scripts/rule-eth1").content,
        "from 10.77.32.88 table 100\n"
    );
    assert_eq!(
        get(&fs, "/etc/iproute2/rt_tables.d/nic-agent-eth1.conf").content,
        "100 nic-agent-eth1\n"
    );
    let deb = get(&fs, DEB);
    for c in cmds {
        has(deb, &format!("    post-up {c}"));
    }
    hasnt(deb, "    gateway ");
    let np = get(&fs, NETPLAN);
    for want in [
        "addresses: [\"10.77.32.88/24\"]",
        "- to: default\n          via: 10.77.32.1\n          table: 100",
        "- to: 10.77.32.0/24\n          scope: link\n          table: 100",
        "routing-policy:\n        - from: 10.77.32.88\n          table: 100",
    ] {
        has(np, want);
    }
    hasnt(np, "metric:");
    let kf = get(&fs, KEYFILE);
    has(kf, "route1=0.0.0.0/0,10.77.32.1\nroute1_options=table=100");
    has(kf, "routing-rule1=priority 1100 from 10.77.32.88 table 100");
    has(kf, "never-default=true");
    let nd = get(&fs, NETWORKD);
    has(nd, "[RoutingPolicyRule]\nFrom=10.77.32.88\nTable=100");
    has(nd, "[Route]\nGateway=10.77.32.1\nTable=100");
    // Static: the address is known, so no lease hooks.
    assert!(!fs
        .iter()
        .any(|f| f.path.contains("dispatcher") || f.path.contains("udhcpc")));
}

#[test]
fn dhcp_with_table_renders_one_hook_per_dhcp_client_from_one_model() {
    let fs = files(&args(None, None, Some(100))).expect("ok");
    let hooks = [
        "/etc/NetworkManager/dispatcher.d/60-nic-agent-eth1",
        "/etc/dhcp/dhclient-exit-hooks.d/nic-agent-eth1",
        "/etc/networkd-dispatcher/routable.d/60-nic-agent-eth1",
        "/etc/networkd-dispatcher/off.d/60-nic-agent-eth1",
        "/usr/share/udhcpc/nic-agent-eth1.script",
    ];
    let shared = super::hooks::functions_for_test(
        &GuestConfig::try_from(&args(None, None, Some(100))).expect("ok"),
    );
    for p in hooks {
        let f = get(&fs, p);
        has(f, &shared);
        has(f, "ip rule add from \"$1\" lookup 100");
        has(f, "while ip rule del lookup 100");
    }
    for p in [hooks[0], hooks[2], hooks[4]] {
        assert_eq!(get(&fs, p).mode, 0o755, "{p}");
        assert!(get(&fs, p).content.starts_with("#!/bin/sh\n"), "{p}");
    }
    // dhclient sources its hooks: an exit there would end dhclient-script.
    let ex = get(&fs, hooks[1]);
    hasnt(ex, "exit");
    has(
        ex,
        "nic_agent_up \"$new_ip_address\" \"${nic_agent_router:-${new_routers%% *}}\"",
    );
    let ud = get(&fs, hooks[4]);
    has(ud, "deconfig)\n\tnic_agent_down");
    has(ud, "bound|renew)");
    hasnt(ud, "ip route replace default via \"${router");
    // With --default, udhcpc's script also installs the main default route.
    let fs = files(&GuestRequest {
        default_route: true,
        ..args(None, None, Some(100))
    })
    .expect("ok");
    has(
        get(&fs, hooks[4]),
        "ip route replace default via \"${router%% *}\" dev eth1 metric 100",
    );
    assert!(!fs.iter().any(|f| f.path.contains("dhclient-enter-hooks")));
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
    let v6 = |ip6: Option<&str>, gw6: Option<&str>, mode: Option<&str>| GuestRequest {
        ip6: ip6.map(Into::into),
        gateway6: gw6.map(Into::into),
        ip6_mode: mode.map(Into::into),
        ..args(None, None, None)
    };
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
        (
            GuestRequest {
                name: "-eth1".into(),
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
        (
            args(Some("10.0.0.5/24"), Some("10.0.1.1"), Some(100)),
            "gateway",
        ),
        (
            args(Some("10.0.0.5/24"), Some("10.0.0.5"), Some(100)),
            "gateway",
        ),
        (args(Some("10.0.0.5/24"), Some("gw"), Some(100)), "gateway"),
        (args(None, Some("10.0.0.1"), None), "gateway"),
        // A gateway with neither --default nor --table would be unused.
        (args(Some("10.0.0.5/24"), Some("10.0.0.1"), None), "gateway"),
        (
            GuestRequest {
                default_route: true,
                ..args(Some("10.0.0.5/24"), None, None)
            },
            "default",
        ),
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
        (args(None, None, Some(253)), "table"),
        (v6(Some("2001:db8::5"), None, None), "ip6"),
        (v6(Some("2001:db8::5/129"), None, None), "ip6"),
        (v6(Some("2001:db8::5/0"), None, None), "ip6"),
        (v6(Some("fe80::5/64"), None, None), "ip6"),
        (v6(Some("ff02::1/64"), None, None), "ip6"),
        (v6(Some("::/64"), None, None), "ip6"),
        (v6(Some("10.0.0.5/24"), None, None), "ip6"),
        (v6(None, None, Some("static")), "ip6-mode"),
        (v6(Some("2001:db8::5/64"), None, Some("slaac")), "ip6-mode"),
        (v6(None, None, Some("auto")), "ip6-mode"),
        (v6(None, Some("fe80::1"), Some("slaac")), "gateway6"),
        (v6(None, Some("fe80::1"), None), "gateway6"),
        (
            v6(Some("2001:db8::5/64"), Some("2001:db8::5"), None),
            "gateway6",
        ),
        (
            v6(Some("2001:db8::5/64"), Some("ff02::2"), None),
            "gateway6",
        ),
        (
            v6(Some("2001:db8::5/64"), Some("10.0.0.1"), None),
            "gateway6",
        ),
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
    assert!(run(&args(None, None, Some(100))).is_ok());
    assert!(run(&v6(
        Some("2001:db8::5/128"),
        Some("fe80::1"),
        Some("static")
    ))
    .is_ok());
    assert!(run(&v6(Some("fd00::5/1"), None, None)).is_ok());
}
