//! IDS copies on a Linux bridge: `tc` mirred filters that copy every frame
//! entering the bridge to each sensor tap, and nothing to anyone else.
//!
//! Decision: on every bridge port except a sensor's own, one match-all
//! `u32` filter per sensor with `action mirred egress mirror dev <sensor>`,
//! on the port's ingress hook. A bridge at `ageing_time 0` would do it with
//! one setting, but it turns the bridge into a hub: every tenant's VM on it
//! receives every frame (issue 13). The filters copy to the sensors only.
//!
//! Decision: the `tc` binary with argument vectors (as `ovs.rs` runs
//! ovs-vsctl), not rtnetlink's traffic-control API. rtnetlink 0.23 can add
//! a u32 filter with a mirred *redirect*, but has no *mirror* builder, and
//! finding missing filters means decoding action attributes on read-back;
//! hand-encoding TCA_ACT_MIRRED is more code to get wrong than one `tc`
//! line, the same line the lab proved and an operator types. `tc -j`
//! gives JSON to read back.
//!
//! The ingress qdisc is shared, never owned: libvirt puts its own `ingress`
//! qdisc on a tap for outbound `<bandwidth>`, `clsact` cannot be added where
//! one exists ("Exclusivity flag on"), and libvirt deletes it (with our
//! filters) when it clears a bandwidth. So: use an existing `ingress` or
//! `clsact`, else create `ingress`; never delete a qdisc; put missing
//! filters back on every sync. The agent's filters live at priorities
//! [`PRIO_BASE`]`..PRIO_BASE+`[`MAX_SENSORS`] (one priority per sensor, by
//! its place in the sorted sensor list), a range nobody else uses by
//! default (tc picks 49152 downwards for filters added without a priority,
//! so the agent counts upwards from it): filters there are the agent's, to
//! add and delete; everything else is left alone.
//!
//! The sensor list of each bridge is kept in `<state_dir>/ids/<bridge>.json`
//! (tap name and ifindex, see [`SavedSensor`]), so the link-event follower
//! can re-sync a bridge without asking libvirt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::ovs::link_name;
use super::HostError;

/// First tc priority of the agent's mirror filters.
pub const PRIO_BASE: u16 = 49152;
/// Most sensors on one bridge (one priority each).
pub const MAX_SENSORS: usize = 16;

/// The tc binary.
const TC: &str = "tc";

/// Agent filters found on one port's ingress hook: priority → the device
/// its mirred action copies to (`None` when it has none we can read).
pub type PortMirrors = BTreeMap<u16, Option<String>>;

/// The filters a port should carry: priority → sensor, for every sensor
/// except the port itself. `sensors` must be sorted and deduplicated.
pub fn desired(port: &str, sensors: &[String]) -> PortMirrors {
    sensors
        .iter()
        .take(MAX_SENSORS)
        .enumerate()
        .filter(|(_, s)| s.as_str() != port)
        .map(|(i, s)| (PRIO_BASE + i as u16, Some(s.clone())))
        .collect()
}

fn is_agent_prio(p: u16) -> bool {
    (PRIO_BASE..PRIO_BASE + MAX_SENSORS as u16).contains(&p)
}

/// Reads `tc -j filter show dev X ingress`: the agent-range priorities and
/// where their mirred actions point.
pub fn parse_filters(json: &str) -> PortMirrors {
    let mut out = PortMirrors::new();
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(json)
    else {
        return out;
    };
    for f in items {
        let Some(pref) = f.get("pref").and_then(|p| p.as_u64()) else {
            continue;
        };
        let Ok(pref) = u16::try_from(pref) else {
            continue;
        };
        if !is_agent_prio(pref) {
            continue;
        }
        let to = f
            .pointer("/options/actions")
            .and_then(|a| a.as_array())
            .and_then(|acts| {
                acts.iter().find_map(|a| {
                    (a.get("kind").and_then(|k| k.as_str()) == Some("mirred"))
                        .then(|| a.get("to_dev").and_then(|d| d.as_str()))
                        .flatten()
                })
            })
            .map(str::to_string);
        let e = out.entry(pref).or_insert(None);
        if to.is_some() {
            *e = to;
        }
    }
    out
}

/// True when `tc -j qdisc show dev X` lists an `ingress` or `clsact` qdisc.
pub fn has_ingress_qdisc(json: &str) -> bool {
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(json)
    else {
        return false;
    };
    items.iter().any(|q| {
        matches!(
            q.get("kind").and_then(|k| k.as_str()),
            Some("ingress") | Some("clsact")
        )
    })
}

struct TcOut {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn tc(args: &[&str]) -> Result<TcOut, HostError> {
    let out = Command::new(TC)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                HostError::Unsupported("tc not found: install iproute2 for IDS mirroring".into())
            } else {
                HostError::Io {
                    op: "run tc".into(),
                    source: e,
                }
            }
        })?;
    Ok(TcOut {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

async fn tc_ok(args: &[&str]) -> Result<String, HostError> {
    let o = tc(args).await?;
    if o.ok {
        Ok(o.stdout)
    } else {
        Err(HostError::Internal(format!(
            "tc {}: {}",
            args.join(" "),
            o.stderr
        )))
    }
}

/// The agent filters on `port`'s ingress hook (empty when it has no hook).
pub async fn port_mirrors(port: &str) -> Result<PortMirrors, HostError> {
    let port = link_name("bridge port", port)?;
    let o = tc(&["-j", "filter", "show", "dev", port, "ingress"]).await?;
    // No ingress qdisc: tc fails or prints nothing; either way no filters.
    Ok(if o.ok {
        parse_filters(&o.stdout)
    } else {
        PortMirrors::new()
    })
}

/// Makes sure `port` has an ingress hook: an existing `ingress` or
/// `clsact` qdisc is used as it is; otherwise `ingress` is created.
async fn ensure_ingress(port: &str) -> Result<(), HostError> {
    let q = tc_ok(&["-j", "qdisc", "show", "dev", port]).await?;
    if has_ingress_qdisc(&q) {
        return Ok(());
    }
    let o = tc(&["qdisc", "add", "dev", port, "ingress"]).await?;
    if o.ok {
        return Ok(());
    }
    // Raced with libvirt adding its own: fine if a hook is there now.
    let q = tc_ok(&["-j", "qdisc", "show", "dev", port]).await?;
    if has_ingress_qdisc(&q) {
        Ok(())
    } else {
        Err(HostError::Internal(format!(
            "tc qdisc add dev {port} ingress: {}",
            o.stderr
        )))
    }
}

/// Brings `port`'s agent filters to [`desired`]: deletes agent-range
/// filters that point elsewhere (a gone or moved sensor), adds missing ones.
/// Returns how many filters it added or removed.
pub async fn sync_port(port: &str, sensors: &[String]) -> Result<usize, HostError> {
    let port = link_name("bridge port", port)?;
    for s in sensors {
        link_name("IDS sensor tap", s)?;
    }
    let want = desired(port, sensors);
    let have = port_mirrors(port).await?;
    let mut n = 0;
    for (prio, to) in &have {
        if want.get(prio) != Some(to) {
            let p = prio.to_string();
            let o = tc(&["filter", "del", "dev", port, "ingress", "prio", &p]).await?;
            if !o.ok {
                tracing::warn!(port, prio, error = %o.stderr, "removing IDS mirror filter failed");
            }
            n += 1;
        }
    }
    let missing: Vec<_> = want
        .iter()
        .filter(|(p, to)| have.get(*p) != Some(*to))
        .collect();
    if !missing.is_empty() {
        ensure_ingress(port).await?;
    }
    for (prio, to) in missing {
        let Some(to) = to else { continue };
        let p = prio.to_string();
        tc_ok(&[
            "filter", "add", "dev", port, "ingress", "prio", &p, "protocol", "all", "u32", "match",
            "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", to,
        ])
        .await?;
        n += 1;
    }
    Ok(n)
}

fn sensors_file(dir: &Path, bridge: &str) -> PathBuf {
    dir.join("ids").join(format!("{bridge}.json"))
}

/// One saved sensor: its tap's name and ifindex. libvirt reuses tap names
/// (`vnet5` of a stopped sensor can come back as another tenant's NIC), so
/// a name alone must never make a tap a sensor: only the same ifindex does
/// (the kernel does not reuse it soon).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSensor {
    /// Tap name (`<target dev>`).
    pub tap: String,
    /// Its ifindex when the sensor was seen in libvirt's live XML.
    pub ifindex: u32,
}

/// The sensors saved for `bridge` (empty when none).
pub async fn load_sensors(dir: &Path, bridge: &str) -> Result<Vec<SavedSensor>, HostError> {
    let path = sensors_file(dir, bridge);
    match tokio::fs::read(&path).await {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            HostError::Internal(format!("corrupt state file {}: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(HostError::Io {
            op: format!("read {}", path.display()),
            source: e,
        }),
    }
}

/// Saves the sensors of `bridge`; an empty list removes the file.
pub async fn save_sensors(
    dir: &Path,
    bridge: &str,
    sensors: &[SavedSensor],
) -> Result<(), HostError> {
    let path = sensors_file(dir, bridge);
    let io = |op: String| move |source: std::io::Error| HostError::Io { op, source };
    if sensors.is_empty() {
        return match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HostError::Io {
                op: format!("remove {}", path.display()),
                source: e,
            }),
            _ => Ok(()),
        };
    }
    let parent = path.parent().unwrap_or(dir);
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(io(format!("create {}", parent.display())))?;
    super::promisc::write_json(&path, sensors).await
}

/// Bridges with a saved sensor list.
pub async fn tracked_bridges(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(mut rd) = tokio::fs::read_dir(dir.join("ids")).await else {
        return out;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let n = e.file_name().to_string_lossy().to_string();
        if let Some(b) = n.strip_suffix(".json") {
            out.push(b.to_string());
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = r#"[{"protocol":"all","pref":49152,"kind":"u32","chain":0},{"protocol":"all","pref":49152,"kind":"u32","chain":0,"options":{"fh":"800:","ht_divisor":1}},{"protocol":"all","pref":49152,"kind":"u32","chain":0,"options":{"fh":"800::800","order":2048,"key_ht":"800","bkt":"0","not_in_hw":true,"match":{"value":"0","mask":"0","offmask":"","off":0},"actions":[{"order":1,"kind":"mirred","mirred_action":"mirror","direction":"egress","to_dev":"vnet9","control_action":{"type":"pipe"},"index":1,"ref":1,"bind":1}]}},{"protocol":"ip","pref":1,"kind":"u32","chain":0}]"#;

    #[test]
    fn agent_filters_are_read_back_and_foreign_priorities_ignored() {
        let m = parse_filters(SHOW);
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(&49152), Some(&Some("vnet9".to_string())));
        assert!(parse_filters("").is_empty());
        assert!(parse_filters("not json").is_empty());
    }

    #[test]
    fn each_port_mirrors_to_every_sensor_but_itself() {
        let s = vec!["vnet1".to_string(), "vnet7".to_string()];
        let d = desired("vnet3", &s);
        assert_eq!(d.len(), 2);
        assert_eq!(d.get(&PRIO_BASE), Some(&Some("vnet1".into())));
        assert_eq!(d.get(&(PRIO_BASE + 1)), Some(&Some("vnet7".into())));
        let own = desired("vnet1", &s);
        assert_eq!(own.len(), 1);
        assert_eq!(own.get(&(PRIO_BASE + 1)), Some(&Some("vnet7".into())));
        assert!(desired("vnet3", &[]).is_empty());
    }

    #[test]
    fn ingress_or_clsact_is_a_usable_hook() {
        assert!(has_ingress_qdisc(
            r#"[{"kind":"noqueue","handle":"0:"},{"kind":"ingress","handle":"ffff:","parent":"ffff:fff1"}]"#
        ));
        assert!(has_ingress_qdisc(r#"[{"kind":"clsact","handle":"ffff:"}]"#));
        assert!(!has_ingress_qdisc(r#"[{"kind":"noqueue","handle":"0:"}]"#));
    }

    #[tokio::test]
    async fn sensor_lists_are_saved_per_bridge_and_empty_forgets() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_sensors(dir.path(), "br0")
            .await
            .expect("load")
            .is_empty());
        let s = vec![SavedSensor {
            tap: "vnet1".into(),
            ifindex: 12,
        }];
        save_sensors(dir.path(), "br0", &s).await.expect("save");
        assert_eq!(tracked_bridges(dir.path()).await, vec!["br0".to_string()]);
        assert_eq!(load_sensors(dir.path(), "br0").await.expect("load"), s);
        save_sensors(dir.path(), "br0", &[]).await.expect("forget");
        assert!(tracked_bridges(dir.path()).await.is_empty());
    }
}
