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
    let short = short_name(full);
    if short != full {
        tracing::info!(full, short = %short, "link name longer than 15 bytes shortened");
    }
    short
}

/// [`kernel_name`] without its log line, for callers that try many names.
fn short_name(full: &str) -> String {
    if full.len() <= MAX_IFNAME {
        return full.to_string();
    }
    let mut cut = KEEP.min(full.len());
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    let hash = fnv1a32(full.as_bytes()) & 0xF_FFFF;
    format!("{}{:05x}", &full[..cut], hash)
}

/// The `(pif, vlan)` whose VLAN bridge got the shortened name `bridge`.
///
/// A shortened name keeps only 10 bytes and a hash, so it cannot be read
/// back; it can only be recomputed. `pifs` are the candidate parents (the
/// host's link names). The intended VLAN, when the caller knows it, is
/// tried first and wins; otherwise every VLAN 1-4094 is tried and the
/// answer counts only when exactly one `(pif, vlan)` gives `bridge` (the
/// hash has 20 bits, so two could). `None` for a name that was not
/// shortened: [`vlan_bridge`] names of at most 15 bytes read back as they
/// are.
pub fn decode_vlan_bridge<'a>(
    bridge: &str,
    intended: Option<u16>,
    pifs: impl IntoIterator<Item = &'a str>,
) -> Option<(String, u16)> {
    if bridge.len() != MAX_IFNAME || !bridge.starts_with("br") {
        return None;
    }
    // The first 8 bytes of the pif survive in the name: a cheap filter.
    let kept = &bridge[2..KEEP.min(bridge.len())];
    let pifs: Vec<&str> = pifs
        .into_iter()
        .filter(|p| p.starts_with(kept) && p.len() + "br-4094".len() > MAX_IFNAME)
        .collect();
    if let Some(id) = intended {
        if let Some(p) = pifs
            .iter()
            .find(|p| short_name(&vlan_bridge_full(p, id)) == bridge)
        {
            return Some(((*p).to_string(), id));
        }
    }
    let mut found = None;
    for p in &pifs {
        for id in 1..=4094u16 {
            if short_name(&vlan_bridge_full(p, id)) == bridge {
                if found.is_some() {
                    return None;
                }
                found = Some(((*p).to_string(), id));
            }
        }
    }
    found
}

/// Name of the 802.1Q sub-interface of `pif` for `vlan` (`eth1.100`).
pub fn vlan_device(pif: &str, vlan: u16) -> String {
    kernel_name(&format!("{pif}.{vlan}"))
}

/// Name of the bridge that carries VLAN `vlan` of `pif` (`breth1-100`).
pub fn vlan_bridge(pif: &str, vlan: u16) -> String {
    kernel_name(&vlan_bridge_full(pif, vlan))
}

/// CloudStack's name for the VLAN bridge, before it is fitted to 15 bytes:
/// the one rule [`vlan_bridge`] and [`decode_vlan_bridge`] both follow.
fn vlan_bridge_full(pif: &str, vlan: u16) -> String {
    format!("br{pif}-{vlan}")
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
    fn a_shortened_vlan_bridge_name_is_recomputed_from_its_segment() {
        let pif = "enp0s31f6np0";
        let links = ["lo", "eth0", pif, "enp0s31f6np1"];
        for id in [1u16, 100, 4000, 4094] {
            let short = vlan_bridge(pif, id);
            assert_eq!(short.len(), MAX_IFNAME, "{short}");
            // Known intent, and no intent (every VLAN tried).
            assert_eq!(
                decode_vlan_bridge(&short, Some(id), links),
                Some((pif.to_string(), id))
            );
            assert_eq!(
                decode_vlan_bridge(&short, None, links),
                Some((pif.to_string(), id))
            );
            // A wrong intent does not make the name say what it does not.
            let other = if id == 1 { 2 } else { id - 1 };
            assert_eq!(
                decode_vlan_bridge(&short, Some(other), links),
                Some((pif.to_string(), id))
            );
        }
        // Without the parent among the links, nothing can be recomputed.
        assert_eq!(
            decode_vlan_bridge(&vlan_bridge(pif, 100), None, ["eth0"]),
            None
        );
        // Names that were never shortened are not decoded here.
        assert_eq!(decode_vlan_bridge("breth1-100", Some(100), ["eth1"]), None);
        assert_eq!(decode_vlan_bridge("cloudbr0", None, links), None);
    }

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
