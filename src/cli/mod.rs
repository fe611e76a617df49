//! The command line: `serve`, the offline tools `render` and `inspect`, and
//! the gRPC client subcommands, `config check`, and the packaging helpers
//! (`man`, `completions`). `main.rs` only parses and dispatches here.

pub mod client;
pub mod guest_config;
pub mod offline;
pub mod repair;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::config::{HostNetwork, LogFormat};

/// nic-agent: NIC hot-plug agent for KVM hosts.
#[derive(Debug, Parser)]
#[command(name = "nic-agent", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format [default: text, or log_format from the config file].
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC agent.
    Serve(ServeArgs),
    /// Print the <interface> XML the agent would attach.
    Render(NicArgs),
    /// Show a domain XML's NICs and PCI hot-plug capacity.
    Inspect(InspectArgs),
    /// List VMs on the agent's host.
    Vms(ClientArgs),
    /// List a VM's NICs.
    List(VmArgs),
    /// Attach a NIC to a VM.
    Attach(AttachArgs),
    /// Detach a NIC from a VM.
    Detach(DetachArgs),
    /// Show a VM's PCI hot-plug capacity.
    Capacity(VmArgs),
    /// Configuration file tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Write man pages (for packaging).
    #[command(hide = true)]
    Man(ManArgs),
    /// Print a shell completion script (for packaging).
    #[command(hide = true)]
    Completions(CompletionsArgs),
    /// Walk a NIC's path hop by hop and say which hop is broken.
    /// Exit 0: no FAULT (warnings allowed); 1: at least one FAULT;
    /// 2: no diagnosis (agent unreachable, unknown VM, bad MAC).
    Doctor(DoctorArgs),

    /// Change an attached NIC's link state or bandwidth in place.
    Update(UpdateArgs),
    /// Move a NIC from one VM to another (back on the first if the second refuses it).
    Move(MoveArgs),
    /// Move a NIC to another network (bridge, VLAN, VXLAN, OVS tag), keeping
    /// its MAC and PCI slot: in place when the switch type stays, else
    /// unplugged and plugged again at the same slot.
    Replug(ReplugArgs),
    /// Print the guest-side network files for a hot-plugged NIC (offline).
    GuestConfig(GuestConfigArgs),
    /// libvirt's qemu hook (run by libvirtd from
    /// /etc/libvirt/hooks/qemu.d/nic-agent, domain XML on stdin): builds
    /// the host side of agent-made bridges before a domain starts, restores
    /// or migrates in. Never calls libvirt; prints nothing on stdout.
    #[command(hide = true)]
    Hook(HookArgs),
    /// Re-create the VXLAN devices this agent made whose port, group or
    /// underlay differ from the configuration (runs on the host, as root;
    /// the VNI is interrupted briefly on this host).
    RepairVxlan(repair::RepairVxlanArgs),
}

/// `hook` options: where the daemon keeps its state (read from the same
/// config file), then the five arguments libvirt passes.
#[derive(Debug, Args)]
pub struct HookArgs {
    /// Configuration file [default: /etc/nic-agent/config.toml if present].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides the file's state_dir.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Overrides the file's persist_dir.
    #[arg(long)]
    pub persist_dir: Option<PathBuf>,
    /// Overrides the file's bridge_grace_s.
    #[arg(long)]
    pub bridge_grace_s: Option<u64>,
    /// `qemu <domain> <operation> <sub-op> <extra>`, as libvirt passes them.
    #[arg(num_args = 0.., allow_hyphen_values = true, trailing_var_arg = true)]
    pub args: Vec<String>,
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file: prints "ok" or the error, which
    /// names the offending key.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the directories `serve` writes with this configuration, one
    /// a line: DIR, the key, and `required` or `if-exists` (for packaging
    /// tests: the systemd unit must make each one writable).
    #[command(hide = true)]
    Dirs {
        /// The TOML file.
        file: PathBuf,
    },
}

/// `man` options.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory for the pages (nic-agent.1, nic-agent-serve.1, ...).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

/// `completions` options.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `serve` options. Every setting also has a config-file key; a flag given
/// here wins over the file, which wins over the built-in default.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file. Without this flag /etc/nic-agent/config.toml is
    /// read if it exists.
    #[arg(long, env = "NIC_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Settings that override the file.
    #[command(flatten)]
    pub overrides: crate::config::Overrides,
}

/// Writes man pages for the whole command tree into `dir`.
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}

/// The completion script for `shell`.
pub fn completion_script(shell: clap_complete::Shell) -> String {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "nic-agent", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// NIC flags shared by `render` and `attach`.
#[derive(Debug, Args, Clone, Default)]
pub struct NicArgs {
    /// MAC address (unicast).
    #[arg(long)]
    pub mac: String,
    /// Bridge (or traffic label with --vlan/--vni/--broadcast-uri).
    #[arg(long)]
    pub bridge: String,
    /// The bridge is an Open vSwitch bridge.
    #[arg(long)]
    pub ovs: bool,
    /// VLAN id 1-4094.
    #[arg(long)]
    pub vlan: Option<u32>,
    /// VXLAN VNI 1-16777215.
    #[arg(long)]
    pub vni: Option<u32>,
    /// CloudStack broadcast URI: vlan://N, vxlan://N, vlan://untagged.
    #[arg(long, default_value = "")]
    pub broadcast_uri: String,
    /// Guest MTU 68-65535.
    #[arg(long)]
    pub mtu: Option<u32>,
    /// virtio queue pairs 1-256.
    #[arg(long)]
    pub queues: Option<u32>,
    /// Host tap txqueuelen 1-100000 (packets); running VMs only.
    #[arg(long)]
    pub tx_queue_len: Option<u32>,
    /// vhost-net: auto, on or off.
    #[arg(long, default_value = "auto")]
    pub vhost: String,
    /// NIC model: virtio, e1000, e1000e, rtl8139.
    #[arg(long, default_value = "virtio")]
    pub model: String,
    /// Link state: up or down.
    #[arg(long, default_value = "up")]
    pub link: String,
    /// Inbound AVG[,PEAK[,BURST]] in KB/s and KB.
    #[arg(long)]
    pub inbound: Option<String>,
    /// Outbound AVG[,PEAK[,BURST]] in KB/s and KB.
    #[arg(long)]
    pub outbound: Option<String>,
    /// CloudStack network rate in Mbit/s (both directions, x125 KB/s).
    #[arg(long)]
    pub rate_mbps: Option<u32>,
    /// User alias, ua-...
    #[arg(long, default_value = "")]
    pub alias: String,
    /// IDS guest: flood all bridge traffic to this NIC.
    #[arg(long)]
    pub promiscuous: bool,
    /// Pin the PCI slot (1-31, i440fx bus 0).
    #[arg(long)]
    pub pci_slot: Option<u32>,
    /// ACPI index for a stable guest name.
    #[arg(long)]
    pub acpi_index: Option<u32>,
    /// OVS interface-id (UUID).
    #[arg(long, default_value = "")]
    pub interface_id: String,
    /// Bind the agent's anti-spoofing nwfilter to the NIC.
    #[arg(long)]
    pub anti_spoofing: bool,
    /// The NIC's IPv4/IPv6 address (repeatable); the only sources
    /// anti-spoofing lets the guest use.
    #[arg(long = "ip")]
    pub ips: Vec<String>,
    /// No option ROM, no PXE (`<rom enabled='no'/>`).
    #[arg(long)]
    pub pxe_disable: bool,
    /// CloudStack's NIC uuid (kept in the alias `ua-nic-<uuid>`).
    #[arg(long, default_value = "")]
    pub nic_uuid: String,
    /// CloudStack's deviceId (0-16382); kept as ACPI index device_id+1.
    #[arg(long)]
    pub device_id: Option<u32>,
    /// virtio packed virtqueues.
    #[arg(long)]
    pub packed: bool,
    /// The guest's default NIC (carried for guest-config).
    #[arg(long)]
    pub default_nic: bool,
}

/// `inspect` options.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A domain XML file (virsh dumpxml output).
    #[arg(long)]
    pub domain_xml: std::path::PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Options of every client subcommand.
#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// Agent address: unix:PATH, HOST:PORT or http://HOST:PORT (a TCP
    /// agent without TLS must run with --insecure).
    #[arg(long, default_value = crate::config::DEFAULT_SOCKET, env = "NIC_AGENT_SERVER")]
    pub server: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A client subcommand that names a VM.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Client options.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Domain name or UUID.
    #[arg(long)]
    pub vm: String,
}

/// `attach` options.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Client options and VM.
    #[command(flatten)]
    pub target: VmArgs,
    /// The NIC.
    #[command(flatten)]
    pub nic: NicArgs,
    /// Correlation id (default: generated by the agent).
    #[arg(long, default_value = "")]
    pub request_id: String,
}

/// `detach` options.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// Client options and VM.
    #[command(flatten)]
    pub target: VmArgs,
    /// MAC of the NIC.
    #[arg(long)]
    pub mac: String,
    /// User alias to pick among NICs sharing the MAC.
    #[arg(long, default_value = "")]
    pub alias: String,
    /// How long to wait for the guest (ms).
    #[arg(long, default_value_t = 0)]
    pub timeout_ms: u32,
    /// Correlation id.
    #[arg(long, default_value = "")]
    pub request_id: String,
    /// Keep the bridge and segment device even when unused (persistent
    /// networks), beside the static keep_bridges list.
    #[arg(long)]
    pub keep_bridge: bool,
}

impl NicArgs {
    /// Turns the flags into the unvalidated request model.
    pub fn to_raw(&self) -> Result<crate::nic::RawNic, crate::nic::NicError> {
        let bw = |field: &'static str,
                  v: &Option<String>|
         -> Result<Option<crate::nic::RawBandwidth>, crate::nic::NicError> {
            let Some(s) = v else { return Ok(None) };
            let parts: Vec<&str> = s.split(',').collect();
            let num = |i: usize| -> Result<u64, crate::nic::NicError> {
                match parts.get(i) {
                    None => Ok(0),
                    Some(p) => p
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| crate::nic::NicError::Invalid {
                            field,
                            value: s.clone(),
                            allowed: "AVG[,PEAK[,BURST]] as whole numbers (KB/s, KB/s, KB)".into(),
                        }),
                }
            };
            if parts.len() > 3 {
                return Err(crate::nic::NicError::Invalid {
                    field,
                    value: s.clone(),
                    allowed: "AVG[,PEAK[,BURST]]".into(),
                });
            }
            Ok(Some(crate::nic::RawBandwidth {
                average_kbps: num(0)?,
                peak_kbps: num(1)?,
                burst_kb: num(2)?,
                rate_mbps: 0,
            }))
        };
        let mut inbound = bw("inbound", &self.inbound)?;
        let mut outbound = bw("outbound", &self.outbound)?;
        if let Some(r) = self.rate_mbps {
            for b in [&mut inbound, &mut outbound] {
                b.get_or_insert_with(Default::default).rate_mbps = r;
            }
        }
        let link_down = match self.link.as_str() {
            "up" | "" => false,
            "down" => true,
            other => {
                return Err(crate::nic::NicError::Invalid {
                    field: "link",
                    value: other.into(),
                    allowed: "up or down".into(),
                })
            }
        };
        Ok(crate::nic::RawNic {
            mac: self.mac.clone(),
            bridge: self.bridge.clone(),
            ovs: self.ovs,
            vlan: self.vlan,
            vni: self.vni,
            broadcast_uri: self.broadcast_uri.clone(),
            mtu: self.mtu,
            queues: self.queues,
            tx_queue_len: self.tx_queue_len,
            model: self.model.clone(),
            link_down,
            promiscuous: self.promiscuous,
            alias: self.alias.clone(),
            inbound,
            outbound,
            pci_slot: self.pci_slot,
            acpi_index: self.acpi_index,
            vhost: self.vhost.clone(),
            interface_id: self.interface_id.clone(),
            anti_spoofing: self.anti_spoofing,
            ips: self.ips.clone(),
            pxe_disable: self.pxe_disable,
            nic_uuid: self.nic_uuid.clone(),
            device_id: self.device_id,
            packed: self.packed,
            default_nic: self.default_nic,
            ..crate::nic::RawNic::default()
        })
    }
}

/// `doctor` options.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Client options and VM.
    #[command(flatten)]
    pub target: VmArgs,
    /// MAC of the NIC.
    #[arg(long)]
    pub mac: String,
    /// The segment CloudStack intended (vlan://N, vxlan://N): adds an
    /// "intent" hop comparing it with what the host carries.
    #[arg(long, default_value = "")]
    pub broadcast_uri: String,
}

/// `update` options.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Client options and VM.
    #[command(flatten)]
    pub target: VmArgs,
    /// MAC of the NIC.
    #[arg(long)]
    pub mac: String,
    /// User alias to pick among NICs sharing the MAC.
    #[arg(long, default_value = "")]
    pub alias: String,
    /// New link state: up or down.
    #[arg(long)]
    pub link: Option<String>,
    /// New inbound AVG[,PEAK[,BURST]] in KB/s and KB; 0 removes the shaping.
    #[arg(long)]
    pub inbound: Option<String>,
    /// New outbound AVG[,PEAK[,BURST]] in KB/s and KB; 0 removes the shaping.
    #[arg(long)]
    pub outbound: Option<String>,
    /// Correlation id.
    #[arg(long, default_value = "")]
    pub request_id: String,
}

/// `move` options.
#[derive(Debug, Args)]
pub struct MoveArgs {
    /// Client options.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The VM the NIC is on (name or UUID).
    #[arg(long)]
    pub from_vm: String,
    /// The VM to move it to.
    #[arg(long)]
    pub to_vm: String,
    /// MAC of the NIC.
    #[arg(long)]
    pub mac: String,
    /// User alias to pick among NICs sharing the MAC.
    #[arg(long, default_value = "")]
    pub alias: String,
    /// How long to wait for the first guest to release the NIC (ms).
    #[arg(long, default_value_t = 0)]
    pub timeout_ms: u32,
    /// Correlation id.
    #[arg(long, default_value = "")]
    pub request_id: String,
}

/// `replug` options.
#[derive(Debug, Args)]
pub struct ReplugArgs {
    /// Client options and VM.
    #[command(flatten)]
    pub target: VmArgs,
    /// MAC of the NIC.
    #[arg(long)]
    pub mac: String,
    /// User alias to pick among NICs sharing the MAC.
    #[arg(long, default_value = "")]
    pub alias: String,
    /// The new bridge (or traffic label with --vlan/--vni/--broadcast-uri).
    #[arg(long)]
    pub bridge: String,
    /// The new bridge is an Open vSwitch bridge.
    #[arg(long)]
    pub ovs: bool,
    /// VLAN id 1-4094.
    #[arg(long)]
    pub vlan: Option<u32>,
    /// VXLAN VNI 1-16777215.
    #[arg(long)]
    pub vni: Option<u32>,
    /// CloudStack broadcast URI: vlan://N, vxlan://N, vlan://untagged.
    #[arg(long, default_value = "")]
    pub broadcast_uri: String,
    /// How long to wait for the guest to release the NIC when it must be
    /// unplugged (ms; 0 is the agent's default).
    #[arg(long, default_value_t = 0)]
    pub timeout_ms: u32,
    /// Keep the bridge the NIC leaves even when nothing uses it.
    #[arg(long)]
    pub keep_old_bridge: bool,
    /// Correlation id.
    #[arg(long, default_value = "")]
    pub request_id: String,
}

/// `guest-config` options.
#[derive(Debug, Args)]
pub struct GuestConfigArgs {
    /// MAC of the hot-plugged NIC.
    #[arg(long)]
    pub mac: String,
    /// Interface name in the guest.
    #[arg(long, default_value = "eth1")]
    pub name: String,
    /// Static address ADDR/PREFIX (default: DHCP).
    #[arg(long)]
    pub ip: Option<String>,
    /// Gateway of the NIC's subnet (with --ip).
    #[arg(long)]
    pub gateway: Option<String>,
    /// Routing table for the NIC's policy routing, 1-252 (with --ip and
    /// --gateway, or with DHCP: then hooks follow the lease).
    #[arg(long)]
    pub table: Option<u32>,
    /// Static IPv6 address ADDR/PREFIX.
    #[arg(long)]
    pub ip6: Option<String>,
    /// IPv6 gateway (with --ip6; link-local is fine).
    #[arg(long)]
    pub gateway6: Option<String>,
    /// IPv6 addressing: static (with --ip6), slaac or dhcp6 [default: off,
    /// or static with --ip6].
    #[arg(long)]
    pub ip6_mode: Option<String>,
    /// This NIC holds the default route (metric 100); without it the NIC
    /// never takes the default route.
    #[arg(long)]
    pub default: bool,
    /// Write the files under this directory (as if it were the guest's /),
    /// with their modes, instead of printing them; prints their paths.
    #[arg(long)]
    pub root: Option<PathBuf>,
}

/// Parses `AVG[,PEAK[,BURST]]` for `field`; `0` alone means "remove".
pub fn parse_bandwidth(
    field: &'static str,
    s: &str,
) -> Result<crate::nic::RawBandwidth, crate::nic::NicError> {
    let bad = || crate::nic::NicError::Invalid {
        field,
        value: s.to_string(),
        allowed: "AVG[,PEAK[,BURST]] as whole numbers (KB/s, KB/s, KB), or 0 to remove".into(),
    };
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() > 3 {
        return Err(bad());
    }
    let mut n = [0u64; 3];
    for (i, p) in parts.iter().enumerate() {
        n[i] = p.trim().parse::<u64>().map_err(|_| bad())?;
    }
    Ok(crate::nic::RawBandwidth {
        average_kbps: n[0],
        peak_kbps: n[1],
        burst_kb: n[2],
        rate_mbps: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook_args(argv: &[&str]) -> HookArgs {
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Hook(a) => a,
            other => panic!("not the hook: {other:?}"),
        }
    }

    #[test]
    fn the_hook_gets_libvirts_five_arguments_verbatim_dashes_included() {
        // packaging/libvirt-hook-nic-agent runs `nic-agent hook qemu "$@"`;
        // libvirt passes `-` for an empty sub-operation or extra.
        let a = hook_args(&[
            "nic-agent",
            "hook",
            "qemu",
            "i-2-10-VM",
            "release",
            "end",
            "-",
        ]);
        assert_eq!(a.args, ["qemu", "i-2-10-VM", "release", "end", "-"]);
        assert_eq!(a.state_dir, None);
        let a = hook_args(&["nic-agent", "hook", "qemu", "v", "stopped", "end", "-"]);
        assert_eq!(a.args.len(), 5);
    }

    #[test]
    fn the_hooks_own_options_come_before_libvirts_arguments() {
        // As the lab's drop-in calls it.
        let a = hook_args(&[
            "nic-agent",
            "hook",
            "--state-dir",
            "/run/x",
            "--persist-dir",
            "/var/lib/x",
            "--bridge-grace-s",
            "0",
            "qemu",
            "v",
            "prepare",
            "begin",
            "-",
        ]);
        assert_eq!(a.state_dir.as_deref(), Some(std::path::Path::new("/run/x")));
        assert_eq!(
            a.persist_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/x"))
        );
        assert_eq!(a.bridge_grace_s, Some(0));
        assert_eq!(a.args, ["qemu", "v", "prepare", "begin", "-"]);
        // After the first of libvirt's arguments nothing is an option: an
        // extra that looks like one reaches the hook's own check.
        let a = hook_args(&[
            "nic-agent",
            "hook",
            "qemu",
            "v",
            "release",
            "end",
            "--state-dir",
        ]);
        assert_eq!(a.args, ["qemu", "v", "release", "end", "--state-dir"]);
    }
}
