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

/// Where `serve` looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/nic-agent/config.toml";

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
    /// Client identities (subject CN or DNS SAN) allowed to call; empty
    /// allows every client the CA vouches for.
    pub allow_clients: Vec<String>,
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
    /// Subscribe to libvirt's domain events (detach waits on
    /// DEVICE_REMOVED); false polls the live XML instead.
    pub events: bool,
    /// Host networking management.
    pub host_network: HostNetwork,
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
    /// Prometheus endpoint HOST:PORT; off when absent or empty.
    pub metrics_listen: Option<String>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Unix socket ownership.
    pub socket: SocketFile,
    /// VXLAN flavour, port, family and lock.
    pub vxlan: VxlanFile,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            listen: vec!["127.0.0.1:50051".into()],
            tls: TlsFile::default(),
            insecure: false,
            connect: "qemu:///system".into(),
            queue_cap: 8,
            nic_limit: None,
            detach_timeout_ms: 30_000,
            events: true,
            host_network: HostNetwork::Auto,
            state_dir: "/run/nic-agent".into(),
            persist_dir: "/var/lib/nic-agent".into(),
            raise_bridge_mtu: false,
            keep_bridges: Vec::new(),
            forbid_promisc: Vec::new(),
            bridge_grace_s: 60,
            reconcile_interval_s: 300,
            metrics_listen: None,
            log_format: LogFormat::Text,
            socket: SocketFile::default(),
            vxlan: VxlanFile::default(),
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
    /// HOST:PORT or unix:PATH (repeatable) [default: 127.0.0.1:50051].
    #[arg(long)]
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
    /// Wait for libvirt's device-removed event on detach (true), or poll
    /// the live XML (false) [default: true].
    #[arg(long, value_name = "BOOL")]
    pub events: Option<bool>,
    /// Host networking management [default: auto].
    #[arg(long, value_enum)]
    pub host_network: Option<HostNetwork>,
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
    /// A client identity (certificate CN or DNS SAN) allowed to call
    /// (repeatable). Without any, every client the CA signed may call.
    #[arg(long = "allow-client")]
    pub allow_clients: Vec<String>,
    /// Allow plaintext gRPC on a non-loopback TCP address.
    #[arg(long)]
    pub insecure: bool,
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
        set(&mut self.events, &o.events);
        set(&mut self.host_network, &o.host_network);
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
        self.insecure |= o.insecure;
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

/// TLS files and the client allow-list, all present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA for client certificates (PEM).
    pub client_ca: PathBuf,
    /// Allowed client identities; empty allows any CA-signed client.
    pub allow_clients: Vec<String>,
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
    /// Whether detach waits on libvirt events.
    pub events: bool,
    /// Host networking management.
    pub host_network: HostNetwork,
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
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Unix socket ownership.
    pub socket: SocketSettings,
    /// How VXLAN devices are made.
    pub vxlan: VxlanSettings,
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
                if !t.allow_clients.is_empty() {
                    return Err(invalid(
                        "tls.allow_clients",
                        "needs TLS: set tls.cert, tls.key and tls.client_ca \
                         (--tls-cert/--tls-key/--tls-client-ca)",
                    ));
                }
                None
            }
            (Some(cert), Some(key), Some(ca)) => Some(TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
                allow_clients: t.allow_clients.clone(),
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
        if tls
            .as_ref()
            .is_some_and(|t| t.allow_clients.iter().any(|c| c.is_empty()))
        {
            return Err(invalid(
                "tls.allow_clients",
                "an empty name matches no client",
            ));
        }

        // Plaintext gRPC lets anyone who can reach the port attach NICs to
        // any VM on the host. Loopback stays allowed (the lab, a local
        // management proxy); anything else needs TLS or an explicit opt-out.
        if tls.is_none() && !f.insecure {
            for l in &listen {
                if let Listen::Tcp(a) = l {
                    if !a.ip().is_loopback() {
                        return Err(invalid(
                            "listen",
                            format!(
                                "refusing plaintext gRPC on non-loopback {a}: configure TLS \
                                 (--tls-cert, --tls-key, --tls-client-ca) or pass --insecure \
                                 (insecure = true) to accept unauthenticated clients"
                            ),
                        ));
                    }
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
        for (key, dir) in [("state_dir", &f.state_dir), ("persist_dir", &f.persist_dir)] {
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

        Ok(Settings {
            listen,
            tls,
            insecure: f.insecure,
            connect: f.connect,
            queue_cap: f.queue_cap,
            nic_limit: f.nic_limit,
            detach_timeout: Duration::from_millis(f.detach_timeout_ms),
            events: f.events,
            host_network: f.host_network,
            state_dir: f.state_dir,
            persist_dir: f.persist_dir,
            bridge_grace: Duration::from_secs(f.bridge_grace_s),
            reconcile_interval: (f.reconcile_interval_s > 0)
                .then(|| Duration::from_secs(f.reconcile_interval_s)),
            raise_bridge_mtu: f.raise_bridge_mtu,
            keep_bridges: f.keep_bridges,
            forbid_promisc: f.forbid_promisc,
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
            vec![Listen::Tcp("127.0.0.1:50051".parse().unwrap())]
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
    fn plaintext_loopback_ok_but_wildcard_needs_insecure() {
        let ok = parse("listen = [\"127.0.0.1:1\", \"[::1]:2\", \"unix:/tmp/x\"]").unwrap();
        assert!(Settings::try_from(ok).is_ok());
        let bad = parse("listen = [\"0.0.0.0:1\"]").unwrap();
        let e = Settings::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("--insecure"), "{e}");
        let opt_out = parse("listen = [\"0.0.0.0:1\"]\ninsecure = true").unwrap();
        assert!(Settings::try_from(opt_out).is_ok());
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
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("queue_cap = 0", "queue_cap"),
            ("detach_timeout_ms = 0", "detach_timeout_ms"),
            ("detach_timeout_ms = 300001", "detach_timeout_ms"),
            ("metrics_listen = \"nowhere\"", "metrics_listen"),
            ("keep_bridges = [\"a b@\"]", "keep_bridges"),
            ("state_dir = \"rel\"", "state_dir"),
            ("listen = []", "listen"),
            ("[vxlan]\nport = 0", "vxlan.port"),
            ("[vxlan]\nlock_file = \"x.lock\"", "vxlan.lock_file"),
        ] {
            let e = Settings::try_from(parse(text).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }
}
