//! The PostgreSQL backend (several admin-plane replicas on one database): tokio-postgres with a
//! deadpool pool, schema from migrations/postgres (applied by `permiso migrate`, checked here).
//!
//! Ordering across replicas. Every writing transaction first takes the row lock of
//! `meta.version` (bumping it, or `FOR UPDATE` when it may not change anything) and holds it
//! to commit. Writers are therefore serialized, versions commit in increasing order with no
//! gaps, and the audit chain, appended under the same lock, stays one line. A sync read runs
//! in one REPEATABLE READ snapshot, so the version it reports and the rows it returns agree.
//! Each bump also sends `NOTIFY permiso_changes` (delivered at commit), which every replica's
//! listener turns into a wake-up of its long polls (`changed_elsewhere`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::json_list;
use super::{
    create_change, failed_auth_change, patched, sync_key, sync_service, to_json, Audit, AuditQuery,
    AuditStore, BulkService, CredentialKind, NewService, ServicePatch, ServiceRecord, ServiceStore,
    SigningKeyRow, Storage, StoreError, StoreResult, StoredKey, SyncStore, TokenClientNow, TokenStore,
};
use crate::core::sync::{SyncPayload, SyncRevokedToken};

mod credentials;
mod lifecycle;
mod listen;
mod rows;
use listen::listen;
use rows::*;

/// The NOTIFY channel of committed changes.
pub(crate) const CHANNEL: &str = "permiso_changes";

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        // A lost connection or a server going away is a temporary condition (503), not a bug;
        // anything else (a bad statement, a parameter of the wrong type) is ours.
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io {
            return StoreError::Unavailable(with_causes(&e));
        }
        match e.code() {
            Some(c) if c.code().starts_with("08") || c.code().starts_with("57P") => {
                StoreError::Unavailable(with_causes(&e))
            }
            _ => StoreError::Postgres(e),
        }
    }
}

/// Every pool failure is one of getting a connection (the server down, restarting, refusing
/// connections, the pool exhausted): temporary.
pub(super) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(with_causes(&e))
}

/// An error with its causes (tokio-postgres keeps the TLS reason, such as an unknown issuer,
/// in the source chain, not in its own message).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

pub(super) fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// How to reach the database: the URL's settings, with the password from outside the config.
#[derive(Clone)]
pub struct PgSettings {
    pub config: tokio_postgres::Config,
    /// TLS when the URL says `sslmode=require` (rustls, verified against `database_ca_file`
    /// or the system roots); unused otherwise.
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
    pub pool_size: usize,
    pub connect_timeout: Duration,
}

pub struct Postgres {
    pool: Pool,
    epoch: String,
    /// Signalled by the LISTEN connection on every NOTIFY (and when it reconnects, since
    /// notifications may have been lost meanwhile).
    changes: Arc<tokio::sync::Notify>,
}

impl Postgres {
    /// Connects, checks the schema version (never migrates) and starts the change listener.
    pub async fn connect(settings: PgSettings) -> StoreResult<Postgres> {
        let mut cfg = settings.config.clone();
        cfg.connect_timeout(settings.connect_timeout);
        let mgr = Manager::from_config(
            cfg,
            settings.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.connect_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let mut c = pool.get().await.map_err(pool_error)?;
        let applied = super::migrations::postgres_applied(&mut c).await?;
        super::migrations::judge(applied, super::migrations::known(true))?;
        let epoch: String = c
            .query_one("SELECT value FROM meta WHERE name = 'epoch'", &[])
            .await?
            .get(0);
        drop(c);
        let changes = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(listen(
            settings.config.clone(),
            settings.tls.clone(),
            settings.connect_timeout,
            changes.clone(),
        ));
        Ok(Postgres { pool, epoch, changes })
    }

    pub(super) async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_error)
    }
}

#[async_trait]
impl ServiceStore for Postgres {
    async fn create_service(
        &self,
        id: &str,
        s: &NewService,
        key: (&str, &StoredKey),
        secret: (&str, &StoredKey),
        now: i64,
        who: &Audit,
    ) -> StoreResult<(ServiceRecord, u64)> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        let v = bump_version(&tx).await?;
        if let Err(e) = insert_service(&tx, id, s, now, v).await {
            return Err(if is_unique_violation(&e) {
                StoreError::Conflict(format!("a service named {:?} already exists", s.name))
            } else {
                e.into()
            });
        }
        insert_credential(&tx, id, CredentialKind::ApiKey, key.0, key.1, now).await?;
        insert_credential(&tx, id, CredentialKind::ClientSecret, secret.0, secret.1, now).await?;
        set_identities(&tx, id, &s.tls_identities).await?;
        let rec = load_service(&tx, id).await?;
        append_audit(
            &tx,
            now,
            who,
            "service.create",
            Some(id),
            create_change(s, key, secret.0),
        )
        .await?;
        tx.commit().await?;
        Ok((rec, v))
    }

    async fn bulk_create(&self, services: &[BulkService], now: i64, who: &Audit) -> StoreResult<u64> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        let v = bump_version(&tx).await?;
        for b in services {
            insert_service(&tx, &b.id, &b.service, now, v).await?;
            for (key_id, key) in &b.keys {
                insert_credential(&tx, &b.id, CredentialKind::ApiKey, key_id, key, now).await?;
            }
            let (secret_id, secret) = &b.secret;
            insert_credential(&tx, &b.id, CredentialKind::ClientSecret, secret_id, secret, now).await?;
        }
        let change = serde_json::json!({ "services": services.len() });
        append_audit(&tx, now, who, "service.bulk_create", None, change).await?;
        tx.commit().await?;
        Ok(v)
    }

    async fn get_service(&self, id: &str) -> StoreResult<ServiceRecord> {
        load_service(&**self.client().await?, id).await
    }

    async fn list_services(
        &self,
        limit: u32,
        after: Option<&str>,
        search: Option<&str>,
    ) -> StoreResult<(Vec<ServiceRecord>, bool)> {
        let c = self.client().await?;
        let after_seq: i64 = match after {
            None => 0,
            Some(id) => c
                .query_opt("SELECT seq FROM services WHERE id = $1", &[&id])
                .await?
                .ok_or(StoreError::NotFound)?
                .get(0),
        };
        let ids: Vec<String> = c
            .query(
                // ASCII-only lowering, as SQLite's lower(): both backends find the same rows.
                "SELECT id FROM services WHERE seq > $1 \
                 AND ($3::text IS NULL OR id = $3 \
                      OR strpos(translate(name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'), \
                                translate($3, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')) > 0) \
                 ORDER BY seq LIMIT $2",
                &[&after_seq, &(limit as i64 + 1), &search],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let more = ids.len() > limit as usize;
        let mut out = Vec::with_capacity(ids.len().min(limit as usize));
        for id in ids.iter().take(limit as usize) {
            out.push(load_service(&**c, id).await?);
        }
        Ok((out, more))
    }

    async fn patch_service(
        &self,
        id: &str,
        p: &ServicePatch,
        now: i64,
        who: &Audit,
        action: &str,
    ) -> StoreResult<(ServiceRecord, u64)> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        let v = bump_version(&tx).await?;
        let cur = load_service(&tx, id).await?;
        let n = patched(&cur, p);
        tx.execute(
            "UPDATE services SET scopes = $1, rate_limit_per_minute = $2, rate_limit_per_hour = $3,
                 allowed_ips = $4, description = $5, contact_email = $6, is_trusted = $7, disabled = $8,
                 access_token_lifetime = $9, rate_limit_scope = $11
             WHERE id = $10",
            &[
                &to_json(&n.scopes),
                &n.rate_limit_per_minute.map(i64::from),
                &n.rate_limit_per_hour.map(i64::from),
                &to_json(&n.allowed_ips),
                &n.description,
                &n.contact_email,
                &n.is_trusted,
                &n.disabled,
                &i64::from(n.access_token_lifetime),
                &id,
                &n.rate_limit_scope.name(),
            ],
        )
        .await?;
        if let Some(ids) = &p.tls_identities {
            set_identities(&tx, id, ids).await?;
        }
        if n.disabling {
            tx.execute(
                "UPDATE services SET tokens_not_before = $1 WHERE id = $2",
                &[&(now + 1), &id],
            )
            .await?;
        }
        touch_service(&tx, id, v, now).await?;
        let rec = load_service(&tx, id).await?;
        append_audit(
            &tx,
            now,
            who,
            action,
            Some(id),
            serde_json::to_value(p).unwrap_or_default(),
        )
        .await?;
        tx.commit().await?;
        Ok((rec, v))
    }
}

#[async_trait]
impl TokenStore for Postgres {
    async fn token_client(&self, id: &str, iat: i64) -> StoreResult<Option<TokenClientNow>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT disabled, tokens_not_before, scopes, is_trusted FROM services WHERE id = $1",
                &[&id],
            )
            .await?;
        match row {
            Some(r) if !r.get::<_, bool>(0) && iat >= r.get::<_, i64>(1) => Ok(Some(TokenClientNow {
                scopes: json_list(r.get(2))?,
                is_trusted: r.get(3),
            })),
            _ => Ok(None),
        }
    }

    async fn revoke_token(
        &self,
        jti: &str,
        client_id: &str,
        expires_at: i64,
        now: i64,
        who: &Audit,
    ) -> StoreResult<Option<u64>> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        lock_writes(&tx).await?;
        tx.execute("DELETE FROM revoked_tokens WHERE expires_at <= $1", &[&now])
            .await?;
        let n = tx
            .execute(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING",
                &[&jti, &expires_at],
            )
            .await?;
        if n == 0 {
            tx.commit().await?;
            return Ok(None);
        }
        let v = bump_version(&tx).await?;
        let change = serde_json::json!({ "jti": jti, "expires_at": expires_at });
        append_audit(&tx, now, who, "token.revoke", Some(client_id), change).await?;
        tx.commit().await?;
        Ok(Some(v))
    }

    async fn token_revoked(&self, jti: &str) -> StoreResult<bool> {
        Ok(self
            .client()
            .await?
            .query_opt("SELECT 1 FROM revoked_tokens WHERE jti = $1", &[&jti])
            .await?
            .is_some())
    }

    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>> {
        Ok(self
            .client()
            .await?
            .query(
                "SELECT kid, public_x, private_sealed, created_at, activates_at FROM signing_keys ORDER BY activates_at, seq",
                &[],
            )
            .await?
            .iter()
            .map(|r| signing_row(r, r.get(2)))
            .collect())
    }

    async fn add_signing_key(&self, row: &SigningKeyRow, who: &Audit) -> StoreResult<u64> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        let v = bump_version(&tx).await?;
        tx.execute(
            "INSERT INTO signing_keys (kid, public_x, private_sealed, created_at, activates_at) VALUES ($1, $2, $3, $4, $5)",
            &[&row.kid, &row.public_x, &row.private_sealed, &row.created_at, &row.activates_at],
        )
        .await?;
        let change = serde_json::json!({ "kid": row.kid, "activates_at": row.activates_at });
        append_audit(
            &tx,
            row.created_at,
            who,
            "signing_key.rotate",
            Some(&row.kid),
            change,
        )
        .await?;
        tx.commit().await?;
        Ok(v)
    }
}

#[async_trait]
impl AuditStore for Postgres {
    async fn audit_failed_auth(
        &self,
        now: i64,
        who: &Audit,
        reason: &str,
        target: Option<&str>,
        left_out: u64,
    ) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        lock_writes(&tx).await?;
        append_audit(
            &tx,
            now,
            who,
            "auth.failed",
            target,
            failed_auth_change(reason, left_out),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_page(&self, q: &AuditQuery) -> StoreResult<(Vec<crate::core::audit::AuditEntry>, bool)> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT seq, at, actor, action, target, source_ip, change, prev_hash, hash FROM audit_log
                 WHERE seq > $1 AND ($2::text IS NULL OR actor = $2) AND ($3::text IS NULL OR action = $3)
                   AND ($4::text IS NULL OR target = $4) AND ($5::bigint IS NULL OR at >= $5)
                   AND ($6::bigint IS NULL OR at <= $6)
                 ORDER BY seq LIMIT $7",
                &[
                    &(q.after.min(i64::MAX as u64) as i64),
                    &q.actor,
                    &q.action,
                    &q.target,
                    &q.since,
                    &q.until,
                    &(q.limit as i64 + 1),
                ],
            )
            .await?;
        let rows = rows
            .iter()
            .map(|r| super::AuditRow {
                seq: r.get(0),
                at: r.get(1),
                actor: r.get(2),
                action: r.get(3),
                target: r.get(4),
                source_ip: r.get(5),
                change: r.get(6),
                prev: r.get(7),
                hash: r.get(8),
            })
            .collect();
        super::audit_page_of(rows, q.limit)
    }
}

#[async_trait]
impl SyncStore for Postgres {
    fn epoch(&self) -> &str {
        &self.epoch
    }

    async fn version(&self) -> StoreResult<u64> {
        let v: i64 = self
            .client()
            .await?
            .query_one("SELECT value::bigint FROM meta WHERE name = 'version'", &[])
            .await?
            .get(0);
        Ok(v as u64)
    }

    async fn sync_payload(
        &self,
        epoch: Option<&str>,
        after: Option<u64>,
        now: i64,
    ) -> StoreResult<(SyncPayload, Vec<SigningKeyRow>)> {
        let mut c = self.client().await?;
        // One snapshot: the version and the rows agree.
        let tx = (**c)
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let version = tx
            .query_one("SELECT value::bigint FROM meta WHERE name = 'version'", &[])
            .await?
            .get::<_, i64>(0) as u64;
        let since = super::delta_since(&self.epoch, version, epoch, after);
        let ids: Vec<String> = tx
            .query(
                "SELECT id FROM services WHERE version > $1 ORDER BY seq",
                &[&(since.unwrap_or(0) as i64)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let keys_of = tx
            .prepare(
                "SELECT id, hash, expires_at, grace_ends_at FROM credentials
                 WHERE service_id = $1 AND kind = 'api_key' AND revoked_at IS NULL
                   AND (expires_at IS NULL OR expires_at > $2)
                 ORDER BY seq",
            )
            .await?;
        let mut services = Vec::with_capacity(ids.len());
        for id in ids {
            let rec = load_service(&tx, &id).await?;
            let mut keys = Vec::new();
            for r in tx.query(&keys_of, &[&rec.id, &now]).await? {
                keys.push(sync_key(r.get(0), r.get(1), r.get(2), r.get(3))?);
            }
            services.push(sync_service(rec, keys));
        }
        // The private part never leaves for a sidecar: an empty column in its place.
        let signing = tx
            .query(
                "SELECT kid, public_x, ''::bytea, created_at, activates_at FROM signing_keys ORDER BY activates_at, seq",
                &[],
            )
            .await?
            .iter()
            .map(|r| signing_row(r, vec![]))
            .collect();
        let revoked_tokens = tx
            .query(
                "SELECT jti, expires_at FROM revoked_tokens WHERE expires_at > $1 ORDER BY jti",
                &[&now],
            )
            .await?
            .iter()
            .map(|r| SyncRevokedToken {
                jti: r.get(0),
                expires_at: r.get(1),
            })
            .collect();
        tx.commit().await?;
        Ok((
            super::sync_payload(&self.epoch, version, since, services, revoked_tokens),
            signing,
        ))
    }

    async fn check_writable(&self) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        // Not read-only (a standby answers this with an error), writes nothing.
        tx.execute(
            "SELECT value FROM meta WHERE name = 'version' FOR UPDATE NOWAIT",
            &[],
        )
        .await
        .or_else(|e| {
            // Held by a writer right now: busy, but writable.
            if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                Ok(0)
            } else {
                Err(e)
            }
        })?;
        tx.rollback().await?;
        Ok(())
    }

    async fn changed_elsewhere(&self) {
        self.changes.notified().await
    }
}

impl Storage for Postgres {
    fn backend(&self) -> &'static str {
        "postgres"
    }
}
