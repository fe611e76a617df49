//! Transport security for TCP listeners: rustls with required client
//! certificates, plus the rule for which clients may call.
//!
//! The TLS handshake proves a client holds a certificate signed by the
//! configured CA; the [`AllowList`] interceptor then decides whether that
//! particular client may call. A client is named either by a DNS
//! subject-alternative name (`tls.allow_clients`) or by the SHA-256
//! fingerprint of its certificate or public key (`tls.allow_fingerprints`).
//! The subject CN is never matched: a CN is free text a CA may fill with
//! anything, and letting it stand in for a DNS name would let one namespace
//! impersonate the other.
//!
//! The acceptor is ours rather than tonic's `tls_config`, so that SIGHUP can
//! swap certificates and lists ([`TlsState::replace`]): a connection made
//! after the swap uses the new certificate, a request after it meets the new
//! lists, and requests already running finish untouched.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::service::Interceptor;
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use crate::config::{Fingerprint, TlsSettings};

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// Which file (`tls.cert`, `tls.key`, `tls.client_ca`).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no PEM block.
    #[error("{what} {path} is not PEM (no \"-----BEGIN\" line)")]
    NotPem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// The private key can be read by users other than its owner.
    #[error("tls.key {path} has mode {mode:04o}: group or others may read it; chmod 600 {path} (and keep /etc/nic-agent/tls at 0700)")]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// rustls refused the certificate, key or CA.
    #[error("TLS configuration refused: {0}")]
    Rejected(String),
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Refuses a private key that group or others may read. The mode of the
/// file itself counts (a symlink is followed), as ssh does for its keys.
fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    let md = std::fs::metadata(path).map_err(|source| TlsError::Read {
        what: "tls.key",
        path: path.to_path_buf(),
        source,
    })?;
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyExposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn rejected(what: &str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Rejected(format!("{what} {}: {e}", path.display()))
}

/// The server side: identity from `cert`/`key`, client certificates
/// required and verified against `client_ca`, HTTP/2 by ALPN.
///
/// The files are parsed here, so a bad key or CA stops start-up (or a
/// reload) with a message instead of failing every handshake later.
pub fn server_config(s: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cert = read_pem("tls.cert", &s.cert)?;
    check_key_mode(&s.key)?;
    let key = read_pem("tls.key", &s.key)?;
    let ca = read_pem("tls.client_ca", &s.client_ca)?;

    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| rejected("tls.cert", &s.cert, e))?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| rejected("tls.key", &s.key, e))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        let c = c.map_err(|e| rejected("tls.client_ca", &s.client_ca, e))?;
        roots
            .add(c)
            .map_err(|e| rejected("tls.client_ca", &s.client_ca, e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| rejected("tls.client_ca", &s.client_ca, e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| rejected("tls.cert/tls.key", &s.cert, e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// What a client certificate says about its holder, as far as the
/// allow-lists care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    /// Subject CNs: only for messages, never matched.
    pub common_names: Vec<String>,
    /// DNS subject-alternative names.
    pub dns_names: Vec<String>,
    /// SHA-256 of the whole certificate (DER).
    pub cert_sha256: Fingerprint,
    /// SHA-256 of its SubjectPublicKeyInfo (DER): stays the same when the
    /// certificate is renewed with the same key.
    pub spki_sha256: Fingerprint,
}

fn sha256(data: &[u8]) -> Fingerprint {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Fingerprint::from_digest(out)
}

impl ClientId {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<ClientId, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unparsable client certificate: {e}"))?;
        let common_names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_string)
            .collect();
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for g in &san.value.general_names {
                if let GeneralName::DNSName(d) = g {
                    dns_names.push((*d).to_string());
                }
            }
        }
        Ok(ClientId {
            common_names,
            dns_names,
            cert_sha256: sha256(der),
            spki_sha256: sha256(cert.tbs_certificate.subject_pki.raw),
        })
    }

    /// A short description for logs and PERMISSION_DENIED messages.
    pub fn describe(&self) -> String {
        format!(
            "CN {:?}, DNS SANs {:?}, certificate sha256 {}, key (SPKI) sha256 {}",
            self.common_names, self.dns_names, self.cert_sha256, self.spki_sha256
        )
    }
}

/// Who may call: DNS SANs, fingerprints, or anyone the CA signed.
#[derive(Debug, Clone, Default)]
pub struct ClientPolicy {
    names: HashSet<String>,
    fingerprints: HashSet<Fingerprint>,
    any: bool,
}

impl ClientPolicy {
    /// From checked settings. DNS names compare ASCII-case-insensitively.
    pub fn new(s: &TlsSettings) -> Self {
        ClientPolicy {
            names: s
                .allow_clients
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
            fingerprints: s.allow_fingerprints.iter().copied().collect(),
            any: s.allow_any_client,
        }
    }

    /// Whether the holder of `id` may call.
    pub fn admits(&self, id: &ClientId) -> bool {
        self.any
            || id
                .dns_names
                .iter()
                .any(|d| self.names.contains(&d.to_ascii_lowercase()))
            || self.fingerprints.contains(&id.cert_sha256)
            || self.fingerprints.contains(&id.spki_sha256)
    }

    /// Why `id` was refused, with a hint when only its CN would have
    /// matched (the most likely operator mistake).
    fn refusal(&self, id: &ClientId) -> String {
        let cn_would_match = id
            .common_names
            .iter()
            .any(|c| self.names.contains(&c.to_ascii_lowercase()));
        let mut m = format!(
            "client certificate ({}) is in neither tls.allow_clients nor tls.allow_fingerprints",
            id.describe()
        );
        if cn_would_match {
            m.push_str(
                "; its subject CN is listed, but allow_clients matches DNS subject-alternative \
                 names only: issue the certificate with that name as a DNS SAN",
            );
        }
        m
    }
}

/// The current TLS material: the rustls config new connections use and
/// the policy requests are checked against.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// Server identity and client CA.
    pub server: Arc<rustls::ServerConfig>,
    /// Who may call.
    pub policy: ClientPolicy,
}

impl TlsMaterial {
    /// Loads and checks everything `s` names.
    pub fn load(s: &TlsSettings) -> Result<Self, TlsError> {
        Ok(TlsMaterial {
            server: server_config(s)?,
            policy: ClientPolicy::new(s),
        })
    }
}

/// The swappable TLS material shared by the acceptor and the interceptor.
///
/// A `RwLock<Arc<_>>` rather than a lock held across work: readers clone
/// the `Arc` and let go at once, so a reload never waits for a request
/// and a request never sees half a reload.
#[derive(Debug, Clone)]
pub struct TlsState(Arc<RwLock<Arc<TlsMaterial>>>);

impl TlsState {
    /// Starts with `m`.
    pub fn new(m: TlsMaterial) -> Self {
        TlsState(Arc::new(RwLock::new(Arc::new(m))))
    }

    /// The material in force now.
    pub fn current(&self) -> Arc<TlsMaterial> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `m` in force for new connections and new requests.
    pub fn replace(&self, m: TlsMaterial) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(m);
    }
}

/// Admits only clients the current [`ClientPolicy`] names.
#[derive(Debug, Clone)]
pub struct AllowList {
    state: TlsState,
}

impl AllowList {
    /// Checks requests against whatever `state` holds at the time.
    pub fn new(state: TlsState) -> Self {
        AllowList { state }
    }
}

impl Interceptor for AllowList {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(chain) = req.peer_certs() else {
            // Only reachable if the listener is not TLS: never admit a
            // request whose client we could not identify.
            return Err(Status::unauthenticated("no client certificate"));
        };
        let Some(leaf) = chain.first() else {
            return Err(Status::unauthenticated("empty client certificate chain"));
        };
        let id = ClientId::from_der(leaf.as_ref()).map_err(Status::unauthenticated)?;
        let policy = &self.state.current().policy;
        if policy.admits(&id) {
            Ok(req)
        } else {
            let why = policy.refusal(&id);
            tracing::warn!(client = %id.describe(), "client not allowed: PERMISSION_DENIED");
            Err(Status::permission_denied(why))
        }
    }
}

/// TLS connections from a TCP listener, handshaken with whatever
/// certificate is current when each connection arrives.
///
/// Each handshake runs in its own task with a deadline, so a client that
/// opens a socket and says nothing holds up neither the accept loop nor
/// other clients. Failed handshakes are logged and dropped: they never
/// reach the gRPC server, and never stop the listener.
pub fn incoming(
    mut tcp: tonic::transport::server::TcpIncoming,
    state: TlsState,
    handshake_timeout: Duration,
) -> impl futures::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>
{
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                n = tcp.next() => n,
            };
            let stream = match next {
                None => return,
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    continue;
                }
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(state.current().server.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let peer = stream.peer_addr().ok();
                let accept = acceptor.accept(stream).into_fallible();
                match tokio::time::timeout(handshake_timeout, accept).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err((e, stream))) => {
                        tracing::info!(?peer, error = %e, "TLS handshake failed");
                        linger(stream).await;
                    }
                    Err(_) => tracing::info!(?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Closes a connection whose handshake failed so that the client reads
/// our alert. With TLS 1.3 the client learns its certificate was refused
/// only after it sent its Finished, and it has usually sent its first
/// request bytes too. Closing a socket with unread bytes makes the kernel
/// send RST, and a client that gets RST discards the alert still in its
/// receive buffer: it would see "connection reset" instead of "certificate
/// required". So: FIN after the alert, then read what the client sends
/// until it closes (bounded), then drop.
async fn linger(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 4096];
    let drain = async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cn: &str, dns: &[&str], fp: u8) -> ClientId {
        ClientId {
            common_names: vec![cn.into()],
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            cert_sha256: Fingerprint::from_digest([fp; 32]),
            spki_sha256: Fingerprint::from_digest([fp.wrapping_add(1); 32]),
        }
    }

    fn policy(names: &[&str], fps: &[u8], any: bool) -> ClientPolicy {
        ClientPolicy::new(&TlsSettings {
            cert: "/c".into(),
            key: "/k".into(),
            client_ca: "/a".into(),
            allow_clients: names.iter().map(|s| s.to_string()).collect(),
            allow_fingerprints: fps
                .iter()
                .map(|b| Fingerprint::from_digest([*b; 32]))
                .collect(),
            allow_any_client: any,
        })
    }

    #[test]
    fn dns_san_matches_case_insensitively_but_cn_never_does() {
        let p = policy(&["mgmt.example.org"], &[], false);
        assert!(p.admits(&id("x", &["MGMT.example.org"], 0)));
        let cn_only = id("mgmt.example.org", &["other.example.org"], 0);
        assert!(!p.admits(&cn_only));
        assert!(p.refusal(&cn_only).contains("DNS subject-alternative"));
    }

    #[test]
    fn certificate_or_key_fingerprint_admits() {
        let p = policy(&[], &[7], false);
        assert!(p.admits(&id("a", &[], 7)), "certificate fingerprint");
        assert!(p.admits(&id("a", &[], 6)), "SPKI fingerprint (7 = 6 + 1)");
        assert!(!p.admits(&id("a", &[], 9)));
    }

    #[test]
    fn any_client_only_when_asked_for() {
        assert!(policy(&[], &[], true).admits(&id("a", &[], 1)));
        assert!(!policy(&[], &[], false).admits(&id("a", &[], 1)));
    }

    #[test]
    fn garbage_certificate_is_an_error_not_a_panic() {
        assert!(ClientId::from_der(b"not a certificate").is_err());
        assert!(ClientId::from_der(&[]).is_err());
    }
}
