//! The SQLite backend (schema.sql, the embedded default): one process, one connection behind a
//! mutex, WAL. `Store` is the synchronous core; `Sqlite` runs it on tokio's blocking pool
//! behind the storage traits. SQLite serializes writers itself, so the version bump and the
//! audit append need no extra lock.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::{
    create_change, failed_auth_change, json_list, patched, rotate_change, rotation_plan, to_json, Audit,
    AuditQuery, AuditStore, BulkService, ClientRecord, CredentialKind, CredentialStore, KeyInfo, KeyOwner,
    KeyRecord, NewService, Rotation, ServicePatch, ServiceRecord, ServiceStore, SigningKeyRow, Storage,
    StoreError, StoreResult, StoredKey, SyncStore, TokenStore,
};
use crate::core::key::{Environment, KeyHash};
use crate::core::sync::{SyncPayload, SyncRevokedToken};

/// Appends one entry, chained to the last, inside the caller's transaction: the change and
/// its audit entry commit together or not at all.
fn append_audit(
    tx: &Transaction<'_>,
    now: i64,
    who: &Audit,
    action: &str,
    target: Option<&str>,
    change: serde_json::Value,
) -> StoreResult<()> {
    use crate::core::audit::{entry_hash, GENESIS};
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match last {
        None => (1, GENESIS),
        Some((seq, h)) => (
            seq as u64 + 1,
            h.try_into()
                .map_err(|_| StoreError::Corrupt("audit hash is not 32 bytes".into()))?,
        ),
    };
    let ip = who.source_ip.as_deref();
    let hash = entry_hash(&prev, seq, now, &who.actor, action, target, ip, &change);
    tx.execute(
        "INSERT INTO audit_log (seq, at, actor, action, target, source_ip, change, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            seq as i64,
            now,
            who.actor,
            action,
            target,
            ip,
            change.to_string(),
            &prev[..],
            &hash[..]
        ],
    )?;
    Ok(())
}

/// One audit_log row as read, before its hashes and change are decoded.
struct AuditRow {
    seq: i64,
    at: i64,
    actor: String,
    action: String,
    target: Option<String>,
    source_ip: Option<String>,
    change: String,
    prev: Vec<u8>,
    hash: Vec<u8>,
}

fn audit_row(r: &Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        seq: r.get(0)?,
        at: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        target: r.get(4)?,
        source_ip: r.get(5)?,
        change: r.get(6)?,
        prev: r.get(7)?,
        hash: r.get(8)?,
    })
}

pub struct Store {
    conn: Mutex<Connection>,
    epoch: String,
}

const SERVICE_COLS: &str = "id, name, environment, description, contact_email, is_trusted, scopes, \
     rate_limit_per_minute, rate_limit_per_hour, allowed_ips, disabled, created_at, updated_at, \
     access_token_lifetime, tokens_not_before";

struct RawService {
    rec: ServiceRecord,
    scopes_json: String,
    ips_json: String,
    env: String,
}

fn raw_service(r: &Row<'_>) -> rusqlite::Result<RawService> {
    Ok(RawService {
        rec: ServiceRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            environment: Environment::Live,
            description: r.get(3)?,
            contact_email: r.get(4)?,
            is_trusted: r.get(5)?,
            scopes: vec![],
            rate_limit_per_minute: r.get(7)?,
            rate_limit_per_hour: r.get(8)?,
            allowed_ips: vec![],
            disabled: r.get(10)?,
            created_at: r.get(11)?,
            updated_at: r.get(12)?,
            access_token_lifetime: r.get(13)?,
            tokens_not_before: r.get(14)?,
            tls_identities: vec![],
            keys: vec![],
            secrets: vec![],
        },
        env: r.get(2)?,
        scopes_json: r.get(6)?,
        ips_json: r.get(9)?,
    })
}

fn finish(raw: RawService) -> StoreResult<ServiceRecord> {
    let mut rec = raw.rec;
    rec.environment = Environment::parse(&raw.env)
        .ok_or_else(|| StoreError::Corrupt(format!("environment {:?}", raw.env)))?;
    rec.scopes = json_list(&raw.scopes_json)?;
    rec.allowed_ips = json_list(&raw.ips_json)?;
    Ok(rec)
}

fn load_keys(conn: &Connection, service_id: &str, kind: CredentialKind) -> StoreResult<Vec<KeyRecord>> {
    let mut st = conn.prepare_cached(
        "SELECT id, display_prefix, created_at, expires_at, revoked_at, last_used_at
         FROM credentials WHERE service_id = ?1 AND kind = ?2 ORDER BY created_at, rowid",
    )?;
    let rows = st.query_map([service_id, kind.as_str()], |r| {
        Ok(KeyRecord {
            id: r.get(0)?,
            display_prefix: r.get(1)?,
            created_at: r.get(2)?,
            expires_at: r.get(3)?,
            revoked_at: r.get(4)?,
            last_used_at: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn load_service(conn: &Connection, id: &str) -> StoreResult<ServiceRecord> {
    let raw = conn
        .query_row(
            &format!("SELECT {SERVICE_COLS} FROM services WHERE id = ?1"),
            [id],
            raw_service,
        )
        .optional()?
        .ok_or(StoreError::NotFound)?;
    let mut rec = finish(raw)?;
    rec.keys = load_keys(conn, &rec.id, CredentialKind::ApiKey)?;
    rec.secrets = load_keys(conn, &rec.id, CredentialKind::ClientSecret)?;
    rec.tls_identities = load_identities(conn, &rec.id)?;
    Ok(rec)
}

fn load_identities(conn: &Connection, service_id: &str) -> StoreResult<Vec<String>> {
    let mut st =
        conn.prepare_cached("SELECT identity FROM tls_identities WHERE service_id = ?1 ORDER BY rowid")?;
    let rows = st.query_map([service_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
}

/// Replaces a service's identities; one held by another service is a conflict.
fn set_identities(tx: &Transaction<'_>, service_id: &str, identities: &[String]) -> StoreResult<()> {
    tx.execute("DELETE FROM tls_identities WHERE service_id = ?1", [service_id])?;
    for i in identities {
        if let Err(e) = tx.execute(
            "INSERT INTO tls_identities (identity, service_id) VALUES (?1, ?2)",
            params![i, service_id],
        ) {
            return Err(if is_unique_violation(&e) {
                StoreError::Conflict(format!("the identity {i:?} belongs to another service"))
            } else {
                e.into()
            });
        }
    }
    Ok(())
}

fn bump_version(tx: &Transaction<'_>) -> StoreResult<u64> {
    let v: i64 = tx.query_row(
        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = 'version' RETURNING CAST(value AS INTEGER)",
        [],
        |r| r.get(0),
    )?;
    Ok(v as u64)
}

fn touch_service(tx: &Transaction<'_>, id: &str, now: i64) -> StoreResult<u64> {
    let v = bump_version(tx)?;
    let n = tx.execute(
        "UPDATE services SET version = ?1, updated_at = ?2 WHERE id = ?3",
        params![v as i64, now, id],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(v)
}

/// One services row (create and bulk create write the same columns).
fn insert_service(
    tx: &Transaction<'_>,
    id: &str,
    s: &NewService,
    now: i64,
    version: u64,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(&format!(
        "INSERT INTO services ({SERVICE_COLS}, version) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,0,?11,?11,?12,0,?13)"
    ))?
    .execute(params![
        id,
        s.name,
        s.environment.as_str(),
        s.description,
        s.contact_email,
        s.is_trusted,
        to_json(&s.scopes),
        s.rate_limit_per_minute,
        s.rate_limit_per_hour,
        to_json(&s.allowed_ips),
        now,
        s.access_token_lifetime,
        version as i64
    ])
}

fn insert_credential(
    tx: &Transaction<'_>,
    service_id: &str,
    kind: CredentialKind,
    id: &str,
    key: &StoredKey,
    now: i64,
) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO credentials (id, service_id, kind, hash, display_prefix, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            id,
            service_id,
            kind.as_str(),
            &key.hash.0[..],
            key.display_prefix,
            now
        ],
    )?;
    Ok(())
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

fn read_version(conn: &Connection) -> StoreResult<u64> {
    let v: i64 = conn.query_row(
        "SELECT CAST(value AS INTEGER) FROM meta WHERE name = 'version'",
        [],
        |r| r.get(0),
    )?;
    Ok(v as u64)
}

fn owner_of(
    conn: &Connection,
    hash: &KeyHash,
    kind: CredentialKind,
    now: i64,
) -> StoreResult<Option<(String, String, Option<i64>)>> {
    Ok(conn
        .query_row(
            "SELECT k.id, k.service_id, k.last_used_at FROM credentials k JOIN services s ON s.id = k.service_id
             WHERE k.hash = ?1 AND k.kind = ?2 AND k.revoked_at IS NULL
               AND (k.expires_at IS NULL OR k.expires_at > ?3) AND s.disabled = 0",
            params![&hash.0[..], kind.as_str(), now],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?)
}

/// Columns added after a database may have been created: `CREATE TABLE IF NOT EXISTS` does not
/// add them to an existing table. (Versioned migrations are to replace this.)
fn add_missing_columns(conn: &Connection) -> StoreResult<()> {
    let has: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('services') WHERE name = 'tokens_not_before'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has {
        conn.execute_batch("ALTER TABLE services ADD COLUMN tokens_not_before INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

impl Store {
    pub fn open(path: &Path) -> StoreResult<Store> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode: a committed transaction survives a process crash (kill -9); only
        // an OS crash can lose the last commits.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        super::migrations::sqlite(&mut conn)?;
        add_missing_columns(&conn)?;
        let epoch: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE name = 'epoch'", [], |r| r.get(0))
            .optional()?;
        let epoch = match epoch {
            Some(e) => e,
            None => {
                let e = super::new_epoch();
                conn.execute("INSERT INTO meta (name, value) VALUES ('epoch', ?1)", [&e])?;
                e
            }
        };
        Ok(Store {
            conn: Mutex::new(conn),
            epoch,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a write transaction can start now (readiness: disk full, read-only file system
    /// or a lock held elsewhere all show up here). Writes nothing.
    pub fn check_writable(&self) -> StoreResult<()> {
        let conn = self.conn();
        conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")?;
        Ok(())
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn version(&self) -> StoreResult<u64> {
        read_version(&self.conn())
    }

    /// Creates a service with its first API key and client secret. Returns the record and the
    /// new sync version.
    pub fn create_service(
        &self,
        id: &str,
        s: &NewService,
        key: (&str, &StoredKey),
        secret: (&str, &StoredKey),
        now: i64,
        who: &Audit,
    ) -> StoreResult<(ServiceRecord, u64)> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let v = bump_version(&tx)?;
        let r = insert_service(&tx, id, s, now, v);
        if let Err(e) = r {
            return Err(if is_unique_violation(&e) {
                StoreError::Conflict(format!("a service named {:?} already exists", s.name))
            } else {
                e.into()
            });
        }
        insert_credential(&tx, id, CredentialKind::ApiKey, key.0, key.1, now)?;
        insert_credential(&tx, id, CredentialKind::ClientSecret, secret.0, secret.1, now)?;
        set_identities(&tx, id, &s.tls_identities)?;
        let rec = load_service(&tx, id)?;
        append_audit(
            &tx,
            now,
            who,
            "service.create",
            Some(id),
            create_change(s, key, secret.0),
        )?;
        tx.commit()?;
        Ok((rec, v))
    }

    /// Creates many services with their keys in one transaction (load tests and benchmarks:
    /// 10k creates through the API would take minutes). Same rows as `create_service`.
    pub fn bulk_create(&self, services: &[BulkService], now: i64, who: &Audit) -> StoreResult<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let v = bump_version(&tx)?;
        for b in services {
            insert_service(&tx, &b.id, &b.service, now, v)?;
            for (key_id, key) in &b.keys {
                insert_credential(&tx, &b.id, CredentialKind::ApiKey, key_id, key, now)?;
            }
            let (secret_id, secret) = &b.secret;
            insert_credential(&tx, &b.id, CredentialKind::ClientSecret, secret_id, secret, now)?;
        }
        let change = serde_json::json!({ "services": services.len() });
        append_audit(&tx, now, who, "service.bulk_create", None, change)?;
        tx.commit()?;
        Ok(v)
    }

    pub fn get_service(&self, id: &str) -> StoreResult<ServiceRecord> {
        load_service(&self.conn(), id)
    }

    /// A page of services in creation order, after the service `after` (a cursor).
    pub fn list_services(&self, limit: u32, after: Option<&str>) -> StoreResult<(Vec<ServiceRecord>, bool)> {
        let conn = self.conn();
        let after_rowid: i64 = match after {
            None => 0,
            Some(id) => conn
                .query_row("SELECT rowid FROM services WHERE id = ?1", [id], |r| r.get(0))
                .optional()?
                .ok_or(StoreError::NotFound)?,
        };
        let ids: Vec<String> = conn
            .prepare_cached("SELECT id FROM services WHERE rowid > ?1 ORDER BY rowid LIMIT ?2")?
            .query_map(params![after_rowid, limit as i64 + 1], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let more = ids.len() > limit as usize;
        let out = ids
            .iter()
            .take(limit as usize)
            .map(|id| load_service(&conn, id))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok((out, more))
    }

    pub fn patch_service(
        &self,
        id: &str,
        p: &ServicePatch,
        now: i64,
        who: &Audit,
        action: &str,
    ) -> StoreResult<(ServiceRecord, u64)> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let cur = load_service(&tx, id)?;
        let n = patched(&cur, p);
        tx.execute(
            "UPDATE services SET scopes = ?1, rate_limit_per_minute = ?2, rate_limit_per_hour = ?3,
                 allowed_ips = ?4, description = ?5, contact_email = ?6, is_trusted = ?7, disabled = ?8,
                 access_token_lifetime = ?9
             WHERE id = ?10",
            params![
                to_json(&n.scopes),
                n.rate_limit_per_minute,
                n.rate_limit_per_hour,
                to_json(&n.allowed_ips),
                n.description,
                n.contact_email,
                n.is_trusted,
                n.disabled,
                n.access_token_lifetime,
                id
            ],
        )?;
        if let Some(ids) = &p.tls_identities {
            set_identities(&tx, id, ids)?;
        }
        if n.disabling {
            // Every access token issued so far dies with the disable, for good: tokens carry
            // whole seconds, so the floor is the next second.
            tx.execute(
                "UPDATE services SET tokens_not_before = ?1 WHERE id = ?2",
                params![now + 1, id],
            )?;
        }
        let v = touch_service(&tx, id, now)?;
        let rec = load_service(&tx, id)?;
        append_audit(
            &tx,
            now,
            who,
            action,
            Some(id),
            serde_json::to_value(p).unwrap_or_default(),
        )?;
        tx.commit()?;
        Ok((rec, v))
    }

    /// Adds a credential of `kind` and cuts every active one's life to `now + grace_secs`
    /// (0 ends them now).
    #[allow(clippy::too_many_arguments)]
    pub fn rotate(
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
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let cur = load_service(&tx, id)?;
        let ended = rotation_plan(&cur, kind, grace_secs, max_active, now)?;
        for (key_id, new_end) in &ended {
            tx.execute(
                "UPDATE credentials SET expires_at = ?1 WHERE id = ?2",
                params![new_end, key_id],
            )?;
        }
        insert_credential(&tx, id, kind, new_id, key, now)?;
        let v = touch_service(&tx, id, now)?;
        let service = load_service(&tx, id)?;
        let (action, change) = rotate_change(kind, new_id, key, grace_secs, &ended);
        append_audit(&tx, now, who, action, Some(id), change)?;
        tx.commit()?;
        Ok((Rotation { service, ended }, v))
    }

    pub fn revoke_key(&self, id: &str, key_id: &str, now: i64, who: &Audit) -> StoreResult<(KeyRecord, u64)> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE credentials SET revoked_at = COALESCE(revoked_at, ?1)
             WHERE id = ?2 AND service_id = ?3 AND kind = 'api_key'",
            params![now, key_id, id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        let v = touch_service(&tx, id, now)?;
        let key = load_keys(&tx, id, CredentialKind::ApiKey)?
            .into_iter()
            .find(|k| k.id == key_id)
            .ok_or(StoreError::NotFound)?;
        append_audit(
            &tx,
            now,
            who,
            "key.revoke",
            Some(id),
            serde_json::json!({ "key_id": key_id }),
        )?;
        tx.commit()?;
        Ok((key, v))
    }

    /// Revokes the API key with this hash if it belongs to `owner` (any owner when None).
    /// Returns the new sync version when something was revoked.
    pub fn revoke_key_by_hash(
        &self,
        hash: &KeyHash,
        owner: Option<&str>,
        now: i64,
        who: &Audit,
    ) -> StoreResult<Option<u64>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let found: Option<(String, String)> = tx
            .query_row(
                "SELECT service_id, id FROM credentials WHERE hash = ?1 AND kind = 'api_key' AND revoked_at IS NULL",
                params![&hash.0[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((service, key_id)) = found.filter(|(s, _)| owner.is_none_or(|o| o == s)) else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE credentials SET revoked_at = ?1 WHERE hash = ?2 AND kind = 'api_key'",
            params![now, &hash.0[..]],
        )?;
        let v = touch_service(&tx, &service, now)?;
        let change = serde_json::json!({ "key_id": key_id, "via": "oauth/revoke" });
        append_audit(&tx, now, who, "key.revoke", Some(&service), change)?;
        tx.commit()?;
        Ok(Some(v))
    }

    /// Finds the service behind a presented API key, if the key may still authenticate now,
    /// and records that it was used (at most once a minute per key, to keep writes rare).
    pub fn key_owner(&self, hash: &KeyHash, now: i64) -> StoreResult<Option<KeyOwner>> {
        let conn = self.conn();
        let Some((key_id, service_id, last)) = owner_of(&conn, hash, CredentialKind::ApiKey, now)? else {
            return Ok(None);
        };
        if last.is_none_or(|l| now - l >= 60) {
            conn.execute(
                "UPDATE credentials SET last_used_at = ?1 WHERE id = ?2",
                params![now, key_id],
            )?;
        }
        let (scopes, allowed_ips): (String, String) = conn.query_row(
            "SELECT scopes, allowed_ips FROM services WHERE id = ?1",
            [&service_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Some(KeyOwner {
            service_id,
            key_id,
            scopes: json_list(&scopes)?,
            allowed_ips: json_list(&allowed_ips)?,
        }))
    }

    /// For introspection: the API key's service and times, if it is usable now.
    pub fn key_info(&self, hash: &KeyHash, now: i64) -> StoreResult<Option<KeyInfo>> {
        let conn = self.conn();
        let Some((key_id, service_id, _)) = owner_of(&conn, hash, CredentialKind::ApiKey, now)? else {
            return Ok(None);
        };
        let (created_at, expires_at): (i64, Option<i64>) = conn.query_row(
            "SELECT created_at, expires_at FROM credentials WHERE id = ?1",
            [&key_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let scopes: String =
            conn.query_row("SELECT scopes FROM services WHERE id = ?1", [&service_id], |r| {
                r.get(0)
            })?;
        Ok(Some(KeyInfo {
            service_id,
            scopes: json_list(&scopes)?,
            created_at,
            expires_at,
        }))
    }

    /// Checks a client secret for `client_id`. Disabled clients are returned (the caller
    /// decides what to answer); unknown ids, wrong, revoked or expired secrets are None.
    pub fn authenticate_client(
        &self,
        client_id: &str,
        secret_hash: &KeyHash,
        now: i64,
    ) -> StoreResult<Option<ClientRecord>> {
        let conn = self.conn();
        let found: Option<String> = conn
            .query_row(
                "SELECT id FROM credentials WHERE hash = ?1 AND kind = 'client_secret' AND service_id = ?2
                   AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?3)",
                params![&secret_hash.0[..], client_id, now],
                |r| r.get(0),
            )
            .optional()?;
        let Some(secret_id) = found else { return Ok(None) };
        conn.execute(
            "UPDATE credentials SET last_used_at = ?1 WHERE id = ?2 AND (last_used_at IS NULL OR last_used_at <= ?1 - 60)",
            params![now, secret_id],
        )?;
        let rec = load_service(&conn, client_id)?;
        Ok(Some(ClientRecord {
            service_id: rec.id,
            scopes: rec.scopes,
            disabled: rec.disabled,
            allowed_ips: rec.allowed_ips,
            access_token_lifetime: rec.access_token_lifetime,
        }))
    }

    /// Whether the service exists and is enabled (introspection of a JWT checks this).
    /// Whether an access token of client `id` issued at `iat` may still be honoured: the
    /// service exists, is enabled, and was not disabled since the token was issued.
    pub fn token_client_ok(&self, id: &str, iat: i64) -> StoreResult<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT disabled, tokens_not_before FROM services WHERE id = ?1",
                [id],
                |r| Ok((r.get::<_, bool>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?
            .is_some_and(|(disabled, floor)| !disabled && iat >= floor))
    }

    pub fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT kid, public_x, private_sealed, created_at, activates_at FROM signing_keys ORDER BY activates_at, rowid",
        )?;
        let rows = st.query_map([], |r| {
            Ok(SigningKeyRow {
                kid: r.get(0)?,
                public_x: r.get(1)?,
                private_sealed: r.get(2)?,
                created_at: r.get(3)?,
                activates_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds a signing key; it is published (sync, JWKS) at once and signs from `activates_at`.
    pub fn add_signing_key(&self, row: &SigningKeyRow, who: &Audit) -> StoreResult<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO signing_keys (kid, public_x, private_sealed, created_at, activates_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![row.kid, row.public_x, row.private_sealed, row.created_at, row.activates_at],
        )?;
        let v = bump_version(&tx)?;
        let change = serde_json::json!({ "kid": row.kid, "activates_at": row.activates_at });
        append_audit(
            &tx,
            row.created_at,
            who,
            "signing_key.rotate",
            Some(&row.kid),
            change,
        )?;
        tx.commit()?;
        Ok(v)
    }

    /// Applies a sidecar's batch of key last-used times: a time only ever moves forward, and
    /// ids that are not API keys are ignored. Returns how many keys moved.
    pub fn record_usage(&self, marks: &[(String, i64)]) -> StoreResult<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut moved = 0;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE credentials SET last_used_at = ?1
                 WHERE id = ?2 AND kind = 'api_key' AND (last_used_at IS NULL OR last_used_at < ?1)",
            )?;
            for (key_id, at) in marks {
                moved += stmt.execute(params![at, key_id])?;
            }
        }
        tx.commit()?;
        Ok(moved)
    }

    /// Records a failed admin authentication (its own transaction: nothing else changed).
    /// `left_out`: failures not written since the last one that was (the per-minute budget).
    pub fn audit_failed_auth(
        &self,
        now: i64,
        who: &Audit,
        reason: &str,
        target: Option<&str>,
        left_out: u64,
    ) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        append_audit(
            &tx,
            now,
            who,
            "auth.failed",
            target,
            failed_auth_change(reason, left_out),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A page of the audit log in sequence order, and whether more follow.
    pub fn audit_page(&self, q: &AuditQuery) -> StoreResult<(Vec<crate::core::audit::AuditEntry>, bool)> {
        use crate::core::audit::{to_hex, AuditEntry};
        let conn = self.conn();
        let rows = conn
            .prepare_cached(
                "SELECT seq, at, actor, action, target, source_ip, change, prev_hash, hash FROM audit_log
                 WHERE seq > ?1 AND (?2 IS NULL OR actor = ?2) AND (?3 IS NULL OR action = ?3)
                   AND (?4 IS NULL OR target = ?4) AND (?5 IS NULL OR at >= ?5) AND (?6 IS NULL OR at <= ?6)
                 ORDER BY seq LIMIT ?7",
            )?
            .query_map(
                params![
                    q.after.min(i64::MAX as u64) as i64,
                    q.actor,
                    q.action,
                    q.target,
                    q.since,
                    q.until,
                    q.limit as i64 + 1
                ],
                audit_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        let more = rows.len() > q.limit as usize;
        let hash = |b: Vec<u8>| -> StoreResult<String> {
            let a: [u8; 32] = b
                .try_into()
                .map_err(|_| StoreError::Corrupt("audit hash is not 32 bytes".into()))?;
            Ok(to_hex(&a))
        };
        let mut out = Vec::with_capacity(rows.len().min(q.limit as usize));
        for r in rows.into_iter().take(q.limit as usize) {
            out.push(AuditEntry {
                seq: r.seq as u64,
                at: r.at,
                actor: r.actor,
                action: r.action,
                target: r.target,
                source_ip: r.source_ip,
                change: serde_json::from_str(&r.change)
                    .map_err(|e| StoreError::Corrupt(format!("audit change: {e}")))?,
                prev_hash: hash(r.prev)?,
                hash: hash(r.hash)?,
            });
        }
        Ok((out, more))
    }

    /// Adds `jti` to the deny list until `expires_at`. Returns the new version, or None if it
    /// was already there.
    /// `client_id` is the token's client, recorded as the audit entry's target.
    pub fn revoke_token(
        &self,
        jti: &str,
        client_id: &str,
        expires_at: i64,
        now: i64,
        who: &Audit,
    ) -> StoreResult<Option<u64>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM revoked_tokens WHERE expires_at <= ?1", [now])?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO revoked_tokens (jti, expires_at) VALUES (?1, ?2)",
            params![jti, expires_at],
        )?;
        if n == 0 {
            tx.commit()?;
            return Ok(None);
        }
        let v = bump_version(&tx)?;
        let change = serde_json::json!({ "jti": jti, "expires_at": expires_at });
        append_audit(&tx, now, who, "token.revoke", Some(client_id), change)?;
        tx.commit()?;
        Ok(Some(v))
    }

    pub fn token_revoked(&self, jti: &str) -> StoreResult<bool> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM revoked_tokens WHERE jti = ?1", [jti], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// What a sidecar at (`epoch`, `after`) needs: the services changed since, or everything;
    /// and always the whole published key set and deny list (both small).
    pub fn sync_payload(
        &self,
        epoch: Option<&str>,
        after: Option<u64>,
        now: i64,
    ) -> StoreResult<(SyncPayload, Vec<SigningKeyRow>)> {
        let mut conn = self.conn();
        // One read transaction, so the version and the rows agree.
        let tx = conn.transaction()?;
        let version = read_version(&tx)?;
        let since = match (epoch, after) {
            (Some(e), Some(a)) if e == self.epoch && a <= version => Some(a),
            _ => None,
        };
        let mut services = Vec::new();
        {
            let ids: Vec<String> = tx
                .prepare_cached("SELECT id FROM services WHERE version > ?1 ORDER BY rowid")?
                .query_map([since.unwrap_or(0) as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut kst = tx.prepare_cached(
                "SELECT id, hash, expires_at FROM credentials
                 WHERE service_id = ?1 AND kind = 'api_key' AND revoked_at IS NULL
                   AND (expires_at IS NULL OR expires_at > ?2)
                 ORDER BY rowid",
            )?;
            for id in ids {
                let rec = load_service(&tx, &id)?;
                let keys = kst
                    .query_map(params![rec.id, now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .map(|row| {
                        let (key_id, hash, expires_at) = row?;
                        super::sync_key(key_id, hash, expires_at)
                    })
                    .collect::<StoreResult<Vec<_>>>()?;
                services.push(super::sync_service(rec, keys));
            }
        }
        let signing: Vec<SigningKeyRow> = tx
            .prepare_cached("SELECT kid, public_x, x'', created_at, activates_at FROM signing_keys ORDER BY activates_at, rowid")?
            .query_map([], |r| {
                Ok(SigningKeyRow {
                    kid: r.get(0)?,
                    public_x: r.get(1)?,
                    private_sealed: vec![],
                    created_at: r.get(3)?,
                    activates_at: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let revoked_tokens = tx
            .prepare_cached("SELECT jti, expires_at FROM revoked_tokens WHERE expires_at > ?1 ORDER BY jti")?
            .query_map([now], |r| {
                Ok(SyncRevokedToken {
                    jti: r.get(0)?,
                    expires_at: r.get(1)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        tx.commit()?;
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
}

/// `Store` behind the storage traits: each call on tokio's blocking pool (SQLite is
/// synchronous), arguments copied in.
#[derive(Clone)]
pub struct Sqlite {
    store: Arc<Store>,
}

impl Sqlite {
    pub fn open(path: &Path) -> StoreResult<Sqlite> {
        Ok(Sqlite {
            store: Arc::new(Store::open(path)?),
        })
    }

    /// The synchronous store (bulk loading in benches and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> StoreResult<T> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Internal(e.to_string()))?
    }
}

#[async_trait]
impl ServiceStore for Sqlite {
    async fn create_service(
        &self,
        id: &str,
        s: &NewService,
        key: (&str, &StoredKey),
        secret: (&str, &StoredKey),
        now: i64,
        who: &Audit,
    ) -> StoreResult<(ServiceRecord, u64)> {
        let (id, s, who) = (id.to_string(), s.clone(), who.clone());
        let (kid, k) = (key.0.to_string(), key.1.clone());
        let (sid, sk) = (secret.0.to_string(), secret.1.clone());
        self.run(move |st| st.create_service(&id, &s, (&kid, &k), (&sid, &sk), now, &who))
            .await
    }

    async fn bulk_create(&self, services: &[BulkService], now: i64, who: &Audit) -> StoreResult<u64> {
        let (services, who) = (services.to_vec(), who.clone());
        self.run(move |st| st.bulk_create(&services, now, &who)).await
    }

    async fn get_service(&self, id: &str) -> StoreResult<ServiceRecord> {
        let id = id.to_string();
        self.run(move |st| st.get_service(&id)).await
    }

    async fn list_services(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> StoreResult<(Vec<ServiceRecord>, bool)> {
        let after = after.map(str::to_string);
        self.run(move |st| st.list_services(limit, after.as_deref()))
            .await
    }

    async fn patch_service(
        &self,
        id: &str,
        p: &ServicePatch,
        now: i64,
        who: &Audit,
        action: &str,
    ) -> StoreResult<(ServiceRecord, u64)> {
        let (id, p, who, action) = (id.to_string(), p.clone(), who.clone(), action.to_string());
        self.run(move |st| st.patch_service(&id, &p, now, &who, &action))
            .await
    }
}

#[async_trait]
impl CredentialStore for Sqlite {
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
        let (id, new_id, key, who) = (id.to_string(), new_id.to_string(), key.clone(), who.clone());
        self.run(move |st| st.rotate(&id, kind, &new_id, &key, grace_secs, max_active, now, &who))
            .await
    }

    async fn revoke_key(
        &self,
        id: &str,
        key_id: &str,
        now: i64,
        who: &Audit,
    ) -> StoreResult<(KeyRecord, u64)> {
        let (id, key_id, who) = (id.to_string(), key_id.to_string(), who.clone());
        self.run(move |st| st.revoke_key(&id, &key_id, now, &who)).await
    }

    async fn revoke_key_by_hash(
        &self,
        hash: &KeyHash,
        owner: Option<&str>,
        now: i64,
        who: &Audit,
    ) -> StoreResult<Option<u64>> {
        let (hash, owner, who) = (*hash, owner.map(str::to_string), who.clone());
        self.run(move |st| st.revoke_key_by_hash(&hash, owner.as_deref(), now, &who))
            .await
    }

    async fn key_owner(&self, hash: &KeyHash, now: i64) -> StoreResult<Option<KeyOwner>> {
        let hash = *hash;
        self.run(move |st| st.key_owner(&hash, now)).await
    }

    async fn key_info(&self, hash: &KeyHash, now: i64) -> StoreResult<Option<KeyInfo>> {
        let hash = *hash;
        self.run(move |st| st.key_info(&hash, now)).await
    }

    async fn authenticate_client(
        &self,
        client_id: &str,
        secret_hash: &KeyHash,
        now: i64,
    ) -> StoreResult<Option<ClientRecord>> {
        let (client_id, hash) = (client_id.to_string(), *secret_hash);
        self.run(move |st| st.authenticate_client(&client_id, &hash, now))
            .await
    }

    async fn record_usage(&self, marks: &[(String, i64)]) -> StoreResult<usize> {
        let marks = marks.to_vec();
        self.run(move |st| st.record_usage(&marks)).await
    }
}

#[async_trait]
impl TokenStore for Sqlite {
    async fn token_client_ok(&self, id: &str, iat: i64) -> StoreResult<bool> {
        let id = id.to_string();
        self.run(move |st| st.token_client_ok(&id, iat)).await
    }

    async fn revoke_token(
        &self,
        jti: &str,
        client_id: &str,
        expires_at: i64,
        now: i64,
        who: &Audit,
    ) -> StoreResult<Option<u64>> {
        let (jti, client_id, who) = (jti.to_string(), client_id.to_string(), who.clone());
        self.run(move |st| st.revoke_token(&jti, &client_id, expires_at, now, &who))
            .await
    }

    async fn token_revoked(&self, jti: &str) -> StoreResult<bool> {
        let jti = jti.to_string();
        self.run(move |st| st.token_revoked(&jti)).await
    }

    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>> {
        self.run(|st| st.signing_keys()).await
    }

    async fn add_signing_key(&self, row: &SigningKeyRow, who: &Audit) -> StoreResult<u64> {
        let (row, who) = (row.clone(), who.clone());
        self.run(move |st| st.add_signing_key(&row, &who)).await
    }
}

#[async_trait]
impl AuditStore for Sqlite {
    async fn audit_failed_auth(
        &self,
        now: i64,
        who: &Audit,
        reason: &str,
        target: Option<&str>,
        left_out: u64,
    ) -> StoreResult<()> {
        let (who, reason, target) = (who.clone(), reason.to_string(), target.map(str::to_string));
        self.run(move |st| st.audit_failed_auth(now, &who, &reason, target.as_deref(), left_out))
            .await
    }

    async fn audit_page(&self, q: &AuditQuery) -> StoreResult<(Vec<crate::core::audit::AuditEntry>, bool)> {
        let q = q.clone();
        self.run(move |st| st.audit_page(&q)).await
    }
}

#[async_trait]
impl SyncStore for Sqlite {
    fn epoch(&self) -> &str {
        self.store.epoch()
    }

    async fn version(&self) -> StoreResult<u64> {
        self.run(|st| st.version()).await
    }

    async fn sync_payload(
        &self,
        epoch: Option<&str>,
        after: Option<u64>,
        now: i64,
    ) -> StoreResult<(SyncPayload, Vec<SigningKeyRow>)> {
        let epoch = epoch.map(str::to_string);
        self.run(move |st| st.sync_payload(epoch.as_deref(), after, now))
            .await
    }

    async fn check_writable(&self) -> StoreResult<()> {
        self.run(|st| st.check_writable()).await
    }
}

impl Storage for Sqlite {
    fn backend(&self) -> &'static str {
        "sqlite"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../../schema.sql");

    /// A database created before `tokens_not_before` existed gets the column at start.
    #[test]
    fn an_older_database_gets_the_new_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old_schema: String = SCHEMA
            .lines()
            .filter(|l| !l.trim_start().starts_with("tokens_not_before"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_ne!(old_schema.len(), SCHEMA.len());
        Connection::open(&path)
            .unwrap()
            .execute_batch(&old_schema)
            .unwrap();
        let store = Store::open(&path).unwrap();
        let n: i64 = store
            .conn()
            .query_row(
                "SELECT count(*) FROM pragma_table_info('services') WHERE name = 'tokens_not_before'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
        drop(store);
        // Opening again is a no-op.
        Store::open(&path).unwrap();
    }
}
