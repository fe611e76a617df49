//! Open vSwitch through `ovs-vsctl`, always with an argument vector (never a
//! shell string), and a timeout so a dead ovsdb-server cannot hang a request.
//!
//! Names that reach OVS come partly from libvirt's XML (a tap's `<target
//! dev>`, a `<source bridge>`), which the agent did not write and does not
//! trust: each is checked by [`link_name`] first, and `--` ends ovs-vsctl's
//! global options before every command, so no name can be read as an option.

use std::path::Path;

use tokio::process::Command;

use super::HostError;

/// Output of one ovs-vsctl run.
pub(crate) struct OvsOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// A kernel interface name as it may be handed to Open vSwitch: 1-15
/// bytes of `A-Z a-z 0-9 _ . -`, not starting with `-` (it would read as
/// an option). Every tap and bridge name the agent or libvirt makes fits.
pub(crate) fn link_name<'a>(what: &'static str, name: &'a str) -> Result<&'a str, HostError> {
    let ok = (1..=15).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(HostError::UnsafeName {
            what,
            name: name.chars().take(64).collect(),
        })
    }
}

/// Run `ovs-vsctl --timeout=10 -- <args>`; `args` that start with their
/// own `--` (a chain of commands) get no second one.
pub(crate) async fn vsctl(bin: &Path, args: &[&str]) -> Result<OvsOutput, HostError> {
    vsctl_with(bin, &[], args).await
}

/// Like [`vsctl`], with global options (table formatting such as
/// `--bare`) before the `--`.
pub(crate) async fn vsctl_with(
    bin: &Path,
    global: &[&str],
    args: &[&str],
) -> Result<OvsOutput, HostError> {
    let sep: &[&str] = if args.first() == Some(&"--") {
        &[]
    } else {
        &["--"]
    };
    let out = Command::new(bin)
        .arg("--timeout=10")
        .args(global)
        .args(sep)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                HostError::Unsupported(format!(
                    "{} not found: Open vSwitch is not installed on this host",
                    bin.display()
                ))
            } else {
                HostError::Io {
                    op: format!("run {}", bin.display()),
                    source: e,
                }
            }
        })?;
    Ok(OvsOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Run and require exit 0.
pub(crate) async fn vsctl_ok(bin: &Path, args: &[&str]) -> Result<String, HostError> {
    vsctl_ok_with(bin, &[], args).await
}

/// [`vsctl_with`], requiring exit 0.
pub(crate) async fn vsctl_ok_with(
    bin: &Path,
    global: &[&str],
    args: &[&str],
) -> Result<String, HostError> {
    let out = vsctl_with(bin, global, args).await?;
    if out.code == Some(0) {
        Ok(out.stdout)
    } else {
        Err(failure(bin, &args.join(" "), &out).await)
    }
}

/// The error for a failed ovs-vsctl run. ovs-vsctl exits 1 both for a bad
/// request and for a database it cannot reach, so instead of reading its
/// message, ask ovsdb a question that always has an answer: if that fails
/// too, OVS is down (UNAVAILABLE, worth a retry), not the request wrong.
async fn failure(bin: &Path, args: &str, out: &OvsOutput) -> HostError {
    let detail = format!("exit {:?}: {}", out.code, out.stderr);
    // No exit code: killed by --timeout, ovsdb-server hangs.
    let down = out.code.is_none()
        || !matches!(
            vsctl(bin, &["get", "Open_vSwitch", ".", "_uuid"]).await,
            Ok(OvsOutput { code: Some(0), .. })
        );
    let args = args.to_string();
    if down {
        HostError::OvsUnavailable { args, detail }
    } else {
        HostError::Ovs { args, detail }
    }
}

/// Whether an OVS bridge exists (`br-exists`: 0 yes, 2 no).
pub(crate) async fn bridge_exists(bin: &Path, bridge: &str) -> Result<bool, HostError> {
    let bridge = link_name("bridge", bridge)?;
    let out = vsctl(bin, &["br-exists", bridge]).await?;
    match out.code {
        Some(0) => Ok(true),
        Some(2) => Ok(false),
        _ => Err(failure(bin, &format!("br-exists {bridge}"), &out).await),
    }
}

/// MTU of the bridge's internal interface, if ovsdb knows it.
pub(crate) async fn bridge_mtu(bin: &Path, bridge: &str) -> Option<u32> {
    let bridge = link_name("bridge", bridge).ok()?;
    let out = vsctl(bin, &["--if-exists", "get", "Interface", bridge, "mtu"])
        .await
        .ok()?;
    out.stdout.parse().ok()
}

/// Name of the IDS mirror for `port`: deterministic, so removal and
/// restart clean-up find it without state.
pub fn mirror_name(port: &str) -> String {
    format!("nic-agent-ids-{port}")
}

/// The Mirror columns that select what reaches a sensor on `tag`: every
/// port, but only the sensor's own VLAN. An untagged sensor (a trunk, or a
/// bridge without VLANs) keeps select-all on every VLAN: OVS has no
/// narrower segment to name, and such a sensor sees the whole bridge anyway.
pub(crate) fn mirror_select(tag: Option<u16>) -> Vec<String> {
    let mut v = vec!["select-all=true".to_string()];
    if let Some(t) = tag {
        v.push(format!("select-vlan={t}"));
    }
    v
}

/// The access tag of an OVS port, if it has one.
async fn port_tag(bin: &Path, port: &str) -> Result<Option<u16>, HostError> {
    let out = vsctl_ok(bin, &["--if-exists", "get", "Port", port, "tag"]).await?;
    Ok(out.trim().parse().ok())
}

/// Create a mirror on `bridge` with `port` as output, selecting the
/// port's VLAN only ([`mirror_select`]), never every VLAN on the bridge.
pub(crate) async fn mirror_add(bin: &Path, bridge: &str, port: &str) -> Result<String, HostError> {
    let bridge = link_name("bridge", bridge)?;
    let port = link_name("tap", port)?;
    let name = mirror_name(port);
    // Idempotent: an existing mirror of the same name is replaced, so a
    // retried attach does not stack mirrors.
    mirror_remove(bin, bridge, &name).await?;
    let name_arg = format!("name={name}");
    let select = mirror_select(port_tag(bin, port).await?);
    let mut args: Vec<&str> = vec![
        "--", "--id=@p", "get", "Port", port, "--", "--id=@m", "create", "Mirror", &name_arg,
    ];
    args.extend(select.iter().map(String::as_str));
    args.extend([
        "output-port=@p",
        "--",
        "add",
        "Bridge",
        bridge,
        "mirrors",
        "@m",
    ]);
    vsctl_ok(bin, &args).await?;
    Ok(name)
}

/// Remove mirror `name` from `bridge`; the unreferenced row is garbage
/// collected by ovsdb. A missing mirror is not an error.
pub(crate) async fn mirror_remove(bin: &Path, bridge: &str, name: &str) -> Result<(), HostError> {
    let bridge = link_name("bridge", bridge)?;
    let uuid = vsctl_ok_with(
        bin,
        &["--bare"],
        &["--columns=_uuid", "find", "Mirror", &format!("name={name}")],
    )
    .await?;
    for id in uuid.split_whitespace() {
        vsctl_ok(bin, &["remove", "Bridge", bridge, "mirrors", id]).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ovs_mirror_selects_only_the_sensors_vlan() {
        assert_eq!(
            mirror_select(Some(100)),
            vec!["select-all=true".to_string(), "select-vlan=100".to_string()]
        );
        assert_eq!(mirror_select(None), vec!["select-all=true".to_string()]);
    }

    #[test]
    fn names_from_libvirt_are_checked_before_ovs_sees_them() {
        for ok in ["vnet0", "br-ovs0", "breth1-100", "a.b_c", "macvtap12"] {
            assert!(link_name("tap", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-vnet0",
            "--if-exists",
            "vnet 0",
            "a;b",
            "0123456789abcdef",
            "tap\n",
        ] {
            let e = link_name("tap", bad).unwrap_err().to_string();
            assert!(e.starts_with("tap name"), "{bad:?}: {e}");
        }
    }
}
