//! The one factory for outgoing HTTP clients (sync, usage reports, egress, the CLI): HTTPS
//! verified against the system roots or a configured CA bundle, with an optional client
//! certificate, TLS 1.2+ and ALPN http/1.1. Plain `http://` still works through the same
//! client (loopback, or a network the operator accepts: see `warn_if_clear`).

use std::sync::Arc;

use super::{provider, read_certs, read_key, read_roots, ClientTls, TlsError};

/// The rustls client config for `tls`.
pub fn client_config(tls: &ClientTls) -> Result<rustls::ClientConfig, TlsError> {
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
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(Arc::new(roots));
    let mut cfg = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| TlsError::Invalid {
                path: key.display().to_string(),
                reason: format!("key unusable with this certificate: {e}"),
            })?,
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Config(
                "client_cert_file and client_key_file go together".into(),
            ))
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// `builder` (timeouts and the like set by the caller) with our TLS settings.
pub fn http_client(tls: &ClientTls, builder: reqwest::ClientBuilder) -> Result<reqwest::Client, TlsError> {
    builder
        .use_preconfigured_tls(client_config(tls)?)
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
