//! Promiscuous (IDS) mode of a Linux bridge, and where its original state is kept.
//!
//! Decision: IFF_PROMISC on the bridge, and the copies for the sensors come
//! from `tc` mirred filters ([`super::tcmirror`]). The bridge's
//! `ageing_time` is left alone. An earlier version also set `ageing_time 0`,
//! which made the bridge a hub: every tenant's VM on it received every
//! frame. Restoring therefore also puts back the saved ageing time of a
//! bridge that version left at 0.
//!
//! The original flag and ageing time are saved to `<state_dir>/promisc-<bridge>.json`
//! before the change, so a restarted agent can still restore them. The
//! file's shape is unchanged from the earlier version, so its files restore.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::HostError;

/// A bridge's promiscuous flag and FDB ageing time (centiseconds, as netlink
/// reports `IFLA_BR_AGEING_TIME`; 30000 = 300 s is the kernel default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromiscState {
    /// IFF_PROMISC set by user space.
    pub promisc: bool,
    /// FDB ageing time in centiseconds.
    pub ageing_time: u32,
}

impl PromiscState {
    /// True when the bridge floods every frame to every port (ageing 0):
    /// the old IDS state, a hub for every tenant on the bridge.
    pub fn is_flooding(&self) -> bool {
        self.ageing_time == 0
    }
}

fn state_file(dir: &Path, bridge: &str) -> PathBuf {
    dir.join(format!("promisc-{bridge}.json"))
}

fn io(op: String) -> impl FnOnce(std::io::Error) -> HostError {
    move |source| HostError::Io { op, source }
}

/// Save `state` as the original of `bridge` unless one is saved already (the
/// first save is the true original; a second enable must not overwrite it
/// with the already-flooding state).
pub(crate) async fn save_original(
    dir: &Path,
    bridge: &str,
    state: PromiscState,
) -> Result<PromiscState, HostError> {
    if let Some(prev) = load(dir, bridge).await? {
        return Ok(prev);
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io(format!("create state dir {}", dir.display())))?;
    write_json(&state_file(dir, bridge), &state).await?;
    Ok(state)
}

/// Writes `value` as JSON to `path` through a temporary file and a rename,
/// so a reader (another agent run, the libvirt hook) never sees half a
/// file. Every state file under the agent's dirs is written this way.
///
/// The temporary name is the writer's own (process id and a counter): with
/// one shared name, two writers of the same file (the agent and the hook,
/// two agents sharing a persist dir) rename each other's temporary away and
/// the second rename fails with ENOENT. With its own name each rename is
/// atomic, and the last one wins.
pub(crate) async fn write_json<T: Serialize + ?Sized>(
    path: &Path,
    value: &T,
) -> Result<(), HostError> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("json.{}.{n}.tmp", std::process::id()));
    let body = serde_json::to_vec(value).map_err(|e| HostError::Internal(e.to_string()))?;
    if let Err(e) = tokio::fs::write(&tmp, body).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(io(format!("write {}", tmp.display()))(e));
    }
    if let Err(e) = tokio::fs::rename(&tmp, path).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(io(format!("rename {}", path.display()))(e));
    }
    Ok(())
}

/// The saved original of `bridge`, if any. A corrupt file is an error, not
/// silently ignored: restoring the wrong state would be worse.
pub(crate) async fn load(dir: &Path, bridge: &str) -> Result<Option<PromiscState>, HostError> {
    let path = state_file(dir, bridge);
    match tokio::fs::read(&path).await {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            HostError::Internal(format!("corrupt state file {}: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HostError::Io {
            op: format!("read {}", path.display()),
            source: e,
        }),
    }
}

/// Forget the saved original of `bridge`.
pub(crate) async fn forget(dir: &Path, bridge: &str) -> Result<(), HostError> {
    let path = state_file(dir, bridge);
    match tokio::fs::remove_file(&path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HostError::Io {
            op: format!("remove {}", path.display()),
            source: e,
        }),
    }
}

/// Bridges with a saved original, i.e. put into IDS state by this agent
/// (or an earlier run of it) and not restored yet.
pub(crate) async fn saved_bridges(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return out;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let n = e.file_name().to_string_lossy().to_string();
        if let Some(b) = n
            .strip_prefix("promisc-")
            .and_then(|r| r.strip_suffix(".json"))
        {
            out.push(b.to_string());
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two writers of one state file (the agent and the hook, or two
    /// agents sharing a persist dir) must both succeed, and the file must
    /// always be whole. With one shared temporary name, one writer's rename
    /// took the other's temporary away: ENOENT, seen in the interop test
    /// when two agents shared /var/lib/nic-agent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_of_one_file_all_succeed_and_leave_it_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("brvx-1001.json");
        let mut tasks = Vec::new();
        for w in 0..4u32 {
            let path = path.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u32 {
                    write_json(&path, &vec![w; (i % 7 + 1) as usize])
                        .await
                        .map_err(|e| format!("writer {w}, write {i}: {e}"))?;
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("every write succeeds");
        }
        let body = std::fs::read(&path).expect("the file is there");
        let v: Vec<u32> = serde_json::from_slice(&body).expect("whole JSON");
        assert!(!v.is_empty() && v.iter().all(|x| *x == v[0]), "{v:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("brvx-1001.json")]);
    }

    #[tokio::test]
    async fn first_saved_original_wins_and_forget_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let orig = PromiscState {
            promisc: false,
            ageing_time: 30000,
        };
        let flooding = PromiscState {
            promisc: true,
            ageing_time: 0,
        };
        assert_eq!(load(dir.path(), "br0").await.expect("load"), None);
        save_original(dir.path(), "br0", orig).await.expect("save");
        let kept = save_original(dir.path(), "br0", flooding)
            .await
            .expect("save again");
        assert_eq!(kept, orig);
        assert_eq!(load(dir.path(), "br0").await.expect("load"), Some(orig));
        forget(dir.path(), "br0").await.expect("forget");
        assert_eq!(load(dir.path(), "br0").await.expect("load"), None);
        forget(dir.path(), "br0")
            .await
            .expect("forget twice is fine");
    }

    #[tokio::test]
    async fn corrupt_state_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("promisc-br0.json"), b"{nope").expect("write");
        assert!(load(dir.path(), "br0").await.is_err());
    }
}
