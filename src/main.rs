//! The `nic-agent` binary: parses flags, starts logging, hands over to the
//! library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nic_agent::api::server::{self, ServeOptions, TlsServer};
use nic_agent::api::tls::{self, TlsMaterial, TlsState};
use nic_agent::cli::{
    client, offline, Cli, Command, ConfigCommand, HostNetwork, LogFormat, ServeArgs,
};
use nic_agent::config::{AntiSpoofing, FileConfig, Overrides, Settings};
use nic_agent::hotplug::{Hotplug, HotplugConfig};
use nic_agent::hypervisor::libvirt::{Libvirt, LibvirtOptions};
use nic_agent::hypervisor::Hypervisor;

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

/// Defaults, then the file, then the flags.
fn load_settings(a: &ServeArgs, log_format: Option<LogFormat>) -> anyhow::Result<Settings> {
    let mut merged = FileConfig::load(a.config.as_deref())?.merge(&a.overrides);
    if let Some(f) = log_format {
        merged.log_format = f;
    }
    Ok(Settings::try_from(merged)?)
}

fn tls_server(s: &Settings) -> anyhow::Result<Option<TlsServer>> {
    let Some(t) = &s.tls else { return Ok(None) };
    if t.allow_any_client {
        tracing::warn!("tls.allow_any_client = true: every client the CA signed may call");
    }
    Ok(Some(TlsServer {
        state: TlsState::new(TlsMaterial::load(t)?),
    }))
}

/// SIGHUP: reads the configuration again and swaps the TLS certificates
/// and allow-lists. Nothing else is reloaded (listeners, libvirt and the
/// hot-plug policy are fixed for the process's life), so other changes
/// are only reported. A configuration that fails to load keeps the old
/// one in force.
fn reload(
    config: Option<&std::path::Path>,
    overrides: &Overrides,
    running: &Settings,
    tls: Option<&TlsState>,
) -> anyhow::Result<&'static str> {
    let mut merged = FileConfig::load(config)?.merge(overrides);
    merged.log_format = running.log_format;
    let new = Settings::try_from(merged)?;
    let outcome = match (tls, &new.tls) {
        (Some(state), Some(t)) => {
            state.replace(TlsMaterial::load(t)?);
            "TLS certificates and client allow-lists reloaded"
        }
        (Some(_), None) => anyhow::bail!(
            "the new configuration turns TLS off; that needs a restart, the old TLS setup stays"
        ),
        (None, Some(_)) => {
            anyhow::bail!("TLS was off at start; turning it on needs a restart, nothing reloaded")
        }
        (None, None) => "TLS is off: nothing to reload",
    };
    let without_tls = |s: &Settings| Settings {
        tls: None,
        ..s.clone()
    };
    if without_tls(&new) != without_tls(running) {
        tracing::warn!("keys other than [tls] changed; they take effect at the next restart");
    }
    Ok(outcome)
}

/// `config check FILE`: the file alone, as `serve --config FILE` would
/// read it, including the TLS files it names.
fn config_check(file: &std::path::Path) -> anyhow::Result<String> {
    let s = Settings::try_from(FileConfig::load(Some(file))?)?;
    if let Some(t) = &s.tls {
        tls::server_config(t)?;
    }
    Ok("ok\n".into())
}

fn config_dirs(file: &std::path::Path) -> anyhow::Result<String> {
    let s = Settings::try_from(FileConfig::load(Some(file))?)?;
    let mut out = String::new();
    for w in s.written_dirs() {
        let need = if w.required { "required" } else { "if-exists" };
        out.push_str(&format!("{}\t{}\t{need}\n", w.dir.display(), w.key));
    }
    Ok(out)
}

async fn serve(s: Settings, config: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<()> {
    // TLS files are checked before libvirt is touched: a typo in a path
    // should not wait for a connection to fail.
    let tls = tls_server(&s)?;
    let uri = s.connect.clone();
    let opts = LibvirtOptions {
        events: s.events,
        connections: s.limits.libvirt_connections,
    };
    let hv = tokio::task::spawn_blocking(move || Libvirt::connect_with(&uri, opts)).await??;
    let manage_host = match s.host_network {
        HostNetwork::On => true,
        HostNetwork::Off => false,
        HostNetwork::Auto => !s.connect.starts_with("test:"),
    };
    let host = if manage_host {
        let h = nic_agent::host::NetlinkHost::new(s.host_config())?;
        Some(Arc::new(h) as Arc<dyn nic_agent::host::HostNet>)
    } else {
        None
    };
    tracing::info!(uri = %s.connect, host_network = manage_host, events = hv.events().is_some(), connections = hv.connections(), "connected to libvirt");
    // Wherever taps are real (also with --host-network off): libvirt
    // shapes them with tc. The test driver has no taps and shapes nothing.
    // Probed once health has answered (below), or by the first request
    // that needs it.
    let tc = if !s.connect.starts_with("test:") {
        nic_agent::host::tc::TcProbe::lazy()
    } else {
        nic_agent::host::tc::TcProbe::default()
    };
    let cfg = HotplugConfig {
        queue_cap: s.queue_cap,
        nic_limit: s.nic_limit,
        detach_timeout: s.detach_timeout,
        unplug_retry: s.unplug_retry,
        raise_bridge_mtu: s.raise_bridge_mtu,
        keep_bridges: s.keep_bridges.clone(),
        forbid_promisc: s.forbid_promisc.clone(),
        bridge_grace: s.bridge_grace,
        allow_bridges: s.allow_bridges.clone(),
        allow_promisc_bridges: s.allow_promisc_bridges.clone(),
        vm_queue_limit: s.limits.vm_queue,
        anti_spoofing: s.anti_spoofing,
        cloudstack_sg_script: s.cloudstack_security_group_script.clone(),
        tc,
        real_taps: !s.connect.starts_with("test:"),
        ..HotplugConfig::default()
    };
    let ports_host = host.clone();
    let hotplug = Arc::new(Hotplug::new(Arc::new(hv), host, cfg));
    let sg_script = s.cloudstack_security_group_script.exists();
    let define_filter = match s.anti_spoofing {
        AntiSpoofing::Off => {
            tracing::info!("anti-spoofing off by configuration");
            false
        }
        AntiSpoofing::Auto if sg_script => {
            tracing::info!(
                script = %s.cloudstack_security_group_script.display(),
                "CloudStack security groups installed: anti-spoofing left to cloudstack-agent"
            );
            false
        }
        _ => true,
    };
    // Install the handlers now, before anything is announced: a SIGTERM
    // that arrives right after READY=1 must reach the graceful path, not
    // the default action.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    // Start-up (exec to health SERVING) waits for none of this: it runs
    // once health has its first answer, so that on a host whose cores are
    // busy with guests it does not compete with that answer (2 cores kept
    // busy by 6 other processes, median of 15 starts: 91 ms to SERVING when
    // it ran at once, 71-81 ms when it waits). The probe thread opens the
    // rest of the libvirt connection pool one probe interval later
    // (api::health). A request that comes sooner and needs a piece does it
    // itself: an attach opens its connection, defines the filter (under
    // its lock, so once) or runs the kernel probe (once, see TcProbe).
    let first_answer = Arc::new(tokio::sync::Notify::new());
    {
        let (hp, first) = (hotplug.clone(), first_answer.clone());
        let reconcile = s.reconcile_interval;
        tokio::spawn(async move {
            first.notified().await;
            // The reconcile's passes over every domain.
            if manage_host {
                tokio::spawn(nic_agent::lifecycle::reconcile::reconcile_loop(
                    hp.clone(),
                    reconcile,
                ));
            }
            // The anti-spoofing filter, so the first protected attach does
            // not pay for it; if it fails, that attach tries again and
            // refuses with the reason (missing package) rather than plug
            // unprotected.
            if define_filter {
                if let Err(e) = hp.ensure_filter().await {
                    tracing::warn!(error = %e, "anti-spoofing filter not defined; NICs asking for it are refused until it can be");
                }
            }
            // What the kernel lets libvirt shape.
            hp.config().tc.get().await;
        });
    }
    // Ports that come and go through cloudstack-agent's own plugs fire no
    // call of ours: follow them so IDS sensors keep getting every copy.
    if let Some(h) = ports_host {
        tokio::spawn(nic_agent::host::portwatch::follow_bridge_ports(h));
    }
    // SIGHUP's default action would kill the agent; here it reloads.
    let mut hup = signal(SignalKind::hangup())?;
    let tls_state = tls.as_ref().map(|t| t.state.clone());
    let running = s.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            server::notify(sd_notify::NotifyState::Reloading);
            match reload(config.as_deref(), &overrides, &running, tls_state.as_ref()) {
                Ok(what) => tracing::info!("SIGHUP: {what}"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "SIGHUP: reload refused, the old configuration stays in force")
                }
            }
            server::notify(sd_notify::NotifyState::Ready);
        }
    });
    let opts = ServeOptions {
        listen: s.listen.clone(),
        tls,
        socket: s.socket.clone(),
        metrics_listen: s.metrics_listen,
        limits: s.limits.clone(),
        first_answer,
    };
    server::serve(hotplug, opts, shutdown).await
}

/// `hook qemu ...`: libvirt's qemu hook. Reads the domain XML on stdin,
/// logs to stderr (libvirt keeps it in its log), prints nothing on stdout.
async fn hook(a: &nic_agent::cli::HookArgs) -> Result<String, String> {
    use nic_agent::lifecycle::hook::{self, Action, HookInvocation};
    let inv = HookInvocation::parse(&a.args).map_err(|e| e.to_string())?;
    if inv.action() == Action::Ignore {
        return Ok(String::new());
    }
    let overrides = nic_agent::config::Overrides {
        state_dir: a.state_dir.clone(),
        persist_dir: a.persist_dir.clone(),
        bridge_grace_s: a.bridge_grace_s,
        ..Default::default()
    };
    let run = async {
        let s = Settings::try_from(
            FileConfig::load(a.config.as_deref())
                .map_err(|e| format!("{e:#}"))?
                .merge(&overrides),
        )
        .map_err(|e| format!("{e:#}"))?;
        let mut xml = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut xml)
            .map_err(|e| format!("reading the domain XML on stdin: {e}"))?;
        let host = nic_agent::host::NetlinkHost::new(s.host_config()).map_err(|e| e.to_string())?;
        hook::run(&inv, &xml, &host, s.bridge_grace)
            .await
            .map_err(|e| e.to_string())
    };
    match run.await {
        Ok(o) => {
            for c in &o.changes {
                tracing::info!(domain = %inv.domain, op = %inv.operation, "{c}");
            }
            Ok(String::new())
        }
        // Only prepare may stop libvirt: a failing started/release must not
        // turn into a killed or half-torn-down domain.
        Err(e) if inv.action() == Action::Prepare => Err(e),
        Err(e) => {
            tracing::warn!(domain = %inv.domain, op = %inv.operation, error = %e, "hook failed; the agent's reconcile retries");
            Ok(String::new())
        }
    }
}

/// Runtime worker threads: one per core, at most this many. The agent's
/// own work per request is well under a millisecond of CPU, and every worker
/// costs a stack and, in glibc, often a malloc arena of its own: with one
/// worker per core on a 64-core host the agent's anonymous memory after a
/// storm grows several MiB for nothing.
const MAX_WORKER_THREADS: usize = 4;

/// Threads for blocking calls (every libvirt call runs on one). tokio's
/// default, 512, lets a burst of requests start dozens of threads (59 after
/// 2000 attaches from 16 clients on the test driver), each with a stack and
/// arena. libvirtd handles at most `max_client_requests` (default 5) calls
/// of one connection at a time anyway, so more threads than this only wait.
const MAX_BLOCKING_THREADS: usize = 16;

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().max_blocking_threads(MAX_BLOCKING_THREADS);
    // tokio reads TOKIO_WORKER_THREADS only when no count is set: an
    // operator's explicit choice still wins.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        b.worker_threads(cores.min(MAX_WORKER_THREADS));
    }
    b.build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` takes its log format from the config file too, so the file
    // is read before logging starts; its errors go to stderr plainly.
    let settings = match &cli.command {
        Command::Serve(a) => match load_settings(a, cli.log_format) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    init_logging(
        settings
            .as_ref()
            .map(|s| s.log_format)
            .or(cli.log_format)
            .unwrap_or_default(),
    );
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `doctor` reports its verdict through the exit status as well.
    let mut exit_status: Option<u8> = None;
    let out: Result<String, String> = rt.block_on(async {
        match cli.command {
            Command::Serve(a) => match settings {
                Some(s) => serve(s, a.config, a.overrides)
                    .await
                    .map(|_| String::new())
                    .map_err(|e| format!("{e:#}")),
                None => Err("internal: serve without settings".into()),
            },
            Command::Render(a) => offline::render(&a).map(|s| s + "\n"),
            Command::Inspect(a) => offline::inspect(&a),
            Command::Vms(a) => client::vms(&a).await.map_err(|e| e.to_string()),
            Command::List(a) => client::list(&a).await.map_err(|e| e.to_string()),
            Command::Attach(a) => client::attach(&a).await.map_err(|e| e.to_string()),
            Command::Detach(a) => client::detach(&a).await.map_err(|e| e.to_string()),
            Command::Capacity(a) => client::capacity(&a).await.map_err(|e| e.to_string()),
            Command::Config(ConfigCommand::Check { file }) => {
                config_check(&file).map_err(|e| format!("{e:#}"))
            }
            Command::Config(ConfigCommand::Dirs { file }) => {
                config_dirs(&file).map_err(|e| format!("{e:#}"))
            }
            Command::Man(a) => nic_agent::cli::write_man_pages(&a.out)
                .map(|_| format!("man pages written to {}\n", a.out.display()))
                .map_err(|e| format!("writing man pages to {}: {e}", a.out.display())),
            Command::Completions(a) => Ok(nic_agent::cli::completion_script(a.shell)),
            Command::Doctor(a) => {
                let (out, status) = client::doctor(&a).await;
                exit_status = Some(status);
                out
            }

            Command::Update(a) => client::update(&a).await.map_err(|e| e.to_string()),
            Command::Move(a) => client::move_nic(&a).await.map_err(|e| e.to_string()),
            Command::Replug(a) => client::replug(&a).await.map_err(|e| e.to_string()),
            Command::GuestConfig(a) => nic_agent::cli::guest_config::run(&a),
            Command::Hook(a) => hook(&a).await,
            Command::RepairVxlan(a) => nic_agent::cli::repair::run(&a).await,
        }
    });
    match out {
        Ok(s) => {
            print!("{s}");
            exit_status.map_or(ExitCode::SUCCESS, ExitCode::from)
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit_status.map_or(ExitCode::FAILURE, ExitCode::from)
        }
    }
}
