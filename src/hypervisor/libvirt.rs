//! [`Hypervisor`] on libvirt through the `virt` crate.
//!
//! One shared connection serves every request (libvirt connections are
//! thread-safe). When libvirtd restarts the connection dies; the next call
//! notices (`virConnectIsAlive`), drops it and opens a new one, and the
//! health service reports NOT_SERVING in between.
//!
//! Each connection gets a keep-alive (libvirt's event loop sends it, see
//! [`super::events`]), so a libvirtd that is alive but stuck (SIGSTOP)
//! closes the connection after about [`KEEPALIVE_INTERVAL`] ×
//! ([`KEEPALIVE_COUNT`] + 1) seconds instead of leaving calls blocked for
//! ever. With events on, every (re)opened connection subscribes the
//! [`EventHub`] again and, after a reconnect, publishes
//! [`HvEvent::Resubscribed`] so that waiters re-read what they may have
//! missed.
//!
//! Every libvirt API call is counted (see [`super::calls`]).

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, RwLock};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::{Error as VirtError, ErrorNumber};

use super::calls::count;
use super::events::{self, EventHub, HvEvent, Subscription};
use super::{DomainRef, HvError, HvErrorKind, Hypervisor, QemuNic, RunState, Target};

/// Seconds between keep-alive messages on an idle connection.
pub const KEEPALIVE_INTERVAL: i32 = 5;
/// Keep-alive messages without an answer before libvirt closes the
/// connection.
pub const KEEPALIVE_COUNT: u32 = 3;

/// An open connection with its event registrations, undone when the last
/// user drops it.
struct Live {
    conn: Connect,
    subscription: Option<Subscription>,
    /// Domain handles of this connection, by UUID, with the name each was
    /// found by; and names to UUIDs. See [`Handles`].
    handles: Mutex<Handles>,
}

/// Why a cache of domain handles: every virDomain* call needs a handle, and
/// looking the domain up again before each one (by UUID: one RPC) was a
/// third of an attach's libvirt calls. A handle stays valid for the life of
/// its connection, and it names the domain by UUID, so it can never point
/// at another domain. A domain that is gone answers VIR_ERR_NO_DOMAIN on
/// its handle, which evicts it; a new connection starts with an empty
/// cache. The name-to-UUID map follows names: a name that a new domain
/// took over (the old one undefined) is found stale the same way, through
/// the old handle's NO_DOMAIN. libvirt renames only inactive domains, and
/// CloudStack never renames; a renamed domain is seen under its new name
/// after its next lookup by that name.
#[derive(Default)]
struct Handles {
    by_uuid: HashMap<String, (String, Domain)>,
    by_name: HashMap<String, String>,
}

/// More domains than a host runs; past it the cache starts again.
const MAX_HANDLES: usize = 4096;

impl Live {
    fn cached(&self, uuid: &str) -> Option<(String, Domain)> {
        let h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        h.by_uuid.get(uuid).cloned()
    }

    fn uuid_of(&self, name: &str) -> Option<String> {
        let h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        h.by_name.get(name).cloned()
    }

    fn remember(&self, name: &str, uuid: &str, d: &Domain) {
        let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if h.by_uuid.len() >= MAX_HANDLES {
            h.by_uuid.clear();
            h.by_name.clear();
        }
        h.by_uuid
            .insert(uuid.to_string(), (name.to_string(), d.clone()));
        h.by_name.insert(name.to_string(), uuid.to_string());
    }

    fn forget(&self, uuid: &str) {
        let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((name, _)) = h.by_uuid.remove(uuid) {
            if h.by_name.get(&name).map(String::as_str) == Some(uuid) {
                h.by_name.remove(&name);
            }
        }
    }
}

impl Deref for Live {
    type Target = Connect;
    fn deref(&self) -> &Connect {
        &self.conn
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(s) = self.subscription.take() {
            s.end(&self.conn);
        }
    }
}

/// A libvirt connection by URI (`qemu:///system`, `test:///default`, ...).
pub struct Libvirt {
    uri: String,
    driver: String,
    conn: RwLock<Option<Arc<Live>>>,
    /// Where events go; `None` when events are switched off.
    hub: Option<EventHub>,
    /// Whether the current connection's subscription succeeded: a driver
    /// that refuses it has no events, and callers poll.
    subscribed: std::sync::atomic::AtomicBool,
}

/// How the connection is set up.
#[derive(Debug, Clone, Copy)]
pub struct LibvirtOptions {
    /// Subscribe to domain events (device removed, removal failed,
    /// lifecycle). Off, detach confirms by polling the live XML.
    pub events: bool,
}

impl Default for LibvirtOptions {
    fn default() -> Self {
        LibvirtOptions { events: true }
    }
}

fn open(uri: &str) -> Result<Connect, VirtError> {
    count("virConnectOpen");
    Connect::open(Some(uri))
}

impl Libvirt {
    /// Opens the connection now so that a bad URI fails at start-up, with
    /// events on.
    pub fn connect(uri: &str) -> Result<Self, HvError> {
        Self::connect_with(uri, LibvirtOptions::default())
    }

    /// Opens the connection now so that a bad URI fails at start-up.
    pub fn connect_with(uri: &str, opts: LibvirtOptions) -> Result<Self, HvError> {
        // The event loop must be registered before the first connection is
        // opened, or that connection gets neither keep-alive nor events.
        // Keep-alive is wanted even with events off: it is what unblocks
        // calls to a stuck libvirtd.
        if let Err(e) = events::ensure_event_loop() {
            tracing::warn!(error = %e, "no libvirt event loop: no keep-alive and no events");
        }
        let conn = open(uri).map_err(|e| classify("connect", &e))?;
        count("virConnectGetType");
        let driver = conn.driver_type().unwrap_or_default();
        let lv = Libvirt {
            uri: uri.to_string(),
            driver,
            conn: RwLock::new(None),
            hub: opts.events.then(EventHub::default),
            subscribed: std::sync::atomic::AtomicBool::new(false),
        };
        let live = lv.set_up(conn);
        if let Ok(mut g) = lv.conn.write() {
            *g = Some(Arc::new(live));
        }
        Ok(lv)
    }

    /// The URI this connection was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Keep-alive and event subscriptions on a freshly opened connection.
    /// Neither is fatal: the test driver has no keep-alive, and without
    /// events detach polls.
    fn set_up(&self, conn: Connect) -> Live {
        // The test driver lives in this process: nothing to keep alive, and
        // libvirt would print its "not supported" error on stderr.
        if !self.driver.eq_ignore_ascii_case("test") {
            count("virConnectSetKeepAlive");
            if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
                tracing::debug!(uri = %self.uri, error = %e.message(), "no keep-alive on this connection");
            }
        }
        let subscription = self
            .hub
            .as_ref()
            .and_then(|hub| match events::subscribe(&conn, hub) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(uri = %self.uri, error = %e, "libvirt events unavailable; detach polls instead");
                    None
                }
            });
        self.subscribed
            .store(subscription.is_some(), std::sync::atomic::Ordering::SeqCst);
        Live {
            conn,
            subscription,
            handles: Mutex::default(),
        }
    }

    /// The current connection, reopening it if it was dropped.
    fn conn(&self) -> Result<Arc<Live>, HvError> {
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
        let conn = open(&self.uri).map_err(|e| {
            let mut err = classify("reconnect", &e);
            err.kind = HvErrorKind::Unavailable;
            err
        })?;
        let c = Arc::new(self.set_up(conn));
        tracing::info!(uri = %self.uri, "libvirt connection (re)opened");
        *guard = Some(c.clone());
        drop(guard);
        // Events of the time without a connection are lost: tell waiters
        // to read the state again (and to poll from now on if this
        // connection could not subscribe).
        if let Some(hub) = &self.hub {
            hub.publish(HvEvent::Resubscribed);
        }
        Ok(c)
    }

    /// Turns a libvirt error into an [`HvError`], and drops the connection
    /// when it is dead so the next call reconnects. A dead connection is
    /// detected by asking libvirt, not by reading the message.
    fn fail(&self, conn: &Connect, op: &str, e: &VirtError) -> HvError {
        let mut err = classify(op, e);
        count("virConnectIsAlive");
        if !conn.is_alive().unwrap_or(false) {
            err.kind = HvErrorKind::Unavailable;
            if let Ok(mut g) = self.conn.write() {
                *g = None;
            }
            tracing::warn!(uri = %self.uri, "libvirt connection lost; will reconnect");
        }
        err
    }

    /// The domain's handle: from the cache, or looked up by UUID once.
    fn domain(&self, conn: &Live, dom: &DomainRef) -> Result<Domain, HvError> {
        if let Some((_, d)) = conn.cached(&dom.uuid) {
            return Ok(d);
        }
        count("virDomainLookupByUUIDString");
        let d = conn
            .lookup_domain_by_uuid_string(&dom.uuid)
            .map_err(|e| self.fail(conn, "lookup", &e))?;
        conn.remember(&dom.name, &dom.uuid, &d);
        Ok(d)
    }

    /// A call on a handle failed: a domain that is gone leaves the cache,
    /// then the error is classified as any other.
    fn fail_on(&self, conn: &Live, dom: &DomainRef, op: &str, e: &VirtError) -> HvError {
        let err = self.fail(conn, op, e);
        if err.kind == HvErrorKind::NotFound {
            conn.forget(&dom.uuid);
        }
        err
    }

    /// State and persistence of a domain whose name and UUID are known.
    fn refresh(
        &self,
        conn: &Connect,
        d: &Domain,
        name: String,
        uuid: String,
    ) -> Result<DomainRef, HvError> {
        count("virDomainGetState");
        let (state, _) = d.state().map_err(|e| self.fail(conn, "state", &e))?;
        count("virDomainIsPersistent");
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
    fn monitor(&self, dom: &DomainRef, op: &str) -> Result<(Arc<Live>, Domain), HvError> {
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
        (conn, d): &(Arc<Live>, Domain),
        op: &str,
        cmd: serde_json::Value,
    ) -> Result<serde_json::Value, HvError> {
        count("virDomainQemuMonitorCommand");
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
        ErrorNumber::NoNwfilter | ErrorNumber::NoNwfilterStart => HvErrorKind::FilterMissing,
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
                count("virConnectIsAlive");
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

    fn probe(&self) -> Result<(), HvError> {
        if !self.is_alive() {
            return Err(HvError::new(
                HvErrorKind::Unavailable,
                "probe",
                "libvirt connection down",
            ));
        }
        // virConnectIsAlive looks at the local socket only; this is a
        // round trip that a stuck libvirtd does not answer.
        let conn = self.conn()?;
        count("virConnectGetLibVersion");
        conn.lib_version()
            .map(|_| ())
            .map_err(|e| self.fail(&conn, "probe", &e))
    }

    fn events(&self) -> Option<EventHub> {
        if self.subscribed.load(std::sync::atomic::Ordering::SeqCst) {
            self.hub.clone()
        } else {
            None
        }
    }

    fn lookup(&self, vm: &str) -> Result<DomainRef, HvError> {
        let conn = self.conn()?;
        let by_uuid = looks_like_uuid(vm);
        let uuid = if by_uuid {
            Some(vm.to_ascii_lowercase())
        } else {
            conn.uuid_of(vm)
        };
        // A cached handle costs two calls (state, persistence); a domain it
        // no longer finds is looked up afresh below.
        if let Some((name, d)) = uuid.as_deref().and_then(|u| conn.cached(u)) {
            let u = uuid.clone().unwrap_or_default();
            match self.refresh(&conn, &d, name, u.clone()) {
                Err(e) if e.kind == HvErrorKind::NotFound => conn.forget(&u),
                other => return other,
            }
        }
        let found = if by_uuid {
            count("virDomainLookupByUUIDString");
            conn.lookup_domain_by_uuid_string(vm)
        } else {
            count("virDomainLookupByName");
            conn.lookup_domain_by_name(vm)
        };
        let d = found.map_err(|e| self.fail(&conn, "lookup", &e))?;
        // What the caller did not give is asked once, then cached.
        let (name, uuid) = if by_uuid {
            count("virDomainGetName");
            let name = d.name().map_err(|e| self.fail(&conn, "name", &e))?;
            (name, vm.to_ascii_lowercase())
        } else {
            count("virDomainGetUUIDString");
            let uuid = d.uuid_string().map_err(|e| self.fail(&conn, "uuid", &e))?;
            (vm.to_string(), uuid)
        };
        conn.remember(&name, &uuid, &d);
        self.refresh(&conn, &d, name, uuid)
    }

    fn resolve_cached(&self, vm: &str) -> Option<DomainRef> {
        // The current connection only: reconnecting would block.
        let conn = self.conn.read().ok().and_then(|g| g.clone())?;
        let uuid = if looks_like_uuid(vm) {
            vm.to_ascii_lowercase()
        } else {
            conn.uuid_of(vm)?
        };
        let (name, _) = conn.cached(&uuid)?;
        Some(DomainRef {
            name,
            uuid,
            state: RunState::Other,
            persistent: false,
        })
    }

    fn resolve(&self, vm: &str) -> Result<DomainRef, HvError> {
        // Name and UUID only, for the VM lock: from the cache without a
        // call; state and persistence are read under the lock.
        let conn = self.conn()?;
        let uuid = if looks_like_uuid(vm) {
            Some(vm.to_ascii_lowercase())
        } else {
            conn.uuid_of(vm)
        };
        if let Some((name, _)) = uuid.as_deref().and_then(|u| conn.cached(u)) {
            return Ok(DomainRef {
                name,
                uuid: uuid.unwrap_or_default(),
                state: RunState::Other,
                persistent: false,
            });
        }
        drop(conn);
        self.lookup(vm)
    }

    fn list(&self) -> Result<Vec<DomainRef>, HvError> {
        let conn = self.conn()?;
        count("virConnectListAllDomains");
        let doms = conn
            .list_all_domains(0)
            .map_err(|e| self.fail(&conn, "list", &e))?;
        let mut out = Vec::with_capacity(doms.len());
        for d in &doms {
            let described = (|| {
                count("virDomainGetName");
                let name = d.name().map_err(|e| self.fail(&conn, "name", &e))?;
                count("virDomainGetUUIDString");
                let uuid = d.uuid_string().map_err(|e| self.fail(&conn, "uuid", &e))?;
                conn.remember(&name, &uuid, d);
                self.refresh(&conn, d, name, uuid)
            })();
            match described {
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
        count("virDomainGetXMLDesc");
        d.xml_desc(f)
            .map_err(|e| self.fail_on(&conn, dom, "dumpxml", &e))
    }

    fn attach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        let conn = self.conn()?;
        let d = self.domain(&conn, dom)?;
        count("virDomainAttachDeviceFlags");
        d.attach_device_flags(xml, flags(target))
            .map(|_| ())
            .map_err(|e| self.fail_on(&conn, dom, &format!("attach ({target})"), &e))
    }

    fn detach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        let conn = self.conn()?;
        let d = self.domain(&conn, dom)?;
        count("virDomainDetachDeviceFlags");
        d.detach_device_flags(xml, flags(target))
            .map(|_| ())
            .map_err(|e| self.fail_on(&conn, dom, &format!("detach ({target})"), &e))
    }

    fn update(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        let conn = self.conn()?;
        let d = self.domain(&conn, dom)?;
        count("virDomainUpdateDeviceFlags");
        d.update_device_flags(xml, flags(target))
            .map_err(|e| self.fail_on(&conn, dom, &format!("update ({target})"), &e))
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

    fn nwfilters(&self) -> Result<Vec<String>, HvError> {
        let conn = self.conn()?;
        count("virConnectListAllNWFilters");
        let filters = conn
            .list_all_nw_filters(0)
            .map_err(|e| self.fail(&conn, "list nwfilters", &e))?;
        filters
            .iter()
            .map(|f| f.name().map_err(|e| self.fail(&conn, "nwfilter name", &e)))
            .collect()
    }

    fn define_nwfilter(&self, xml: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let c_xml = std::ffi::CString::new(xml).map_err(|_| {
            HvError::new(
                HvErrorKind::BadDefinition,
                "define nwfilter",
                "filter XML contains a NUL byte",
            )
        })?;
        count("virNWFilterDefineXML");
        // The virt crate (0.5) wraps lookup and list but not define.
        // SAFETY: the connection pointer is valid while `conn` lives, and
        // `c_xml` outlives the call. A non-null result is a new reference,
        // which `NWFilter::from_ptr` takes over and releases on drop.
        let ptr = unsafe { virt::sys::virNWFilterDefineXML(conn.as_ptr(), c_xml.as_ptr()) };
        if ptr.is_null() {
            return Err(self.fail(&conn, "define nwfilter", &VirtError::last_error()));
        }
        // SAFETY: non-null, freshly returned by libvirt, owned by us.
        drop(unsafe { virt::nwfilter::NWFilter::from_ptr(ptr) });
        Ok(())
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
