//! Kernel link names for the devices and bridges the agent creates.
//!
//! Linux refuses interface names longer than 15 bytes (IFNAMSIZ − 1). The
//! CloudStack-style names (`<pif>.<vlan>`, `br<pif>-<vlan>`, `vxlan<vni>`,
//! `brvx-<vni>`) overflow that for long physical port names, and the kernel
//! would only say so when the link is created — halfway through a prepare.
//! So every name goes through [`kernel_name`] at plan time.

/// Longest name the kernel accepts for a network interface.
pub const MAX_IFNAME: usize = 15;

/// Bytes of the original name kept in a shortened name.
const KEEP: usize = 10;

/// The name the kernel will accept for `full`.
///
/// Names of at most 15 bytes are returned unchanged. Longer names become the
/// first 10 bytes (cut on a character boundary) followed by 5 hex digits of
/// a 32-bit FNV-1a hash of the *full* name, e.g. `brenp0s31f6-4000` →
/// `brenp0s31f` + `xxxxx`. FNV-1a is written out here (rather than using
/// `std`'s hasher) because its output must never change between builds:
/// a restarted agent has to compute the same name to find its own bridge.
pub fn kernel_name(full: &str) -> String {
    if full.len() <= MAX_IFNAME {
        return full.to_string();
    }
    let mut cut = KEEP.min(full.len());
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    let hash = fnv1a32(full.as_bytes()) & 0xF_FFFF;
    let short = format!("{}{:05x}", &full[..cut], hash);
    tracing::info!(full, short = %short, "link name longer than 15 bytes shortened");
    short
}

/// Name of the 802.1Q sub-interface of `pif` for `vlan` (`eth1.100`).
pub fn vlan_device(pif: &str, vlan: u16) -> String {
    kernel_name(&format!("{pif}.{vlan}"))
}

/// Name of the bridge that carries VLAN `vlan` of `pif` (`breth1-100`).
pub fn vlan_bridge(pif: &str, vlan: u16) -> String {
    kernel_name(&format!("br{pif}-{vlan}"))
}

/// Name of the VXLAN device for `vni` (`vxlan5000`).
pub fn vxlan_device(vni: u32) -> String {
    kernel_name(&format!("vxlan{vni}"))
}

/// Name of the bridge that carries VXLAN `vni` (`brvx-5000`).
pub fn vxlan_bridge(vni: u32) -> String {
    kernel_name(&format!("brvx-{vni}"))
}

/// Whether a bridge port's name looks like a physical NIC (or a stand-in for
/// one): `eth*`, `bond*`, `en*`, `team*`, `vx*`, `veth*`. Taps (`vnet*`) and
/// other bridges do not count.
pub fn looks_physical(name: &str) -> bool {
    ["eth", "bond", "en", "team", "vx", "veth"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// What a label bridge's port is, as far as choosing a VLAN parent goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortClass {
    /// A real uplink: a NIC (no link kind), bond, team, or VLAN device.
    Uplink,
    /// A stand-in for one (veth, vxlan): used only when no real uplink is
    /// there, which is the lab (no dummy links on its kernel).
    StandIn,
    /// Never a parent: taps (`vnet*`, kind tun), bridges, macvtaps, ...
    Never,
}

impl PortClass {
    /// Classifies by the kernel's link kind (`None` for a physical NIC).
    pub fn of_kind(kind: Option<&str>) -> PortClass {
        match kind {
            None | Some("bond" | "team" | "vlan" | "dummy") => PortClass::Uplink,
            Some("veth" | "vxlan") => PortClass::StandIn,
            Some(_) => PortClass::Never,
        }
    }
}

/// Whether `name` matches cloudstack-agent's physical interface patterns
/// (`LibvirtComputingResource.ifNamePatterns`: eth, bond, vlan, vx, em,
/// ens, eno, enp, team, enx, dummy, p<N>p<N>).
pub fn cloudstack_pif_name(name: &str) -> bool {
    const PREFIXES: [&str; 11] = [
        "eth", "bond", "vlan", "vx", "em", "ens", "eno", "enp", "team", "enx", "dummy",
    ];
    if PREFIXES.iter().any(|p| name.starts_with(p)) {
        return true;
    }
    // p<digits>p<digits>
    let Some(rest) = name.strip_prefix('p') else {
        return false;
    };
    let d1 = rest.chars().take_while(char::is_ascii_digit).count();
    let rest = &rest[d1..];
    d1 > 0
        && rest
            .strip_prefix('p')
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
}

/// The port of a label bridge that carries its VLANs, from
/// `(name, class, ifindex)` of every port.
///
/// cloudstack-agent takes the first bridge port whose *name* matches its
/// patterns, in directory order. Names alone let a tap or a veth win over
/// the real uplink, so the kernel's link kind decides first: a real uplink
/// always beats a stand-in, and taps never count. Among equals, a name
/// CloudStack would pick wins (so both agents agree on the same host),
/// then the lowest ifindex (stable across calls).
pub fn pick_uplink(ports: &[(String, PortClass, u32)]) -> Option<&str> {
    ports
        .iter()
        .filter(|(_, c, _)| *c != PortClass::Never)
        .min_by_key(|(n, c, i)| (*c, !cloudstack_pif_name(n), *i))
        .map(|(n, _, _)| n.as_str())
}

fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_pass_unchanged() {
        assert_eq!(kernel_name("brvx-5000"), "brvx-5000");
        assert_eq!(kernel_name("abcdefghijklmno"), "abcdefghijklmno");
        assert_eq!(vlan_device("eth1", 100), "eth1.100");
        assert_eq!(vlan_bridge("eth1", 100), "breth1-100");
        assert_eq!(vxlan_device(16_777_215), "vxlan16777215");
        assert_eq!(vxlan_bridge(16_777_215), "brvx-16777215");
    }

    #[test]
    fn long_names_get_a_stable_distinct_short_form() {
        let a = vlan_bridge("enp0s31f6long", 4000);
        let b = vlan_bridge("enp0s31f6long", 4001);
        assert_eq!(a.len(), MAX_IFNAME);
        assert!(a.starts_with("brenp0s31f"));
        assert_ne!(a, b, "different VLANs must not collide");
        assert_eq!(a, vlan_bridge("enp0s31f6long", 4000), "deterministic");
        // Known value pins the hash so a refactor cannot silently rename bridges.
        assert_eq!(kernel_name("abcdefghijklmnop"), "abcdefghijbb1f5");
    }

    #[test]
    fn multibyte_names_are_cut_on_char_boundary() {
        let n = kernel_name("ééééééééé-long");
        assert!(n.len() <= MAX_IFNAME);
    }

    #[test]
    fn uplink_choice_prefers_real_devices_and_never_takes_a_tap() {
        let p = |n: &str, k: Option<&str>, i: u32| (n.to_string(), PortClass::of_kind(k), i);
        // A veth listed first never wins over the real NIC.
        let ports = [
            p("veth0", Some("veth"), 2),
            p("ens3", None, 5),
            p("vnet0", Some("tun"), 3),
        ];
        assert_eq!(pick_uplink(&ports), Some("ens3"));
        // A NIC with an unusual name still beats a stand-in.
        let ports = [p("veth0", Some("veth"), 2), p("uplink0", None, 9)];
        assert_eq!(pick_uplink(&ports), Some("uplink0"));
        // Among real uplinks, CloudStack's name patterns, then ifindex.
        let ports = [
            p("uplink0", None, 2),
            p("bond0", Some("bond"), 7),
            p("eth1", None, 4),
        ];
        assert_eq!(pick_uplink(&ports), Some("eth1"));
        // Only stand-ins (the lab): the veth is used.
        let ports = [p("vnet1", Some("tun"), 2), p("eth1", Some("veth"), 3)];
        assert_eq!(pick_uplink(&ports), Some("eth1"));
        // Only taps and bridges: nothing.
        let ports = [p("vnet1", Some("tun"), 2), p("eth9", Some("bridge"), 3)];
        assert_eq!(pick_uplink(&ports), None);
    }

    #[test]
    fn cloudstack_interface_patterns() {
        for yes in [
            "eth0", "bond1", "vlan20", "vxlan5", "em1", "ens3", "eno1", "enp3s0", "team0",
            "enx00aa", "dummy0", "p1p1", "p12p3",
        ] {
            assert!(cloudstack_pif_name(yes), "{yes}");
        }
        for no in [
            "vnet3", "tap0", "veth0", "cloudbr0", "p1", "pp1", "p1px", "uplink0",
        ] {
            assert!(!cloudstack_pif_name(no), "{no}");
        }
    }

    #[test]
    fn physical_port_heuristic() {
        for yes in ["eth0", "bond0", "enp3s0", "team1", "vxlan5", "veth-a"] {
            assert!(looks_physical(yes), "{yes}");
        }
        for no in ["vnet3", "tap0", "cloudbr0", "lo"] {
            assert!(!looks_physical(no), "{no}");
        }
    }
}
