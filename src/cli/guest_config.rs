//! `nic-agent guest-config`: the flags mapped onto [`crate::guest`], which
//! owns the model and the renderer (offline, no server).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use super::GuestConfigArgs;
use crate::guest::{self, GuestRequest};

fn request(a: &GuestConfigArgs) -> GuestRequest {
    GuestRequest {
        mac: a.mac.clone(),
        name: a.name.clone(),
        ip: a.ip.clone(),
        gateway: a.gateway.clone(),
        table: a.table,
        ip6: a.ip6.clone(),
        gateway6: a.gateway6.clone(),
        ip6_mode: a.ip6_mode.clone(),
        default_route: a.default,
    }
}

/// `guest-config`: validates the flags and prints every file, or with
/// `--root` writes them there (how `tests/guest_formats.sh` feeds the
/// tools that consume them).
pub fn run(a: &GuestConfigArgs) -> Result<String, String> {
    let req = request(a);
    let Some(root) = &a.root else {
        return guest::run(&req).map_err(|e| e.to_string());
    };
    let files = guest::files(&req).map_err(|e| e.to_string())?;
    let mut out = String::new();
    for f in files {
        let p = root.join(f.path.trim_start_matches('/'));
        write(&p, f.mode, &f.content).map_err(|e| format!("{}: {e}", p.display()))?;
        out.push_str(&format!("{}\n", p.display()));
    }
    Ok(out)
}

fn write(p: &Path, mode: u32, content: &str) -> std::io::Result<()> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(p, content)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}
