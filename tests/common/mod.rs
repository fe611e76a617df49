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
    cmd.args([
        "serve",
        "--connect",
        uri,
        "--listen",
        "127.0.0.1:0",
        "--insecure",
    ])
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

/// A private network namespace for running the agent with
/// `--host-network on`: label bridges `cloudbr1` (with a veth "physical"
/// port, this kernel has no dummy links) and `cloudbr2`. Deleted on drop.
pub mod netns {
    use std::process::Command;

    use super::{lab_uri, start_agent_in_netns, Agent};

    /// The namespace and a scratch directory for the agent's socket and state.
    pub struct Netns {
        pub name: String,
        pub dir: tempfile::TempDir,
    }

    pub fn ip(args: &[&str]) {
        let st = Command::new("ip").args(args).status().expect("ip");
        assert!(st.success(), "ip {args:?} failed");
    }

    impl Netns {
        /// `tag` keeps names of concurrently running tests apart.
        pub fn new(tag: &str) -> Self {
            let name = format!("nat-{tag}-{}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            ip(&["netns", "add", &name]);
            let n = name.as_str();
            for args in [
                vec!["-n", n, "link", "set", "lo", "up"],
                vec!["-n", n, "link", "add", "cloudbr1", "type", "bridge"],
                vec!["-n", n, "link", "add", "cloudbr2", "type", "bridge"],
                vec![
                    "-n", n, "link", "add", "eth1", "type", "veth", "peer", "name", "wire1",
                ],
                vec!["-n", n, "link", "set", "eth1", "master", "cloudbr1"],
                vec!["-n", n, "link", "set", "eth1", "up"],
                vec!["-n", n, "link", "set", "wire1", "up"],
                vec!["-n", n, "link", "set", "cloudbr1", "up"],
                vec!["-n", n, "link", "set", "cloudbr2", "up"],
                vec!["-n", n, "addr", "add", "10.199.0.1/24", "dev", "cloudbr1"],
            ] {
                ip(&args);
            }
            Netns {
                name,
                dir: tempfile::tempdir().expect("tmp"),
            }
        }

        /// Link names, in kernel order.
        pub fn links(&self) -> Vec<String> {
            self.link_lines()
                .iter()
                .filter_map(|l| {
                    l.split(':')
                        .nth(1)
                        .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
                })
                .collect()
        }

        /// `ip -o link` lines: name, flags (PROMISC, UP), MTU, master, state.
        pub fn link_lines(&self) -> Vec<String> {
            let out = Command::new("ip")
                .args(["-n", &self.name, "-o", "link", "show"])
                .output()
                .expect("ip link");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        }

        pub fn details(&self, link: &str) -> String {
            let out = Command::new("ip")
                .args(["-n", &self.name, "-d", "link", "show", link])
                .output()
                .expect("ip link");
            String::from_utf8_lossy(&out.stdout).to_string()
        }

        /// The agent on the lab node, inside this namespace, managing its links.
        pub fn agent(&self, extra: &[&str]) -> Agent {
            let sock = self.dir.path().join("agent.sock");
            let state = self.dir.path().join("state");
            let persist = self.dir.path().join("persist");
            // No grace period: these tests check the removal rules
            // themselves; the grace period has its own test.
            let mut args = vec![
                "--host-network",
                "on",
                "--state-dir",
                state.to_str().expect("utf8"),
                "--persist-dir",
                persist.to_str().expect("utf8"),
                "--bridge-grace-s",
                "0",
            ];
            args.extend_from_slice(extra);
            start_agent_in_netns(&self.name, &lab_uri(), sock.to_str().expect("utf8"), &args)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

/// Like [`start_agent`], with extra environment for the agent (for example
/// `RUST_LOG=warn` under load, where info logging would print two lines per
/// request).
pub fn start_agent_with_env(uri: &str, extra: &[&str], env: &[(&str, &str)]) -> Agent {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nic-agent"));
    cmd.args([
        "serve",
        "--connect",
        uri,
        "--listen",
        "127.0.0.1:0",
        "--insecure",
    ])
    .args(extra)
    .envs(env.iter().copied());
    spawn_and_wait(cmd)
}
