//! The SQLite backend (schema.sql, the embedded default): one process, one connection behind a
//! mutex, WAL. `Store` is the synchronous core; `Sqlite` runs it on tokio's blocking pool
//! behind the storage traits. SQLite serializes writers itself, so the version bump and the
//! audit append need no extra lock.

mod lifecycle;
mod rows;
mod traits;
use rows::*;
pub use traits::Sqlite;

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    create_change, failed_auth_change, json_list, patched, rotate_change, rotation_plan, to_json, Audit,
    AuditQuery, BulkService, ClientRecord, CredentialKind, KeyInfo, KeyOwner, KeyRecord, NewService,
    Rotation, ServicePatch, ServiceRecord, SigningKeyRow, StoreError, StoreResult, StoredKey, TokenClientNow,
};
use crate::core::key::KeyHash;
use crate::core::sync::{SyncPayload, SyncRevokedToken};

pub struct Store {
    conn: Mutex<Connection>,
    epoch: String,
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
    pub fn list_services(
        &self,
        limit: u32,
        after: Option<&str>,
        search: Option<&str>,
    ) -> StoreResult<(Vec<ServiceRecord>, bool)> {
        let conn = self.conn();
        let after_rowid: i64 = match after {
            None => 0,
            Some(id) => conn
                .query_row("SELECT rowid FROM services WHERE id = ?1", [id], |r| r.get(0))
                .optional()?
                .ok_or(StoreError::NotFound)?,
        };
        let ids: Vec<String> = conn
            .prepare_cached(
                "SELECT id FROM services WHERE rowid > ?1 \
                 AND (?3 IS NULL OR id = ?3 OR instr(lower(name), lower(?3)) > 0) \
                 ORDER BY rowid LIMIT ?2",
            )?
            .query_map(params![after_rowid, limit as i64 + 1, search], |r| r.get(0))?
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
                 access_token_lifetime = ?9, rate_limit_scope = ?11
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
                id,
                n.rate_limit_scope.name()
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
        let end = super::grace_end(now, grace_secs);
        let existing = match kind {
            CredentialKind::ApiKey => &cur.keys,
            CredentialKind::ClientSecret => &cur.secrets,
        };
        for (key_id, new_end) in &ended {
            let grace = existing
                .iter()
                .find(|k| &k.id == key_id)
                .map_or(end, |k| super::rotated_grace(k, end));
            tx.execute(
                "UPDATE credentials SET expires_at = ?1, grace_ends_at = ?3 WHERE id = ?2",
                params![new_end, key_id, grace],
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
        // Revoking a revoked key changes nothing: no new version, no second audit entry.
        if let Some(k) = load_keys(&tx, id, CredentialKind::ApiKey)?
            .into_iter()
            .find(|k| k.id == key_id && k.revoked_at.is_some())
        {
            return Ok((k, read_version(&tx)?));
        }
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

    pub fn set_expiry(
        &self,
        id: &str,
        kind: CredentialKind,
        key_id: &str,
        own: Option<i64>,
        now: i64,
        who: &Audit,
    ) -> StoreResult<(KeyRecord, u64)> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let cur = load_keys(&tx, id, kind)?
            .into_iter()
            .find(|k| k.id == key_id)
            .ok_or(StoreError::NotFound)?;
        let end = super::expiry_plan(&cur, own, now)?;
        tx.execute(
            "UPDATE credentials SET key_expires_at = ?1, expires_at = ?2 WHERE id = ?3",
            params![own, end, key_id],
        )?;
        let v = touch_service(&tx, id, now)?;
        let key = load_keys(&tx, id, kind)?
            .into_iter()
            .find(|k| k.id == key_id)
            .ok_or(StoreError::NotFound)?;
        let (action, change) = super::expiry_change(kind, key_id, own, end);
        append_audit(&tx, now, who, action, Some(id), change)?;
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
        let (scopes, is_trusted): (String, bool) = conn.query_row(
            "SELECT scopes, is_trusted FROM services WHERE id = ?1",
            [&service_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Some(KeyInfo {
            service_id,
            scopes: json_list(&scopes)?,
            is_trusted,
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
            is_trusted: rec.is_trusted,
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
    pub fn token_client(&self, id: &str, iat: i64) -> StoreResult<Option<TokenClientNow>> {
        let row = self
            .conn()
            .query_row(
                "SELECT disabled, tokens_not_before, scopes, is_trusted FROM services WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, bool>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, bool>(3)?,
                    ))
                },
            )
            .optional()?;
        match row {
            Some((false, floor, scopes, is_trusted)) if iat >= floor => Ok(Some(TokenClientNow {
                scopes: json_list(&scopes)?,
                is_trusted,
            })),
            _ => Ok(None),
        }
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
        super::audit_page_of(rows, q.limit)
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
        let since = super::delta_since(&self.epoch, version, epoch, after);
        let mut services = Vec::new();
        {
            let ids: Vec<String> = tx
                .prepare_cached("SELECT id FROM services WHERE version > ?1 ORDER BY rowid")?
                .query_map([since.unwrap_or(0) as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut kst = tx.prepare_cached(
                "SELECT id, hash, expires_at, grace_ends_at FROM credentials
                 WHERE service_id = ?1 AND kind = 'api_key' AND revoked_at IS NULL
                   AND (expires_at IS NULL OR expires_at > ?2)
                 ORDER BY rowid",
            )?;
            for id in ids {
                let rec = load_service(&tx, &id)?;
                let keys = kst
                    .query_map(params![rec.id, now], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .map(|row| {
                        let (key_id, hash, expires_at, grace) = row?;
                        super::sync_key(key_id, hash, expires_at, grace)
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
        Ok((
            super::sync_payload(&self.epoch, version, since, services, revoked_tokens),
            signing,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../../../schema.sql");

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
