//! Operations through the real binary: the Prometheus endpoint counts
//! requests by gRPC code and reports libvirt connectivity, and systemd
//! readiness (sd_notify) is sent only once the agent is listening.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{lab_uri, nic, Agent};
use nic_agent::api::pb;
use tonic::Code;

/// The agent with metrics on; returns it and the metrics address.
fn start_with_metrics() -> (Agent, String) {
    start_with_metrics_and(&[])
}

/// Like [`start_with_metrics`], with extra `serve` arguments.
fn start_with_metrics_and(extra: &[&str]) -> (Agent, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nic-agent"))
        .args([
            "serve",
            "--connect",
            &lab_uri(),
            "--listen",
            "127.0.0.1:0",
            "--insecure",
        ])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut grpc, mut metrics) = (None, None);
    while grpc.is_none() || metrics.is_none() {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("agent did not announce both addresses");
        if let Some(a) = l.strip_prefix("nic-agent listening on ") {
            grpc = Some(a.to_string());
        } else if let Some(a) = l.strip_prefix("nic-agent metrics on ") {
            metrics = Some(a.to_string());
        }
    }
    (
        Agent {
            child,
            addr: grpc.unwrap_or_default(),
        },
        metrics.unwrap_or_default(),
    )
}

/// GET `path` over plain HTTP/1.1; returns (status line, body).
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

async fn attach(
    c: &mut pb::nic_agent_client::NicAgentClient<tonic::transport::Channel>,
    n: pb::NicSpec,
) -> Result<pb::AttachNicResponse, tonic::Status> {
    c.attach_nic(pb::AttachNicRequest {
        vm: "i-2-10-VM".into(),
        nic: Some(n),
        request_id: String::new(),
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn metrics_count_requests_by_code_and_show_libvirt_connected() {
    let (agent, maddr) = start_with_metrics();

    // Before any request: no request series, libvirt up.
    let (status, before) = get(&maddr, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    assert!(!before.contains("nic_agent_requests_total{"), "{before}");

    let mut c = common::client(&agent).await;
    attach(&mut c, nic("02:00:0a:00:77:01", "cloudbr0"))
        .await
        .expect("attach ok");
    let bad = attach(&mut c, nic("not-a-mac", "cloudbr0"))
        .await
        .expect_err("bad MAC");
    assert_eq!(bad.code(), Code::InvalidArgument);

    let (_, text) = get(&maddr, "/metrics");
    for want in [
        r#"nic_agent_requests_total{op="attach",code="OK"} 1"#,
        r#"nic_agent_requests_total{op="attach",code="INVALID_ARGUMENT"} 1"#,
        r#"nic_agent_request_duration_seconds_count{op="attach"} 2"#,
        r#"nic_agent_request_duration_seconds_bucket{le="+Inf",op="attach"} 2"#,
        "nic_agent_libvirt_connected 1",
        "nic_agent_ids_promiscuous_bridges 0",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(
        text.contains("# TYPE nic_agent_request_duration_seconds histogram"),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_only_serve_the_metrics_path() {
    let (_agent, maddr) = start_with_metrics();
    let (status, _) = get(&maddr, "/");
    assert!(status.contains(" 404 "), "{status}");
}

/// Reads whatever the pipe holds right now, without waiting.
fn read_available(fd: &mut std::process::ChildStdout) -> String {
    use std::os::fd::AsFd;
    let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
    flags.insert(nix::fcntl::OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match fd.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("read stdout: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn ready_is_notified_only_after_the_listening_line_and_stopping_on_term() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let child = Command::new(env!("CARGO_BIN_EXE_nic-agent"))
        .args([
            "serve",
            "--connect",
            &lab_uri(),
            "--listen",
            "127.0.0.1:0",
            "--insecure",
        ])
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut agent = Agent {
        child,
        addr: String::new(),
    };
    let mut stdout = agent.child.stdout.take().unwrap();

    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    // The agent prints before it notifies, so the line must already be in
    // the pipe when READY=1 arrives.
    let printed = read_available(&mut stdout);
    assert!(
        printed.contains("nic-agent listening on 127.0.0.1:"),
        "READY=1 came before the listening line: {printed:?}"
    );

    // SIGTERM to our own child, by PID: systemd hears STOPPING=1.
    let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let n = sock.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
    let st = agent.child.wait().unwrap();
    assert!(st.success(), "clean exit after SIGTERM: {st:?}");
}

#[test]
fn refused_start_up_never_notifies_ready() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_nonblocking(true).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nic-agent"))
        .args(["serve", "--connect", &lab_uri(), "--listen", "0.0.0.0:0"])
        .env("NOTIFY_SOCKET", &notify)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let mut buf = [0u8; 512];
    let got = sock.recv(&mut buf);
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "unexpected notification: {:?}",
        got.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
}

/// Reads until EOF or error; what a closed connection gave us.
fn drain(s: &mut std::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn metrics_connections_are_capped_and_silent_clients_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("config.toml");
    std::fs::write(
        &f,
        "[limits]\nmetrics_connections = 2\nmetrics_header_timeout_ms = 500\n",
    )
    .unwrap();
    let (_agent, m) = start_with_metrics_and(&["--config", f.to_str().unwrap()]);
    // Two clients connect and say nothing: they hold both slots.
    let mut idle: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(&m).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // A third is closed at once, without an answer.
    let mut third = std::net::TcpStream::connect(&m).expect("connect");
    third
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = write!(third, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let t0 = std::time::Instant::now();
    let got = drain(&mut third);
    assert!(!got.contains("200"), "served over the limit: {got:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "closed, not left hanging"
    );
    // The silent ones are dropped after the header timeout...
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = std::time::Instant::now();
        let got = drain(s);
        assert!(!got.contains(" 200 "), "{got:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "header timeout not applied"
        );
    }
    // ...and their slots are free again.
    let (status, body) = get(&m, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("nic_agent_libvirt_connected"), "{body}");
}
