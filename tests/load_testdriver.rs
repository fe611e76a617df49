//! Load on one agent (the real binary on libvirt's test driver): 16
//! concurrent gRPC clients, each with its own connection, run 1000 mixed
//! operations each, after a warm-up of 1000 operations.
//!
//! Asserts:
//! - every answer's code is the one code its operation must return (table
//!   below);
//! - a new MAC is attached (`already_present = false`), a retry of the same
//!   spec is idempotent (`already_present = true`);
//! - at the end each VM has exactly its NICs from before plus one per
//!   successful distinct attach, each of those MACs exactly once;
//! - the agent's RSS (VmRSS) after the 16,000 operations of the run is at
//!   most 10 % above its RSS after the warm-up: memory stays flat rather
//!   than growing with the request count. The test driver keeps every
//!   attached NIC (about 100 in the run) in the agent's memory, so a little
//!   growth is real: measured +3 % (43.8 to 45.1 MiB, debug build).
//!
//! The numbers (time, ops/s, RSS, code counts) are printed for the record.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;
use nic_agent::api::pb;
use nic_agent::api::pb::nic_agent_client::NicAgentClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::Code;

const CLIENTS: u8 = 16;
const OPS_PER_CLIENT: usize = 1000;
const WARMUP_OPS: usize = 1000;
/// Allowed RSS growth from the end of the warm-up to the end of the run, in
/// per cent of the RSS after the warm-up.
const RSS_GROWTH_PERCENT: u64 = 10;

/// Running VMs of the lab node that take hot-plugged NICs.
const ATTACHABLE: [&str; 4] = ["i-2-10-VM", "i-2-12-VM", "i-3-20-VM", "r-4-VM"];
/// Every lab VM (for list/capacity).
const ALL_VMS: [&str; 6] = [
    "i-2-10-VM",
    "i-2-11-VM",
    "i-2-12-VM",
    "i-3-20-VM",
    "r-4-VM",
    "i-2-99-VM",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Op {
    /// Attach a MAC this client never used before.
    AttachNew,
    /// Re-send one of this client's earlier attaches, unchanged.
    ReAttach,
    ListNics,
    ListVms,
    Capacity,
    /// An attach with an out-of-range field.
    InvalidAttach,
    /// Detach of a MAC nobody attached.
    DetachAbsent,
    /// Attach to the stopped VM: the test driver cannot edit a persistent
    /// definition.
    AttachStopped,
    /// Attach to the running VM whose bus 0 has no free slot.
    AttachFull,
}

/// The one code each operation must return. Anything else fails the test.
fn expected(op: Op) -> Code {
    match op {
        Op::AttachNew | Op::ReAttach => Code::Ok,
        Op::ListNics | Op::ListVms | Op::Capacity => Code::Ok,
        Op::InvalidAttach => Code::InvalidArgument,
        Op::DetachAbsent => Code::Ok,
        Op::AttachStopped => Code::Unimplemented,
        Op::AttachFull => Code::ResourceExhausted,
    }
}

/// The mix, in per mille. New attaches are few on purpose: every NIC stays
/// in the test driver's domains, and each later operation on that VM reads
/// and parses its whole XML, so the NIC count (not the request count) sets
/// the run time (measured: a debug-built agent spends about 70% of its CPU
/// in XML parsing under this load).
fn pick_op(rng: &mut StdRng) -> Op {
    match rng.gen_range(0..1000) {
        0..=4 => Op::AttachNew,
        5..=249 => Op::ReAttach,
        250..=449 => Op::ListNics,
        450..=549 => Op::ListVms,
        550..=699 => Op::Capacity,
        700..=799 => Op::InvalidAttach,
        800..=899 => Op::DetachAbsent,
        900..=949 => Op::AttachStopped,
        _ => Op::AttachFull,
    }
}

/// What one client did.
#[derive(Default)]
struct Report {
    codes: BTreeMap<(Op, String), usize>,
    /// Total latency per operation kind.
    latency: BTreeMap<Op, Duration>,
    violations: Vec<String>,
    /// (vm, mac) of every successful new attach.
    attached: Vec<(String, String)>,
}

fn spec_for(vm: &str, mac: &str) -> pb::NicSpec {
    let mut n = nic(mac, "cloudbr0");
    if vm == "i-3-20-VM" {
        // An OVS NIC with a VLAN tag for variety.
        n.bridge = "br-ovs0".into();
        n.switch_type = pb::SwitchType::OpenVswitch as i32;
        n.broadcast_uri = "vlan://200".into();
    }
    n
}

async fn connect(addr: &str) -> NicAgentClient<Channel> {
    NicAgentClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// Runs `ops` operations as client `id`; `phase` keeps MACs of the warm-up
/// and of the main run apart.
async fn client_run(addr: String, phase: u8, id: u8, ops: usize) -> Report {
    let mut c = connect(&addr).await;
    let mut rng = StdRng::seed_from_u64(u64::from(phase) << 8 | u64::from(id));
    let mut report = Report::default();
    let mut mine: Vec<(String, pb::NicSpec)> = Vec::new();
    let mut next_mac = 0u16;
    for i in 0..ops {
        let mut op = pick_op(&mut rng);
        if op == Op::ReAttach && mine.is_empty() {
            op = Op::AttachNew;
        }
        let vm = ALL_VMS[rng.gen_range(0..ALL_VMS.len())];
        let started = Instant::now();
        let result: Result<Option<pb::AttachNicResponse>, tonic::Status> = match op {
            Op::AttachNew => {
                let vm = ATTACHABLE[rng.gen_range(0..ATTACHABLE.len())];
                let [hi, lo] = next_mac.to_be_bytes();
                next_mac += 1;
                let mac = format!("02:{phase:02x}:{id:02x}:{hi:02x}:{lo:02x}:01");
                let spec = spec_for(vm, &mac);
                let r = c
                    .attach_nic(pb::AttachNicRequest {
                        vm: vm.into(),
                        nic: Some(spec.clone()),
                        request_id: format!("load-{phase}-{id}-{i}"),
                    })
                    .await
                    .map(|r| Some(r.into_inner()));
                if let Ok(Some(resp)) = &r {
                    if resp.already_present {
                        report
                            .violations
                            .push(format!("{vm} {mac}: new attach says already_present"));
                    }
                    mine.push((vm.to_string(), spec));
                    report.attached.push((vm.to_string(), mac));
                }
                r
            }
            Op::ReAttach => {
                let (vm, spec) = mine[rng.gen_range(0..mine.len())].clone();
                let r = c
                    .attach_nic(pb::AttachNicRequest {
                        vm: vm.clone(),
                        nic: Some(spec.clone()),
                        request_id: String::new(),
                    })
                    .await
                    .map(|r| Some(r.into_inner()));
                if let Ok(Some(resp)) = &r {
                    if !resp.already_present {
                        report.violations.push(format!(
                            "{vm} {}: retry not idempotent (already_present = false)",
                            spec.mac
                        ));
                    }
                }
                r
            }
            Op::ListNics => c
                .list_nics(pb::ListNicsRequest { vm: vm.into() })
                .await
                .map(|_| None),
            Op::ListVms => c.list_vms(pb::ListVmsRequest {}).await.map(|r| {
                let n = r.into_inner().vms.len();
                if n != ALL_VMS.len() {
                    report.violations.push(format!("list_vms gave {n} VMs"));
                }
                None
            }),
            Op::Capacity => c
                .get_pci_capacity(pb::GetPciCapacityRequest { vm: vm.into() })
                .await
                .map(|_| None),
            Op::InvalidAttach => {
                let mut spec = nic(&format!("02:ef:{id:02x}:00:00:{:02x}", i % 256), "cloudbr0");
                match i % 3 {
                    0 => spec.vlan = Some(4096),
                    1 => spec.mtu = Some(67),
                    _ => spec.mac = "ff:ff:ff:ff:ff:ff".into(),
                }
                c.attach_nic(pb::AttachNicRequest {
                    vm: ATTACHABLE[i % ATTACHABLE.len()].into(),
                    nic: Some(spec),
                    request_id: String::new(),
                })
                .await
                .map(|_| None)
            }
            Op::DetachAbsent => c
                .detach_nic(pb::DetachNicRequest {
                    vm: ATTACHABLE[i % ATTACHABLE.len()].into(),
                    mac: format!("02:ee:{id:02x}:00:{:02x}:{:02x}", i / 256, i % 256),
                    alias: String::new(),
                    timeout_ms: 1000,
                    request_id: String::new(),
                    keep_bridge: false,
                })
                .await
                .map(|r| {
                    let st = r.into_inner().state;
                    if st != pb::DetachState::AlreadyAbsent as i32 {
                        report
                            .violations
                            .push(format!("detach of an absent MAC gave state {st}"));
                    }
                    None
                }),
            Op::AttachStopped | Op::AttachFull => {
                let vm = if op == Op::AttachStopped {
                    "i-2-11-VM"
                } else {
                    "i-2-99-VM"
                };
                c.attach_nic(pb::AttachNicRequest {
                    vm: vm.into(),
                    nic: Some(nic(
                        &format!("02:ed:{id:02x}:00:{:02x}:{:02x}", i / 256, i % 256),
                        "cloudbr0",
                    )),
                    request_id: String::new(),
                })
                .await
                .map(|_| None)
            }
        };
        *report.latency.entry(op).or_default() += started.elapsed();
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        if code != expected(op) {
            let msg = result
                .err()
                .map(|e| e.message().to_string())
                .unwrap_or_default();
            report.violations.push(format!(
                "client {id} op {i} {op:?}: {code:?}, want {:?}: {msg}",
                expected(op)
            ));
        }
        *report.codes.entry((op, format!("{code:?}"))).or_default() += 1;
    }
    report
}

/// Runs `clients` clients concurrently, `ops` operations each.
async fn run_phase(addr: &str, phase: u8, clients: u8, ops: usize) -> Vec<Report> {
    let tasks: Vec<_> = (0..clients)
        .map(|id| tokio::spawn(client_run(addr.to_string(), phase, id, ops)))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task panicked"));
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_clients_thousand_mixed_ops_keep_codes_counts_and_flat_rss() {
    // Warnings only: info logging would print 34,000 lines here.
    let agent = start_agent_with_env(&lab_uri(), &[], &[("RUST_LOG", "warn")]);
    let pid = agent.child.id();
    let mut c = connect(&agent.addr).await;
    let mut initial = HashMap::new();
    for vm in ATTACHABLE {
        initial.insert(vm, nics(&mut c, vm).await.len());
    }
    let rss_start = rss_kib(pid);

    // Warm-up: 1000 operations spread over the 16 clients.
    let t0 = Instant::now();
    let per_client = WARMUP_OPS.div_ceil(usize::from(CLIENTS));
    let mut reports = run_phase(&agent.addr, 1, CLIENTS, per_client).await;
    let warm_time = t0.elapsed();
    let rss_warm = rss_kib(pid);

    // The measured run: 16 clients x 1000 operations.
    let t1 = Instant::now();
    reports.extend(run_phase(&agent.addr, 2, CLIENTS, OPS_PER_CLIENT).await);
    let run_time = t1.elapsed();
    // Let the runtime release per-connection buffers of finished clients.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_end = rss_kib(pid);
    let rss_bound = rss_warm + rss_warm * RSS_GROWTH_PERCENT / 100;

    let mut codes: BTreeMap<(Op, String), usize> = BTreeMap::new();
    let mut latency: BTreeMap<Op, Duration> = BTreeMap::new();
    let mut violations = Vec::new();
    let mut attached: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in reports {
        for (k, v) in r.codes {
            *codes.entry(k).or_default() += v;
        }
        for (k, v) in r.latency {
            *latency.entry(k).or_default() += v;
        }
        violations.extend(r.violations);
        for (vm, mac) in r.attached {
            attached.entry(vm).or_default().push(mac);
        }
    }

    // Final NIC lists: before + one per successful distinct attach.
    let mut count_errors = Vec::new();
    for vm in ATTACHABLE {
        let list = nics(&mut c, vm).await;
        let mine = attached.get(vm).map_or(&[][..], Vec::as_slice);
        let want = initial[vm] + mine.len();
        if list.len() != want {
            count_errors.push(format!(
                "{vm}: {} NICs, want {} before + {} attached = {want}",
                list.len(),
                initial[vm],
                mine.len()
            ));
        }
        for mac in mine {
            let n = list.iter().filter(|n| &n.mac == mac).count();
            if n != 1 {
                count_errors.push(format!("{vm}: MAC {mac} present {n} times"));
            }
        }
    }

    let total_ops: usize = codes.values().sum();
    eprintln!("\nload: {CLIENTS} clients; warm-up {} ops in {warm_time:.2?}; run {} ops in {run_time:.2?} ({:.0} ops/s)",
        usize::from(CLIENTS) * per_client,
        usize::from(CLIENTS) * OPS_PER_CLIENT,
        (usize::from(CLIENTS) * OPS_PER_CLIENT) as f64 / run_time.as_secs_f64());
    eprintln!(
        "load: agent RSS start {rss_start} KiB, after warm-up {rss_warm} KiB, after run {rss_end} KiB (bound {} KiB)",
        rss_bound
    );
    eprintln!(
        "{:<14} {:<20} {:>6} {:>12}",
        "op", "code", "count", "mean ms"
    );
    for ((op, code), n) in &codes {
        let all: usize = codes
            .iter()
            .filter(|((o, _), _)| o == op)
            .map(|(_, n)| n)
            .sum();
        let mean = latency[op].as_secs_f64() * 1000.0 / all as f64;
        eprintln!("{:<14} {code:<20} {n:>6} {mean:>12.1}", format!("{op:?}"));
    }
    for vm in ATTACHABLE {
        eprintln!(
            "load: {vm}: {} NICs before, {} attached",
            initial[vm],
            attached.get(vm).map_or(0, Vec::len)
        );
    }
    eprintln!("load: {total_ops} ops in total");

    assert_eq!(
        total_ops,
        usize::from(CLIENTS) * (per_client + OPS_PER_CLIENT)
    );
    assert!(
        violations.is_empty(),
        "{} violations, first ones:\n{}",
        violations.len(),
        violations[..violations.len().min(20)].join("\n")
    );
    assert!(count_errors.is_empty(), "{}", count_errors.join("\n"));
    // Every kind of operation ran, so the code table covers them all.
    for op in [
        Op::AttachNew,
        Op::ReAttach,
        Op::ListNics,
        Op::ListVms,
        Op::Capacity,
        Op::InvalidAttach,
        Op::DetachAbsent,
        Op::AttachStopped,
        Op::AttachFull,
    ] {
        assert!(codes.keys().any(|(o, _)| *o == op), "{op:?} never ran");
    }
    assert!(
        rss_end <= rss_bound,
        "agent RSS grew from {rss_warm} KiB after warm-up to {rss_end} KiB, \
         more than {RSS_GROWTH_PERCENT} %"
    );
}
