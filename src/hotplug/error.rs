//! The hot-plug error: every way an attach or detach can fail, with messages
//! that tell the operator what to do next. `api::status` maps it to gRPC.

use crate::hypervisor::HvError;
use crate::nic::NicError;
use crate::xml::domain::DomainXmlError;

/// Why a hot-plug request failed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The request itself is malformed or out of range.
    #[error(transparent)]
    Invalid(#[from] NicError),
    /// A bad guest-config request (the GuestConfig RPC).
    #[error(transparent)]
    GuestConfig(#[from] crate::guest::GuestConfigError),
    /// A request value is out of the range this particular VM allows.
    #[error("invalid {field} {value}: allowed {allowed}")]
    OutOfRange {
        /// Proto field name.
        field: &'static str,
        /// The value given.
        value: String,
        /// The range for this VM.
        allowed: String,
    },
    /// The VM does not exist on this host.
    #[error("vm {0:?} not found on this host")]
    VmNotFound(String),
    /// No NIC with this MAC (and alias) is attached to the VM.
    #[error("no NIC {mac} in vm {vm}; list its NICs with ListNics")]
    NicNotFound {
        /// The MAC.
        mac: String,
        /// The VM.
        vm: String,
    },
    /// A move failed on the target VM and the NIC was put back on the
    /// source VM; `cause` is the target VM's error, which sets the code.
    #[error("moving NIC {mac} to {to_vm} failed, the NIC is back on {from_vm}: {cause}")]
    MovedBack {
        /// The MAC.
        mac: String,
        /// The VM the NIC was taken from and is on again.
        from_vm: String,
        /// The VM that refused it.
        to_vm: String,
        /// Why the target VM refused it.
        cause: Box<HotplugError>,
    },
    /// A replug failed and the NIC is back on its old network with its
    /// link as it was; `cause` sets the code.
    #[error("re-plugging NIC {mac} of {vm} failed, the NIC is back on {bridge} with its link {link}: {cause}")]
    ReplugRolledBack {
        /// The MAC.
        mac: String,
        /// The VM.
        vm: String,
        /// The bridge the NIC is on again.
        bridge: String,
        /// Its link state (`up` or `down`), as before the replug.
        link: String,
        /// Why the new network refused it.
        cause: Box<HotplugError>,
    },
    /// A replug's unplug (Linux bridge <-> OVS) is still pending; nothing
    /// was plugged onto the new network.
    #[error("NIC {mac} is still in {vm} after {waited_ms} ms: the guest has not released it, so it was not plugged onto the new network; its persistent definition keeps the old one, retry ReplugNic to finish")]
    ReplugPending {
        /// The MAC.
        mac: String,
        /// The VM.
        vm: String,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The MAC is already attached with a different spec.
    #[error("NIC {mac} is already attached to {vm} with a different {fields}; detach it first or repeat the same spec")]
    AlreadyExists {
        /// The MAC.
        mac: String,
        /// The VM.
        vm: String,
        /// Comma-separated names of the fields that differ.
        fields: String,
    },
    /// Too many requests already wait for this VM.
    #[error("vm {vm} has {queued} requests queued (limit {limit}); retry after they finish")]
    VmBusy {
        /// The VM.
        vm: String,
        /// Requests waiting behind the running one.
        queued: usize,
        /// The configured bound (`limits.vm_queue`).
        limit: usize,
    },
    /// No room for another device.
    #[error("{0}")]
    NoCapacity(String),
    /// The configuration does not let the agent use this bridge
    /// (`allow_bridges`), or make it promiscuous (`allow_promisc_bridges`).
    #[error("{what} {bridge} is not in {key} ({patterns}); the agent may not use it. Pick an allowed bridge, or add a pattern to {key} in the agent's configuration")]
    BridgeNotAllowed {
        /// Which bridge: "bridge" (the request's) or the one the NIC lands on.
        what: String,
        /// The bridge name.
        bridge: String,
        /// The configuration key that decided.
        key: &'static str,
        /// The patterns in force, comma-separated.
        patterns: String,
    },
    /// The VM's state or the host does not allow the change.
    #[error("{0}")]
    Precondition(String),
    /// The guest did not release the device in time; the unplug is pending.
    #[error("NIC {mac} is still in {vm} after {waited_ms} ms: the guest has not released it (paused, hung or no hot-plug support); the unplug stays pending, retry DetachNic to wait again")]
    DetachPending {
        /// The MAC.
        mac: String,
        /// The VM.
        vm: String,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The guest refused to release the device (libvirt's
    /// DEVICE_REMOVAL_FAILED): it stays attached, live and persistent.
    #[error("the guest in {vm} refused to release NIC {mac} ({alias}): it stays attached; check the guest's PCI hot-plug support, then retry DetachNic")]
    DetachRefused {
        /// The MAC.
        mac: String,
        /// The VM.
        vm: String,
        /// The device's alias.
        alias: String,
    },
    /// A move's unplug from the source VM is still pending; nothing was
    /// attached to the target.
    #[error("NIC {mac} is still in {from_vm} after {waited_ms} ms: the guest has not released it, so nothing was attached to {to_vm}; the unplug stays pending, retry MoveNic to finish the move")]
    MovePending {
        /// The MAC.
        mac: String,
        /// The source VM.
        from_vm: String,
        /// The target VM.
        to_vm: String,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The libvirt driver cannot do this at all.
    #[error("{op} is not supported by the libvirt {driver} driver")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// libvirt's driver name.
        driver: String,
    },
    /// libvirt failed.
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    /// libvirt returned XML we could not read.
    #[error("cannot read domain XML: {0}")]
    DomainXml(#[from] DomainXmlError),
    /// The host side (bridges, VLAN, VXLAN, OVS) failed.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// The NIC's MTU does not fit the bridge or the VXLAN underlay.
    #[error(transparent)]
    Mtu(#[from] crate::host::MtuError),
    /// A bug: a blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}
