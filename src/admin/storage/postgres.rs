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
use tokio_postgres::{GenericClient, NoTls, Row, Transaction};

use super::{
    create_change, failed_auth_change, hash32, json_list, patched, rotate_change, rotation_plan, sync_key,
    sync_service, to_json, Audit, AuditQuery, AuditStore, BulkService, ClientRecord, CredentialKind,
    CredentialStore, KeyInfo, KeyOwner, KeyRecord, NewService, Rotation, ServicePatch, ServiceRecord,
    ServiceStore, SigningKeyRow, Storage, StoreError, StoreResult, StoredKey, SyncStore, TokenStore,
};
use crate::core::key::{Environment, KeyHash};
use crate::core::sync::{SyncPayload, SyncRevokedToken};

/// The NOTIFY channel of committed changes.
const CHANNEL: &str = "permiso_changes";

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        // A lost connection or a server going away is a temporary condition (503), not a bug;
        // anything else (a bad statement, a parameter of the wrong type) is ours.
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io {
            return StoreError::Unavailable(e.to_string());
        }
        match e.code() {
            Some(c) if c.code().starts_with("08") || c.code().starts_with("57P") => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Postgres(e),
        }
    }
}

/// Every pool failure is one of getting a connection (the server down, restarting, refusing
/// connections, the pool exhausted): temporary.
fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// How to reach the database: the URL's settings, with the password from outside the config.
#[derive(Clone)]
pub struct PgSettings {
    pub config: tokio_postgres::Config,
    pub pool_size: usize,
    pub connect_timeout: Duration,
}

pub struct Postgres {
    pool: Pool,
    settings: PgSettings,
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
            NoTls,
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
            settings.connect_timeout,
            changes.clone(),
        ));
        Ok(Postgres {
            pool,
            settings,
            epoch,
            changes,
        })
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_error)
    }
}

/// Holds a LISTEN connection and signals `changes` on each notification; reconnects with
/// backoff when the connection drops (and signals then too: what was sent while it was down
/// is lost). Ends with the runtime.
async fn listen(config: tokio_postgres::Config, timeout: Duration, changes: Arc<tokio::sync::Notify>) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut cfg = config.clone();
        cfg.connect_timeout(timeout);
        match cfg.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                let driver = tokio::spawn(async move {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(m) = stream.next().await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                                let _ = tx.send(());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "PostgreSQL change listener lost its connection");
                                return;
                            }
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!(error = %e, "LISTEN failed");
                } else {
                    backoff = Duration::from_millis(100);
                    changes.notify_waiters();
                    while rx.recv().await.is_some() {
                        changes.notify_waiters();
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "PostgreSQL change listener cannot connect"),
        }
        changes.notify_waiters();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

const SERVICE_COLS: &str = "id, name, environment, description, contact_email, is_trusted, scopes, \
     rate_limit_per_minute, rate_limit_per_hour, allowed_ips, disabled, created_at, updated_at, \
     access_token_lifetime, tokens_not_before";

/// kid, public_x, (private_sealed), created_at, activates_at.
fn signing_row(r: &Row, private_sealed: Vec<u8>) -> SigningKeyRow {
    SigningKeyRow {
        kid: r.get(0),
        public_x: r.get(1),
        private_sealed,
        created_at: r.get(3),
        activates_at: r.get(4),
    }
}

fn u32_of(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

fn service_of(r: &Row) -> StoreResult<ServiceRecord> {
    let env: String = r.get(2);
    Ok(ServiceRecord {
        id: r.get(0),
        name: r.get(1),
        environment: Environment::parse(&env)
            .ok_or_else(|| StoreError::Corrupt(format!("environment {env:?}")))?,
        description: r.get(3),
        contact_email: r.get(4),
        is_trusted: r.get(5),
        scopes: json_list(r.get(6))?,
        rate_limit_per_minute: u32_of(r.get(7)),
        rate_limit_per_hour: u32_of(r.get(8)),
        allowed_ips: json_list(r.get(9))?,
        disabled: r.get(10),
        created_at: r.get(11),
        updated_at: r.get(12),
        access_token_lifetime: r.get::<_, i64>(13) as u32,
        tokens_not_before: r.get(14),
        tls_identities: vec![],
        keys: vec![],
        secrets: vec![],
    })
}

async fn load_keys<C: GenericClient>(
    c: &C,
    service_id: &str,
    kind: CredentialKind,
) -> StoreResult<Vec<KeyRecord>> {
    let rows = c
        .query(
            "SELECT id, display_prefix, created_at, expires_at, revoked_at, last_used_at
             FROM credentials WHERE service_id = $1 AND kind = $2 ORDER BY created_at, seq",
            &[&service_id, &kind.as_str()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| KeyRecord {
            id: r.get(0),
            display_prefix: r.get(1),
            created_at: r.get(2),
            expires_at: r.get(3),
            revoked_at: r.get(4),
            last_used_at: r.get(5),
        })
        .collect())
}

async fn load_service<C: GenericClient>(c: &C, id: &str) -> StoreResult<ServiceRecord> {
    let row = c
        .query_opt(
            &format!("SELECT {SERVICE_COLS} FROM services WHERE id = $1"),
            &[&id],
        )
        .await?
        .ok_or(StoreError::NotFound)?;
    let mut rec = service_of(&row)?;
    rec.keys = load_keys(c, id, CredentialKind::ApiKey).await?;
    rec.secrets = load_keys(c, id, CredentialKind::ClientSecret).await?;
    rec.tls_identities = c
        .query(
            "SELECT identity FROM tls_identities WHERE service_id = $1 ORDER BY seq",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(rec)
}

/// Takes the writers' lock (the version row) without changing the version.
async fn lock_writes(tx: &Transaction<'_>) -> StoreResult<()> {
    tx.execute("SELECT value FROM meta WHERE name = 'version' FOR UPDATE", &[])
        .await?;
    Ok(())
}

/// Bumps the version (taking or keeping the writers' lock) and announces it at commit.
async fn bump_version(tx: &Transaction<'_>) -> StoreResult<u64> {
    let v: i64 = tx
        .query_one(
            "UPDATE meta SET value = (value::bigint + 1)::text WHERE name = 'version' RETURNING value::bigint",
            &[],
        )
        .await?
        .get(0);
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &v.to_string()])
        .await?;
    Ok(v as u64)
}

async fn touch_service(tx: &Transaction<'_>, id: &str, v: u64, now: i64) -> StoreResult<()> {
    let n = tx
        .execute(
            "UPDATE services SET version = $1, updated_at = $2 WHERE id = $3",
            &[&(v as i64), &now, &id],
        )
        .await?;
    if n == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

/// Appends one audit entry chained to the last; the caller holds the writers' lock.
async fn append_audit(
    tx: &Transaction<'_>,
    now: i64,
    who: &Audit,
    action: &str,
    target: Option<&str>,
    change: serde_json::Value,
) -> StoreResult<()> {
    use crate::core::audit::{entry_hash, GENESIS};
    let last = tx
        .query_opt("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", &[])
        .await?;
    let (seq, prev) = match last {
        None => (1u64, GENESIS),
        Some(r) => (r.get::<_, i64>(0) as u64 + 1, hash32(r.get(1), "audit hash")?),
    };
    let ip = who.source_ip.as_deref();
    let hash = entry_hash(&prev, seq, now, &who.actor, action, target, ip, &change);
    tx.execute(
        "INSERT INTO audit_log (seq, at, actor, action, target, source_ip, change, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &(seq as i64),
            &now,
            &who.actor,
            &action,
            &target,
            &ip,
            &change.to_string(),
            &&prev[..],
            &&hash[..],
        ],
    )
    .await?;
    Ok(())
}

async fn insert_service(
    tx: &Transaction<'_>,
    id: &str,
    s: &NewService,
    now: i64,
    v: u64,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        &format!(
            "INSERT INTO services ({SERVICE_COLS}, version) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,false,$11,$11,$12,0,$13)"
        ),
        &[
            &id,
            &s.name,
            &s.environment.as_str(),
            &s.description,
            &s.contact_email,
            &s.is_trusted,
            &to_json(&s.scopes),
            &s.rate_limit_per_minute.map(i64::from),
            &s.rate_limit_per_hour.map(i64::from),
            &to_json(&s.allowed_ips),
            &now,
            &i64::from(s.access_token_lifetime),
            &(v as i64),
        ],
    )
    .await
}

async fn insert_credential(
    tx: &Transaction<'_>,
    service_id: &str,
    kind: CredentialKind,
    id: &str,
    key: &StoredKey,
    now: i64,
) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO credentials (id, service_id, kind, hash, display_prefix, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&id, &service_id, &kind.as_str(), &&key.hash.0[..], &key.display_prefix, &now],
    )
    .await?;
    Ok(())
}

async fn set_identities(tx: &Transaction<'_>, service_id: &str, identities: &[String]) -> StoreResult<()> {
    tx.execute("DELETE FROM tls_identities WHERE service_id = $1", &[&service_id])
        .await?;
    for i in identities {
        // A violation aborts the transaction; it is dropped (rolled back) with the error.
        if let Err(e) = tx
            .execute(
                "INSERT INTO tls_identities (identity, service_id) VALUES ($1, $2)",
                &[i, &service_id],
            )
            .await
        {
            return Err(if is_unique_violation(&e) {
                StoreError::Conflict(format!("the identity {i:?} belongs to another service"))
            } else {
                e.into()
            });
        }
    }
    Ok(())
}

async fn owner_of<C: GenericClient>(
    c: &C,
    hash: &KeyHash,
    kind: CredentialKind,
    now: i64,
) -> StoreResult<Option<(String, String, Option<i64>)>> {
    Ok(c.query_opt(
        "SELECT k.id, k.service_id, k.last_used_at FROM credentials k JOIN services s ON s.id = k.service_id
             WHERE k.hash = $1 AND k.kind = $2 AND k.revoked_at IS NULL
               AND (k.expires_at IS NULL OR k.expires_at > $3) AND NOT s.disabled",
        &[&&hash.0[..], &kind.as_str(), &now],
    )
    .await?
    .map(|r| (r.get(0), r.get(1), r.get(2))))
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
                "SELECT id FROM services WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after_seq, &(limit as i64 + 1)],
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
                 access_token_lifetime = $9
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
impl CredentialStore for Postgres {
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
    ) -> StoreResult<(Rotation, u64)> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        let v = bump_version(&tx).await?;
        let cur = load_service(&tx, id).await?;
        let ended = rotation_plan(&cur, kind, grace_secs, max_active, now)?;
        for (key_id, end) in &ended {
            tx.execute(
                "UPDATE credentials SET expires_at = $1 WHERE id = $2",
                &[end, key_id],
            )
            .await?;
        }
        insert_credential(&tx, id, kind, new_id, key, now).await?;
        touch_service(&tx, id, v, now).await?;
        let service = load_service(&tx, id).await?;
        let (action, change) = rotate_change(kind, new_id, key, grace_secs, &ended);
        append_audit(&tx, now, who, action, Some(id), change).await?;
        tx.commit().await?;
        Ok((Rotation { service, ended }, v))
    }

    async fn revoke_key(
        &self,
        id: &str,
        key_id: &str,
        now: i64,
        who: &Audit,
    ) -> StoreResult<(KeyRecord, u64)> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        let v = bump_version(&tx).await?;
        let n = tx
            .execute(
                "UPDATE credentials SET revoked_at = COALESCE(revoked_at, $1)
                 WHERE id = $2 AND service_id = $3 AND kind = 'api_key'",
                &[&now, &key_id, &id],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        touch_service(&tx, id, v, now).await?;
        let key = load_keys(&tx, id, CredentialKind::ApiKey)
            .await?
            .into_iter()
            .find(|k| k.id == key_id)
            .ok_or(StoreError::NotFound)?;
        let change = serde_json::json!({ "key_id": key_id });
        append_audit(&tx, now, who, "key.revoke", Some(id), change).await?;
        tx.commit().await?;
        Ok((key, v))
    }

    async fn revoke_key_by_hash(
        &self,
        hash: &KeyHash,
        owner: Option<&str>,
        now: i64,
        who: &Audit,
    ) -> StoreResult<Option<u64>> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        lock_writes(&tx).await?;
        let found = tx
            .query_opt(
                "SELECT service_id, id FROM credentials WHERE hash = $1 AND kind = 'api_key' AND revoked_at IS NULL",
                &[&&hash.0[..]],
            )
            .await?
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)));
        let Some((service, key_id)) = found.filter(|(s, _)| owner.is_none_or(|o| o == s)) else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE credentials SET revoked_at = $1 WHERE hash = $2 AND kind = 'api_key'",
            &[&now, &&hash.0[..]],
        )
        .await?;
        let v = bump_version(&tx).await?;
        touch_service(&tx, &service, v, now).await?;
        let change = serde_json::json!({ "key_id": key_id, "via": "oauth/revoke" });
        append_audit(&tx, now, who, "key.revoke", Some(&service), change).await?;
        tx.commit().await?;
        Ok(Some(v))
    }

    async fn key_owner(&self, hash: &KeyHash, now: i64) -> StoreResult<Option<KeyOwner>> {
        // One round trip: every sync long poll authenticates here, and a fleet waking at once
        // after a change would queue on the pool with one query more each.
        let c = self.client().await?;
        let Some(r) = c
            .query_opt(
                "SELECT k.id, k.service_id, k.last_used_at, s.scopes, s.allowed_ips
                 FROM credentials k JOIN services s ON s.id = k.service_id
                 WHERE k.hash = $1 AND k.kind = 'api_key' AND k.revoked_at IS NULL
                   AND (k.expires_at IS NULL OR k.expires_at > $2) AND NOT s.disabled",
                &[&&hash.0[..], &now],
            )
            .await?
        else {
            return Ok(None);
        };
        let (key_id, service_id, last): (String, String, Option<i64>) = (r.get(0), r.get(1), r.get(2));
        if last.is_none_or(|l| now - l >= 60) {
            c.execute(
                "UPDATE credentials SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
                &[&now, &key_id],
            )
            .await?;
        }
        Ok(Some(KeyOwner {
            service_id,
            key_id,
            scopes: json_list(r.get(3))?,
            allowed_ips: json_list(r.get(4))?,
        }))
    }

    async fn key_info(&self, hash: &KeyHash, now: i64) -> StoreResult<Option<KeyInfo>> {
        let c = self.client().await?;
        let Some((key_id, service_id, _)) = owner_of(&**c, hash, CredentialKind::ApiKey, now).await? else {
            return Ok(None);
        };
        let k = c
            .query_one(
                "SELECT created_at, expires_at FROM credentials WHERE id = $1",
                &[&key_id],
            )
            .await?;
        let s = c
            .query_one("SELECT scopes FROM services WHERE id = $1", &[&service_id])
            .await?;
        Ok(Some(KeyInfo {
            service_id,
            scopes: json_list(s.get(0))?,
            created_at: k.get(0),
            expires_at: k.get(1),
        }))
    }

    async fn authenticate_client(
        &self,
        client_id: &str,
        secret_hash: &KeyHash,
        now: i64,
    ) -> StoreResult<Option<ClientRecord>> {
        let c = self.client().await?;
        let found = c
            .query_opt(
                "SELECT id FROM credentials WHERE hash = $1 AND kind = 'client_secret' AND service_id = $2
                   AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $3)",
                &[&&secret_hash.0[..], &client_id, &now],
            )
            .await?;
        let Some(row) = found else { return Ok(None) };
        let secret_id: String = row.get(0);
        c.execute(
            "UPDATE credentials SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at <= $3)",
            &[&now, &secret_id, &(now - 60)],
        )
        .await?;
        let rec = load_service(&**c, client_id).await?;
        Ok(Some(ClientRecord {
            service_id: rec.id,
            scopes: rec.scopes,
            disabled: rec.disabled,
            allowed_ips: rec.allowed_ips,
            access_token_lifetime: rec.access_token_lifetime,
        }))
    }

    async fn record_usage(&self, marks: &[(String, i64)]) -> StoreResult<usize> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        let st = tx
            .prepare(
                "UPDATE credentials SET last_used_at = $1
                 WHERE id = $2 AND kind = 'api_key' AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .await?;
        let mut moved = 0;
        for (key_id, at) in marks {
            moved += tx.execute(&st, &[at, key_id]).await? as usize;
        }
        tx.commit().await?;
        Ok(moved)
    }
}

#[async_trait]
impl TokenStore for Postgres {
    async fn token_client_ok(&self, id: &str, iat: i64) -> StoreResult<bool> {
        Ok(self
            .client()
            .await?
            .query_opt(
                "SELECT disabled, tokens_not_before FROM services WHERE id = $1",
                &[&id],
            )
            .await?
            .is_some_and(|r| !r.get::<_, bool>(0) && iat >= r.get::<_, i64>(1)))
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
        use crate::core::audit::{to_hex, AuditEntry};
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
        let more = rows.len() > q.limit as usize;
        let mut out = Vec::with_capacity(rows.len().min(q.limit as usize));
        for r in rows.iter().take(q.limit as usize) {
            out.push(AuditEntry {
                seq: r.get::<_, i64>(0) as u64,
                at: r.get(1),
                actor: r.get(2),
                action: r.get(3),
                target: r.get(4),
                source_ip: r.get(5),
                change: serde_json::from_str(r.get(6))
                    .map_err(|e| StoreError::Corrupt(format!("audit change: {e}")))?,
                prev_hash: to_hex(&hash32(r.get(7), "audit hash")?),
                hash: to_hex(&hash32(r.get(8), "audit hash")?),
            });
        }
        Ok((out, more))
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
        let since = match (epoch, after) {
            (Some(e), Some(a)) if e == self.epoch && a <= version => Some(a),
            _ => None,
        };
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
                "SELECT id, hash, expires_at FROM credentials
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
                keys.push(sync_key(r.get(0), r.get(1), r.get(2))?);
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
        let payload = SyncPayload {
            epoch: self.epoch.clone(),
            version,
            full: since.is_none(),
            services,
            issuer: String::new(),
            signing_keys: vec![],
            revoked_tokens,
            generated_at_ms: None,
        };
        Ok((payload, signing))
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
