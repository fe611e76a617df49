//! Load generator for `bench/run.sh`: the same list of NIC attaches, sent
//! either straight to libvirt (`raw`, the limit: lookup then
//! virDomainAttachDeviceFlags LIVE in-process) or to a running nic-agent
//! over gRPC (`grpc`, a tonic client with low overhead of its own).
//!
//! Both read a jobs file (one `VM MAC` pair per line), run it with N
//! concurrent clients pulling from one shared queue, and print one JSON
//! object: latency percentiles, throughput and errors by kind. The runner
//! (`bench/bench.py`) turns these into the table.
//!
//!     cargo run --release --example bench -- raw --uri qemu:///system \
//!         --jobs jobs.txt --template nic.xml --concurrency 1
//!     cargo run --release --example bench -- grpc --server 127.0.0.1:50051 \
//!         --jobs jobs.txt --bridge lab-ebr0 --queues 2 --concurrency 8

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nic_agent::api::pb;

#[derive(Parser)]
#[command(about = "nic-agent attach benchmark client")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// File with one `VM MAC` pair per line.
    #[arg(long)]
    jobs: std::path::PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Label copied into the JSON output.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// libvirt directly: lookup by name, then attach_device_flags(LIVE).
    Raw {
        #[command(flatten)]
        common: Common,
        /// libvirt URI (one connection shared by all clients, like the agent's).
        #[arg(long)]
        uri: String,
        /// Interface XML with `{mac}` and `{alias}` placeholders.
        #[arg(long)]
        template: std::path::PathBuf,
    },
    /// nic-agent AttachNic over gRPC.
    Grpc {
        #[command(flatten)]
        common: Common,
        /// Agent address, HOST:PORT.
        #[arg(long)]
        server: String,
        /// Bridge for every NIC.
        #[arg(long)]
        bridge: String,
        /// virtio queue pairs to ask for (0: the agent's default).
        #[arg(long, default_value_t = 0)]
        queues: u32,
    },
    /// The gRPC floor: grpc.health.v1 Check over the same kind of channel,
    /// as many calls as the jobs file has lines. Health touches no libvirt
    /// and no XML, so its p50 is what transport, HTTP/2 and the two
    /// runtimes cost per call on this machine, before any agent work.
    Ping {
        #[command(flatten)]
        common: Common,
        /// Agent address, HOST:PORT.
        #[arg(long)]
        server: String,
    },
}

/// One attach: which VM, which MAC.
#[derive(Clone)]
struct Job {
    vm: String,
    mac: String,
}

fn read_jobs(path: &std::path::Path) -> anyhow::Result<Vec<Job>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut jobs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some(vm), Some(mac)) => jobs.push(Job {
                vm: vm.to_string(),
                mac: mac.to_string(),
            }),
            (None, _) => {}
            _ => anyhow::bail!("{}:{}: want `VM MAC`", path.display(), n + 1),
        }
    }
    Ok(jobs)
}

/// What every client records: latency of each success, and failures by kind.
#[derive(Default)]
struct Tally {
    ok: Vec<Duration>,
    errors: BTreeMap<String, usize>,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, r: Result<Duration, (String, String)>) {
        match r {
            Ok(d) => self.ok.push(d),
            Err((kind, msg)) => {
                *self.errors.entry(kind).or_default() += 1;
                self.first_error.get_or_insert(msg);
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank: the smallest value with at least p of the samples at or below it.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    let i = rank.min(sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(
    mode: &str,
    common: &Common,
    total: usize,
    wall: Duration,
    t: Tally,
) -> serde_json::Value {
    let mut ok = t.ok;
    ok.sort();
    let mean = if ok.is_empty() {
        0.0
    } else {
        ok.iter().map(|d| d.as_secs_f64()).sum::<f64>() * 1000.0 / ok.len() as f64
    };
    serde_json::json!({
        "mode": mode,
        "label": common.label,
        "concurrency": common.concurrency,
        "requests": total,
        "ok": ok.len(),
        "errors": t.errors,
        "first_error": t.first_error,
        "wall_s": wall.as_secs_f64(),
        "throughput_per_s": if wall.is_zero() { 0.0 } else { ok.len() as f64 / wall.as_secs_f64() },
        "p50_ms": percentile(&ok, 50.0),
        "p99_ms": percentile(&ok, 99.0),
        "mean_ms": mean,
        "max_ms": ok.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
    })
}

/// A user alias from the MAC, unique per NIC like the agent's generated ones.
fn alias_for(mac: &str) -> String {
    format!("ua-bench-{}", mac.replace(':', ""))
}

fn run_raw(common: &Common, uri: &str, template: &str) -> anyhow::Result<serde_json::Value> {
    let jobs = Arc::new(read_jobs(&common.jobs)?);
    let conn = Arc::new(
        virt::connect::Connect::open(Some(uri)).with_context(|| format!("opening {uri}"))?,
    );
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let template = Arc::new(template.to_string());
    let start = Instant::now();
    let workers: Vec<_> = (0..common.concurrency.max(1))
        .map(|_| {
            let (jobs, conn, next, tally, template) = (
                jobs.clone(),
                conn.clone(),
                next.clone(),
                tally.clone(),
                template.clone(),
            );
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let xml = template
                    .replace("{mac}", &job.mac)
                    .replace("{alias}", &alias_for(&job.mac));
                let t0 = Instant::now();
                let r = conn
                    .lookup_domain_by_name(&job.vm)
                    .and_then(|d| d.attach_device_flags(&xml, virt::sys::VIR_DOMAIN_AFFECT_LIVE))
                    .map(|_| t0.elapsed())
                    .map_err(|e| (format!("{:?}", e.code()), e.to_string()));
                if let Ok(mut t) = tally.lock() {
                    t.record(r);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let wall = start.elapsed();
    let t = std::mem::take(&mut *tally.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(report("raw", common, jobs.len(), wall, t))
}

/// Connects to `server` and makes `total` calls from `common.concurrency`
/// clients that pull call numbers from one counter; `call` makes call
/// number `i` on a clone of its client (tonic clients share one channel).
/// Times each call and reports them as `mode`.
async fn drive<C, F, Fut>(
    common: &Common,
    server: &str,
    mode: &str,
    total: usize,
    client: impl Fn(tonic::transport::Channel) -> C,
    call: F,
) -> anyhow::Result<serde_json::Value>
where
    C: Clone + Send + 'static,
    F: Fn(C, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..common.concurrency.max(1) {
        let (next, tally, call) = (next.clone(), tally.clone(), call.clone());
        let c = client(channel.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t0 = Instant::now();
                let r = call(c.clone(), i)
                    .await
                    .map(|_| t0.elapsed())
                    .map_err(|s| (format!("{:?}", s.code()), s.message().to_string()));
                if let Ok(mut t) = tally.lock() {
                    t.record(r);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = start.elapsed();
    let t = std::mem::take(&mut *tally.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(report(mode, common, total, wall, t))
}

async fn run_grpc(
    common: &Common,
    server: &str,
    bridge: &str,
    queues: u32,
) -> anyhow::Result<serde_json::Value> {
    let jobs = Arc::new(read_jobs(&common.jobs)?);
    let bridge = bridge.to_string();
    let total = jobs.len();
    let call = move |mut c: pb::nic_agent_client::NicAgentClient<_>, i: usize| {
        let job = &jobs[i];
        let req = pb::AttachNicRequest {
            vm: job.vm.clone(),
            nic: Some(pb::NicSpec {
                mac: job.mac.clone(),
                bridge: bridge.clone(),
                queues: (queues > 0).then_some(queues),
                ..Default::default()
            }),
            request_id: String::new(),
        };
        async move { c.attach_nic(req).await.map(|_| ()) }
    };
    let client = pb::nic_agent_client::NicAgentClient::new;
    drive(common, server, "agent-grpc", total, client, call).await
}

async fn run_ping(common: &Common, server: &str) -> anyhow::Result<serde_json::Value> {
    let total = read_jobs(&common.jobs)?.len();
    let call = |mut c: tonic_health::pb::health_client::HealthClient<_>, _: usize| async move {
        let req = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        c.check(req).await.map(|_| ())
    };
    let client = tonic_health::pb::health_client::HealthClient::new;
    drive(common, server, "grpc-floor", total, client, call).await
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Raw {
            common,
            uri,
            template,
        } => {
            let t = std::fs::read_to_string(&template)
                .with_context(|| format!("reading {}", template.display()))?;
            run_raw(&common, &uri, &t)?
        }
        Cmd::Grpc {
            common,
            server,
            bridge,
            queues,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run_grpc(&common, &server, &bridge, queues))?,
        Cmd::Ping { common, server } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run_ping(&common, &server))?,
    };
    println!("{out}");
    Ok(())
}
