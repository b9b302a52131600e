//! Configuration in two layers: `file::*` mirrors config.toml with serde defaults; `Config`
//! types are validated once (addresses resolved, scopes and routes parsed) and are what the
//! program uses. Bad config is an error, never a panic.

pub mod database;
pub use database::Database;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::core::key::{Environment, Secret};
use crate::core::routes::{Access, Route, RouteTable};
use crate::core::scope::Scope;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The file as written. Every field documents its default.
pub mod file {
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
    }

    impl Default for AdminPlane {
        fn default() -> Self {
            AdminPlane {
                listen: "127.0.0.1:8000".into(),
                tls: None,
                database: "permiso.db".into(),
                database_password_file: None,
                database_pool_size: 16,
                rotation_grace_seconds: 7 * 24 * 3600,
                max_body_bytes: 64 * 1024,
                max_header_bytes: 16 * 1024,
                header_read_timeout_ms: 10_000,
                body_read_timeout_ms: 10_000,
                max_requests_per_connection: 1000,
                max_connections: 10_000,
                sync_max_wait_seconds: 30,
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
    }

    fn default_header_read_timeout() -> u64 {
        10_000
    }
    fn default_idle_timeout() -> u64 {
        60_000
    }
    fn default_body_grace() -> u64 {
        10_000
    }
    fn default_body_rate() -> u64 {
        1024
    }
    fn default_max_connections() -> usize {
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
    fn default_requests_per_connection() -> u32 {
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
}

/// Validated admin plane settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub database: Database,
    /// From PERMISO_DATABASE_PASSWORD (read by the binary); else `database_password_file`.
    pub database_password: Option<Secret>,
    pub rotation_grace: Duration,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_requests_per_connection: u32,
    pub max_connections: usize,
    pub sync_max_wait: Duration,
    pub sync_max_concurrent_per_credential: usize,
    pub max_active_keys_per_service: u32,
    pub admin_api_key: Secret,
    /// None: "http://<bound address>".
    pub issuer: Option<String>,
    pub token_audience: String,
    pub signing_key_publish_delay: Duration,
    pub token_rate_per_ip: std::num::NonZeroU32,
    pub client_auth_failures_per_minute: u32,
    pub client_auth_failures_per_minute_per_ip: u32,
    pub auth_failures_per_minute_per_ip: u32,
    pub audited_auth_failures_per_minute: u32,
    /// From PERMISO_SIGNING_KEK (read by the binary, like the admin key); None means the
    /// `<database>.kek` file.
    pub signing_kek: Option<Secret>,
    pub tls: Option<crate::tls::ServerTls>,
}

/// Validated sidecar settings.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub listen: SocketAddr,
    pub tls: Option<crate::tls::ServerTls>,
    /// How sync, usage reports and egress token fetches reach the admin plane.
    pub sync_tls: crate::tls::ClientTls,
    pub upstream: SocketAddr,
    pub environment: Environment,
    pub snapshot_file: PathBuf,
    pub threads: usize,
    pub max_requests_per_connection: u32,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_rate_grace: Duration,
    pub body_min_rate: u64,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub admin_listen: Option<SocketAddr>,
    pub ready_max_snapshot_age: Duration,
    pub metrics_max_service_labels: usize,
    pub usage_report_interval: Duration,
    pub admin_url: String,
    pub sync_credential: Secret,
    pub sync_wait: Duration,
    pub routes: RouteTable,
    pub forwarded_for: ForwardedFor,
    pub tokens: TokenSettings,
    pub egress: Option<EgressConfig>,
}

/// How the sidecar sets `X-Forwarded-For` and `Forwarded` for the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// The TCP peer only.
    Overwrite,
    /// The caller's values, then the TCP peer.
    Append,
}

/// Validated egress settings, with credentials already read.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    pub listen: SocketAddr,
    pub retry_deadline: Duration,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub destinations: Vec<EgressDestination>,
}

#[derive(Debug, Clone)]
pub struct EgressDestination {
    pub name: String,
    /// Without a trailing '/'.
    pub url: String,
    pub tls: crate::tls::ClientTls,
    pub credential: EgressCredential,
}

#[derive(Debug, Clone)]
pub enum EgressCredential {
    ApiKey(Secret),
    ClientCredentials {
        client_id: String,
        secret: Secret,
        scopes: Vec<String>,
        token_url: String,
    },
}

/// How a sidecar checks JWT access tokens.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    pub audience: String,
    pub leeway_secs: i64,
    pub cache_entries: usize,
    pub early_sync_min_interval: Duration,
}

pub const MIN_ADMIN_KEY_LEN: usize = 24;

pub fn load_file(path: &Path) -> Result<file::FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(&text, path)
}

pub fn parse_file(text: &str, path: &Path) -> Result<file::FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

fn resolve(field: &str, addr: &str) -> Result<SocketAddr, ConfigError> {
    addr.to_socket_addrs()
        .map_err(|e| invalid(field, format!("{addr:?}: {e}")))?
        .next()
        .ok_or_else(|| invalid(field, format!("{addr:?} resolves to nothing")))
}

impl AdminConfig {
    pub fn from_file(f: &file::AdminPlane, admin_api_key: Option<String>) -> Result<Self, ConfigError> {
        let key = admin_api_key.ok_or_else(|| {
            invalid(
                "PERMISO_ADMIN_API_KEY",
                "must be set: the admin plane refuses to run without an admin key",
            )
        })?;
        if key.len() < MIN_ADMIN_KEY_LEN {
            return Err(invalid(
                "PERMISO_ADMIN_API_KEY",
                format!("must be at least {MIN_ADMIN_KEY_LEN} characters"),
            ));
        }
        if f.max_body_bytes < 1024 {
            return Err(invalid("admin_plane.max_body_bytes", "must be at least 1024"));
        }
        if f.sync_max_wait_seconds == 0 || f.sync_max_wait_seconds > 300 {
            return Err(invalid("admin_plane.sync_max_wait_seconds", "must be 1..=300"));
        }
        if f.max_active_keys_per_service == 0 {
            return Err(invalid(
                "admin_plane.max_active_keys_per_service",
                "must be at least 1",
            ));
        }
        let listen = resolve("admin_plane.listen", &f.listen)?;
        let issuer = f.issuer.clone();
        if issuer.as_ref().is_some_and(|i| i.is_empty() || i.ends_with('/')) {
            return Err(invalid(
                "admin_plane.issuer",
                "must be a URL without a trailing '/'",
            ));
        }
        if !(8192..=1024 * 1024).contains(&f.max_header_bytes) {
            return Err(invalid("admin_plane.max_header_bytes", "must be 8192..=1048576"));
        }
        if f.header_read_timeout_ms == 0 || f.body_read_timeout_ms == 0 {
            return Err(invalid(
                "admin_plane.header_read_timeout_ms / body_read_timeout_ms",
                "must be at least 1",
            ));
        }
        if f.max_connections == 0 {
            return Err(invalid("admin_plane.max_connections", "must be at least 1"));
        }
        if f.max_requests_per_connection == 0 {
            return Err(invalid(
                "admin_plane.max_requests_per_connection",
                "must be at least 1",
            ));
        }
        if f.token_audience.is_empty() {
            return Err(invalid("admin_plane.token_audience", "must not be empty"));
        }
        let rate = |field: &str, v: u32| {
            std::num::NonZeroU32::new(v).ok_or_else(|| invalid(field, "must be at least 1"))
        };
        if f.token_requests_per_minute_per_client.is_some() {
            return Err(invalid(
                "admin_plane.token_requests_per_minute_per_client",
                "was removed (it let anyone lock a client out by failing with its id); use client_auth_failures_per_minute and client_auth_failures_per_minute_per_ip, which count failures only",
            ));
        }
        Ok(AdminConfig {
            token_rate_per_ip: rate(
                "admin_plane.token_requests_per_minute_per_ip",
                f.token_requests_per_minute_per_ip,
            )?,
            client_auth_failures_per_minute: rate(
                "admin_plane.client_auth_failures_per_minute",
                f.client_auth_failures_per_minute,
            )?
            .get(),
            client_auth_failures_per_minute_per_ip: rate(
                "admin_plane.client_auth_failures_per_minute_per_ip",
                f.client_auth_failures_per_minute_per_ip,
            )?
            .get(),
            auth_failures_per_minute_per_ip: rate(
                "admin_plane.auth_failures_per_minute_per_ip",
                f.auth_failures_per_minute_per_ip,
            )?
            .get(),
            audited_auth_failures_per_minute: rate(
                "admin_plane.audited_auth_failures_per_minute",
                f.audited_auth_failures_per_minute,
            )?
            .get(),
            issuer,
            token_audience: f.token_audience.clone(),
            signing_key_publish_delay: Duration::from_secs(f.signing_key_publish_delay_seconds),
            signing_kek: None,
            tls: f
                .tls
                .as_ref()
                .map(|t| server_tls("admin_plane.tls", t))
                .transpose()?,
            listen,
            database: database::parse(
                &f.database,
                f.database_password_file.as_deref(),
                f.database_pool_size,
            )?,
            database_password: None,
            rotation_grace: Duration::from_secs(f.rotation_grace_seconds),
            max_body_bytes: f.max_body_bytes,
            max_header_bytes: f.max_header_bytes,
            header_read_timeout: Duration::from_millis(f.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(f.body_read_timeout_ms),
            max_requests_per_connection: f.max_requests_per_connection,
            max_connections: f.max_connections,
            sync_max_wait: Duration::from_secs(f.sync_max_wait_seconds),
            sync_max_concurrent_per_credential: match f.sync_max_concurrent_per_credential {
                0 => {
                    return Err(invalid(
                        "admin_plane.sync_max_concurrent_per_credential",
                        "must be at least 1",
                    ))
                }
                n => n,
            },
            max_active_keys_per_service: f.max_active_keys_per_service,
            admin_api_key: Secret::new(key),
        })
    }
}

/// Reads the sidecar's sync key from its file or environment variable.
pub fn read_sync_credential(s: &file::Sync) -> Result<Secret, ConfigError> {
    let value = match &s.credential_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| invalid("sidecar.sync.credential_file", format!("{p}: {e}")))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        None => std::env::var(&s.credential_env).map_err(|_| {
            invalid(
                "sidecar.sync.credential_env",
                format!("environment variable {} is not set", s.credential_env),
            )
        })?,
    };
    if value.is_empty() {
        return Err(invalid("sidecar.sync", "the sync credential is empty"));
    }
    Ok(Secret::new(value))
}

fn build_routes(routes: &[file::Route], case_sensitive: bool) -> Result<RouteTable, ConfigError> {
    let mut out = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        let field = format!("sidecar.routes[{i}]");
        if !r.prefix.starts_with('/') {
            return Err(invalid(
                field,
                format!("prefix {:?} must start with '/'", r.prefix),
            ));
        }
        // Requests are routed on their canonical path, so a prefix in another spelling could
        // never match.
        match crate::core::path::canonicalize(&r.prefix) {
            Ok(c) if c == r.prefix => {}
            Ok(c) => {
                return Err(invalid(
                    &field,
                    format!(
                        "prefix {:?} is not in canonical form; write it as {c:?}",
                        r.prefix
                    ),
                ))
            }
            Err(e) => {
                return Err(invalid(
                    &field,
                    format!("prefix {:?}: {}", r.prefix, e.describe()),
                ))
            }
        }
        let methods: Vec<String> = r.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        if let Some(m) = methods
            .iter()
            .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(invalid(&field, format!("method {m:?} is not a method name")));
        }
        let access = match (r.public, r.scopes.is_empty()) {
            (true, true) => Access::Public,
            (true, false) => return Err(invalid(field, "a public route cannot require scopes")),
            (false, true) => {
                return Err(invalid(
                    field,
                    "a protected route needs at least one scope (or public = true)",
                ))
            }
            (false, false) => Access::Scopes(
                r.scopes
                    .iter()
                    .map(|s| Scope::parse(s).map_err(|e| invalid(&field, e.to_string())))
                    .collect::<Result<_, _>>()?,
            ),
        };
        if r.forward_authorization && access != Access::Public {
            return Err(invalid(
                field,
                "forward_authorization applies to public routes only (protected routes never forward the credential)",
            ));
        }
        let mut route = Route::new(methods, r.prefix.clone(), access);
        route.forward_authorization = r.forward_authorization;
        out.push(route);
    }
    Ok(RouteTable::with_case(out, case_sensitive))
}

fn read_secret(
    field: &str,
    env: &Option<String>,
    file: &Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    let value = match (env, file) {
        (Some(_), Some(_)) => return Err(invalid(field, "set the _env or the _file form, not both")),
        (Some(var), None) => std::env::var(var)
            .map_err(|_| invalid(field, format!("environment variable {var} is not set")))?,
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| invalid(field, format!("{path}: {e}")))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    if value.is_empty() {
        return Err(invalid(field, "the credential is empty"));
    }
    Ok(Some(Secret::new(value)))
}

/// A TLS listener's settings: both files named, a CA exactly when client certificates are
/// asked for. The files themselves are read at start (and on reload), not here.
fn server_tls(field: &str, t: &file::ServerTls) -> Result<crate::tls::ServerTls, ConfigError> {
    use crate::tls::ClientAuth;
    if t.cert_file.is_empty() || t.key_file.is_empty() {
        return Err(invalid(field, "cert_file and key_file are both required"));
    }
    let client_auth = match t.client_auth {
        file::ClientAuthMode::Off => ClientAuth::Off,
        file::ClientAuthMode::Optional => ClientAuth::Optional,
        file::ClientAuthMode::Required => ClientAuth::Required,
    };
    match (client_auth, &t.client_ca_file) {
        (ClientAuth::Off, Some(_)) => {
            return Err(invalid(
                format!("{field}.client_ca_file"),
                "set while client_auth is \"off\": no client certificate would be asked for; set client_auth = \"optional\" or \"required\"",
            ))
        }
        (ClientAuth::Optional | ClientAuth::Required, None) => {
            return Err(invalid(
                format!("{field}.client_ca_file"),
                "required when client_auth is \"optional\" or \"required\"",
            ))
        }
        _ => {}
    }
    Ok(crate::tls::ServerTls {
        cert_file: PathBuf::from(&t.cert_file),
        key_file: PathBuf::from(&t.key_file),
        client_ca_file: t.client_ca_file.as_ref().map(PathBuf::from),
        client_auth,
    })
}

/// A client's TLS settings: a certificate and its key go together.
fn client_tls(
    field: &str,
    ca: &Option<String>,
    cert: &Option<String>,
    key: &Option<String>,
) -> Result<crate::tls::ClientTls, ConfigError> {
    if cert.is_some() != key.is_some() {
        return Err(invalid(field, "client_cert_file and client_key_file go together"));
    }
    Ok(crate::tls::ClientTls {
        ca_file: ca.as_ref().map(PathBuf::from),
        client_cert_file: cert.as_ref().map(PathBuf::from),
        client_key_file: key.as_ref().map(PathBuf::from),
    })
}

fn build_egress(e: &file::Egress, admin_url: &str) -> Result<EgressConfig, ConfigError> {
    let listen = resolve("sidecar.egress.listen", &e.listen)?;
    if !listen.ip().is_loopback() && !e.allow_non_loopback {
        return Err(invalid(
            "sidecar.egress.listen",
            "must be a loopback address (anyone who reaches it calls out with this service's credentials); set allow_non_loopback to override",
        ));
    }
    if e.destinations.is_empty() {
        return Err(invalid("sidecar.egress.destinations", "no destinations"));
    }
    let mut destinations = Vec::new();
    for (name, d) in &e.destinations {
        let field = format!("sidecar.egress.destinations.{name}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                &field,
                "a destination name is letters, digits, '-' and '_'",
            ));
        }
        if !(d.url.starts_with("http://") || d.url.starts_with("https://")) {
            return Err(invalid(&field, "url must be http:// or https://"));
        }
        let key = read_secret(&format!("{field}.api_key"), &d.api_key_env, &d.api_key_file)?;
        let secret = read_secret(
            &format!("{field}.client_secret"),
            &d.client_secret_env,
            &d.client_secret_file,
        )?;
        let credential = match (key, &d.client_id, secret) {
            (Some(k), None, None) => EgressCredential::ApiKey(k),
            (None, Some(id), Some(secret)) => {
                for s in &d.scopes {
                    Scope::parse(s).map_err(|e| invalid(&field, e.to_string()))?;
                }
                EgressCredential::ClientCredentials {
                    client_id: id.clone(),
                    secret,
                    scopes: d.scopes.clone(),
                    token_url: d.token_url.clone().unwrap_or_else(|| format!("{admin_url}/oauth/token")),
                }
            }
            _ => {
                return Err(invalid(
                    field,
                    "needs exactly one credential: api_key_env/api_key_file, or client_id with client_secret_env/client_secret_file",
                ))
            }
        };
        destinations.push(EgressDestination {
            tls: client_tls(&field, &d.ca_file, &d.client_cert_file, &d.client_key_file)?,
            name: name.clone(),
            url: d.url.trim_end_matches('/').to_string(),
            credential,
        });
    }
    Ok(EgressConfig {
        listen,
        retry_deadline: Duration::from_millis(e.retry_deadline_ms),
        request_timeout: Duration::from_millis(e.request_timeout_ms.max(1)),
        max_body_bytes: e.max_body_bytes,
        breaker_failures: e.breaker_failures.max(1),
        breaker_cooldown: Duration::from_millis(e.breaker_cooldown_ms),
        destinations,
    })
}

impl SidecarConfig {
    /// `credential` is passed in so tests and `permiso dev` can hand one over directly.
    pub fn from_file(f: &file::Sidecar, credential: Secret) -> Result<Self, ConfigError> {
        let environment = Environment::parse(&f.environment)
            .ok_or_else(|| invalid("sidecar.environment", "must be \"live\" or \"test\""))?;
        if f.threads == 0 || f.threads > 256 {
            return Err(invalid("sidecar.threads", "must be 1..=256"));
        }
        if !(f.sync.admin_url.starts_with("http://") || f.sync.admin_url.starts_with("https://")) {
            return Err(invalid(
                "sidecar.sync.admin_url",
                "must be an http:// or https:// URL",
            ));
        }
        if f.sync.wait_seconds == 0 || f.sync.wait_seconds > 300 {
            return Err(invalid("sidecar.sync.wait_seconds", "must be 1..=300"));
        }
        if f.max_requests_per_connection == 0 {
            return Err(invalid(
                "sidecar.max_requests_per_connection",
                "must be at least 1",
            ));
        }
        if f.usage_report_interval_ms < 10 {
            return Err(invalid("sidecar.usage_report_interval_ms", "must be at least 10"));
        }
        if f.routes.is_empty() {
            return Err(invalid(
                "sidecar.routes",
                "no routes: every request would be denied",
            ));
        }
        Ok(SidecarConfig {
            listen: {
                let a = resolve("sidecar.listen", &f.listen)?;
                if a.port() == 0 {
                    // pingora would pick a port and never say which.
                    return Err(invalid("sidecar.listen", "needs an explicit port (not 0)"));
                }
                a
            },
            upstream: resolve("sidecar.upstream", &f.upstream)?,
            environment,
            snapshot_file: PathBuf::from(&f.snapshot_file),
            threads: f.threads,
            max_requests_per_connection: f.max_requests_per_connection,
            header_read_timeout: match f.header_read_timeout_ms {
                0 => return Err(invalid("sidecar.header_read_timeout_ms", "must be at least 1")),
                ms => Duration::from_millis(ms),
            },
            idle_timeout: match f.idle_timeout_ms {
                0 => return Err(invalid("sidecar.idle_timeout_ms", "must be at least 1")),
                ms => Duration::from_millis(ms),
            },
            body_rate_grace: Duration::from_millis(f.body_rate_grace_ms),
            body_min_rate: match f.body_min_rate_bytes_per_second {
                0 => {
                    return Err(invalid(
                        "sidecar.body_min_rate_bytes_per_second",
                        "must be at least 1",
                    ))
                }
                n => n,
            },
            max_connections: match f.max_connections {
                0 => return Err(invalid("sidecar.max_connections", "must be at least 1")),
                n => n,
            },
            shutdown_grace: Duration::from_secs(f.shutdown_grace_seconds),
            admin_listen: f
                .admin_listen
                .as_deref()
                .map(|a| resolve("sidecar.admin_listen", a))
                .transpose()?,
            ready_max_snapshot_age: Duration::from_secs(f.ready_max_snapshot_age_seconds),
            metrics_max_service_labels: f.metrics_max_service_labels,
            usage_report_interval: Duration::from_millis(f.usage_report_interval_ms),
            admin_url: f.sync.admin_url.trim_end_matches('/').to_string(),
            tls: f.tls.as_ref().map(|t| server_tls("sidecar.tls", t)).transpose()?,
            sync_tls: client_tls(
                "sidecar.sync",
                &f.sync.ca_file,
                &f.sync.client_cert_file,
                &f.sync.client_key_file,
            )?,
            sync_credential: credential,
            sync_wait: Duration::from_secs(f.sync.wait_seconds),
            routes: build_routes(&f.routes, f.case_sensitive_routes)?,
            forwarded_for: match f.forwarded_for.as_str() {
                "overwrite" => ForwardedFor::Overwrite,
                "append" => ForwardedFor::Append,
                _ => {
                    return Err(invalid(
                        "sidecar.forwarded_for",
                        "must be \"overwrite\" or \"append\"",
                    ))
                }
            },
            egress: f
                .egress
                .as_ref()
                .map(|e| build_egress(e, f.sync.admin_url.trim_end_matches('/')))
                .transpose()?,
            tokens: {
                let t = &f.tokens;
                if t.audience.is_empty() {
                    return Err(invalid("sidecar.tokens.audience", "must not be empty"));
                }
                if t.leeway_seconds > 300 {
                    return Err(invalid("sidecar.tokens.leeway_seconds", "must be at most 300"));
                }
                TokenSettings {
                    audience: t.audience.clone(),
                    leeway_secs: t.leeway_seconds as i64,
                    cache_entries: t.cache_entries,
                    early_sync_min_interval: Duration::from_millis(t.early_sync_min_interval_ms),
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_toml_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"));
        let f = load_file(path).unwrap();
        AdminConfig::from_file(&f.admin_plane, Some("x".repeat(32))).unwrap();
        assert_eq!(f.admin_plane.rotation_grace_seconds, 604_800);
        let sc = SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into())).unwrap();
        assert!(sc.routes.find("GET", "/health").is_some());
        assert!(sc.routes.find("GET", "/api/v1/trades").is_some());
    }

    #[test]
    fn example_configs_parse() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"));
        let mut n = 0;
        for sub in [dir.to_path_buf(), dir.join("compose")] {
            for entry in std::fs::read_dir(&sub).unwrap() {
                let p = entry.unwrap().path();
                if p.extension().is_some_and(|e| e == "toml") {
                    let f = load_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    // The admin plane's validated as `permiso admin` would (the certificate
                    // files are read at start, not here).
                    if p.file_name().is_some_and(|n| n == "admin.toml") {
                        let a = AdminConfig::from_file(&f.admin_plane, Some("x".repeat(32)))
                            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                        assert!(a.tls.is_some(), "{}: the example serves HTTPS", p.display());
                    } else {
                        // Parsed only: validating a sidecar file reads the egress key files,
                        // which examples/setup.sh writes (tests/it/e2e.rs starts them).
                        let s = f.sidecar.as_ref().unwrap_or_else(|| panic!("{}", p.display()));
                        assert!(s.tls.is_some(), "{}: the example serves HTTPS", p.display());
                    }
                    n += 1;
                }
            }
        }
        assert_eq!(n, 6);
    }

    #[test]
    fn egress_must_bind_loopback_and_name_one_credential() {
        std::env::set_var("PERMISO_TEST_EGRESS_KEY", "svc_live_x");
        let base = "[sidecar.egress]\nlisten = \"{L}\"\n[sidecar.egress.destinations.a]\nurl = \"http://127.0.0.1:9\"\n{C}\n[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\n";
        let cfg = |listen: &str, cred: &str| sidecar(&base.replace("{L}", listen).replace("{C}", cred));
        assert!(cfg("127.0.0.1:9100", "api_key_env = \"PERMISO_TEST_EGRESS_KEY\"")
            .unwrap()
            .egress
            .is_some());
        assert!(
            cfg("0.0.0.0:9100", "api_key_env = \"PERMISO_TEST_EGRESS_KEY\"").is_err(),
            "non-loopback"
        );
        assert!(cfg("127.0.0.1:9100", "").is_err(), "no credential");
        assert!(cfg(
            "127.0.0.1:9100",
            "api_key_env = \"PERMISO_TEST_EGRESS_KEY\"\nclient_id = \"srv_a\"\nclient_secret_env = \"PERMISO_TEST_EGRESS_KEY\""
        )
        .is_err(), "two credentials");
        assert!(
            cfg("127.0.0.1:9100", "api_key_env = \"PERMISO_TEST_UNSET_VAR\"").is_err(),
            "unset variable"
        );
    }

    #[test]
    fn tls_settings_name_a_ca_exactly_when_client_certificates_are_asked_for() {
        let route = "[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\n";
        let tls = |extra: &str| {
            sidecar(&format!(
                "[sidecar.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n{extra}\n{route}"
            ))
        };
        let off = tls("").unwrap().tls.unwrap();
        assert_eq!(off.client_auth, crate::tls::ClientAuth::Off);
        assert_eq!(off.cert_file, PathBuf::from("c.pem"));
        let err = |extra: &str| match tls(extra) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{extra:?} accepted: {other:?}"),
        };
        assert_eq!(
            err("client_ca_file = \"ca.pem\""),
            "sidecar.tls.client_ca_file",
            "a CA that does nothing"
        );
        assert_eq!(err("client_auth = \"optional\""), "sidecar.tls.client_ca_file");
        assert_eq!(err("client_auth = \"required\""), "sidecar.tls.client_ca_file");
        assert!(tls("client_auth = \"sometimes\"\nclient_ca_file = \"ca.pem\"").is_err());
        let req = tls("client_auth = \"required\"\nclient_ca_file = \"ca.pem\"")
            .unwrap()
            .tls
            .unwrap();
        assert_eq!(req.client_auth, crate::tls::ClientAuth::Required);
        assert!(
            sidecar(&format!("[sidecar.tls]\ncert_file = \"c.pem\"\n{route}")).is_err(),
            "no key_file"
        );
        // Client side: a certificate needs its key.
        let sync = |extra: &str| {
            let text = format!("[sidecar]\nupstream = \"127.0.0.1:1\"\n[sidecar.sync]\nadmin_url = \"https://a\"\n{extra}\n{route}");
            let f = parse_file(&text, std::path::Path::new("t.toml")).unwrap();
            SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into()))
        };
        assert!(sync("client_cert_file = \"c.pem\"").is_err());
        let ok =
            sync("ca_file = \"ca.pem\"\nclient_cert_file = \"c.pem\"\nclient_key_file = \"k.pem\"").unwrap();
        assert_eq!(ok.sync_tls.ca_file, Some(PathBuf::from("ca.pem")));
    }

    fn sidecar(extra: &str) -> Result<SidecarConfig, ConfigError> {
        let text = format!(
            "[sidecar]\nupstream = \"127.0.0.1:8001\"\n[sidecar.sync]\nadmin_url = \"http://127.0.0.1:8000\"\n{extra}"
        );
        let f = parse_file(&text, Path::new("t.toml"))?;
        SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into()))
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(sidecar("").is_err(), "no routes");
        assert!(
            sidecar("[[sidecar.routes]]\nprefix = \"/x\"\n").is_err(),
            "no scopes, not public"
        );
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\nscopes = [\"a:b\"]\n").is_err());
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"x\"\npublic = true\n").is_err());
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/x\"\nscopes = [\"a::b\"]\n").is_err());
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\nbogus = 1\n").is_err());
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\n").is_ok());
        // Prefixes must be canonical: requests are routed on their canonical path.
        for bad in [
            "/a/../b", "/a;b", "/a%2fb", "/a//b", "/%61", "/a%3a", "/a.", "/a%c3",
        ] {
            let err = sidecar(&format!(
                "[[sidecar.routes]]\nprefix = \"{bad}\"\npublic = true\n"
            ))
            .unwrap_err();
            assert!(err.to_string().contains("prefix"), "{bad}: {err}");
        }
        assert!(sidecar("[[sidecar.routes]]\nprefix = \"/caf%C3%A9\"\npublic = true\n").is_ok());
        assert!(
            sidecar(
                "[[sidecar.routes]]\nprefix = \"/x\"\nscopes = [\"a:b\"]\nforward_authorization = true\n"
            )
            .is_err(),
            "forward_authorization on a protected route"
        );
        let text = "[sidecar]\nupstream = \"127.0.0.1:8001\"\ncase_sensitive_routes = true\n[sidecar.sync]\nadmin_url = \"http://127.0.0.1:8000\"\n[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\nforward_authorization = true\n";
        let f = parse_file(text, Path::new("t.toml")).unwrap();
        let opt_in = SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into())).unwrap();
        assert!(opt_in.routes.case_sensitive());
        assert!(matches!(
            opt_in.routes.find("GET", "/x").map(|r| r.forward_authorization),
            Some(true)
        ));
        assert!(opt_in.routes.find("GET", "/X").is_none());
        let append = parse_file(
            &text.replace("case_sensitive_routes = true", "forwarded_for = \"append\""),
            Path::new("t.toml"),
        )
        .unwrap();
        let append =
            SidecarConfig::from_file(append.sidecar.as_ref().unwrap(), Secret::new("k".into())).unwrap();
        assert_eq!(append.forwarded_for, ForwardedFor::Append);
        let bad = parse_file(
            &text.replace("case_sensitive_routes = true", "forwarded_for = \"keep\""),
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(SidecarConfig::from_file(bad.sidecar.as_ref().unwrap(), Secret::new("k".into())).is_err());
        assert!(!sidecar("[[sidecar.routes]]\nprefix = \"/x\"\npublic = true\n")
            .unwrap()
            .routes
            .case_sensitive());
        let port_zero = "[sidecar]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n[sidecar.sync]\nadmin_url = \"http://127.0.0.1:2\"\n[[sidecar.routes]]\nprefix = \"/\"\npublic = true\n";
        let f = parse_file(port_zero, Path::new("t.toml")).unwrap();
        let err = SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into())).unwrap_err();
        assert!(err.to_string().contains("sidecar.listen"), "{err}");
        assert!(AdminConfig::from_file(&file::AdminPlane::default(), None).is_err());
        assert!(AdminConfig::from_file(&file::AdminPlane::default(), Some("short".into())).is_err());
    }
}
