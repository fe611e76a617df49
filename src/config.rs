//! The agent's configuration: `/etc/nic-agent/config.toml` merged with the
//! `serve` flags, then checked into one [`Settings`] value.
//!
//! Three layers, later ones winning: built-in defaults, the file, the
//! command line. Every key has a default, so an empty (or absent default)
//! file is a valid configuration. Unknown keys are errors that name the key:
//! a typo such as `raise_brige_mtu` must not silently keep the default.

use crate::host::{VxlanFamily, VxlanFlavour, VxlanSettings};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::nic::BridgePattern;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address, e.g. 127.0.0.1:50051 (port 0 picks a free port).
    Tcp(std::net::SocketAddr),
    /// A unix socket path.
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Listen::Unix(p.into()));
        }
        s.parse()
            .map(Listen::Tcp)
            .map_err(|e| format!("listen address {s:?}: {e}; use HOST:PORT or unix:PATH"))
    }
}

/// The longest wait a request or the configuration may ask for (5 min): a
/// client must not be able to hold a VM's lock for days.
pub const MAX_TIMEOUT_MS: u64 = 300_000;

/// The default `unplug_retry_ms`: longer than the 5 s a Linux guest's
/// PCIe hot-plug driver waits before it releases a slot, so a normal q35
/// unplug ends before it.
pub const DEFAULT_UNPLUG_RETRY_MS: u64 = 10_000;

/// Where `serve` looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/nic-agent/config.toml";

/// The default listener and the CLI's default `--server`: a unix socket,
/// so that out of the box only root and the socket's group can call.
pub const DEFAULT_SOCKET: &str = "unix:/run/nic-agent/nic-agent.sock";

/// A SHA-256 fingerprint of a client certificate (DER) or of its public
/// key (SubjectPublicKeyInfo, DER), for `tls.allow_fingerprints`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// From the 32 digest bytes.
    pub fn from_digest(d: [u8; 32]) -> Self {
        Fingerprint(d)
    }
}

impl TryFrom<&str> for Fingerprint {
    type Error = String;
    /// 64 hex digits; `:` separators (openssl's `-fingerprint` output) and
    /// a `sha256:` prefix are accepted.
    fn try_from(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .or_else(|| t.strip_prefix("sha256 Fingerprint="))
            .unwrap_or(t);
        let hex: Vec<u8> = t.bytes().filter(|b| *b != b':').collect();
        let bad = || {
            format!("{s:?} is not a SHA-256 fingerprint: 64 hex digits, optionally with ':' between bytes")
        };
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let txt = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(txt, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

/// Whether the agent manages host links (bridges, VLAN, VXLAN, OVS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HostNetwork {
    /// On for qemu:// URIs, off for the test:// lab.
    #[default]
    Auto,
    /// Always manage host networking.
    On,
    /// Never touch host links; bridges must exist.
    Off,
}

/// Who enforces anti-spoofing on NICs that ask for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AntiSpoofing {
    /// The agent's nwfilter, unless CloudStack's security-group script is
    /// installed: then cloudstack-agent's own rules are in charge, and a
    /// second layer would fight them.
    #[default]
    Auto,
    /// Always the agent's nwfilter.
    Nwfilter,
    /// Never: the request's flag is ignored, and the reply says so.
    Off,
}

/// Where CloudStack installs its security-group script (KVM agent,
/// cloudstack-common package); its presence means security groups are
/// cloudstack-agent's on this host.
pub const CLOUDSTACK_SG_SCRIPT: &str =
    "/usr/share/cloudstack-common/scripts/vm/network/security_group.py";

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A unix socket's permission bits (at most 0777), written in octal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(u32);

impl SocketMode {
    /// The permission bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Default for SocketMode {
    /// Owner and group may connect; nobody else.
    fn default() -> Self {
        SocketMode(0o660)
    }
}

impl std::fmt::Display for SocketMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl TryFrom<&str> for SocketMode {
    type Error = String;
    fn try_from(s: &str) -> Result<Self, String> {
        let digits = s.trim().trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(m) if !digits.is_empty() && m <= 0o777 => Ok(SocketMode(m)),
            _ => Err(format!(
                "{s:?} is not an octal mode 0000-0777 (e.g. \"0660\")"
            )),
        }
    }
}

impl TryFrom<u32> for SocketMode {
    type Error = String;
    /// From a TOML integer: `0o660` arrives as 432. A decimal-looking `660`
    /// is refused rather than read as 0o1224.
    fn try_from(m: u32) -> Result<Self, String> {
        if m <= 0o777 {
            Ok(SocketMode(m))
        } else {
            Err(format!(
                "{m} is not a mode 0000-0777; write it as a string \"0660\" or as 0o660"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(m) => SocketMode::try_from(m),
            Raw::Str(s) => SocketMode::try_from(s.as_str()),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// The `[tls]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFile {
    /// Server certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub key: Option<PathBuf>,
    /// CA that signs client certificates (PEM). Client certificates are
    /// required whenever TLS is on.
    pub client_ca: Option<PathBuf>,
    /// Client DNS subject-alternative names allowed to call. The subject
    /// CN is not consulted.
    pub allow_clients: Vec<String>,
    /// SHA-256 fingerprints of client certificates or of their public
    /// keys allowed to call.
    pub allow_fingerprints: Vec<String>,
    /// Admit every client the CA signed. Needed to run TLS with both
    /// lists empty.
    pub allow_any_client: bool,
}

/// The `[socket]` table: ownership of unix listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketFile {
    /// Permission bits, default 0660.
    pub mode: SocketMode,
    /// Owner user name (default: the agent's user).
    pub owner: Option<String>,
    /// Group name (default: the agent's group).
    pub group: Option<String>,
}

/// The `[vxlan]` table: how VXLAN devices are made, so that they match
/// what cloudstack-agent makes on this host and the others.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VxlanFile {
    /// CloudStack's flavour: "multicast" (modifyvxlan.sh, the default) or
    /// "evpn" (modifyvxlan-evpn.sh).
    pub flavour: VxlanFlavour,
    /// A UDP port pinned on every host. Absent: the flavour's (multicast:
    /// no port, so the kernel default, 8472; evpn: 4789).
    pub port: Option<u16>,
    /// Underlay family: "auto", "inet" or "inet6".
    pub family: VxlanFamily,
    /// CloudStack's lock file, taken when its directory exists.
    pub lock_file: PathBuf,
}

impl Default for VxlanFile {
    fn default() -> Self {
        let d = VxlanSettings::default();
        VxlanFile {
            flavour: d.flavour,
            port: d.port,
            family: d.family,
            lock_file: d.lock_file,
        }
    }
}

/// The `[limits]` table: how much one client, one VM or one scraper may
/// take. Times in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    /// gRPC requests one connection may have running at a time.
    pub requests_per_connection: usize,
    /// A gRPC request running longer is cancelled (CANCELLED).
    pub request_timeout_ms: u64,
    /// HTTP/2 PING interval on idle gRPC connections.
    pub http2_keepalive_interval_ms: u64,
    /// A connection whose PING is not answered within this is closed.
    pub http2_keepalive_timeout_ms: u64,
    /// TCP keep-alive idle time on gRPC TCP connections.
    pub tcp_keepalive_ms: u64,
    /// Requests that may wait for one VM behind the running one.
    pub vm_queue: usize,
    /// Open connections to the metrics endpoint.
    pub metrics_connections: usize,
    /// Time a metrics client has to send its request headers.
    pub metrics_header_timeout_ms: u64,
    /// How often the metrics that need libvirt are refreshed.
    pub metrics_refresh_ms: u64,
    /// Connections to libvirtd, which serves at most `max_client_requests`
    /// calls of one connection at a time.
    pub libvirt_connections: usize,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            requests_per_connection: 32,
            // Above the longest legitimate request: a move or detach that
            // waits the whole detach_timeout (30 s) for the guest.
            request_timeout_ms: 120_000,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 10_000,
            tcp_keepalive_ms: 60_000,
            vm_queue: 16,
            metrics_connections: 8,
            metrics_header_timeout_ms: 5_000,
            metrics_refresh_ms: 10_000,
            libvirt_connections: crate::hypervisor::libvirt::DEFAULT_CONNECTIONS,
        }
    }
}

/// The checked `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// gRPC requests one connection may have running at a time.
    pub requests_per_connection: usize,
    /// Longest a gRPC request may run.
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive PING interval.
    pub http2_keepalive_interval: Duration,
    /// HTTP/2 keep-alive PING answer timeout.
    pub http2_keepalive_timeout: Duration,
    /// TCP keep-alive idle time.
    pub tcp_keepalive: Duration,
    /// Waiters per VM.
    pub vm_queue: usize,
    /// Metrics connections at a time.
    pub metrics_connections: usize,
    /// Metrics request header deadline.
    pub metrics_header_timeout: Duration,
    /// Metrics background refresh period.
    pub metrics_refresh: Duration,
    /// Connections in the libvirt pool (the test driver always gets one).
    pub libvirt_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::try_from(&LimitsFile::default(), 30_000)
            .unwrap_or_else(|e| unreachable!("built-in limits are invalid: {e}"))
    }
}

impl Limits {
    fn try_from(l: &LimitsFile, detach_timeout_ms: u64) -> Result<Self, ConfigError> {
        for (key, v) in [
            (
                "limits.requests_per_connection",
                l.requests_per_connection as u64,
            ),
            ("limits.request_timeout_ms", l.request_timeout_ms),
            (
                "limits.http2_keepalive_interval_ms",
                l.http2_keepalive_interval_ms,
            ),
            (
                "limits.http2_keepalive_timeout_ms",
                l.http2_keepalive_timeout_ms,
            ),
            ("limits.tcp_keepalive_ms", l.tcp_keepalive_ms),
            ("limits.metrics_connections", l.metrics_connections as u64),
            (
                "limits.metrics_header_timeout_ms",
                l.metrics_header_timeout_ms,
            ),
            ("limits.metrics_refresh_ms", l.metrics_refresh_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        // The timeout cancels the request's work where it stands; a detach
        // that legitimately waits detach_timeout for the guest must never
        // be cut short by it.
        if l.request_timeout_ms <= detach_timeout_ms {
            return Err(invalid(
                "limits.request_timeout_ms",
                format!(
                    "{} must be larger than detach_timeout_ms ({detach_timeout_ms}), or detaches \
                     and moves that wait for the guest are cancelled",
                    l.request_timeout_ms
                ),
            ));
        }
        let max = crate::hypervisor::libvirt::MAX_CONNECTIONS;
        if !(1..=max).contains(&l.libvirt_connections) {
            return Err(invalid(
                "limits.libvirt_connections",
                format!(
                    "{} is out of range: give 1 to {max} (libvirtd serves at most \
                     max_client_requests, 5 by default, calls per connection at a time)",
                    l.libvirt_connections
                ),
            ));
        }
        let ms = Duration::from_millis;
        Ok(Limits {
            requests_per_connection: l.requests_per_connection,
            request_timeout: ms(l.request_timeout_ms),
            http2_keepalive_interval: ms(l.http2_keepalive_interval_ms),
            http2_keepalive_timeout: ms(l.http2_keepalive_timeout_ms),
            tcp_keepalive: ms(l.tcp_keepalive_ms),
            vm_queue: l.vm_queue,
            metrics_connections: l.metrics_connections,
            metrics_header_timeout: ms(l.metrics_header_timeout_ms),
            metrics_refresh: ms(l.metrics_refresh_ms),
            libvirt_connections: l.libvirt_connections,
        })
    }
}

/// The file as written: every key optional, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// gRPC listeners: HOST:PORT or unix:PATH.
    pub listen: Vec<String>,
    /// Transport security for TCP listeners.
    pub tls: TlsFile,
    /// Allow plaintext TCP on non-loopback addresses.
    pub insecure: bool,
    /// libvirt connection URI.
    pub connect: String,
    /// Cap for the default virtio queue count.
    pub queue_cap: u16,
    /// Per-VM NIC limit.
    pub nic_limit: Option<u32>,
    /// Default detach wait in milliseconds.
    pub detach_timeout_ms: u64,
    /// A running guest that still holds a NIC this long (ms) after an
    /// unplug request is asked again; 0 never asks again.
    pub unplug_retry_ms: u64,
    /// Subscribe to libvirt's domain events (detach waits on
    /// DEVICE_REMOVED); false polls the live XML instead.
    pub events: bool,
    /// Host networking management.
    pub host_network: HostNetwork,
    /// Who enforces anti-spoofing.
    pub anti_spoofing: AntiSpoofing,
    /// CloudStack's security-group script; `auto` looks for it.
    pub cloudstack_security_group_script: PathBuf,
    /// State that must survive an agent restart.
    pub state_dir: PathBuf,
    /// State that must survive a host reboot (what agent-made bridges carry).
    pub persist_dir: PathBuf,
    /// MTU policy: raise a bridge's MTU instead of refusing a larger NIC.
    pub raise_bridge_mtu: bool,
    /// Bridges never removed on detach.
    pub keep_bridges: Vec<String>,
    /// Bridges on which promiscuous (IDS) NICs are refused.
    pub forbid_promisc: Vec<String>,
    /// Seconds an agent-made bridge that changed is kept before removal.
    pub bridge_grace_s: u64,
    /// Seconds between background reconciles; 0 runs only the one at
    /// start-up.
    pub reconcile_interval_s: u64,
    /// Glob patterns of bridges NICs may be attached to.
    pub allow_bridges: Vec<String>,
    /// Glob patterns of bridges IDS (promiscuous) NICs may be attached to.
    pub allow_promisc_bridges: Vec<String>,
    /// Prometheus endpoint HOST:PORT; off when absent or empty.
    pub metrics_listen: Option<String>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Unix socket ownership.
    pub socket: SocketFile,
    /// VXLAN flavour, port, family and lock.
    pub vxlan: VxlanFile,
    /// Per-connection, per-VM and metrics limits.
    pub limits: LimitsFile,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            listen: vec![DEFAULT_SOCKET.into()],
            tls: TlsFile::default(),
            insecure: false,
            connect: "qemu:///system".into(),
            queue_cap: 8,
            nic_limit: None,
            detach_timeout_ms: 30_000,
            unplug_retry_ms: DEFAULT_UNPLUG_RETRY_MS,
            events: true,
            host_network: HostNetwork::Auto,
            anti_spoofing: AntiSpoofing::Auto,
            cloudstack_security_group_script: CLOUDSTACK_SG_SCRIPT.into(),
            state_dir: "/run/nic-agent".into(),
            persist_dir: "/var/lib/nic-agent".into(),
            raise_bridge_mtu: false,
            keep_bridges: Vec::new(),
            forbid_promisc: Vec::new(),
            bridge_grace_s: 60,
            reconcile_interval_s: 300,
            // Every bridge, as before these keys existed; the packaged
            // config.toml narrows them to guest bridges.
            allow_bridges: vec!["*".into()],
            allow_promisc_bridges: vec!["*".into()],
            metrics_listen: None,
            log_format: LogFormat::Text,
            socket: SocketFile::default(),
            vxlan: VxlanFile::default(),
            limits: LimitsFile::default(),
        }
    }
}

/// `serve` flags that override the file. `None`, an empty list or an
/// unset switch leaves the file's value alone.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// libvirt connection URI [default: qemu:///system]. `test:///default`
    /// or `test:///ABS/PATH/fixtures/lab-node.xml` is the embedded lab.
    #[arg(long)]
    pub connect: Option<String>,
    /// HOST:PORT or unix:PATH (repeatable) [default:
    /// unix:/run/nic-agent/nic-agent.sock]. A TCP address needs TLS or
    /// --insecure, loopback included.
    ///
    /// Python, C++ and Ruby gRPC clients (C-core) send the socket path as
    /// the HTTP/2 :authority on unix sockets, which this server's HTTP/2
    /// stack refuses (PROTOCOL_ERROR). Such clients set the channel option
    /// grpc.default_authority = "localhost", e.g. in Python
    /// grpc.insecure_channel("unix:/run/nic-agent/nic-agent.sock",
    /// options=[("grpc.default_authority", "localhost")]).
    #[arg(long, verbatim_doc_comment)]
    pub listen: Vec<String>,
    /// Cap for the default virtio queue count (queues = min(vCPUs, cap))
    /// [default: 8].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub queue_cap: Option<u16>,
    /// Per-VM NIC limit (default: none beyond PCI capacity).
    #[arg(long)]
    pub nic_limit: Option<u32>,
    /// Default detach wait in milliseconds, 1-300000 [default: 30000].
    #[arg(long)]
    pub detach_timeout_ms: Option<u64>,
    /// Ask a running guest again to release a NIC it still holds this
    /// long after the unplug request, in milliseconds: 0 (never) or
    /// 1000-300000 [default: 10000].
    #[arg(long)]
    pub unplug_retry_ms: Option<u64>,
    /// Wait for libvirt's device-removed event on detach (true), or poll
    /// the live XML (false) [default: true].
    #[arg(long, value_name = "BOOL")]
    pub events: Option<bool>,
    /// Host networking management [default: auto].
    #[arg(long, value_enum)]
    pub host_network: Option<HostNetwork>,
    /// Who enforces anti-spoofing on NICs that ask for it [default: auto].
    #[arg(long, value_enum)]
    pub anti_spoofing: Option<AntiSpoofing>,
    /// Where the agent keeps state that must survive its restart (bridge
    /// flags saved before IDS promiscuous mode) [default: /run/nic-agent].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Where the agent keeps what must survive a host reboot (which segment
    /// each agent-made bridge carries) [default: /var/lib/nic-agent].
    #[arg(long)]
    pub persist_dir: Option<PathBuf>,
    /// Seconds an agent-made bridge that was made or lost its last port is
    /// kept before removal (cloudstack-agent may be about to use it); the
    /// reconcile collects it later [default: 60].
    #[arg(long)]
    pub bridge_grace_s: Option<u64>,
    /// Seconds between background reconciles of host objects; 0 runs only
    /// the one at start-up [default: 300].
    #[arg(long)]
    pub reconcile_interval_s: Option<u64>,
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
    /// Server certificate chain (PEM); turns TLS on for TCP listeners.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// CA for client certificates (PEM); clients must present one.
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// A client certificate DNS subject-alternative name allowed to call
    /// (repeatable). The subject CN is never matched.
    #[arg(long = "allow-client")]
    pub allow_clients: Vec<String>,
    /// SHA-256 fingerprint of a client certificate or of its public key
    /// (SPKI) allowed to call (repeatable).
    #[arg(long = "allow-fingerprint")]
    pub allow_fingerprints: Vec<String>,
    /// Admit every client the CA signed (TLS with no allow-list).
    #[arg(long)]
    pub allow_any_client: bool,
    /// Allow plaintext gRPC on a TCP address (loopback included).
    #[arg(long)]
    pub insecure: bool,
    /// Glob of bridges NICs may use (repeatable) [default: *].
    #[arg(long = "allow-bridge")]
    pub allow_bridges: Vec<String>,
    /// Glob of bridges IDS (promiscuous) NICs may use (repeatable)
    /// [default: *].
    #[arg(long = "allow-promisc-bridge")]
    pub allow_promisc_bridges: Vec<String>,
    /// Unix socket permission bits, octal [default: 0660].
    #[arg(long, value_parser = parse_mode)]
    pub socket_mode: Option<SocketMode>,
    /// Unix socket owner (user name).
    #[arg(long)]
    pub socket_owner: Option<String>,
    /// Unix socket group (group name).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Serve Prometheus metrics on HOST:PORT at /metrics (default: off).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// VXLAN as CloudStack's modifyvxlan.sh (multicast) or
    /// modifyvxlan-evpn.sh (evpn) makes it [default: multicast].
    #[arg(long, value_enum)]
    pub vxlan_flavour: Option<VxlanFlavour>,
    /// Pin the VXLAN UDP port (default: the flavour's; multicast gives no
    /// port, so the kernel default applies, 8472).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub vxlan_port: Option<u16>,
    /// VXLAN underlay family [default: auto: IPv6 when the underlay has a
    /// global IPv6 address and no IPv4 one].
    #[arg(long, value_enum)]
    pub vxlan_family: Option<VxlanFamily>,
    /// CloudStack's VXLAN lock file, taken when its directory exists
    /// [default: /var/run/cloud/vxlan.lock].
    #[arg(long)]
    pub vxlan_lock_file: Option<PathBuf>,
}

fn parse_mode(s: &str) -> Result<SocketMode, String> {
    SocketMode::try_from(s)
}

/// Why a configuration was refused. Each message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the
    /// wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A value is well-typed but not acceptable.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, e.g. `queue_cap` or `tls.cert`.
        key: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The dotted key (`socket.mode`) whose value starts at byte `pos`, so a
/// type error names the key even when the parser only knows the position.
fn key_at(text: &str, pos: usize) -> Option<String> {
    let before = text.get(..pos)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = text.get(line_start..)?.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

impl FileConfig {
    /// Parses TOML text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let mut message = e.message().trim_end().to_string();
            if let Some(key) = e.span().and_then(|sp| key_at(text, sp.start)) {
                if !message.contains(&key) {
                    message = format!("{key}: {message}");
                }
            }
            let line = e
                .span()
                .map(|sp| text[..sp.start.min(text.len())].matches('\n').count() + 1);
            ConfigError::Parse {
                path: path.to_path_buf(),
                message: match line {
                    Some(l) => format!("line {l}: {message}"),
                    None => message,
                },
            }
        })
    }

    /// Reads `path`, or [`DEFAULT_PATH`] when `None`. A missing default
    /// file means "all defaults"; a missing explicit file is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (p, explicit) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_PATH), false),
        };
        match std::fs::read_to_string(p) {
            Ok(text) => Self::parse(&text, p),
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(FileConfig::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: p.to_path_buf(),
                source,
            }),
        }
    }

    /// Applies command-line overrides on top of the file.
    pub fn merge(mut self, o: &Overrides) -> Self {
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        fn set_list(dst: &mut Vec<String>, v: &[String]) {
            if !v.is_empty() {
                *dst = v.to_vec();
            }
        }
        set(&mut self.connect, &o.connect);
        set_list(&mut self.listen, &o.listen);
        set(&mut self.queue_cap, &o.queue_cap);
        if o.nic_limit.is_some() {
            self.nic_limit = o.nic_limit;
        }
        set(&mut self.detach_timeout_ms, &o.detach_timeout_ms);
        set(&mut self.unplug_retry_ms, &o.unplug_retry_ms);
        set(&mut self.events, &o.events);
        set(&mut self.host_network, &o.host_network);
        set(&mut self.anti_spoofing, &o.anti_spoofing);
        set(&mut self.state_dir, &o.state_dir);
        set(&mut self.persist_dir, &o.persist_dir);
        set(&mut self.bridge_grace_s, &o.bridge_grace_s);
        set(&mut self.reconcile_interval_s, &o.reconcile_interval_s);
        self.raise_bridge_mtu |= o.raise_bridge_mtu;
        set_list(&mut self.keep_bridges, &o.keep_bridges);
        set_list(&mut self.forbid_promisc, &o.forbid_promisc);
        if o.tls_cert.is_some() {
            self.tls.cert = o.tls_cert.clone();
        }
        if o.tls_key.is_some() {
            self.tls.key = o.tls_key.clone();
        }
        if o.tls_client_ca.is_some() {
            self.tls.client_ca = o.tls_client_ca.clone();
        }
        set_list(&mut self.tls.allow_clients, &o.allow_clients);
        set_list(&mut self.tls.allow_fingerprints, &o.allow_fingerprints);
        self.tls.allow_any_client |= o.allow_any_client;
        self.insecure |= o.insecure;
        set_list(&mut self.allow_bridges, &o.allow_bridges);
        set_list(&mut self.allow_promisc_bridges, &o.allow_promisc_bridges);
        set(&mut self.socket.mode, &o.socket_mode);
        if o.socket_owner.is_some() {
            self.socket.owner = o.socket_owner.clone();
        }
        if o.socket_group.is_some() {
            self.socket.group = o.socket_group.clone();
        }
        if o.metrics_listen.is_some() {
            self.metrics_listen = o.metrics_listen.clone();
        }
        set(&mut self.vxlan.flavour, &o.vxlan_flavour);
        if o.vxlan_port.is_some() {
            self.vxlan.port = o.vxlan_port;
        }
        set(&mut self.vxlan.family, &o.vxlan_family);
        set(&mut self.vxlan.lock_file, &o.vxlan_lock_file);
        self
    }
}

/// TLS files and who may call, all present and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA for client certificates (PEM).
    pub client_ca: PathBuf,
    /// Allowed client DNS SANs, lower-cased.
    pub allow_clients: Vec<String>,
    /// Allowed certificate or SPKI fingerprints.
    pub allow_fingerprints: Vec<Fingerprint>,
    /// Every CA-signed client may call (both lists are then empty).
    pub allow_any_client: bool,
}

/// Ownership and mode for unix listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketSettings {
    /// Permission bits.
    pub mode: SocketMode,
    /// Owner user name.
    pub owner: Option<String>,
    /// Group name.
    pub group: Option<String>,
}

/// The checked configuration `serve` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// gRPC listeners, at least one.
    pub listen: Vec<Listen>,
    /// TLS for TCP listeners.
    pub tls: Option<TlsSettings>,
    /// Plaintext on non-loopback TCP was explicitly allowed.
    pub insecure: bool,
    /// libvirt connection URI.
    pub connect: String,
    /// Cap for the default virtio queue count, 1-256.
    pub queue_cap: u16,
    /// Per-VM NIC limit.
    pub nic_limit: Option<u32>,
    /// Default detach wait.
    pub detach_timeout: Duration,
    /// When a running guest that holds a NIC is asked again; zero never.
    pub unplug_retry: Duration,
    /// Whether detach waits on libvirt events.
    pub events: bool,
    /// Host networking management.
    pub host_network: HostNetwork,
    /// Who enforces anti-spoofing.
    pub anti_spoofing: AntiSpoofing,
    /// CloudStack's security-group script.
    pub cloudstack_security_group_script: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Persistent state directory.
    pub persist_dir: PathBuf,
    /// Grace period before an agent-made bridge that changed is removed.
    pub bridge_grace: Duration,
    /// Period of the background reconcile; `None` runs it at start-up only.
    pub reconcile_interval: Option<Duration>,
    /// MTU policy.
    pub raise_bridge_mtu: bool,
    /// Bridges never removed on detach.
    pub keep_bridges: Vec<String>,
    /// Bridges on which promiscuous NICs are refused.
    pub forbid_promisc: Vec<String>,
    /// Bridges NICs may use.
    pub allow_bridges: Vec<BridgePattern>,
    /// Bridges IDS (promiscuous) NICs may use.
    pub allow_promisc_bridges: Vec<BridgePattern>,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Unix socket ownership.
    pub socket: SocketSettings,
    /// How VXLAN devices are made.
    pub vxlan: VxlanSettings,
    /// Per-connection, per-VM and metrics limits.
    pub limits: Limits,
}

/// A directory the agent writes under `serve`, for the service manager's
/// sandbox (`packaging/nic-agent.service` must make each one writable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenDir {
    /// The configuration key it comes from.
    pub key: &'static str,
    /// The directory.
    pub dir: PathBuf,
    /// False when the agent writes there only if the directory already
    /// exists (CloudStack's VXLAN lock).
    pub required: bool,
}

impl Settings {
    /// Every directory `serve` writes with these settings: the state and
    /// persist dirs, each unix listener's directory and the VXLAN lock's.
    pub fn written_dirs(&self) -> Vec<WrittenDir> {
        let mut v = vec![
            WrittenDir {
                key: "state_dir",
                dir: self.state_dir.clone(),
                required: true,
            },
            WrittenDir {
                key: "persist_dir",
                dir: self.persist_dir.clone(),
                required: true,
            },
        ];
        for l in &self.listen {
            if let Listen::Unix(p) = l {
                if let Some(d) = p.parent() {
                    v.push(WrittenDir {
                        key: "listen",
                        dir: d.to_path_buf(),
                        required: true,
                    });
                }
            }
        }
        if let Some(d) = self.vxlan.lock_file.parent() {
            v.push(WrittenDir {
                key: "vxlan.lock_file",
                dir: d.to_path_buf(),
                required: false,
            });
        }
        v
    }

    /// The host backend's settings. One place, because `serve`, the
    /// libvirt hook and `repair-vxlan` must agree: a device the hook or a
    /// repair makes must be the one the daemon would have made, and they
    /// must share the daemon's locks and records.
    pub fn host_config(&self) -> crate::host::HostConfig {
        crate::host::HostConfig {
            state_dir: self.state_dir.clone(),
            persist_dir: self.persist_dir.clone(),
            raise_bridge_mtu: self.raise_bridge_mtu,
            vxlan: self.vxlan.clone(),
            ..crate::host::HostConfig::default()
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        // The built-in defaults are valid by construction; a failure here
        // would be a bug caught by the unit test below.
        Settings::try_from(FileConfig::default()).unwrap_or_else(|e| {
            unreachable!("built-in defaults are invalid: {e}");
        })
    }
}

fn patterns(key: &'static str, list: &[String]) -> Result<Vec<BridgePattern>, ConfigError> {
    list.iter()
        .map(|p| {
            BridgePattern::try_from(p.as_str()).map_err(|e| invalid(key, format!("{p:?}: {e}")))
        })
        .collect()
}

fn check_bridges(key: &'static str, names: &[String]) -> Result<(), ConfigError> {
    for n in names {
        crate::nic::BridgeName::try_from(n.as_str())
            .map_err(|e| invalid(key, format!("{n:?}: {e}")))?;
    }
    Ok(())
}

impl TryFrom<FileConfig> for Settings {
    type Error = ConfigError;

    fn try_from(f: FileConfig) -> Result<Self, ConfigError> {
        if f.listen.is_empty() {
            return Err(invalid(
                "listen",
                "needs at least one HOST:PORT or unix:PATH",
            ));
        }
        let listen = f
            .listen
            .iter()
            .map(|s| s.parse::<Listen>().map_err(|e| invalid("listen", e)))
            .collect::<Result<Vec<_>, _>>()?;

        let t = &f.tls;
        let tls = match (&t.cert, &t.key, &t.client_ca) {
            (None, None, None) => {
                for (key, set) in [
                    ("tls.allow_clients", !t.allow_clients.is_empty()),
                    ("tls.allow_fingerprints", !t.allow_fingerprints.is_empty()),
                    ("tls.allow_any_client", t.allow_any_client),
                ] {
                    if set {
                        return Err(invalid(
                            key,
                            "needs TLS: set tls.cert, tls.key and tls.client_ca \
                             (--tls-cert/--tls-key/--tls-client-ca)",
                        ));
                    }
                }
                None
            }
            (Some(cert), Some(key), Some(ca)) => Some(TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
                allow_clients: t
                    .allow_clients
                    .iter()
                    .map(|c| c.to_ascii_lowercase())
                    .collect(),
                allow_fingerprints: t
                    .allow_fingerprints
                    .iter()
                    .map(|f| Fingerprint::try_from(f.as_str()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| invalid("tls.allow_fingerprints", e))?,
                allow_any_client: t.allow_any_client,
            }),
            _ => {
                let missing: Vec<&str> = [
                    ("tls.cert", t.cert.is_none()),
                    ("tls.key", t.key.is_none()),
                    ("tls.client_ca", t.client_ca.is_none()),
                ]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(k, _)| *k)
                .collect();
                return Err(invalid(
                    "tls",
                    format!(
                        "cert, key and client_ca go together; missing {}",
                        missing.join(", ")
                    ),
                ));
            }
        };
        if let Some(t) = &tls {
            if t.allow_clients.iter().any(|c| c.is_empty()) {
                return Err(invalid(
                    "tls.allow_clients",
                    "an empty name matches no client",
                ));
            }
            let listed = !t.allow_clients.is_empty() || !t.allow_fingerprints.is_empty();
            // In CloudStack the CA that signs our clients also signs every
            // host and system VM: "any client of the CA" is almost everyone,
            // so it must be asked for by name.
            if !listed && !t.allow_any_client {
                return Err(invalid(
                    "tls.allow_clients",
                    "is empty, and so is tls.allow_fingerprints: with TLS on, list the \
                     clients allowed to call (DNS names from their certificates' \
                     subjectAltName, or SHA-256 fingerprints), or set \
                     tls.allow_any_client = true (--allow-any-client) to admit every \
                     client the CA signed",
                ));
            }
            if listed && t.allow_any_client {
                return Err(invalid(
                    "tls.allow_any_client",
                    "admits every client the CA signed, which makes tls.allow_clients \
                     and tls.allow_fingerprints meaningless; set one or the other",
                ));
            }
        }

        // Plaintext gRPC lets any process that can reach the port attach
        // NICs to any VM on the host, and on loopback that is every local
        // user and container sharing the host's network namespace. So TCP
        // needs TLS or an explicit opt-out, loopback included; unix sockets
        // are guarded by their mode and group instead.
        if tls.is_none() && !f.insecure {
            for l in &listen {
                if let Listen::Tcp(a) = l {
                    return Err(invalid(
                        "insecure",
                        format!(
                            "refusing plaintext gRPC on TCP {a}: configure TLS \
                             (tls.cert, tls.key, tls.client_ca or --tls-cert, --tls-key, \
                             --tls-client-ca), listen on a unix socket ({DEFAULT_SOCKET}), \
                             or set insecure = true (--insecure) to accept unauthenticated \
                             clients on it"
                        ),
                    ));
                }
            }
        }

        if f.connect.trim().is_empty() {
            return Err(invalid(
                "connect",
                "needs a libvirt URI, e.g. qemu:///system",
            ));
        }
        if !(1..=256).contains(&f.queue_cap) {
            return Err(invalid(
                "queue_cap",
                format!("{} is out of range 1-256", f.queue_cap),
            ));
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&f.detach_timeout_ms) {
            return Err(invalid(
                "detach_timeout_ms",
                format!("{} is out of range 1-{MAX_TIMEOUT_MS}", f.detach_timeout_ms),
            ));
        }
        if f.unplug_retry_ms != 0 && !(1000..=MAX_TIMEOUT_MS).contains(&f.unplug_retry_ms) {
            return Err(invalid(
                "unplug_retry_ms",
                format!(
                    "{} is out of range: give 0 (never ask again) or 1000-{MAX_TIMEOUT_MS}",
                    f.unplug_retry_ms
                ),
            ));
        }
        for (key, dir) in [
            ("state_dir", &f.state_dir),
            ("persist_dir", &f.persist_dir),
            (
                "cloudstack_security_group_script",
                &f.cloudstack_security_group_script,
            ),
        ] {
            if dir.as_os_str().is_empty() || !dir.is_absolute() {
                return Err(invalid(key, format!("{dir:?} must be an absolute path")));
            }
        }
        if f.bridge_grace_s > 86_400 {
            return Err(invalid(
                "bridge_grace_s",
                format!("{} is out of range 0-86400", f.bridge_grace_s),
            ));
        }
        check_bridges("keep_bridges", &f.keep_bridges)?;
        check_bridges("forbid_promisc", &f.forbid_promisc)?;
        let allow_bridges = patterns("allow_bridges", &f.allow_bridges)?;
        let allow_promisc_bridges = patterns("allow_promisc_bridges", &f.allow_promisc_bridges)?;
        let metrics_listen = match f.metrics_listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(
                s.parse::<SocketAddr>()
                    .map_err(|e| invalid("metrics_listen", format!("{s:?}: {e}; use HOST:PORT")))?,
            ),
        };
        for (key, name) in [
            ("socket.owner", &f.socket.owner),
            ("socket.group", &f.socket.group),
        ] {
            if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                return Err(invalid(key, "an empty name; leave the key out instead"));
            }
        }

        if f.vxlan.port == Some(0) {
            return Err(invalid("vxlan.port", "0 is not a UDP port; use 1-65535"));
        }
        if !f.vxlan.lock_file.is_absolute() {
            return Err(invalid(
                "vxlan.lock_file",
                format!("{:?} must be an absolute path", f.vxlan.lock_file),
            ));
        }
        let limits = Limits::try_from(&f.limits, f.detach_timeout_ms)?;

        Ok(Settings {
            limits,
            listen,
            tls,
            insecure: f.insecure,
            connect: f.connect,
            queue_cap: f.queue_cap,
            nic_limit: f.nic_limit,
            detach_timeout: Duration::from_millis(f.detach_timeout_ms),
            unplug_retry: Duration::from_millis(f.unplug_retry_ms),
            events: f.events,
            host_network: f.host_network,
            anti_spoofing: f.anti_spoofing,
            cloudstack_security_group_script: f.cloudstack_security_group_script,
            state_dir: f.state_dir,
            persist_dir: f.persist_dir,
            bridge_grace: Duration::from_secs(f.bridge_grace_s),
            reconcile_interval: (f.reconcile_interval_s > 0)
                .then(|| Duration::from_secs(f.reconcile_interval_s)),
            raise_bridge_mtu: f.raise_bridge_mtu,
            keep_bridges: f.keep_bridges,
            forbid_promisc: f.forbid_promisc,
            allow_bridges,
            allow_promisc_bridges,
            metrics_listen,
            log_format: f.log_format,
            socket: SocketSettings {
                mode: f.socket.mode,
                owner: f.socket.owner,
                group: f.socket.group,
            },
            vxlan: VxlanSettings {
                flavour: f.vxlan.flavour,
                port: f.vxlan.port,
                family: f.vxlan.family,
                lock_file: f.vxlan.lock_file,
                ..VxlanSettings::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(s, Path::new("t.toml"))
    }

    #[test]
    fn built_in_defaults_are_valid() {
        let s = Settings::default();
        assert_eq!(s.queue_cap, 8);
        assert_eq!(s.socket.mode.bits(), 0o660);
        assert_eq!(
            s.listen,
            vec![Listen::Unix("/run/nic-agent/nic-agent.sock".into())]
        );
        assert_eq!(s.allow_bridges, vec![BridgePattern::try_from("*").unwrap()]);
        assert_eq!(s.allow_promisc_bridges.len(), 1);
    }

    #[test]
    fn written_dirs_name_state_persist_socket_and_lock_dirs() {
        let mut s = Settings::default();
        s.listen.push(Listen::Unix("/srv/sock/a.sock".into()));
        s.listen.push(Listen::Tcp("127.0.0.1:1".parse().unwrap()));
        let got: Vec<(&str, String, bool)> = s
            .written_dirs()
            .into_iter()
            .map(|w| (w.key, w.dir.display().to_string(), w.required))
            .collect();
        assert_eq!(
            got,
            vec![
                ("state_dir", "/run/nic-agent".into(), true),
                ("persist_dir", "/var/lib/nic-agent".into(), true),
                ("listen", "/run/nic-agent".into(), true),
                ("listen", "/srv/sock".into(), true),
                ("vxlan.lock_file", "/var/run/cloud".into(), false),
            ]
        );
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), FileConfig::default());
    }

    #[test]
    fn socket_mode_accepts_octal_string_and_toml_octal() {
        let a = parse("[socket]\nmode = \"0600\"").unwrap();
        let b = parse("[socket]\nmode = 0o600").unwrap();
        assert_eq!(a.socket.mode.bits(), 0o600);
        assert_eq!(b.socket.mode.bits(), 0o600);
        let e = parse("[socket]\nmode = 660").unwrap_err().to_string();
        assert!(e.contains("0o660"), "{e}");
        assert!(SocketMode::try_from("0999").is_err());
        assert!(SocketMode::try_from("").is_err());
    }

    #[test]
    fn type_errors_name_the_key_even_in_a_table() {
        let e = parse("queue_cap = \"x\"").unwrap_err().to_string();
        assert!(e.contains("queue_cap:"), "{e}");
        let e = parse("[socket]\nowner = 5").unwrap_err().to_string();
        assert!(e.contains("socket.owner:"), "{e}");
    }

    #[test]
    fn unknown_nested_key_is_named() {
        let e = parse("[tls]\ncertt = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("certt"), "{e}");
    }

    #[test]
    fn partial_tls_names_the_missing_keys() {
        let f = parse("[tls]\ncert = \"/c\"").unwrap();
        let e = Settings::try_from(f).unwrap_err().to_string();
        assert!(e.contains("tls.key") && e.contains("tls.client_ca"), "{e}");
    }

    #[test]
    fn plaintext_tcp_needs_insecure_even_on_loopback() {
        let ok = parse("listen = [\"unix:/tmp/x\"]").unwrap();
        assert!(Settings::try_from(ok).is_ok());
        for a in ["127.0.0.1:1", "[::1]:2", "0.0.0.0:1"] {
            let bad = parse(&format!("listen = [\"unix:/tmp/x\", \"{a}\"]")).unwrap();
            let e = Settings::try_from(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("insecure:") && e.contains("--insecure"),
                "{e}"
            );
            let opt_out = parse(&format!("listen = [\"{a}\"]\ninsecure = true")).unwrap();
            assert!(Settings::try_from(opt_out).is_ok());
        }
    }

    const TLS: &str =
        "listen = [\"127.0.0.1:1\"]\n[tls]\ncert = \"/c\"\nkey = \"/k\"\nclient_ca = \"/a\"\n";

    #[test]
    fn tls_without_any_allowed_client_is_refused_unless_asked_for() {
        let e = Settings::try_from(parse(TLS).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("tls.allow_clients") && e.contains("allow_any_client"),
            "{e}"
        );
        let any = parse(&format!("{TLS}allow_any_client = true")).unwrap();
        assert!(
            Settings::try_from(any)
                .unwrap()
                .tls
                .unwrap()
                .allow_any_client
        );
        let named = parse(&format!("{TLS}allow_clients = [\"Mgmt.Example\"]")).unwrap();
        assert_eq!(
            Settings::try_from(named)
                .unwrap()
                .tls
                .unwrap()
                .allow_clients,
            vec!["mgmt.example".to_string()]
        );
        let both = parse(&format!(
            "{TLS}allow_clients = [\"m\"]\nallow_any_client = true"
        ))
        .unwrap();
        let e = Settings::try_from(both).unwrap_err().to_string();
        assert!(e.starts_with("tls.allow_any_client"), "{e}");
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        let a = Fingerprint::try_from(hex.as_str()).unwrap();
        assert_eq!(a, Fingerprint::try_from(colons.as_str()).unwrap());
        assert_eq!(
            a,
            Fingerprint::try_from(format!("sha256:{hex}").as_str()).unwrap()
        );
        assert_eq!(a.to_string(), colons);
        for bad in ["", "ab", &"zz".repeat(32), &"ab".repeat(33)] {
            assert!(Fingerprint::try_from(bad).is_err(), "{bad:?}");
        }
        let f = parse(&format!("{TLS}allow_fingerprints = [\"nope\"]")).unwrap();
        let e = Settings::try_from(f).unwrap_err().to_string();
        assert!(e.starts_with("tls.allow_fingerprints"), "{e}");
    }

    #[test]
    fn cli_overrides_file_and_empty_cli_keeps_file() {
        let f = parse("connect = \"test:///default\"\nqueue_cap = 4\nkeep_bridges = [\"br0\"]")
            .unwrap();
        let kept = f.clone().merge(&Overrides::default());
        assert_eq!(kept, f);
        let o = Overrides {
            queue_cap: Some(2),
            keep_bridges: vec!["br1".into()],
            ..Overrides::default()
        };
        let m = f.merge(&o);
        assert_eq!(m.queue_cap, 2);
        assert_eq!(m.keep_bridges, vec!["br1".to_string()]);
        assert_eq!(m.connect, "test:///default");
    }

    #[test]
    fn vxlan_defaults_to_cloudstacks_multicast_flavour_without_a_port() {
        let s = Settings::default();
        assert_eq!(s.vxlan.flavour, VxlanFlavour::Multicast);
        assert_eq!(
            s.vxlan.port, None,
            "no port: the kernel default, like modifyvxlan.sh"
        );
        assert_eq!(s.vxlan.family, VxlanFamily::Auto);
        assert_eq!(
            s.vxlan.lock_file,
            PathBuf::from("/var/run/cloud/vxlan.lock")
        );
        let f = parse("[vxlan]\nflavour = \"evpn\"\nport = 4789\nfamily = \"inet6\"").unwrap();
        let s = Settings::try_from(f).unwrap();
        assert_eq!(
            (s.vxlan.flavour, s.vxlan.port, s.vxlan.family),
            (VxlanFlavour::Evpn, Some(4789), VxlanFamily::Inet6)
        );
        let e = parse("[vxlan]\nflavour = \"unicast\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vxlan.flavour") || e.contains("flavour"), "{e}");
    }

    #[test]
    fn libvirt_connections_default_to_four_and_take_one_to_sixteen() {
        assert_eq!(Settings::default().limits.libvirt_connections, 4);
        for n in [1, 16] {
            let f = parse(&format!("[limits]\nlibvirt_connections = {n}")).unwrap();
            assert_eq!(Settings::try_from(f).unwrap().limits.libvirt_connections, n);
        }
        let e = Settings::try_from(parse("[limits]\nlibvirt_connections = 17").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("give 1 to 16"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("queue_cap = 0", "queue_cap"),
            ("detach_timeout_ms = 0", "detach_timeout_ms"),
            ("detach_timeout_ms = 300001", "detach_timeout_ms"),
            ("unplug_retry_ms = 999", "unplug_retry_ms"),
            ("unplug_retry_ms = 300001", "unplug_retry_ms"),
            ("metrics_listen = \"nowhere\"", "metrics_listen"),
            ("keep_bridges = [\"a b@\"]", "keep_bridges"),
            ("state_dir = \"rel\"", "state_dir"),
            ("listen = []", "listen"),
            ("[vxlan]\nport = 0", "vxlan.port"),
            ("[vxlan]\nlock_file = \"x.lock\"", "vxlan.lock_file"),
            ("allow_bridges = [\"br 0\"]", "allow_bridges"),
            ("allow_promisc_bridges = [\"\"]", "allow_promisc_bridges"),
            (
                "[limits]\nrequests_per_connection = 0",
                "limits.requests_per_connection",
            ),
            (
                "[limits]\nrequest_timeout_ms = 30000",
                "limits.request_timeout_ms",
            ),
            (
                "[limits]\nmetrics_connections = 0",
                "limits.metrics_connections",
            ),
            (
                "[limits]\nlibvirt_connections = 0",
                "limits.libvirt_connections",
            ),
            (
                "[limits]\nlibvirt_connections = 17",
                "limits.libvirt_connections",
            ),
        ] {
            let e = Settings::try_from(parse(text).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }
}
