//! Process-wide counters of libvirt API calls (by C function name) and of
//! the events received, for the metrics endpoint and the bench.
//!
//! Counted where the call is made (`libvirt.rs`, `events.rs`), so that
//! "calls per attach" measures what libvirtd really sees: every
//! `virConnect*` and `virDomain*` call, lookups included. A mutex over a
//! small map costs far less than the RPC behind each call.

use std::collections::BTreeMap;
use std::sync::Mutex;

static CALLS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());
static EVENTS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

fn bump(m: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    *g.entry(key).or_default() += 1;
}

/// Counts one libvirt API call.
pub fn count(api: &'static str) {
    bump(&CALLS, api);
}

/// Counts one event published to Rust.
pub fn count_event(kind: &'static str) {
    bump(&EVENTS, kind);
}

/// Every libvirt API called so far, with its count.
pub fn calls() -> Vec<(&'static str, u64)> {
    let g = CALLS.lock().unwrap_or_else(|p| p.into_inner());
    g.iter().map(|(k, v)| (*k, *v)).collect()
}

/// Every kind of event received so far, with its count.
pub fn events() -> Vec<(&'static str, u64)> {
    let g = EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    g.iter().map(|(k, v)| (*k, *v)).collect()
}
