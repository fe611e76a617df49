//! [`Hypervisor`] on libvirt through the `virt` crate.
//!
//! One shared connection serves every request (libvirt connections are
//! thread-safe). When libvirtd restarts the connection dies; the next call
//! notices (`virConnectIsAlive`), drops it and opens a new one, and the
//! health service reports NOT_SERVING in between.

use std::sync::{Arc, RwLock};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::{Error as VirtError, ErrorNumber};

use super::{DomainRef, HvError, HvErrorKind, Hypervisor, QemuNic, RunState, Target};

/// A libvirt connection by URI (`qemu:///system`, `test:///default`, ...).
pub struct Libvirt {
    uri: String,
    driver: String,
    conn: RwLock<Option<Arc<Connect>>>,
}

impl Libvirt {
    /// Opens the connection now so that a bad URI fails at start-up.
    pub fn connect(uri: &str) -> Result<Self, HvError> {
        let conn = Connect::open(Some(uri)).map_err(|e| classify("connect", &e))?;
        let driver = conn.driver_type().unwrap_or_default();
        Ok(Libvirt {
            uri: uri.to_string(),
            driver,
            conn: RwLock::new(Some(Arc::new(conn))),
        })
    }

    /// The URI this connection was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The current connection, reopening it if it was dropped.
    fn conn(&self) -> Result<Arc<Connect>, HvError> {
        if let Some(c) = self.conn.read().ok().and_then(|g| g.clone()) {
            return Ok(c);
        }
        let mut guard = self
            .conn
            .write()
            .map_err(|_| HvError::new(HvErrorKind::Internal, "connect", "lock poisoned"))?;
        if let Some(c) = guard.clone() {
            return Ok(c);
        }
        let c = Arc::new(Connect::open(Some(&self.uri)).map_err(|e| {
            let mut err = classify("reconnect", &e);
            err.kind = HvErrorKind::Unavailable;
            err
        })?);
        tracing::info!(uri = %self.uri, "libvirt connection (re)opened");
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Turns a libvirt error into an [`HvError`], and drops the connection
    /// when it is dead so the next call reconnects. A dead connection is
    /// detected by asking libvirt, not by reading the message.
    fn fail(&self, conn: &Connect, op: &str, e: &VirtError) -> HvError {
        let mut err = classify(op, e);
        if !conn.is_alive().unwrap_or(false) {
            err.kind = HvErrorKind::Unavailable;
            if let Ok(mut g) = self.conn.write() {
                *g = None;
            }
            tracing::warn!(uri = %self.uri, "libvirt connection lost; will reconnect");
        }
        err
    }

    fn domain(&self, conn: &Connect, dom: &DomainRef) -> Result<Domain, HvError> {
        conn.lookup_domain_by_uuid_string(&dom.uuid)
            .map_err(|e| self.fail(conn, "lookup", &e))
    }

    fn describe(&self, conn: &Connect, d: &Domain) -> Result<DomainRef, HvError> {
        let name = d.name().map_err(|e| self.fail(conn, "name", &e))?;
        let uuid = d.uuid_string().map_err(|e| self.fail(conn, "uuid", &e))?;
        let (state, _) = d.state().map_err(|e| self.fail(conn, "state", &e))?;
        let persistent = d
            .is_persistent()
            .map_err(|e| self.fail(conn, "persistent", &e))?;
        let state = match state.unwrap_or(DomainState::NoState) {
            DomainState::Running | DomainState::Blocked => RunState::Running,
            DomainState::Paused => RunState::Paused,
            DomainState::Shutoff => RunState::ShutOff,
            _ => RunState::Other,
        };
        Ok(DomainRef {
            name,
            uuid,
            state,
            persistent,
        })
    }
}

impl Libvirt {
    /// The domain, for QMP commands through libvirt's QEMU monitor
    /// passthrough; Unsupported where the driver has no QEMU.
    fn monitor(&self, dom: &DomainRef, op: &str) -> Result<(Arc<Connect>, Domain), HvError> {
        if !self.driver.eq_ignore_ascii_case("qemu") {
            return Err(HvError::new(
                HvErrorKind::Unsupported,
                op,
                format!("the {} driver has no QEMU monitor", self.driver),
            ));
        }
        let conn = self.conn()?;
        let d = self.domain(&conn, dom)?;
        Ok((conn, d))
    }

    /// One QMP command on a domain found by [`Libvirt::monitor`]. QEMU's
    /// own errors come back inside the reply, not as libvirt errors; a
    /// DeviceNotFound there is [`HvErrorKind::DeviceMissing`].
    fn qmp(
        &self,
        (conn, d): &(Arc<Connect>, Domain),
        op: &str,
        cmd: serde_json::Value,
    ) -> Result<serde_json::Value, HvError> {
        let reply = d
            .qemu_monitor_command(&cmd.to_string(), 0)
            .map_err(|e| self.fail(conn, op, &e))?;
        qmp_reply(op, &reply)
    }

    /// A QMP command whose only argument is a device or netdev id
    /// (`device_del`, `netdev_del`).
    fn qmp_on_id(&self, dom: &DomainRef, command: &str, id: &str) -> Result<(), HvError> {
        let op = format!("qemu-monitor {command}");
        let m = self.monitor(dom, &op)?;
        self.qmp(
            &m,
            &op,
            serde_json::json!({"execute": command, "arguments": {"id": id}}),
        )
        .map(|_| ())
    }
}

/// The `return` of a QMP reply, or its `error` as an [`HvError`].
fn qmp_reply(op: &str, reply: &str) -> Result<serde_json::Value, HvError> {
    let mut v: serde_json::Value = serde_json::from_str(reply).map_err(|e| {
        HvError::new(
            HvErrorKind::Internal,
            op,
            format!("unreadable QMP reply: {e}"),
        )
    })?;
    if let Some(err) = v.get("error") {
        let class = err.get("class").and_then(|c| c.as_str()).unwrap_or("");
        let desc = err.get("desc").and_then(|c| c.as_str()).unwrap_or("");
        let kind = if class == "DeviceNotFound" {
            HvErrorKind::DeviceMissing
        } else {
            HvErrorKind::Internal
        };
        return Err(HvError::new(kind, op, format!("{class}: {desc}")));
    }
    Ok(v.get_mut("return")
        .map(serde_json::Value::take)
        .unwrap_or_default())
}

/// Maps libvirt's error number to our classification.
fn classify(op: &str, e: &VirtError) -> HvError {
    let code = e.code();
    let kind = match code.unwrap_or(ErrorNumber::InternalError) {
        ErrorNumber::NoDomain => HvErrorKind::NotFound,
        ErrorNumber::NoSupport | ErrorNumber::OperationUnsupported => HvErrorKind::Unsupported,
        ErrorNumber::OperationInvalid => HvErrorKind::InvalidState,
        ErrorNumber::NoConnect | ErrorNumber::InvalidConn | ErrorNumber::Rpc => {
            HvErrorKind::Unavailable
        }
        ErrorNumber::XmlError
        | ErrorNumber::XmlDetail
        | ErrorNumber::ConfigUnsupported
        | ErrorNumber::InvalidArg => HvErrorKind::BadDefinition,
        ErrorNumber::DeviceMissing => HvErrorKind::DeviceMissing,
        ErrorNumber::OperationTimeout | ErrorNumber::AgentUnresponsive => HvErrorKind::Timeout,
        _ => HvErrorKind::Internal,
    };
    HvError {
        kind,
        op: op.to_string(),
        message: e.message().to_string(),
        code: Some(code.to_raw() as i32),
    }
}

fn flags(target: Target) -> u32 {
    match target {
        Target::Live => virt::sys::VIR_DOMAIN_AFFECT_LIVE,
        Target::Config => virt::sys::VIR_DOMAIN_AFFECT_CONFIG,
    }
}

/// A UUID is 36 characters with hyphens at fixed places; anything else is
/// looked up as a name.
fn looks_like_uuid(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok() && s.len() == 36
}

impl Hypervisor for Libvirt {
    fn driver(&self) -> String {
        self.driver.clone()
    }

    fn edits_config(&self) -> bool {
        // The test driver answers AFFECT_CONFIG with "unsupported flags"
        // (VIR_ERR_INVALID_ARG), which would otherwise look like a bad
        // request. Its devices live in one definition only.
        !self.driver.eq_ignore_ascii_case("test")
    }

    fn is_alive(&self) -> bool {
        match self.conn() {
            Ok(c) => {
                if c.is_alive().unwrap_or(false) {
                    true
                } else {
                    if let Ok(mut g) = self.conn.write() {
                        *g = None;
                    }
                    false
                }
            }
            Err(_) => false,
        }
    }

    fn lookup(&self, vm: &str) -> Result<DomainRef, HvError> {
        let conn = self.conn()?;
        let found = if looks_like_uuid(vm) {
            conn.lookup_domain_by_uuid_string(vm)
        } else {
            conn.lookup_domain_by_name(vm)
        };
        let d = found.map_err(|e| self.fail(&conn, "lookup", &e))?;
        self.describe(&conn, &d)
    }

    fn list(&self) -> Result<Vec<DomainRef>, HvError> {
        let conn = self.conn()?;
        let doms = conn
            .list_all_domains(0)
            .map_err(|e| self.fail(&conn, "list", &e))?;
        let mut out = Vec::with_capacity(doms.len());
        for d in &doms {
            match self.describe(&conn, d) {
                Ok(r) => out.push(r),
                // A domain that vanished between list and describe is not an error.
                Err(e) if e.kind == HvErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn xml(&self, dom: &DomainRef, target: Target) -> Result<String, HvError> {
        let conn = self.conn()?;
        let d = self.domain(&conn, dom)?;
        let f = match target {
            Target::Live => 0,
            Target::Config => virt::sys::VIR_DOMAIN_XML_INACTIVE,
        };
        d.xml_desc(f).map_err(|e| self.fail(&conn, "dumpxml", &e))
    }

    fn attach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        let conn = self.conn()?;
        let d = self.domain(&conn, dom)?;
        d.attach_device_flags(xml, flags(target))
            .map(|_| ())
            .map_err(|e| self.fail(&conn, &format!("attach ({target})"), &e))
    }

    fn detach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        let conn = self.conn()?;
        let d = self.domain(&conn, dom)?;
        d.detach_device_flags(xml, flags(target))
            .map(|_| ())
            .map_err(|e| self.fail(&conn, &format!("detach ({target})"), &e))
    }

    fn update(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        let conn = self.conn()?;
        let d = self.domain(&conn, dom)?;
        d.update_device_flags(xml, flags(target))
            .map_err(|e| self.fail(&conn, &format!("update ({target})"), &e))
    }

    fn qemu_nics(&self, dom: &DomainRef) -> Result<Vec<QemuNic>, HvError> {
        // Every device made with an id (libvirt gives all of them one) is a
        // child of /machine/peripheral; a NIC is one with a netdev property.
        let m = self.monitor(dom, "qemu-monitor qom-list")?;
        let list = self.qmp(
            &m,
            "qemu-monitor qom-list",
            serde_json::json!({"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}),
        )?;
        let mut out = Vec::new();
        for entry in list.as_array().into_iter().flatten() {
            let (Some(id), Some(ty)) = (
                entry.get("name").and_then(|n| n.as_str()),
                entry.get("type").and_then(|t| t.as_str()),
            ) else {
                continue;
            };
            if !ty.starts_with("child<") {
                continue;
            }
            let get = |property: &str| {
                self.qmp(
                    &m,
                    "qemu-monitor qom-get",
                    serde_json::json!({"execute": "qom-get", "arguments": {
                        "path": format!("/machine/peripheral/{id}"), "property": property}}),
                )
            };
            let netdev = match get("netdev") {
                Ok(v) => v.as_str().map(str::to_string),
                // No such property: not a NIC (a serial port, a disk, ...).
                Err(e)
                    if e.kind == HvErrorKind::Internal || e.kind == HvErrorKind::DeviceMissing =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let mac = get("mac")
                .ok()
                .and_then(|v| v.as_str().map(str::to_ascii_lowercase));
            out.push(QemuNic {
                id: id.to_string(),
                netdev,
                mac,
            });
        }
        Ok(out)
    }

    fn qemu_device_del(&self, dom: &DomainRef, id: &str) -> Result<(), HvError> {
        self.qmp_on_id(dom, "device_del", id)
    }

    fn qemu_netdev_del(&self, dom: &DomainRef, id: &str) -> Result<(), HvError> {
        self.qmp_on_id(dom, "netdev_del", id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_reply_returns_the_return_value() {
        let v = qmp_reply("op", r#"{"return":"hostua-1","id":"libvirt-9"}"#).unwrap();
        assert_eq!(v.as_str(), Some("hostua-1"));
        let v = qmp_reply("op", r#"{"return":{},"id":"libvirt-9"}"#).unwrap();
        assert!(v.is_object());
    }

    #[test]
    fn qmp_errors_are_classified_by_class() {
        let e = qmp_reply(
            "device_del",
            r#"{"id":"libvirt-495","error":{"class":"DeviceNotFound","desc":"Device 'net1' not found"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, HvErrorKind::DeviceMissing);
        assert!(e.message.contains("Device 'net1' not found"), "{e}");
        let e = qmp_reply(
            "qom-get",
            r#"{"id":"l","error":{"class":"GenericError","desc":"Property 'isa-serial.netdev' not found"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, HvErrorKind::Internal);
        assert_eq!(
            qmp_reply("op", "not json").unwrap_err().kind,
            HvErrorKind::Internal
        );
    }
}
