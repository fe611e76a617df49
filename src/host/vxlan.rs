//! VXLAN devices that are byte-for-byte what CloudStack's KVM scripts make,
//! so a NIC the agent plugs reaches a VM that cloudstack-agent plugged on
//! the next host.
//!
//! CloudStack has two flavours, picked per host:
//!
//! - **multicast** (`modifyvxlan.sh`, the default): `vxlan<VNI>` with
//!   `id <VNI> group <G> ttl 10 dev <label bridge>` and *no* `dstport`, so
//!   the kernel's own default applies (the `vxlan` module's `udp_port`,
//!   8472 unless the host changed it). A route `<G> dev <label bridge>` is
//!   added first, IPv6 is disabled on the device. `<G>` is `239.A.B.C` on an
//!   IPv4 underlay and `ff05::A:B:C` on an IPv6 one (see [`group_v6`]).
//! - **evpn** (`modifyvxlan-evpn.sh`): `dstport 4789 nolearning`, the local
//!   address taken from `lo`, no `dev`, no group, no route; FRR's BGP EVPN
//!   fills the FDB. IPv6 is disabled on the device and on the bridge, and
//!   the device's bridge port gets `neigh_suppress on learning off`.
//!
//! Both scripts serialise on `flock -x -w 10 /var/run/cloud/vxlan.lock`;
//! [`VxlanLock`] takes the same lock, so the agent and cloudstack-agent
//! never race on one host.
//!
//! This module is pure (apart from the lock and reading the kernel's default
//! port): it decides what a device must look like
//! ([`VxlanSettings::device`]) and compares a device found on the host with
//! it ([`VxlanDevice::differences`]). The agent's attach and `doctor` both
//! judge devices with these two. The netlink work is in `netlink.rs`.

use std::fs::{File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netlink_packet_route::link::InfoVxlan;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::mtu::{VXLAN_IPV4_OVERHEAD, VXLAN_IPV6_OVERHEAD};
use super::{naming, HostError};
use crate::nic::Vni;

/// The lock file both CloudStack VXLAN scripts take.
pub const CLOUDSTACK_VXLAN_LOCK: &str = "/var/run/cloud/vxlan.lock";
/// How long the scripts wait for that lock (`flock -w 10`).
pub const VXLAN_LOCK_WAIT: Duration = Duration::from_secs(10);
/// Where the kernel exposes the port a VXLAN device without `dstport` uses.
pub const KERNEL_PORT_PARAM: &str = "/sys/module/vxlan/parameters/udp_port";
/// Linux's built-in default of that parameter (the pre-IANA port).
pub const LINUX_DEFAULT_PORT: u16 = 8472;
/// The IANA VXLAN port, which CloudStack's EVPN flavour pins.
pub const IANA_PORT: u16 = 4789;
/// TTL of multicast VXLAN packets on the underlay (`ttl 10`).
pub const MULTICAST_TTL: u8 = 10;

/// Which CloudStack VXLAN script this host follows (`vxlan.flavour`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VxlanFlavour {
    /// `modifyvxlan.sh`: multicast group, kernel default port.
    #[default]
    Multicast,
    /// `modifyvxlan-evpn.sh`: port 4789, nolearning, local address from `lo`.
    Evpn,
}

impl std::fmt::Display for VxlanFlavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VxlanFlavour::Multicast => "multicast",
            VxlanFlavour::Evpn => "evpn",
        })
    }
}

/// Underlay address family (`vxlan.family`), CloudStack's `-6` switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VxlanFamily {
    /// IPv6 when the underlay has a global IPv6 address and no IPv4 one
    /// (for EVPN: when `lo` has a global IPv6 address and no global IPv4
    /// one); IPv4 otherwise.
    #[default]
    Auto,
    /// Always IPv4 (`239.A.B.C`).
    Inet,
    /// Always IPv6 (`ff05::A:B:C`), like `modifyvxlan.sh -6`.
    Inet6,
}

/// The underlay family actually used for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 underlay.
    V4,
    /// IPv6 underlay.
    V6,
}

impl Family {
    /// The auto rule: IPv6 only when there is a global IPv6 address and no
    /// IPv4 address, because an IPv4 address means CloudStack's script (run
    /// without `-6`) would use IPv4 on this host too.
    pub fn auto(has_ipv4: bool, has_global_ipv6: bool) -> Family {
        if !has_ipv4 && has_global_ipv6 {
            Family::V6
        } else {
            Family::V4
        }
    }
}

/// VXLAN settings of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSettings {
    /// The CloudStack flavour.
    pub flavour: VxlanFlavour,
    /// A port pinned on every host (`vxlan.port`). `None`: the flavour's
    /// (multicast: the kernel default, given as no port at all; evpn: 4789).
    pub port: Option<u16>,
    /// Underlay family.
    pub family: VxlanFamily,
    /// The lock file shared with cloudstack-agent. Taken only when its
    /// directory exists (no CloudStack on the host: nothing to race with).
    pub lock_file: PathBuf,
    /// How long to wait for the lock.
    pub lock_wait: Duration,
}

/// An address on a link, as the VXLAN decisions read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LinkAddr {
    /// The address.
    pub addr: IpAddr,
    /// Scope global (`RT_SCOPE_UNIVERSE`).
    pub global: bool,
}

impl VxlanSettings {
    /// The underlay family of a multicast device over a link that has
    /// `addrs`: the configured one, or the auto rule on those addresses.
    pub fn underlay_family(&self, addrs: &[LinkAddr]) -> Family {
        match self.family {
            VxlanFamily::Inet => Family::V4,
            VxlanFamily::Inet6 => Family::V6,
            VxlanFamily::Auto => Family::auto(
                addrs.iter().any(|a| a.addr.is_ipv4()),
                addrs.iter().any(|a| a.addr.is_ipv6() && a.global),
            ),
        }
    }

    /// The EVPN VTEP address: the first global address on `lo` (`lo_addrs`)
    /// of the configured family, as `modifyvxlan-evpn.sh` reads it.
    pub fn evpn_vtep(&self, lo_addrs: &[LinkAddr]) -> Result<IpAddr, HostError> {
        let global: Vec<IpAddr> = lo_addrs
            .iter()
            .filter(|a| a.global && !a.addr.is_loopback())
            .map(|a| a.addr)
            .collect();
        let family = match self.family {
            VxlanFamily::Inet => Family::V4,
            VxlanFamily::Inet6 => Family::V6,
            VxlanFamily::Auto => Family::auto(
                global.iter().any(IpAddr::is_ipv4),
                global.iter().any(IpAddr::is_ipv6),
            ),
        };
        global
            .into_iter()
            .find(|a| a.is_ipv6() == (family == Family::V6))
            .ok_or_else(|| {
                HostError::Unsupported(format!(
                    "vxlan.flavour = \"evpn\" needs this host's VTEP address ({}) with scope \
                     global on lo, as CloudStack's modifyvxlan-evpn.sh does; add it \
                     (ip addr add ADDR/32 dev lo) or set vxlan.flavour = \"multicast\"",
                    if family == Family::V6 { "IPv6" } else { "IPv4" }
                ))
            })
    }

    /// The device this configuration makes for `vni`: over the label bridge
    /// `underlay` (whose addresses are `underlay_addrs`) for multicast, from
    /// the VTEP on `lo` (`lo_addrs`) for evpn. The one decision that
    /// attach, the libvirt hook, `repair-vxlan` and `doctor` share, so the
    /// doctor judges a device by what the agent would make.
    pub fn device(
        &self,
        vni: Vni,
        underlay: &str,
        underlay_addrs: &[LinkAddr],
        lo_addrs: &[LinkAddr],
    ) -> Result<VxlanDevice, HostError> {
        Ok(match self.flavour {
            VxlanFlavour::Multicast => VxlanDevice::multicast(
                vni,
                underlay,
                self.underlay_family(underlay_addrs),
                self.port,
            ),
            VxlanFlavour::Evpn => VxlanDevice::evpn(vni, self.evpn_vtep(lo_addrs)?, self.port),
        })
    }
}

impl Default for VxlanSettings {
    fn default() -> Self {
        Self {
            flavour: VxlanFlavour::Multicast,
            port: None,
            family: VxlanFamily::Auto,
            lock_file: PathBuf::from(CLOUDSTACK_VXLAN_LOCK),
            lock_wait: VXLAN_LOCK_WAIT,
        }
    }
}

/// The kernel's default VXLAN port on this host (what a device created
/// without `dstport` gets).
pub fn kernel_default_port() -> u16 {
    std::fs::read_to_string(KERNEL_PORT_PARAM)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(LINUX_DEFAULT_PORT)
}

/// The three bytes CloudStack's group formula uses: (VNI>>16)%256,
/// (VNI>>8)%256, VNI%256.
fn vni_bytes(vni: Vni) -> [u8; 3] {
    let n = vni.get();
    [(n >> 16 & 255) as u8, (n >> 8 & 255) as u8, (n & 255) as u8]
}

/// CloudStack's IPv4 multicast group for a VNI: `239.A.B.C`.
pub fn group_v4(vni: Vni) -> Ipv4Addr {
    let [a, b, c] = vni_bytes(vni);
    Ipv4Addr::new(239, a, b, c)
}

/// CloudStack's IPv6 multicast group for a VNI: `ff05::A:B:C`.
///
/// The script prints A, B and C in *decimal* and pastes them into an IPv6
/// address, where they are read as hex groups: VNI 1001 (0, 3, 233) gives
/// `ff05::0:3:233` (groups 0x0, 0x3, 0x233), not `ff05::0:3:e9`. That is odd,
/// but it is the address CloudStack hosts join, so it is copied exactly.
pub fn group_v6(vni: Vni) -> Ipv6Addr {
    let [a, b, c] = vni_bytes(vni);
    // A byte in decimal has at most 3 digits, so as hex it is at most 0x255.
    let hex = |d: u8| u16::from_str_radix(&d.to_string(), 16).unwrap_or(0);
    Ipv6Addr::new(0xff05, 0, 0, 0, 0, hex(a), hex(b), hex(c))
}

/// A VXLAN device as the configured CloudStack flavour makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    /// Device name (`vxlan<vni>`).
    pub name: String,
    /// VXLAN network identifier.
    pub vni: Vni,
    /// The flavour it follows.
    pub flavour: VxlanFlavour,
    /// Underlay family.
    pub family: Family,
    /// Multicast group (multicast flavour only).
    pub group: Option<IpAddr>,
    /// Local VTEP address (evpn only, from `lo`).
    pub local: Option<IpAddr>,
    /// Multicast TTL (multicast only).
    pub ttl: Option<u8>,
    /// UDP port given on creation; `None` gives none, so the kernel default
    /// applies (what `modifyvxlan.sh` does).
    pub port: Option<u16>,
    /// `dev`: the label bridge (multicast only; evpn gives none).
    pub underlay: Option<String>,
    /// FDB learning (off for evpn).
    pub learning: bool,
}

impl VxlanDevice {
    /// The multicast flavour's device, exactly `modifyvxlan.sh [-6]`.
    pub fn multicast(vni: Vni, underlay: &str, family: Family, port: Option<u16>) -> Self {
        Self {
            name: naming::vxlan_device(vni.get()),
            vni,
            flavour: VxlanFlavour::Multicast,
            family,
            group: Some(match family {
                Family::V4 => IpAddr::V4(group_v4(vni)),
                Family::V6 => IpAddr::V6(group_v6(vni)),
            }),
            local: None,
            ttl: Some(MULTICAST_TTL),
            port,
            underlay: Some(underlay.to_string()),
            learning: true,
        }
    }

    /// The evpn flavour's device, exactly `modifyvxlan-evpn.sh [-6]`.
    pub fn evpn(vni: Vni, local: IpAddr, port: Option<u16>) -> Self {
        Self {
            name: naming::vxlan_device(vni.get()),
            vni,
            flavour: VxlanFlavour::Evpn,
            family: if local.is_ipv6() {
                Family::V6
            } else {
                Family::V4
            },
            group: None,
            local: Some(local),
            ttl: None,
            port: Some(port.unwrap_or(IANA_PORT)),
            underlay: None,
            learning: false,
        }
    }

    /// The UDP port the device uses once created, given the kernel default.
    pub fn effective_port(&self, kernel_default: u16) -> u16 {
        self.port.unwrap_or(kernel_default)
    }

    /// Encapsulation bytes on the underlay.
    pub fn overhead(&self) -> u32 {
        match self.family {
            Family::V4 => VXLAN_IPV4_OVERHEAD,
            Family::V6 => VXLAN_IPV6_OVERHEAD,
        }
    }

    /// The route `<group> dev <underlay>` the multicast flavour adds, as
    /// (destination, prefix length, device).
    pub fn route(&self) -> Option<(IpAddr, u8, &str)> {
        match (self.flavour, self.group, self.underlay.as_deref()) {
            (VxlanFlavour::Multicast, Some(g), Some(dev)) => {
                Some((g, if g.is_ipv4() { 32 } else { 128 }, dev))
            }
            _ => None,
        }
    }

    /// The `ip` command that makes this device, for messages and doctor.
    pub fn ip_command(&self) -> String {
        let f = match self.family {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        };
        let mut s = format!(
            "ip -f {f} link add {} type vxlan id {}",
            self.name,
            self.vni.get()
        );
        if let Some(l) = self.local {
            s.push_str(&format!(" local {l}"));
        }
        if let Some(g) = self.group {
            s.push_str(&format!(" group {g}"));
        }
        if let Some(t) = self.ttl {
            s.push_str(&format!(" ttl {t}"));
        }
        if let Some(p) = self.port {
            s.push_str(&format!(" dstport {p}"));
        }
        if !self.learning {
            s.push_str(" nolearning");
        }
        if let Some(d) = &self.underlay {
            s.push_str(&format!(" dev {d}"));
        }
        s
    }

    /// How `found` differs from this device, one phrase per difference
    /// ("uses UDP port 4789, this host is configured for 8472"). Empty when
    /// they match on everything that decides who can talk to whom: VNI,
    /// port, group, underlay and (evpn) local address.
    pub fn differences(&self, found: &VxlanAttrs, kernel_default: u16) -> Vec<String> {
        let mut d = Vec::new();
        if found.vni != Some(self.vni.get()) {
            d.push(format!(
                "has VNI {}, expected {}",
                opt(found.vni),
                self.vni.get()
            ));
        }
        let want = self.effective_port(kernel_default);
        let have = found.port.unwrap_or(kernel_default);
        if have != want {
            d.push(format!(
                "uses UDP port {have}, this host is configured for {want} (vxlan.flavour \
                 {}{})",
                self.flavour,
                match self.port {
                    Some(_) => ", vxlan.port",
                    None => ", kernel default",
                }
            ));
        }
        if found.group != self.group {
            d.push(format!(
                "has group {}, expected {}",
                opt(found.group),
                opt(self.group)
            ));
        }
        if self.underlay.is_some() && found.underlay != self.underlay {
            d.push(format!(
                "runs over {}, expected {}",
                found.underlay.as_deref().unwrap_or("no underlay device"),
                self.underlay.as_deref().unwrap_or("none")
            ));
        }
        if self.local.is_some() && found.local != self.local {
            d.push(format!(
                "has local address {}, expected {}",
                opt(found.local),
                opt(self.local)
            ));
        }
        d
    }
}

impl VxlanDevice {
    /// What to do about a device found with this one's name that
    /// [`differs`](Self::differences): `repair-vxlan` for a device the agent
    /// made (`ours`), otherwise agree the settings or re-create it by hand.
    pub fn mismatch_fix(&self, ours: bool) -> String {
        let vni = self.vni.get();
        if ours {
            format!(
                "it was made by nic-agent: run `nic-agent repair-vxlan --vni {vni}` to re-create \
                 it as configured (VNI {vni} is interrupted briefly on this host)"
            )
        } else {
            format!(
                "it was not made by nic-agent (no alias {}), so the agent leaves it \
                 alone: make the VXLAN settings of all hosts agree (vxlan.flavour, vxlan.port, \
                 vxlan.family), or re-create it with `{}`",
                super::AGENT_ALIAS,
                self.ip_command()
            )
        }
    }
}

/// Reads a VXLAN link's `IFLA_INFO_DATA`: its attributes, and the
/// underlay's ifindex (`IFLA_VXLAN_LINK`), which the caller names.
pub fn parse_attrs(opts: &[InfoVxlan]) -> (VxlanAttrs, Option<u32>) {
    let mut v = VxlanAttrs::default();
    let mut link = None;
    for o in opts {
        match o {
            InfoVxlan::Id(id) => v.vni = Some(*id),
            InfoVxlan::Group(g) => v.group = Some((*g).into()),
            InfoVxlan::Group6(g) => v.group = Some((*g).into()),
            InfoVxlan::Local(a) => v.local = Some((*a).into()),
            InfoVxlan::Local6(a) => v.local = Some((*a).into()),
            InfoVxlan::Port(p) => v.port = Some(*p),
            InfoVxlan::Learning(b) => v.learning = Some(*b),
            InfoVxlan::Link(i) => link = Some(*i),
            _ => {}
        }
    }
    // The kernel reports "no group" as 0.0.0.0 / ::.
    if v.group.is_some_and(|g| g.is_unspecified()) {
        v.group = None;
    }
    if v.local.is_some_and(|a| a.is_unspecified()) {
        v.local = None;
    }
    (v, link)
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "none".to_string(), |x| x.to_string())
}

/// The attributes of a VXLAN device found on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VxlanAttrs {
    /// `IFLA_VXLAN_ID`.
    pub vni: Option<u32>,
    /// Multicast group (IPv4 or IPv6).
    pub group: Option<IpAddr>,
    /// Local address.
    pub local: Option<IpAddr>,
    /// Underlay link name (`dev`).
    pub underlay: Option<String>,
    /// UDP destination port as the kernel reports it.
    pub port: Option<u16>,
    /// FDB learning.
    pub learning: Option<bool>,
}

/// CloudStack's VXLAN lock, held while the agent creates or deletes a VXLAN
/// device (and its route). Released on drop.
#[derive(Debug)]
pub struct VxlanLock {
    _held: Option<Flock<File>>,
}

impl VxlanLock {
    /// Takes the lock at `path`, waiting at most `wait`, the way
    /// `flock -x -w 10` does. When `path`'s directory does not exist
    /// (cloudstack-agent is not installed) there is no one to serialise
    /// with, and nothing is taken.
    ///
    /// Polls with a non-blocking flock instead of blocking a thread: the
    /// wait is bounded, the runtime stays free, and a cancelled attach does
    /// not leave a thread stuck in flock(2).
    pub async fn acquire(path: &Path, wait: Duration) -> Result<Self, HostError> {
        let dir_exists = path.parent().is_some_and(Path::is_dir);
        if !dir_exists {
            return Ok(Self { _held: None });
        }
        let io = |source| HostError::Io {
            op: format!("open VXLAN lock {}", path.display()),
            source,
        };
        // The scripts open it for writing (`200>file`), which creates it.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let deadline = Instant::now() + wait;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => return Ok(Self { _held: Some(held) }),
                Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    file = f;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(HostError::LockBusy {
                        path: path.display().to_string(),
                        waited: wait,
                    })
                }
                Err((_, e)) => return Err(io(std::io::Error::from(e))),
            }
        }
    }

    /// Whether a lock is actually held (false when CloudStack is absent).
    pub fn is_held(&self) -> bool {
        self._held.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vni(n: u32) -> Vni {
        Vni::try_from(n).expect("vni")
    }

    #[test]
    fn ipv4_group_is_239_and_the_three_vni_bytes() {
        assert_eq!(group_v4(vni(1)), Ipv4Addr::new(239, 0, 0, 1));
        assert_eq!(group_v4(vni(1001)), Ipv4Addr::new(239, 0, 3, 233));
        assert_eq!(group_v4(vni(5000)), Ipv4Addr::new(239, 0, 19, 136));
        assert_eq!(group_v4(vni(16_777_215)), Ipv4Addr::new(239, 255, 255, 255));
    }

    #[test]
    fn ipv6_group_writes_decimal_bytes_as_hex_groups() {
        let g = |n| group_v6(vni(n)).to_string();
        // The examples CloudStack's formula gives (see the facts).
        assert_eq!(
            group_v6(vni(1001)),
            "ff05::0:3:233".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(g(1001), "ff05::3:233");
        assert_eq!(
            group_v6(vni(16_777_215)),
            "ff05::255:255:255".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(g(1), "ff05::1");
        // 5001 = 0x001389: bytes 0, 19, 137 -> groups 0x0, 0x19, 0x137.
        assert_eq!(g(5001), "ff05::19:137");
        // 65536 = bytes 1, 0, 0.
        assert_eq!(g(65_536), "ff05::1:0:0");
    }

    #[test]
    fn auto_family_picks_ipv6_only_without_ipv4() {
        assert_eq!(Family::auto(true, true), Family::V4);
        assert_eq!(Family::auto(true, false), Family::V4);
        assert_eq!(Family::auto(false, false), Family::V4);
        assert_eq!(Family::auto(false, true), Family::V6);
    }

    #[test]
    fn multicast_device_is_the_scripts_command_without_a_port() {
        let d = VxlanDevice::multicast(vni(1001), "cloudbr1", Family::V4, None);
        assert_eq!(
            d.ip_command(),
            "ip -f inet link add vxlan1001 type vxlan id 1001 group 239.0.3.233 ttl 10 dev cloudbr1"
        );
        assert_eq!(d.effective_port(8472), 8472);
        assert_eq!(d.overhead(), 50);
        assert_eq!(
            d.route(),
            Some((IpAddr::V4(Ipv4Addr::new(239, 0, 3, 233)), 32, "cloudbr1"))
        );
        let d6 = VxlanDevice::multicast(vni(1001), "cloudbr1", Family::V6, None);
        assert_eq!(
            d6.ip_command(),
            "ip -f inet6 link add vxlan1001 type vxlan id 1001 group ff05::3:233 ttl 10 dev cloudbr1"
        );
        assert_eq!(d6.overhead(), 70);
        assert_eq!(d6.route().map(|r| r.1), Some(128));
    }

    #[test]
    fn evpn_device_pins_4789_and_has_no_group_or_route() {
        let d = VxlanDevice::evpn(vni(7), "10.0.0.7".parse().unwrap(), None);
        assert_eq!(
            d.ip_command(),
            "ip -f inet link add vxlan7 type vxlan id 7 local 10.0.0.7 dstport 4789 nolearning"
        );
        assert_eq!(d.route(), None);
        let pinned = VxlanDevice::evpn(vni(7), "10.0.0.7".parse().unwrap(), Some(4790));
        assert_eq!(pinned.effective_port(8472), 4790);
    }

    #[test]
    fn differences_name_port_group_underlay_and_vni() {
        let want = VxlanDevice::multicast(vni(1001), "cloudbr1", Family::V4, None);
        let same = VxlanAttrs {
            vni: Some(1001),
            group: want.group,
            local: None,
            underlay: Some("cloudbr1".into()),
            port: Some(8472),
            learning: Some(true),
        };
        assert!(want.differences(&same, 8472).is_empty());
        let old = VxlanAttrs {
            port: Some(4789),
            ..same.clone()
        };
        assert_eq!(
            want.differences(&old, 8472),
            vec![
                "uses UDP port 4789, this host is configured for 8472 (vxlan.flavour multicast, \
                 kernel default)"
                    .to_string()
            ]
        );
        let all = VxlanAttrs {
            vni: Some(7),
            group: Some("239.1.1.1".parse().unwrap()),
            local: None,
            underlay: Some("eth9".into()),
            port: Some(8472),
            learning: Some(true),
        };
        let d = want.differences(&all, 8472);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("VNI 7, expected 1001"), "{d:?}");
        assert!(
            d[1].contains("group 239.1.1.1, expected 239.0.3.233"),
            "{d:?}"
        );
        assert!(d[2].contains("over eth9, expected cloudbr1"), "{d:?}");
    }

    fn addr(a: &str, global: bool) -> LinkAddr {
        LinkAddr {
            addr: a.parse().expect("addr"),
            global,
        }
    }

    #[test]
    fn configured_device_follows_flavour_family_and_the_underlays_addresses() {
        let auto = VxlanSettings::default();
        let v4 = [addr("10.1.1.1", true), addr("fe80::1", false)];
        let v6 = [addr("2001:db8::1", true), addr("fe80::1", false)];
        let d = auto.device(vni(1001), "cloudbr1", &v4, &[]).expect("v4");
        assert_eq!(
            d,
            VxlanDevice::multicast(vni(1001), "cloudbr1", Family::V4, None)
        );
        let d = auto.device(vni(1001), "cloudbr1", &v6, &[]).expect("v6");
        assert_eq!(d.group, Some(IpAddr::V6(group_v6(vni(1001)))));
        let inet6 = VxlanSettings {
            family: VxlanFamily::Inet6,
            ..VxlanSettings::default()
        };
        let d = inet6.device(vni(1001), "cloudbr1", &v4, &[]).expect("-6");
        assert_eq!(d.family, Family::V6);

        let evpn = VxlanSettings {
            flavour: VxlanFlavour::Evpn,
            ..VxlanSettings::default()
        };
        let lo = [
            addr("127.0.0.1", false),
            addr("::1", false),
            addr("10.0.0.7", true),
        ];
        let d = evpn.device(vni(7), "ignored", &[], &lo).expect("evpn");
        assert_eq!(
            d,
            VxlanDevice::evpn(vni(7), "10.0.0.7".parse().unwrap(), None)
        );
        let e = evpn
            .device(vni(7), "ignored", &[], &lo[..2])
            .expect_err("no VTEP on lo");
        assert!(
            e.to_string().contains("(IPv4) with scope global on lo"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn lock_is_skipped_without_the_directory_and_waits_when_held() {
        let dir = tempfile::tempdir().expect("tmp");
        let absent = dir.path().join("no-cloud/vxlan.lock");
        let l = VxlanLock::acquire(&absent, Duration::from_millis(10))
            .await
            .expect("no dir, no lock");
        assert!(!l.is_held());
        assert!(!absent.exists());

        let path = dir.path().join("vxlan.lock");
        let first = VxlanLock::acquire(&path, Duration::from_millis(10))
            .await
            .expect("free lock");
        assert!(first.is_held());
        let busy = VxlanLock::acquire(&path, Duration::from_millis(200))
            .await
            .expect_err("held by another open file");
        assert!(busy.to_string().contains("vxlan.lock"), "{busy}");
        assert_eq!(busy.kind(), super::super::HostErrorKind::Unavailable);
        drop(first);
        let again = VxlanLock::acquire(&path, Duration::from_millis(10))
            .await
            .expect("released on drop");
        assert!(again.is_held());
    }
}
