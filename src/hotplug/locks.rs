//! Per-domain serialisation: one async mutex per domain UUID, so work on one
//! VM is strictly ordered while different VMs proceed in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// A map of per-domain locks keyed by UUID.
#[derive(Default)]
pub struct VmLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl VmLocks {
    /// Waits for, and holds, the lock of one domain.
    pub async fn lock(&self, uuid: &str) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            // Drop entries nobody holds or waits for, so the map stays as
            // small as the set of busy domains.
            map.retain(|_, v| Arc::strong_count(v) > 1);
            map.entry(uuid.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_vm_is_serialised_other_vm_is_not() {
        let locks = Arc::new(VmLocks::default());
        let g = locks.lock("a").await;
        // Another domain's lock is free while "a" is held.
        let other = tokio::time::timeout(Duration::from_millis(200), locks.lock("b")).await;
        assert!(other.is_ok(), "lock of another VM must not wait");
        // The same domain's lock waits until the guard is dropped.
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock("a").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "second lock of the same VM must wait"
        );
        drop(g);
        let got = tokio::time::timeout(Duration::from_secs(2), waiter).await;
        assert!(got.is_ok(), "lock must be granted once released");
    }
}
