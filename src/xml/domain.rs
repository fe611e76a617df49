//! STUB until the domain reader lands.
#![allow(missing_docs)]
use crate::pci::PciAddress;
#[derive(Debug, thiserror::Error)]
#[error("bad xml")]
pub struct DomainXmlError;
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MachineFamily {
    Pc,
    Q35,
}
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct BandwidthView {
    pub average: Option<u64>,
    pub peak: Option<u64>,
    pub burst: Option<u64>,
}
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct InterfaceView {
    pub kind: String,
    pub mac: Option<String>,
    pub source: Option<String>,
    pub target: Option<String>,
    pub alias: Option<String>,
    pub model: Option<String>,
    pub driver: Option<String>,
    pub queues: Option<u32>,
    pub mtu: Option<u32>,
    pub link: Option<String>,
    pub vlan: Option<u32>,
    pub virtualport: Option<String>,
    pub interface_id: Option<String>,
    pub inbound: Option<BandwidthView>,
    pub outbound: Option<BandwidthView>,
    pub acpi_index: Option<u32>,
    pub pci: Option<PciAddress>,
}
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PciUse {
    pub address: PciAddress,
    pub device: String,
}
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct DomainView {
    pub name: String,
    pub uuid: String,
    pub domain_type: String,
    pub vcpus: u32,
    pub machine: String,
    pub interfaces: Vec<InterfaceView>,
    pub pci_in_use: Vec<PciUse>,
}
impl DomainView {
    pub fn parse(_xml: &str) -> Result<Self, DomainXmlError> {
        Err(DomainXmlError)
    }
    pub fn family(&self) -> MachineFamily {
        MachineFamily::Pc
    }
    pub fn interface_by_mac(&self, mac: &str) -> Vec<&InterfaceView> {
        self.interfaces
            .iter()
            .filter(|i| {
                i.mac
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(mac))
            })
            .collect()
    }
}
