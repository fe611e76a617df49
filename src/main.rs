//! The `nic-agent` binary: parses flags, starts logging, hands over to the
//! library.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nic_agent::api::server::{self, Listen};
use nic_agent::cli::{client, offline, Cli, Command, HostNetwork, LogFormat, ServeArgs};
use nic_agent::hotplug::{Hotplug, HotplugConfig};
use nic_agent::hypervisor::libvirt::Libvirt;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No ANSI colours when stderr is a pipe or the journal.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let listen: Listen = a.listen.parse().map_err(anyhow::Error::msg)?;
    let uri = a.connect.clone();
    let hv = tokio::task::spawn_blocking(move || Libvirt::connect(&uri)).await??;
    let manage_host = match a.host_network {
        HostNetwork::On => true,
        HostNetwork::Off => false,
        HostNetwork::Auto => !a.connect.starts_with("test:"),
    };
    let host = if manage_host {
        let h = nic_agent::host::NetlinkHost::new(nic_agent::host::HostConfig {
            state_dir: a.state_dir.clone(),
            raise_bridge_mtu: a.raise_bridge_mtu,
            ..nic_agent::host::HostConfig::default()
        })?;
        Some(Arc::new(h) as Arc<dyn nic_agent::host::HostNet>)
    } else {
        None
    };
    tracing::info!(uri = %a.connect, host_network = manage_host, "connected to libvirt");
    let cfg = HotplugConfig {
        queue_cap: a.queue_cap,
        nic_limit: a.nic_limit,
        detach_timeout: Duration::from_millis(a.detach_timeout_ms),
        raise_bridge_mtu: a.raise_bridge_mtu,
        keep_bridges: a.keep_bridges.clone(),
        forbid_promisc: a.forbid_promisc.clone(),
        ..HotplugConfig::default()
    };
    let hotplug = Arc::new(Hotplug::new(Arc::new(hv), host, cfg));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    server::serve(hotplug, listen, shutdown).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out: Result<String, String> = rt.block_on(async {
        match cli.command {
            Command::Serve(a) => serve(a)
                .await
                .map(|_| String::new())
                .map_err(|e| format!("{e:#}")),
            Command::Render(a) => offline::render(&a).map(|s| s + "\n"),
            Command::Inspect(a) => offline::inspect(&a),
            Command::Vms(a) => client::vms(&a).await.map_err(|e| e.to_string()),
            Command::List(a) => client::list(&a).await.map_err(|e| e.to_string()),
            Command::Attach(a) => client::attach(&a).await.map_err(|e| e.to_string()),
            Command::Detach(a) => client::detach(&a).await.map_err(|e| e.to_string()),
            Command::Capacity(a) => client::capacity(&a).await.map_err(|e| e.to_string()),
        }
    });
    match out {
        Ok(s) => {
            print!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
