//! A certificate, replaced whole without a restart: a listener's (`ResolvesServerCert`) or a
//! client's (`ResolvesClientCert`: sync, egress). New handshakes get the new certificate,
//! connections already open keep theirs. `reload` re-reads the files (on SIGHUP
//! and when `watch` sees them change); a pair that does not load or whose key does not match
//! its certificate is refused with a log line and the old one kept. Its notAfter feeds the
//! `permiso_tls_cert_expiry_seconds` gauge and a warning under 14 days.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{provider, read_certs, read_key, TlsError};

/// Under this many seconds of validity left, each check logs a warning.
pub const EXPIRY_WARNING_SECS: i64 = 14 * 24 * 3600;

pub struct ReloadingCert {
    /// Which listener (`sidecar`, `admin`) or client (`client:sync`,
    /// `client:egress:<destination>`), for logs and the metric label.
    pub listener: Arc<str>,
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// Unix seconds.
    not_after: AtomicI64,
    /// blake3 of the files' bytes as last loaded (change detection independent of mtimes).
    loaded: Mutex<[u8; 32]>,
    /// blake3 of the files as last refused: the watch does not try (and log) the same broken
    /// contents every 2 s, only a change of them; SIGHUP always tries.
    refused: Mutex<[u8; 32]>,
    /// Counts successful loads: a client that pools connections (`RotatingClient`) starts a
    /// new pool when it moves.
    generation: AtomicU64,
    /// Reloads refused (files unreadable, or a key that does not match): the rotation an
    /// operator expects did not happen, and the old certificate keeps counting down.
    failures: AtomicU64,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("listener", &self.listener)
            .field("cert_file", &self.cert_file)
            .finish()
    }
}

fn fingerprint(cert: &Path, key: &Path) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in [cert, key] {
        h.update(&std::fs::read(p).unwrap_or_default());
        h.update(b"\0");
    }
    *h.finalize().as_bytes()
}

/// Loads and checks a certificate chain and its key; returns them with the leaf's notAfter.
fn load(cert_file: &Path, key_file: &Path) -> Result<(CertifiedKey, i64), TlsError> {
    let chain = read_certs(cert_file)?;
    let key = read_key(key_file)?;
    let invalid = |reason: String| TlsError::Invalid {
        path: cert_file.display().to_string(),
        reason,
    };
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| invalid(format!("unreadable certificate: {e}")))?;
    let not_after = leaf.validity().not_after.timestamp();
    let ck = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Invalid {
        path: key_file.display().to_string(),
        reason: format!("key unusable with this certificate: {e}"),
    })?;
    Ok((ck, not_after))
}

impl ReloadingCert {
    /// Loads the pair; an error here stops the start.
    pub fn load(
        listener: impl Into<Arc<str>>,
        cert_file: PathBuf,
        key_file: PathBuf,
    ) -> Result<Arc<Self>, TlsError> {
        let stamp = fingerprint(&cert_file, &key_file);
        let (ck, not_after) = load(&cert_file, &key_file)?;
        Ok(Arc::new(ReloadingCert {
            listener: listener.into(),
            cert_file,
            key_file,
            current: ArcSwap::from_pointee(ck),
            not_after: AtomicI64::new(not_after),
            loaded: Mutex::new(stamp),
            refused: Mutex::new([0; 32]),
            generation: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }))
    }

    /// Re-reads the files. On error the certificate in use stays and the error is returned
    /// (and logged).
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = fingerprint(&self.cert_file, &self.key_file);
        match load(&self.cert_file, &self.key_file) {
            Ok((ck, not_after)) => {
                self.current.store(Arc::new(ck));
                self.not_after.store(not_after, Ordering::Relaxed);
                *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
                self.generation.fetch_add(1, Ordering::Release);
                tracing::info!(listener = %self.listener, cert_file = %self.cert_file.display(), not_after, "TLS certificate loaded");
                Ok(())
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
                tracing::error!(listener = %self.listener, error = %e, "new TLS certificate refused; the one in use stays");
                Err(e)
            }
        }
    }

    /// Reloads when the files' contents differ from what was last loaded (or refused).
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let stamp = fingerprint(&self.cert_file, &self.key_file);
        let seen = *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) == stamp
            || *self.refused.lock().unwrap_or_else(|p| p.into_inner()) == stamp;
        (!seen).then(|| self.reload())
    }

    /// How many reloads were refused.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// How many times the pair was replaced since it was first loaded.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Unix seconds at which the certificate in use expires.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// The leaf certificate in use (DER), for tests and diagnostics.
    pub fn leaf_der(&self) -> Vec<u8> {
        self.current.load().cert[0].to_vec()
    }

    /// Logs a warning when the certificate expires within 14 days.
    pub fn warn_if_expiring(&self, now_secs: i64) {
        let left = self.not_after() - now_secs;
        if left < EXPIRY_WARNING_SECS {
            tracing::warn!(listener = %self.listener, seconds_left = left, cert_file = %self.cert_file.display(), "TLS certificate expires soon");
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A client presents its one certificate whatever the server asks for, as rustls' own
/// single-certificate resolver (`with_client_auth_cert`) does: the server's CA hints and
/// signature schemes are for choosing among several.
impl rustls::client::ResolvesClientCert for ReloadingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks every `interval` whether a certificate's files changed (and reloads them), and warns
/// about expiry once an hour; ends when `stop` turns true.
pub async fn watch(
    certs: Vec<Arc<ReloadingCert>>,
    interval: Duration,
    clock: crate::core::clock::SharedClock,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut since_warning = Duration::MAX;
    loop {
        if since_warning >= Duration::from_secs(3600) {
            for c in &certs {
                c.warn_if_expiring(clock.now_secs());
            }
            since_warning = Duration::ZERO;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        since_warning = since_warning.saturating_add(interval);
        for c in &certs {
            let _ = c.reload_if_changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_files_are_refused_once_per_content_and_the_old_pair_stays() {
        super::super::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::tls::dev_pki::DevPki::generate(dir.path(), "spiffe://permiso/t").unwrap();
        let c = ReloadingCert::load("test", pki.server_cert.clone(), pki.server_key.clone()).unwrap();
        let served = c.leaf_der();
        assert!(c.reload_if_changed().is_none(), "nothing changed");

        // A key that does not match the certificate (the client's): refused, counted, kept.
        std::fs::copy(&pki.client_key, &pki.server_key).unwrap();
        assert!(matches!(c.reload_if_changed(), Some(Err(_))));
        assert_eq!(
            (c.failures(), c.generation(), c.leaf_der()),
            (1, 0, served.clone())
        );
        // The same broken contents are not tried again by the watch...
        assert!(c.reload_if_changed().is_none());
        assert_eq!(c.failures(), 1);
        // ... but SIGHUP (reload) does try.
        assert!(c.reload().is_err());
        assert_eq!(c.failures(), 2);

        // A matching pair again (the client's certificate with its key): loaded.
        std::fs::copy(&pki.client_cert, &pki.server_cert).unwrap();
        assert!(matches!(c.reload_if_changed(), Some(Ok(()))));
        assert_eq!((c.failures(), c.generation()), (2, 1));
        assert_ne!(c.leaf_der(), served);
    }
}
