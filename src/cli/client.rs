//! gRPC client subcommands: `vms`, `list`, `attach`, `detach`, `capacity`,
//! `doctor`, `update`, `move`.
//! Human tables by default, JSON with `--json`; errors exit non-zero with
//! the gRPC code and message.

use serde_json::json;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use super::{
    AttachArgs, ClientArgs, DetachArgs, DoctorArgs, MoveArgs, ReplugArgs, UpdateArgs, VmArgs,
};
use crate::api::pb::{self, nic_agent_client::NicAgentClient};

/// A client-side failure, printed as `error: CODE: message`.
#[derive(Debug)]
pub struct ClientError {
    /// The gRPC code (or UNAVAILABLE for connection failures).
    pub code: Code,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", code_name(self.code), self.message)
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

pub use crate::api::status::code_name;

fn unavailable(e: impl std::fmt::Display) -> ClientError {
    ClientError {
        code: Code::Unavailable,
        message: e.to_string(),
    }
}

/// Connects to `HOST:PORT`, `http://HOST:PORT` or `unix:PATH`.
pub async fn connect(server: &str) -> Result<NicAgentClient<Channel>, ClientError> {
    let ch = if let Some(path) = server.strip_prefix("unix:") {
        let path = path.to_string();
        // The URI is required by the API but unused: the connector below
        // dials the socket.
        Endpoint::try_from("http://localhost")
            .map_err(unavailable)?
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(p).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(unavailable)?
    } else {
        let uri = if server.starts_with("http://") || server.starts_with("https://") {
            server.to_string()
        } else {
            format!("http://{server}")
        };
        Endpoint::try_from(uri)
            .map_err(unavailable)?
            .connect()
            .await
            .map_err(|e| unavailable(format!("cannot reach agent at {server}: {e}")))?
    };
    Ok(NicAgentClient::new(ch))
}

fn pci_str(p: &Option<pb::PciAddress>) -> String {
    p.as_ref()
        .map(|a| {
            format!(
                "{:04x}:{:02x}:{:02x}.{:x}",
                a.domain, a.bus, a.slot, a.function
            )
        })
        .unwrap_or_else(|| "-".into())
}

fn nic_json(n: &pb::Nic) -> serde_json::Value {
    json!({
        "mac": n.mac, "alias": n.alias, "target_dev": n.target_dev, "pci": n.pci.as_ref().map(|_| pci_str(&n.pci)),
        "model": n.model, "queues": n.queues, "mtu": n.mtu, "bridge": n.bridge, "link_state": n.link_state,
        "interface_type": n.interface_type, "vlan": n.vlan, "in_live": n.in_live, "in_config": n.in_config,
        "inbound": n.inbound.as_ref().map(bw_json), "outbound": n.outbound.as_ref().map(bw_json),
        "driver": n.driver, "acpi_index": n.acpi_index, "interface_id": n.interface_id,
    })
}

fn bw_json(b: &pb::Bandwidth) -> serde_json::Value {
    json!({"average_kbps": b.average_kbps, "peak_kbps": b.peak_kbps, "burst_kb": b.burst_kb})
}

fn nic_table(nics: &[pb::Nic]) -> String {
    let mut s = format!(
        "{:<19} {:<42} {:<10} {:<14} {:<8} {:>6} {:>5} {:<5} {:<13} {}\n",
        "MAC", "ALIAS", "TARGET", "BRIDGE", "MODEL", "QUEUES", "MTU", "LINK", "PCI", "IN"
    );
    for n in nics {
        let inn = match (n.in_live, n.in_config) {
            (true, true) => "live+config",
            (true, false) => "live",
            (false, true) => "config",
            _ => "-",
        };
        s.push_str(&format!(
            "{:<19} {:<42} {:<10} {:<14} {:<8} {:>6} {:>5} {:<5} {:<13} {}\n",
            n.mac,
            n.alias,
            if n.target_dev.is_empty() {
                "-"
            } else {
                &n.target_dev
            },
            n.bridge,
            n.model,
            n.queues,
            // 0 is proto3's "not reported": no <mtu> in the domain XML.
            if n.mtu == 0 {
                "-".to_string()
            } else {
                n.mtu.to_string()
            },
            n.link_state,
            pci_str(&n.pci),
            inn
        ));
    }
    s
}

/// `vms`
pub async fn vms(a: &ClientArgs) -> Result<String, ClientError> {
    let mut c = connect(&a.server).await?;
    let r = c.list_vms(pb::ListVmsRequest {}).await?.into_inner();
    if a.json {
        let v: Vec<_> = r
            .vms
            .iter()
            .map(|v| json!({"name": v.name, "uuid": v.uuid, "state": v.state, "persistent": v.persistent, "vcpus": v.vcpus, "machine": v.machine, "nic_count": v.nic_count}))
            .collect();
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let mut s = format!(
        "{:<20} {:<36} {:<9} {:<10} {:>5} {:<18} {:>4}\n",
        "NAME", "UUID", "STATE", "PERSISTENT", "VCPUS", "MACHINE", "NICS"
    );
    for v in &r.vms {
        s.push_str(&format!(
            "{:<20} {:<36} {:<9} {:<10} {:>5} {:<18} {:>4}\n",
            v.name, v.uuid, v.state, v.persistent, v.vcpus, v.machine, v.nic_count
        ));
    }
    Ok(s)
}

/// `list`
pub async fn list(a: &VmArgs) -> Result<String, ClientError> {
    let mut c = connect(&a.client.server).await?;
    let r = c
        .list_nics(pb::ListNicsRequest { vm: a.vm.clone() })
        .await?
        .into_inner();
    if a.client.json {
        let v: Vec<_> = r.nics.iter().map(nic_json).collect();
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    Ok(nic_table(&r.nics))
}

/// `attach`
pub async fn attach(a: &AttachArgs) -> Result<String, ClientError> {
    let raw = a.nic.to_raw().map_err(|e| ClientError {
        code: Code::InvalidArgument,
        message: e.to_string(),
    })?;
    let bw = |b: &Option<crate::nic::RawBandwidth>| {
        b.as_ref().map(|b| pb::Bandwidth {
            average_kbps: b.average_kbps,
            peak_kbps: b.peak_kbps,
            burst_kb: b.burst_kb,
            rate_mbps: b.rate_mbps,
        })
    };
    let spec = pb::NicSpec {
        mac: raw.mac.clone(),
        bridge: raw.bridge.clone(),
        switch_type: if raw.ovs {
            pb::SwitchType::OpenVswitch as i32
        } else {
            pb::SwitchType::LinuxBridge as i32
        },
        vlan: raw.vlan,
        vni: raw.vni,
        broadcast_uri: raw.broadcast_uri.clone(),
        mtu: raw.mtu,
        queues: raw.queues,
        tx_queue_len: raw.tx_queue_len,
        model: raw.model.clone(),
        link_down: raw.link_down,
        promiscuous: raw.promiscuous,
        alias: raw.alias.clone(),
        inbound: bw(&raw.inbound),
        outbound: bw(&raw.outbound),
        pci_slot: raw.pci_slot,
        acpi_index: raw.acpi_index,
        vhost: raw.vhost.clone(),
        anti_spoofing: raw.anti_spoofing,
        ips: raw.ips.clone(),
        interface_id: raw.interface_id.clone(),
        pxe_disable: raw.pxe_disable,
        nic_uuid: raw.nic_uuid.clone(),
        device_id: raw.device_id,
        packed: raw.packed,
        default_nic: raw.default_nic,
        ..Default::default()
    };
    let mut c = connect(&a.target.client.server).await?;
    let r = c
        .attach_nic(pb::AttachNicRequest {
            vm: a.target.vm.clone(),
            nic: Some(spec),
            request_id: a.request_id.clone(),
        })
        .await?
        .into_inner();
    let nic = r.nic.unwrap_or_default();
    if a.target.client.json {
        return Ok(serde_json::to_string_pretty(&json!({
            "nic": nic_json(&nic), "already_present": r.already_present, "applied": r.applied, "request_id": r.request_id,
        }))
        .unwrap_or_default());
    }
    let what = if r.already_present {
        "already attached (no change)".to_string()
    } else {
        format!("attached ({})", r.applied)
    };
    Ok(format!(
        "{what} to {}: request {}\n{}",
        a.target.vm,
        r.request_id,
        nic_table(std::slice::from_ref(&nic))
    ))
}

/// `detach`
pub async fn detach(a: &DetachArgs) -> Result<String, ClientError> {
    let mut c = connect(&a.target.client.server).await?;
    let r = c
        .detach_nic(pb::DetachNicRequest {
            vm: a.target.vm.clone(),
            mac: a.mac.clone(),
            alias: a.alias.clone(),
            timeout_ms: a.timeout_ms,
            request_id: a.request_id.clone(),
            keep_bridge: a.keep_bridge,
        })
        .await?
        .into_inner();
    let state = pb::DetachState::try_from(r.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("DETACH_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| r.state.to_string());
    if a.target.client.json {
        return Ok(serde_json::to_string_pretty(
            &json!({"state": state, "mac": r.mac, "request_id": r.request_id}),
        )
        .unwrap_or_default());
    }
    Ok(format!(
        "{} {} from {}: request {}\n",
        state, r.mac, a.target.vm, r.request_id
    ))
}

/// `capacity`
pub async fn capacity(a: &VmArgs) -> Result<String, ClientError> {
    let mut c = connect(&a.client.server).await?;
    let r = c
        .get_pci_capacity(pb::GetPciCapacityRequest { vm: a.vm.clone() })
        .await?
        .into_inner();
    if a.client.json {
        return Ok(serde_json::to_string_pretty(&json!({
            "free_slots": r.free_slots, "used_slots": r.used_slots, "total_slots": r.total_slots,
            "next": r.next.as_ref().map(|_| pci_str(&r.next)), "machine_family": r.machine_family,
            "nic_limit": r.nic_limit, "nic_count": r.nic_count, "attachable": r.attachable, "notes": r.notes,
            "full_reason": (!r.full_reason.is_empty()).then_some(&r.full_reason),
        }))
        .unwrap_or_default());
    }
    let mut s = format!(
        "{}: {} machine, {} of {} PCI hot-plug slots free (next {}), {} NICs, limit {}, can attach {}\n",
        a.vm,
        r.machine_family,
        r.free_slots,
        r.total_slots,
        pci_str(&r.next),
        r.nic_count,
        if r.nic_limit == 0 { "none".to_string() } else { r.nic_limit.to_string() },
        r.attachable
    );
    match r.full_reason.as_str() {
        "" => {}
        "acpi_missing" => s.push_str(&format!(
            "blocked: acpi_missing: QEMU refuses hot-plug on a pc machine without ACPI; {}\n",
            crate::pci::ENABLE_ACPI
        )),
        other => s.push_str(&format!("blocked: {other}\n")),
    }
    for n in &r.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    Ok(s)
}

/// `doctor` exit status: at least one hop is FAULT.
pub const DOCTOR_EXIT_FAULT: u8 = 1;
/// `doctor` exit status: no diagnosis at all (agent unreachable, unknown VM,
/// bad MAC). Distinct from a FAULT so scripts can tell "broken NIC" from
/// "could not look".
pub const DOCTOR_EXIT_ERROR: u8 = 2;

fn hop_status_name(v: i32) -> &'static str {
    match pb::HopStatus::try_from(v) {
        Ok(pb::HopStatus::Ok) => "OK",
        Ok(pb::HopStatus::Warning) => "WARNING",
        Ok(pb::HopStatus::Fault) => "FAULT",
        _ => "UNKNOWN",
    }
}

/// The human report: one row per hop (hop, status, evidence) with the fix
/// on an indented line below, so long evidence stays readable.
pub fn doctor_table(vm: &str, mac: &str, r: &pb::DiagnoseResponse) -> String {
    let count = |st: pb::HopStatus| r.hops.iter().filter(|h| h.status == st as i32).count();
    let (faults, warnings) = (count(pb::HopStatus::Fault), count(pb::HopStatus::Warning));
    let mut s = format!(
        "doctor {vm} {mac}: {} FAULT, {} WARNING, {} OK\n",
        faults,
        warnings,
        r.hops.len() - faults - warnings
    );
    s.push_str(&format!(
        "{:<9} {:<8} {}\n",
        "HOP", "STATUS", "EVIDENCE / FIX"
    ));
    for h in &r.hops {
        s.push_str(&format!(
            "{:<9} {:<8} {}\n",
            h.name,
            hop_status_name(h.status),
            h.evidence
        ));
        if !h.fix.is_empty() {
            s.push_str(&format!("{:<9} {:<8} fix: {}\n", "", "", h.fix));
        }
    }
    s
}

/// `doctor`: the report, and the exit status (0, [`DOCTOR_EXIT_FAULT`] or
/// [`DOCTOR_EXIT_ERROR`]).
pub async fn doctor(a: &DoctorArgs) -> (Result<String, String>, u8) {
    let r = async {
        let mut c = connect(&a.target.client.server).await?;
        Ok::<_, ClientError>(
            c.diagnose(pb::DiagnoseRequest {
                vm: a.target.vm.clone(),
                mac: a.mac.clone(),
                request_id: String::new(),
                broadcast_uri: a.broadcast_uri.clone(),
            })
            .await?
            .into_inner(),
        )
    }
    .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => return (Err(e.to_string()), DOCTOR_EXIT_ERROR),
    };
    let fault = r
        .hops
        .iter()
        .any(|h| h.status == pb::HopStatus::Fault as i32);
    let code = if fault { DOCTOR_EXIT_FAULT } else { 0 };
    if a.target.client.json {
        let hops: Vec<_> = r
            .hops
            .iter()
            .map(|h| json!({"name": h.name, "status": hop_status_name(h.status), "evidence": h.evidence, "fix": h.fix}))
            .collect();
        let v = json!({
            "vm": a.target.vm, "mac": a.mac, "nic": r.nic.as_ref().map(nic_json),
            "hops": hops, "request_id": r.request_id,
        });
        return (
            Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"),
            code,
        );
    }
    (Ok(doctor_table(&a.target.vm, &a.mac, &r)), code)
}

fn invalid(e: impl std::fmt::Display) -> ClientError {
    ClientError {
        code: Code::InvalidArgument,
        message: e.to_string(),
    }
}

/// `update`
pub async fn update(a: &UpdateArgs) -> Result<String, ClientError> {
    let link_down = match a.link.as_deref() {
        None => None,
        Some("up") => Some(false),
        Some("down") => Some(true),
        Some(other) => {
            return Err(invalid(crate::nic::NicError::Invalid {
                field: "link",
                value: other.into(),
                allowed: "up or down".into(),
            }))
        }
    };
    let bw =
        |field: &'static str, v: &Option<String>| -> Result<Option<pb::Bandwidth>, ClientError> {
            v.as_deref()
                .map(|s| {
                    super::parse_bandwidth(field, s).map(|b| pb::Bandwidth {
                        average_kbps: b.average_kbps,
                        peak_kbps: b.peak_kbps,
                        burst_kb: b.burst_kb,
                        rate_mbps: 0,
                    })
                })
                .transpose()
                .map_err(invalid)
        };
    let req = pb::UpdateNicRequest {
        vm: a.target.vm.clone(),
        mac: a.mac.clone(),
        alias: a.alias.clone(),
        link_down,
        inbound: bw("inbound", &a.inbound)?,
        outbound: bw("outbound", &a.outbound)?,
        request_id: a.request_id.clone(),
    };
    let mut c = connect(&a.target.client.server).await?;
    let r = c.update_nic(req).await?.into_inner();
    let nic = r.nic.unwrap_or_default();
    if a.target.client.json {
        return Ok(serde_json::to_string_pretty(
            &json!({"nic": nic_json(&nic), "request_id": r.request_id}),
        )
        .unwrap_or_default());
    }
    Ok(format!(
        "updated {} on {}: request {}\n{}",
        nic.mac,
        a.target.vm,
        r.request_id,
        nic_table(std::slice::from_ref(&nic))
    ))
}

/// `replug`
pub async fn replug(a: &ReplugArgs) -> Result<String, ClientError> {
    let mut c = connect(&a.target.client.server).await?;
    let r = c
        .replug_nic(pb::ReplugNicRequest {
            vm: a.target.vm.clone(),
            mac: a.mac.clone(),
            alias: a.alias.clone(),
            bridge: a.bridge.clone(),
            switch_type: if a.ovs {
                pb::SwitchType::OpenVswitch as i32
            } else {
                pb::SwitchType::LinuxBridge as i32
            },
            vlan: a.vlan,
            vni: a.vni,
            broadcast_uri: a.broadcast_uri.clone(),
            timeout_ms: a.timeout_ms,
            keep_old_bridge: a.keep_old_bridge,
            request_id: a.request_id.clone(),
        })
        .await?
        .into_inner();
    let nic = r.nic.unwrap_or_default();
    let way = match pb::ReplugWay::try_from(r.way) {
        Ok(pb::ReplugWay::InPlace) => "in_place",
        Ok(pb::ReplugWay::Unplug) => "unplug",
        Ok(pb::ReplugWay::Nothing) => "nothing",
        _ => "unknown",
    };
    if a.target.client.json {
        return Ok(serde_json::to_string_pretty(&json!({
            "nic": nic_json(&nic), "way": way, "old_bridge": r.old_bridge, "request_id": r.request_id,
        }))
        .unwrap_or_default());
    }
    Ok(format!(
        "re-plugged {} on {} from {} to {} ({way}): request {}\n{}",
        nic.mac,
        a.target.vm,
        r.old_bridge,
        nic.bridge,
        r.request_id,
        nic_table(std::slice::from_ref(&nic))
    ))
}

/// `move`
pub async fn move_nic(a: &MoveArgs) -> Result<String, ClientError> {
    let mut c = connect(&a.client.server).await?;
    let r = c
        .move_nic(pb::MoveNicRequest {
            from_vm: a.from_vm.clone(),
            to_vm: a.to_vm.clone(),
            mac: a.mac.clone(),
            alias: a.alias.clone(),
            timeout_ms: a.timeout_ms,
            request_id: a.request_id.clone(),
        })
        .await?
        .into_inner();
    let nic = r.nic.unwrap_or_default();
    if a.client.json {
        return Ok(serde_json::to_string_pretty(&json!({
            "nic": nic_json(&nic), "vm": r.vm, "moved": r.moved, "request_id": r.request_id,
        }))
        .unwrap_or_default());
    }
    let what = if r.moved { "moved" } else { "not moved" };
    Ok(format!(
        "{what}: {} is on {}: request {}\n{}",
        nic.mac,
        r.vm,
        r.request_id,
        nic_table(std::slice::from_ref(&nic))
    ))
}
