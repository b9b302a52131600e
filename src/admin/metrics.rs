//! The admin plane's Prometheus metrics: requests by route and status with latency, failed and
//! throttled authentications, tokens issued, key-usage marks received, and the state version.
//! Labels are route templates (`/auth/admin/services/{id}`), never raw paths or ids.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::admin::AppState;

pub struct AdminMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    auth_failures: IntCounter,
    auth_throttled: IntCounter,
    tokens_issued: IntCounter,
    usage_marks: IntCounter,
    full_syncs_built: IntCounter,
    long_polls: IntGauge,
    version: IntGauge,
    tls_cert_expiry: prometheus::IntGaugeVec,
    tls_handshake_failures: IntCounter,
    tls_cert_reload_failures: IntCounterVec,
}

pub const HANDSHAKE_FAILURES_HELP: &str = "TLS handshakes that failed or timed out on this process's listeners (a plain-HTTP client, an untrusted or missing client certificate, an old TLS version). Logged at most once per 10 s.";

pub const RELOAD_FAILURES_HELP: &str = "New certificate files refused (unreadable, or a key that does not match its certificate): the certificate in use stays and keeps counting down to its expiry.";

/// Counts one parked long poll while it lives.
pub struct Parked<'a>(&'a IntGauge);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

impl Default for AdminMetrics {
    fn default() -> Self {
        let r = Registry::new();
        let counter =
            |name: &str, help: &str| register(&r, IntCounter::new(name, help).expect("valid metric"));
        AdminMetrics {
            tls_handshake_failures: counter(
                "permiso_tls_handshake_failures_total",
                HANDSHAKE_FAILURES_HELP,
            ),
            tls_cert_reload_failures: register(
                &r,
                IntCounterVec::new(
                    Opts::new("permiso_tls_cert_reload_failures_total", RELOAD_FAILURES_HELP),
                    &["listener"],
                )
                .expect("valid metric"),
            ),
            tls_cert_expiry: register(
                &r,
                prometheus::IntGaugeVec::new(
                    Opts::new(
                        "permiso_tls_cert_expiry_seconds",
                        "Seconds until the certificate a TLS listener serves expires (negative: expired); a warning is logged under 14 days.",
                    ),
                    &["listener"],
                )
                .expect("valid metric"),
            ),
            requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "permiso_admin_http_requests_total",
                        "Requests by method, route template and status.",
                    ),
                    &["method", "route", "status"],
                )
                .expect("valid metric"),
            ),
            latency: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "permiso_admin_http_request_duration_seconds",
                        "Request latency by route template.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
                    ]),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            auth_failures: counter(
                "permiso_admin_auth_failures_total",
                "Failed admin-plane authentications (each is in the audit log).",
            ),
            auth_throttled: counter(
                "permiso_admin_auth_throttled_total",
                "Requests refused because their address failed authentication too often.",
            ),
            tokens_issued: counter("permiso_admin_tokens_issued_total", "Access tokens issued."),
            usage_marks: counter(
                "permiso_admin_key_usage_marks_total",
                "Key last-used marks received from sidecars.",
            ),
            full_syncs_built: counter(
                "permiso_admin_full_syncs_built_total",
                "Full snapshots built for sidecars (the rest of the full syncs at the same version and second share one).",
            ),
            long_polls: register(
                &r,
                IntGauge::new(
                    "permiso_admin_sync_long_polls",
                    "Sync requests parked waiting for a change.",
                )
                .expect("valid metric"),
            ),
            version: register(
                &r,
                IntGauge::new(
                    "permiso_admin_state_version",
                    "The latest committed sync version.",
                )
                .expect("valid metric"),
            ),
            registry: r,
        }
    }
}

impl AdminMetrics {
    pub fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    pub fn auth_throttled(&self) {
        self.auth_throttled.inc();
    }

    pub fn token_issued(&self) {
        self.tokens_issued.inc();
    }

    pub fn long_poll(&self) -> Parked<'_> {
        self.long_polls.inc();
        Parked(&self.long_polls)
    }

    pub fn full_sync_built(&self) {
        self.full_syncs_built.inc();
    }

    pub fn usage_marks(&self, n: usize) {
        self.usage_marks.inc_by(n as u64);
    }

    fn observe(&self, method: &str, route: &str, status: u16, took: Duration) {
        let status = status.to_string();
        self.requests.with_label_values(&[method, route, &status]).inc();
        self.latency
            .with_label_values(&[route])
            .observe(took.as_secs_f64());
    }

    /// `cert`: the listener's certificate and the time now, when it serves TLS.
    pub fn render(&self, version: u64, cert: Option<(&crate::tls::ReloadingCert, i64)>) -> String {
        self.version.set(version as i64);
        let failures = crate::telemetry::tls_handshake_failures();
        self.tls_handshake_failures
            .inc_by(failures.saturating_sub(self.tls_handshake_failures.get()));
        if let Some((c, now)) = cert {
            self.tls_cert_expiry
                .with_label_values(&[&*c.listener])
                .set(c.not_after() - now);
            let refused = self.tls_cert_reload_failures.with_label_values(&[&*c.listener]);
            refused.inc_by(c.failures().saturating_sub(refused.get()));
        }
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// Methods outside this list share one label, so a client cannot invent label values.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

/// Route layer: runs after routing, so the matched template is known.
pub async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(req.method());
    let start = Instant::now();
    let resp = next.run(req).await;
    st.metrics
        .observe(method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

pub async fn metrics(State(st): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(
            *st.versions.borrow(),
            st.tls_cert.as_deref().map(|c| (c, st.clock.now_secs())),
        ),
    )
}
