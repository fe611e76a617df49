//! Conversions between protobuf messages and the crate's own types. Proto
//! types go no further than this file.

use super::pb;
use crate::hotplug::{AttachOutcome, NicReport, VmReport};
use crate::hypervisor::Target;
use crate::nic::{MacPolicy, PlugDetails, RawAddresses, RawBandwidth, RawNic};
use crate::pci::{Capacity, PciAddress};
use crate::xml::domain::BandwidthView;

/// proto `NicSpec` → unvalidated [`RawNic`]; validation happens in
/// `NicSpec::try_from`.
pub fn raw_nic(n: &pb::NicSpec) -> RawNic {
    RawNic {
        mac: n.mac.clone(),
        bridge: n.bridge.clone(),
        ovs: n.switch_type == pb::SwitchType::OpenVswitch as i32,
        vlan: n.vlan,
        vni: n.vni,
        broadcast_uri: n.broadcast_uri.clone(),
        mtu: n.mtu,
        queues: n.queues,
        tx_queue_len: n.tx_queue_len,
        model: n.model.clone(),
        link_down: n.link_down,
        promiscuous: n.promiscuous,
        alias: n.alias.clone(),
        inbound: n.inbound.as_ref().map(raw_bw),
        outbound: n.outbound.as_ref().map(raw_bw),
        pci_slot: n.pci_slot,
        acpi_index: n.acpi_index,
        vhost: n.vhost.clone(),
        interface_id: n.interface_id.clone(),
        anti_spoofing: n.anti_spoofing,
        ips: n.ips.clone(),
        pxe_disable: n.pxe_disable,
        nic_uuid: n.nic_uuid.clone(),
        device_id: n.device_id,
        default_nic: n.default_nic,
        addresses: RawAddresses {
            ipv4_cidr: n.ipv4_cidr.clone(),
            ipv4_gateway: n.ipv4_gateway.clone(),
            ipv6_cidr: n.ipv6_cidr.clone(),
            ipv6_gateway: n.ipv6_gateway.clone(),
            secondary_ips: n.secondary_ips.clone(),
        },
        security_group_enabled: n.security_group_enabled,
        multicast_rate_mbps: n.multicast_rate_mbps,
        packed: n.packed,
        mac_policy: n
            .mac_policy
            .as_ref()
            .map(|m| MacPolicy {
                promiscuous_mode: m.promiscuous_mode,
                mac_address_changes: m.mac_address_changes,
                forged_transmits: m.forged_transmits,
                mac_learning: m.mac_learning,
            })
            .unwrap_or_default(),
    }
}

/// The carried (validated, not applied) PlugNic fields → proto.
pub fn carried(p: &PlugDetails) -> pb::PlugCarried {
    let cidr = |a: String, prefix: u8| format!("{a}/{prefix}");
    let m = p.mac_policy;
    pb::PlugCarried {
        default_nic: p.default_nic,
        ipv4_cidr: p
            .ipv4
            .map(|c| cidr(c.addr.to_string(), c.prefix))
            .unwrap_or_default(),
        ipv4_gateway: p
            .ipv4
            .and_then(|c| c.gateway)
            .map(|g| g.to_string())
            .unwrap_or_default(),
        ipv6_cidr: p
            .ipv6
            .map(|c| cidr(c.addr.to_string(), c.prefix))
            .unwrap_or_default(),
        ipv6_gateway: p
            .ipv6
            .and_then(|c| c.gateway)
            .map(|g| g.to_string())
            .unwrap_or_default(),
        secondary_ips: p.secondary_ips.iter().map(|ip| ip.to_string()).collect(),
        security_group_enabled: p.security_group_enabled,
        multicast_rate_mbps: p.multicast_rate_mbps.unwrap_or(0),
        mac_policy: Some(pb::MacPolicy {
            promiscuous_mode: m.promiscuous_mode,
            mac_address_changes: m.mac_address_changes,
            forged_transmits: m.forged_transmits,
            mac_learning: m.mac_learning,
        }),
    }
}

fn raw_bw(b: &pb::Bandwidth) -> RawBandwidth {
    RawBandwidth {
        average_kbps: b.average_kbps,
        peak_kbps: b.peak_kbps,
        burst_kb: b.burst_kb,
        rate_mbps: b.rate_mbps,
    }
}

/// Checks the switch_type enum value; unknown numbers are bad input.
pub fn check_switch_type(v: i32) -> Result<(), crate::nic::NicError> {
    pb::SwitchType::try_from(v)
        .map(|_| ())
        .map_err(|_| crate::nic::NicError::Invalid {
            field: "switch_type",
            value: v.to_string(),
            allowed: "0 (unspecified), 1 (LINUX_BRIDGE), 2 (OPEN_VSWITCH)".into(),
        })
}

fn pci(a: &PciAddress) -> pb::PciAddress {
    pb::PciAddress {
        domain: a.domain.into(),
        bus: a.bus.into(),
        slot: a.slot.into(),
        function: a.function.into(),
    }
}

/// A reported NIC → proto.
pub fn nic(n: &NicReport) -> pb::Nic {
    pb::Nic {
        mac: n.mac.clone(),
        alias: n.alias.clone(),
        target_dev: n.target.clone(),
        pci: n.pci.as_ref().map(pci),
        model: n.model.clone(),
        queues: n.queues,
        mtu: n.mtu,
        bridge: n.bridge.clone(),
        link_state: n.link_state.clone(),
        interface_type: n.kind.clone(),
        vlan: n.vlan,
        in_live: n.in_live,
        in_config: n.in_config,
        inbound: n.inbound.as_ref().map(bandwidth),
        outbound: n.outbound.as_ref().map(bandwidth),
        driver: n.driver.clone(),
        acpi_index: n.acpi_index,
        interface_id: n.interface_id.clone(),
        filter: n.filter.clone(),
        nic_uuid: n.nic_uuid.clone(),
        device_id: n.device_id,
        pxe_disabled: n.pxe_disabled,
        packed: n.packed,
    }
}

/// libvirt's bandwidth figures → proto; a figure libvirt does not have is 0.
fn bandwidth(b: &BandwidthView) -> pb::Bandwidth {
    pb::Bandwidth {
        average_kbps: b.average.unwrap_or(0),
        peak_kbps: b.peak.unwrap_or(0),
        burst_kb: b.burst.unwrap_or(0),
        rate_mbps: 0,
    }
}

/// An attach outcome → proto.
pub fn attach_response(o: &AttachOutcome, request_id: &str) -> pb::AttachNicResponse {
    let applied = o
        .applied
        .iter()
        .map(|t| match t {
            Target::Live => "live",
            Target::Config => "config",
        })
        .collect::<Vec<_>>()
        .join("+");
    pb::AttachNicResponse {
        nic: Some(nic(&o.nic)),
        already_present: o.already_present,
        applied,
        request_id: request_id.to_string(),
        notes: o.notes.clone(),
        carried: None,
    }
}

/// A VM → proto.
pub fn vm(v: &VmReport) -> pb::Vm {
    pb::Vm {
        name: v.name.clone(),
        uuid: v.uuid.clone(),
        state: v.state.clone(),
        persistent: v.persistent,
        vcpus: v.vcpus,
        machine: v.machine.clone(),
        nic_count: v.nic_count,
    }
}

/// Capacity → proto.
pub fn capacity(
    c: &Capacity,
    nic_count: u32,
    nic_limit: Option<u32>,
    attachable: u32,
) -> pb::GetPciCapacityResponse {
    pb::GetPciCapacityResponse {
        free_slots: c.free,
        used_slots: c.used,
        total_slots: c.total,
        next: c.next.as_ref().map(pci),
        machine_family: match c.family {
            crate::xml::domain::MachineFamily::Pc => "pc".into(),
            crate::xml::domain::MachineFamily::Q35 => "q35".into(),
        },
        nic_limit: nic_limit.unwrap_or(0),
        nic_count,
        attachable,
        notes: c.notes.clone(),
        full_reason: c.full.map(|f| f.as_str().to_owned()).unwrap_or_default(),
    }
}

// --- day-2: Diagnose ---

/// A diagnosis → proto.
pub fn diagnosis(d: &crate::doctor::Diagnosis, request_id: &str) -> pb::DiagnoseResponse {
    use crate::doctor::HopStatus;
    pb::DiagnoseResponse {
        hops: d
            .hops
            .iter()
            .map(|h| pb::Hop {
                name: h.name.to_string(),
                status: match h.status {
                    HopStatus::Ok => pb::HopStatus::Ok,
                    HopStatus::Warning => pb::HopStatus::Warning,
                    HopStatus::Fault => pb::HopStatus::Fault,
                } as i32,
                evidence: h.evidence.clone(),
                fix: h.fix.clone(),
            })
            .collect(),
        nic: d.nic.as_ref().map(nic),
        request_id: request_id.to_string(),
    }
}

/// proto `Bandwidth` of an UpdateNic → what to do with that direction.
pub fn bandwidth_change(
    prefix: &'static str,
    b: &pb::Bandwidth,
) -> Result<crate::hotplug::BandwidthChange, crate::nic::NicError> {
    crate::hotplug::BandwidthChange::from_raw(prefix, &raw_bw(b))
}

/// proto `UpdateNicRequest` → the validated change.
pub fn nic_update(
    r: &pb::UpdateNicRequest,
) -> Result<crate::hotplug::NicUpdate, crate::nic::NicError> {
    Ok(crate::hotplug::NicUpdate {
        link: r.link_down.map(|d| {
            if d {
                crate::nic::LinkState::Down
            } else {
                crate::nic::LinkState::Up
            }
        }),
        inbound: r
            .inbound
            .as_ref()
            .map(|b| bandwidth_change("inbound", b))
            .transpose()?,
        outbound: r
            .outbound
            .as_ref()
            .map(|b| bandwidth_change("outbound", b))
            .transpose()?,
    })
}

/// A `GuestConfigRequest` as the renderer's request: proto3's empty and
/// zero values mean "not given".
pub fn guest_request(r: &pb::GuestConfigRequest) -> crate::guest::GuestRequest {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    crate::guest::GuestRequest {
        mac: r.mac.clone(),
        name: if r.name.is_empty() {
            "eth1".to_string()
        } else {
            r.name.clone()
        },
        ip: opt(&r.ip),
        gateway: opt(&r.gateway),
        table: (r.table != 0).then_some(r.table),
        ip6: opt(&r.ip6),
        gateway6: opt(&r.gateway6),
        ip6_mode: opt(&r.ip6_mode),
        default_route: r.default_route,
    }
}

/// The rendered files as the response's list.
pub fn guest_files(files: Vec<crate::guest::GuestFile>, rid: &str) -> pb::GuestConfigResponse {
    pb::GuestConfigResponse {
        files: files
            .into_iter()
            .map(|f| pb::GuestFile {
                path: f.path,
                mode: f.mode,
                purpose: f.purpose,
                content: f.content,
            })
            .collect(),
        request_id: rid.to_string(),
    }
}

/// ReplugNic's new network → a [`ReplugTarget`], validated by the attach
/// rules (the same fields, the same errors).
pub fn replug_target(
    r: &pb::ReplugNicRequest,
) -> Result<crate::hotplug::replug::ReplugTarget, crate::nic::NicError> {
    check_switch_type(r.switch_type)?;
    let raw = RawNic {
        mac: r.mac.clone(),
        bridge: r.bridge.clone(),
        ovs: r.switch_type == pb::SwitchType::OpenVswitch as i32,
        vlan: r.vlan,
        vni: r.vni,
        broadcast_uri: r.broadcast_uri.clone(),
        ..RawNic::default()
    };
    let spec = crate::nic::NicSpec::try_from(raw)?;
    Ok(crate::hotplug::replug::ReplugTarget::from_spec(&spec))
}

/// A replug's outcome → the response.
pub fn replug(o: &crate::hotplug::replug::ReplugOutcome, rid: &str) -> pb::ReplugNicResponse {
    use crate::hotplug::replug::ReplugWay;
    let way = match o.way {
        ReplugWay::Nothing => pb::ReplugWay::Nothing,
        ReplugWay::InPlace => pb::ReplugWay::InPlace,
        ReplugWay::Unplug { .. } => pb::ReplugWay::Unplug,
    };
    pb::ReplugNicResponse {
        nic: Some(nic(&o.nic)),
        way: way as i32,
        old_bridge: o.old_bridge.clone(),
        request_id: rid.to_string(),
    }
}
