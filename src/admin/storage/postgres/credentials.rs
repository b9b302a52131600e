//! API keys and client secrets on PostgreSQL: rotation, revocation, lookups, usage marks.

use async_trait::async_trait;

use super::super::{
    json_list, rotate_change, rotation_plan, Audit, ClientRecord, CredentialKind, CredentialStore, KeyInfo,
    KeyOwner, KeyRecord, Rotation, StoreError, StoreResult, StoredKey,
};
use super::rows::*;
use super::Postgres;
use crate::core::key::KeyHash;

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
        let grace_end = super::super::grace_end(now, grace_secs);
        let existing = match kind {
            CredentialKind::ApiKey => &cur.keys,
            CredentialKind::ClientSecret => &cur.secrets,
        };
        for (key_id, end) in &ended {
            let grace = existing
                .iter()
                .find(|k| &k.id == key_id)
                .map_or(grace_end, |k| super::super::rotated_grace(k, grace_end));
            tx.execute(
                "UPDATE credentials SET expires_at = $1, grace_ends_at = $3 WHERE id = $2",
                &[end, key_id, &grace],
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
        // Revoking a revoked key changes nothing: no new version, no second audit entry. The
        // version lock is held, so the one before ours is the current one; dropping the
        // transaction undoes the bump.
        if let Some(k) = load_keys(&tx, id, CredentialKind::ApiKey)
            .await?
            .into_iter()
            .find(|k| k.id == key_id && k.revoked_at.is_some())
        {
            return Ok((k, v - 1));
        }
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

    async fn set_expiry(
        &self,
        id: &str,
        kind: CredentialKind,
        key_id: &str,
        own: Option<i64>,
        now: i64,
        who: &Audit,
    ) -> StoreResult<(KeyRecord, u64)> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        // The version row's lock (taken here) orders every write: two changes of one
        // credential apply one after the other without a lock of their own.
        let v = bump_version(&tx).await?;
        let find = |keys: Vec<KeyRecord>| {
            keys.into_iter()
                .find(|k| k.id == key_id)
                .ok_or(StoreError::NotFound)
        };
        let cur = find(load_keys(&tx, id, kind).await?)?;
        let end = super::super::expiry_plan(&cur, own, now)?;
        tx.execute(
            "UPDATE credentials SET key_expires_at = $1, expires_at = $2 WHERE id = $3",
            &[&own, &end, &key_id],
        )
        .await?;
        touch_service(&tx, id, v, now).await?;
        let key = find(load_keys(&tx, id, kind).await?)?;
        let (action, change) = super::super::expiry_change(kind, key_id, own, end);
        append_audit(&tx, now, who, action, Some(id), change).await?;
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
            .query_one(
                "SELECT scopes, is_trusted FROM services WHERE id = $1",
                &[&service_id],
            )
            .await?;
        Ok(Some(KeyInfo {
            service_id,
            scopes: json_list(s.get(0))?,
            is_trusted: s.get(1),
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
            is_trusted: rec.is_trusted,
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
