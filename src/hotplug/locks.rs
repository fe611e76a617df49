//! Per-domain serialisation: one async mutex per domain UUID, so work on one
//! VM is strictly ordered while different VMs proceed in parallel.
//!
//! Each VM's queue is bounded. Requests for one VM wait for each other, and
//! a VM whose guest is slow to release a NIC (a detach waits up to
//! `detach_timeout`) would otherwise collect waiters without limit, each
//! holding a connection slot and memory, until other VMs' callers starve.
//! Past the bound the answer is RESOURCE_EXHAUSTED at once, so the caller
//! backs off instead of piling on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use super::HotplugError;
use crate::hypervisor::DomainRef;

/// Requests that may wait behind the running one for a single VM, unless
/// configured otherwise.
pub const DEFAULT_QUEUE_LIMIT: usize = 16;

/// A map of per-domain locks keyed by UUID.
pub struct VmLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Waiters allowed per VM, besides the holder.
    limit: usize,
}

impl Default for VmLocks {
    fn default() -> Self {
        VmLocks::new(DEFAULT_QUEUE_LIMIT)
    }
}

impl VmLocks {
    /// Locks that let at most `limit` requests wait per VM.
    pub fn new(limit: usize) -> Self {
        VmLocks {
            map: Mutex::default(),
            limit,
        }
    }

    /// Waits for, and holds, the lock of one domain; refuses at once when
    /// `limit` requests already wait for it.
    pub async fn lock(&self, dom: &DomainRef) -> Result<OwnedMutexGuard<()>, HotplugError> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            // Drop entries nobody holds or waits for, so the map stays as
            // small as the set of busy domains.
            map.retain(|_, v| Arc::strong_count(v) > 1);
            let m = map.entry(dom.uuid.clone()).or_default();
            // Every holder and waiter keeps one clone; the map keeps one.
            // Clones are only made here, under the map's lock, so the count
            // cannot grow behind our back.
            let in_flight = Arc::strong_count(m) - 1;
            if in_flight > self.limit {
                return Err(HotplugError::VmBusy {
                    vm: dom.name.clone(),
                    queued: in_flight - 1,
                    limit: self.limit,
                });
            }
            m.clone()
        };
        Ok(m.lock_owned().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::RunState;
    use std::time::Duration;

    fn dom(uuid: &str) -> DomainRef {
        DomainRef {
            name: format!("vm-{uuid}"),
            uuid: uuid.into(),
            state: RunState::Running,
            persistent: true,
        }
    }

    #[tokio::test]
    async fn same_vm_is_serialised_other_vm_is_not() {
        let locks = Arc::new(VmLocks::default());
        let g = locks.lock(&dom("a")).await.unwrap();
        // Another domain's lock is free while "a" is held.
        let other = tokio::time::timeout(Duration::from_millis(200), locks.lock(&dom("b"))).await;
        assert!(other.is_ok(), "lock of another VM must not wait");
        // The same domain's lock waits until the guard is dropped.
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(&dom("a")).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "second lock of the same VM must wait"
        );
        drop(g);
        let got = tokio::time::timeout(Duration::from_secs(2), waiter).await;
        assert!(got.is_ok(), "lock must be granted once released");
    }

    #[tokio::test]
    async fn a_full_queue_is_resource_exhausted_and_other_vms_still_run() {
        let locks = Arc::new(VmLocks::new(2));
        let held = locks.lock(&dom("slow")).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let l = locks.clone();
            waiters.push(tokio::spawn(
                async move { l.lock(&dom("slow")).await.map(drop) },
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = locks.lock(&dom("slow")).await.map(drop).unwrap_err();
        assert!(
            matches!(
                e,
                HotplugError::VmBusy {
                    queued: 2,
                    limit: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(crate::api::status::code(&e), tonic::Code::ResourceExhausted);
        assert!(
            e.to_string().contains("vm-slow has 2 requests queued"),
            "{e}"
        );
        // A different VM is not affected by the slow one's queue.
        let fast = tokio::time::timeout(Duration::from_millis(200), locks.lock(&dom("fast")))
            .await
            .expect("another VM does not wait");
        assert!(fast.is_ok());
        drop(held);
        for w in waiters {
            assert!(w.await.unwrap().is_ok(), "queued requests still run");
        }
        // Once drained, the VM takes requests again.
        assert!(locks.lock(&dom("slow")).await.is_ok());
    }
}
