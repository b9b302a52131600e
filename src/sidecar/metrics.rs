//! The sidecar's Prometheus metrics. Every counter the request path touches is created at start,
//! so recording is one atomic add: no label lookup, no lock. What only matters when scraped
//! (snapshot version and age, per-service counts) is read from the snapshot at scrape time.
//! Labels are bounded: decision reasons are a fixed set, services are capped, and no key, token
//! or caller-controlled string ever becomes a label.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::core::denial::Denial;
use crate::core::snapshot::Snapshot;
use crate::sidecar::health::Health;

/// Request latency buckets, in seconds: 100 µs (a denial) to 10 s (a slow upstream).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// pingora's error types that a forwarded request can end with because of the upstream
/// (`ErrorType::as_str`); anything else counts as "other".
const UPSTREAM_ERROR_TYPES: &[&str] = &[
    "ConnectTimedout",
    "ConnectRefused",
    "ConnectNoRoute",
    "ConnectError",
    "TLSHandshakeFailure",
    "TLSHandshakeTimedout",
    "HandshakeError",
    "SocketError",
    "InvalidHTTPHeader",
    "H1Error",
    "H2Error",
    "ReadError",
    "WriteError",
    "ReadTimedout",
    "WriteTimedout",
    "ConnectionClosed",
    "HTTPStatus",
    "InternalError",
    "UnknownError",
];

/// Pre-resolved counters for one egress destination.
pub struct EgressCounters {
    pub relayed: IntCounter,
    pub circuit_open: IntCounter,
    pub credential_unavailable: IntCounter,
    pub destination_unreachable: IntCounter,
    pub latency: Histogram,
}

/// The decision class of one request, for the latency histogram.
#[derive(Debug, Clone, Copy)]
pub enum Decided {
    Allowed,
    Public,
    Denied,
}

/// Why the proxy listener closes a client connection itself (`connection_closed`).
pub const CONNECTION_CLOSE_REASONS: [&str; 5] =
    ["header_timeout", "idle_timeout", "slow_body", "shed", "refused"];

pub struct SidecarMetrics {
    registry: Registry,
    allowed: IntCounter,
    public: IntCounter,
    denials: HashMap<&'static str, IntCounter>,
    /// Would-be denials forwarded in shadow mode, by reason.
    shadow_denials: HashMap<&'static str, IntCounter>,
    /// Requests allowed with an API key in its rotation grace window.
    grace_key_requests: IntCounter,
    latency: [Histogram; 3],
    upstream_errors: HashMap<&'static str, IntCounter>,
    sync_ok: IntCounter,
    sync_failures: IntCounterVec,
    sync_lag: IntGauge,
    snapshot_writes: IntCounterVec,
    connections_closed: HashMap<&'static str, IntCounter>,
    open_connections: IntGauge,
    snapshot_version: IntGauge,
    snapshot_age: IntGauge,
    snapshot_keys: IntGauge,
    snapshot_services: IntGauge,
    token_cache_entries: IntGauge,
    tls_cert_expiry: prometheus::IntGaugeVec,
    tls_handshake_failures: IntCounter,
    tls_cert_reload_failures: IntCounterVec,
    usage_reports: IntCounterVec,
    egress_requests: IntCounterVec,
    egress_latency: prometheus::HistogramVec,
    max_service_labels: usize,
    /// Services with their own label in the per-service metric (see `service_requests`).
    labelled: std::sync::Mutex<std::collections::HashSet<Arc<str>>>,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl SidecarMetrics {
    /// `max_service_labels`: how many services get their own `service_id` label in
    /// `permiso_sidecar_service_requests_total`; the rest are summed as `service_id="other"`.
    pub fn new(max_service_labels: usize) -> SidecarMetrics {
        let registry = Registry::new();
        let decisions = counter_vec(
            &registry,
            "permiso_sidecar_decisions_total",
            "Requests by decision: outcome is the class (allowed, public, missing, invalid, revoked, expired, grace_ended, scope, ip, rate_limited, ...), reason the precise cause.",
            &["outcome", "reason"],
        );
        let allowed = decisions.with_label_values(&["allowed", "allowed"]);
        let public = decisions.with_label_values(&["public", "public"]);
        let denials = Denial::every_kind()
            .iter()
            .map(|d| {
                (
                    d.reason(),
                    decisions.with_label_values(&[d.outcome(), d.reason()]),
                )
            })
            .collect();
        let latency_vec = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "permiso_sidecar_request_duration_seconds",
                "Time from request start to the end of the response, by decision.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["decision"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(latency_vec.clone()))
            .expect("unique metric");
        let latency = ["allowed", "public", "denied"].map(|d| latency_vec.with_label_values(&[d]));
        let shadow_denials = {
            let vec = counter_vec(
                &registry,
                "permiso_sidecar_shadow_denials_total",
                "Requests forwarded in shadow mode that enforce mode would have denied, by reason (as in permiso_sidecar_decisions_total).",
                &["reason"],
            );
            Denial::every_kind()
                .iter()
                .map(|d| (d.reason(), vec.with_label_values(&[d.reason()])))
                .collect()
        };
        SidecarMetrics {
            allowed,
            public,
            denials,
            shadow_denials,
            grace_key_requests: counter(
                &registry,
                "permiso_sidecar_grace_key_requests_total",
                "Requests allowed with an API key that was rotated out and is in its grace window: callers still to move to the new key.",
            ),
            latency,
            upstream_errors: {
                let vec = counter_vec(
                    &registry,
                    "permiso_sidecar_upstream_errors_total",
                    "Forwarded requests that failed because of the upstream, by pingora error type.",
                    &["error"],
                );
                UPSTREAM_ERROR_TYPES
                    .iter()
                    .chain(&["other"])
                    .map(|t| (*t, vec.with_label_values(&[t])))
                    .collect()
            },
            sync_ok: counter(&registry, "permiso_sidecar_syncs_total", "Successful sync responses applied (including no-change long-poll answers)."),
            sync_failures: counter_vec(
                &registry,
                "permiso_sidecar_sync_failures_total",
                "Sync attempts that failed, by cause (request, status, invalid); the old snapshot is kept.",
                &["cause"],
            ),
            sync_lag: gauge(
                &registry,
                "permiso_sidecar_sync_lag_milliseconds",
                "For the last applied change: the admin plane's clock when it sent the payload to this sidecar's clock when the snapshot was in place.",
            ),
            snapshot_writes: {
                let c = counter_vec(
                    &registry,
                    "permiso_sidecar_snapshot_file_writes_total",
                    "Writes of the snapshot file, by result (ok, failed); /readyz turns 503 when writes keep failing for ready_max_snapshot_age_seconds.",
                    &["result"],
                );
                c.with_label_values(&["ok"]);
                c.with_label_values(&["failed"]);
                c
            },
            connections_closed: {
                let c = counter_vec(
                    &registry,
                    "permiso_sidecar_connections_closed_total",
                    "Client connections the proxy listener closed itself, by reason: header_timeout (a new connection's first request head took longer than header_read_timeout_ms), idle_timeout (a kept-alive one's next head, idle_timeout_ms), slow_body (a request body slower than body_min_rate_bytes_per_second after body_rate_grace_ms), shed (the oldest idle one, for a new one at max_connections), refused (a new one at max_connections with none idle).",
                    &["reason"],
                );
                CONNECTION_CLOSE_REASONS.iter().map(|r| (*r, c.with_label_values(&[r]))).collect()
            },
            open_connections: gauge(&registry, "permiso_sidecar_open_connections", "Client connections open on the proxy listener."),
            snapshot_version: gauge(&registry, "permiso_sidecar_snapshot_version", "Version of the snapshot in use (0: none)."),
            snapshot_age: gauge(
                &registry,
                "permiso_sidecar_snapshot_age_seconds",
                "Seconds since the last successful sync (or since the snapshot file was written, before the first).",
            ),
            snapshot_keys: gauge(&registry, "permiso_sidecar_snapshot_keys", "API keys in the snapshot in use."),
            snapshot_services: gauge(&registry, "permiso_sidecar_snapshot_services", "Services in the snapshot in use."),
            tls_handshake_failures: counter(
                &registry,
                "permiso_tls_handshake_failures_total",
                crate::admin::metrics::HANDSHAKE_FAILURES_HELP,
            ),
            tls_cert_reload_failures: counter_vec(
                &registry,
                "permiso_tls_cert_reload_failures_total",
                crate::admin::metrics::RELOAD_FAILURES_HELP,
                &["listener"],
            ),
            tls_cert_expiry: {
                let g = prometheus::IntGaugeVec::new(
                    Opts::new(
                        "permiso_tls_cert_expiry_seconds",
                        "Seconds until the certificate a TLS listener serves expires (negative: expired); a warning is logged under 14 days.",
                    ),
                    &["listener"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            token_cache_entries: gauge(
                &registry,
                "permiso_sidecar_token_cache_entries",
                "Verified access tokens in the cache (bounded by tokens.cache_entries; revoked ones are evicted when the deny list changes).",
            ),
            usage_reports: counter_vec(
                &registry,
                "permiso_sidecar_usage_reports_total",
                "Batched key-usage reports sent to the admin plane, by result (ok, failed).",
                &["result"],
            ),
            egress_requests: counter_vec(
                &registry,
                "permiso_sidecar_egress_requests_total",
                "Outgoing calls through the egress listener, by configured destination and outcome (relayed: the destination answered, whatever its status; circuit_open; credential_unavailable; destination_unreachable).",
                &["destination", "outcome"],
            ),
            egress_latency: {
                let h = prometheus::HistogramVec::new(
                    HistogramOpts::new(
                        "permiso_sidecar_egress_request_duration_seconds",
                        "Outgoing call latency through the egress listener, by destination, retries and token fetches included.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["destination"],
                )
                .expect("valid metric");
                registry.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            registry,
            max_service_labels,
            labelled: Default::default(),
        }
    }

    pub fn allowed(&self) {
        self.allowed.inc();
    }

    pub fn public(&self) {
        self.public.inc();
    }

    /// A would-be denial forwarded in shadow mode.
    pub fn shadow_denied(&self, d: &Denial) {
        if let Some(c) = self.shadow_denials.get(d.reason()) {
            c.inc();
        }
    }

    pub fn grace_key_request(&self) {
        self.grace_key_requests.inc();
    }

    pub fn denied(&self, d: &Denial) {
        if let Some(c) = self.denials.get(d.reason()) {
            c.inc();
        }
    }

    pub fn latency(&self, decided: Decided, seconds: f64) {
        self.latency[decided as usize].observe(seconds);
    }

    /// `kind` is pingora's `ErrorType::as_str`; the counters exist from start, so this is an
    /// atomic add, not a label lookup under prometheus's lock.
    pub fn upstream_error(&self, kind: &str) {
        let c = self
            .upstream_errors
            .get(kind)
            .or_else(|| self.upstream_errors.get("other"));
        if let Some(c) = c {
            c.inc();
        }
    }

    pub fn sync_succeeded(&self, lag_ms: Option<i64>) {
        self.sync_ok.inc();
        if let Some(ms) = lag_ms {
            self.sync_lag.set(ms.max(0));
        }
    }

    pub fn connection_closed(&self, reason: &'static str) {
        if let Some(c) = self.connections_closed.get(reason) {
            c.inc();
        }
    }

    pub fn snapshot_written(&self, ok: bool) {
        self.snapshot_writes
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    pub fn sync_failed(&self, cause: &'static str) {
        self.sync_failures.with_label_values(&[cause]).inc();
    }

    /// One destination's egress counters, resolved once when the egress listener starts
    /// (destinations come from the config, so the label set is bounded).
    pub fn egress(&self, destination: &str) -> EgressCounters {
        let c = |outcome: &str| self.egress_requests.with_label_values(&[destination, outcome]);
        EgressCounters {
            relayed: c("relayed"),
            circuit_open: c("circuit_open"),
            credential_unavailable: c("credential_unavailable"),
            destination_unreachable: c("destination_unreachable"),
            latency: self.egress_latency.with_label_values(&[destination]),
        }
    }

    /// The shared rate limiter's counters (created once, when the limiter is built).
    pub fn limiter_counters(&self) -> crate::sidecar::ratelimit::LimiterCounters {
        let calls = counter_vec(
            &self.registry,
            "permiso_ratelimit_redis_calls_total",
            "Calls to the shared (Redis) rate limiter by result: answered, timeout (over the time budget), error.",
            &["result"],
        );
        let fallback = counter_vec(
            &self.registry,
            "permiso_ratelimit_fallback_total",
            "Requests of cluster-scope services decided without Redis (it failed or the breaker was open), by the on_redis_error mode applied.",
            &["mode"],
        );
        crate::sidecar::ratelimit::LimiterCounters {
            answered: calls.with_label_values(&["answered"]),
            timeouts: calls.with_label_values(&["timeout"]),
            errors: calls.with_label_values(&["error"]),
            cached_refusals: counter(
                &self.registry,
                "permiso_ratelimit_cached_refusals_total",
                "429s of cluster-scope services answered without a round trip, repeating a refusal Redis gave before its wait ended.",
            ),
            fallback: ["local", "open", "closed"].map(|m| fallback.with_label_values(&[m])),
            up: gauge(
                &self.registry,
                "permiso_ratelimit_redis_up",
                "1 while the shared rate limiter's breaker is closed (Redis is asked), 0 while cluster-scope services fall back.",
            ),
        }
    }

    pub fn usage_report(&self, ok: bool) {
        self.usage_reports
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// The text exposition, with the snapshot-derived values read now.
    pub fn render(&self, health: &Health) -> String {
        let snapshot = health.current.load_full();
        if let Some(t) = &health.connections {
            self.open_connections.set(t.len() as i64);
        }
        let age = health.clock.now_secs() - health.last_sync.load(Ordering::Relaxed);
        self.snapshot_age.set(if snapshot.is_some() { age } else { 0 });
        self.snapshot_version
            .set(snapshot.as_ref().map_or(0, |s| s.version as i64));
        self.snapshot_keys
            .set(snapshot.as_ref().map_or(0, |s| s.key_count() as i64));
        self.snapshot_services
            .set(snapshot.as_ref().map_or(0, |s| s.service_count() as i64));
        self.token_cache_entries.set(health.token_cache.len() as i64);
        let now = health.clock.now_secs();
        let failures = crate::telemetry::tls_handshake_failures();
        self.tls_handshake_failures
            .inc_by(failures.saturating_sub(self.tls_handshake_failures.get()));
        for c in &health.certs {
            self.tls_cert_expiry
                .with_label_values(&[&*c.listener])
                .set(c.not_after() - now);
            let refused = self.tls_cert_reload_failures.with_label_values(&[&*c.listener]);
            refused.inc_by(c.failures().saturating_sub(refused.get()));
        }
        let mut families = self.registry.gather();
        if let Some(s) = &snapshot {
            // The encoder refuses a family without samples (no service has called yet).
            let per_service = prometheus::core::Collector::collect(&self.service_requests(s));
            families.extend(per_service.into_iter().filter(|f| !f.get_metric().is_empty()));
        }
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }

    /// Per-service request counts. The first `max_service_labels` services seen calling keep
    /// their own label for the life of the process; the rest are summed as "other". Fixed
    /// membership keeps every series a true counter (a ranking would move services in and out
    /// of "other" and make it go down), and a fleet of a million services cannot blow up a
    /// scrape. The set is only touched at scrape time.
    fn service_requests(&self, snapshot: &Snapshot) -> IntCounterVec {
        let vec = IntCounterVec::new(
            Opts::new(
                "permiso_sidecar_service_requests_total",
                "Allowed requests per calling service since the sidecar started.",
            ),
            &["service_id"],
        )
        .expect("valid metric");
        let mut labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        let mut other = 0;
        for service in snapshot.services_iter() {
            let n = service.usage.requests();
            if n == 0 {
                continue;
            }
            if labelled.contains(&service.id) || labelled.len() < self.max_service_labels {
                labelled.insert(service.id.clone());
                vec.with_label_values(&[&*service.id]).inc_by(n);
            } else {
                other += n;
            }
        }
        if other > 0 {
            vec.with_label_values(&["other"]).inc_by(other);
        }
        vec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_service_labels_stay_with_the_first_services_seen() {
        use crate::core::key::Environment;
        use crate::core::snapshot::fixtures::service;
        use crate::core::sync::SyncPayload;
        let payload = SyncPayload {
            epoch: "e".into(),
            version: 1,
            full: true,
            services: ["srv_a", "srv_b", "srv_c"]
                .iter()
                .map(|id| service(id, &[], vec![]))
                .collect(),
            ..Default::default()
        };
        let snap = Snapshot::from_full(&payload, Environment::Live, None).unwrap();
        let m = SidecarMetrics::new(1);
        let scrape = |m: &SidecarMetrics| {
            let families = prometheus::core::Collector::collect(&m.service_requests(&snap));
            prometheus::TextEncoder::new()
                .encode_to_string(&families)
                .unwrap()
        };
        snap.service("srv_b").unwrap().usage.record(None, 1);
        assert!(scrape(&m).contains("{service_id=\"srv_b\"} 1"));
        for _ in 0..5 {
            snap.service("srv_a").unwrap().usage.record(None, 1);
        }
        snap.service("srv_c").unwrap().usage.record(None, 1);
        let text = scrape(&m);
        assert!(text.contains("{service_id=\"srv_b\"} 1"), "{text}");
        assert!(
            text.contains("{service_id=\"other\"} 6"),
            "busier services do not take the label: {text}"
        );
        assert!(!text.contains("srv_a"));
    }

    #[test]
    fn every_denial_has_its_counter() {
        let m = SidecarMetrics::new(10);
        for d in Denial::every_kind() {
            m.denied(&d);
        }
        m.allowed();
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry.gather())
            .unwrap();
        assert!(text
            .contains("permiso_sidecar_decisions_total{outcome=\"grace_ended\",reason=\"grace_ended\"} 1"));
        assert!(
            text.contains("permiso_sidecar_decisions_total{outcome=\"revoked\",reason=\"jwt_revoked\"} 1")
        );
        assert!(text.contains("permiso_sidecar_decisions_total{outcome=\"allowed\",reason=\"allowed\"} 1"));
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("permiso_sidecar_decisions_total{"))
                .count(),
            Denial::every_kind().len() + 2
        );
    }
}
