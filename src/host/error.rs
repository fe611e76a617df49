//! The host module's error type and its coarse classification.

use super::mtu::MtuError;

/// How the API layer should report a [`HostError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostErrorKind {
    /// A named bridge or link does not exist (gRPC `NOT_FOUND`).
    NotFound,
    /// The host cannot do this as configured (gRPC `FAILED_PRECONDITION`).
    FailedPrecondition,
    /// A host service the request needs is down; retrying later can work
    /// (gRPC `UNAVAILABLE`).
    Unavailable,
    /// Anything else (gRPC `INTERNAL`).
    Internal,
}

/// Errors from host-side networking.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A bridge or link the request names does not exist.
    #[error("{what} {name} not found{hint}")]
    NotFound {
        /// "bridge", "link", "OVS bridge".
        what: &'static str,
        /// Its name.
        name: String,
        /// What to do about it (may be empty; starts with "; ").
        hint: String,
    },
    /// A link exists with the name the agent needs, but is not what it needs.
    #[error("{name} exists but is a {found}, not a {wanted}; rename or remove it")]
    NameConflict {
        /// The link name.
        name: String,
        /// Kind found ("veth", "unknown", ...).
        found: String,
        /// Kind required.
        wanted: &'static str,
    },
    /// A VLAN was requested but the label bridge has no physical port.
    #[error(
        "bridge {bridge} has no physical port (a NIC, bond, team or VLAN device; a veth only \
         where there is none) to carry VLAN {vlan}; enslave the uplink NIC to {bridge}"
    )]
    NoPhysicalPort {
        /// The label bridge.
        bridge: String,
        /// The VLAN requested.
        vlan: u16,
    },
    /// The running kernel lacks a feature (classified by EOPNOTSUPP).
    #[error("{op} failed: this kernel has no {feature} support; load the module or use a kernel built with it")]
    KernelFeatureMissing {
        /// What was attempted ("create VLAN device eth0.100").
        op: String,
        /// The missing feature ("802.1Q VLAN (8021q)").
        feature: &'static str,
    },
    /// The segment cannot be built on this switch type.
    #[error("{0}")]
    Unsupported(String),
    /// The MTU does not fit.
    #[error(transparent)]
    Mtu(#[from] MtuError),
    /// A netlink request failed for another reason.
    #[error("netlink: {op}: {source}")]
    Netlink {
        /// What was attempted.
        op: String,
        /// The netlink error; errno via [`HostError::errno`].
        #[source]
        source: rtnetlink::Error,
    },
    /// ovs-vsctl failed.
    #[error("ovs-vsctl {args}: {detail}")]
    Ovs {
        /// Arguments, space-joined, for the log.
        args: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// ovsdb-server does not answer, so no OVS change can be made now.
    #[error("Open vSwitch is not answering (ovs-vsctl {args}: {detail}); start ovsdb-server and ovs-vswitchd, then retry")]
    OvsUnavailable {
        /// Arguments of the command that failed, space-joined.
        args: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// A tap or bridge name (read back from libvirt's XML) that is not a
    /// plain kernel interface name, so it is not handed to a tool.
    #[error("{what} name {name:?} is not a plain interface name (1-15 of A-Z a-z 0-9 _ . -, not starting with -); refusing to pass it to Open vSwitch")]
    UnsafeName {
        /// "tap" or "bridge".
        what: &'static str,
        /// The name, cut to 64 characters.
        name: String,
    },
    /// Local I/O (state file, spawning a tool) failed.
    #[error("{op}: {source}")]
    Io {
        /// What was attempted.
        op: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A shared host object is locked by another process (the libvirt hook)
    /// for longer than a request waits.
    #[error("{0}")]
    Busy(String),
    /// A segment device exists with the agent's name but is built
    /// differently from what this host is configured for (another port,
    /// group or underlay). Never fixed silently: NICs on it would stop
    /// reaching the other hosts, or never have.
    #[error("{device} {differences}; {fix}")]
    SegmentMismatch {
        /// The device (`vxlan1001`).
        device: String,
        /// The differences, `; `-joined ("uses UDP port 4789, this host is
        /// configured for 8472").
        differences: String,
        /// What fixes it (the command to run).
        fix: String,
    },
    /// CloudStack's VXLAN lock stayed taken for the whole wait.
    #[error(
        "VXLAN lock {path} is held by another process (cloudstack-agent's modifyvxlan.sh?) \
         for more than {waited:?}; retry, or look for a stuck script holding it"
    )]
    LockBusy {
        /// The lock file.
        path: String,
        /// How long the agent waited.
        waited: std::time::Duration,
    },
    /// A write under /proc/sys failed (disabling IPv6 on a new device).
    #[error("cannot write {path}: {source}{hint}")]
    Sysctl {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
        /// What to do (may be empty; starts with "; ").
        hint: String,
    },
    /// Internal invariant broken (a generated name did not validate, ...).
    #[error("internal: {0}")]
    Internal(String),
}

impl HostError {
    /// Coarse class for mapping to a status code.
    pub fn kind(&self) -> HostErrorKind {
        match self {
            HostError::NotFound { .. } => HostErrorKind::NotFound,
            HostError::NameConflict { .. }
            | HostError::NoPhysicalPort { .. }
            | HostError::KernelFeatureMissing { .. }
            | HostError::Unsupported(_)
            | HostError::SegmentMismatch { .. }
            | HostError::UnsafeName { .. }
            | HostError::Mtu(_) => HostErrorKind::FailedPrecondition,
            // A read-only /proc/sys is the service's sandbox, which the
            // operator must change; anything else there is unexpected.
            HostError::Sysctl { source, .. } => match source.kind() {
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                    HostErrorKind::FailedPrecondition
                }
                _ => HostErrorKind::Internal,
            },
            HostError::OvsUnavailable { .. } | HostError::LockBusy { .. } | HostError::Busy(_) => {
                HostErrorKind::Unavailable
            }
            HostError::Netlink { .. }
            | HostError::Ovs { .. }
            | HostError::Io { .. }
            | HostError::Internal(_) => HostErrorKind::Internal,
        }
    }

    /// The positive errno of a netlink failure, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HostError::Netlink { source, .. } => netlink_errno(source),
            _ => None,
        }
    }
}

/// Positive errno carried by a netlink error message.
pub(crate) fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().saturating_abs()),
        _ => None,
    }
}
