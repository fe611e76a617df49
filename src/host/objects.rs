//! Shared host objects: their locks, the intents that keep them alive, and
//! the one definition of "in use".
//!
//! A bridge (with its VLAN/VXLAN device, its saved IDS state and its OVS
//! mirrors) is shared by every VM on its segment and outlives any request.
//! Each such object is named by its bridge and guarded here:
//!
//! - **Locks.** One lock per object: an in-process async mutex (tasks of
//!   this agent) plus an `flock` on `<run_dir>/objects/<name>.lock`, so the
//!   daemon and the libvirt hook (another process) exclude each other. A
//!   lock is held only for host-side work, never across a libvirt call:
//!   libvirt runs the hook while it holds the domain's job, so a lock held
//!   across a libvirt call could stall both sides until libvirt's job
//!   timeout.
//! - **Lock order.** The VM's lock ([`crate::hotplug::locks::VmLocks`])
//!   first, then host objects sorted by name ([`HostObjects::lock`] sorts).
//!   Nothing takes a VM lock while holding an object lock.
//! - **Intents.** Because the lock is dropped before the libvirt call, an
//!   attach records a persisted intent on the object before it prepares the
//!   host side, and drops it once the NIC is in the domain XML (or after its
//!   rollback). Every intent bumps the object's generation, so a deleter
//!   that looked at libvirt without the lock can tell that somebody came
//!   along meanwhile. The deleter notes the generation and the live
//!   intents before it reads libvirt ([`HostObjects::watch`]): an intent
//!   that was live then may belong to an attach whose NIC the read missed,
//!   and it may be dropped by the time the deleter holds the lock.
//! - **In use** ([`decide_removal`]): a port other than the segment device,
//!   a reference in any domain's live or persistent XML, a live intent, or an
//!   attach that came along while the deleter was not holding the lock. A
//!   bridge that changed (was made, or lost its last port) less than a grace
//!   period ago is kept too: cloudstack-agent runs `modifyvxlan.sh` a moment
//!   before `createXML` and may reuse our bridge in that gap. The background
//!   reconcile collects it later.
//! - **Segments.** Which label, switch and segment an agent-made bridge
//!   carries is remembered under the persistent dir (`segments/<bridge>.json`,
//!   not under `/run`, which a host reboot empties). The name alone cannot
//!   tell: `brvx-<vni>` does not say which underlay carries the VNI. The
//!   libvirt hook reads it to rebuild the bridge when a VM starts after a
//!   reboot or migrates in.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;

use super::HostError;

/// How long a lock is waited for before the request gives up.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// An intent whose owner cannot be checked (the hook's, which outlives the
/// hook process until the domain has started) is stale after this long.
const INTENT_TTL: Duration = Duration::from_secs(600);

/// An object's generation and live intents, noted by a deleter before it
/// reads libvirt without the lock ([`HostObjects::watch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    generation: u64,
    intents: usize,
}

/// Who holds an intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    /// The domain (UUID) the NIC belongs to.
    pub vm: String,
    /// What is being plugged (a MAC or an alias), for the operator.
    pub what: String,
    /// The owning process; 0 for the hook, whose intent lives until the
    /// domain has started (or [`INTENT_TTL`]).
    pub pid: u32,
    /// Creation time, milliseconds since the epoch.
    pub created_ms: u64,
}

/// What an agent-made bridge carries, so that it can be rebuilt from its
/// name alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    /// The bridge (`brvx-<vni>`, `br<pif>-<vlan>`).
    pub bridge: String,
    /// The traffic label's bridge (the VXLAN underlay, the VLAN's parent).
    pub label: String,
    /// The segment as a broadcast URI (`vxlan://5001`, `vlan://100`).
    pub segment: String,
}

/// A recorded intent; give it back with [`HostObjects::drop_intent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// The object it names.
    pub object: String,
    path: PathBuf,
}

/// Locks and intents for shared host objects. One per process.
#[derive(Debug)]
pub struct HostObjects {
    run_dir: PathBuf,
    persist_dir: PathBuf,
    mem: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Read tickets: see [`HostObjects::read_ticket`].
    reads: std::sync::atomic::AtomicU64,
    /// Per object, the ticket of the last state applied from a libvirt read.
    applied: Mutex<HashMap<String, u64>>,
}

/// Held locks of one or more objects, released on drop.
#[must_use = "the objects are unlocked when the guard is dropped"]
pub struct ObjectGuard {
    names: Vec<String>,
    // Field order matters: files unlock before the in-process mutexes.
    _files: Vec<Flock<File>>,
    _mem: Vec<OwnedMutexGuard<()>>,
}

impl ObjectGuard {
    /// The objects held, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

fn io(op: String) -> impl FnOnce(std::io::Error) -> HostError {
    move |source| HostError::Io { op, source }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Object names become file names: keep them to what link names allow
/// (the kernel forbids `/` and NUL; we also refuse `.`/`..` and empty).
fn check_name(name: &str) -> Result<(), HostError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(HostError::Internal(format!(
            "invalid host object name {name:?}"
        )));
    }
    Ok(())
}

impl HostObjects {
    /// Locks and intents under `run_dir` (the agent's state dir; the hook
    /// uses the same one), segment records under `persist_dir`.
    pub fn new(run_dir: impl Into<PathBuf>, persist_dir: impl Into<PathBuf>) -> Self {
        Self {
            run_dir: run_dir.into(),
            persist_dir: persist_dir.into(),
            mem: Mutex::new(HashMap::new()),
            reads: std::sync::atomic::AtomicU64::new(0),
            applied: Mutex::new(HashMap::new()),
        }
    }

    /// A ticket taken just before reading libvirt for state that is then
    /// applied to an object under its lock (an IDS bridge's sensor taps).
    /// Two such syncs can take the lock in the other order than they read:
    /// one that began reading before a sensor NIC reached the XML would
    /// then overwrite the fresh state of one that began after. Every
    /// change is followed by a sync that begins after it, so the state of
    /// the latest-begun read is the one to keep; see
    /// [`HostObjects::stale_read`].
    pub fn read_ticket(&self) -> u64 {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    /// Under `name`'s lock: whether state read with `ticket` is older than
    /// what was last applied to it, and must not be applied.
    pub fn stale_read(&self, name: &str, ticket: u64) -> bool {
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        applied.get(name).is_some_and(|&t| t > ticket)
    }

    /// Under `name`'s lock, after the state read with `ticket` was applied.
    pub fn applied_read(&self, name: &str, ticket: u64) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let t = applied.entry(name.to_string()).or_insert(0);
        *t = (*t).max(ticket);
    }

    /// The directory everything lives under.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    fn segments_dir(&self) -> PathBuf {
        self.persist_dir.join("segments")
    }

    /// Remembers what an agent-made bridge carries.
    pub async fn remember(&self, r: &SegmentRecord) -> Result<(), HostError> {
        check_name(&r.bridge)?;
        let dir = self.segments_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("create {}", dir.display())))?;
        let path = dir.join(format!("{}.json", r.bridge));
        if self.recall(&r.bridge).await.as_ref() == Some(r) {
            return Ok(());
        }
        super::promisc::write_json(&path, r).await
    }

    /// What `bridge` carries, if the agent ever made it.
    pub async fn recall(&self, bridge: &str) -> Option<SegmentRecord> {
        check_name(bridge).ok()?;
        let b = tokio::fs::read(self.segments_dir().join(format!("{bridge}.json")))
            .await
            .ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Every remembered bridge.
    pub async fn remembered(&self) -> Vec<SegmentRecord> {
        let mut out = Vec::new();
        let Ok(mut rd) = tokio::fs::read_dir(self.segments_dir()).await else {
            return out;
        };
        while let Ok(Some(e)) = rd.next_entry().await {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(b) = name.strip_suffix(".json") {
                if let Some(r) = self.recall(b).await {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| a.bridge.cmp(&b.bridge));
        out
    }

    fn objects_dir(&self) -> PathBuf {
        self.run_dir.join("objects")
    }

    fn intents_dir(&self, name: &str) -> PathBuf {
        self.run_dir.join("intents").join(name)
    }

    /// Locks `names` in the fixed order (sorted, duplicates once). Waits up
    /// to 10 s for a holder in another process (the hook) before failing.
    pub async fn lock(&self, names: &[&str]) -> Result<ObjectGuard, HostError> {
        let mut sorted: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        sorted.sort();
        sorted.dedup();
        for n in &sorted {
            check_name(n)?;
        }
        let dir = self.objects_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("create {}", dir.display())))?;
        let mut mem = Vec::with_capacity(sorted.len());
        let mut files = Vec::with_capacity(sorted.len());
        for n in &sorted {
            let m = {
                let mut map = self.mem.lock().unwrap_or_else(|p| p.into_inner());
                map.retain(|_, v| Arc::strong_count(v) > 1);
                map.entry(n.clone()).or_default().clone()
            };
            mem.push(m.lock_owned().await);
            files.push(self.flock(&dir.join(format!("{n}.lock")), n).await?);
        }
        Ok(ObjectGuard {
            names: sorted,
            _files: files,
            _mem: mem,
        })
    }

    async fn flock(&self, path: &Path, name: &str) -> Result<Flock<File>, HostError> {
        let start = std::time::Instant::now();
        loop {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(io(format!("open {}", path.display())))?;
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(l),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if start.elapsed() < LOCK_WAIT => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((_, e)) => {
                    return Err(HostError::Busy(format!(
                        "host object {name} is locked by another process (flock {}: {e}); retry",
                        path.display()
                    )))
                }
            }
        }
    }

    /// The object's generation: how many intents it has ever had.
    pub async fn generation(&self, name: &str) -> u64 {
        let p = self.objects_dir().join(format!("{name}.gen"));
        tokio::fs::read_to_string(&p)
            .await
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// What a deleter notes before it reads libvirt without `name`'s lock;
    /// [`HostObjects::came_along`] compares it under the lock.
    pub async fn watch(&self, name: &str) -> Watch {
        // The generation first, then the intents. An intent added after
        // this read moves the generation. One added before is seen here,
        // unless its attach already dropped it; an attach drops its intent
        // only once the NIC is in the domain XML, which the deleter reads
        // after this.
        let generation = self.generation(name).await;
        let intents = self.live_intents(name).await.len();
        Watch {
            generation,
            intents,
        }
    }

    /// Whether an attach may have come along since `w` was taken: an
    /// intent was live then (its NIC may have reached the domain XML only
    /// after the deleter's read, and the intent be gone now), or one was
    /// added since. Called under the object's lock.
    pub async fn came_along(&self, name: &str, w: &Watch) -> bool {
        w.intents > 0 || self.generation(name).await != w.generation
    }

    /// Records an intent on a locked object and bumps its generation.
    pub async fn add_intent(
        &self,
        guard: &ObjectGuard,
        name: &str,
        record: &IntentRecord,
    ) -> Result<Intent, HostError> {
        if !guard.names.iter().any(|n| n == name) {
            return Err(HostError::Internal(format!(
                "intent on {name} without holding its lock"
            )));
        }
        let gen = self.generation(name).await + 1;
        let gp = self.objects_dir().join(format!("{name}.gen"));
        tokio::fs::write(&gp, gen.to_string())
            .await
            .map_err(io(format!("write {}", gp.display())))?;
        self.touch(name).await?;
        let dir = self.intents_dir(name);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("create {}", dir.display())))?;
        let id = format!("{}-{}-{gen}", record.vm, record.pid);
        let path = dir.join(format!("{id}.json"));
        let body = serde_json::to_vec(record).map_err(|e| HostError::Internal(e.to_string()))?;
        tokio::fs::write(&path, body)
            .await
            .map_err(io(format!("write {}", path.display())))?;
        Ok(Intent {
            object: name.to_string(),
            path,
        })
    }

    /// Drops an intent. Missing is fine (a reconcile may have collected it).
    pub async fn drop_intent(&self, intent: &Intent) {
        if let Err(e) = tokio::fs::remove_file(&intent.path).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(object = %intent.object, error = %e, "could not drop intent");
            }
        }
    }

    /// Drops every intent that `vm` holds on `name` (the hook's, once the
    /// domain has started or is gone).
    pub async fn drop_intents_of(&self, name: &str, vm: &str) {
        for (path, r) in self.read_intents(name).await {
            if r.vm == vm {
                let _ = tokio::fs::remove_file(path).await;
            }
        }
    }

    async fn read_intents(&self, name: &str) -> Vec<(PathBuf, IntentRecord)> {
        let mut out = Vec::new();
        let Ok(mut rd) = tokio::fs::read_dir(self.intents_dir(name)).await else {
            return out;
        };
        while let Ok(Some(e)) = rd.next_entry().await {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            if let Ok(b) = tokio::fs::read(&p).await {
                if let Ok(r) = serde_json::from_slice::<IntentRecord>(&b) {
                    out.push((p, r));
                }
            }
        }
        out
    }

    /// Intents on `name` whose owner still lives; stale ones (owner process
    /// gone, or older than the TTL) are removed on the way.
    pub async fn live_intents(&self, name: &str) -> Vec<IntentRecord> {
        let now = now_ms();
        let mut live = Vec::new();
        for (path, r) in self.read_intents(name).await {
            if intent_is_stale(&r, now, pid_alive) {
                tracing::info!(object = name, vm = %r.vm, what = %r.what, "removing stale intent");
                let _ = tokio::fs::remove_file(path).await;
            } else {
                live.push(r);
            }
        }
        live
    }

    /// Records that `name` changed now (made, given an intent, emptied).
    pub async fn touch(&self, name: &str) -> Result<(), HostError> {
        let dir = self.objects_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("create {}", dir.display())))?;
        let p = dir.join(format!("{name}.changed"));
        tokio::fs::write(&p, now_ms().to_string())
            .await
            .map_err(io(format!("write {}", p.display())))
    }

    /// Forgets the change time (the object has ports again).
    pub async fn settled(&self, name: &str) {
        let _ = tokio::fs::remove_file(self.objects_dir().join(format!("{name}.changed"))).await;
    }

    /// How long ago `name` last changed; `None` when no change is recorded.
    pub async fn since_change(&self, name: &str) -> Option<Duration> {
        let p = self.objects_dir().join(format!("{name}.changed"));
        let ms: u64 = tokio::fs::read_to_string(&p)
            .await
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Duration::from_millis(now_ms().saturating_sub(ms)))
    }
}

fn pid_alive(pid: u32) -> bool {
    // Signal 0 checks existence only. EPERM means it exists.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

/// Whether an intent no longer protects anything: its owning process is
/// gone, or (for the hook's, pid 0) it is older than the TTL.
pub fn intent_is_stale(r: &IntentRecord, now_ms: u64, alive: impl Fn(u32) -> bool) -> bool {
    let age = Duration::from_millis(now_ms.saturating_sub(r.created_ms));
    if r.pid == 0 {
        return age > INTENT_TTL;
    }
    !alive(r.pid) || age > INTENT_TTL
}

/// What a deleter found about one agent-made bridge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Ports other than the bridge's own segment device.
    pub ports: Vec<String>,
    /// NICs in any domain's live or persistent XML whose source is it.
    pub xml_refs: usize,
    /// Live intents on it.
    pub intents: usize,
    /// An attach was in flight when libvirt was read, or came along
    /// between that read and the lock ([`HostObjects::came_along`]).
    pub came_along: bool,
    /// Time since it last changed; `None` when nothing is recorded.
    pub since_change: Option<Duration>,
}

/// The verdict on one bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Not in use and quiet for the grace period: delete it.
    Delete,
    /// Empty but changed recently (or never seen empty before): start or
    /// continue the grace period; a later reconcile decides.
    Wait,
    /// In use; the reason, for the log.
    Keep(String),
}

/// The one definition of "in use", shared by detach, rollback, the hook and
/// the reconcile.
pub fn decide_removal(u: &Usage, grace: Duration) -> Removal {
    if let Some(p) = u.ports.first() {
        return Removal::Keep(format!("port {p} is on it"));
    }
    if u.xml_refs > 0 {
        return Removal::Keep(format!("{} NIC(s) in domain XML use it", u.xml_refs));
    }
    if u.intents > 0 {
        return Removal::Keep(format!("{} attach(es) in flight", u.intents));
    }
    if u.came_along {
        return Removal::Keep("an attach came along meanwhile".into());
    }
    match u.since_change {
        Some(d) if d >= grace => Removal::Delete,
        None if grace.is_zero() => Removal::Delete,
        _ => Removal::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(pid: u32, created_ms: u64) -> IntentRecord {
        IntentRecord {
            vm: "u1".into(),
            what: "02:00:00:00:00:01".into(),
            pid,
            created_ms,
        }
    }

    #[test]
    fn in_use_by_any_one_reason_is_kept() {
        let g = Duration::ZERO;
        let quiet = Some(Duration::from_secs(3600));
        let base = Usage {
            since_change: quiet,
            ..Usage::default()
        };
        assert_eq!(decide_removal(&base, g), Removal::Delete);
        for u in [
            Usage {
                ports: vec!["vnet3".into()],
                ..base.clone()
            },
            Usage {
                xml_refs: 1,
                ..base.clone()
            },
            Usage {
                intents: 1,
                ..base.clone()
            },
            Usage {
                came_along: true,
                ..base.clone()
            },
        ] {
            assert!(
                matches!(decide_removal(&u, g), Removal::Keep(_)),
                "{u:?} must be kept"
            );
        }
    }

    #[test]
    fn a_recently_changed_bridge_waits_for_the_grace_period() {
        let g = Duration::from_secs(60);
        let u = |s| Usage {
            since_change: s,
            ..Usage::default()
        };
        assert_eq!(
            decide_removal(&u(Some(Duration::from_secs(5))), g),
            Removal::Wait
        );
        assert_eq!(decide_removal(&u(None), g), Removal::Wait);
        assert_eq!(
            decide_removal(&u(Some(Duration::from_secs(61))), g),
            Removal::Delete
        );
        // With no grace, an empty bridge goes at once.
        assert_eq!(decide_removal(&u(None), Duration::ZERO), Removal::Delete);
    }

    #[test]
    fn intents_of_dead_owners_and_old_hook_intents_are_stale() {
        let now = 10_000_000;
        assert!(!intent_is_stale(&rec(42, now - 1000), now, |_| true));
        assert!(intent_is_stale(&rec(42, now - 1000), now, |_| false));
        assert!(!intent_is_stale(&rec(0, now - 1000), now, |_| false));
        assert!(intent_is_stale(
            &rec(0, now - INTENT_TTL.as_millis() as u64 - 1),
            now,
            |_| true
        ));
    }

    #[tokio::test]
    async fn segment_records_survive_in_the_persistent_dir() {
        let d = tempfile::tempdir().unwrap();
        let o = HostObjects::new(d.path().join("run"), d.path().join("lib"));
        assert_eq!(o.recall("brvx-9").await, None);
        let r = SegmentRecord {
            bridge: "brvx-9".into(),
            label: "cloudbr1".into(),
            segment: "vxlan://9".into(),
        };
        o.remember(&r).await.unwrap();
        // A reboot empties /run, not the persistent dir.
        std::fs::remove_dir_all(d.path().join("run")).ok();
        let again = HostObjects::new(d.path().join("run"), d.path().join("lib"));
        assert_eq!(again.recall("brvx-9").await, Some(r.clone()));
        assert_eq!(again.remembered().await, vec![r]);
    }

    #[tokio::test]
    async fn intents_bump_the_generation_and_go_away() {
        let d = tempfile::tempdir().unwrap();
        let o = HostObjects::new(d.path(), d.path().join("persist"));
        assert_eq!(o.generation("brvx-7").await, 0);
        let g = o.lock(&["brvx-7"]).await.unwrap();
        let r = IntentRecord {
            pid: std::process::id(),
            created_ms: now_ms(),
            ..rec(0, 0)
        };
        let i = o.add_intent(&g, "brvx-7", &r).await.unwrap();
        assert!(
            o.add_intent(&g, "brvx-8", &r).await.is_err(),
            "needs the lock"
        );
        drop(g);
        assert_eq!(o.generation("brvx-7").await, 1);
        assert_eq!(o.live_intents("brvx-7").await.len(), 1);
        o.drop_intent(&i).await;
        assert!(o.live_intents("brvx-7").await.is_empty());
        assert_eq!(
            o.generation("brvx-7").await,
            1,
            "generation never goes back"
        );
    }

    #[tokio::test]
    async fn a_lock_excludes_another_holder_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let o = Arc::new(HostObjects::new(d.path(), d.path().join("persist")));
        // Unsorted input, a duplicate: one sorted set.
        let g = o.lock(&["b", "a", "b"]).await.unwrap();
        assert_eq!(g.names(), ["a", "b"]);
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.lock(&["b"]).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "b is held");
        drop(g);
        waiter.await.unwrap().unwrap();
        // Another process's flock (a second HostObjects on the same dir has
        // its own open file description) excludes too.
        let other = HostObjects::new(d.path(), d.path().join("persist"));
        let g = o.lock(&["a"]).await.unwrap();
        let t = tokio::time::timeout(Duration::from_millis(100), other.lock(&["a"])).await;
        assert!(t.is_err(), "the flock must hold the second holder off");
        drop(g);
        let _held = other.lock(&["a"]).await.unwrap();
        assert!(o.lock(&["../x"]).await.is_err());
    }
}
