//! Deadlines on libvirt calls, and VMs "in doubt".
//!
//! libvirt's API blocks, and a libvirtd that is alive but stuck (SIGSTOP,
//! a wedged QEMU monitor) answers nothing: the call can neither be
//! cancelled nor trusted to have failed. So every call runs on the blocking
//! pool under a deadline. Past it the caller gets UNAVAILABLE, but the call
//! may still complete later, so its VM is marked **in doubt**: every
//! further libvirt call on that VM, and every new request for it, answers
//! UNAVAILABLE ("vm X is in doubt: a libvirt call is still outstanding")
//! until the outstanding call has returned and the domain has been read
//! again. Other VMs carry on.
//!
//! The bookkeeping does not depend on the caller still waiting: a request
//! whose future is dropped (the client's gRPC deadline) abandons its call
//! the same way a deadline does.
//!
//! A call that had not started yet when it was abandoned (it waited for a
//! blocking thread) is skipped instead of run late.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::HotplugError;
use crate::hypervisor::{DomainRef, EventHub, HvError, HvErrorKind, Hypervisor, QemuNic, Target};

/// The VMs in doubt: UUID → (name, calls outstanding past their deadline).
#[derive(Default)]
pub(super) struct InDoubt {
    vms: Mutex<HashMap<String, (String, usize)>>,
}

fn in_doubt_error(name: &str) -> HvError {
    HvError::new(
        HvErrorKind::Unavailable,
        "in doubt",
        format!(
            "vm {name} is in doubt: a libvirt call is still outstanding; retry once libvirtd answers again"
        ),
    )
}

impl InDoubt {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, usize)>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// UNAVAILABLE when the VM is in doubt.
    pub(super) fn check(&self, dom: &DomainRef) -> Result<(), HotplugError> {
        self.check_uuid(&dom.uuid, &dom.name).map_err(Into::into)
    }

    fn check_uuid(&self, uuid: &str, name: &str) -> Result<(), HvError> {
        match self.lock().get(uuid) {
            Some((known, _)) => Err(in_doubt_error(if known.is_empty() { name } else { known })),
            None => Ok(()),
        }
    }

    /// Whether a VM is in doubt right now.
    #[cfg(test)]
    pub(super) fn contains(&self, uuid: &str) -> bool {
        self.lock().contains_key(uuid)
    }

    fn mark(&self, uuid: &str, name: &str) {
        let mut g = self.lock();
        let e = g
            .entry(uuid.to_string())
            .or_insert_with(|| (name.to_string(), 0));
        e.1 += 1;
    }

    fn clear(&self, uuid: &str) {
        let mut g = self.lock();
        if let Some(e) = g.get_mut(uuid) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                g.remove(uuid);
            }
        }
    }
}

/// The VM a call is about: (UUID, name).
type Vm = Option<(String, String)>;

enum State {
    /// Waiting for a blocking thread.
    Queued,
    /// In libvirt.
    Running(Vm),
    /// Abandoned before it started: it will not run.
    Skipped,
    /// Abandoned while in libvirt: its VM is in doubt until it returns.
    Orphaned(Vm),
    /// Returned while its caller still waited.
    Done,
}

/// One call's progress, shared by the caller and the blocking thread.
struct Ticket {
    state: Mutex<State>,
}

impl Ticket {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On the blocking thread, before the call: false when it was
    /// abandoned while queued.
    fn start(&self) -> bool {
        let mut s = self.lock();
        match *s {
            State::Queued => {
                *s = State::Running(None);
                true
            }
            _ => false,
        }
    }

    /// The call names its VM; refused when that VM is in doubt.
    fn enter(&self, doubt: &InDoubt, dom: &DomainRef) -> Result<(), HvError> {
        doubt.check_uuid(&dom.uuid, &dom.name)?;
        let mut s = self.lock();
        if let State::Running(vm) = &mut *s {
            *vm = Some((dom.uuid.clone(), dom.name.clone()));
        }
        Ok(())
    }

    /// On the blocking thread, after the call. An orphaned call reads its
    /// domain again (bypassing the gate) before its VM leaves doubt, so the
    /// next request plans against what libvirt now has.
    fn finish(&self, hv: &dyn Hypervisor, doubt: &InDoubt) {
        let orphan = {
            let mut s = self.lock();
            match std::mem::replace(&mut *s, State::Done) {
                State::Orphaned(vm) => Some(vm),
                _ => None,
            }
        };
        let Some(Some((uuid, name))) = orphan else {
            return;
        };
        let reread = hv.lookup(&uuid).and_then(|d| {
            if d.state.is_live() {
                hv.xml(&d, Target::Live).map(|_| ())
            } else {
                Ok(())
            }
        });
        match reread {
            Ok(()) => {
                tracing::info!(vm = %name, "late libvirt call returned and the domain was read again: no longer in doubt")
            }
            // Still released: keeping the VM blocked on a read that fails
            // for its own reason (the VM is gone, libvirtd restarted) would
            // help nobody; the next request reads it anyway.
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, "late libvirt call returned; reading the domain again failed; no longer in doubt")
            }
        }
        doubt.clear(&uuid);
    }

    /// The caller gave up (deadline or dropped): returns the VM it leaves
    /// in doubt, if any.
    fn abandon(&self, doubt: &InDoubt) -> Vm {
        let mut s = self.lock();
        match std::mem::replace(&mut *s, State::Done) {
            State::Queued => {
                *s = State::Skipped;
                None
            }
            State::Running(vm) => {
                if let Some((uuid, name)) = &vm {
                    doubt.mark(uuid, name);
                    tracing::warn!(vm = %name, "libvirt call outstanding past its deadline: vm in doubt until it returns");
                }
                *s = State::Orphaned(vm.clone());
                vm
            }
            other => {
                *s = other;
                None
            }
        }
    }
}

/// Abandons the call when the caller stops waiting, for whatever reason.
struct Waiter {
    ticket: Arc<Ticket>,
    doubt: Arc<InDoubt>,
    armed: bool,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.armed {
            self.ticket.abandon(&self.doubt);
        }
    }
}

/// Runs `f` on the blocking pool with a deadline; see the module docs.
pub(super) async fn run<T, F>(
    hv: &Arc<dyn Hypervisor>,
    doubt: &Arc<InDoubt>,
    deadline: Duration,
    f: F,
) -> Result<T, HotplugError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Hypervisor) -> Result<T, HvError> + Send + 'static,
{
    let ticket = Arc::new(Ticket {
        state: Mutex::new(State::Queued),
    });
    let scoped = Scoped {
        inner: hv.clone(),
        ticket: ticket.clone(),
        doubt: doubt.clone(),
    };
    if hv.in_process() {
        // Nothing to wait for: an in-process driver's call is CPU work
        // (tens of µs on the test driver) that cannot hang on a daemon, so
        // it runs here. A trip through the blocking pool, two thread
        // wake-ups, cost more than the call itself (measured 50-60 µs per
        // trip on the test driver), and a deadline could never fire.
        scoped.ticket.start();
        let r = f(&scoped);
        scoped.ticket.finish(scoped.inner.as_ref(), &scoped.doubt);
        return r.map_err(HotplugError::from);
    }
    let job = tokio::task::spawn_blocking(move || {
        if !scoped.ticket.start() {
            return Err(HvError::new(
                HvErrorKind::Unavailable,
                "libvirt",
                "call abandoned before it started",
            ));
        }
        let r = f(&scoped);
        scoped.ticket.finish(scoped.inner.as_ref(), &scoped.doubt);
        r
    });
    let mut waiter = Waiter {
        ticket,
        doubt: doubt.clone(),
        armed: true,
    };
    match tokio::time::timeout(deadline, job).await {
        Ok(joined) => {
            waiter.armed = false;
            joined
                .map_err(|e| HotplugError::Internal(format!("blocking task failed: {e}")))?
                .map_err(HotplugError::from)
        }
        Err(_) => {
            waiter.armed = false;
            let vm = waiter.ticket.abandon(doubt);
            let secs = deadline.as_secs_f64();
            Err(HotplugError::Hypervisor(HvError::new(
                HvErrorKind::Unavailable,
                "libvirt",
                match vm {
                    Some((_, name)) => format!(
                        "libvirt did not answer within {secs} s; vm {name} is in doubt until the call returns"
                    ),
                    None => format!("libvirt did not answer within {secs} s"),
                },
            )))
        }
    }
}

/// The hypervisor as one call sees it: it notes which VM the call is about
/// and refuses calls on a VM in doubt.
struct Scoped {
    inner: Arc<dyn Hypervisor>,
    ticket: Arc<Ticket>,
    doubt: Arc<InDoubt>,
}

impl Hypervisor for Scoped {
    fn driver(&self) -> String {
        self.inner.driver()
    }
    fn is_alive(&self) -> bool {
        self.inner.is_alive()
    }
    fn probe(&self) -> Result<(), HvError> {
        self.inner.probe()
    }
    fn events(&self) -> Option<EventHub> {
        self.inner.events()
    }
    fn in_process(&self) -> bool {
        self.inner.in_process()
    }
    fn edits_config(&self) -> bool {
        self.inner.edits_config()
    }
    fn lookup(&self, vm: &str) -> Result<crate::hypervisor::DomainRef, HvError> {
        self.inner.lookup(vm)
    }
    fn resolve(&self, vm: &str) -> Result<crate::hypervisor::DomainRef, HvError> {
        self.inner.resolve(vm)
    }
    fn resolve_cached(&self, vm: &str) -> Option<crate::hypervisor::DomainRef> {
        self.inner.resolve_cached(vm)
    }
    fn warm_up(&self) {
        self.inner.warm_up()
    }
    fn list(&self) -> Result<Vec<DomainRef>, HvError> {
        self.inner.list()
    }
    fn xml(&self, dom: &DomainRef, target: Target) -> Result<String, HvError> {
        self.ticket.enter(&self.doubt, dom)?;
        self.inner.xml(dom, target)
    }
    fn attach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        self.ticket.enter(&self.doubt, dom)?;
        self.inner.attach(dom, xml, target)
    }
    fn detach(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        self.ticket.enter(&self.doubt, dom)?;
        self.inner.detach(dom, xml, target)
    }
    fn update(&self, dom: &DomainRef, xml: &str, target: Target) -> Result<(), HvError> {
        self.ticket.enter(&self.doubt, dom)?;
        self.inner.update(dom, xml, target)
    }
    fn qemu_nics(&self, dom: &DomainRef) -> Result<Vec<QemuNic>, HvError> {
        self.ticket.enter(&self.doubt, dom)?;
        self.inner.qemu_nics(dom)
    }
    fn qemu_device_del(&self, dom: &DomainRef, id: &str) -> Result<(), HvError> {
        self.ticket.enter(&self.doubt, dom)?;
        self.inner.qemu_device_del(dom, id)
    }
    fn qemu_netdev_del(&self, dom: &DomainRef, id: &str) -> Result<(), HvError> {
        self.ticket.enter(&self.doubt, dom)?;
        self.inner.qemu_netdev_del(dom, id)
    }
    // Host-wide calls: no VM to be in doubt about.
    fn nwfilters(&self) -> Result<Vec<String>, HvError> {
        self.inner.nwfilters()
    }
    fn define_nwfilter(&self, xml: &str) -> Result<(), HvError> {
        self.inner.define_nwfilter(xml)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::fake::FakeHypervisor;
    use std::sync::atomic::Ordering;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_an_in_process_driver_runs_calls_on_the_callers_thread() {
        let fake = Arc::new(FakeHypervisor::default());
        let hv: Arc<dyn Hypervisor> = fake.clone();
        let doubt = Arc::new(InDoubt::default());
        let here = std::thread::current().id();
        let thread_of_call = || {
            run(&hv, &doubt, Duration::from_secs(5), |_| {
                Ok(std::thread::current().id())
            })
        };
        assert_ne!(thread_of_call().await.expect("call"), here, "blocking pool");
        fake.in_process.store(true, Ordering::SeqCst);
        assert_eq!(thread_of_call().await.expect("call"), here, "inline");
    }
}
