//! A catalogue of hostile requests, each with the gRPC code the agent must
//! answer, sent to the real agent running with `--host-network on` inside a
//! private network namespace (on the libvirt test driver's lab node).
//!
//! After every request the test asserts that nothing changed: the NIC list
//! of every lab VM (ListVms + ListNics) and the namespace's links (`ip -o
//! link`: names, flags such as PROMISC, MTU, master). The first request is a
//! valid attach, which must change exactly one NIC list: that proves the
//! snapshot comparison can see a change. At the end a table of input → code
//! is printed for the record.
//!
//! Needs root (network namespaces), like the agent itself.

mod common;

use std::collections::BTreeMap;

use common::netns::Netns;
use common::*;
use nic_agent::api::pb;
use nic_agent::api::pb::nic_agent_client::NicAgentClient;
use tonic::transport::Channel;
use tonic::Code;

const VM: &str = "i-2-10-VM";
/// The NIC attached before the catalogue runs; request-id cases re-send it.
const BASE_MAC: &str = "02:00:0d:00:01:01";
const BASE_ALIAS: &str = "ua-base";

/// One request of the catalogue.
enum Req {
    Attach(pb::AttachNicRequest),
    /// An attach with an `x-request-id` metadata header.
    AttachWithHeader(pb::AttachNicRequest, &'static str),
    Detach(pb::DetachNicRequest),
    ListNics(&'static str),
    Capacity(String),
}

struct Case {
    name: &'static str,
    req: Req,
    want: Code,
}

/// A valid NIC on the label bridge with a MAC of its own, so that a request
/// that is wrongly accepted shows up as a new NIC.
fn fresh(n: u8) -> pb::NicSpec {
    nic(&format!("02:00:0d:00:02:{n:02x}"), "cloudbr1")
}

fn attach_req(vm: &str, nic: pb::NicSpec) -> pb::AttachNicRequest {
    pb::AttachNicRequest {
        vm: vm.into(),
        nic: Some(nic),
        request_id: String::new(),
    }
}

fn attach(name: &'static str, nic: pb::NicSpec, want: Code) -> Case {
    Case {
        name,
        req: Req::Attach(attach_req(VM, nic)),
        want,
    }
}

/// `fresh(n)` changed by `f`.
fn with(n: u8, f: impl FnOnce(&mut pb::NicSpec)) -> pb::NicSpec {
    let mut s = fresh(n);
    f(&mut s);
    s
}

fn detach_req(vm: &str, mac: &str, alias: &str) -> pb::DetachNicRequest {
    pb::DetachNicRequest {
        vm: vm.into(),
        mac: mac.into(),
        alias: alias.into(),
        timeout_ms: 1000,
        request_id: String::new(),
        keep_bridge: false,
    }
}

fn bw(average: u64, peak: u64, burst: u64, rate: u32) -> Option<pb::Bandwidth> {
    Some(pb::Bandwidth {
        average_kbps: average,
        peak_kbps: peak,
        burst_kb: burst,
        rate_mbps: rate,
    })
}

/// Markup that would break out of an XML attribute in either quote style.
const INJECT: &str = "x'/><source bridge=\"evil\"/><x a='&amp;&#0;";
/// A request id made of everything that breaks logs, headers and markup.
const HOSTILE_RID: &str = "<rid a='1'>\"&amp;\n\r\t\u{0}\u{7f}%s%n{}$(id)`id`;--\u{202e}";

fn catalogue() -> Vec<Case> {
    use Code::*;
    let big = "b".repeat(100 * 1024);
    let under_limit = "b".repeat(60 * 1024);
    let long_alias = format!("ua-{}", "a".repeat(100 * 1024));
    let mut n = 0u8;
    let mut next = || {
        n += 1;
        n
    };
    vec![
        // ---- mac ----
        attach(
            "mac multicast",
            nic("03:00:0d:00:02:00", "cloudbr1"),
            InvalidArgument,
        ),
        attach(
            "mac all-zero",
            nic("00:00:00:00:00:00", "cloudbr1"),
            InvalidArgument,
        ),
        attach(
            "mac broadcast",
            nic("ff:ff:ff:ff:ff:ff", "cloudbr1"),
            InvalidArgument,
        ),
        attach(
            "mac garbage",
            nic("zz:zz:zz:zz:zz:zz", "cloudbr1"),
            InvalidArgument,
        ),
        attach(
            "mac too long",
            nic("02:00:0d:00:02:00:01", "cloudbr1"),
            InvalidArgument,
        ),
        attach(
            "mac mixed separators",
            nic("02:00-0d:00:02:00", "cloudbr1"),
            InvalidArgument,
        ),
        attach(
            "mac with newline",
            nic("02:00:0d:00:02:00\n", "cloudbr1"),
            InvalidArgument,
        ),
        attach(
            "mac markup injection",
            nic(&format!("02:00:0d:00:02:00{INJECT}"), "cloudbr1"),
            InvalidArgument,
        ),
        attach("mac empty", nic("", "cloudbr1"), InvalidArgument),
        // ---- bridge ----
        attach(
            "bridge 16 bytes",
            with(next(), |s| s.bridge = "abcdefghijklmnop".into()),
            InvalidArgument,
        ),
        attach(
            "bridge with slash",
            with(next(), |s| s.bridge = "cloud/br1".into()),
            InvalidArgument,
        ),
        attach(
            "bridge path traversal",
            with(next(), |s| s.bridge = "..".into()),
            InvalidArgument,
        ),
        attach(
            "bridge markup injection",
            with(next(), |s| s.bridge = format!("cloudbr1{INJECT}")),
            InvalidArgument,
        ),
        attach(
            "bridge with space",
            with(next(), |s| s.bridge = "cloud br1".into()),
            InvalidArgument,
        ),
        attach(
            "bridge empty",
            with(next(), |s| s.bridge.clear()),
            InvalidArgument,
        ),
        attach(
            "bridge unknown",
            with(next(), |s| s.bridge = "cloudbr9".into()),
            NotFound,
        ),
        attach(
            "bridge 60 KiB (under the size limit)",
            with(next(), |s| s.bridge = under_limit.clone()),
            InvalidArgument,
        ),
        attach(
            "bridge 100 KiB (over the 64 KiB limit)",
            with(next(), |s| s.bridge = big.clone()),
            OutOfRange,
        ),
        // Under the request limit, a rejected value must not be echoed in
        // full: a 60 KiB grpc-message header breaks the client's HTTP/2.
        attach(
            "mac 60 KiB",
            with(next(), |s| s.mac = under_limit.clone()),
            InvalidArgument,
        ),
        attach(
            "alias 60 KiB",
            with(next(), |s| s.alias = format!("ua-{under_limit}")),
            InvalidArgument,
        ),
        attach(
            "model 60 KiB",
            with(next(), |s| s.model = under_limit.clone()),
            InvalidArgument,
        ),
        attach(
            "vhost 60 KiB",
            with(next(), |s| s.vhost = under_limit.clone()),
            InvalidArgument,
        ),
        attach(
            "broadcast_uri 60 KiB",
            with(next(), |s| {
                s.broadcast_uri = format!("vlan://{under_limit}")
            }),
            InvalidArgument,
        ),
        attach(
            "interface_id 60 KiB",
            with(next(), |s| {
                s.switch_type = pb::SwitchType::OpenVswitch as i32;
                s.interface_id = under_limit.clone();
            }),
            InvalidArgument,
        ),
        // ---- alias ----
        attach(
            "alias markup injection",
            with(next(), |s| s.alias = format!("ua-{INJECT}")),
            InvalidArgument,
        ),
        attach(
            "alias without ua- prefix",
            with(next(), |s| s.alias = "net0".into()),
            InvalidArgument,
        ),
        attach(
            "alias 65 characters",
            with(next(), |s| s.alias = format!("ua-{}", "a".repeat(62))),
            InvalidArgument,
        ),
        attach(
            "alias 100 KiB (over the limit)",
            with(next(), |s| s.alias = long_alias),
            OutOfRange,
        ),
        // ---- model / vhost ----
        attach(
            "model markup injection",
            with(next(), |s| s.model = format!("virtio{INJECT}")),
            InvalidArgument,
        ),
        attach(
            "model unknown",
            with(next(), |s| s.model = "ne2k_pci".into()),
            InvalidArgument,
        ),
        attach(
            "model e1000 with mtu",
            with(next(), |s| {
                s.model = "e1000".into();
                s.mtu = Some(1400);
            }),
            InvalidArgument,
        ),
        attach(
            "vhost markup injection",
            with(next(), |s| s.vhost = format!("on{INJECT}")),
            InvalidArgument,
        ),
        attach(
            "vhost unknown",
            with(next(), |s| s.vhost = "maybe".into()),
            InvalidArgument,
        ),
        // ---- broadcast_uri ----
        attach(
            "broadcast_uri markup injection",
            with(next(), |s| s.broadcast_uri = format!("vlan://100{INJECT}")),
            InvalidArgument,
        ),
        attach(
            "broadcast_uri vlan://0",
            with(next(), |s| s.broadcast_uri = "vlan://0".into()),
            InvalidArgument,
        ),
        attach(
            "broadcast_uri vxlan://0",
            with(next(), |s| s.broadcast_uri = "vxlan://0".into()),
            InvalidArgument,
        ),
        attach(
            "broadcast_uri file scheme",
            with(next(), |s| s.broadcast_uri = "file:///etc/passwd".into()),
            InvalidArgument,
        ),
        // ---- interface_id ----
        attach(
            "interface_id markup injection",
            with(next(), |s| {
                s.switch_type = pb::SwitchType::OpenVswitch as i32;
                s.interface_id = INJECT.into();
            }),
            InvalidArgument,
        ),
        attach(
            "interface_id nil uuid",
            with(next(), |s| {
                s.switch_type = pb::SwitchType::OpenVswitch as i32;
                s.interface_id = "00000000-0000-0000-0000-000000000000".into();
            }),
            InvalidArgument,
        ),
        attach(
            "interface_id on a linux bridge",
            with(next(), |s| {
                s.interface_id = "3f2b6c1e-8d4a-4f57-9c2e-1a2b3c4d5e6f".into();
            }),
            InvalidArgument,
        ),
        // ---- vlan / vni ----
        attach(
            "vlan 0",
            with(next(), |s| s.vlan = Some(0)),
            InvalidArgument,
        ),
        attach(
            "vlan 4095",
            with(next(), |s| s.vlan = Some(4095)),
            InvalidArgument,
        ),
        attach(
            "vlan 4096",
            with(next(), |s| s.vlan = Some(4096)),
            InvalidArgument,
        ),
        attach("vni 0", with(next(), |s| s.vni = Some(0)), InvalidArgument),
        attach(
            "vni 16777216",
            with(next(), |s| s.vni = Some(16_777_216)),
            InvalidArgument,
        ),
        attach(
            "vlan and vni together",
            with(next(), |s| {
                s.vlan = Some(100);
                s.vni = Some(5000);
            }),
            InvalidArgument,
        ),
        attach(
            "vlan field disagrees with broadcast_uri",
            with(next(), |s| {
                s.vlan = Some(100);
                s.broadcast_uri = "vlan://200".into();
            }),
            InvalidArgument,
        ),
        attach(
            "vxlan on ovs",
            with(next(), |s| {
                s.switch_type = pb::SwitchType::OpenVswitch as i32;
                s.vni = Some(5000);
            }),
            InvalidArgument,
        ),
        // ---- mtu / queues ----
        attach("mtu 0", with(next(), |s| s.mtu = Some(0)), InvalidArgument),
        attach(
            "mtu 67",
            with(next(), |s| s.mtu = Some(67)),
            InvalidArgument,
        ),
        attach(
            "mtu 65536",
            with(next(), |s| s.mtu = Some(65_536)),
            InvalidArgument,
        ),
        attach(
            "mtu 9000 above the 1500 bridge",
            with(next(), |s| s.mtu = Some(9000)),
            FailedPrecondition,
        ),
        attach(
            "vxlan mtu 1500 without room for 50 bytes",
            with(next(), |s| {
                s.broadcast_uri = "vxlan://5100".into();
                s.mtu = Some(1500);
            }),
            FailedPrecondition,
        ),
        attach(
            "queues 0",
            with(next(), |s| s.queues = Some(0)),
            InvalidArgument,
        ),
        attach(
            "queues 257",
            with(next(), |s| s.queues = Some(257)),
            InvalidArgument,
        ),
        attach(
            "queues 3 above the vm's 2 vCPUs",
            with(next(), |s| s.queues = Some(3)),
            InvalidArgument,
        ),
        // ---- enums ----
        attach(
            "switch_type -1",
            with(next(), |s| s.switch_type = -1),
            InvalidArgument,
        ),
        attach(
            "switch_type 7",
            with(next(), |s| s.switch_type = 7),
            InvalidArgument,
        ),
        // ---- bandwidth ----
        attach(
            "rate_mbps with average_kbps",
            with(next(), |s| s.inbound = bw(1000, 0, 0, 10)),
            InvalidArgument,
        ),
        attach(
            "rate_mbps with peak_kbps",
            with(next(), |s| s.outbound = bw(0, 1000, 0, 10)),
            InvalidArgument,
        ),
        attach(
            "peak below average",
            with(next(), |s| s.inbound = bw(1000, 500, 0, 0)),
            InvalidArgument,
        ),
        attach(
            "burst without average",
            with(next(), |s| s.outbound = bw(0, 0, 64, 0)),
            InvalidArgument,
        ),
        attach(
            "rate_mbps u32::MAX",
            with(next(), |s| s.inbound = bw(0, 0, 0, u32::MAX)),
            InvalidArgument,
        ),
        attach(
            "average above u32 KB/s",
            with(next(), |s| s.inbound = bw(u64::from(u32::MAX) + 1, 0, 0, 0)),
            InvalidArgument,
        ),
        // ---- pci_slot / acpi_index ----
        attach(
            "pci_slot 0",
            with(next(), |s| s.pci_slot = Some(0)),
            InvalidArgument,
        ),
        attach(
            "pci_slot 32",
            with(next(), |s| s.pci_slot = Some(32)),
            InvalidArgument,
        ),
        attach(
            "pci_slot 3 taken by a NIC",
            with(next(), |s| s.pci_slot = Some(3)),
            FailedPrecondition,
        ),
        attach(
            "acpi_index 0",
            with(next(), |s| s.acpi_index = Some(0)),
            InvalidArgument,
        ),
        attach(
            "acpi_index 16384",
            with(next(), |s| s.acpi_index = Some(16_384)),
            InvalidArgument,
        ),
        // ---- tx_queue_len ----
        attach(
            "tx_queue_len 0",
            with(next(), |s| s.tx_queue_len = Some(0)),
            InvalidArgument,
        ),
        attach(
            "tx_queue_len 100001",
            with(next(), |s| s.tx_queue_len = Some(100_001)),
            InvalidArgument,
        ),
        // A valid value, but the test driver makes no host taps to set it
        // on: refused before libvirt or the host is touched.
        attach(
            "tx_queue_len where libvirt makes no taps",
            with(next(), |s| s.tx_queue_len = Some(5000)),
            FailedPrecondition,
        ),
        // ---- IDS ----
        attach(
            "promiscuous on a forbidden bridge",
            with(next(), |s| {
                s.bridge = "cloudbr2".into();
                s.promiscuous = true;
            }),
            FailedPrecondition,
        ),
        // ---- refused by libvirt after the host side was built ----
        attach(
            "alias of another NIC, on a new vxlan bridge",
            with(next(), |s| {
                s.alias = BASE_ALIAS.into();
                s.broadcast_uri = "vxlan://5200".into();
            }),
            InvalidArgument,
        ),
        // ---- same MAC, other spec ----
        attach(
            "base mac with another mtu",
            {
                let mut s = nic(BASE_MAC, "cloudbr1");
                s.mtu = Some(1400);
                s
            },
            AlreadyExists,
        ),
        // ---- vm ----
        Case {
            name: "vm markup injection",
            req: Req::Attach(attach_req(&format!("{VM}{INJECT}"), fresh(next()))),
            want: NotFound,
        },
        Case {
            name: "vm empty",
            req: Req::Attach(attach_req("", fresh(next()))),
            want: InvalidArgument,
        },
        Case {
            name: "vm with newline",
            req: Req::Attach(attach_req(&format!("{VM}\n"), fresh(next()))),
            want: InvalidArgument,
        },
        Case {
            name: "vm 300 characters",
            req: Req::Attach(attach_req(&"v".repeat(300), fresh(next()))),
            want: InvalidArgument,
        },
        Case {
            name: "vm unknown",
            req: Req::Attach(attach_req("i-9-999-VM", fresh(next()))),
            want: NotFound,
        },
        Case {
            name: "vm unknown uuid",
            req: Req::Attach(attach_req(
                "6a1e3a6c-0000-4b6e-9a0e-2f3c4d5e6f10",
                fresh(next()),
            )),
            want: NotFound,
        },
        Case {
            name: "vm without pci room",
            req: Req::Attach(attach_req("i-2-99-VM", fresh(next()))),
            want: ResourceExhausted,
        },
        Case {
            name: "nic missing",
            req: Req::Attach(pb::AttachNicRequest {
                vm: VM.into(),
                nic: None,
                request_id: String::new(),
            }),
            want: InvalidArgument,
        },
        // ---- PlugNic fields (NicSpec 40+) ----
        attach(
            "broadcast_uri pvlan (unsupported)",
            with(next(), |s| s.broadcast_uri = "pvlan://100-i200".into()),
            InvalidArgument,
        ),
        attach(
            "nic_uuid garbage",
            with(next(), |s| s.nic_uuid = "not-a-uuid".into()),
            InvalidArgument,
        ),
        attach(
            "nic_uuid nil",
            with(next(), |s| {
                s.nic_uuid = "00000000-0000-0000-0000-000000000000".into()
            }),
            InvalidArgument,
        ),
        attach(
            "nic_uuid markup injection",
            with(next(), |s| s.nic_uuid = format!("1b4e28ba-{INJECT}")),
            InvalidArgument,
        ),
        attach(
            "nic_uuid with a different alias",
            with(next(), |s| {
                s.nic_uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427".into();
                s.alias = "ua-other".into();
            }),
            InvalidArgument,
        ),
        attach(
            "device_id 16383",
            with(next(), |s| s.device_id = Some(16383)),
            InvalidArgument,
        ),
        attach(
            "device_id disagrees with acpi_index",
            with(next(), |s| {
                s.device_id = Some(2);
                s.acpi_index = Some(9);
            }),
            InvalidArgument,
        ),
        attach(
            "ipv4_cidr without prefix",
            with(next(), |s| s.ipv4_cidr = "10.1.1.5".into()),
            InvalidArgument,
        ),
        attach(
            "ipv4_cidr prefix 33",
            with(next(), |s| s.ipv4_cidr = "10.1.1.5/33".into()),
            InvalidArgument,
        ),
        attach(
            "ipv4_gateway outside the subnet",
            with(next(), |s| {
                s.ipv4_cidr = "10.1.1.5/24".into();
                s.ipv4_gateway = "10.2.0.1".into();
            }),
            InvalidArgument,
        ),
        attach(
            "ipv4_gateway without an address",
            with(next(), |s| s.ipv4_gateway = "10.1.1.1".into()),
            InvalidArgument,
        ),
        attach(
            "ipv6_cidr multicast",
            with(next(), |s| s.ipv6_cidr = "ff02::1/64".into()),
            InvalidArgument,
        ),
        attach(
            "ipv6_cidr prefix 129",
            with(next(), |s| s.ipv6_cidr = "2001:db8::5/129".into()),
            InvalidArgument,
        ),
        attach(
            "secondary_ips markup injection",
            with(next(), |s| {
                s.secondary_ips = vec![format!("10.0.0.1{INJECT}")]
            }),
            InvalidArgument,
        ),
        attach(
            "secondary_ips duplicate",
            with(next(), |s| {
                s.secondary_ips = vec!["10.0.0.1".into(), "10.0.0.1".into()]
            }),
            InvalidArgument,
        ),
        attach(
            "secondary_ips 65 addresses",
            with(next(), |s| {
                s.secondary_ips = (1..=65).map(|i| format!("10.0.1.{i}")).collect()
            }),
            InvalidArgument,
        ),
        attach(
            "multicast_rate_mbps above the u32 KB/s bound",
            with(next(), |s| s.multicast_rate_mbps = u32::MAX),
            InvalidArgument,
        ),
        attach(
            "packed on e1000",
            with(next(), |s| {
                s.packed = true;
                s.model = "e1000".into();
            }),
            InvalidArgument,
        ),
        attach(
            "mac_policy promiscuous_mode false with promiscuous true",
            with(next(), |s| {
                s.promiscuous = true;
                s.mac_policy = Some(pb::MacPolicy {
                    promiscuous_mode: Some(false),
                    ..Default::default()
                });
            }),
            InvalidArgument,
        ),
        attach(
            "mac_policy PromiscuousMode on a forbidden bridge",
            with(next(), |s| {
                s.bridge = "cloudbr2".into();
                s.mac_policy = Some(pb::MacPolicy {
                    promiscuous_mode: Some(true),
                    ..Default::default()
                });
            }),
            FailedPrecondition,
        ),
        // ---- request id: not validated, only carried; hostile text must
        // not break the idempotent retry it rides on ----
        Case {
            name: "request_id hostile (idempotent retry)",
            req: Req::Attach(pb::AttachNicRequest {
                request_id: HOSTILE_RID.into(),
                ..attach_req(VM, nic(BASE_MAC, "cloudbr1"))
            }),
            want: Ok,
        },
        Case {
            name: "request_id 100 KiB",
            req: Req::Attach(pb::AttachNicRequest {
                request_id: big.clone(),
                ..attach_req(VM, nic(BASE_MAC, "cloudbr1"))
            }),
            want: OutOfRange,
        },
        Case {
            name: "x-request-id header markup (idempotent retry)",
            req: Req::AttachWithHeader(
                attach_req(VM, nic(BASE_MAC, "cloudbr1")),
                "<rid a='1'/>&amp;",
            ),
            want: Ok,
        },
        // ---- detach / list / capacity ----
        Case {
            name: "detach mac markup injection",
            req: Req::Detach(detach_req(VM, &format!("{BASE_MAC}{INJECT}"), "")),
            want: InvalidArgument,
        },
        Case {
            name: "detach alias markup injection",
            req: Req::Detach(detach_req(VM, BASE_MAC, &format!("ua-{INJECT}"))),
            want: InvalidArgument,
        },
        Case {
            name: "detach mac 60 KiB",
            req: Req::Detach(detach_req(VM, &under_limit, "")),
            want: InvalidArgument,
        },
        Case {
            name: "detach unknown vm",
            req: Req::Detach(detach_req("i-9-999-VM", BASE_MAC, "")),
            want: NotFound,
        },
        Case {
            name: "detach absent mac",
            req: Req::Detach(detach_req(VM, "02:00:0d:00:0f:0f", "")),
            want: Ok,
        },
        Case {
            name: "list_nics vm markup injection",
            req: Req::ListNics("i-2-10-VM'/><x"),
            want: NotFound,
        },
        Case {
            name: "capacity vm 100 KiB",
            req: Req::Capacity(big),
            want: OutOfRange,
        },
        Case {
            name: "capacity vm with NUL",
            req: Req::Capacity(format!("{VM}\u{0}")),
            want: InvalidArgument,
        },
    ]
}

/// The state no rejected request may change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    nics: BTreeMap<String, Vec<pb::Nic>>,
    links: Vec<String>,
}

async fn snapshot(c: &mut NicAgentClient<Channel>, ns: &Netns) -> Snapshot {
    let vms = c
        .list_vms(pb::ListVmsRequest {})
        .await
        .expect("list vms")
        .into_inner()
        .vms;
    let mut nics_by_vm = BTreeMap::new();
    for vm in vms {
        let list = nics(c, &vm.name).await;
        nics_by_vm.insert(vm.name, list);
    }
    Snapshot {
        nics: nics_by_vm,
        links: ns.link_lines(),
    }
}

/// What one request got back: code, the message's start (for the table),
/// the message's full length, and for attach the response.
type Outcome = (Code, String, usize, Option<pb::AttachNicResponse>);

/// Sends one request.
async fn send(c: &mut NicAgentClient<Channel>, req: &Req) -> Outcome {
    fn done<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String, usize, Option<T>) {
        match r {
            Ok(v) => (Code::Ok, String::new(), 0, Some(v.into_inner())),
            Err(e) => (
                e.code(),
                e.message().chars().take(90).collect(),
                e.message().len(),
                None,
            ),
        }
    }
    match req {
        Req::Attach(r) => done(c.attach_nic(r.clone()).await),
        Req::AttachWithHeader(r, rid) => {
            let mut request = tonic::Request::new(r.clone());
            request
                .metadata_mut()
                .insert("x-request-id", rid.parse().expect("ascii header value"));
            done(c.attach_nic(request).await)
        }
        Req::Detach(r) => {
            let (code, msg, len, _) = done(c.detach_nic(r.clone()).await);
            (code, msg, len, None)
        }
        Req::ListNics(vm) => {
            let (code, msg, len, _) =
                done(c.list_nics(pb::ListNicsRequest { vm: (*vm).into() }).await);
            (code, msg, len, None)
        }
        Req::Capacity(vm) => {
            let (code, msg, len, _) = done(
                c.get_pci_capacity(pb::GetPciCapacityRequest { vm: vm.clone() })
                    .await,
            );
            (code, msg, len, None)
        }
    }
}

/// The number of inputs the README promises: "`cargo test --test
/// catalogue`: N hostile inputs".
fn readme_catalogue_count() -> usize {
    const MARK: &str = "`cargo test --test catalogue`: ";
    let readme = include_str!("../README.md");
    let at = readme.find(MARK).expect("README names the catalogue") + MARK.len();
    let rest = &readme[at..];
    assert!(
        rest.starts_with(|c: char| c.is_ascii_digit()) && rest.contains(" hostile inputs"),
        "README: {MARK}N hostile inputs"
    );
    rest.split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number of hostile inputs in the README")
}

#[test]
fn readme_states_the_catalogue_size() {
    // Runs without root: a new case must come with the README's new count.
    assert_eq!(readme_catalogue_count(), catalogue().len());
}

#[tokio::test]
async fn hostile_inputs_get_their_codes_and_change_nothing() {
    let ns = Netns::new("cat");
    let agent = ns.agent(&["--forbid-promisc", "cloudbr2"]);
    let mut c = client(&agent).await;

    // Positive control: a valid attach is accepted and changes exactly the
    // target VM's NIC list, so the snapshot comparison below can fail.
    let before = snapshot(&mut c, &ns).await;
    let r = c
        .attach_nic(attach_req(VM, {
            let mut n = nic(BASE_MAC, "cloudbr1");
            n.alias = BASE_ALIAS.into();
            n
        }))
        .await
        .expect("valid attach")
        .into_inner();
    assert!(!r.already_present);
    let base = snapshot(&mut c, &ns).await;
    assert_ne!(
        base, before,
        "a successful attach must show in the snapshot"
    );
    assert_eq!(base.nics[VM].len(), before.nics[VM].len() + 1);
    assert_eq!(base.links, before.links, "a plain bridge NIC adds no links");
    for (vm, list) in &before.nics {
        if vm != VM {
            assert_eq!(&base.nics[vm], list, "{vm} changed");
        }
    }

    let cases = catalogue();
    assert_eq!(
        cases.len(),
        readme_catalogue_count(),
        "the README's count of catalogue inputs is not the catalogue's; update one"
    );
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for case in &cases {
        let (code, msg, full_len, resp) = send(&mut c, &case.req).await;
        let after = snapshot(&mut c, &ns).await;
        table.push((case.name, case.want, code, msg.clone()));
        if full_len > 1024 {
            failures.push(format!(
                "{}: {full_len}-byte error message echoes the input",
                case.name
            ));
        }
        if code != case.want {
            failures.push(format!(
                "{}: want {:?}, got {code:?}: {msg}",
                case.name, case.want
            ));
        }
        if after != base {
            failures.push(format!(
                "{}: state changed\n  before: {base:?}\n  after:  {after:?}",
                case.name
            ));
        }
        // An accepted request here is always the idempotent retry of the
        // base NIC: it must say so and echo the request id, bounded and with
        // control characters dropped (so it cannot forge log lines).
        if let Some(r) = resp {
            assert!(r.already_present, "{}: not an idempotent retry", case.name);
            assert_eq!(r.nic.as_ref().map(|n| n.mac.as_str()), Some(BASE_MAC));
            assert!(r.request_id.chars().count() <= 128, "{}", case.name);
            if let Req::Attach(req) = &case.req {
                let want: String = req
                    .request_id
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(128)
                    .collect();
                assert_eq!(r.request_id, want, "{}: request id not echoed", case.name);
            }
            if let Req::AttachWithHeader(_, rid) = &case.req {
                let want: String = rid.chars().filter(|c| !c.is_control()).take(128).collect();
                assert_eq!(r.request_id, want, "{}: header id not echoed", case.name);
            }
        }
    }

    eprintln!("\n{:<48} {:<20} {:<20} message", "input", "expected", "got");
    for (name, want, got, msg) in &table {
        eprintln!(
            "{name:<48} {:<20} {:<20} {msg}",
            format!("{want:?}"),
            format!("{got:?}")
        );
    }
    eprintln!("{} inputs, {} failures", table.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Hostile text in request fields must not forge log lines: the default
/// text log of a rejected request may quote a newline, never emit one.
///
/// The request span is opened before validation, so it carries the caller's
/// raw `vm`, `mac` and `request_id`; they go through `log_safe` there
/// (src/api/service.rs). Without it a vm `"x\nFORGED ..."` would print a
/// line of the caller's choosing.
#[tokio::test]
async fn hostile_fields_cannot_forge_log_lines() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_nic-agent"))
        .args([
            "serve",
            "--connect",
            &lab_uri(),
            "--listen",
            "127.0.0.1:0",
            "--insecure",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nic-agent");
    let stderr = child.stderr.take().expect("stderr");
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let stdout = child.stdout.take().expect("stdout");
    let mut addr = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(a) = line.strip_prefix("nic-agent listening on ") {
            addr = a.to_string();
            break;
        }
    }
    let agent = Agent { child, addr };
    let mut c = client(&agent).await;

    let mut by_vm = attach_req("i-9-999-VM\nFORGED vm", fresh(200));
    by_vm.request_id = "r1".into();
    let by_mac = attach_req(VM, nic("02:00:0d:00:02:c9\nFORGED mac", "cloudbr0"));
    let mut by_rid = attach_req(VM, nic("zz", "cloudbr0"));
    by_rid.request_id = "r3\nFORGED request_id".into();
    for req in [by_vm, by_mac, by_rid] {
        let e = c.attach_nic(req).await.expect_err("all three are refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    }
    drop(c);
    drop(agent);
    let lines = log.join().expect("log reader");
    assert!(
        lines.iter().any(|l| l.contains("request failed")),
        "no request log at all: {lines:?}"
    );
    let forged: Vec<&String> = lines.iter().filter(|l| l.starts_with("FORGED")).collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}");
}
