//! nic-agent: hot-plugs NICs into libvirt domains on a KVM host, the way a
//! CloudStack-style cloud needs them, and reports what libvirt really did.
//!
//! The crate is a library with a thin binary on top. Each module owns one role:
//!
//! - [`nic`]: the validated request model (newtypes built only through `TryFrom`).
//! - [`xml`]: the `<interface>` writer and a read-only view of a domain's XML.
//! - [`pci`]: pure PCI hot-plug slot accounting.
//! - [`hypervisor`]: the `Hypervisor` trait and its libvirt implementation.
//! - [`host`]: host-side networking (bridges, VLAN, VXLAN, OVS, promiscuous mode).
//! - [`hotplug`]: attach/detach as transactions with undo steps.
//! - [`doctor`]: the read-only diagnosis of one NIC's path.
//! - [`guest`]: the guest-side configuration renderer (pure).
//! - [`lifecycle`]: the host side following the VM (libvirt hook, reconcile).
//! - [`api`]: the tonic gRPC service; proto types stop at `api::convert`.
//! - [`cli`]: the command-line client and offline tools.
//! - [`config`]: the configuration file merged with `serve` flags.

pub mod api;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod guest;
pub mod host;
pub mod hotplug;
pub mod hypervisor;
pub mod lifecycle;
pub mod nic;
pub mod pci;
pub mod xml;
