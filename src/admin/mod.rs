//! The admin plane: an axum HTTP API over the storage (SQLite, or PostgreSQL for several
//! replicas). Handlers are thin: validate, call the storage, publish the new sync version,
//! answer.

pub mod audit;
pub mod auth;
pub mod console;
pub mod error;
pub mod extract;
pub mod fleet;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod oauth;
pub mod openapi;
pub mod services;
pub mod signing;
pub mod signing_keys;
pub mod storage;
pub mod sync;
pub mod throttle;
pub mod usage;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;

use crate::config::AdminConfig;
use crate::core::clock::SharedClock;
use error::ApiError;
use storage::{SharedStorage, StoreError, StoreResult};

pub struct Inner {
    /// `iss` of minted tokens and the base of the metadata URLs.
    pub issuer: String,
    /// The listener's certificate, when it serves TLS (for the expiry gauge).
    pub tls_cert: Option<Arc<crate::tls::ReloadingCert>>,
    pub store: SharedStorage,
    pub cfg: AdminConfig,
    pub clock: SharedClock,
    pub admin_key_hash: blake3::Hash,
    /// The latest committed sync version; long polls wait on it.
    pub versions: watch::Sender<u64>,
    /// Flips to true at shutdown so long polls end at once.
    pub shutdown: watch::Receiver<bool>,
    pub kek: signing::Kek,
    pub keyring: ArcSwap<signing::KeyRing>,
    /// Token endpoint throttles against secret guessing.
    pub ip_limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Failed client-secret checks per (client id, address) and per address.
    pub client_pair_failures: throttle::FailureThrottle<(String, IpAddr)>,
    pub client_addr_failures: throttle::FailureThrottle<IpAddr>,
    pub delta_cache: sync::DeltaCache,
    pub sync_slots: sync::SyncSlots,
    /// Failed admin-key attempts per source address.
    pub auth_failures: throttle::FailureThrottle,
    /// Failed authentications written to the audit log per minute.
    pub auth_audit_budget: throttle::AuditBudget,
    pub metrics: metrics::AdminMetrics,
    /// Open long polls of identified sidecars, and what was last recorded of each.
    pub fleet: fleet::Fleet,
}

pub type AppState = Arc<Inner>;

impl Inner {
    /// Awaits a storage call, turning its failure into the API's answer.
    pub async fn db<T>(
        &self,
        call: impl std::future::Future<Output = StoreResult<T>>,
    ) -> Result<T, ApiError> {
        self.db_named("resource", call).await
    }

    /// Same, naming the thing a NotFound refers to.
    pub async fn db_named<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = StoreResult<T>>,
    ) -> Result<T, ApiError> {
        call.await.map_err(|e: StoreError| ApiError::from_store(e, what))
    }

    /// Wakes long-polling sidecars after a commit.
    pub fn published(&self, version: u64) {
        self.versions.send_if_modified(|v| {
            if version > *v {
                *v = version;
                true
            } else {
                false
            }
        });
    }
}

pub fn router(state: AppState) -> Router {
    let console = state.cfg.console;
    let router = Router::new()
        .route("/auth/admin/audit", get(audit::list))
        .route("/v1/usage", post(usage::report))
        .route("/auth/admin/services", post(services::create).get(services::list))
        .route(
            "/auth/admin/services/{id}",
            get(services::show)
                .patch(services::patch)
                .delete(services::disable),
        )
        .route("/auth/admin/services/{id}/rotate", post(services::rotate))
        .route(
            "/auth/admin/services/{id}/keys/{key_id}/revoke",
            post(services::revoke),
        )
        .route(
            "/auth/admin/services/{id}/keys/{key_id}",
            axum::routing::patch(services::patch_key),
        )
        .route(
            "/auth/admin/services/{id}/secret/rotate",
            post(services::rotate_secret),
        )
        .route("/auth/admin/sidecars", get(fleet::list))
        .route("/auth/admin/changes/{version}", get(fleet::change))
        .route("/auth/admin/scopes", get(fleet::scopes))
        .route("/auth/admin/keys", get(keys::list))
        .route("/auth/admin/signing-keys", get(signing_keys::list))
        .route("/auth/admin/signing-keys/rotate", post(signing_keys::rotate))
        .route("/oauth/token", post(oauth::token))
        .route("/auth/service-token", post(oauth::service_token))
        .route("/oauth/introspect", post(oauth::introspect))
        .route("/oauth/revoke", post(oauth::revoke))
        .route("/.well-known/jwks.json", get(oauth::jwks))
        .route("/.well-known/oauth-authorization-server", get(oauth::metadata))
        .route("/v1/sync", get(sync::sync))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi_json))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics));
    let router = if console { console::routes(router) } else { router };
    router
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .with_state(state)
}

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = openapi::Health)), security(()))]
async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// The OpenAPI 3.1 document of this API (`openapi`), built once.
async fn openapi_json() -> axum::response::Response {
    use axum::response::IntoResponse;
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(openapi::document).clone();
    ([(axum::http::header::CONTENT_TYPE, "application/json")], doc).into_response()
}

/// Ready when the database accepts a write transaction.
#[utoipa::path(
    get, path = "/readyz", tag = "health",
    responses(
        (status = 200, body = openapi::Ready),
        (status = 503, description = "The database does not accept writes", body = openapi::Ready),
    ),
    security(())
)]
async fn readyz(axum::extract::State(st): axum::extract::State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match st.store.check_writable().await {
        Ok(()) => axum::Json(serde_json::json!({"ready": true})).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"ready": false, "reason": "database not writable"})),
        )
            .into_response(),
    }
}

/// A running admin plane on its own thread and runtime, so it can be stopped and restarted
/// independently (tests, `permiso dev`).
pub struct AdminHandle {
    pub addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminHandle {
    /// Stops accepting, ends long polls, waits for in-flight requests, closes the database.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn build_state(
    cfg: AdminConfig,
    store: SharedStorage,
    clock: SharedClock,
    tls_cert: Option<Arc<crate::tls::ReloadingCert>>,
    shutdown: watch::Receiver<bool>,
    bound: SocketAddr,
) -> anyhow::Result<AppState> {
    let sqlite_file = match &cfg.database {
        crate::config::Database::Sqlite(p) => Some(p.as_path()),
        crate::config::Database::Postgres(_) => None,
    };
    let kek = signing::Kek::load(sqlite_file, cfg.signing_kek.as_ref().map(|s| s.expose()))?;
    let mut ring = signing::KeyRing::load(&*store, &kek).await?;
    if ring.signer_at(clock.now_secs()).is_none() {
        // First start: a key that signs at once (nothing can have cached an older JWKS).
        let now = clock.now_secs();
        let (kid, _) = signing::add_key(&*store, &kek, now, now, &storage::Audit::system()).await?;
        tracing::info!(kid = %kid, "created the first token signing key");
        ring = signing::KeyRing::load(&*store, &kek).await?;
    }
    let version = store.version().await?;
    let auth_failure_limit = cfg.auth_failures_per_minute_per_ip;
    let audit_budget = cfg.audited_auth_failures_per_minute;
    let sync_slots = sync::SyncSlots::new(cfg.sync_max_concurrent_per_credential);
    Ok(Arc::new(Inner {
        issuer: cfg
            .issuer
            .clone()
            .unwrap_or_else(|| format!("{}://{bound}", if cfg.tls.is_some() { "https" } else { "http" })),
        tls_cert,
        admin_key_hash: blake3::hash(cfg.admin_api_key.expose().as_bytes()),
        ip_limiter: RateLimiter::keyed(Quota::per_minute(cfg.token_rate_per_ip)),
        client_pair_failures: throttle::FailureThrottle::new(cfg.client_auth_failures_per_minute),
        client_addr_failures: throttle::FailureThrottle::new(cfg.client_auth_failures_per_minute_per_ip),
        store,
        cfg,
        clock,
        versions: watch::channel(version).0,
        shutdown,
        kek,
        keyring: ArcSwap::from_pointee(ring),
        delta_cache: sync::DeltaCache::default(),
        sync_slots,
        auth_failures: throttle::FailureThrottle::new(auth_failure_limit),
        auth_audit_budget: throttle::AuditBudget::new(audit_budget),
        metrics: metrics::AdminMetrics::default(),
        fleet: fleet::Fleet::default(),
    }))
}

/// Follows commits made by other replicas (PostgreSQL): on a notification, and every second
/// as a safety net for a lost one, reads the version; when it moved, wakes this replica's long
/// polls and reloads the signing keys if they changed (a rotation through another replica is
/// served here at once). With SQLite this process is the only writer and it only ticks.
async fn follow_other_writers(st: AppState, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = st.store.changed_elsewhere() => {}
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Ok(version) = st.store.version().await else {
            continue;
        };
        if version <= *st.versions.borrow() {
            continue;
        }
        if let Ok(rows) = st.store.signing_keys().await {
            let ring = st.keyring.load();
            if rows.iter().map(|r| &r.kid).ne(ring.rows().iter().map(|r| &r.kid)) {
                match signing::KeyRing::load(&*st.store, &st.kek).await {
                    Ok(ring) => st.keyring.store(Arc::new(ring)),
                    Err(e) => {
                        tracing::error!(error = %e, "reloading signing keys written by another replica")
                    }
                }
            }
        }
        st.published(version);
    }
}

/// The token endpoint's keyed limiter keeps an entry per address it has seen; drop the ones
/// whose state is back to full so a spray of addresses cannot grow it without bound.
async fn prune_throttles(st: AppState, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                st.ip_limiter.retain_recent();
                st.ip_limiter.shrink_to_fit();
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// The admin plane's TLS listener config and certificate, read at start.
pub struct AdminTls {
    config: Arc<rustls::ServerConfig>,
    cert: Arc<crate::tls::ReloadingCert>,
}

impl AdminTls {
    pub fn load(cfg: &AdminConfig) -> Result<Option<AdminTls>, crate::tls::TlsError> {
        let Some(t) = &cfg.tls else { return Ok(None) };
        let cert = crate::tls::ReloadingCert::load("admin", t.cert_file.clone(), t.key_file.clone())?;
        Ok(Some(AdminTls {
            config: crate::tls::server_config(t, cert.clone())?,
            cert,
        }))
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: AdminConfig,
    clock: SharedClock,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tls = AdminTls::load(&cfg)?;
    let store = storage::open(&cfg.database, cfg.database_password.as_ref())
        .await
        .map_err(|e| anyhow::anyhow!("opening database {}: {e}", cfg.database.describe()))?;
    serve_prepared(listener, cfg, store, tls, clock, shutdown).await
}

async fn serve_prepared(
    listener: tokio::net::TcpListener,
    cfg: AdminConfig,
    store: SharedStorage,
    tls: Option<AdminTls>,
    clock: SharedClock,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tls_cert = tls.as_ref().map(|t| t.cert.clone());
    if let Some(c) = &tls_cert {
        // New certificate files are taken up without a restart.
        tokio::spawn(crate::tls::reload::watch(
            vec![c.clone()],
            std::time::Duration::from_secs(2),
            clock.clone(),
            shutdown.clone(),
        ));
    }
    let state = build_state(
        cfg,
        store,
        clock,
        tls_cert,
        shutdown.clone(),
        listener.local_addr()?,
    )
    .await?;
    tracing::info!(
        addr = %listener.local_addr()?,
        epoch = state.store.epoch(),
        database = %state.cfg.database.describe(),
        backend = state.store.backend(),
        "admin plane listening"
    );
    tokio::spawn(prune_throttles(state.clone(), shutdown.clone()));
    tokio::spawn(fleet::writer(state.clone(), shutdown.clone()));
    tokio::spawn(follow_other_writers(state.clone(), shutdown.clone()));
    let limits = crate::http_server::ConnLimits {
        max_header_bytes: state.cfg.max_header_bytes,
        header_read_timeout: state.cfg.header_read_timeout,
        max_requests_per_connection: state.cfg.max_requests_per_connection,
        max_connections: state.cfg.max_connections,
        at_capacity: crate::http_server::AtCapacity::Wait,
    };
    crate::http_server::serve(listener, router(state), limits, tls.map(|t| t.config), shutdown).await?;
    Ok(())
}

/// Binds `cfg.listen` (port 0 picks one) and serves on a dedicated thread.
pub fn start(cfg: AdminConfig, clock: SharedClock) -> anyhow::Result<AdminHandle> {
    let std_listener = std::net::TcpListener::bind(cfg.listen)?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let (tx, rx) = watch::channel(false);
    // Read the certificate and open the database here so errors surface to the caller, not
    // in the thread.
    let tls = AdminTls::load(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let store = rt
        .block_on(storage::open(&cfg.database, cfg.database_password.as_ref()))
        .map_err(|e| anyhow::anyhow!("opening database {}: {e}", cfg.database.describe()))?;
    let thread = std::thread::Builder::new()
        .name("permiso-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                if let Err(e) = serve_prepared(listener, cfg, store, tls, clock, rx).await {
                    tracing::error!(error = %e, "admin plane stopped with an error");
                }
            });
        })?;
    Ok(AdminHandle {
        addr,
        stop: Some(tx),
        thread: Some(thread),
    })
}
