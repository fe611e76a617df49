//! Shared helpers for integration tests: start the real `nic-agent` binary
//! on loopback and connect a tonic client to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nic_agent::api::pb::{self, nic_agent_client::NicAgentClient};
use tonic::transport::Channel;

/// A running agent process; killed (by PID, it is our child) on drop.
pub struct Agent {
    pub child: Child,
    pub addr: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The embedded lab: a private copy of the test-driver node per agent.
pub fn lab_uri() -> String {
    format!("test://{}", fixture("lab-node.xml"))
}

/// Starts `nic-agent serve` and waits for its "listening on" line.
pub fn start_agent(uri: &str, extra: &[&str]) -> Agent {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nic-agent"));
    cmd.args(["serve", "--connect", uri, "--listen", "127.0.0.1:0"])
        .args(extra);
    spawn_and_wait(cmd)
}

/// Starts the agent inside a network namespace (`ip netns exec`), serving
/// on a unix socket: a path-based socket is reachable from any netns.
pub fn start_agent_in_netns(ns: &str, uri: &str, sock: &str, extra: &[&str]) -> Agent {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_nic-agent")])
        .args([
            "serve",
            "--connect",
            uri,
            "--listen",
            &format!("unix:{sock}"),
        ])
        .args(extra);
    spawn_and_wait(cmd)
}

fn spawn_and_wait(mut cmd: Command) -> Agent {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn nic-agent");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("nic-agent listening on ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("agent did not report its listen address");
    Agent { child, addr }
}

/// AttachNic with no request id.
pub async fn attach(
    c: &mut NicAgentClient<Channel>,
    vm: &str,
    nic: pb::NicSpec,
) -> Result<pb::AttachNicResponse, tonic::Status> {
    c.attach_nic(pb::AttachNicRequest {
        vm: vm.into(),
        nic: Some(nic),
        request_id: String::new(),
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn client(agent: &Agent) -> NicAgentClient<Channel> {
    if agent.addr.starts_with("unix:") {
        return nic_agent::cli::client::connect(&agent.addr)
            .await
            .expect("connect unix");
    }
    NicAgentClient::connect(format!("http://{}", agent.addr))
        .await
        .expect("connect")
}

pub fn nic(mac: &str, bridge: &str) -> pb::NicSpec {
    pb::NicSpec {
        mac: mac.into(),
        bridge: bridge.into(),
        ..Default::default()
    }
}

pub async fn nics(c: &mut NicAgentClient<Channel>, vm: &str) -> Vec<pb::Nic> {
    c.list_nics(pb::ListNicsRequest { vm: vm.into() })
        .await
        .expect("list")
        .into_inner()
        .nics
}
