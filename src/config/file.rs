//! The file as written (config.toml): serde structs, every field with its documented
//! default. Validated into the types of `config` once, at start.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub admin_plane: AdminPlane,
    pub sidecar: Option<Sidecar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// "human" (default) or "json" (one JSON object per line). `--log-json` forces JSON.
    pub format: LogFormat,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// `[sidecar.tls]`, `[admin_plane.tls]`: the listener speaks HTTPS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first. Required. Reloaded on SIGHUP and when it changes.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Required.
    pub key_file: String,
    /// PEM bundle of the CAs client certificates must chain to. Required when
    /// `client_auth` is not "off"; refused when it is.
    pub client_ca_file: Option<String>,
    /// "off" (default): no client certificate asked for; "optional": asked for, a
    /// connection without one goes on; "required": the handshake fails without one.
    #[serde(default)]
    pub client_auth: ClientAuthMode,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    #[default]
    Off,
    Optional,
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminPlane {
    /// Default "127.0.0.1:8000".
    pub listen: String,
    /// HTTPS for the admin API, OAuth endpoints and /v1/sync. Default: none (plain HTTP).
    pub tls: Option<ServerTls>,
    /// A SQLite file, or a `postgres://user@host:port/dbname` URL (several replicas; the
    /// password from PERMISO_DATABASE_PASSWORD or `database_password_file`, never the
    /// URL). Default "permiso.db".
    pub database: String,
    /// PostgreSQL only: a file holding the password. Default: none.
    pub database_password_file: Option<String>,
    /// PostgreSQL only: connections per replica. Default 16.
    pub database_pool_size: usize,
    /// PostgreSQL only: the CA bundle its certificate must chain to with `sslmode=require` in
    /// the URL (the only mode that uses TLS, always verified). Default: the system roots.
    pub database_ca_file: Option<String>,
    /// How long old keys keep working after a rotation. Default 604800 (7 days).
    pub rotation_grace_seconds: u64,
    /// Largest accepted request body. Default 65536.
    pub max_body_bytes: usize,
    /// Largest request head (request line + headers); larger gets 431. Default 16384.
    pub max_header_bytes: usize,
    /// A client must send its request headers within this; else the connection is
    /// closed. Default 10000.
    pub header_read_timeout_ms: u64,
    /// ... and its body within this after the headers; else 408. Default 10000.
    pub body_read_timeout_ms: u64,
    /// Requests served on one connection before it is closed (`Connection: close` on the
    /// last response). Default 1000.
    pub max_requests_per_connection: u32,
    /// Connections open at once (every sidecar holds one for its long poll); more wait in
    /// the listen backlog. Keep the process's file-descriptor limit above it. Default 10000.
    pub max_connections: usize,
    /// Upper bound on `wait` for `/v1/sync` long polls. Default 30.
    pub sync_max_wait_seconds: u64,
    /// A sidecar that has not polled for this long is listed as stale and no longer counted
    /// when a change's propagation is checked. Must exceed `sync_max_wait_seconds` (a parked
    /// long poll is only seen at its start and end by other replicas). Default 120.
    pub sidecar_stale_after_seconds: u64,
    /// Sync requests (long polls included) one sync credential may have open at once;
    /// past it, 429 with Retry-After. Give each service's sidecars their own sync key, or
    /// raise this when many sidecars share one. Default 256.
    pub sync_max_concurrent_per_credential: usize,
    /// Active (unexpired, unrevoked) keys one service may hold. Default 10.
    pub max_active_keys_per_service: u32,
    /// `iss` of minted access tokens. Default "http://<listen>".
    pub issuer: Option<String>,
    /// `aud` of minted access tokens; sidecars must be configured with the same. Default "permiso".
    pub token_audience: String,
    /// After a signing-key rotation, how long the new key is published before it signs
    /// (lets JWKS caches pick it up). Default 300.
    pub signing_key_publish_delay_seconds: u64,
    /// Token endpoint requests per minute from one source address. Default 600.
    pub token_requests_per_minute_per_ip: u32,
    /// Removed: it counted a client's requests before the secret was checked, so anyone
    /// could lock a client out. Refused at start, naming its replacements.
    pub token_requests_per_minute_per_client: Option<u32>,
    /// Failed client-secret checks one (client id, source address) pair may make per
    /// minute; past that the pair gets 429 before the secret is checked. Successes never
    /// count. Default 10.
    pub client_auth_failures_per_minute: u32,
    /// Failed client-secret checks one source address (IPv6: one /64) may make per minute,
    /// whatever the client id. Default 30.
    pub client_auth_failures_per_minute_per_ip: u32,
    /// Failed admin-key attempts one source address (IPv6: one /64) may make per minute;
    /// past that its admin-key requests get 429 before the key is checked. Default 20.
    pub auth_failures_per_minute_per_ip: u32,
    /// Failed authentications written to the audit log per minute, all addresses
    /// together; the rest are counted in the next entry written. Default 600.
    pub audited_auth_failures_per_minute: u32,
    /// Serve the web console at `/console` (static pages that call this API with the admin
    /// key the operator types in). Default false; `permiso dev` turns it on.
    pub console: bool,
}

impl Default for AdminPlane {
    fn default() -> Self {
        AdminPlane {
            listen: "127.0.0.1:8000".into(),
            tls: None,
            database: "permiso.db".into(),
            database_password_file: None,
            database_pool_size: 16,
            database_ca_file: None,
            rotation_grace_seconds: 7 * 24 * 3600,
            max_body_bytes: 64 * 1024,
            max_header_bytes: 16 * 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            max_requests_per_connection: 1000,
            max_connections: 10_000,
            sync_max_wait_seconds: 30,
            sidecar_stale_after_seconds: 120,
            console: false,
            sync_max_concurrent_per_credential: 256,
            max_active_keys_per_service: 10,
            issuer: None,
            token_audience: "permiso".into(),
            signing_key_publish_delay_seconds: 300,
            token_requests_per_minute_per_ip: 600,
            token_requests_per_minute_per_client: None,
            client_auth_failures_per_minute: 10,
            client_auth_failures_per_minute_per_ip: 30,
            auth_failures_per_minute_per_ip: 20,
            audited_auth_failures_per_minute: 600,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// Where callers connect. Default "127.0.0.1:9001".
    #[serde(default = "default_sidecar_listen")]
    pub listen: String,
    /// HTTPS on `listen`. Default: none (plain HTTP).
    pub tls: Option<ServerTls>,
    /// The protected service, host:port, plain HTTP. Required.
    pub upstream: String,
    /// Which keys this sidecar accepts: "live" or "test". Default "live".
    #[serde(default = "default_env")]
    pub environment: String,
    /// Where the last applied snapshot is kept. Default "permiso-snapshot.json".
    #[serde(default = "default_snapshot_file")]
    pub snapshot_file: String,
    /// Proxy worker threads. Default 1.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Requests one client connection may make before the sidecar closes it. Default 1000.
    #[serde(default = "default_requests_per_connection")]
    pub max_requests_per_connection: u32,
    /// A new connection must deliver its first request head within this. Default 10000.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_ms: u64,
    /// A kept-alive connection must deliver its next request head within this, or it is
    /// closed. Default 60000.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// Once a request head is in, its body must arrive at `body_min_rate_bytes_per_second`
    /// on average after this grace, or the connection is closed. Default 10000.
    #[serde(default = "default_body_grace")]
    pub body_rate_grace_ms: u64,
    /// See `body_rate_grace_ms`. Default 1024.
    #[serde(default = "default_body_rate")]
    pub body_min_rate_bytes_per_second: u64,
    /// Client connections open at once on the proxy listener; at the limit the oldest idle
    /// one is closed for a new one (a new one is closed when none is idle). Lowered to fit
    /// the file-descriptor limit, which is raised to its hard limit at start. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds to let in-flight requests finish on SIGTERM. Default 10.
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// Match route prefixes with ASCII case significant. Default false: `/API/v1/Account`
    /// is judged by the `/api/v1/account` route, so an upstream that ignores case cannot
    /// be reached under a less protected spelling. Paths are forwarded as sent either way.
    #[serde(default)]
    pub case_sensitive_routes: bool,
    /// "enforce" (default) or "shadow": every route without its own `mode` forwards what it
    /// would deny (with `X-Permiso-Shadow-Denial`), and so does a request no route matches.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// `X-Forwarded-For` and `Forwarded` sent upstream: "overwrite" (the TCP peer only;
    /// whatever the caller sent is dropped) or "append" (the caller's chain, then the TCP
    /// peer; only behind a proxy you trust to set them). Default "overwrite".
    #[serde(default = "default_forwarded_for")]
    pub forwarded_for: String,
    /// Health listener (`/healthz`, `/readyz`). Default: none.
    pub admin_listen: Option<String>,
    /// `/readyz` fails when the last successful sync is older than this. Default 60.
    #[serde(default = "default_ready_age")]
    pub ready_max_snapshot_age_seconds: u64,
    /// How many calling services (the first seen) get their own label in the per-service
    /// request metric; the rest are summed as "other". Default 100.
    #[serde(default = "default_service_labels")]
    pub metrics_max_service_labels: usize,
    /// How often key last-used times are reported to the admin plane (one batch per
    /// interval, only keys used since the last one). Default 30000.
    #[serde(default = "default_usage_interval")]
    pub usage_report_interval_ms: u64,
    pub sync: Sync,
    #[serde(default)]
    pub tokens: Tokens,
    /// Calls out from the local service. Default: none (no egress listener).
    pub egress: Option<Egress>,
    /// Where rate limits are counted (`[sidecar.rate_limit]`).
    #[serde(default)]
    pub rate_limit: RateLimit,
    #[serde(default)]
    pub routes: Vec<Route>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    /// Where the local service sends its outgoing calls. Default "127.0.0.1:9100".
    #[serde(default = "default_egress_listen")]
    pub listen: String,
    /// Allow `listen` on a non-loopback address. Default false.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Retries of failed connections (and of idempotent requests) stop after this. Default 3000.
    #[serde(default = "default_retry_deadline")]
    pub retry_deadline_ms: u64,
    /// One attempt's timeout. Default 10000.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// Largest request body forwarded (bodies are buffered so they can be retried). Default 1048576.
    #[serde(default = "default_egress_body")]
    pub max_body_bytes: usize,
    /// Consecutive failures that open a destination's circuit. Default 5.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open circuit answers 503 at once. Default 5000.
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_ms: u64,
    pub destinations: std::collections::BTreeMap<String, Destination>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Base URL, e.g. "http://127.0.0.1:9002" (the destination's sidecar). Required.
    pub url: String,
    /// An API key from this environment variable ...
    pub api_key_env: Option<String>,
    /// ... or from this file (first line).
    pub api_key_file: Option<String>,
    /// Or client credentials: the client id ...
    pub client_id: Option<String>,
    /// ... and its secret from an environment variable ...
    pub client_secret_env: Option<String>,
    /// ... or a file (first line).
    pub client_secret_file: Option<String>,
    /// Scopes to request with client credentials. Default: all the client holds.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Token endpoint. Default "<sidecar.sync.admin_url>/oauth/token". Reached with the
    /// `[sidecar.sync]` TLS settings (it is the admin plane's).
    pub token_url: Option<String>,
    /// PEM CA bundle the destination's certificate must chain to. Default: system roots.
    pub ca_file: Option<String>,
    /// Client certificate chain (PEM) presented to the destination. Default: none.
    pub client_cert_file: Option<String>,
    /// Its private key (PEM). Required with `client_cert_file`.
    pub client_key_file: Option<String>,
}

fn default_egress_listen() -> String {
    "127.0.0.1:9100".into()
}
fn default_retry_deadline() -> u64 {
    3000
}
fn default_request_timeout() -> u64 {
    10_000
}
fn default_egress_body() -> usize {
    1024 * 1024
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> u64 {
    5000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tokens {
    /// The `aud` this sidecar accepts; must match the admin plane's token_audience.
    /// Default "permiso".
    pub audience: String,
    /// Clock skew tolerated on `exp`/`nbf`, seconds. Default 30.
    pub leeway_seconds: u64,
    /// Verified tokens remembered (by hash, never past their exp). Default 10000.
    pub cache_entries: usize,
    /// A token with an unknown `kid` triggers an early sync at most this often. Default 5000.
    pub early_sync_min_interval_ms: u64,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens {
            audience: "permiso".into(),
            leeway_seconds: 30,
            cache_entries: 10_000,
            early_sync_min_interval_ms: 5_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sync {
    /// Admin plane base URL. Required.
    pub admin_url: String,
    /// Environment variable holding the sidecar's key (needs `sync:read`).
    /// Default "PERMISO_SYNC_KEY". Ignored when `credential_file` is set.
    #[serde(default = "default_credential_env")]
    pub credential_env: String,
    /// File holding the key (first line). Default: none.
    pub credential_file: Option<String>,
    /// Long-poll duration asked of the admin plane. Default 25.
    #[serde(default = "default_wait")]
    pub wait_seconds: u64,
    /// PEM CA bundle the admin plane's certificate must chain to (sync, usage reports,
    /// egress token fetches). Default: system roots.
    pub ca_file: Option<String>,
    /// Client certificate chain (PEM) presented to the admin plane. Default: none.
    pub client_cert_file: Option<String>,
    /// Its private key (PEM). Required with `client_cert_file`.
    pub client_key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Path prefix, matched on segment boundaries. Required.
    pub prefix: String,
    /// Methods; default: any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Scopes all required. Default none (then `public` must be true).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Forward without authentication. Default false.
    #[serde(default)]
    pub public: bool,
    /// On a public route, pass the caller's `Authorization` header to the upstream.
    /// Default false: it is removed, so a credential sent to the wrong route never leaks.
    #[serde(default)]
    pub forward_authorization: bool,
    /// Only a trusted service (`is_trusted`) may call; others get 403 access_denied.
    /// Default false. Protected routes only.
    #[serde(default)]
    pub trusted: bool,
    /// "enforce" or "shadow" (would-be denials forwarded, flagged, counted). Default: the
    /// sidecar's `mode`.
    pub mode: Option<String>,
}

fn default_mode() -> String {
    "enforce".into()
}

pub(crate) fn default_header_read_timeout() -> u64 {
    10_000
}
pub(crate) fn default_idle_timeout() -> u64 {
    60_000
}
pub(crate) fn default_body_grace() -> u64 {
    10_000
}
pub(crate) fn default_body_rate() -> u64 {
    1024
}
pub(crate) fn default_max_connections() -> usize {
    10_000
}
fn default_forwarded_for() -> String {
    "overwrite".into()
}
fn default_sidecar_listen() -> String {
    "127.0.0.1:9001".into()
}
fn default_env() -> String {
    "live".into()
}
fn default_snapshot_file() -> String {
    "permiso-snapshot.json".into()
}
fn default_threads() -> usize {
    1
}
fn default_ready_age() -> u64 {
    60
}
pub(crate) fn default_requests_per_connection() -> u32 {
    1000
}
fn default_service_labels() -> usize {
    100
}
fn default_usage_interval() -> u64 {
    30_000
}
fn default_grace() -> u64 {
    10
}
fn default_credential_env() -> String {
    "PERMISO_SYNC_KEY".into()
}
fn default_wait() -> u64 {
    25
}

/// `[sidecar.rate_limit]`: the limiter of services whose `rate_limit_scope` is `cluster`
/// (services with `sidecar` scope are always counted here alone). Every key but `backend` is
/// optional so a key that would do nothing can be refused rather than ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// `local` (default): no shared counter; cluster-scope services get this sidecar's share
    /// (limit / `replicas`). `redis`: one count in Redis shared by every sidecar.
    #[serde(default)]
    pub backend: RateLimitBackend,
    /// `redis://host:port[/db]`; the password comes from PERMISO_REDIS_PASSWORD.
    pub redis_url: Option<String>,
    /// `redis_url` is one node of a Redis Cluster (the client learns the others and follows
    /// MOVED/ASK); default false: a standalone Redis.
    pub redis_cluster: Option<bool>,
    /// Prefix of every Redis key (default `permiso:rl:`), so several fleets or tests can share
    /// one Redis.
    pub key_prefix: Option<String>,
    /// Budget of one Redis round trip, connecting included (default 5 ms, 1..=1000).
    pub timeout_ms: Option<u64>,
    /// What a request of a cluster-scope service gets while Redis cannot answer: `local`
    /// (default: this sidecar's share, limit / `replicas`), `open` (no limit), `closed` (503).
    pub on_redis_error: Option<OnRedisError>,
    /// The number of sidecars in front of this upstream: each enforces 1/`replicas` of a
    /// cluster limit when counting alone. Required with `on_redis_error = "local"`; refused
    /// with "open" and "closed"; with the local backend it defaults to 1.
    pub replicas: Option<u32>,
    /// Consecutive Redis failures that open the breaker (default 3): while open, requests go
    /// straight to the fallback without waiting for Redis.
    pub breaker_failures: Option<u32>,
    /// How long the breaker stays open before one request tries Redis again (default 1000).
    pub breaker_cooldown_ms: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    Local,
    Open,
    Closed,
}

impl OnRedisError {
    pub fn name(self) -> &'static str {
        match self {
            OnRedisError::Local => "local",
            OnRedisError::Open => "open",
            OnRedisError::Closed => "closed",
        }
    }
}
