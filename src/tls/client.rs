//! The one factory for outgoing HTTP clients (sync, usage reports, egress, the CLI): HTTPS
//! verified against the system roots or a configured CA bundle, with an optional client
//! certificate, TLS 1.2+ and ALPN http/1.1. Plain `http://` still works through the same
//! client (loopback, or a network the operator accepts: see `warn_if_clear`).

use std::sync::Arc;

use super::{provider, read_certs, read_key, read_roots, ClientTls, ReloadingCert, TlsError};

/// The rustls client config for `tls`, its client certificate read once (the CLI).
pub fn client_config(tls: &ClientTls) -> Result<rustls::ClientConfig, TlsError> {
    let cert = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => Some((read_certs(cert)?, read_key(key)?, key)),
        (None, None) => None,
        _ => return Err(pair_error()),
    };
    let builder = config_builder(tls)?;
    let mut cfg = match cert {
        Some((chain, key, key_file)) => {
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Invalid {
                    path: key_file.display().to_string(),
                    reason: format!("key unusable with this certificate: {e}"),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn pair_error() -> TlsError {
    TlsError::Config("client_cert_file and client_key_file go together".into())
}

fn config_builder(
    tls: &ClientTls,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let roots = match &tls.ca_file {
        Some(ca) => read_roots(ca)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            // Unreadable system certificates are skipped; none at all is an error below only
            // when an https:// URL is actually used (the handshake names the reason).
            if let Ok(certs) = rustls_native_certs::load_native_certs() {
                roots.add_parsable_certificates(certs);
            }
            roots
        }
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(Arc::new(roots)))
}

/// `builder` (timeouts and the like set by the caller) with our TLS settings; the client
/// certificate read once (the CLI: one process, one command).
pub fn http_client(tls: &ClientTls, builder: reqwest::ClientBuilder) -> Result<reqwest::Client, TlsError> {
    build(builder, client_config(tls)?)
}

/// A long-running HTTP client (sync, egress) whose client certificate is re-read without a
/// restart: a `ReloadingCert` (labelled for logs and the expiry gauge) that the caller's watch
/// and SIGHUP reload. reqwest pools connections, and a pooled connection keeps the certificate
/// of its handshake; so when the certificate moves, `get` starts a new client (a new pool)
/// and the next request presents the new certificate at once. That matters when the old
/// identity is unmapped at the admin plane right after a rotation. Requests in flight finish
/// on the old client. Rebuilding does no I/O: the rustls config (roots read at start) is
/// kept and its resolver is the same `ReloadingCert`.
pub struct RotatingClient {
    cert: Option<Arc<ReloadingCert>>,
    tls: rustls::ClientConfig,
    builder: Box<dyn Fn() -> reqwest::ClientBuilder + Send + Sync>,
    current: arc_swap::ArcSwap<(u64, reqwest::Client)>,
}

impl RotatingClient {
    /// `builder` sets timeouts and the like; called again on each rebuild.
    pub fn new(
        tls: &ClientTls,
        label: &str,
        builder: impl Fn() -> reqwest::ClientBuilder + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let cert = match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(cert), Some(key)) => Some(ReloadingCert::load(label, cert.clone(), key.clone())?),
            (None, None) => None,
            _ => return Err(pair_error()),
        };
        let roots = config_builder(tls)?;
        let mut cfg = match &cert {
            Some(c) => roots.with_client_cert_resolver(c.clone()),
            None => roots.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let generation = cert.as_ref().map_or(0, |c| c.generation());
        let http = build(builder(), cfg.clone())?;
        Ok(RotatingClient {
            cert,
            tls: cfg,
            builder: Box::new(builder),
            current: arc_swap::ArcSwap::from_pointee((generation, http)),
        })
    }

    /// The certificate this client presents, for the caller's watch.
    pub fn cert(&self) -> Option<&Arc<ReloadingCert>> {
        self.cert.as_ref()
    }

    /// The client to send with: a new one (fresh pool) once the certificate was replaced.
    pub fn get(&self) -> reqwest::Client {
        let current = self.current.load();
        let generation = self.cert.as_ref().map_or(0, |c| c.generation());
        if current.0 == generation {
            return current.1.clone();
        }
        // A fresh session cache too: a resumed TLS session carries the certificate of the
        // handshake that made it, so resuming would present the old identity again.
        let mut tls = self.tls.clone();
        tls.resumption = rustls::client::Resumption::default();
        match build((self.builder)(), tls) {
            Ok(http) => {
                // Two requests may both rebuild here; either result is right.
                self.current.store(Arc::new((generation, http.clone())));
                http
            }
            Err(e) => {
                // Building from a config that built before does not fail in practice; if it
                // does, the old pool keeps working and the next request tries again.
                tracing::error!(error = %e, "HTTP client rebuild after a certificate change failed");
                current.1.clone()
            }
        }
    }
}

fn build(builder: reqwest::ClientBuilder, tls: rustls::ClientConfig) -> Result<reqwest::Client, TlsError> {
    builder
        .use_preconfigured_tls(tls)
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// Whether `url` is plain http:// to a host other than this one.
pub fn is_clear_to_another_host(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// Logs at start when credentials would travel in clear to another host.
pub fn warn_if_clear(what: &str, url: &str) {
    if is_clear_to_another_host(url) {
        tracing::warn!(
            what,
            url,
            "plain http:// to another host: credentials will cross the network in clear"
        );
    }
}

/// Whether an error (anywhere in its source chain) is a TLS failure, and its rustls reason.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        // An io::Error's source() skips the error it wraps: descend into it instead.
        cur = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_clear_text_to_another_host_is_flagged() {
        // warn_if_clear's host parsing, through the same rules.
        for (url, flagged) in [
            ("http://127.0.0.1:8000", false),
            ("http://localhost:8000/x", false),
            ("http://[::1]:8000", false),
            ("http://10.0.0.5:8000", true),
            ("http://admin.internal", true),
            ("https://admin.internal", false),
        ] {
            assert_eq!(super::is_clear_to_another_host(url), flagged, "{url}");
        }
    }
}
