//! libvirt's event loop and the domain events nic-agent subscribes to.
//!
//! libvirt delivers events (and keep-alive messages) only to a process that
//! registered an event loop implementation and runs it. This module
//! registers libvirt's default one once per process
//! (`virEventRegisterDefaultImpl`, before any connection is opened, as
//! libvirt requires) and runs `virEventRunDefaultImpl` on a dedicated
//! thread.
//!
//! Three domain events are subscribed, on one connection of the pool (the
//! event connection, see [`super::libvirt`]), with
//! `virConnectDomainEventRegisterAny`: DEVICE_REMOVED (the guest really
//! released a device: what a detach waits for), DEVICE_REMOVAL_FAILED (the
//! guest refused) and LIFECYCLE (started, stopped, ...: for the host-side
//! reconcile). They reach Rust as [`HvEvent`]s on a [`EventHub`], a tokio
//! broadcast channel, so any number of waiters can listen without libvirt
//! knowing about them.
//!
//! The `virt` crate has no wrapper for these calls, so this is the one
//! place in the crate with `unsafe` FFI. Callbacks never unwind into C
//! (`catch_unwind`), and each registration's opaque pointer is freed by the
//! free callback libvirt calls when the registration ends.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use tokio::sync::broadcast;
use virt::connect::Connect;
use virt_sys as sys;

use super::{HvError, HvErrorKind};

/// How many events a slow subscriber may fall behind before it is told it
/// lagged (and then re-reads the domain instead of trusting the stream).
const CAPACITY: usize = 1024;

/// What a domain's life did, from libvirt's LIFECYCLE event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// A persistent definition was added or changed.
    Defined,
    /// The persistent definition was removed.
    Undefined,
    /// QEMU started (boot, restore, incoming migration, ...).
    Started,
    /// The guest was paused.
    Suspended,
    /// The guest runs again after a pause.
    Resumed,
    /// QEMU is gone (shut down, destroyed, crashed, migrated away, saved).
    Stopped,
    /// The guest began to shut down.
    Shutdown,
    /// The guest suspended itself (S3/S4).
    PmSuspended,
    /// The guest crashed.
    Crashed,
    /// An event number this build does not know.
    Other(i32),
}

impl Lifecycle {
    fn from_raw(event: c_int) -> Self {
        match event as u32 {
            sys::VIR_DOMAIN_EVENT_DEFINED => Lifecycle::Defined,
            sys::VIR_DOMAIN_EVENT_UNDEFINED => Lifecycle::Undefined,
            sys::VIR_DOMAIN_EVENT_STARTED => Lifecycle::Started,
            sys::VIR_DOMAIN_EVENT_SUSPENDED => Lifecycle::Suspended,
            sys::VIR_DOMAIN_EVENT_RESUMED => Lifecycle::Resumed,
            sys::VIR_DOMAIN_EVENT_STOPPED => Lifecycle::Stopped,
            sys::VIR_DOMAIN_EVENT_SHUTDOWN => Lifecycle::Shutdown,
            sys::VIR_DOMAIN_EVENT_PMSUSPENDED => Lifecycle::PmSuspended,
            sys::VIR_DOMAIN_EVENT_CRASHED => Lifecycle::Crashed,
            _ => Lifecycle::Other(event),
        }
    }
}

/// One event from the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HvEvent {
    /// The guest released a device: it is gone from the live domain.
    DeviceRemoved {
        /// Domain UUID.
        uuid: String,
        /// The device's alias (`ua-...`, `net1`).
        alias: String,
    },
    /// The guest refused to release a device; it stays attached.
    DeviceRemovalFailed {
        /// Domain UUID.
        uuid: String,
        /// The device's alias.
        alias: String,
    },
    /// A domain's run state changed.
    Lifecycle {
        /// Domain UUID.
        uuid: String,
        /// Domain name.
        name: String,
        /// What happened.
        event: Lifecycle,
        /// libvirt's detail number for the event (e.g. destroyed vs crashed).
        detail: i32,
    },
    /// The connection was lost and opened again, and the subscriptions were
    /// made anew. Events in between are lost: whoever waits for one must
    /// read the state again instead.
    Resubscribed,
}

/// Where events are published; subscribe to receive them.
#[derive(Debug, Clone)]
pub struct EventHub {
    tx: broadcast::Sender<HvEvent>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl EventHub {
    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HvEvent> {
        self.tx.subscribe()
    }

    /// Publishes an event; nobody listening is not an error.
    pub fn publish(&self, ev: HvEvent) {
        super::calls::count_event(match &ev {
            HvEvent::DeviceRemoved { .. } => "device-removed",
            HvEvent::DeviceRemovalFailed { .. } => "device-removal-failed",
            HvEvent::Lifecycle { .. } => "lifecycle",
            HvEvent::Resubscribed => "resubscribed",
        });
        let _ = self.tx.send(ev);
    }
}

/// Registers libvirt's default event loop and starts the thread that runs
/// it, once per process. Must run before the first connection is opened:
/// a connection made earlier has no keep-alive and delivers no events.
pub fn ensure_event_loop() -> Result<(), HvError> {
    static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    LOOP.get_or_init(|| {
        // SAFETY: no arguments; libvirt documents it as callable once
        // before any connection is opened, which the OnceLock guarantees
        // for this process (nothing else in the crate opens a connection
        // before Libvirt::connect calls this).
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            return Err("virEventRegisterDefaultImpl failed".into());
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                // SAFETY: the default implementation was registered above;
                // this thread is the only one that runs it.
                if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                    tracing::warn!("libvirt event loop iteration failed");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .map(|_| ())
            .map_err(|e| format!("cannot start the libvirt event thread: {e}"))
    })
    .clone()
    .map_err(|m| HvError::new(HvErrorKind::Internal, "event loop", m))
}

/// The registrations made on one connection, to undo when it is dropped.
#[derive(Debug)]
pub(crate) struct Subscription {
    ids: Vec<c_int>,
}

impl Subscription {
    /// Ends the registrations. On a dead connection this fails quickly and
    /// libvirt frees the opaques itself when the connection goes.
    pub(crate) fn end(self, conn: &Connect) {
        for id in self.ids {
            // SAFETY: `conn` is the live connection the id was registered
            // on (the caller keeps it until after this call); the id came
            // from virConnectDomainEventRegisterAny on it.
            let _ = unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
        }
    }
}

/// Subscribes `hub` to DEVICE_REMOVED, DEVICE_REMOVAL_FAILED and LIFECYCLE
/// for every domain of `conn`. All or nothing: a driver that refuses one
/// gets none, and the caller falls back to polling.
pub(crate) fn subscribe(conn: &Connect, hub: &EventHub) -> Result<Subscription, HvError> {
    // SAFETY (all three transmutes): libvirt's C API takes every callback
    // as the generic type and calls it with the signature that belongs to
    // the event id it was registered for (C's VIR_DOMAIN_EVENT_CALLBACK
    // cast). Each function below has exactly that signature for its id.
    let removed: sys::virConnectDomainEventGenericCallback =
        Some(unsafe { std::mem::transmute::<DeviceCallback, GenericCallback>(on_device_removed) });
    let failed: sys::virConnectDomainEventGenericCallback = Some(unsafe {
        std::mem::transmute::<DeviceCallback, GenericCallback>(on_device_removal_failed)
    });
    let lifecycle: sys::virConnectDomainEventGenericCallback =
        Some(unsafe { std::mem::transmute::<LifecycleCallback, GenericCallback>(on_lifecycle) });
    let mut sub = Subscription { ids: Vec::new() };
    for (id, cb, name) in [
        (
            sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
            removed,
            "DEVICE_REMOVED",
        ),
        (
            sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
            failed,
            "DEVICE_REMOVAL_FAILED",
        ),
        (sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, "LIFECYCLE"),
    ] {
        let opaque = Box::into_raw(Box::new(hub.clone())) as *mut c_void;
        super::calls::count("virConnectDomainEventRegisterAny");
        // SAFETY: `conn` is a live connection; a null domain means "every
        // domain"; `opaque` is a leaked Box<EventHub> that libvirt hands to
        // the callback and, when the registration ends, to `free_hub`,
        // which turns it back into the Box exactly once.
        let rc = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                id as c_int,
                cb,
                opaque,
                Some(free_hub),
            )
        };
        if rc < 0 {
            // SAFETY: registration failed, so libvirt did not keep the
            // opaque and will never free it: we still own the Box.
            drop(unsafe { Box::from_raw(opaque as *mut EventHub) });
            let err = virt::error::Error::last_error();
            sub.end(conn);
            return Err(HvError::new(
                HvErrorKind::Unsupported,
                format!("subscribe {name}"),
                err.message().to_string(),
            ));
        }
        sub.ids.push(rc);
    }
    Ok(sub)
}

type GenericCallback = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
type DeviceCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void);
type LifecycleCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;

/// Frees a registration's opaque.
unsafe extern "C" fn free_hub(opaque: *mut c_void) {
    let _ = std::panic::catch_unwind(|| {
        if !opaque.is_null() {
            // SAFETY: `opaque` is the Box<EventHub> leaked in `subscribe`
            // for this registration; libvirt calls the free callback once.
            drop(unsafe { Box::from_raw(opaque as *mut EventHub) });
        }
    });
}

/// The UUID and name of the domain an event is about.
///
/// # Safety
/// `dom` must be the valid domain pointer libvirt passed to a callback.
unsafe fn identity(dom: sys::virDomainPtr) -> Option<(String, String)> {
    if dom.is_null() {
        return None;
    }
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: `dom` is valid for the callback's duration (caller's
    // contract); `buf` has the VIR_UUID_STRING_BUFLEN bytes libvirt writes,
    // NUL included. Both calls read the domain object locally, without RPC.
    let uuid = unsafe {
        if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) < 0 {
            return None;
        }
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    };
    // SAFETY: as above; the name belongs to the domain object and is only
    // copied here.
    let name = unsafe {
        let p = sys::virDomainGetName(dom);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Some((uuid, name))
}

/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The hub behind a callback's opaque.
///
/// # Safety
/// `opaque` is the Box<EventHub> registered in `subscribe`, still alive
/// (libvirt frees it only after the last callback).
unsafe fn hub<'a>(opaque: *mut c_void) -> Option<&'a EventHub> {
    // SAFETY: the caller's contract.
    unsafe { (opaque as *const EventHub).as_ref() }
}

unsafe extern "C" fn on_device_removed(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: libvirt calls this with the pointers of a live event and
        // the opaque registered with it.
        let (Some(h), Some((uuid, _))) = (unsafe { hub(opaque) }, unsafe { identity(dom) }) else {
            return;
        };
        // SAFETY: libvirt passes the alias as a NUL-terminated string.
        let alias = unsafe { text(alias) };
        tracing::debug!(%uuid, %alias, "libvirt event: device removed");
        h.publish(HvEvent::DeviceRemoved { uuid, alias });
    }));
}

unsafe extern "C" fn on_device_removal_failed(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: as in on_device_removed.
        let (Some(h), Some((uuid, _))) = (unsafe { hub(opaque) }, unsafe { identity(dom) }) else {
            return;
        };
        // SAFETY: libvirt passes the alias as a NUL-terminated string.
        let alias = unsafe { text(alias) };
        tracing::info!(%uuid, %alias, "libvirt event: device removal failed");
        h.publish(HvEvent::DeviceRemovalFailed { uuid, alias });
    }));
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: as in on_device_removed.
        let (Some(h), Some((uuid, name))) = (unsafe { hub(opaque) }, unsafe { identity(dom) })
        else {
            return;
        };
        let event = Lifecycle::from_raw(event);
        tracing::debug!(%uuid, %name, ?event, detail, "libvirt event: lifecycle");
        h.publish(HvEvent::Lifecycle {
            uuid,
            name,
            event,
            detail,
        });
    }));
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_numbers_map_to_names() {
        assert_eq!(Lifecycle::from_raw(2), Lifecycle::Started);
        assert_eq!(Lifecycle::from_raw(5), Lifecycle::Stopped);
        assert_eq!(Lifecycle::from_raw(99), Lifecycle::Other(99));
    }

    #[tokio::test]
    async fn every_subscriber_gets_every_event() {
        let hub = EventHub::default();
        let mut a = hub.subscribe();
        let mut b = hub.subscribe();
        let ev = HvEvent::DeviceRemoved {
            uuid: "u".into(),
            alias: "ua-1".into(),
        };
        hub.publish(ev.clone());
        assert_eq!(a.recv().await.ok(), Some(ev.clone()));
        assert_eq!(b.recv().await.ok(), Some(ev));
    }

    /// The real registration against libvirt's test driver: the event loop
    /// runs, the three subscriptions are accepted, and a domain started on
    /// that connection is reported as a lifecycle event.
    #[test]
    fn test_driver_delivers_lifecycle_events() {
        ensure_event_loop().expect("event loop");
        let conn = Connect::open(Some("test:///default")).expect("test driver");
        let hub = EventHub::default();
        let mut rx = hub.subscribe();
        let sub = subscribe(&conn, &hub).expect("subscribe");
        let dom = conn.lookup_domain_by_name("test").expect("test domain");
        dom.suspend().expect("suspend");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let got = loop {
            match rx.try_recv() {
                Ok(HvEvent::Lifecycle { event, name, .. }) => break Some((event, name)),
                Ok(_) => {}
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(_) => break None,
            }
        };
        let _ = dom.resume();
        sub.end(&conn);
        assert_eq!(got, Some((Lifecycle::Suspended, "test".to_string())));
    }
}
