//! The hypervisor boundary: a narrow, blocking [`Hypervisor`] trait and its
//! libvirt implementation ([`libvirt::Libvirt`]).
//!
//! Every method blocks (libvirt's C API is synchronous), so callers run them
//! on tokio's blocking pool; see `hotplug`. The same implementation serves
//! `qemu:///system` and the `test:///` lab driver: they are two connection
//! URIs, not two code paths.
//!
//! Events (device removed, removal failed, lifecycle) come from
//! [`events`], behind the same trait ([`Hypervisor::events`]); a driver
//! without them answers `None` and callers poll instead.

pub mod calls;
pub mod events;
pub mod fake;
pub mod libvirt;

pub use events::{EventHub, HvEvent, Lifecycle};

use std::fmt;

/// Where a device change applies. libvirt's AFFECT_LIVE / AFFECT_CONFIG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The running domain only.
    Live,
    /// The persistent definition only.
    Config,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Live => "live",
            Target::Config => "config",
        })
    }
}

/// Run state of a domain, reduced to what hot-plug cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Running (or blocked): live changes apply.
    Running,
    /// Paused: QEMU accepts device_add, but the guest can't ack an unplug.
    Paused,
    /// Shut off: only the persistent definition exists.
    ShutOff,
    /// Crashed, shutting down, suspended to disk, ...
    Other,
}

impl RunState {
    /// Whether QEMU is up, so LIVE changes are possible.
    pub fn is_live(self) -> bool {
        matches!(self, RunState::Running | RunState::Paused)
    }

    /// Lower-case name for APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::ShutOff => "shut off",
            RunState::Other => "other",
        }
    }
}

/// A domain as found by lookup: identity and the facts that pick the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRef {
    /// Domain name (CloudStack's `i-2-10-VM`).
    pub name: String,
    /// Domain UUID, the stable key for locks.
    pub uuid: String,
    /// Run state at lookup time.
    pub state: RunState,
    /// Whether a persistent definition exists (CloudStack's VMs are transient).
    pub persistent: bool,
}

/// What kind of failure a hypervisor call had. Classified from libvirt's
/// error *number*, never from message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HvErrorKind {
    /// No such domain.
    NotFound,
    /// The driver does not implement the call (the test driver's detach).
    Unsupported,
    /// The call is not valid in the domain's current state.
    InvalidState,
    /// The connection to libvirtd is down.
    Unavailable,
    /// libvirt rejected the device definition.
    BadDefinition,
    /// The device to detach is not there.
    DeviceMissing,
    /// A libvirt operation timed out.
    Timeout,
    /// A network filter the call needs is not defined
    /// (VIR_ERR_NO_NWFILTER), or the nwfilter driver failed to start.
    FilterMissing,
    /// Anything else.
    Internal,
}

/// A failed hypervisor call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op}: {message}")]
pub struct HvError {
    /// The classification the API maps to a gRPC code.
    pub kind: HvErrorKind,
    /// The operation that failed, e.g. "attach (live)".
    pub op: String,
    /// libvirt's own message, kept verbatim for operators.
    pub message: String,
    /// libvirt's error number when there was one.
    pub code: Option<i32>,
}

impl HvError {
    /// Builds an error that did not come from libvirt itself.
    pub fn new(kind: HvErrorKind, op: impl Into<String>, message: impl Into<String>) -> Self {
        HvError {
            kind,
            op: op.into(),
            message: message.into(),
            code: None,
        }
    }
}

/// A network device as QEMU itself has it, read from the QEMU monitor and
/// not from libvirt's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuNic {
    /// QEMU's device id, which is libvirt's alias (`ua-...`, `net0`).
    pub id: String,
    /// The backend it uses (`hostua-...`), to remove after the device.
    pub netdev: Option<String>,
    /// Its MAC, for logs and reports.
    pub mac: Option<String>,
}

fn no_monitor(op: &str) -> HvError {
    HvError::new(
        HvErrorKind::Unsupported,
        op,
        "this driver has no QEMU monitor",
    )
}

/// The operations nic-agent needs from a hypervisor. All calls block.
pub trait Hypervisor: Send + Sync + 'static {
    /// The driver behind the connection, e.g. "QEMU" or "Test".
    fn driver(&self) -> String;
    /// Whether the connection is usable right now. Reconnects if it was lost.
    fn is_alive(&self) -> bool;
    /// A cheap round trip to the hypervisor, for health: unlike
    /// [`Hypervisor::is_alive`], which only looks at the local end of the
    /// connection, it fails (or blocks) when libvirtd is alive but stuck.
    fn probe(&self) -> Result<(), HvError> {
        if self.is_alive() {
            Ok(())
        } else {
            Err(HvError::new(
                HvErrorKind::Unavailable,
                "probe",
                "connection down",
            ))
        }
    }
    /// Where this hypervisor publishes its events, or `None` when it has
    /// none (events switched off, or a driver that refused the
    /// subscription): callers then poll.
    fn events(&self) -> Option<EventHub> {
        None
    }
    /// Whether the driver runs inside this process, without I/O: libvirt's
    /// test driver is a data structure in libvirt.so under one mutex, with
    /// no daemon that could be stuck. Its calls run inline on the caller's
    /// thread (see `hotplug::doubt`); every other driver's take the
    /// blocking pool under a deadline.
    fn in_process(&self) -> bool {
        false
    }
    /// Whether device changes can target a persistent definition
    /// (AFFECT_CONFIG). True for real hypervisors; libvirt's test driver
    /// rejects the flag outright.
    fn edits_config(&self) -> bool {
        true
    }
    /// Finds a domain by name or UUID.
    fn lookup(&self, vm: &str) -> Result<DomainRef, HvError>;
    /// Name and UUID of a domain by name or UUID, for taking its lock:
    /// `state` and `persistent` may be placeholders (read them with
    /// [`Hypervisor::lookup`] under the lock). A driver that caches handles
    /// answers without a call.
    fn resolve(&self, vm: &str) -> Result<DomainRef, HvError> {
        self.lookup(vm)
    }
    /// Opens what the driver opens lazily (the rest of a connection pool)
    /// or has dropped since (a libvirtd restart). The health probe thread
    /// calls it after every answer, off the start-up path. Blocks.
    fn warm_up(&self) {}
    /// [`Hypervisor::resolve`] from memory alone, without blocking: `None`
    /// when the driver would have to ask libvirt.
    fn resolve_cached(&self, _vm: &str) -> Option<DomainRef> {
        None
    }
    /// Every domain, running or defined.
    fn list(&self) -> Result<Vec<DomainRef>, HvError>;
    /// The domain's XML: live state, or the persistent definition.
    fn xml(&self, dom: &DomainRef, target: Target) -> Result<String, HvError>;
    /// virDomainAttachDeviceFlags with one target.
    fn attach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError>;
    /// virDomainDetachDeviceFlags with one target. For LIVE, success only
    /// means the unplug request was sent to the guest.
    fn detach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError>;
    /// virDomainUpdateDeviceFlags with one target: changes a device in
    /// place. libvirt finds the NIC by MAC and refuses changes to anything
    /// but the parts it can change live (link state, bandwidth, ...), so
    /// `xml` must be the NIC's full current definition with only those
    /// parts changed.
    fn update(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError>;

    /// The network devices QEMU holds for a running domain, asked of QEMU's
    /// monitor directly. Only used to find NICs libvirt lost (a libvirtd
    /// killed between QEMU's device_add and saving its state), so it is never
    /// called on the normal path: libvirt marks a domain "custom-monitor"
    /// tainted the first time it is used.
    fn qemu_nics(&self, _dom: &DomainRef) -> Result<Vec<QemuNic>, HvError> {
        Err(no_monitor("qemu-monitor qom-list"))
    }
    /// QEMU's device_del for a device libvirt does not know. Like a LIVE
    /// detach, success only means the unplug request reached the guest.
    fn qemu_device_del(&self, _dom: &DomainRef, _id: &str) -> Result<(), HvError> {
        Err(no_monitor("qemu-monitor device_del"))
    }
    /// QEMU's netdev_del, once the device using the backend is gone; closing
    /// the backend is what releases the host's tap.
    fn qemu_netdev_del(&self, _dom: &DomainRef, _id: &str) -> Result<(), HvError> {
        Err(no_monitor("qemu-monitor netdev_del"))
    }

    /// The names of the network filters libvirt has defined
    /// (virConnectListAllNWFilters). `Unsupported` when the connection has
    /// no nwfilter driver.
    fn nwfilters(&self) -> Result<Vec<String>, HvError> {
        Err(HvError::new(
            HvErrorKind::Unsupported,
            "list nwfilters",
            "this driver has no nwfilter support",
        ))
    }
    /// virNWFilterDefineXML: defines a network filter, or replaces the one
    /// with the same name and UUID.
    fn define_nwfilter(&self, _xml: &str) -> Result<(), HvError> {
        Err(HvError::new(
            HvErrorKind::Unsupported,
            "define nwfilter",
            "this driver has no nwfilter support",
        ))
    }
}
