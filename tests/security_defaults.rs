//! Deny by default, through the real binary: what the agent refuses to
//! start with, who it admits over TLS (DNS SANs or fingerprints, never a
//! bare CN), SIGHUP reloading certificates and allow-lists, the bridge
//! allow-lists, and the unix socket and key-file guards. Certificates are
//! made here with rcgen; nothing leaves loopback.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{attach, client, lab_uri, nic, nics, start_agent, Agent};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// A CA that signs server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and what identifies it.
struct Leaf {
    cert: String,
    key: String,
    /// SHA-256 of the certificate DER, hex.
    cert_sha256: String,
    /// SHA-256 of the SubjectPublicKeyInfo DER, hex with colons.
    spki_sha256: String,
}

fn sha256_hex(data: &[u8], sep: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(sep)
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

    fn leaf(&self, cn: &str, dns: &[&str], server: bool) -> Leaf {
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
        Leaf {
            cert_sha256: sha256_hex(cert.der(), ""),
            spki_sha256: sha256_hex(&key.subject_public_key_info(), ":"),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Server files in a temporary directory: server.pem, server.key (0600),
/// ca.pem (the client CA).
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("nic-agent test CA");
        let pki = Pki { dir, ca };
        pki.write_server(&pki.ca.leaf("agent", &["localhost"], true));
        std::fs::write(pki.path("ca.pem"), &pki.ca.pem).unwrap();
        pki
    }

    fn write_server(&self, l: &Leaf) {
        std::fs::write(self.path("server.pem"), &l.cert).unwrap();
        std::fs::write(self.path("server.key"), &l.key).unwrap();
        std::fs::set_permissions(
            self.path("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn tls_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("server.pem").display().to_string(),
            "--tls-key".into(),
            self.path("server.key").display().to_string(),
            "--tls-client-ca".into(),
            self.path("ca.pem").display().to_string(),
        ]
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        let mut args = self.tls_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        start_agent(&lab_uri(), &args)
    }

    /// A config file with TLS and the given `[tls]` extra lines.
    fn write_config(&self, tls_extra: &str) -> PathBuf {
        let f = self.path("config.toml");
        std::fs::write(
            &f,
            format!(
                "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n{tls_extra}\n",
                self.path("server.pem"),
                self.path("server.key"),
                self.path("ca.pem"),
            ),
        )
        .unwrap();
        f
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Serving,
    Refused(Code, String),
    NoConnection(String),
}

/// A health check as a client trusting `server_ca`, presenting `client`.
async fn health(addr: &str, server_ca: &str, client: &Leaf) -> Outcome {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name("localhost")
        .identity(Identity::from_pem(&client.cert, &client.key));
    let attempt = async {
        let ch = Channel::from_shared(format!("https://{addr}"))
            .expect("uri")
            .tls_config(tls)
            .expect("client tls")
            .connect()
            .await
            .map_err(|e| Outcome::NoConnection(format!("connect: {e:?}")))?;
        HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
            .map_err(|st| match st.code() {
                Code::PermissionDenied | Code::Unauthenticated => {
                    Outcome::Refused(st.code(), st.message().to_string())
                }
                _ => Outcome::NoConnection(format!("{st:?}")),
            })
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Err(_) => Outcome::NoConnection("timed out".into()),
        Ok(Ok(st)) if st == ServingStatus::Serving as i32 => Outcome::Serving,
        Ok(Ok(st)) => panic!("health answered {st}"),
        Ok(Err(o)) => o,
    }
}

fn is_denied(o: &Outcome) -> bool {
    matches!(o, Outcome::Refused(Code::PermissionDenied, _))
}

/// Runs `serve` expecting it to refuse start-up; a started agent is
/// killed (our child, by PID) and fails the test.
fn refused_start(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nic-agent"))
        .args(["serve", "--connect", &lab_uri()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    for _ in 0..200 {
        if child.try_wait().expect("wait").is_some() {
            let out = child.wait_with_output().expect("output");
            assert!(!out.status.success(), "start-up should be refused");
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("listening"),
                "nothing may be announced"
            );
            return out;
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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn loopback_tcp_without_tls_or_insecure_is_refused_naming_the_key() {
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let out = refused_start(&["--listen", addr]);
        let err = stderr(&out);
        assert!(err.contains("insecure"), "{err}");
        assert!(err.contains("--insecure"), "{err}");
    }
}

#[test]
fn tls_with_an_empty_allow_list_is_refused_at_start() {
    let pki = Pki::new();
    let mut args = pki.tls_args();
    args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = refused_start(&args);
    let err = stderr(&out);
    assert!(
        err.contains("tls.allow_clients") && err.contains("allow_any_client"),
        "{err}"
    );
}

#[test]
fn private_key_readable_by_others_is_refused_naming_path_and_mode() {
    let pki = Pki::new();
    std::fs::set_permissions(
        pki.path("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut args = pki.tls_args();
    args.extend(["--listen", "127.0.0.1:0", "--allow-any-client"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = refused_start(&args);
    let err = stderr(&out);
    let key = pki.path("server.key").display().to_string();
    assert!(
        err.contains("tls.key") && err.contains(&key) && err.contains("0644"),
        "{err}"
    );
}

#[tokio::test]
async fn fingerprint_listed_client_is_admitted_by_certificate_or_key() {
    let pki = Pki::new();
    let by_cert = pki.ca.leaf("c1", &[], false);
    let by_key = pki.ca.leaf("c2", &[], false);
    let other = pki.ca.leaf("c3", &[], false);
    let agent = pki.agent(&[
        "--allow-fingerprint",
        &by_cert.cert_sha256,
        "--allow-fingerprint",
        &by_key.spki_sha256,
    ]);
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, &by_cert).await,
        Outcome::Serving
    );
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, &by_key).await,
        Outcome::Serving
    );
    let refused = health(&agent.addr, &pki.ca.pem, &other).await;
    assert!(is_denied(&refused), "{refused:?}");
}

#[tokio::test]
async fn cn_only_match_of_a_san_list_entry_is_refused() {
    let pki = Pki::new();
    let agent = pki.agent(&["--allow-client", "mgmt.cloud.example"]);
    // The CN says the listed name, the DNS SANs do not.
    let cn_only = pki
        .ca
        .leaf("mgmt.cloud.example", &["other.cloud.example"], false);
    let out = health(&agent.addr, &pki.ca.pem, &cn_only).await;
    let Outcome::Refused(Code::PermissionDenied, msg) = &out else {
        panic!("{out:?}")
    };
    assert!(msg.contains("DNS subject-alternative names only"), "{msg}");
    // The same name as a DNS SAN is admitted.
    let san = pki.ca.leaf("whatever", &["mgmt.cloud.example"], false);
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, &san).await,
        Outcome::Serving
    );
}

/// SIGHUP to our own child, by PID.
fn hup(agent: &Agent) {
    let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
}

/// Polls until `f` holds for a fresh health check (reload is asynchronous).
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn after_sighup_a_newly_listed_client_is_admitted_and_a_removed_one_refused() {
    let pki = Pki::new();
    let old = pki.ca.leaf("old", &["old.cloud.example"], false);
    let new = pki.ca.leaf("new", &["new.cloud.example"], false);
    let f = pki.write_config("allow_clients = [\"old.cloud.example\"]");
    let agent = start_agent(&lab_uri(), &["--config", f.to_str().unwrap()]);
    assert_eq!(
        health(&agent.addr, &pki.ca.pem, &old).await,
        Outcome::Serving
    );
    assert!(is_denied(&health(&agent.addr, &pki.ca.pem, &new).await));

    pki.write_config("allow_clients = [\"new.cloud.example\"]");
    hup(&agent);
    let (addr, ca) = (agent.addr.clone(), pki.ca.pem.clone());
    eventually("new client admitted", async || {
        health(&addr, &ca, &new).await == Outcome::Serving
    })
    .await;
    assert!(is_denied(&health(&agent.addr, &pki.ca.pem, &old).await));
    assert!(agent_alive(&agent), "SIGHUP must not stop the agent");
}

#[tokio::test]
async fn sighup_swaps_the_server_certificate_for_new_connections() {
    let pki = Pki::new();
    let client_leaf = pki.ca.leaf("c", &["mgmt.cloud.example"], false);
    let f = pki.write_config("allow_clients = [\"mgmt.cloud.example\"]");
    let agent = start_agent(&lab_uri(), &["--config", f.to_str().unwrap()]);
    // A second CA signs the renewed server certificate; clients that
    // trust only it can connect once the agent has reloaded.
    let ca2 = Ca::new("renewed server CA");
    assert!(matches!(
        health(&agent.addr, &ca2.pem, &client_leaf).await,
        Outcome::NoConnection(_)
    ));
    pki.write_server(&ca2.leaf("agent", &["localhost"], true));
    hup(&agent);
    let addr = agent.addr.clone();
    eventually("renewed certificate served", async || {
        health(&addr, &ca2.pem, &client_leaf).await == Outcome::Serving
    })
    .await;
}

#[tokio::test]
async fn a_broken_reload_keeps_the_old_configuration() {
    let pki = Pki::new();
    let c = pki.ca.leaf("c", &["mgmt.cloud.example"], false);
    let f = pki.write_config("allow_clients = [\"mgmt.cloud.example\"]");
    let agent = start_agent(&lab_uri(), &["--config", f.to_str().unwrap()]);
    std::fs::write(&f, "this is not toml [").unwrap();
    hup(&agent);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(agent_alive(&agent));
    assert_eq!(health(&agent.addr, &pki.ca.pem, &c).await, Outcome::Serving);
}

fn agent_alive(agent: &Agent) -> bool {
    // A dead agent would have closed its listener.
    std::net::TcpStream::connect(&agent.addr).is_ok()
}

#[tokio::test]
async fn allow_bridges_refuses_an_unlisted_bridge_with_permission_denied() {
    let a = start_agent(&lab_uri(), &["--allow-bridge", "guest*"]);
    let mut c = client(&a).await;
    let before = nics(&mut c, "i-2-10-VM").await;
    let e = attach(&mut c, "i-2-10-VM", nic("02:00:0a:00:77:01", "cloudbr0"))
        .await
        .expect_err("cloudbr0 is not in allow_bridges");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("cloudbr0") && e.message().contains("allow_bridges"),
        "{}",
        e.message()
    );
    assert_eq!(nics(&mut c, "i-2-10-VM").await, before, "nothing changed");
}

#[tokio::test]
async fn allow_promisc_bridges_refuses_ids_nics_elsewhere() {
    let a = start_agent(
        &lab_uri(),
        &[
            "--allow-bridge",
            "cloudbr*",
            "--allow-promisc-bridge",
            "ids*",
        ],
    );
    let mut c = client(&a).await;
    let before = nics(&mut c, "i-2-10-VM").await;
    let mut n = nic("02:00:0a:00:77:02", "cloudbr0");
    n.promiscuous = true;
    let e = attach(&mut c, "i-2-10-VM", n)
        .await
        .expect_err("cloudbr0 is not in allow_promisc_bridges");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("allow_promisc_bridges"),
        "{}",
        e.message()
    );
    assert_eq!(nics(&mut c, "i-2-10-VM").await, before, "nothing changed");
    // The same bridge without promiscuous mode is allowed.
    attach(&mut c, "i-2-10-VM", nic("02:00:0a:00:77:03", "cloudbr0"))
        .await
        .expect("a plain NIC on an allowed bridge");
}

#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    std::fs::write(&path, "not a socket").unwrap();
    let listen = format!("unix:{}", path.display());
    let out = refused_start(&["--listen", &listen]);
    let err = stderr(&out);
    assert!(
        err.contains("regular file") && err.contains("agent.sock"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
}

#[test]
fn a_socket_a_live_agent_answers_on_is_refused_and_a_stale_one_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listen = format!("unix:{}", path.display());
    let first = start_agent(&lab_uri(), &["--listen", &listen]);
    let out = refused_start(&["--listen", &listen]);
    assert!(stderr(&out).contains("another process"), "{}", stderr(&out));
    // The first agent still owns and serves its socket.
    assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    // SIGKILL (Agent's drop) leaves the socket file behind: stale, since
    // nobody listens on it any more. A new agent takes the path.
    drop(first);
    assert!(path.exists(), "a stale socket file is left behind");
    let _second = start_agent(&lab_uri(), &["--listen", &listen]);
    assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
}
