//! The command line: `serve`, the offline tools `render` and `inspect`, and
//! the gRPC client subcommands. `main.rs` only parses and dispatches here.

pub mod client;
pub mod offline;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// nic-agent: NIC hot-plug agent for KVM hosts.
#[derive(Debug, Parser)]
#[command(name = "nic-agent", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
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
}

/// Whether the agent manages host links (bridges, VLAN, VXLAN, OVS).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum HostNetwork {
    /// On for qemu:// URIs, off for the test:// lab.
    Auto,
    /// Always manage host networking.
    On,
    /// Never touch host links; bridges must exist.
    Off,
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// libvirt connection URI. `test:///default` or
    /// `test:///ABS/PATH/fixtures/lab-node.xml` is the embedded lab.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// HOST:PORT or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Cap for the default virtio queue count (queues = min(vCPUs, cap)).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub queue_cap: u16,
    /// Per-VM NIC limit (default: none beyond PCI capacity).
    #[arg(long)]
    pub nic_limit: Option<u32>,
    /// Default detach wait in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub detach_timeout_ms: u64,
    /// Host networking management.
    #[arg(long, value_enum, default_value_t = HostNetwork::Auto)]
    pub host_network: HostNetwork,
    /// Where the agent keeps state that must survive its restart (bridge
    /// flags saved before IDS promiscuous mode).
    #[arg(long, default_value = "/run/nic-agent")]
    pub state_dir: std::path::PathBuf,
    /// Raise a bridge's MTU (undoably) when a NIC asks for more, instead of
    /// refusing with FAILED_PRECONDITION.
    #[arg(long)]
    pub raise_bridge_mtu: bool,
    /// A bridge never removed on detach (repeatable), like CloudStack's
    /// persistent networks.
    #[arg(long = "keep-bridge")]
    pub keep_bridges: Vec<String>,
    /// A bridge on which promiscuous (IDS) NICs are refused (repeatable).
    #[arg(long = "forbid-promisc")]
    pub forbid_promisc: Vec<String>,
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
    /// Agent address: HOST:PORT, http://HOST:PORT or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:50051", env = "NIC_AGENT_SERVER")]
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
        })
    }
}
