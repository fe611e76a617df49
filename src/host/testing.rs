//! Fakes of [`HostNet`] for unit tests elsewhere in the crate (hot-plug,
//! lifecycle), so that each test module does not grow its own.

use std::sync::Mutex;

use async_trait::async_trait;

use crate::host::{HostError, HostNet, HostPlan, PromiscState};
use crate::nic::{BridgeName, Segment, SwitchType};

/// A host that only records which bridges the clean-up looked at. Its
/// bridges are agent-made and have no port, so the clean-up reaches them.
pub(crate) struct RecordingHost {
    cleaned: Mutex<Vec<String>>,
    objects: crate::host::objects::HostObjects,
    _dir: tempfile::TempDir,
}

impl Default for RecordingHost {
    fn default() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        RecordingHost {
            cleaned: Mutex::default(),
            objects: crate::host::objects::HostObjects::new(
                dir.path().join("run"),
                dir.path().join("lib"),
            ),
            _dir: dir,
        }
    }
}

fn unused() -> HostError {
    HostError::Unsupported("not used by these tests".into())
}

#[async_trait]
impl HostNet for RecordingHost {
    async fn resolve(
        &self,
        _: &BridgeName,
        _: SwitchType,
        _: &Segment,
    ) -> Result<HostPlan, HostError> {
        Err(unused())
    }
    async fn prepare(&self, _: &HostPlan) -> Result<Vec<crate::host::HostUndo>, HostError> {
        Err(unused())
    }
    async fn undo(&self, _: crate::host::HostUndo) -> Result<(), HostError> {
        Err(unused())
    }
    async fn promisc_state(&self, _: &BridgeName) -> Result<PromiscState, HostError> {
        Err(unused())
    }
    async fn promisc_enable(
        &self,
        _: &BridgeName,
    ) -> Result<Option<crate::host::HostUndo>, HostError> {
        Err(unused())
    }
    async fn promisc_restore(&self, _: &BridgeName, _: PromiscState) -> Result<(), HostError> {
        Err(unused())
    }
    async fn saved_promisc_state(&self, _: &BridgeName) -> Result<Option<PromiscState>, HostError> {
        Ok(None)
    }
    async fn ovs_mirror_add(
        &self,
        _: &BridgeName,
        _: &str,
    ) -> Result<crate::host::HostUndo, HostError> {
        Err(unused())
    }
    async fn ovs_mirror_remove(&self, _: &BridgeName, _: &str) -> Result<(), HostError> {
        Ok(())
    }
    fn objects(&self) -> &crate::host::objects::HostObjects {
        &self.objects
    }
    async fn agent_bridges(&self) -> Result<Vec<String>, HostError> {
        Ok(Vec::new())
    }
    async fn saved_promisc_bridges(&self) -> Result<Vec<String>, HostError> {
        Ok(Vec::new())
    }
    async fn bridge_ports(
        &self,
        _: &BridgeName,
    ) -> Result<Option<crate::host::BridgePorts>, HostError> {
        Ok(Some(crate::host::BridgePorts {
            ours: true,
            ..Default::default()
        }))
    }
    async fn remove_bridge_if_unused(
        &self,
        bridge: &BridgeName,
        _: &[String],
    ) -> Result<bool, HostError> {
        if let Ok(mut c) = self.cleaned.lock() {
            c.push(bridge.to_string());
        }
        Ok(true)
    }
}

impl RecordingHost {
    /// The bridges the clean-up removed, in order.
    pub(crate) fn cleaned(&self) -> Vec<String> {
        self.cleaned.lock().map(|c| c.clone()).unwrap_or_default()
    }
}
