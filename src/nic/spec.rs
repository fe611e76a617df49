//! The raw request ([`RawNic`]) and its validated form ([`NicSpec`]).

use std::net::IpAddr;

use super::bandwidth::{fields, MAX_KB};
use uuid::Uuid;

use super::plug::{self, MacPolicy, PlugDetails, RawAddresses};
use super::{
    AcpiIndex, Alias, Bandwidth, BridgeName, InterfaceId, LinkState, MacAddr, Mtu, NicError,
    NicModel, PciSlot, QueueCount, Segment, SwitchType, TxQueueLen, VhostMode, VlanId, Vni,
};

/// Shaping for one direction as the proto and CLI carry it. 0 means unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawBandwidth {
    /// Average rate, KB/s.
    pub average_kbps: u64,
    /// Peak rate, KB/s.
    pub peak_kbps: u64,
    /// Burst size, KB.
    pub burst_kb: u64,
    /// CloudStack network rate, Mbit/s; an alternative to the three above.
    pub rate_mbps: u32,
}

/// A NIC request exactly as the proto and CLI produce it: unchecked.
/// Empty strings and `None` mean "not given".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawNic {
    /// Guest MAC (required).
    pub mac: String,
    /// Host bridge, or the traffic label's bridge for VLAN/VXLAN (required).
    pub bridge: String,
    /// True when `bridge` is an Open vSwitch bridge.
    pub ovs: bool,
    /// 802.1Q VLAN id.
    pub vlan: Option<u32>,
    /// VXLAN network id.
    pub vni: Option<u32>,
    /// CloudStack broadcast URI: `vlan://N`, `vlan://untagged`, `vxlan://N`.
    pub broadcast_uri: String,
    /// Guest MTU (virtio only).
    pub mtu: Option<u32>,
    /// virtio-net queue pairs.
    pub queues: Option<u32>,
    /// Host tap transmit queue length (packets).
    pub tx_queue_len: Option<u32>,
    /// NIC model name; empty means virtio.
    pub model: String,
    /// Start with the link down.
    pub link_down: bool,
    /// Let this NIC see all traffic on its bridge (IDS guests).
    pub promiscuous: bool,
    /// User alias `ua-…`; empty means "generate one".
    pub alias: String,
    /// Shaping of traffic towards the guest.
    pub inbound: Option<RawBandwidth>,
    /// Shaping of traffic from the guest.
    pub outbound: Option<RawBandwidth>,
    /// Pinned PCI slot.
    pub pci_slot: Option<u32>,
    /// ACPI index for a stable guest name.
    pub acpi_index: Option<u32>,
    /// `auto`, `on`, `off`; empty means auto.
    pub vhost: String,
    /// OVS interface id (UUID); OVS only.
    pub interface_id: String,
    /// Bind the agent's anti-spoofing nwfilter to this NIC.
    pub anti_spoofing: bool,
    /// The NIC's IPv4/IPv6 addresses, as text.
    pub ips: Vec<String>,
    /// No option ROM (`<rom enabled='no'/>`).
    pub pxe_disable: bool,
    /// CloudStack's NIC uuid; empty means none.
    pub nic_uuid: String,
    /// CloudStack's deviceId (NIC order).
    pub device_id: Option<u32>,
    /// The guest's default NIC.
    pub default_nic: bool,
    /// Primary and secondary addresses.
    pub addresses: RawAddresses,
    /// Security groups apply to this NIC.
    pub security_group_enabled: bool,
    /// Multicast rate, Mbit/s; 0 means unset.
    pub multicast_rate_mbps: u32,
    /// virtio packed virtqueues.
    pub packed: bool,
    /// MAC-policy details.
    pub mac_policy: MacPolicy,
}

/// A fully validated NIC request. Every field already holds an allowed
/// value and every cross-field rule has been applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// Guest MAC.
    pub mac: MacAddr,
    /// Host bridge (for a VLAN/VXLAN on a Linux bridge: the traffic label).
    pub bridge: BridgeName,
    /// Linux bridge or OVS.
    pub switch: SwitchType,
    /// Where the traffic goes.
    pub segment: Segment,
    /// Guest MTU (virtio only).
    pub mtu: Option<Mtu>,
    /// virtio-net queue pairs.
    pub queues: Option<QueueCount>,
    /// The host tap's `txqueuelen`, set after the live attach.
    pub tx_queue_len: Option<TxQueueLen>,
    /// NIC model.
    pub model: NicModel,
    /// Initial link state.
    pub link: LinkState,
    /// Flood all bridge traffic to this NIC.
    pub promiscuous: bool,
    /// User alias; `None` means the caller generates one.
    pub alias: Option<Alias>,
    /// Shaping towards the guest.
    pub inbound: Option<Bandwidth>,
    /// Shaping from the guest.
    pub outbound: Option<Bandwidth>,
    /// Pinned PCI slot.
    pub pci_slot: Option<PciSlot>,
    /// ACPI index.
    pub acpi_index: Option<AcpiIndex>,
    /// vhost-net choice.
    pub vhost: VhostMode,
    /// OVS interface id; `None` lets libvirt generate one.
    pub interface_id: Option<InterfaceId>,
    /// No option ROM: no PXE from this NIC.
    pub pxe_disable: bool,
    /// virtio packed virtqueues.
    pub packed: bool,
    /// CloudStack's NIC uuid; also encoded in `alias`.
    pub nic_uuid: Option<Uuid>,
    /// CloudStack's deviceId; also in `acpi_index` as `device_id + 1`.
    pub device_id: Option<u32>,
    /// What is carried but not applied.
    pub plug: PlugDetails,
    /// Bind the agent's anti-spoofing nwfilter to this NIC.
    pub anti_spoofing: bool,
    /// The NIC's addresses, without duplicates, in request order: the only
    /// source addresses anti-spoofing lets the guest use.
    pub ips: Vec<IpAddr>,
}

/// More addresses than any NIC needs; bounds the filter's parameter list.
pub const MAX_IPS: usize = 64;

/// Parses the `ips` field: unicast IPv4/IPv6 host addresses, no duplicates.
fn ips(raw: &[String]) -> Result<Vec<IpAddr>, NicError> {
    const ALLOWED: &str = "unicast IPv4 or IPv6 host addresses such as 10.1.1.5 or 2001:db8::5";
    if raw.len() > MAX_IPS {
        return Err(NicError::invalid(
            "ips",
            format!("{} addresses", raw.len()),
            format!("at most {MAX_IPS}"),
        ));
    }
    let mut out: Vec<IpAddr> = Vec::with_capacity(raw.len());
    for s in raw {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| NicError::invalid("ips", s, ALLOWED))?;
        let v4_broadcast = matches!(ip, IpAddr::V4(v) if v.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || v4_broadcast {
            return Err(NicError::invalid("ips", s, ALLOWED));
        }
        if out.contains(&ip) {
            return Err(NicError::conflict("ips", format!("{ip} is listed twice")));
        }
        out.push(ip);
    }
    Ok(out)
}

const URI_ALLOWED: &str = "vlan://1-4094, vlan://untagged, vlan://4095, vxlan://1-16777215";

/// Digits only: `u32::from_str` would also take a leading `+`.
fn uri_number(s: &str) -> Option<u32> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// Parses CloudStack's broadcast URI. `Ok(None)` when empty.
pub fn parse_broadcast_uri(uri: &str) -> Result<Option<Segment>, NicError> {
    if uri.is_empty() {
        return Ok(None);
    }
    let bad = || NicError::invalid("broadcast_uri", uri, URI_ALLOWED);
    let (scheme, rest) = uri.split_once("://").ok_or_else(bad)?;
    if scheme.eq_ignore_ascii_case("vlan") {
        // CloudStack writes the untagged network either way.
        if rest.eq_ignore_ascii_case("untagged") {
            return Ok(Some(Segment::Untagged));
        }
        return match uri_number(rest) {
            Some(4095) => Ok(Some(Segment::Untagged)),
            Some(n) => VlanId::try_from(n)
                .map(|v| Some(Segment::Vlan(v)))
                .map_err(|_| bad()),
            None => Err(bad()),
        };
    }
    // PVLAN isolates secondary VLANs with OVS flows (CloudStack's
    // ovs-pvlan-*.sh) that this agent does not program; accepting the URI
    // as a plain VLAN would silently let isolated VMs talk to each other.
    if scheme.eq_ignore_ascii_case("pvlan") {
        return Err(NicError::conflict(
            "broadcast_uri",
            format!(
                "{}: private VLANs are not supported by nic-agent (they need OVS flows it does not program); plug this NIC with cloudstack-agent",
                super::error::cut(uri)
            ),
        ));
    }
    if scheme.eq_ignore_ascii_case("vxlan") {
        return uri_number(rest)
            .and_then(|n| Vni::try_from(n).ok())
            .map(|v| Some(Segment::Vxlan(v)))
            .ok_or_else(bad);
    }
    Err(bad())
}

/// A segment as [`Segment`]'s `Display` writes it (`plain`, `vlan://100`,
/// `vxlan://5001`, `vlan://untagged`), read back.
pub fn parse_segment_uri(uri: &str) -> Result<Segment, NicError> {
    if uri == "plain" {
        return Ok(Segment::Plain);
    }
    parse_broadcast_uri(uri)?.ok_or_else(|| NicError::invalid("broadcast_uri", uri, URI_ALLOWED))
}

/// Combines `vlan`, `vni` and `broadcast_uri` into one segment.
fn segment(raw: &RawNic) -> Result<Segment, NicError> {
    let vlan = raw.vlan.map(VlanId::try_from).transpose()?;
    let vni = raw.vni.map(Vni::try_from).transpose()?;
    let from_fields = match (vlan, vni) {
        (Some(_), Some(_)) => {
            return Err(NicError::conflict(
                "vni",
                "vlan and vni are mutually exclusive: a NIC sits on one segment",
            ))
        }
        (Some(v), None) => Some(Segment::Vlan(v)),
        (None, Some(v)) => Some(Segment::Vxlan(v)),
        (None, None) => None,
    };
    let from_uri = parse_broadcast_uri(&raw.broadcast_uri)?;
    Ok(match (from_uri, from_fields) {
        (Some(u), Some(f)) if u == f => u,
        (Some(u), Some(f)) => {
            return Err(NicError::conflict(
                "broadcast_uri",
                format!(
                    "{u} disagrees with {f} from the vlan/vni field; give one or make them match"
                ),
            ))
        }
        (Some(s), None) | (None, Some(s)) => s,
        (None, None) => Segment::Plain,
    })
}

/// Validates one direction of shaping; shared with UpdateNic.
pub(crate) fn bandwidth(
    prefix: &'static str,
    raw: Option<&RawBandwidth>,
) -> Result<Option<Bandwidth>, NicError> {
    let Some(r) = raw else { return Ok(None) };
    if *r == RawBandwidth::default() {
        return Ok(None);
    }
    let f = fields(prefix);
    if r.rate_mbps != 0 {
        if r.average_kbps != 0 {
            return Err(NicError::conflict(
                f.rate,
                "rate_mbps and average_kbps are alternatives; set one",
            ));
        }
        // rate_mbps defines both average and peak; a separate peak or burst
        // would silently override half of it.
        if r.peak_kbps != 0 || r.burst_kb != 0 {
            return Err(NicError::conflict(
                f.rate,
                "rate_mbps sets average and peak itself; drop peak_kbps and burst_kb",
            ));
        }
        return Bandwidth::from_mbps(prefix, r.rate_mbps).map(Some);
    }
    if r.average_kbps == 0 {
        return Err(NicError::invalid(
            f.average,
            0,
            format!("1-{MAX_KB} (required when peak_kbps or burst_kb is set)"),
        ));
    }
    let nz = |v: u64| (v != 0).then_some(v);
    Bandwidth::new(prefix, r.average_kbps, nz(r.peak_kbps), nz(r.burst_kb)).map(Some)
}

impl TryFrom<RawNic> for NicSpec {
    type Error = NicError;

    fn try_from(raw: RawNic) -> Result<Self, NicError> {
        let mac = MacAddr::try_from(raw.mac.as_str())?;
        let bridge = BridgeName::try_from(raw.bridge.as_str())?;
        let switch = if raw.ovs {
            SwitchType::OpenVswitch
        } else {
            SwitchType::LinuxBridge
        };
        let segment = segment(&raw)?;
        if let (SwitchType::OpenVswitch, Segment::Vxlan(_)) = (switch, segment) {
            let field = if raw.vni.is_some() {
                "vni"
            } else {
                "broadcast_uri"
            };
            return Err(NicError::conflict(
                field,
                "VXLAN is supported only on Linux bridges in this agent, not on OVS",
            ));
        }

        let mtu = raw.mtu.map(Mtu::try_from).transpose()?;
        let queues = raw.queues.map(QueueCount::try_from).transpose()?;
        let model = if raw.model.is_empty() {
            NicModel::Virtio
        } else {
            raw.model.parse()?
        };
        let vhost = if raw.vhost.is_empty() {
            VhostMode::Auto
        } else {
            raw.vhost.parse()?
        };
        // QEMU implements these for virtio-net only; libvirt would refuse
        // them at attach time with a less helpful message.
        if !model.is_virtio() {
            if mtu.is_some() {
                return Err(NicError::conflict(
                    "mtu",
                    format!("MTU is virtio-only; model {model} cannot carry it"),
                ));
            }
            if queues.is_some() {
                return Err(NicError::conflict(
                    "queues",
                    format!("multi-queue is virtio-only; model {model} has one queue"),
                ));
            }
            if vhost == VhostMode::On {
                return Err(NicError::conflict(
                    "vhost",
                    format!("vhost-net is virtio-only; model {model} cannot use it"),
                ));
            }
        }

        let mp = raw.mac_policy;
        // PromiscuousMode is the IDS flag, so the allow_promisc_bridges
        // check applies to it unchanged; an explicit "false" beside
        // promiscuous=true is a contradiction, not a tie to break.
        if mp.promiscuous_mode == Some(false) && raw.promiscuous {
            return Err(NicError::conflict(
                "mac_policy.promiscuous_mode",
                "false contradicts promiscuous=true; drop one",
            ));
        }
        let promiscuous = raw.promiscuous || mp.promiscuous_mode == Some(true);
        let nic_uuid = if raw.nic_uuid.is_empty() {
            None
        } else {
            Some(plug::nic_uuid(&raw.nic_uuid)?)
        };
        let alias = if raw.alias.is_empty() {
            None
        } else {
            Some(Alias::try_from(raw.alias.as_str())?)
        };
        // The NIC uuid lives in the alias: it is the one free-form,
        // caller-chosen name libvirt keeps on every interface type, live
        // and persistent, and reports in dumpxml.
        let alias = match (nic_uuid, alias) {
            (None, a) => a,
            (Some(u), None) => Some(Alias::try_from(
                plug::alias_for_uuid(u, promiscuous).as_str(),
            )?),
            (Some(u), Some(a)) => {
                let want = plug::alias_for_uuid(u, promiscuous);
                if a.as_str() != want {
                    return Err(NicError::conflict(
                        "nic_uuid",
                        format!("the NIC uuid is kept in the alias {want}; drop alias or set it to that"),
                    ));
                }
                Some(a)
            }
        };
        let inbound = bandwidth("inbound", raw.inbound.as_ref())?;
        let outbound = bandwidth("outbound", raw.outbound.as_ref())?;
        let pci_slot = raw.pci_slot.map(PciSlot::try_from).transpose()?;
        let acpi_index = raw.acpi_index.map(AcpiIndex::try_from).transpose()?;
        let tx_queue_len = raw.tx_queue_len.map(TxQueueLen::try_from).transpose()?;
        let device_id = raw.device_id.map(plug::device_id).transpose()?;
        // libvirt keeps a NIC's order only through the ACPI index (the PCI
        // slot is the PCI module's choice), so deviceId N becomes index N+1.
        let acpi_index = match (device_id, acpi_index) {
            (None, a) => a,
            (Some(d), None) => Some(AcpiIndex::try_from(d + 1)?),
            (Some(d), Some(a)) if a.get() == d + 1 => Some(a),
            (Some(d), Some(a)) => {
                return Err(NicError::conflict(
                    "device_id",
                    format!(
                        "device_id {d} is kept as acpi_index {}, but acpi_index is {a}; drop one",
                        d + 1
                    ),
                ))
            }
        };
        if raw.packed && !model.is_virtio() {
            return Err(NicError::conflict(
                "packed",
                format!("packed virtqueues are virtio-only; model {model} has none"),
            ));
        }
        let (ipv4, ipv6, secondary_ips) = plug::addresses(&raw.addresses)?;
        let plug = PlugDetails {
            default_nic: raw.default_nic,
            ipv4,
            ipv6,
            secondary_ips,
            security_group_enabled: raw.security_group_enabled,
            multicast_rate_mbps: plug::multicast_rate(raw.multicast_rate_mbps)?,
            mac_policy: mp,
        };
        let interface_id = if raw.interface_id.is_empty() {
            None
        } else {
            let id = InterfaceId::try_from(raw.interface_id.as_str())?;
            if switch != SwitchType::OpenVswitch {
                return Err(NicError::conflict(
                    "interface_id",
                    "an interface id is an OVS port property; set switch_type to OVS or drop it",
                ));
            }
            Some(id)
        };

        Ok(NicSpec {
            mac,
            bridge,
            switch,
            segment,
            mtu,
            queues,
            tx_queue_len,
            model,
            link: if raw.link_down {
                LinkState::Down
            } else {
                LinkState::Up
            },
            promiscuous,
            alias,
            inbound,
            outbound,
            pci_slot,
            acpi_index,
            vhost,
            interface_id,
            anti_spoofing: raw.anti_spoofing,
            ips: ips(&raw.ips)?,
            pxe_disable: raw.pxe_disable,
            packed: raw.packed,
            nic_uuid,
            device_id,
            plug,
        })
    }
}

/// Equal, or at least one side left the value to be assigned later.
fn same_if_both_set<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

impl NicSpec {
    /// Names of the fields in which `self` and `other` differ, in a fixed
    /// order, using proto field names (`segment` stands for
    /// vlan/vni/broadcast_uri, `switch_type` for the switch). Used to turn
    /// "same MAC, different spec" into an `ALREADY_EXISTS` that says what
    /// differs.
    ///
    /// `alias`, `interface_id` and `pci_slot` are compared only when both
    /// sides have them: when a request leaves them out, they are generated
    /// or assigned later, so a retry without them is still the same NIC.
    pub fn diff(&self, other: &NicSpec) -> Vec<&'static str> {
        let checks = [
            ("mac", self.mac == other.mac),
            ("bridge", self.bridge == other.bridge),
            ("switch_type", self.switch == other.switch),
            ("segment", self.segment == other.segment),
            ("mtu", self.mtu == other.mtu),
            ("queues", self.queues == other.queues),
            ("tx_queue_len", self.tx_queue_len == other.tx_queue_len),
            ("model", self.model == other.model),
            ("link", self.link == other.link),
            ("promiscuous", self.promiscuous == other.promiscuous),
            ("alias", same_if_both_set(&self.alias, &other.alias)),
            ("inbound", self.inbound == other.inbound),
            ("outbound", self.outbound == other.outbound),
            (
                "pci_slot",
                same_if_both_set(&self.pci_slot, &other.pci_slot),
            ),
            ("acpi_index", self.acpi_index == other.acpi_index),
            ("vhost", self.vhost == other.vhost),
            ("pxe_disable", self.pxe_disable == other.pxe_disable),
            ("packed", self.packed == other.packed),
            (
                "interface_id",
                same_if_both_set(&self.interface_id, &other.interface_id),
            ),
            ("anti_spoofing", self.anti_spoofing == other.anti_spoofing),
            ("ips", self.ips == other.ips),
        ];
        checks
            .into_iter()
            .filter(|(_, same)| !same)
            .map(|(name, _)| name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawNic {
        RawNic {
            mac: "52:54:00:12:34:56".into(),
            bridge: "cloudbr0".into(),
            ..RawNic::default()
        }
    }

    fn spec(r: RawNic) -> NicSpec {
        NicSpec::try_from(r).expect("valid request")
    }

    fn err(r: RawNic) -> NicError {
        NicSpec::try_from(r).expect_err("request should be rejected")
    }

    fn is_conflict(e: &NicError, field: &str) -> bool {
        matches!(e, NicError::Conflict { field: f, .. } if *f == field)
    }

    fn is_invalid(e: &NicError, field: &str) -> bool {
        matches!(e, NicError::Invalid { field: f, .. } if *f == field)
    }

    #[test]
    fn minimal_request_gets_the_defaults() {
        let s = spec(raw());
        assert_eq!(s.mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(s.bridge.as_str(), "cloudbr0");
        assert_eq!(s.switch, SwitchType::LinuxBridge);
        assert_eq!(s.segment, Segment::Plain);
        assert_eq!(s.model, NicModel::Virtio);
        assert_eq!(s.link, LinkState::Up);
        assert_eq!(s.vhost, VhostMode::Auto);
        assert_eq!(
            (s.mtu, s.queues, s.alias, s.inbound, s.outbound),
            (None, None, None, None, None)
        );
        assert_eq!(
            (s.pci_slot, s.acpi_index, s.interface_id),
            (None, None, None)
        );
        assert!(!s.promiscuous);
    }

    #[test]
    fn full_request_keeps_every_value() {
        let s = spec(RawNic {
            ovs: true,
            vlan: Some(100),
            mtu: Some(1450),
            queues: Some(4),
            model: "virtio".into(),
            link_down: true,
            promiscuous: true,
            alias: "ua-net1".into(),
            inbound: Some(RawBandwidth {
                average_kbps: 1000,
                peak_kbps: 2000,
                burst_kb: 512,
                rate_mbps: 0,
            }),
            outbound: Some(RawBandwidth {
                rate_mbps: 8,
                ..RawBandwidth::default()
            }),
            pci_slot: Some(5),
            acpi_index: Some(3),
            vhost: "off".into(),
            interface_id: "3f2b6c1e-8d4a-4f57-9c2e-1a2b3c4d5e6f".into(),
            ..raw()
        });
        assert_eq!(s.switch, SwitchType::OpenVswitch);
        assert_eq!(s.segment, Segment::Vlan(VlanId::try_from(100).unwrap()));
        assert_eq!(s.mtu.map(Mtu::get), Some(1450));
        assert_eq!(s.queues.map(QueueCount::get), Some(4));
        assert_eq!(s.link, LinkState::Down);
        assert!(s.promiscuous);
        assert_eq!(s.alias.as_ref().map(Alias::as_str), Some("ua-net1"));
        let i = s.inbound.unwrap();
        assert_eq!(
            (i.average(), i.peak(), i.burst()),
            (1000, Some(2000), Some(512))
        );
        let o = s.outbound.unwrap();
        assert_eq!((o.average(), o.peak(), o.burst()), (1000, Some(1000), None));
        assert_eq!(s.pci_slot.map(PciSlot::get), Some(5));
        assert_eq!(s.acpi_index.map(AcpiIndex::get), Some(3));
        assert_eq!(s.vhost, VhostMode::Off);
        assert_eq!(
            s.interface_id.unwrap().to_string(),
            "3f2b6c1e-8d4a-4f57-9c2e-1a2b3c4d5e6f"
        );
    }

    #[test]
    fn mac_and_bridge_are_required() {
        let e = err(RawNic {
            mac: String::new(),
            ..raw()
        });
        assert!(
            is_invalid(&e, "mac") && e.to_string().contains("required"),
            "{e}"
        );
        let e = err(RawNic {
            bridge: String::new(),
            ..raw()
        });
        assert!(
            is_invalid(&e, "bridge") && e.to_string().contains("required"),
            "{e}"
        );
    }

    #[test]
    fn field_errors_name_the_proto_field() {
        let cases: Vec<(RawNic, &str)> = vec![
            (
                RawNic {
                    mac: "ff:ff:ff:ff:ff:ff".into(),
                    ..raw()
                },
                "mac",
            ),
            (
                RawNic {
                    bridge: "br 0".into(),
                    ..raw()
                },
                "bridge",
            ),
            (
                RawNic {
                    mtu: Some(67),
                    ..raw()
                },
                "mtu",
            ),
            (
                RawNic {
                    queues: Some(0),
                    ..raw()
                },
                "queues",
            ),
            (
                RawNic {
                    model: "ne2k".into(),
                    ..raw()
                },
                "model",
            ),
            (
                RawNic {
                    alias: "net1".into(),
                    ..raw()
                },
                "alias",
            ),
            (
                RawNic {
                    pci_slot: Some(0),
                    ..raw()
                },
                "pci_slot",
            ),
            (
                RawNic {
                    acpi_index: Some(16384),
                    ..raw()
                },
                "acpi_index",
            ),
            (
                RawNic {
                    vhost: "maybe".into(),
                    ..raw()
                },
                "vhost",
            ),
            (
                RawNic {
                    ovs: true,
                    interface_id: "x".into(),
                    ..raw()
                },
                "interface_id",
            ),
            (
                RawNic {
                    vni: Some(16_777_216),
                    ..raw()
                },
                "vni",
            ),
        ];
        for (r, field) in cases {
            let e = err(r);
            assert!(
                is_invalid(&e, field),
                "expected Invalid({field}), got {e:?}"
            );
        }
    }

    #[test]
    fn vlan_field_accepts_1_to_4094_only() {
        assert_eq!(
            spec(RawNic {
                vlan: Some(1),
                ..raw()
            })
            .segment,
            Segment::Vlan(VlanId::try_from(1).unwrap())
        );
        assert_eq!(
            spec(RawNic {
                vlan: Some(4094),
                ..raw()
            })
            .segment,
            Segment::Vlan(VlanId::try_from(4094).unwrap())
        );
        for v in [0, 4095, 4096] {
            let e = err(RawNic {
                vlan: Some(v),
                ..raw()
            });
            assert!(is_invalid(&e, "vlan"), "{v}: {e:?}");
            assert!(e.to_string().contains("1-4094"), "{e}");
        }
    }

    #[test]
    fn vni_field_gives_a_vxlan_segment() {
        assert_eq!(
            spec(RawNic {
                vni: Some(5000),
                ..raw()
            })
            .segment,
            Segment::Vxlan(Vni::try_from(5000).unwrap())
        );
        assert!(is_invalid(
            &err(RawNic {
                vni: Some(0),
                ..raw()
            }),
            "vni"
        ));
    }

    #[test]
    fn broadcast_uri_forms() {
        let seg = |uri: &str| {
            NicSpec::try_from(RawNic {
                broadcast_uri: uri.into(),
                ..raw()
            })
        };
        let vlan = |n| Segment::Vlan(VlanId::try_from(n).unwrap());
        assert_eq!(seg("vlan://100").unwrap().segment, vlan(100));
        assert_eq!(seg("vlan://1").unwrap().segment, vlan(1));
        assert_eq!(seg("vlan://4094").unwrap().segment, vlan(4094));
        assert_eq!(seg("VLAN://7").unwrap().segment, vlan(7));
        assert_eq!(seg("vlan://4095").unwrap().segment, Segment::Untagged);
        assert_eq!(seg("vlan://untagged").unwrap().segment, Segment::Untagged);
        assert_eq!(
            seg("vxlan://5000").unwrap().segment,
            Segment::Vxlan(Vni::try_from(5000).unwrap())
        );
        assert_eq!(
            seg("vxlan://16777215").unwrap().segment,
            Segment::Vxlan(Vni::try_from(16_777_215).unwrap())
        );
        assert_eq!(seg("").unwrap().segment, Segment::Plain);
    }

    #[test]
    fn bad_broadcast_uris_list_the_allowed_forms() {
        for uri in [
            "vlan://0",
            "vlan://4096",
            "vlan://",
            "vlan://+5",
            "vlan://abc",
            "vlan://99999999999",
            "vxlan://0",
            "vxlan://16777216",
            "vxlan://untagged",
            "lswitch://abc",
            // pvlan:// has its own message: pvlan_is_refused_naming_the_uri.
            "vlan:100",
            "100",
        ] {
            let e = err(RawNic {
                broadcast_uri: uri.into(),
                ..raw()
            });
            assert!(is_invalid(&e, "broadcast_uri"), "{uri}: {e:?}");
            assert!(e.to_string().contains("vxlan://1-16777215"), "{e}");
        }
    }

    #[test]
    fn broadcast_uri_agreeing_with_vlan_field_is_fine() {
        let s = spec(RawNic {
            vlan: Some(100),
            broadcast_uri: "vlan://100".into(),
            ..raw()
        });
        assert_eq!(s.segment, Segment::Vlan(VlanId::try_from(100).unwrap()));
        let s = spec(RawNic {
            vni: Some(9),
            broadcast_uri: "vxlan://9".into(),
            ..raw()
        });
        assert_eq!(s.segment, Segment::Vxlan(Vni::try_from(9).unwrap()));
    }

    #[test]
    fn broadcast_uri_disagreeing_with_vlan_or_vni_is_a_conflict() {
        for r in [
            RawNic {
                vlan: Some(100),
                broadcast_uri: "vlan://200".into(),
                ..raw()
            },
            RawNic {
                vlan: Some(100),
                broadcast_uri: "vlan://untagged".into(),
                ..raw()
            },
            RawNic {
                vlan: Some(100),
                broadcast_uri: "vxlan://100".into(),
                ..raw()
            },
            RawNic {
                vni: Some(100),
                broadcast_uri: "vlan://100".into(),
                ..raw()
            },
            RawNic {
                vni: Some(100),
                broadcast_uri: "vxlan://101".into(),
                ..raw()
            },
        ] {
            let e = err(r.clone());
            assert!(is_conflict(&e, "broadcast_uri"), "{r:?}: {e:?}");
        }
    }

    #[test]
    fn vlan_and_vni_together_are_a_conflict() {
        let e = err(RawNic {
            vlan: Some(100),
            vni: Some(100),
            ..raw()
        });
        assert!(is_conflict(&e, "vni"), "{e:?}");
    }

    #[test]
    fn vxlan_on_ovs_is_a_conflict() {
        let e = err(RawNic {
            ovs: true,
            vni: Some(5000),
            ..raw()
        });
        assert!(is_conflict(&e, "vni"), "{e:?}");
        let e = err(RawNic {
            ovs: true,
            broadcast_uri: "vxlan://5000".into(),
            ..raw()
        });
        assert!(is_conflict(&e, "broadcast_uri"), "{e:?}");
        assert!(e.to_string().contains("OVS"), "{e}");
        // VLANs on OVS are fine.
        assert!(NicSpec::try_from(RawNic {
            ovs: true,
            vlan: Some(5),
            ..raw()
        })
        .is_ok());
    }

    #[test]
    fn mtu_queues_and_vhost_on_are_virtio_only() {
        for model in ["e1000", "e1000e", "rtl8139"] {
            let e = err(RawNic {
                model: model.into(),
                mtu: Some(1500),
                ..raw()
            });
            assert!(
                is_conflict(&e, "mtu") && e.to_string().contains("virtio-only"),
                "{e}"
            );
            let e = err(RawNic {
                model: model.into(),
                queues: Some(1),
                ..raw()
            });
            assert!(
                is_conflict(&e, "queues") && e.to_string().contains("multi-queue"),
                "{e}"
            );
            let e = err(RawNic {
                model: model.into(),
                vhost: "on".into(),
                ..raw()
            });
            assert!(is_conflict(&e, "vhost"), "{e}");
            // Without those, the model itself is fine; vhost=off too.
            let s = spec(RawNic {
                model: model.into(),
                vhost: "off".into(),
                ..raw()
            });
            assert_eq!(s.model.as_str(), model);
        }
        let s = spec(RawNic {
            mtu: Some(9000),
            queues: Some(8),
            vhost: "on".into(),
            ..raw()
        });
        assert_eq!(s.vhost, VhostMode::On);
    }

    #[test]
    fn rate_mbps_with_average_is_a_conflict() {
        let bw = RawBandwidth {
            average_kbps: 100,
            rate_mbps: 10,
            ..RawBandwidth::default()
        };
        let e = err(RawNic {
            inbound: Some(bw.clone()),
            ..raw()
        });
        assert!(is_conflict(&e, "inbound.rate_mbps"), "{e:?}");
        let e = err(RawNic {
            outbound: Some(bw),
            ..raw()
        });
        assert!(is_conflict(&e, "outbound.rate_mbps"), "{e:?}");
        let bw = RawBandwidth {
            peak_kbps: 100,
            rate_mbps: 10,
            ..RawBandwidth::default()
        };
        let e = err(RawNic {
            inbound: Some(bw),
            ..raw()
        });
        assert!(is_conflict(&e, "inbound.rate_mbps"), "{e:?}");
    }

    #[test]
    fn all_zero_bandwidth_means_no_shaping() {
        let s = spec(RawNic {
            inbound: Some(RawBandwidth::default()),
            outbound: Some(RawBandwidth::default()),
            ..raw()
        });
        assert_eq!((s.inbound, s.outbound), (None, None));
    }

    #[test]
    fn peak_or_burst_without_average_is_rejected() {
        let bw = RawBandwidth {
            burst_kb: 10,
            ..RawBandwidth::default()
        };
        let e = err(RawNic {
            outbound: Some(bw),
            ..raw()
        });
        assert!(is_invalid(&e, "outbound.average_kbps"), "{e:?}");
        let bw = RawBandwidth {
            average_kbps: 10,
            peak_kbps: 5,
            ..RawBandwidth::default()
        };
        let e = err(RawNic {
            inbound: Some(bw),
            ..raw()
        });
        assert!(is_conflict(&e, "inbound.peak_kbps"), "{e:?}");
    }

    #[test]
    fn interface_id_needs_ovs() {
        let id = "3f2b6c1e-8d4a-4f57-9c2e-1a2b3c4d5e6f";
        let e = err(RawNic {
            interface_id: id.into(),
            ..raw()
        });
        assert!(is_conflict(&e, "interface_id"), "{e:?}");
        assert!(spec(RawNic {
            ovs: true,
            interface_id: id.into(),
            ..raw()
        })
        .interface_id
        .is_some());
    }

    #[test]
    fn diff_is_empty_for_identical_specs() {
        let a = spec(RawNic {
            mtu: Some(1450),
            alias: "ua-a".into(),
            ..raw()
        });
        assert!(a.diff(&a.clone()).is_empty());
    }

    #[test]
    fn diff_names_each_differing_field() {
        let a = spec(raw());
        let b = spec(RawNic {
            bridge: "cloudbr1".into(),
            vlan: Some(10),
            mtu: Some(1450),
            link_down: true,
            ..raw()
        });
        assert_eq!(a.diff(&b), vec!["bridge", "segment", "mtu", "link"]);
        assert_eq!(b.diff(&a), vec!["bridge", "segment", "mtu", "link"]);
        let c = spec(RawNic {
            model: "e1000".into(),
            promiscuous: true,
            ..raw()
        });
        assert_eq!(a.diff(&c), vec!["model", "promiscuous"]);
        let d = spec(RawNic {
            mac: "52:54:00:00:00:01".into(),
            acpi_index: Some(1),
            ..raw()
        });
        assert_eq!(a.diff(&d), vec!["mac", "acpi_index"]);
    }

    #[test]
    fn diff_ignores_alias_interface_id_and_slot_left_unset() {
        let bare = spec(RawNic { ovs: true, ..raw() });
        let full = spec(RawNic {
            ovs: true,
            alias: "ua-x".into(),
            pci_slot: Some(4),
            interface_id: "3f2b6c1e-8d4a-4f57-9c2e-1a2b3c4d5e6f".into(),
            ..raw()
        });
        assert!(bare.diff(&full).is_empty());
        assert!(full.diff(&bare).is_empty());
        let other = spec(RawNic {
            ovs: true,
            alias: "ua-y".into(),
            pci_slot: Some(5),
            interface_id: "4f2b6c1e-8d4a-4f57-9c2e-1a2b3c4d5e6f".into(),
            ..raw()
        });
        assert_eq!(full.diff(&other), vec!["alias", "pci_slot", "interface_id"]);
    }

    #[test]
    fn ips_accept_both_families_and_refuse_non_host_addresses() {
        let s = spec(RawNic {
            anti_spoofing: true,
            ips: vec!["10.1.1.5".into(), "2001:db8::5".into()],
            ..raw()
        });
        assert!(s.anti_spoofing);
        assert_eq!(s.ips.len(), 2);
        for bad in [
            "10.1.1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "127.0.0.1",
            "255.255.255.255",
            "10.0.0.0/8",
        ] {
            let e = err(RawNic {
                ips: vec![bad.into()],
                ..raw()
            });
            assert!(is_invalid(&e, "ips"), "{bad}: {e}");
        }
        let e = err(RawNic {
            ips: vec!["10.1.1.5".into(), "10.1.1.5".into()],
            ..raw()
        });
        assert!(is_conflict(&e, "ips"), "{e}");
    }

    const NIC_UUID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";

    #[test]
    fn nic_uuid_becomes_the_alias_and_ids_nics_keep_their_prefix() {
        let s = spec(RawNic {
            nic_uuid: NIC_UUID.into(),
            ..raw()
        });
        assert_eq!(
            s.alias.as_ref().map(Alias::as_str),
            Some(format!("ua-nic-{NIC_UUID}").as_str())
        );
        let ids = spec(RawNic {
            nic_uuid: NIC_UUID.into(),
            mac_policy: MacPolicy {
                promiscuous_mode: Some(true),
                ..MacPolicy::default()
            },
            ..raw()
        });
        assert!(ids.promiscuous, "PromiscuousMode is the IDS flag");
        assert_eq!(
            ids.alias.as_ref().map(Alias::as_str),
            Some(format!("ua-ids-nic-{NIC_UUID}").as_str())
        );
        // The same alias given explicitly is fine; another is a conflict.
        spec(RawNic {
            nic_uuid: NIC_UUID.into(),
            alias: format!("ua-nic-{NIC_UUID}"),
            ..raw()
        });
        let e = err(RawNic {
            nic_uuid: NIC_UUID.into(),
            alias: "ua-web".into(),
            ..raw()
        });
        assert!(is_conflict(&e, "nic_uuid"), "{e}");
        assert!(is_invalid(
            &err(RawNic {
                nic_uuid: "x".into(),
                ..raw()
            }),
            "nic_uuid"
        ));
    }

    #[test]
    fn device_id_is_kept_as_acpi_index_plus_one() {
        let s = spec(RawNic {
            device_id: Some(0),
            ..raw()
        });
        assert_eq!(
            (s.device_id, s.acpi_index.map(AcpiIndex::get)),
            (Some(0), Some(1))
        );
        spec(RawNic {
            device_id: Some(2),
            acpi_index: Some(3),
            ..raw()
        });
        assert!(is_conflict(
            &err(RawNic {
                device_id: Some(2),
                acpi_index: Some(4),
                ..raw()
            }),
            "device_id"
        ));
        assert!(is_invalid(
            &err(RawNic {
                device_id: Some(16383),
                ..raw()
            }),
            "device_id"
        ));
    }

    #[test]
    fn pvlan_is_refused_naming_the_uri() {
        let e = err(RawNic {
            broadcast_uri: "pvlan://100-i200".into(),
            ..raw()
        });
        assert!(is_conflict(&e, "broadcast_uri"), "{e}");
        assert!(e.to_string().contains("pvlan://100-i200"), "{e}");
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn packed_is_virtio_only_and_pxe_and_carried_fields_pass_through() {
        assert!(is_conflict(
            &err(RawNic {
                packed: true,
                model: "e1000".into(),
                ..raw()
            }),
            "packed"
        ));
        let s = spec(RawNic {
            packed: true,
            pxe_disable: true,
            default_nic: true,
            security_group_enabled: true,
            multicast_rate_mbps: 10,
            addresses: RawAddresses {
                ipv4_cidr: "10.1.1.5/24".into(),
                ipv4_gateway: "10.1.1.1".into(),
                secondary_ips: vec!["10.1.1.6".into()],
                ..RawAddresses::default()
            },
            mac_policy: MacPolicy {
                forged_transmits: Some(false),
                ..MacPolicy::default()
            },
            ..raw()
        });
        assert!(s.packed && s.pxe_disable && !s.promiscuous);
        assert!(s.plug.default_nic && s.plug.security_group_enabled);
        assert_eq!(s.plug.multicast_rate_mbps, Some(10));
        assert_eq!(s.plug.secondary_ips.len(), 1);
        assert_eq!(s.plug.mac_policy.forged_transmits, Some(false));
        assert!(is_conflict(
            &err(RawNic {
                promiscuous: true,
                mac_policy: MacPolicy {
                    promiscuous_mode: Some(false),
                    ..MacPolicy::default()
                },
                ..raw()
            }),
            "mac_policy.promiscuous_mode"
        ));
    }
}
