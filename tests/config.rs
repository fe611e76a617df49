//! The configuration file as an operator meets it: `config check`, errors
//! that name the key, defaults, and flags overriding the file, all through
//! the real binary.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{fixture, lab_uri, Agent};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nic-agent"))
}

fn check(text: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("config.toml");
    std::fs::write(&f, text).unwrap();
    bin()
        .args(["config", "check"])
        .arg(&f)
        .output()
        .expect("run config check")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn shipped_default_config_checks_ok() {
    let f = format!("{}/packaging/config.toml", env!("CARGO_MANIFEST_DIR"));
    let o = bin().args(["config", "check", &f]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
}

#[test]
fn empty_file_checks_ok() {
    let o = check("");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let o = check("connect = \"qemu:///system\"\nraise_brige_mtu = true\n");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("raise_brige_mtu"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
}

#[test]
fn unknown_key_in_a_table_is_named() {
    let o = check("[tls]\nallowed_clients = [\"x\"]\n");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("allowed_clients"), "{}", stderr(&o));
}

#[test]
fn bad_values_are_errors_naming_the_key() {
    for (text, key) in [
        ("queue_cap = 0\n", "queue_cap"),
        ("queue_cap = \"eight\"\n", "queue_cap"),
        ("host_network = \"sometimes\"\n", "host_network"),
        ("log_format = \"xml\"\n", "log_format"),
        ("metrics_listen = \"localhost\"\n", "metrics_listen"),
        ("[socket]\nmode = \"0999\"\n", "socket.mode"),
        ("listen = [\"nowhere\"]\n", "listen"),
        ("[tls]\ncert = \"/etc/x.pem\"\n", "tls"),
    ] {
        let o = check(text);
        assert!(!o.status.success(), "{text:?} was accepted");
        assert!(stderr(&o).contains(key), "{text:?}: {}", stderr(&o));
    }
}

#[test]
fn plaintext_non_loopback_in_file_needs_insecure() {
    let o = check("listen = [\"0.0.0.0:50051\"]\n");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--insecure"), "{}", stderr(&o));
    let o = check("listen = [\"0.0.0.0:50051\"]\ninsecure = true\n");
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn tls_files_named_in_the_file_must_exist() {
    let o = check(
        "[tls]\ncert = \"/nonexistent/server.pem\"\nkey = \"/nonexistent/server.key\"\n\
         client_ca = \"/nonexistent/ca.pem\"\nallow_any_client = true\n",
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("tls.cert") && stderr(&o).contains("/nonexistent/server.pem"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn missing_explicit_config_is_an_error() {
    let o = bin()
        .args(["serve", "--config", "/nonexistent/nic-agent.toml"])
        .args([
            "--connect",
            &lab_uri(),
            "--listen",
            "127.0.0.1:0",
            "--insecure",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/nic-agent.toml"),
        "{}",
        stderr(&o)
    );
    let o = bin()
        .args(["config", "check", "/nonexistent/nic-agent.toml"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

/// Starts `serve --config FILE ARGS...`; returns the agent and every
/// stdout line up to the first that starts with `until`.
fn serve_with(
    file: &Path,
    args: &[&str],
    until: &str,
) -> (Agent, Vec<String>, std::process::ChildStderr) {
    let mut child = bin()
        .arg("serve")
        .arg("--config")
        .arg(file)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(20)) {
        let done = l.starts_with(until);
        lines.push(l);
        if done {
            break;
        }
    }
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("nic-agent listening on "))
        .unwrap_or_default()
        .to_string();
    (Agent { child, addr }, lines, err)
}

#[test]
fn flags_override_the_file_and_the_file_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let f = dir.path().join("config.toml");
    // connect points at a node file that does not exist: only the flag's
    // URI can make the agent start. listen, socket mode, metrics and log
    // format come from the file alone.
    std::fs::write(
        &f,
        format!(
            "connect = \"test://{}\"\nlisten = [\"unix:{}\"]\nmetrics_listen = \"127.0.0.1:0\"\n\
             log_format = \"json\"\n[socket]\nmode = \"0600\"\n",
            fixture("no-such-node.xml"),
            sock.display()
        ),
    )
    .unwrap();
    let (mut agent, lines, err) =
        serve_with(&f, &["--connect", &lab_uri()], "nic-agent metrics on ");
    assert_eq!(
        lines.first().map(String::as_str),
        Some(format!("nic-agent listening on unix:{}", sock.display()).as_str()),
        "{lines:?}"
    );
    assert!(lines
        .iter()
        .any(|l| l.starts_with("nic-agent metrics on 127.0.0.1:")));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Logs are JSON, as the file says.
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let first_log = BufReader::new(err).lines().map_while(Result::ok).next();
    let first_log = first_log.expect("a log line");
    assert!(first_log.starts_with('{'), "{first_log}");
}

#[test]
fn without_the_flag_the_files_connect_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("config.toml");
    std::fs::write(
        &f,
        format!(
            "connect = \"test://{}\"\nlisten = [\"127.0.0.1:0\"]\ninsecure = true\n",
            fixture("no-such-node.xml")
        ),
    )
    .unwrap();
    let o = bin().arg("serve").arg("--config").arg(&f).output().unwrap();
    assert!(!o.status.success(), "the file's broken URI must be used");
    assert!(stderr(&o).contains("no-such-node.xml"), "{}", stderr(&o));
}

#[test]
fn log_format_flag_beats_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("config.toml");
    std::fs::write(
        &f,
        "log_format = \"json\"\nlisten = [\"127.0.0.1:0\"]\ninsecure = true\n",
    )
    .unwrap();
    let (mut agent, lines, err) = serve_with(
        &f,
        &["--connect", &lab_uri(), "--log-format", "text"],
        "nic-agent listening on ",
    );
    assert!(!agent.addr.is_empty(), "{lines:?}");
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let first_log = BufReader::new(err)
        .lines()
        .map_while(Result::ok)
        .next()
        .expect("a log line");
    assert!(!first_log.starts_with('{'), "{first_log}");
    assert!(first_log.contains("INFO"), "{first_log}");
}
