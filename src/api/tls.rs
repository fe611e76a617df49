//! Transport security for TCP listeners: rustls with required client
//! certificates, plus an allow-list of client identities.
//!
//! The TLS handshake proves a client holds a certificate signed by the
//! configured CA; the [`AllowList`] interceptor then decides whether that
//! particular client may call. An identity is the leaf certificate's
//! subject CN or any of its DNS subject-alternative names, so a management
//! server can be named either way.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use crate::config::TlsSettings;

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

/// The server side: identity from `cert`/`key`, client certificates
/// required and verified against `client_ca`.
///
/// The files are parsed here, so a bad key or CA stops start-up with a
/// message instead of failing every handshake later.
pub fn server_config(s: &TlsSettings) -> Result<ServerTlsConfig, TlsError> {
    let cert = read_pem("tls.cert", &s.cert)?;
    let key = read_pem("tls.key", &s.key)?;
    let ca = read_pem("tls.client_ca", &s.client_ca)?;
    let cfg = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false);
    // Building a server is the only public way to make tonic parse the
    // PEMs; the builder is dropped.
    tonic::transport::Server::builder()
        .tls_config(cfg.clone())
        .map_err(|e| TlsError::Rejected(error_chain(&e)))?;
    Ok(cfg)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The identities a DER certificate presents: subject CNs, then DNS SANs.
pub fn client_identities(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparsable client certificate: {e}"))?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_string)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for g in &san.value.general_names {
            if let GeneralName::DNSName(d) = g {
                names.push((*d).to_string());
            }
        }
    }
    Ok(names)
}

/// Admits only clients whose certificate names one of the allowed
/// identities. With an empty list, any client the CA signed is admitted.
#[derive(Debug, Clone)]
pub struct AllowList {
    names: Arc<HashSet<String>>,
}

impl AllowList {
    /// Builds the list; names compare ASCII-case-insensitively, as DNS
    /// names do.
    pub fn new(names: &[String]) -> Self {
        AllowList {
            names: Arc::new(names.iter().map(|n| n.to_ascii_lowercase()).collect()),
        }
    }

    /// Whether a client presenting `identities` may call.
    pub fn admits(&self, identities: &[String]) -> bool {
        self.names.is_empty()
            || identities
                .iter()
                .any(|i| self.names.contains(&i.to_ascii_lowercase()))
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
        let ids = client_identities(leaf.as_ref()).map_err(Status::unauthenticated)?;
        if self.admits(&ids) {
            Ok(req)
        } else {
            tracing::warn!(client = ?ids, "client not in allow_clients: PERMISSION_DENIED");
            Err(Status::permission_denied(format!(
                "client {} is not in allow_clients",
                ids.first().map(String::as_str).unwrap_or("(unnamed)")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_allow_list_admits_any_verified_client() {
        assert!(AllowList::new(&[]).admits(&["anyone".into()]));
    }

    #[test]
    fn allow_list_matches_any_identity_case_insensitively() {
        let a = AllowList::new(&["mgmt.example.org".into()]);
        assert!(a.admits(&["cn-x".into(), "MGMT.example.org".into()]));
        assert!(!a.admits(&["mgmt".into(), "other.example.org".into()]));
        assert!(!a.admits(&[]));
    }

    #[test]
    fn garbage_certificate_is_an_error_not_a_panic() {
        assert!(client_identities(b"not a certificate").is_err());
        assert!(client_identities(&[]).is_err());
    }
}
