//! Fakes of [`HostNet`] for unit tests elsewhere in the crate (hot-plug,
//! lifecycle), so that each test module does not grow its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::host::{BridgePorts, HostError, HostNet, HostPlan, HostUndo, PromiscState};
use crate::nic::{BridgeName, Segment, SwitchType};

/// A host that records what was done to its bridges. Out of the box its
/// bridges are agent-made and have no port, so the clean-up reaches them,
/// and nothing is in IDS state. Tests script more with the `with_*`
/// methods: agent-made bridges, ports, saved pre-IDS states, bridges the
/// old IDS mode left at ageing 0, saved sensor lists.
pub(crate) struct RecordingHost {
    cleaned: Mutex<Vec<String>>,
    state: Mutex<Scripted>,
    objects: crate::host::objects::HostObjects,
    _dir: tempfile::TempDir,
}

/// What the fake host holds, and the changes made to it in order.
#[derive(Default)]
struct Scripted {
    /// Bridges carrying the agent's alias ([`HostNet::agent_bridges`]).
    agent_bridges: BTreeSet<String>,
    /// Ports other than segment devices, per bridge.
    ports: BTreeMap<String, Vec<String>>,
    /// Bridges that exist but were not made by the agent.
    foreign: BTreeSet<String>,
    /// Pre-IDS states saved by an earlier promisc_enable.
    saved: BTreeMap<String, PromiscState>,
    /// Bridges promiscuous now.
    promisc: BTreeSet<String>,
    /// Bridges at ageing_time 0.
    ageing_zero: BTreeSet<String>,
    /// Saved sensor lists (tc mirror filters), per bridge.
    sensors: BTreeMap<String, Vec<String>>,
    /// Every change, as "what bridge[ detail]".
    changes: Vec<String>,
}

impl Default for RecordingHost {
    fn default() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        RecordingHost {
            cleaned: Mutex::default(),
            state: Mutex::default(),
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

impl RecordingHost {
    fn st(&self) -> std::sync::MutexGuard<'_, Scripted> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bridges the clean-up removed, in order.
    pub(crate) fn cleaned(&self) -> Vec<String> {
        self.cleaned.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Every change made to the host, in order: `restore BR`,
    /// `repair-ageing BR`, `promisc BR`, `mirror-sync BR tap,tap`,
    /// `remove BR`.
    pub(crate) fn changes(&self) -> Vec<String> {
        self.st().changes.clone()
    }

    /// A bridge made by the agent, with these ports (taps, uplinks).
    pub(crate) fn with_agent_bridge(self, bridge: &str, ports: &[&str]) -> Self {
        {
            let mut s = self.st();
            s.agent_bridges.insert(bridge.into());
            s.ports
                .insert(bridge.into(), ports.iter().map(|p| p.to_string()).collect());
        }
        self
    }

    /// A bridge someone else made (no agent alias).
    pub(crate) fn with_foreign_bridge(self, bridge: &str) -> Self {
        self.st().foreign.insert(bridge.into());
        self
    }

    /// A bridge in IDS state (promiscuous) whose original state is saved.
    /// `ageing_zero`: the old IDS mode also set its ageing to 0.
    pub(crate) fn with_ids_state(
        self,
        bridge: &str,
        original: PromiscState,
        ageing_zero: bool,
    ) -> Self {
        {
            let mut s = self.st();
            s.saved.insert(bridge.into(), original);
            s.promisc.insert(bridge.into());
            if ageing_zero {
                s.ageing_zero.insert(bridge.into());
            }
        }
        self
    }

    /// A saved sensor list (tc mirror filters in place for these taps).
    pub(crate) fn with_sensors(self, bridge: &str, taps: &[&str]) -> Self {
        self.st()
            .sensors
            .insert(bridge.into(), taps.iter().map(|t| t.to_string()).collect());
        self
    }

    /// Whether the bridge is promiscuous now.
    pub(crate) fn is_promisc(&self, bridge: &str) -> bool {
        self.st().promisc.contains(bridge)
    }

    /// Whether the bridge's ageing is 0 now.
    pub(crate) fn is_ageing_zero(&self, bridge: &str) -> bool {
        self.st().ageing_zero.contains(bridge)
    }
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
    async fn prepare(&self, _: &HostPlan) -> Result<Vec<HostUndo>, HostError> {
        Err(unused())
    }
    async fn undo(&self, _: HostUndo) -> Result<(), HostError> {
        Err(unused())
    }
    async fn promisc_state(&self, bridge: &BridgeName) -> Result<PromiscState, HostError> {
        let s = self.st();
        Ok(PromiscState {
            promisc: s.promisc.contains(bridge.as_str()),
            ageing_time: if s.ageing_zero.contains(bridge.as_str()) {
                0
            } else {
                30_000
            },
        })
    }
    async fn promisc_enable(&self, bridge: &BridgeName) -> Result<Option<HostUndo>, HostError> {
        let mut s = self.st();
        let b = bridge.to_string();
        if s.promisc.contains(&b) {
            return Ok(None);
        }
        let original = PromiscState {
            promisc: false,
            ageing_time: 30_000,
        };
        s.saved.entry(b.clone()).or_insert(original);
        s.promisc.insert(b.clone());
        s.changes.push(format!("promisc {b}"));
        Ok(Some(HostUndo::RestorePromisc {
            bridge: b,
            original,
        }))
    }
    async fn promisc_restore(
        &self,
        bridge: &BridgeName,
        original: PromiscState,
    ) -> Result<(), HostError> {
        let mut s = self.st();
        let b = bridge.to_string();
        s.saved.remove(&b);
        if !original.promisc {
            s.promisc.remove(&b);
        }
        if original.ageing_time != 0 {
            s.ageing_zero.remove(&b);
        }
        s.changes.push(format!("restore {b}"));
        Ok(())
    }
    async fn saved_promisc_state(
        &self,
        bridge: &BridgeName,
    ) -> Result<Option<PromiscState>, HostError> {
        Ok(self.st().saved.get(bridge.as_str()).copied())
    }
    async fn repair_ageing(&self, bridge: &BridgeName) -> Result<Option<u32>, HostError> {
        let mut s = self.st();
        let b = bridge.to_string();
        let Some(saved) = s.saved.get(&b).copied() else {
            return Ok(None);
        };
        if saved.ageing_time == 0 || !s.ageing_zero.remove(&b) {
            return Ok(None);
        }
        s.changes.push(format!("repair-ageing {b}"));
        Ok(Some(saved.ageing_time))
    }
    async fn ids_mirror_sync(
        &self,
        bridge: &BridgeName,
        sensors: Option<&[String]>,
    ) -> Result<usize, HostError> {
        let mut s = self.st();
        let b = bridge.to_string();
        let before = s.sensors.get(&b).cloned().unwrap_or_default();
        let mut after = sensors.map(<[String]>::to_vec).unwrap_or(before.clone());
        after.sort();
        after.dedup();
        // One filter per sensor here: the count of sensors that came or went.
        let changed = before.iter().filter(|t| !after.contains(t)).count()
            + after.iter().filter(|t| !before.contains(t)).count();
        if changed > 0 {
            s.changes
                .push(format!("mirror-sync {b} {}", after.join(",")));
        }
        if after.is_empty() {
            s.sensors.remove(&b);
        } else {
            s.sensors.insert(b, after);
        }
        Ok(changed)
    }
    async fn ids_sensors(&self, bridge: &BridgeName) -> Result<Vec<String>, HostError> {
        Ok(self
            .st()
            .sensors
            .get(bridge.as_str())
            .cloned()
            .unwrap_or_default())
    }
    async fn ids_tracked_bridges(&self) -> Result<Vec<String>, HostError> {
        Ok(self.st().sensors.keys().cloned().collect())
    }
    async fn ovs_mirror_add(&self, _: &BridgeName, _: &str) -> Result<HostUndo, HostError> {
        Err(unused())
    }
    async fn ovs_mirror_remove(&self, _: &BridgeName, _: &str) -> Result<(), HostError> {
        Ok(())
    }
    fn objects(&self) -> &crate::host::objects::HostObjects {
        &self.objects
    }
    async fn agent_bridges(&self) -> Result<Vec<String>, HostError> {
        Ok(self.st().agent_bridges.iter().cloned().collect())
    }
    async fn saved_promisc_bridges(&self) -> Result<Vec<String>, HostError> {
        Ok(self.st().saved.keys().cloned().collect())
    }
    async fn bridge_ports(&self, bridge: &BridgeName) -> Result<Option<BridgePorts>, HostError> {
        let s = self.st();
        let ours = !s.foreign.contains(bridge.as_str());
        Ok(Some(BridgePorts {
            ours,
            others: s.ports.get(bridge.as_str()).cloned().unwrap_or_default(),
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
        let mut s = self.st();
        s.agent_bridges.remove(bridge.as_str());
        s.changes.push(format!("remove {bridge}"));
        Ok(true)
    }
}
