//! Transport security of the real binary: mutual TLS with a client
//! allow-list, the plaintext guard on non-loopback addresses, and unix
//! socket permissions. Certificates are made here, at test time, with
//! rcgen; nothing leaves loopback.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{lab_uri, start_agent, Agent};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// A CA that can sign server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(cn: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("ca key");
        let cert = p.self_signed(&key).expect("ca cert");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf certificate: (cert PEM, key PEM).
    fn leaf(&self, cn: &str, dns: &[&str], server: bool) -> (String, String) {
        let mut p = CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    }
}

/// The server's files on disk plus the CA that clients trust.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("nic-agent test CA");
        let (cert, key) = ca.leaf("agent", &["localhost"], true);
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert).unwrap();
        std::fs::write(dir.path().join("server.key"), key).unwrap();
        // The agent refuses a key that group or others may read.
        std::fs::set_permissions(
            dir.path().join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        Pki { dir, ca }
    }

    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }

    /// Starts the agent with TLS and the given allow-list of DNS SANs; an
    /// empty list means `--allow-any-client`.
    fn agent(&self, allow: &[&str]) -> Agent {
        let (cert, key, ca) = (
            self.path("server.pem"),
            self.path("server.key"),
            self.path("ca.pem"),
        );
        let mut args: Vec<&str> = vec![
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ];
        for a in allow {
            args.extend(["--allow-client", a]);
        }
        if allow.is_empty() {
            args.push("--allow-any-client");
        }
        start_agent(&lab_uri(), &args)
    }
}

/// What a health check over TLS came to.
#[derive(Debug, PartialEq)]
enum Outcome {
    Serving,
    /// The server answered with a gRPC status.
    Refused(Code),
    /// The server refused the TLS handshake: the client received this fatal
    /// alert (rustls's name for it, e.g. `CertificateRequired`).
    Alert(String),
    /// No answer within the deadline: never a refusal, whatever the test.
    TimedOut,
    /// Any other failure to connect.
    NoConnection(String),
}

/// The TLS alert the peer sent, if that is what `err` comes down to.
///
/// rustls reports a received alert as `received fatal alert: <Name>` inside
/// an `io::Error` of kind `InvalidData`; hyper and tonic wrap that io error,
/// so walk the source chain to it.
fn tls_alert(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                if let Some(inner) = io.get_ref() {
                    if let Some(name) = inner.to_string().strip_prefix("received fatal alert: ") {
                        return Some(name.to_string());
                    }
                }
            }
        }
        cur = e.source();
    }
    None
}

/// A health check as a client trusting `server_ca`, presenting `client`.
async fn health(addr: &str, server_ca: &str, client: Option<&(String, String)>) -> Outcome {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name("localhost");
    if let Some((c, k)) = client {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    let attempt = async {
        let ch = Channel::from_shared(format!("https://{addr}"))
            .expect("uri")
            .tls_config(tls)
            .expect("client tls")
            .connect()
            .await
            .map_err(|e| match tls_alert(&e) {
                Some(alert) => Outcome::Alert(alert),
                None => Outcome::NoConnection(format!("connect: {e:?}")),
            })?;
        let st = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|st| match st.code() {
                // The server itself decided: the request reached it.
                Code::PermissionDenied | Code::Unauthenticated => Outcome::Refused(st.code()),
                // Anything else is the connection failing under the call
                // (with TLS 1.3 the server's verdict on a client
                // certificate arrives after the client thinks the
                // handshake is done, so its alert shows up here).
                _ => match tls_alert(&st) {
                    Some(alert) => Outcome::Alert(alert),
                    None => Outcome::NoConnection(format!("{st:?}")),
                },
            })?
            .into_inner()
            .status;
        Ok(st)
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Err(_) => Outcome::TimedOut,
        Ok(Ok(st)) if st == ServingStatus::Serving as i32 => Outcome::Serving,
        Ok(Ok(st)) => panic!("health answered {st}"),
        Ok(Err(o)) => o,
    }
}

#[tokio::test]
async fn listed_name_only_in_the_common_name_is_permission_denied() {
    let pki = Pki::new();
    let agent = pki.agent(&["mgmt-1"]);
    // allow_clients matches DNS SANs only; a CN is not a DNS name.
    let client = pki.ca.leaf("mgmt-1", &[], false);
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, Some(&client)).await,
        Outcome::Refused(Code::PermissionDenied)
    );
}

#[tokio::test]
async fn listed_client_by_dns_san_is_served() {
    let pki = Pki::new();
    let agent = pki.agent(&["mgmt.cloud.example"]);
    let client = pki.ca.leaf("not-listed-cn", &["mgmt.cloud.example"], false);
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, Some(&client)).await,
        Outcome::Serving
    );
}

#[tokio::test]
async fn valid_client_not_on_the_allow_list_is_permission_denied() {
    let pki = Pki::new();
    let agent = pki.agent(&["mgmt-1", "mgmt.cloud.example"]);
    let client = pki.ca.leaf("mgmt-2", &["other.cloud.example"], false);
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, Some(&client)).await,
        Outcome::Refused(Code::PermissionDenied)
    );
    // The same agent still serves a listed client afterwards.
    let listed = pki.ca.leaf("mgmt-1", &["mgmt.cloud.example"], false);
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, Some(&listed)).await,
        Outcome::Serving
    );
}

#[tokio::test]
async fn client_without_certificate_is_refused_in_the_handshake() {
    let pki = Pki::new();
    let agent = pki.agent(&["mgmt-1"]);
    // TLS 1.3's alert for "you sent no certificate"; a timeout or a reset
    // connection would not prove that the handshake was refused.
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, None).await,
        Outcome::Alert("CertificateRequired".into())
    );
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused_in_the_handshake() {
    let pki = Pki::new();
    let agent = pki.agent(&["mgmt-1"]);
    // Right name, wrong issuer: only the CA check can refuse it.
    let rogue = Ca::new("rogue CA").leaf("mgmt-1", &[], false);
    // rustls answers an issuer it does not know with the unknown_ca alert.
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, Some(&rogue)).await,
        Outcome::Alert("UnknownCA".into())
    );
}

#[tokio::test]
async fn allow_any_client_serves_any_client_of_the_ca() {
    let pki = Pki::new();
    let agent = pki.agent(&[]);
    let client = pki.ca.leaf("whoever", &[], false);
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, Some(&client)).await,
        Outcome::Serving
    );
}

#[test]
fn unreadable_tls_key_stops_start_up_naming_the_file() {
    let pki = Pki::new();
    let out = Command::new(env!("CARGO_BIN_EXE_nic-agent"))
        .args(["serve", "--connect", &lab_uri(), "--listen", "127.0.0.1:0"])
        .args(["--tls-cert", &pki.path("server.pem")])
        .args(["--tls-key", &pki.path("missing.key")])
        .args(["--tls-client-ca", &pki.path("ca.pem")])
        .arg("--allow-any-client")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.key") && err.contains("missing.key"),
        "{err}"
    );
}

fn serve_output(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nic-agent"))
        .args(["serve", "--connect", &lab_uri()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // A refused start-up exits at once; a started agent would run forever.
    for _ in 0..100 {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    panic!(
        "agent kept running; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn plaintext_on_wildcard_address_is_refused_naming_insecure() {
    let out = serve_output(&["--listen", "0.0.0.0:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure"), "{err}");
    assert!(err.contains("0.0.0.0"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "nothing may be bound"
    );
}

#[test]
fn plaintext_on_wildcard_address_starts_with_insecure() {
    use std::io::{BufRead, BufReader};
    let child = Command::new(env!("CARGO_BIN_EXE_nic-agent"))
        .args(["serve", "--connect", &lab_uri()])
        .args(["--listen", "0.0.0.0:0", "--insecure"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut agent = Agent {
        child,
        addr: String::new(),
    };
    let stdout = agent.child.stdout.take().expect("stdout");
    // The first line is the listener; the agent runs until dropped.
    let line = BufReader::new(stdout)
        .lines()
        .next()
        .expect("a line")
        .expect("utf-8");
    assert!(
        line.starts_with("nic-agent listening on 0.0.0.0:"),
        "{line}"
    );
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "still running"
    );
}

fn socket_agent(dir: &Path, extra: &[&str]) -> (Agent, PathBuf) {
    let sock = dir.join("agent.sock");
    let listen = format!("unix:{}", sock.display());
    let mut args = vec!["--listen", listen.as_str()];
    args.extend_from_slice(extra);
    // start_agent also listens on 127.0.0.1:0; --listen repeats, so the
    // agent serves both and the socket exists once the first line shows.
    let a = start_agent(&lab_uri(), &args);
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (a, sock)
}

#[test]
fn unix_socket_gets_mode_0660_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = socket_agent(dir.path(), &[]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "mode {mode:o}");
}

#[test]
fn unix_socket_mode_and_group_follow_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(1))
        .ok()
        .flatten()
        .expect("gid 1 exists");
    let (_a, sock) = socket_agent(
        dir.path(),
        &["--socket-mode", "0600", "--socket-group", &group.name],
    );
    let md = std::fs::metadata(&sock).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(md.gid(), 1);
}

#[test]
fn unknown_socket_owner_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("unix:{}", dir.path().join("s.sock").display());
    let out = serve_output(&["--listen", &listen, "--socket-owner", "no-such-user-xyz"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("socket.owner") && err.contains("no-such-user-xyz"),
        "{err}"
    );
}
