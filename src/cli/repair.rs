//! `nic-agent repair-vxlan`: run on the host itself (it changes kernel
//! links, not libvirt), with the same configuration file as `serve`, so
//! "as configured" means what the agent would make.

use std::path::PathBuf;

use clap::Args;

use crate::config::{FileConfig, Overrides, Settings};
use crate::host::{NetlinkHost, VxlanFamily, VxlanFlavour};
use crate::nic::Vni;

/// `repair-vxlan` options.
#[derive(Debug, Args)]
pub struct RepairVxlanArgs {
    /// Configuration file (the one `serve` uses). Without this flag
    /// /etc/nic-agent/config.toml is read if it exists.
    #[arg(long, env = "NIC_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Only this VNI (default: every VXLAN device the agent made).
    #[arg(long)]
    pub vni: Option<u32>,
    /// Override vxlan.flavour.
    #[arg(long, value_enum)]
    pub vxlan_flavour: Option<VxlanFlavour>,
    /// Override vxlan.port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub vxlan_port: Option<u16>,
    /// Override vxlan.family.
    #[arg(long, value_enum)]
    pub vxlan_family: Option<VxlanFamily>,
    /// Override vxlan.lock_file.
    #[arg(long)]
    pub vxlan_lock_file: Option<PathBuf>,
}

/// Runs the repair and returns the report to print.
pub async fn run(a: &RepairVxlanArgs) -> Result<String, String> {
    let vni = a
        .vni
        .map(|n| Vni::try_from(n).map_err(|e| format!("--vni: {e}")))
        .transpose()?;
    let overrides = Overrides {
        vxlan_flavour: a.vxlan_flavour,
        vxlan_port: a.vxlan_port,
        vxlan_family: a.vxlan_family,
        vxlan_lock_file: a.vxlan_lock_file.clone(),
        ..Overrides::default()
    };
    let file = FileConfig::load(a.config.as_deref())
        .map_err(|e| e.to_string())?
        .merge(&overrides);
    let s = Settings::try_from(file).map_err(|e| e.to_string())?;
    let host = NetlinkHost::new(s.host_config()).map_err(|e| e.to_string())?;
    let report = host.repair_vxlan(vni).await.map_err(|e| e.to_string())?;
    Ok(report.to_string())
}
