//! TLS as data, shared by every listener and client: PEM files read into rustls types, a
//! server certificate that is reloaded without a restart (`reload`), the client-certificate
//! modes, and the one factory for outgoing HTTPS clients (`client`). rustls with ring only,
//! the provider pingora-rustls uses; TLS 1.2 and 1.3 only.

pub mod client;
pub mod dev_pki;
pub mod peer;
pub mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use reload::ReloadingCert;

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// None is asked for.
    Off,
    /// One is asked for; a connection without one goes on (its requests need another
    /// credential). A certificate that does not verify fails the handshake.
    Optional,
    /// The handshake fails without a certificate issued by `client_ca_file`.
    Required,
}

/// A TLS listener's files (validated config; read at start and on reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

/// How a client verifies a server and which certificate it presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// Roots to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and key, presented when the server asks.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: no PEM certificate in the file")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key in the file")]
    NoKey { path: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The one crypto provider (pingora-rustls installs the same one as the process default).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process default once, before anything builds a rustls config.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| TlsError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.display().to_string(),
        })
}

/// A root store from a PEM bundle; every certificate in it must be usable as a root.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            path: path.display().to_string(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The client-certificate verifier of a listener, or None when it asks for none.
pub fn client_verifier(
    tls: &ServerTls,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, TlsError> {
    let ca = match (tls.client_auth, &tls.client_ca_file) {
        (ClientAuth::Off, _) => return Ok(None),
        (_, Some(ca)) => ca,
        (_, None) => return Err(TlsError::Config("client_auth needs client_ca_file".into())),
    };
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(read_roots(ca)?), provider());
    let builder = match tls.client_auth {
        ClientAuth::Optional => builder.allow_unauthenticated(),
        _ => builder,
    };
    builder
        .build()
        .map(Some)
        .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))
}

/// A complete server config (the admin plane's listener and the sidecar's health listener;
/// the sidecar's proxy listener goes through pingora's `TlsSettings` with the same parts).
pub fn server_config(
    tls: &ServerTls,
    cert: Arc<ReloadingCert>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_verifier(tls)? {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
