//! Serving: the NicAgent service plus `grpc.health.v1` and server
//! reflection, on any number of TCP and unix listeners, with the metrics
//! endpoint beside them.
//!
//! TCP listeners use TLS with required client certificates when it is
//! configured; unix sockets stay plaintext and are guarded by their file
//! mode and ownership instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::InterceptorLayer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::pb;
use super::service::NicAgentService;
use super::tls::{AllowList, TlsState};
use crate::config::{Limits, Listen, SocketSettings};
use crate::hotplug::Hotplug;

/// Largest request accepted. A NicSpec is a few hundred bytes; anything
/// near this is hostile.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

const SERVICE_NAME: &str = "nicagent.v1.NicAgent";

/// How long a TLS client may take to finish its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS for TCP listeners: the swappable certificates and allow-lists
/// (client certificates are always required).
#[derive(Debug, Clone)]
pub struct TlsServer {
    /// What new connections and requests are checked with; the caller
    /// keeps a clone to reload it on SIGHUP.
    pub state: TlsState,
}

/// Everything [`serve`] needs besides the engine.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// gRPC listeners.
    pub listen: Vec<Listen>,
    /// TLS for the TCP listeners; `None` serves plaintext.
    pub tls: Option<TlsServer>,
    /// Mode and ownership of unix listeners.
    pub socket: SocketSettings,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Per-connection and metrics limits.
    pub limits: Limits,
    /// Notified once, when health first has an answer (SERVING or not):
    /// start-up work that need not come before it waits for this, so it
    /// does not compete with the first answer for the host's cores.
    pub first_answer: Arc<tokio::sync::Notify>,
}

/// A server builder with the limits every listener shares: requests per
/// connection, a request deadline, and HTTP/2 keep-alive so a peer that
/// vanished (host rebooted, NAT dropped) is noticed and its slots freed.
fn builder(l: &Limits) -> Server {
    Server::builder()
        .concurrency_limit_per_connection(l.requests_per_connection)
        .timeout(l.request_timeout)
        .http2_keepalive_interval(Some(l.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(l.http2_keepalive_timeout))
}

enum Bound {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// Makes room for a unix socket at `path`: removes a stale socket left by
/// an agent that died, and nothing else. A regular file, directory or
/// symlink there is someone else's, and a socket that accepts a connection
/// belongs to a live process (another agent, most likely): both refuse
/// start-up rather than steal or destroy.
fn clear_socket_path(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating socket directory {}", dir.display()))?;
            }
            return Ok(());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("listen unix:{}", path.display()));
        }
    };
    let ft = md.file_type();
    if !ft.is_socket() {
        let kind = if ft.is_file() {
            "a regular file"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_symlink() {
            "a symlink"
        } else {
            "not a socket"
        };
        anyhow::bail!(
            "listen unix:{}: the path exists and is {kind}, not a socket; refusing to remove it. \
             Choose another path or remove it yourself",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!(
            "listen unix:{}: another process is accepting connections on this socket \
             (a running nic-agent?); stop it first or choose another path",
            path.display()
        ),
        // Nobody listens: a stale socket from an agent that did not exit
        // cleanly.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "listen unix:{}: cannot tell whether the socket is in use; remove it if it is stale",
                path.display()
            )
        }),
    }
}

/// Binds a unix socket and gives it the configured mode and owner before
/// anyone is told it exists.
fn bind_unix(path: &std::path::Path, s: &SocketSettings) -> anyhow::Result<Bound> {
    use std::os::unix::fs::PermissionsExt;
    clear_socket_path(path)?;
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding unix:{}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(s.mode.bits()))
        .with_context(|| format!("socket.mode {} on {}", s.mode, path.display()))?;
    let uid = match &s.owner {
        None => None,
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .with_context(|| format!("socket.owner: looking up user {name:?}"))?
                .with_context(|| format!("socket.owner: no user {name:?}"))?
                .uid,
        ),
    };
    let gid = match &s.group {
        None => None,
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .with_context(|| format!("socket.group: looking up group {name:?}"))?
                .with_context(|| format!("socket.group: no group {name:?}"))?
                .gid,
        ),
    };
    if uid.is_some() || gid.is_some() {
        nix::unistd::chown(path, uid, gid)
            .with_context(|| format!("chown of {}", path.display()))?;
    }
    Ok(Bound::Unix(l, path.to_path_buf()))
}

/// Tells systemd (when it started us with `Type=notify`) how we are doing.
/// Without `NOTIFY_SOCKET` this does nothing.
pub fn notify(state: sd_notify::NotifyState<'_>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Runs the servers until `shutdown` resolves. Prints one line
/// `nic-agent listening on ADDR` per listener on stdout once it is bound
/// (and `nic-agent metrics on ADDR` for the metrics endpoint), then tells
/// systemd READY=1: scripts, tests and the service manager can all wait
/// for it. The caller has already connected to libvirt.
pub async fn serve(
    hotplug: Arc<Hotplug>,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Reflection in both versions: grpcurl and tonic speak v1, while
    // Python's grpcio-reflection, grpc_cli and older grpcurl speak only
    // v1alpha and would get UNIMPLEMENTED without it.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1()?;
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;
    let svc = pb::nic_agent_server::NicAgentServer::new(NicAgentService::new(hotplug.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);

    // Bind everything first, so one bad address fails start-up before any
    // listener is announced.
    let mut bound = Vec::with_capacity(opts.listen.len());
    for l in &opts.listen {
        bound.push(match l {
            Listen::Tcp(addr) => Bound::Tcp(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?,
            ),
            Listen::Unix(path) => bind_unix(path, &opts.socket)?,
        });
    }
    let metrics = match opts.metrics_listen {
        Some(a) => Some(
            super::metrics::bind(a)
                .await
                .with_context(|| format!("binding metrics_listen {a}"))?,
        ),
        None => None,
    };

    // Health follows libvirt: SERVING only while a real round trip
    // answers within PROBE_DEADLINE (a stuck libvirtd is NOT_SERVING within
    // a few seconds, not only a dead connection). The probe also reconnects
    // after a libvirtd restart, which re-subscribes the events.
    let prober = super::health::Prober::start(
        hotplug.hypervisor().clone(),
        super::health::PROBE_EVERY,
        super::health::PROBE_DEADLINE,
    );
    let first_answer = opts.first_answer.clone();
    let watcher = tokio::spawn(async move {
        let mut last: Option<bool> = None;
        loop {
            let Some(alive) = prober.serving() else {
                // No answer yet from the first probe: SERVING follows it
                // at once (start-up is timed to it).
                prober.wait_answer(Duration::from_millis(100)).await;
                continue;
            };
            super::metrics::global().set_libvirt_connected(alive);
            if last != Some(alive) {
                let st = if alive {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", st).await;
                reporter.set_service_status(SERVICE_NAME, st).await;
                if alive {
                    tracing::info!("libvirt answers: SERVING");
                } else {
                    tracing::warn!("libvirt does not answer: NOT_SERVING");
                }
                if last.is_none() {
                    first_answer.notify_one();
                }
                last = Some(alive);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });

    // One shutdown signal fanned out to every server.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_on_failure = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        notify(sd_notify::NotifyState::Stopping);
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>> = Vec::new();
    for b in bound {
        let (health, reflection, reflection_v1alpha, svc) = (
            health.clone(),
            reflection.clone(),
            reflection_v1alpha.clone(),
            svc.clone(),
        );
        let stop = stopped();
        match b {
            Bound::Tcp(l) => {
                let addr = l.local_addr()?;
                // tonic applies TCP keep-alive only to listeners it binds itself,
                // so it is set on the incoming stream here.
                let incoming = TcpIncoming::from(l)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(opts.limits.tcp_keepalive));
                match &opts.tls {
                    Some(t) => {
                        let incoming =
                            super::tls::incoming(incoming, t.state.clone(), TLS_HANDSHAKE_TIMEOUT);
                        let router = builder(&opts.limits)
                            .layer(InterceptorLayer::new(AllowList::new(t.state.clone())))
                            .add_service(health)
                            .add_service(reflection)
                            .add_service(reflection_v1alpha)
                            .add_service(svc);
                        tracing::info!(%addr, "gRPC over TLS, client certificates required");
                        tasks.push(tokio::spawn(async move {
                            router
                                .serve_with_incoming_shutdown(incoming, stop)
                                .await
                                .map_err(Into::into)
                        }));
                    }
                    None => {
                        let router = builder(&opts.limits)
                            .add_service(health)
                            .add_service(reflection)
                            .add_service(reflection_v1alpha)
                            .add_service(svc);
                        tracing::warn!(%addr, "plaintext gRPC without authentication (insecure = true)");
                        tasks.push(tokio::spawn(async move {
                            router
                                .serve_with_incoming_shutdown(incoming, stop)
                                .await
                                .map_err(Into::into)
                        }));
                    }
                }
                println!("nic-agent listening on {addr}");
            }
            Bound::Unix(l, path) => {
                let router = builder(&opts.limits)
                    .add_service(health)
                    .add_service(reflection)
                    .add_service(reflection_v1alpha)
                    .add_service(svc);
                println!("nic-agent listening on unix:{}", path.display());
                tasks.push(tokio::spawn(async move {
                    let r = router
                        .serve_with_incoming_shutdown(UnixListenerStream::new(l), stop)
                        .await;
                    let _ = std::fs::remove_file(&path);
                    r.map_err(Into::into)
                }));
            }
        }
    }
    if let Some(l) = metrics {
        println!("nic-agent metrics on {}", l.local_addr()?);
        let h = hotplug.clone();
        let stop = stopped();
        let limits = opts.limits.clone();
        tasks.push(tokio::spawn(async move {
            super::metrics::serve(l, h, &limits, stop).await;
            Ok(())
        }));
    }
    // Every listener is bound and announced and libvirt is connected: the
    // service is ready.
    notify(sd_notify::NotifyState::Ready);

    // If one listener fails, stop them all: a half-serving agent would hide
    // the failure from systemd and from the operator.
    let mut set = tokio::task::JoinSet::new();
    for t in tasks {
        set.spawn(async move {
            match t.await {
                Ok(r) => r,
                Err(e) => Err(anyhow::anyhow!("server task failed: {e}")),
            }
        });
    }
    let mut result = Ok(());
    while let Some(r) = set.join_next().await {
        let r = r.unwrap_or_else(|e| Err(anyhow::anyhow!("server task failed: {e}")));
        if let Err(e) = r {
            tracing::error!(error = %e, "a listener failed; stopping the agent");
            let _ = stop_on_failure.send(true);
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    watcher.abort();
    result
}
