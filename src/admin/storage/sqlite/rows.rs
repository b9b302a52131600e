//! The SQLite store's row-level pieces: reading services and keys, the version bump, the
//! audit append, inserts, and the column added after databases existed.

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::super::{
    json_list, to_json, Audit, CredentialKind, KeyRecord, NewService, ServiceRecord, StoreError, StoreResult,
    StoredKey,
};
use crate::core::key::{Environment, KeyHash};
use crate::core::ratelimit::LimitScope;

/// Appends one entry, chained to the last, inside the caller's transaction: the change and
/// its audit entry commit together or not at all.
pub(super) fn append_audit(
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

pub(super) fn audit_row(r: &Row<'_>) -> rusqlite::Result<super::super::AuditRow> {
    Ok(super::super::AuditRow {
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

pub(super) const SERVICE_COLS: &str =
    "id, name, environment, description, contact_email, is_trusted, scopes, \
     rate_limit_per_minute, rate_limit_per_hour, allowed_ips, disabled, created_at, updated_at, \
     access_token_lifetime, tokens_not_before, rate_limit_scope";

pub(super) struct RawService {
    rec: ServiceRecord,
    scopes_json: String,
    ips_json: String,
    env: String,
    scope: String,
}

pub(super) fn raw_service(r: &Row<'_>) -> rusqlite::Result<RawService> {
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
            rate_limit_scope: LimitScope::Sidecar,
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
        scope: r.get(15)?,
    })
}

pub(super) fn finish(raw: RawService) -> StoreResult<ServiceRecord> {
    let mut rec = raw.rec;
    rec.environment = Environment::parse(&raw.env)
        .ok_or_else(|| StoreError::Corrupt(format!("environment {:?}", raw.env)))?;
    rec.rate_limit_scope = LimitScope::parse(&raw.scope)
        .ok_or_else(|| StoreError::Corrupt(format!("rate_limit_scope {:?}", raw.scope)))?;
    rec.scopes = json_list(&raw.scopes_json)?;
    rec.allowed_ips = json_list(&raw.ips_json)?;
    Ok(rec)
}

pub(super) fn load_keys(
    conn: &Connection,
    service_id: &str,
    kind: CredentialKind,
) -> StoreResult<Vec<KeyRecord>> {
    let mut st = conn.prepare_cached(
        "SELECT id, display_prefix, created_at, expires_at, revoked_at, last_used_at, grace_ends_at, key_expires_at
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
            grace_ends_at: r.get(6)?,
            own_expires_at: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn load_service(conn: &Connection, id: &str) -> StoreResult<ServiceRecord> {
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

pub(super) fn load_identities(conn: &Connection, service_id: &str) -> StoreResult<Vec<String>> {
    let mut st =
        conn.prepare_cached("SELECT identity FROM tls_identities WHERE service_id = ?1 ORDER BY rowid")?;
    let rows = st.query_map([service_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
}

/// Replaces a service's identities; one held by another service is a conflict.
pub(super) fn set_identities(
    tx: &Transaction<'_>,
    service_id: &str,
    identities: &[String],
) -> StoreResult<()> {
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

pub(super) fn bump_version(tx: &Transaction<'_>) -> StoreResult<u64> {
    let v: i64 = tx.query_row(
        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = 'version' RETURNING CAST(value AS INTEGER)",
        [],
        |r| r.get(0),
    )?;
    Ok(v as u64)
}

pub(super) fn touch_service(tx: &Transaction<'_>, id: &str, now: i64) -> StoreResult<u64> {
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
pub(super) fn insert_service(
    tx: &Transaction<'_>,
    id: &str,
    s: &NewService,
    now: i64,
    version: u64,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(&format!(
        "INSERT INTO services ({SERVICE_COLS}, version) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,0,?11,?11,?12,0,?14,?13)"
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
        version as i64,
        s.rate_limit_scope.name()
    ])
}

pub(super) fn insert_credential(
    tx: &Transaction<'_>,
    service_id: &str,
    kind: CredentialKind,
    id: &str,
    key: &StoredKey,
    now: i64,
) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO credentials (id, service_id, kind, hash, display_prefix, created_at, expires_at, key_expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
        params![
            id,
            service_id,
            kind.as_str(),
            &key.hash.0[..],
            key.display_prefix,
            now,
            key.expires_at
        ],
    )?;
    Ok(())
}

pub(super) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

pub(super) fn read_version(conn: &Connection) -> StoreResult<u64> {
    let v: i64 = conn.query_row(
        "SELECT CAST(value AS INTEGER) FROM meta WHERE name = 'version'",
        [],
        |r| r.get(0),
    )?;
    Ok(v as u64)
}

pub(super) fn owner_of(
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
pub(super) fn add_missing_columns(conn: &Connection) -> StoreResult<()> {
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
