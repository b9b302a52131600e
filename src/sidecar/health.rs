//! The sidecar's health listener: `/healthz` (the process answers) and `/readyz` (it holds a
//! snapshot whose last successful sync is recent enough to trust, and its snapshot file has not
//! been failing to write for longer than that) and `/metrics` (Prometheus).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::core::clock::SharedClock;
use crate::core::snapshot::Snapshot;

pub struct Health {
    pub current: Arc<ArcSwapOption<Snapshot>>,
    pub last_sync: Arc<AtomicI64>,
    /// Unix seconds of the first of the current run of failed snapshot-file writes; 0 while
    /// the last write succeeded.
    pub write_failing_since: Arc<AtomicI64>,
    pub clock: SharedClock,
    pub max_age: Duration,
    pub metrics: Arc<crate::sidecar::metrics::SidecarMetrics>,
    /// The proxy listener's connections, for the open-connections gauge.
    pub connections: Option<Arc<crate::conn_limit::ConnTable>>,
    /// For the token-cache gauge.
    pub token_cache: Arc<crate::core::token_cache::TokenCache>,
    /// Listener certificates, for the expiry gauge.
    pub certs: Vec<Arc<crate::tls::ReloadingCert>>,
}

async fn metrics(State(h): State<Arc<Health>>) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.metrics.render(&h),
    )
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, Json<Value>) {
    let Some(snap) = h.current.load_full() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "no snapshot"})),
        );
    };
    let now = h.clock.now_secs();
    let failing_since = h.write_failing_since.load(Ordering::Relaxed);
    if failing_since != 0 && now - failing_since > h.max_age.as_secs() as i64 {
        // What a restart would come back with is older than we accept: say so, so the
        // orchestrator sees a full disk or a broken volume before it matters.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "ready": false,
                "reason": "snapshot file cannot be written",
                "failing_for_seconds": now - failing_since,
                "snapshot_version": snap.version,
            })),
        );
    }
    let age = now - h.last_sync.load(Ordering::Relaxed);
    if age > h.max_age.as_secs() as i64 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"ready": false, "reason": "snapshot too old", "snapshot_age_seconds": age, "snapshot_version": snap.version}),
            ),
        );
    }
    (
        StatusCode::OK,
        Json(
            json!({"ready": true, "snapshot_age_seconds": age, "snapshot_version": snap.version, "keys": snap.key_count()}),
        ),
    )
}

/// Open connections the health listener holds at once; past it the oldest idle one is closed
/// for the new one, so probes get through a flood of idle or slow connections.
pub const MAX_CONNECTIONS: usize = 256;

/// Binds and serves on its own thread until `shutdown` turns true.
pub fn spawn(
    listen: SocketAddr,
    health: Health,
    header_read_timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(health));
    let limits = crate::http_server::ConnLimits {
        max_header_bytes: 16 * 1024,
        header_read_timeout,
        max_requests_per_connection: 1000,
        max_connections: MAX_CONNECTIONS,
        at_capacity: crate::http_server::AtCapacity::ShedOldestIdle,
    };
    let thread = crate::sidecar::spawn_on_own_thread("permiso-health", async move {
        let l = tokio::net::TcpListener::from_std(listener).expect("listener");
        let _ = crate::http_server::serve(l, app, limits, None, shutdown).await;
    })?;
    Ok((addr, thread))
}
