//! An in-memory [`Hypervisor`] for orchestration tests of `hotplug`.
//!
//! It records every call and can be scripted to fail, to delay an unplug,
//! or to hang like a stopped libvirtd. Built with [`FakeHypervisor::with_events`]
//! it publishes DEVICE_REMOVED when a device leaves, and tests can publish
//! any other event.
//!
//! Most paths it drives also run against the libvirt test driver and real
//! QEMU in `tests/`. For these it is still the only proof, because the lab
//! cannot force the timing or the failure (read from the tests as of this
//! comment; keep the list true when a lab test takes one over):
//!
//! - a CONFIG attach failing after the LIVE half succeeded, and a LIVE
//!   detach failing after CONFIG was removed, each undone
//!   (`hotplug::tests`);
//! - a call that libvirt recorded and then lost its reply for
//!   (`lose_reply`), and an undo that waits for a restarting libvirtd: the
//!   lab kills libvirtd mid-storm, but cannot choose the step it lands in;
//! - DEVICE_REMOVAL_FAILED ending a detach's wait, an event arriving during
//!   the unplug call, a reconnect mid-wait, and a dropped request leaving its
//!   VM in doubt (`hotplug::event_tests`);
//! - MoveNic's rollbacks: libvirt failing on the second VM, a pending unplug
//!   from the first, crossing moves (`hotplug::moves`); the lab proves a
//!   move and a refused move by capacity;
//! - the per-VM queue limit answering RESOURCE_EXHAUSTED (`hotplug::locks`);
//! - asking a guest again: at most `MAX_ASKS` requests, none while paused,
//!   none inside a wait too short for libvirt's own (`hotplug::event_tests`);
//!   the lab proves a request lost while the guest boots and asked again;
//! - live bandwidth going through on a kernel that has `sch_sfq` and
//!   `act_police` (`hotplug::update`): the lab's kernel has neither.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use super::{
    DomainRef, EventHub, HvError, HvErrorKind, HvEvent, Hypervisor, QemuNic, RunState, Target,
};

/// How the fake guest answers a live unplug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unplug {
    /// The device leaves at once.
    Immediate,
    /// The device leaves after this many live XML reads.
    AfterReads(u32),
    /// The guest never acks (paused or hung); the device stays.
    Never,
    /// The guest misses this many requests (one that came while it
    /// booted, say): each leaves the device and announces nothing. The
    /// requests after them are answered at once.
    LoseRequests(u32),
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// "attach", "detach", "update", "device_del", "netdev_del",
    /// "list_nwfilters" or "define_nwfilter".
    pub op: &'static str,
    /// Live or config.
    pub target: Target,
    /// The MAC the XML named (the QEMU id for device_del and netdev_del).
    pub mac: String,
}

struct FakeDomain {
    dom: DomainRef,
    vcpus: u32,
    live: Vec<String>,
    config: Vec<String>,
    unplug_countdown: HashMap<String, u32>,
    /// NICs only "QEMU" has (libvirt lost them), and whether the guest
    /// releases them on device_del.
    ghosts: Vec<(QemuNic, bool)>,
}

/// A scripted fake hypervisor.
pub struct FakeHypervisor {
    doms: Mutex<Vec<FakeDomain>>,
    calls: Mutex<Vec<Call>>,
    /// How live unplugs behave.
    pub unplug: Mutex<Unplug>,
    /// Fail the next call of this (op, target) with this kind.
    pub fail_next: Mutex<Option<(&'static str, Target, HvErrorKind)>>,
    /// More scripted failures, consumed in order as matching calls come.
    pub fail_queue: Mutex<Vec<(&'static str, Target, HvErrorKind)>>,
    /// Fail the n-th (from 1) live domain-XML read from now with this
    /// kind: the read right after an attach, say, which shares its trip
    /// with the attach.
    pub fail_live_read: Mutex<Option<(u64, HvErrorKind)>>,
    /// Calls of this (op, target) that take effect and then answer
    /// Unavailable, like libvirtd dying after recording a change and before
    /// replying. Consumed in order.
    pub lose_reply: Mutex<Vec<(&'static str, Target)>>,
    /// Calls of this (op, target) that block, like a call to a SIGSTOPped
    /// libvirtd, until [`FakeHypervisor::release_hangs`]. "probe" hangs
    /// the health probe. Every matching call hangs while listed.
    hang: Mutex<Vec<(&'static str, Target)>>,
    released: (Mutex<u64>, Condvar),
    events: Option<EventHub>,
    live_reads: AtomicU64,
    /// Answers [`Hypervisor::in_process`]: the fake plays libvirt's
    /// in-process test driver when set.
    pub in_process: AtomicBool,
    /// Defined network filters by name; `None` when the "host" has no
    /// nwfilter driver. Starts with libvirt's standard set.
    pub nwfilters: Mutex<Option<Vec<String>>>,
}

fn mac_of(xml: &str) -> String {
    // Either quote style: the writer uses double quotes, libvirt single.
    let key = "address=";
    xml.find("<mac ")
        .and_then(|i| xml[i..].find(key).map(|j| i + j + key.len() + 1))
        .and_then(|s| xml.get(s..s + 17))
        .map(|m| m.to_ascii_lowercase())
        .unwrap_or_default()
}

impl Default for FakeHypervisor {
    fn default() -> Self {
        FakeHypervisor {
            doms: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            unplug: Mutex::new(Unplug::Immediate),
            fail_next: Mutex::new(None),
            fail_queue: Mutex::new(Vec::new()),
            fail_live_read: Mutex::new(None),
            lose_reply: Mutex::new(Vec::new()),
            hang: Mutex::new(Vec::new()),
            released: (Mutex::new(0), Condvar::new()),
            events: None,
            live_reads: AtomicU64::new(0),
            in_process: AtomicBool::new(false),
            nwfilters: Mutex::new(Some(
                crate::xml::nwfilter::STANDARD_PIECES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )),
        }
    }
}

/// The alias (`<alias name='...'/>`) in a device's XML.
fn alias_of(xml: &str) -> Option<String> {
    let at = xml.find("<alias name=")? + "<alias name=".len() + 1;
    let end = xml[at..].find(['"', '\''])?;
    Some(xml[at..at + end].to_string())
}

impl FakeHypervisor {
    /// A fake whose driver has events: a device that leaves the live
    /// domain is announced with DEVICE_REMOVED.
    pub fn with_events() -> Self {
        FakeHypervisor {
            events: Some(EventHub::default()),
            ..FakeHypervisor::default()
        }
    }

    /// Publishes an event as libvirt would (e.g. a removal-failed, or a
    /// resubscription after a reconnect).
    pub fn emit(&self, ev: HvEvent) {
        if let Some(h) = &self.events {
            h.publish(ev);
        }
    }

    /// The UUID of a domain by name.
    pub fn uuid_of(&self, vm: &str) -> String {
        self.with(vm, |d| Ok(d.dom.uuid.clone()))
            .unwrap_or_default()
    }

    /// The alias of a live NIC by MAC.
    pub fn live_alias(&self, vm: &str, mac: &str) -> Option<String> {
        self.with(vm, |d| {
            Ok(d.live
                .iter()
                .find(|x| mac_of(x) == mac)
                .and_then(|x| alias_of(x)))
        })
        .ok()
        .flatten()
    }

    /// How many times the live XML was read.
    pub fn live_reads(&self) -> u64 {
        self.live_reads.load(Ordering::SeqCst)
    }

    /// Makes every later call of (op, target) block until
    /// [`FakeHypervisor::release_hangs`].
    pub fn hang(&self, op: &'static str, target: Target) {
        if let Ok(mut h) = self.hang.lock() {
            h.push((op, target));
        }
    }

    /// Lets every hanging call go on, and stops hanging new ones.
    pub fn release_hangs(&self) {
        if let Ok(mut h) = self.hang.lock() {
            h.clear();
        }
        let (m, cv) = &self.released;
        if let Ok(mut n) = m.lock() {
            *n += 1;
        }
        cv.notify_all();
    }

    fn maybe_hang(&self, op: &'static str, target: Target) {
        let hangs = self
            .hang
            .lock()
            .map(|h| h.contains(&(op, target)))
            .unwrap_or(false);
        if !hangs {
            return;
        }
        let (m, cv) = &self.released;
        let Ok(g) = m.lock() else { return };
        let start = *g;
        let _g = cv.wait_while(g, |n| *n == start);
    }

    /// Removes a live device and, with events, announces it.
    fn remove_live(&self, d: &mut FakeDomain, mac: &str, announce: bool) {
        let alias = d
            .live
            .iter()
            .find(|x| mac_of(x) == mac)
            .and_then(|x| alias_of(x));
        d.live.retain(|x| mac_of(x) != mac);
        if let (true, Some(alias)) = (announce, alias) {
            self.emit(HvEvent::DeviceRemoved {
                uuid: d.dom.uuid.clone(),
                alias,
            });
        }
    }

    /// Adds a domain with no NICs.
    pub fn add(&self, name: &str, state: RunState, persistent: bool, vcpus: u32) {
        let uuid = format!(
            "00000000-0000-4000-8000-{:012x}",
            self.doms.lock().map(|d| d.len()).unwrap_or(0) + 1
        );
        if let Ok(mut d) = self.doms.lock() {
            d.push(FakeDomain {
                dom: DomainRef {
                    name: name.into(),
                    uuid,
                    state,
                    persistent,
                },
                vcpus,
                live: Vec::new(),
                config: Vec::new(),
                unplug_countdown: HashMap::new(),
                ghosts: Vec::new(),
            });
        }
    }

    /// The domain is now in this state (paused, resumed, ...).
    pub fn set_state(&self, vm: &str, state: RunState) {
        let _ = self.with(vm, |d| {
            d.dom.state = state;
            Ok(())
        });
    }

    /// The fake guest finally releases a device whose unplug was pending
    /// (e.g. a paused guest was resumed).
    pub fn guest_release(&self, vm: &str, mac: &str) {
        let _ = self.with(vm, |d| {
            d.unplug_countdown.remove(mac);
            self.remove_live(d, mac, true);
            Ok(())
        });
    }

    /// Like [`FakeHypervisor::guest_release`], but the event is lost (it
    /// happened while the connection was down).
    pub fn guest_release_unannounced(&self, vm: &str, mac: &str) {
        let _ = self.with(vm, |d| {
            d.unplug_countdown.remove(mac);
            self.remove_live(d, mac, false);
            Ok(())
        });
    }

    /// The guest refuses a pending unplug: the device stays, and libvirt
    /// announces DEVICE_REMOVAL_FAILED.
    pub fn guest_refuse(&self, vm: &str, mac: &str) {
        let _ = self.with(vm, |d| {
            d.unplug_countdown.remove(mac);
            if let Some(alias) = d
                .live
                .iter()
                .find(|x| mac_of(x) == mac)
                .and_then(|x| alias_of(x))
            {
                self.emit(HvEvent::DeviceRemovalFailed {
                    uuid: d.dom.uuid.clone(),
                    alias,
                });
            }
            Ok(())
        });
    }

    /// Gives a running domain a NIC that only QEMU has, as a libvirtd killed
    /// mid-attach leaves. While it exists every live attach is refused, the
    /// way QEMU refuses the slot libvirt hands out again. `releases`: whether
    /// the guest lets it go on device_del.
    pub fn add_ghost(&self, vm: &str, id: &str, mac: &str, releases: bool) {
        let _ = self.with(vm, |d| {
            d.ghosts.push((
                QemuNic {
                    id: id.into(),
                    netdev: Some(format!("host{id}")),
                    mac: Some(mac.into()),
                },
                releases,
            ));
            Ok(())
        });
    }

    /// The guest resumes and acts on the unplugs it was sent: every ghost
    /// leaves QEMU (its netdev stays until netdev_del, as in QEMU).
    pub fn release_ghosts(&self, vm: &str) {
        let _ = self.with(vm, |d| {
            d.ghosts.clear();
            Ok(())
        });
    }

    /// The ghost NICs a domain still has.
    pub fn ghosts(&self, vm: &str) -> Vec<QemuNic> {
        self.with(vm, |d| {
            Ok(d.ghosts.iter().map(|(g, _)| g.clone()).collect())
        })
        .unwrap_or_default()
    }

    fn record(&self, op: &'static str, target: Target, mac: String) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(Call { op, target, mac });
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn with<T>(
        &self,
        uuid: &str,
        f: impl FnOnce(&mut FakeDomain) -> Result<T, HvError>,
    ) -> Result<T, HvError> {
        let mut doms = self
            .doms
            .lock()
            .map_err(|_| HvError::new(HvErrorKind::Internal, "fake", "poisoned"))?;
        let d = doms
            .iter_mut()
            .find(|d| d.dom.uuid == uuid || d.dom.name == uuid)
            .ok_or_else(|| HvError::new(HvErrorKind::NotFound, "lookup", "no domain"))?;
        f(d)
    }

    fn reply_lost(&self, op: &'static str, target: Target) -> Result<(), HvError> {
        let mut q = self
            .lose_reply
            .lock()
            .map_err(|_| HvError::new(HvErrorKind::Internal, "fake", "poisoned"))?;
        match q.iter().position(|(o, t)| *o == op && *t == target) {
            Some(i) => {
                q.remove(i);
                Err(HvError::new(
                    HvErrorKind::Unavailable,
                    op,
                    "connection lost after the change",
                ))
            }
            None => Ok(()),
        }
    }

    fn scripted_failure(&self, op: &'static str, target: Target) -> Result<(), HvError> {
        let mut f = self
            .fail_next
            .lock()
            .map_err(|_| HvError::new(HvErrorKind::Internal, "fake", "poisoned"))?;
        if let Some((o, t, kind)) = *f {
            if o == op && t == target {
                *f = None;
                return Err(HvError::new(kind, op, "scripted failure"));
            }
        }
        drop(f);
        let mut q = self
            .fail_queue
            .lock()
            .map_err(|_| HvError::new(HvErrorKind::Internal, "fake", "poisoned"))?;
        if let Some(i) = q.iter().position(|(o, t, _)| *o == op && *t == target) {
            let (_, _, kind) = q.remove(i);
            return Err(HvError::new(kind, op, "scripted failure"));
        }
        Ok(())
    }
}

impl Hypervisor for FakeHypervisor {
    fn driver(&self) -> String {
        "Fake".into()
    }
    fn is_alive(&self) -> bool {
        true
    }
    fn probe(&self) -> Result<(), HvError> {
        self.maybe_hang("probe", Target::Live);
        Ok(())
    }
    fn warm_up(&self) {
        self.maybe_hang("warm_up", Target::Live);
        self.record("warm_up", Target::Live, String::new());
    }
    fn events(&self) -> Option<EventHub> {
        self.events.clone()
    }
    fn in_process(&self) -> bool {
        self.in_process.load(Ordering::SeqCst)
    }
    fn lookup(&self, vm: &str) -> Result<DomainRef, HvError> {
        self.maybe_hang("lookup", Target::Live);
        self.with(vm, |d| Ok(d.dom.clone()))
    }
    fn list(&self) -> Result<Vec<DomainRef>, HvError> {
        Ok(self
            .doms
            .lock()
            .map(|d| d.iter().map(|d| d.dom.clone()).collect())
            .unwrap_or_default())
    }
    fn xml(&self, dom: &DomainRef, target: Target) -> Result<String, HvError> {
        self.maybe_hang("xml", target);
        if target == Target::Live {
            self.live_reads.fetch_add(1, Ordering::SeqCst);
            let mut f = self
                .fail_live_read
                .lock()
                .map_err(|_| HvError::new(HvErrorKind::Internal, "fake", "poisoned"))?;
            if let Some((n, kind)) = *f {
                *f = (n > 1).then_some((n - 1, kind));
                if n <= 1 {
                    return Err(HvError::new(kind, "dumpxml", "scripted failure"));
                }
            }
        }
        self.with(&dom.uuid, |d| {
            if target == Target::Live {
                // A pending unplug completes after a number of reads.
                let done: Vec<String> = d
                    .unplug_countdown
                    .iter_mut()
                    .filter_map(|(mac, n)| {
                        *n = n.saturating_sub(1);
                        (*n == 0).then(|| mac.clone())
                    })
                    .collect();
                for mac in done {
                    d.unplug_countdown.remove(&mac);
                    self.remove_live(d, &mac, true);
                }
            }
            let nics = match target {
                Target::Live => d.live.join("\n"),
                Target::Config => d.config.join("\n"),
            };
            Ok(format!(
                "<domain type='qemu'><name>{}</name><uuid>{}</uuid><vcpu>{}</vcpu><os><type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type></os><features><acpi/></features><devices><controller type='pci' index='0' model='pci-root'/>{nics}</devices></domain>",
                d.dom.name, d.dom.uuid, d.vcpus
            ))
        })
    }
    fn attach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        self.record("attach", target, mac_of(xml));
        self.maybe_hang("attach", target);
        self.scripted_failure("attach", target)?;
        self.with(&dom.uuid, |d| {
            if let (Target::Live, Some((g, _))) = (target, d.ghosts.first()) {
                return Err(HvError::new(
                    HvErrorKind::Internal,
                    "attach (live)",
                    format!("PCI: slot 3 function 0 not available for virtio-net-pci, in use by virtio-net-pci,id={}", g.id),
                ));
            }
            match target {
                Target::Live => d.live.push(xml.to_string()),
                Target::Config => d.config.push(xml.to_string()),
            }
            Ok(())
        })?;
        self.reply_lost("attach", target)
    }
    fn detach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        let mac = mac_of(xml);
        self.record("detach", target, mac.clone());
        self.maybe_hang("detach", target);
        self.scripted_failure("detach", target)?;
        let unplug = match self.unplug.lock() {
            Ok(mut u) => {
                let now = *u;
                if let (Target::Live, Unplug::LoseRequests(n)) = (target, now) {
                    *u = match n {
                        0 | 1 => Unplug::Immediate,
                        n => Unplug::LoseRequests(n - 1),
                    };
                }
                now
            }
            Err(_) => Unplug::Immediate,
        };
        self.with(&dom.uuid, |d| {
            let list = match target {
                Target::Live => &mut d.live,
                Target::Config => &mut d.config,
            };
            if !list.iter().any(|x| mac_of(x) == mac) {
                return Err(HvError::new(
                    HvErrorKind::DeviceMissing,
                    "detach",
                    "device not found",
                ));
            }
            match (target, unplug) {
                (Target::Config, _) => list.retain(|x| mac_of(x) != mac),
                // Like QEMU with a quick guest: the event comes while
                // libvirt's detach call is still returning.
                (Target::Live, Unplug::Immediate) => self.remove_live(d, &mac, true),
                (Target::Live, Unplug::AfterReads(n)) => {
                    d.unplug_countdown.insert(mac, n.max(1));
                }
                (Target::Live, Unplug::Never) => {}
                (Target::Live, Unplug::LoseRequests(0)) => self.remove_live(d, &mac, true),
                (Target::Live, Unplug::LoseRequests(_)) => {}
            }
            Ok(())
        })
    }
    fn nwfilters(&self) -> Result<Vec<String>, HvError> {
        self.record("list_nwfilters", Target::Live, String::new());
        self.scripted_failure("list_nwfilters", Target::Live)?;
        let f = self
            .nwfilters
            .lock()
            .map_err(|_| HvError::new(HvErrorKind::Internal, "fake", "poisoned"))?;
        f.clone().ok_or_else(|| {
            HvError::new(
                HvErrorKind::Unsupported,
                "list nwfilters",
                "this function is not supported by the connection driver",
            )
        })
    }

    fn define_nwfilter(&self, xml: &str) -> Result<(), HvError> {
        let name = xml
            .split_once("name='")
            .and_then(|(_, rest)| rest.split_once('\''))
            .map(|(n, _)| n.to_string())
            .unwrap_or_default();
        // `mac` carries the filter's name for this op.
        self.record("define_nwfilter", Target::Live, name.clone());
        self.scripted_failure("define_nwfilter", Target::Live)?;
        let mut f = self
            .nwfilters
            .lock()
            .map_err(|_| HvError::new(HvErrorKind::Internal, "fake", "poisoned"))?;
        match f.as_mut() {
            None => Err(HvError::new(
                HvErrorKind::Unsupported,
                "define nwfilter",
                "this function is not supported by the connection driver",
            )),
            Some(list) => {
                if !list.contains(&name) {
                    list.push(name);
                }
                Ok(())
            }
        }
    }

    fn update(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        let mac = mac_of(xml);
        self.record("update", target, mac.clone());
        self.scripted_failure("update", target)?;
        self.with(&dom.uuid, |d| {
            let list = match target {
                Target::Live => &mut d.live,
                Target::Config => &mut d.config,
            };
            // Like libvirt: the device is found by MAC and replaced whole.
            match list.iter_mut().find(|x| mac_of(x) == mac) {
                Some(x) => {
                    *x = xml.to_string();
                    Ok(())
                }
                None => Err(HvError::new(
                    HvErrorKind::DeviceMissing,
                    "update",
                    "device not found",
                )),
            }
        })
    }
    fn qemu_nics(&self, dom: &DomainRef) -> Result<Vec<QemuNic>, HvError> {
        self.scripted_failure("qemu_nics", Target::Live)?;
        self.with(&dom.uuid, |d| {
            // The NICs libvirt knows carry their alias as QEMU id.
            let known = d.live.iter().filter_map(|x| {
                let at = x.find("<alias name=")? + "<alias name=".len() + 1;
                let end = x[at..].find(['"', '\''])?;
                Some(QemuNic {
                    id: x[at..at + end].to_string(),
                    netdev: Some(format!("host{}", &x[at..at + end])),
                    mac: Some(mac_of(x)),
                })
            });
            Ok(known
                .chain(d.ghosts.iter().map(|(g, _)| g.clone()))
                .collect())
        })
    }
    fn qemu_device_del(&self, dom: &DomainRef, id: &str) -> Result<(), HvError> {
        self.record("device_del", Target::Live, id.to_string());
        self.scripted_failure("device_del", Target::Live)?;
        self.with(&dom.uuid, |d| {
            let Some(i) = d.ghosts.iter().position(|(g, _)| g.id == id) else {
                return Err(HvError::new(
                    HvErrorKind::DeviceMissing,
                    "device_del",
                    format!("DeviceNotFound: Device '{id}' not found"),
                ));
            };
            if d.ghosts[i].1 {
                d.ghosts.remove(i);
            }
            Ok(())
        })
    }
    fn qemu_netdev_del(&self, _dom: &DomainRef, id: &str) -> Result<(), HvError> {
        self.record("netdev_del", Target::Live, id.to_string());
        Ok(())
    }
}
