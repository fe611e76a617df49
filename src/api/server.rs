//! Serving: the NicAgent service plus `grpc.health.v1` and server
//! reflection, on TCP or a unix socket.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::pb;
use super::service::NicAgentService;
use crate::hotplug::Hotplug;

/// Largest request accepted. A NicSpec is a few hundred bytes; anything
/// near this is hostile.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

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

const SERVICE_NAME: &str = "nicagent.v1.NicAgent";

/// Runs the server until `shutdown` resolves. Prints one line
/// `nic-agent listening on ADDR` on stdout once the socket is bound, so
/// scripts and tests can wait for it.
pub async fn serve(
    hotplug: Arc<Hotplug>,
    listen: Listen,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let svc = pb::nic_agent_server::NicAgentServer::new(NicAgentService::new(hotplug.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);

    // Health follows the libvirt connection: SERVING only while it is
    // alive. The check reconnects after a libvirtd restart.
    let hv = hotplug.hypervisor().clone();
    let watcher = tokio::spawn(async move {
        let mut last: Option<bool> = None;
        loop {
            let h = hv.clone();
            let alive = tokio::task::spawn_blocking(move || h.is_alive())
                .await
                .unwrap_or(false);
            if last != Some(alive) {
                let st = if alive {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", st).await;
                reporter.set_service_status(SERVICE_NAME, st).await;
                if alive {
                    tracing::info!("libvirt connection alive: SERVING");
                } else {
                    tracing::warn!("libvirt connection down: NOT_SERVING");
                }
                last = Some(alive);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });

    let router = Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(svc);
    let result = match listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            println!("nic-agent listening on {}", l.local_addr()?);
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(l), shutdown)
                .await
        }
        Listen::Unix(path) => {
            if path.exists() {
                std::fs::remove_file(&path)?;
            }
            let l = tokio::net::UnixListener::bind(&path)?;
            println!("nic-agent listening on unix:{}", path.display());
            let r = router
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                .await;
            let _ = std::fs::remove_file(&path);
            r
        }
    };
    watcher.abort();
    result.map_err(Into::into)
}
