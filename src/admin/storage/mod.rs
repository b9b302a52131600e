//! The admin plane's storage: one interface split by concern (services, credentials, tokens
//! and signing keys, audit, sync), with a SQLite implementation (the embedded default, one
//! process) and a PostgreSQL one (several replicas). Every mutation runs in one transaction
//! that also bumps the sync version, so sidecars see either all of a change or none of it, and
//! appends its audit entry to the one hash chain. The rules both backends share (what a
//! rotation ends, what an audit entry records) live here, not in either backend.

pub mod migrations;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::core::key::{Environment, KeyHash};
use crate::core::ratelimit::LimitScope;
use crate::core::sync::SyncPayload;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Postgres(tokio_postgres::Error),
    /// The database cannot be reached now (pool exhausted or timed out, connection lost):
    /// the request gets 503 and may be retried; nothing was written.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database's schema is not the one this binary knows (run `permiso migrate`, or
    /// upgrade the binary).
    #[error("{0}")]
    Schema(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, serde::Serialize)]
pub struct NewService {
    pub name: String,
    pub environment: Environment,
    pub description: Option<String>,
    pub contact_email: Option<String>,
    pub is_trusted: bool,
    pub scopes: Vec<String>,
    pub rate_limit_per_minute: Option<u32>,
    pub rate_limit_per_hour: Option<u32>,
    pub rate_limit_scope: LimitScope,
    pub allowed_ips: Vec<String>,
    pub access_token_lifetime: u32,
    pub tls_identities: Vec<String>,
}

/// The two credential kinds share one lifecycle (issue, rotate with grace, revoke).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    ApiKey,
    ClientSecret,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "api_key",
            CredentialKind::ClientSecret => "client_secret",
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "keys",
            CredentialKind::ClientSecret => "client secrets",
        }
    }
}

/// A validated change; `None` leaves a field alone, `Some(None)` clears a nullable one.
/// Serialized (for the audit log) with only the fields it changes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ServicePatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_minute: Option<Option<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_hour: Option<Option<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_scope: Option<LimitScope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_email: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_trusted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token_lifetime: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_identities: Option<Vec<String>>,
}

/// Who asked for a change, as the audit log records it.
#[derive(Debug, Clone)]
pub struct Audit {
    pub actor: String,
    pub source_ip: Option<String>,
}

impl Audit {
    /// Changes the admin plane makes on its own (the first signing key).
    pub fn system() -> Audit {
        Audit {
            actor: "system".into(),
            source_ip: None,
        }
    }
}

/// Filters for reading the audit log; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// Entries after this sequence number (the pagination cursor).
    pub after: u64,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub display_prefix: String,
    pub created_at: i64,
    /// When it stops working: the earlier of `grace_ends_at` and its own expiry.
    pub expires_at: Option<i64>,
    /// Set by a rotation: the end of its grace window.
    pub grace_ends_at: Option<i64>,
    /// Its own expiry (`expires_at`/`ttl_seconds` on create or rotate, or a PATCH).
    pub own_expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

impl KeyRecord {
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

#[derive(Debug, Clone)]
pub struct ServiceRecord {
    pub id: String,
    pub name: String,
    pub environment: Environment,
    pub description: Option<String>,
    pub contact_email: Option<String>,
    pub is_trusted: bool,
    pub scopes: Vec<String>,
    pub rate_limit_per_minute: Option<u32>,
    pub rate_limit_per_hour: Option<u32>,
    pub rate_limit_scope: LimitScope,
    pub allowed_ips: Vec<String>,
    pub disabled: bool,
    pub access_token_lifetime: u32,
    /// Access tokens with an `iat` before this are refused (set on disable).
    pub tokens_not_before: i64,
    pub tls_identities: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub keys: Vec<KeyRecord>,
    pub secrets: Vec<KeyRecord>,
}

/// What is stored of a new key: its hash and display prefix, never the key.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub hash: KeyHash,
    pub display_prefix: String,
    /// Its own expiry (Unix seconds), if it has one.
    pub expires_at: Option<i64>,
}

impl StoredKey {
    pub fn of(k: &crate::core::key::NewKey) -> StoredKey {
        StoredKey {
            hash: k.hash,
            display_prefix: k.display_prefix.clone(),
            expires_at: None,
        }
    }

    pub fn expiring(mut self, at: Option<i64>) -> StoredKey {
        self.expires_at = at;
        self
    }
}

/// Where a credential ends once its own expiry is `own` and its grace window `grace`: the
/// earlier of the two.
pub fn effective_end(own: Option<i64>, grace: Option<i64>) -> Option<i64> {
    match (own, grace) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The grace end a rotation gives `k` at `end`: an earlier one it already has stays.
pub fn rotated_grace(k: &KeyRecord, end: i64) -> i64 {
    k.grace_ends_at.map_or(end, |g| g.min(end))
}

/// A change of one credential's own expiry, checked against the credential as it is.
pub fn expiry_plan(k: &KeyRecord, own: Option<i64>, now: i64) -> StoreResult<Option<i64>> {
    if k.revoked_at.is_some() {
        return Err(StoreError::Conflict("the credential is revoked".into()));
    }
    if k.expires_at.is_some_and(|e| e <= now) {
        return Err(StoreError::Conflict("the credential has already ended".into()));
    }
    Ok(effective_end(own, k.grace_ends_at))
}

/// What admin and sync authentication need to know about a presented key.
#[derive(Debug, Clone)]
pub struct KeyOwner {
    pub service_id: String,
    pub key_id: String,
    pub scopes: Vec<String>,
    pub allowed_ips: Vec<String>,
}

/// One service for `bulk_create`.
#[derive(Debug, Clone)]
pub struct BulkService {
    pub id: String,
    pub service: NewService,
    pub keys: Vec<(String, StoredKey)>,
    pub secret: (String, StoredKey),
}

/// Outcome of a rotation: the new key's record and when each old key stops.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub service: ServiceRecord,
    pub ended: Vec<(String, i64)>,
}

/// What the token endpoint needs to know about an authenticated client.
#[derive(Debug, Clone)]
pub struct ClientRecord {
    pub service_id: String,
    /// Goes into the token's `is_trusted` claim.
    pub is_trusted: bool,
    pub scopes: Vec<String>,
    pub disabled: bool,
    pub allowed_ips: Vec<String>,
    pub access_token_lifetime: u32,
}

/// A token's client as it is now: what introspection may report for the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClientNow {
    pub scopes: Vec<String>,
    pub is_trusted: bool,
}

/// What introspection reports about an API key.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub service_id: String,
    pub scopes: Vec<String>,
    /// The service's trust flag now (the sidecar trusts a trusted service's keys).
    pub is_trusted: bool,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// A signing key as stored: the private part is sealed.
#[derive(Debug, Clone)]
pub struct SigningKeyRow {
    pub kid: String,
    pub public_x: String,
    pub private_sealed: Vec<u8>,
    pub created_at: i64,
    pub activates_at: i64,
}

/// Services: create, read, change.
#[async_trait]
pub trait ServiceStore: Send + Sync {
    /// Creates a service with its first API key and client secret. Returns the record and the
    /// new sync version.
    async fn create_service(
        &self,
        id: &str,
        s: &NewService,
        key: (&str, &StoredKey),
        secret: (&str, &StoredKey),
        now: i64,
        who: &Audit,
    ) -> StoreResult<(ServiceRecord, u64)>;
    /// Many services with their keys in one transaction (load tests and benchmarks).
    async fn bulk_create(&self, services: &[BulkService], now: i64, who: &Audit) -> StoreResult<u64>;
    async fn get_service(&self, id: &str) -> StoreResult<ServiceRecord>;
    /// A page of services in creation order, after the service `after` (a cursor); with
    /// `search`, only those whose id is it or whose name holds it (ASCII letters compared
    /// without case).
    async fn list_services(
        &self,
        limit: u32,
        after: Option<&str>,
        search: Option<&str>,
    ) -> StoreResult<(Vec<ServiceRecord>, bool)>;
    async fn patch_service(
        &self,
        id: &str,
        p: &ServicePatch,
        now: i64,
        who: &Audit,
        action: &str,
    ) -> StoreResult<(ServiceRecord, u64)>;
}

/// API keys and client secrets: rotation, revocation, lookups by hash, usage marks.
#[async_trait]
pub trait CredentialStore: Send + Sync {
    /// Adds a credential of `kind` and cuts every active one's life to `now + grace_secs`.
    #[allow(clippy::too_many_arguments)]
    async fn rotate(
        &self,
        id: &str,
        kind: CredentialKind,
        new_id: &str,
        key: &StoredKey,
        grace_secs: u64,
        max_active: u32,
        now: i64,
        who: &Audit,
    ) -> StoreResult<(Rotation, u64)>;
    async fn revoke_key(
        &self,
        id: &str,
        key_id: &str,
        now: i64,
        who: &Audit,
    ) -> StoreResult<(KeyRecord, u64)>;
    /// Sets a credential's own expiry (None: it has none) and recomputes when it ends.
    #[allow(clippy::too_many_arguments)]
    async fn set_expiry(
        &self,
        id: &str,
        kind: CredentialKind,
        key_id: &str,
        expires_at: Option<i64>,
        now: i64,
        who: &Audit,
    ) -> StoreResult<(KeyRecord, u64)>;
    /// Revokes the API key with this hash if it belongs to `owner` (any owner when None).
    async fn revoke_key_by_hash(
        &self,
        hash: &KeyHash,
        owner: Option<&str>,
        now: i64,
        who: &Audit,
    ) -> StoreResult<Option<u64>>;
    /// The service behind a usable API key; marks it used (at most once a minute).
    async fn key_owner(&self, hash: &KeyHash, now: i64) -> StoreResult<Option<KeyOwner>>;
    /// For introspection: the API key's service and times, if it is usable now.
    async fn key_info(&self, hash: &KeyHash, now: i64) -> StoreResult<Option<KeyInfo>>;
    /// Checks a client secret; disabled clients are returned, unusable secrets are None.
    async fn authenticate_client(
        &self,
        client_id: &str,
        secret_hash: &KeyHash,
        now: i64,
    ) -> StoreResult<Option<ClientRecord>>;
    /// Key last-used times from sidecars (only ever forward). Returns how many moved.
    async fn record_usage(&self, marks: &[(String, i64)]) -> StoreResult<usize>;
}

/// Access tokens and the keys that sign them.
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// The client `id` as it is now, if a token of it issued at `iat` may still be honoured
    /// (it exists, is not disabled, and `iat` is not before its `tokens_not_before`). One read,
    /// so the answer and the scopes and trust it carries belong to the same moment.
    async fn token_client(&self, id: &str, iat: i64) -> StoreResult<Option<TokenClientNow>>;
    /// Adds `jti` to the deny list; the new version, or None if it was there.
    async fn revoke_token(
        &self,
        jti: &str,
        client_id: &str,
        expires_at: i64,
        now: i64,
        who: &Audit,
    ) -> StoreResult<Option<u64>>;
    async fn token_revoked(&self, jti: &str) -> StoreResult<bool>;
    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>>;
    /// Adds a signing key; published at once, signs from `activates_at`.
    async fn add_signing_key(&self, row: &SigningKeyRow, who: &Audit) -> StoreResult<u64>;
}

/// The hash-chained audit log.
#[async_trait]
pub trait AuditStore: Send + Sync {
    /// A failed admin authentication (its own transaction).
    async fn audit_failed_auth(
        &self,
        now: i64,
        who: &Audit,
        reason: &str,
        target: Option<&str>,
        left_out: u64,
    ) -> StoreResult<()>;
    async fn audit_page(&self, q: &AuditQuery) -> StoreResult<(Vec<crate::core::audit::AuditEntry>, bool)>;
}

/// What sidecars pull.
#[async_trait]
pub trait SyncStore: Send + Sync {
    /// Random id of this database: sidecars never apply a delta across a database reset.
    fn epoch(&self) -> &str;
    async fn version(&self) -> StoreResult<u64>;
    /// What a sidecar at (`epoch`, `after`) needs: the services changed since, or everything;
    /// always the deny list; `signing_keys` left empty (the caller publishes from the rows
    /// returned beside it, which carry no private part).
    async fn sync_payload(
        &self,
        epoch: Option<&str>,
        after: Option<u64>,
        now: i64,
    ) -> StoreResult<(SyncPayload, Vec<SigningKeyRow>)>;
    /// Whether a write transaction can start now (readiness). Writes nothing.
    async fn check_writable(&self) -> StoreResult<()>;
    /// Resolves when another process (replica) may have committed a change: PostgreSQL's
    /// LISTEN/NOTIFY. A single SQLite process is the only writer, so it never resolves.
    async fn changed_elsewhere(&self) {
        std::future::pending::<()>().await
    }
}

/// A sidecar as last reported (issue 16's fleet view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarRecord {
    pub instance_id: String,
    /// The key id (or "admin-key") it syncs with.
    pub credential: String,
    pub service_id: Option<String>,
    /// The epoch of the version it reports applied.
    pub epoch: String,
    /// The version it holds (its `after`), when it asked for a delta of this database.
    pub applied_version: Option<u64>,
    pub first_seen: i64,
    pub last_seen: i64,
    /// `core::sync::SidecarReport` as JSON.
    pub report: String,
}

/// An API key or client secret in its rotation grace window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraceKey {
    pub service_id: String,
    pub service_name: String,
    pub key_id: String,
    pub kind: CredentialKind,
    pub display_prefix: String,
    pub grace_ends_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
}

/// What the fleet and key-lifecycle views read and write: sidecars' reports, keys in grace.
#[async_trait]
pub trait LifecycleStore: Send + Sync {
    /// Inserts or refreshes a sidecar; an older report (by `last_seen`) never overwrites a
    /// newer one, so replicas may write in any order, and a report under another service's
    /// sync key never overwrites it (one sync key cannot speak for another service's sidecar,
    /// marking a straggler as applied).
    /// Several in one transaction (a change wakes the whole fleet at once).
    async fn record_sidecars(&self, s: &[SidecarRecord]) -> StoreResult<()>;
    /// Every sidecar seen since `since` (Unix seconds); older ones are forgotten.
    async fn sidecars(&self, since: i64) -> StoreResult<Vec<SidecarRecord>>;
    /// Every unrevoked credential still in its grace window at `now` and, with `used_since`,
    /// used at or after it; across all services, soonest end first.
    async fn grace_keys(&self, now: i64, used_since: Option<i64>) -> StoreResult<Vec<GraceKey>>;
}

/// The kind stored in `credentials.kind`.
pub fn credential_kind(s: &str) -> StoreResult<CredentialKind> {
    match s {
        "api_key" => Ok(CredentialKind::ApiKey),
        "client_secret" => Ok(CredentialKind::ClientSecret),
        other => Err(StoreError::Corrupt(format!("credential kind {other:?}"))),
    }
}

/// Everything the admin plane needs from its database.
pub trait Storage:
    ServiceStore + CredentialStore + TokenStore + AuditStore + SyncStore + LifecycleStore
{
    /// "sqlite" or "postgres", for logs.
    fn backend(&self) -> &'static str;
}

pub type SharedStorage = Arc<dyn Storage>;

/// The audit `change` of a service creation.
pub fn create_change(s: &NewService, key: (&str, &StoredKey), secret_id: &str) -> serde_json::Value {
    let mut change = serde_json::to_value(s).unwrap_or_default();
    change["key_id"] = key.0.into();
    change["key_prefix"] = key.1.display_prefix.clone().into();
    change["client_secret_id"] = secret_id.into();
    if let Some(at) = key.1.expires_at {
        change["expires_at"] = at.into();
    }
    change
}

/// Which active credentials a rotation ends, and when: every active one's life is cut to
/// `now + grace_secs` (0 ends them now). Refused when `max_active` would be exceeded, unless
/// grace is 0 (a leaked credential can always be replaced).
pub fn rotation_plan(
    cur: &ServiceRecord,
    kind: CredentialKind,
    grace_secs: u64,
    max_active: u32,
    now: i64,
) -> StoreResult<Vec<(String, i64)>> {
    if cur.disabled {
        return Err(StoreError::Conflict(
            "the service is disabled; enable it before rotating".into(),
        ));
    }
    let existing = match kind {
        CredentialKind::ApiKey => &cur.keys,
        CredentialKind::ClientSecret => &cur.secrets,
    };
    let active: Vec<&KeyRecord> = existing.iter().filter(|k| k.is_active(now)).collect();
    if grace_secs > 0 && active.len() >= max_active as usize {
        return Err(StoreError::Conflict(format!(
            "the service already has {} active {} (limit {max_active}); revoke one or rotate with grace_seconds 0",
            active.len(),
            kind.noun()
        )));
    }
    let end = now.saturating_add(i64::try_from(grace_secs).unwrap_or(i64::MAX));
    Ok(active
        .iter()
        .map(|k| (k.id.clone(), k.expires_at.map_or(end, |e| e.min(end))))
        .collect())
}

/// The grace end of a rotation at `now` (what `rotated_grace` is given).
pub fn grace_end(now: i64, grace_secs: u64) -> i64 {
    now.saturating_add(i64::try_from(grace_secs).unwrap_or(i64::MAX))
}

/// The audit action and `change` of a rotation.
pub fn rotate_change(
    kind: CredentialKind,
    new_id: &str,
    key: &StoredKey,
    grace_secs: u64,
    ended: &[(String, i64)],
) -> (&'static str, serde_json::Value) {
    let action = match kind {
        CredentialKind::ApiKey => "key.rotate",
        CredentialKind::ClientSecret => "secret.rotate",
    };
    let change = serde_json::json!({
        "new_id": new_id,
        "new_prefix": key.display_prefix,
        "grace_seconds": grace_secs,
        "expires_at": key.expires_at,
        "ended": ended.iter().map(|(id, end)| serde_json::json!({"id": id, "expires_at": end})).collect::<Vec<_>>(),
    });
    (action, change)
}

/// The audit action and `change` of an expiry change.
pub fn expiry_change(
    kind: CredentialKind,
    key_id: &str,
    own: Option<i64>,
    end: Option<i64>,
) -> (&'static str, serde_json::Value) {
    let action = match kind {
        CredentialKind::ApiKey => "key.expiry",
        CredentialKind::ClientSecret => "secret.expiry",
    };
    (
        action,
        serde_json::json!({ "key_id": key_id, "expires_at": own, "ends_at": end }),
    )
}

/// The audit `change` of a failed admin authentication.
pub fn failed_auth_change(reason: &str, left_out: u64) -> serde_json::Value {
    let mut change = serde_json::json!({ "reason": reason });
    if left_out > 0 {
        change["not_audited_before_this"] = left_out.into();
    }
    change
}

/// The values a patch leaves in place: the patch's where it sets one, the current ones
/// elsewhere.
pub struct Patched {
    pub scopes: Vec<String>,
    pub rate_limit_per_minute: Option<u32>,
    pub rate_limit_per_hour: Option<u32>,
    pub rate_limit_scope: LimitScope,
    pub allowed_ips: Vec<String>,
    pub description: Option<String>,
    pub contact_email: Option<String>,
    pub is_trusted: bool,
    pub disabled: bool,
    pub access_token_lifetime: u32,
    /// The service goes from enabled to disabled: its tokens die (`tokens_not_before`).
    pub disabling: bool,
}

pub fn patched(cur: &ServiceRecord, p: &ServicePatch) -> Patched {
    let cur = cur.clone();
    Patched {
        scopes: p.scopes.clone().unwrap_or(cur.scopes),
        rate_limit_per_minute: p.rate_limit_per_minute.unwrap_or(cur.rate_limit_per_minute),
        rate_limit_per_hour: p.rate_limit_per_hour.unwrap_or(cur.rate_limit_per_hour),
        rate_limit_scope: p.rate_limit_scope.unwrap_or(cur.rate_limit_scope),
        allowed_ips: p.allowed_ips.clone().unwrap_or(cur.allowed_ips),
        description: p.description.clone().unwrap_or(cur.description),
        contact_email: p.contact_email.clone().unwrap_or(cur.contact_email),
        is_trusted: p.is_trusted.unwrap_or(cur.is_trusted),
        disabled: p.disabled.unwrap_or(cur.disabled),
        access_token_lifetime: p.access_token_lifetime.unwrap_or(cur.access_token_lifetime),
        disabling: p.disabled == Some(true) && !cur.disabled,
    }
}

pub fn json_list(s: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub fn to_json(v: &[String]) -> String {
    serde_json::to_string(v).expect("string list serialises")
}

/// A service as sidecars receive it, with its usable keys.
pub fn sync_service(
    rec: ServiceRecord,
    keys: Vec<crate::core::sync::SyncKey>,
) -> crate::core::sync::SyncService {
    crate::core::sync::SyncService {
        service_id: rec.id,
        service_name: rec.name,
        environment: rec.environment,
        scopes: rec.scopes,
        disabled: rec.disabled,
        rate_limit_per_minute: rec.rate_limit_per_minute,
        rate_limit_per_hour: rec.rate_limit_per_hour,
        rate_limit_scope: rec.rate_limit_scope,
        allowed_ips: rec.allowed_ips,
        tokens_not_before: rec.tokens_not_before,
        tls_identities: rec.tls_identities,
        is_trusted: rec.is_trusted,
        keys,
    }
}

/// The version a sidecar's delta starts after: its `after` when it names this database's
/// epoch and is not ahead of it; None (a full snapshot) otherwise.
pub fn delta_since(ours: &str, version: u64, epoch: Option<&str>, after: Option<u64>) -> Option<u64> {
    match (epoch, after) {
        (Some(e), Some(a)) if e == ours && a <= version => Some(a),
        _ => None,
    }
}

/// The sync payload of a read (issuer, signing keys and send time are the caller's).
pub fn sync_payload(
    epoch: &str,
    version: u64,
    since: Option<u64>,
    services: Vec<crate::core::sync::SyncService>,
    revoked_tokens: Vec<crate::core::sync::SyncRevokedToken>,
) -> SyncPayload {
    SyncPayload {
        epoch: epoch.to_string(),
        version,
        full: since.is_none(),
        services,
        issuer: String::new(),
        signing_keys: vec![],
        revoked_tokens,
        generated_at_ms: None,
        instance_id: None,
    }
}

/// One audit_log row as either backend reads it, before its hashes and change are decoded.
pub struct AuditRow {
    pub seq: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub source_ip: Option<String>,
    pub change: String,
    pub prev: Vec<u8>,
    pub hash: Vec<u8>,
}

impl AuditRow {
    pub fn into_entry(self) -> StoreResult<crate::core::audit::AuditEntry> {
        use crate::core::audit::to_hex;
        Ok(crate::core::audit::AuditEntry {
            seq: self.seq as u64,
            at: self.at,
            actor: self.actor,
            action: self.action,
            target: self.target,
            source_ip: self.source_ip,
            change: serde_json::from_str(&self.change)
                .map_err(|e| StoreError::Corrupt(format!("audit change: {e}")))?,
            prev_hash: to_hex(&hash32(self.prev, "audit hash")?),
            hash: to_hex(&hash32(self.hash, "audit hash")?),
        })
    }
}

/// A page of the audit log from `limit + 1` rows read: the entries, and whether more follow.
pub fn audit_page_of(
    rows: Vec<AuditRow>,
    limit: u32,
) -> StoreResult<(Vec<crate::core::audit::AuditEntry>, bool)> {
    let more = rows.len() > limit as usize;
    let entries = rows
        .into_iter()
        .take(limit as usize)
        .map(AuditRow::into_entry)
        .collect::<StoreResult<Vec<_>>>()?;
    Ok((entries, more))
}

/// One usable key as sidecars receive it: its hash in hex.
pub fn sync_key(
    key_id: String,
    hash: Vec<u8>,
    expires_at: Option<i64>,
    grace_ends_at: Option<i64>,
) -> StoreResult<crate::core::sync::SyncKey> {
    let hash = hash32(hash, &format!("hash of key {key_id}"))?;
    Ok(crate::core::sync::SyncKey {
        key_id,
        hash: KeyHash(hash).to_hex(),
        expires_at,
        grace_ends_at,
    })
}

impl NewService {
    /// A live service with these scopes and every other field at its default (benchmarks,
    /// tests and bulk loads).
    pub fn named(name: &str, scopes: &[&str]) -> NewService {
        NewService {
            name: name.into(),
            environment: Environment::Live,
            description: None,
            contact_email: None,
            is_trusted: false,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            rate_limit_per_minute: None,
            rate_limit_per_hour: None,
            rate_limit_scope: LimitScope::Sidecar,
            allowed_ips: vec![],
            access_token_lifetime: 3600,
            tls_identities: vec![],
        }
    }
}

/// A 32-byte hash column.
pub fn hash32(b: Vec<u8>, what: &str) -> StoreResult<[u8; 32]> {
    b.try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is not 32 bytes")))
}

/// A fresh database's random epoch (hex of 12 bytes).
pub fn new_epoch() -> String {
    use rand::TryRngCore;
    let mut b = [0u8; 12];
    rand::rngs::OsRng
        .try_fill_bytes(&mut b)
        .expect("OS CSPRNG unavailable");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn pg_settings(
    p: &crate::config::database::Postgres,
    password: Option<&crate::core::key::Secret>,
) -> StoreResult<postgres::PgSettings> {
    let mut config = p.config.clone();
    // TLS only when the URL requires it, and then verified (like libpq's verify-full): an
    // unverified, optional TLS (libpq's `prefer`) stops nothing an active attacker does, and
    // fails against servers with self-signed certificates (Debian's snakeoil default).
    if !matches!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require) {
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    // The environment wins over the file; neither means the server needs none (trust, peer).
    let from_file = match (&password, &p.password_file) {
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| StoreError::Unavailable(format!("database_password_file {}: {e}", f.display())))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        ),
        _ => None,
    };
    if let Some(pw) = password.map(|s| s.expose().to_string()).or(from_file) {
        config.password(pw);
    }
    let client_tls = crate::tls::ClientTls {
        ca_file: p.ca_file.clone(),
        client_cert_file: None,
        client_key_file: None,
    };
    let mut rustls_config = crate::tls::client::client_config(&client_tls)
        .map_err(|e| StoreError::Unavailable(format!("database TLS settings: {e}")))?;
    // PostgreSQL 17 refuses an ALPN other than its own; the others ignore it.
    rustls_config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(postgres::PgSettings {
        config,
        tls: tokio_postgres_rustls::MakeRustlsConnect::new(rustls_config),
        pool_size: p.pool_size,
        connect_timeout: std::time::Duration::from_secs(5),
    })
}

/// Opens the configured database: SQLite is migrated at once (one process owns it);
/// PostgreSQL is only checked (`permiso migrate` applies, see `migrations`).
pub async fn open(
    db: &crate::config::Database,
    password: Option<&crate::core::key::Secret>,
) -> StoreResult<SharedStorage> {
    match db {
        crate::config::Database::Sqlite(path) => {
            let path = path.clone();
            let s = tokio::task::spawn_blocking(move || sqlite::Sqlite::open(&path))
                .await
                .map_err(|e| StoreError::Internal(e.to_string()))??;
            Ok(Arc::new(s))
        }
        crate::config::Database::Postgres(p) => Ok(Arc::new(
            postgres::Postgres::connect(pg_settings(p, password)?).await?,
        )),
    }
}

/// `permiso migrate`: brings the database to this binary's schema; says what it did.
pub async fn migrate(
    db: &crate::config::Database,
    password: Option<&crate::core::key::Secret>,
) -> StoreResult<String> {
    match db {
        crate::config::Database::Sqlite(_) => {
            open(db, password).await?;
            Ok(format!(
                "SQLite database {} is at schema version {}",
                db.describe(),
                migrations::known(false)
            ))
        }
        crate::config::Database::Postgres(p) => {
            let settings = pg_settings(p, password)?;
            let mut cfg = settings.config.clone();
            cfg.connect_timeout(settings.connect_timeout);
            let (mut client, conn) = cfg.connect(settings.tls.clone()).await?;
            let driver = tokio::spawn(conn);
            let applied = migrations::postgres_apply(&mut client).await;
            drop(client);
            let _ = driver.await;
            let applied = applied?;
            Ok(if applied.is_empty() {
                format!(
                    "PostgreSQL database {} is at schema version {}; nothing to apply",
                    db.describe(),
                    migrations::known(true)
                )
            } else {
                format!(
                    "PostgreSQL database {}: applied {:?}, now at schema version {}",
                    db.describe(),
                    applied,
                    migrations::known(true)
                )
            })
        }
    }
}
