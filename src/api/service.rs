//! The `nicagent.v1.NicAgent` service: request ids, logging spans, and the
//! hand-off to [`Hotplug`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{convert, metrics, pb, status};
use crate::config::MAX_TIMEOUT_MS;
use crate::hotplug::{DetachState, Hotplug, HotplugError};
use crate::nic::{Alias, MacAddr, NicError, NicSpec};

/// Longest VM name or UUID accepted (libvirt itself has no small bound;
/// CloudStack names are short, so anything huge is an error).
const MAX_VM_LEN: usize = 255;

/// The gRPC service over one [`Hotplug`] engine.
#[derive(Clone)]
pub struct NicAgentService {
    hotplug: Arc<Hotplug>,
}

impl NicAgentService {
    /// Wraps the engine.
    pub fn new(hotplug: Arc<Hotplug>) -> Self {
        NicAgentService { hotplug }
    }
}

/// The request id: the field, else `x-request-id` metadata, else a new one.
/// Control characters are dropped: operators grep logs by this id, and a
/// newline in it must not be able to forge a log line.
fn request_id<T>(req: &Request<T>, field: &str) -> String {
    let clean = |s: &str| -> String { s.chars().filter(|c| !c.is_control()).take(128).collect() };
    if !field.is_empty() {
        return clean(field);
    }
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(clean)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// A caller-supplied string as it may appear in a log span: control
/// characters escaped, length bounded. Spans are built before validation,
/// so they must never carry raw input.
fn log_safe(s: &str) -> String {
    s.chars().take(128).flat_map(char::escape_debug).collect()
}

/// A request's `timeout_ms`: 0 is the agent's default; more than
/// [`MAX_TIMEOUT_MS`] is refused, so that a client cannot hold a VM's lock
/// for days.
fn request_timeout(ms: u32) -> Result<Option<Duration>, HotplugError> {
    if u64::from(ms) > MAX_TIMEOUT_MS {
        return Err(HotplugError::Invalid(NicError::Invalid {
            field: "timeout_ms",
            value: ms.to_string(),
            allowed: format!("0 (the agent's default) or 1-{MAX_TIMEOUT_MS}"),
        }));
    }
    Ok((ms > 0).then(|| Duration::from_millis(ms.into())))
}

/// Runs a change to its end even when the client stops waiting. tonic
/// drops a handler whose `grpc-timeout` passed; a transaction dropped
/// between two steps would skip its undo, and its libvirt call would leave
/// the VM in doubt for nothing.
async fn to_completion<T, F>(fut: F) -> Result<T, HotplugError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, HotplugError>> + Send + 'static,
{
    tokio::spawn(fut.in_current_span())
        .await
        .map_err(|e| HotplugError::Internal(format!("request task failed: {e}")))?
}

fn check_vm(vm: &str) -> Result<(), HotplugError> {
    if vm.is_empty() || vm.len() > MAX_VM_LEN || vm.chars().any(|c| c.is_control()) {
        return Err(HotplugError::Invalid(NicError::Invalid {
            field: "vm",
            value: vm.chars().take(64).collect(),
            allowed: format!("a domain name or UUID, 1-{MAX_VM_LEN} printable characters"),
        }));
    }
    Ok(())
}

/// Logs the outcome line and converts the error.
/// Also records the outcome in the metrics.
fn finish<T>(op: &str, start: Instant, r: Result<T, HotplugError>) -> Result<T, Status> {
    let elapsed = start.elapsed();
    let ms = elapsed.as_millis() as u64;
    match r {
        Ok(v) => {
            tracing::info!(op, duration_ms = ms, outcome = "ok", "request done");
            metrics::global().record(op, tonic::Code::Ok, elapsed);
            Ok(v)
        }
        Err(e) => {
            let st = status::to_status(&e);
            tracing::error!(op, duration_ms = ms, outcome = ?st.code(), error = %e, "request failed");
            metrics::global().record(op, st.code(), elapsed);
            Err(st)
        }
    }
}

#[tonic::async_trait]
impl pb::nic_agent_server::NicAgent for NicAgentService {
    async fn attach_nic(
        &self,
        req: Request<pb::AttachNicRequest>,
    ) -> Result<Response<pb::AttachNicResponse>, Status> {
        let rid = request_id(&req, &req.get_ref().request_id);
        let r = req.into_inner();
        let mac = r.nic.as_ref().map(|n| n.mac.clone()).unwrap_or_default();
        let span = tracing::info_span!("attach", request_id = %rid, vm = %log_safe(&r.vm), mac = %log_safe(&mac));
        async move {
            tracing::info!(bridge = ?r.nic.as_ref().map(|n| &n.bridge), "attach requested");
            let start = Instant::now();
            let result = async {
                check_vm(&r.vm)?;
                let nic = r.nic.as_ref().ok_or_else(|| {
                    HotplugError::Invalid(NicError::Invalid {
                        field: "nic",
                        value: String::new(),
                        allowed: "a NicSpec (required)".into(),
                    })
                })?;
                convert::check_switch_type(nic.switch_type)?;
                let spec = NicSpec::try_from(convert::raw_nic(nic))?;
                let carried = convert::carried(&spec.plug);
                let (h, vm) = (self.hotplug.clone(), r.vm.clone());
                to_completion(async move { h.attach(&vm, &spec).await })
                    .await
                    .map(|o| (o, carried))
            }
            .await;
            finish("attach", start, result).map(|(o, carried)| {
                let mut resp = convert::attach_response(&o, &rid);
                resp.carried = Some(carried);
                Response::new(resp)
            })
        }
        .instrument(span)
        .await
    }

    async fn detach_nic(
        &self,
        req: Request<pb::DetachNicRequest>,
    ) -> Result<Response<pb::DetachNicResponse>, Status> {
        let rid = request_id(&req, &req.get_ref().request_id);
        let r = req.into_inner();
        let span = tracing::info_span!("detach", request_id = %rid, vm = %log_safe(&r.vm), mac = %log_safe(&r.mac));
        async move {
            tracing::info!(timeout_ms = r.timeout_ms, "detach requested");
            let start = Instant::now();
            let result = async {
                check_vm(&r.vm)?;
                let mac = MacAddr::try_from(r.mac.as_str())?;
                let alias = if r.alias.is_empty() {
                    None
                } else {
                    Some(Alias::try_from(r.alias.as_str())?)
                };
                let timeout = request_timeout(r.timeout_ms)?;
                let (h, vm, keep) = (self.hotplug.clone(), r.vm.clone(), r.keep_bridge);
                let st = to_completion(async move {
                    h.detach_keeping(&vm, &mac, alias.as_ref(), timeout, keep)
                        .await
                })
                .await?;
                Ok((mac, st))
            }
            .await;
            finish("detach", start, result).map(|(mac, st)| {
                Response::new(pb::DetachNicResponse {
                    state: match st {
                        DetachState::Removed => pb::DetachState::Removed,
                        DetachState::AlreadyAbsent => pb::DetachState::AlreadyAbsent,
                    } as i32,
                    mac: mac.to_string(),
                    request_id: rid.clone(),
                })
            })
        }
        .instrument(span)
        .await
    }

    async fn list_nics(
        &self,
        req: Request<pb::ListNicsRequest>,
    ) -> Result<Response<pb::ListNicsResponse>, Status> {
        let rid = request_id(&req, "");
        let r = req.into_inner();
        let span = tracing::info_span!("list_nics", request_id = %rid, vm = %log_safe(&r.vm));
        async move {
            let start = Instant::now();
            let result = async {
                check_vm(&r.vm)?;
                self.hotplug.list_nics(&r.vm).await
            }
            .await;
            finish("list_nics", start, result).map(|n| {
                Response::new(pb::ListNicsResponse {
                    nics: n.iter().map(convert::nic).collect(),
                })
            })
        }
        .instrument(span)
        .await
    }

    async fn list_vms(
        &self,
        req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let rid = request_id(&req, "");
        let span = tracing::info_span!("list_vms", request_id = %rid);
        async move {
            let start = Instant::now();
            let result = self.hotplug.list_vms().await;
            finish("list_vms", start, result).map(|v| {
                Response::new(pb::ListVmsResponse {
                    vms: v.iter().map(convert::vm).collect(),
                })
            })
        }
        .instrument(span)
        .await
    }

    async fn get_pci_capacity(
        &self,
        req: Request<pb::GetPciCapacityRequest>,
    ) -> Result<Response<pb::GetPciCapacityResponse>, Status> {
        let rid = request_id(&req, "");
        let r = req.into_inner();
        let span = tracing::info_span!("capacity", request_id = %rid, vm = %log_safe(&r.vm));
        async move {
            let start = Instant::now();
            let result = async {
                check_vm(&r.vm)?;
                self.hotplug.capacity(&r.vm).await
            }
            .await;
            let limit = self.hotplug.config().nic_limit;
            finish("capacity", start, result)
                .map(|(c, n, a)| Response::new(convert::capacity(&c, n, limit, a)))
        }
        .instrument(span)
        .await
    }

    // --- day-2: Diagnose ---
    async fn diagnose(
        &self,
        req: Request<pb::DiagnoseRequest>,
    ) -> Result<Response<pb::DiagnoseResponse>, Status> {
        let rid = request_id(&req, &req.get_ref().request_id);
        let r = req.into_inner();
        let span = tracing::info_span!("diagnose", request_id = %rid, vm = %log_safe(&r.vm), mac = %log_safe(&r.mac));
        async move {
            tracing::info!("diagnose requested");
            let start = Instant::now();
            let result = async {
                check_vm(&r.vm)?;
                let mac = MacAddr::try_from(r.mac.as_str())?;
                let intended = crate::nic::parse_broadcast_uri(&r.broadcast_uri)?;
                self.hotplug.diagnose(&r.vm, &mac, intended).await
            }
            .await;
            finish("diagnose", start, result).map(|d| Response::new(convert::diagnosis(&d, &rid)))
        }
        .instrument(span)
        .await
    }

    // --- day-2: UpdateNic, MoveNic ---

    async fn update_nic(
        &self,
        req: Request<pb::UpdateNicRequest>,
    ) -> Result<Response<pb::UpdateNicResponse>, Status> {
        let rid = request_id(&req, &req.get_ref().request_id);
        let r = req.into_inner();
        let span = tracing::info_span!("update", request_id = %rid, vm = %log_safe(&r.vm), mac = %log_safe(&r.mac));
        async move {
            tracing::info!(link_down = ?r.link_down, inbound = r.inbound.is_some(), outbound = r.outbound.is_some(), "update requested");
            let start = Instant::now();
            let result = async {
                check_vm(&r.vm)?;
                let mac = MacAddr::try_from(r.mac.as_str())?;
                let alias = optional_alias(&r.alias)?;
                let change = convert::nic_update(&r)?;
                let (h, vm) = (self.hotplug.clone(), r.vm.clone());
                to_completion(async move { h.update(&vm, &mac, alias.as_ref(), &change).await })
                    .await
            }
            .await;
            finish("update", start, result).map(|n| {
                Response::new(pb::UpdateNicResponse {
                    nic: Some(convert::nic(&n)),
                    request_id: rid.clone(),
                })
            })
        }
        .instrument(span)
        .await
    }

    async fn move_nic(
        &self,
        req: Request<pb::MoveNicRequest>,
    ) -> Result<Response<pb::MoveNicResponse>, Status> {
        let rid = request_id(&req, &req.get_ref().request_id);
        let r = req.into_inner();
        let span = tracing::info_span!("move", request_id = %rid, vm = %log_safe(&r.from_vm), to_vm = %log_safe(&r.to_vm), mac = %log_safe(&r.mac));
        async move {
            tracing::info!(timeout_ms = r.timeout_ms, "move requested");
            let start = Instant::now();
            let result = async {
                check_vm(&r.from_vm).map_err(|e| rename_vm_field(e, "from_vm"))?;
                check_vm(&r.to_vm).map_err(|e| rename_vm_field(e, "to_vm"))?;
                let mac = MacAddr::try_from(r.mac.as_str())?;
                let alias = optional_alias(&r.alias)?;
                let timeout = request_timeout(r.timeout_ms)?;
                let (h, from, to) = (self.hotplug.clone(), r.from_vm.clone(), r.to_vm.clone());
                to_completion(
                    async move { h.move_nic(&from, &to, &mac, alias.as_ref(), timeout).await },
                )
                .await
            }
            .await;
            finish("move", start, result).map(|o| {
                Response::new(pb::MoveNicResponse {
                    nic: Some(convert::nic(&o.nic)),
                    vm: o.vm,
                    moved: o.moved,
                    request_id: rid.clone(),
                })
            })
        }
        .instrument(span)
        .await
    }

    async fn replug_nic(
        &self,
        req: Request<pb::ReplugNicRequest>,
    ) -> Result<Response<pb::ReplugNicResponse>, Status> {
        let rid = request_id(&req, &req.get_ref().request_id);
        let r = req.into_inner();
        let span = tracing::info_span!("replug", request_id = %rid, vm = %log_safe(&r.vm), mac = %log_safe(&r.mac));
        async move {
            tracing::info!(bridge = %log_safe(&r.bridge), broadcast_uri = %log_safe(&r.broadcast_uri), "replug requested");
            let start = Instant::now();
            let result = async {
                check_vm(&r.vm)?;
                let mac = MacAddr::try_from(r.mac.as_str())?;
                let alias = optional_alias(&r.alias)?;
                let to = convert::replug_target(&r)?;
                let timeout = request_timeout(r.timeout_ms)?;
                let (h, vm, keep) = (self.hotplug.clone(), r.vm.clone(), r.keep_old_bridge);
                to_completion(async move {
                    h.replug(&vm, &mac, alias.as_ref(), &to, timeout, keep)
                        .await
                })
                .await
            }
            .await;
            finish("replug", start, result).map(|o| {
                tracing::info!(way = o.way.as_str(), from = %o.old_bridge, to = %o.nic.bridge, "replug done");
                Response::new(convert::replug(&o, &rid))
            })
        }
        .instrument(span)
        .await
    }

    // --- guest-config ---

    async fn guest_config(
        &self,
        req: Request<pb::GuestConfigRequest>,
    ) -> Result<Response<pb::GuestConfigResponse>, Status> {
        let rid = request_id(&req, &req.get_ref().request_id);
        let r = req.into_inner();
        let span = tracing::info_span!("guest_config", request_id = %rid, mac = %log_safe(&r.mac));
        async move {
            tracing::info!("guest-config requested");
            let start = Instant::now();
            // Pure rendering: no libvirt, no host, no lock.
            let result = crate::guest::files(&convert::guest_request(&r))
                .map_err(crate::hotplug::HotplugError::from);
            finish("guest_config", start, result)
                .map(|f| Response::new(convert::guest_files(f, &rid)))
        }
        .instrument(span)
        .await
    }
}

/// An optional user alias field: empty means none.
fn optional_alias(s: &str) -> Result<Option<Alias>, HotplugError> {
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(Alias::try_from(s)?))
    }
}

/// `check_vm` names the field `vm`; MoveNic has two VM fields.
fn rename_vm_field(e: HotplugError, field: &'static str) -> HotplugError {
    match e {
        HotplugError::Invalid(NicError::Invalid { value, allowed, .. }) => {
            HotplugError::Invalid(NicError::Invalid {
                field,
                value,
                allowed,
            })
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_ms_is_capped_with_field_and_range_named() {
        assert_eq!(request_timeout(0).unwrap(), None);
        assert_eq!(
            request_timeout(300_000).unwrap(),
            Some(Duration::from_secs(300))
        );
        let e = request_timeout(300_001).unwrap_err();
        assert_eq!(status::code(&e), tonic::Code::InvalidArgument);
        let m = e.to_string();
        assert!(m.contains("timeout_ms") && m.contains("1-300000"), "{m}");
    }
}
