//! Prometheus metrics: request counts and latencies by operation and gRPC
//! code, libvirt connectivity, libvirt API calls by function, libvirt
//! events received, the live-XML reads detach made to poll for an unplug,
//! and how many bridges IDS NICs hold in promiscuous mode. Served as text on `GET /metrics` when
//! `metrics_listen` is set.
//!
//! The registry is process-wide: request outcomes are recorded where the
//! service finishes a request, and the agent runs one service per process.
//!
//! A scrape never calls libvirt: the values that need it are refreshed by a
//! background task every `limits.metrics_refresh_ms`, so a scraper (or many)
//! cannot turn into libvirt load, and a slow libvirtd never makes a scrape
//! slow. The endpoint also caps its connections and gives each client
//! `limits.metrics_header_timeout_ms` to send its request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tonic::Code;

use crate::hotplug::{Hotplug, IDS_ALIAS_PREFIX};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpCode {
    op: String,
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Api {
    api: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Event {
    event: String,
}

type HistogramFamily = Family<Op, Histogram, fn() -> Histogram>;

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<OpCode, Counter>,
    durations: HistogramFamily,
    libvirt_connected: Gauge,
    ids_bridges: Gauge,
    libvirt_calls: Family<Api, Counter>,
    libvirt_events: Family<Event, Counter>,
    detach_poll_reads: Counter,
}

fn duration_histogram() -> Histogram {
    // 5 ms .. ~41 s: listing is milliseconds, a detach may wait for the
    // guest for its whole timeout.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<OpCode, Counter>::default();
        let durations: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let libvirt_connected = Gauge::default();
        let ids_bridges = Gauge::default();
        registry.register(
            "nic_agent_requests",
            "gRPC requests finished, by operation and gRPC code",
            requests.clone(),
        );
        registry.register(
            "nic_agent_request_duration_seconds",
            "Time to finish a gRPC request, by operation",
            durations.clone(),
        );
        registry.register(
            "nic_agent_libvirt_connected",
            "1 while the libvirt connection is alive",
            libvirt_connected.clone(),
        );
        registry.register(
            "nic_agent_ids_promiscuous_bridges",
            "Bridges with at least one live IDS (promiscuous) NIC",
            ids_bridges.clone(),
        );
        let libvirt_calls = Family::<Api, Counter>::default();
        let libvirt_events = Family::<Event, Counter>::default();
        let detach_poll_reads = Counter::default();
        registry.register(
            "nic_agent_libvirt_calls",
            "libvirt API calls made (every virConnect*/virDomain* call, lookups included), by C function",
            libvirt_calls.clone(),
        );
        registry.register(
            "nic_agent_libvirt_events",
            "libvirt events received (device-removed, device-removal-failed, lifecycle, resubscribed)",
            libvirt_events.clone(),
        );
        registry.register(
            "nic_agent_detach_poll_reads",
            "Live XML reads made to see whether an unplugged NIC is gone; none while events flow",
            detach_poll_reads.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
            libvirt_connected,
            ids_bridges,
            libvirt_calls,
            libvirt_events,
            detach_poll_reads,
        }
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

pub use super::status::code_name;

impl Metrics {
    /// Records one finished request.
    pub fn record(&self, op: &str, code: Code, elapsed: Duration) {
        self.requests
            .get_or_create(&OpCode {
                op: op.to_string(),
                code: code_name(code).to_string(),
            })
            .inc();
        self.durations
            .get_or_create(&Op { op: op.to_string() })
            .observe(elapsed.as_secs_f64());
    }

    /// Sets the libvirt connectivity gauge.
    pub fn set_libvirt_connected(&self, up: bool) {
        self.libvirt_connected.set(i64::from(up));
    }

    /// Sets the IDS bridge gauge.
    pub fn set_ids_bridges(&self, n: usize) {
        self.ids_bridges.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Brings the counters kept outside the registry (by the hypervisor
    /// and the detach wait, which know nothing of Prometheus) up to date.
    fn sync_counters(&self) {
        fn catch_up(c: &Counter, total: u64) {
            let now = c.get();
            if total > now {
                c.inc_by(total - now);
            }
        }
        for (api, n) in crate::hypervisor::calls::calls() {
            catch_up(
                &self.libvirt_calls.get_or_create(&Api {
                    api: api.to_string(),
                }),
                n,
            );
        }
        for (event, n) in crate::hypervisor::calls::events() {
            catch_up(
                &self.libvirt_events.get_or_create(&Event {
                    event: event.to_string(),
                }),
                n,
            );
        }
        catch_up(&self.detach_poll_reads, crate::hotplug::detach_poll_reads());
    }

    /// The exposition text (OpenMetrics, which Prometheus reads).
    pub fn render(&self) -> String {
        self.sync_counters();
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Counts bridges that hold at least one live `ua-ids-` NIC, from
/// libvirt's state (the same source the IDS refcount uses).
pub async fn count_ids_bridges(hotplug: &Hotplug) -> Result<usize, crate::hotplug::HotplugError> {
    let mut bridges = std::collections::BTreeSet::new();
    for vm in hotplug.list_vms().await? {
        if vm.state != "running" && vm.state != "paused" {
            continue;
        }
        let nics = match hotplug.list_nics(&vm.uuid).await {
            Ok(n) => n,
            // Gone between the two reads.
            Err(crate::hotplug::HotplugError::VmNotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        for n in nics {
            if n.in_live && n.alias.starts_with(IDS_ALIAS_PREFIX) && !n.bridge.is_empty() {
                bridges.insert(n.bridge);
            }
        }
    }
    Ok(bridges.len())
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long one background refresh waits for libvirt before keeping the
/// last IDS value.
const IDS_REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a metrics connection may live: one request and its answer.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

/// Refreshes the libvirt-derived gauges every `period`, until dropped.
async fn refresh(hotplug: Arc<Hotplug>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::time::timeout(IDS_REFRESH_TIMEOUT, count_ids_bridges(&hotplug)).await {
            Ok(Ok(n)) => global().set_ids_bridges(n),
            Ok(Err(e)) => tracing::debug!(error = %e, "IDS bridge count unavailable"),
            Err(_) => tracing::debug!("IDS bridge count timed out"),
        }
    }
}

async fn respond(req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, ctype: &str, body: String| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
        if let Ok(v) = ctype.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(404, "text/plain", "not found; try /metrics\n".into());
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(405, "text/plain", "GET only\n".into());
    }
    reply(200, CONTENT_TYPE, global().render())
}

/// Binds the metrics listener. Separate from [`serve`] so start-up can
/// report every bound address before announcing readiness.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hotplug: Arc<Hotplug>,
    limits: &crate::config::Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let refresher = tokio::spawn(refresh(hotplug, limits.metrics_refresh));
    let _stop_refresh = AbortOnDrop(refresher);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.metrics_connections));
    let header_timeout = limits.metrics_header_timeout;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Over the limit the connection is closed at once: a scraper
        // retries at its next interval, and a flood costs one accept each.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics connection limit reached; closing");
            drop(stream);
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
            let svc =
                hyper::service::service_fn(
                    |req| async move { Ok::<_, Infallible>(respond(req).await) },
                );
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                // One request per connection: an idle keep-alive connection
                // would hold a slot for nothing.
                .keep_alive(false)
                .serve_connection(io, svc);
            match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection ended"),
                Err(_) => tracing::debug!(%peer, "metrics connection took too long; closed"),
            }
        });
    }
}

/// Aborts the background refresh when the endpoint stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_show_up_with_code_names_and_histogram() {
        let m = Metrics::default();
        m.record("attach", Code::Ok, Duration::from_millis(3));
        m.record("attach", Code::InvalidArgument, Duration::from_millis(1));
        m.record("attach", Code::InvalidArgument, Duration::from_millis(1));
        m.set_libvirt_connected(true);
        let t = m.render();
        assert!(
            t.contains(r#"nic_agent_requests_total{op="attach",code="INVALID_ARGUMENT"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"nic_agent_requests_total{op="attach",code="OK"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"nic_agent_request_duration_seconds_count{op="attach"} 3"#),
            "{t}"
        );
        assert!(t.contains("nic_agent_libvirt_connected 1"), "{t}");
        assert!(t.contains("nic_agent_ids_promiscuous_bridges 0"), "{t}");
        assert!(t.contains("nic_agent_detach_poll_reads_total"), "{t}");
    }

    #[test]
    fn libvirt_calls_are_exported_by_function() {
        crate::hypervisor::calls::count("virDomainGetXMLDesc");
        let m = Metrics::default();
        let t = m.render();
        assert!(
            t.contains(r#"nic_agent_libvirt_calls_total{api="virDomainGetXMLDesc"}"#),
            "{t}"
        );
        // Rendering twice does not count twice.
        let before = crate::hypervisor::calls::calls();
        let again = m.render();
        let n = before
            .iter()
            .find(|(a, _)| *a == "virDomainGetXMLDesc")
            .map(|(_, n)| *n)
            .unwrap_or(0);
        assert!(
            again.contains(&format!(
                "nic_agent_libvirt_calls_total{{api=\"virDomainGetXMLDesc\"}} {n}"
            )),
            "{again}"
        );
    }
}
