//! `Store` behind the storage traits (`Sqlite`): every call runs on tokio's blocking pool with
//! its arguments copied in, since SQLite is synchronous.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use super::super::{
    Audit, AuditQuery, AuditStore, BulkService, ClientRecord, CredentialKind, CredentialStore, KeyInfo,
    KeyOwner, KeyRecord, NewService, Rotation, ServicePatch, ServiceRecord, ServiceStore, SigningKeyRow,
    Storage, StoreError, StoreResult, StoredKey, SyncStore, TokenClientNow, TokenStore,
};
use super::Store;
use crate::core::key::KeyHash;
use crate::core::sync::SyncPayload;

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

    pub(super) async fn run<T, F>(&self, f: F) -> StoreResult<T>
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
        search: Option<&str>,
    ) -> StoreResult<(Vec<ServiceRecord>, bool)> {
        let (after, search) = (after.map(str::to_string), search.map(str::to_string));
        self.run(move |st| st.list_services(limit, after.as_deref(), search.as_deref()))
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

    async fn set_expiry(
        &self,
        id: &str,
        kind: CredentialKind,
        key_id: &str,
        expires_at: Option<i64>,
        now: i64,
        who: &Audit,
    ) -> StoreResult<(KeyRecord, u64)> {
        let (id, key_id, who) = (id.to_string(), key_id.to_string(), who.clone());
        self.run(move |st| st.set_expiry(&id, kind, &key_id, expires_at, now, &who))
            .await
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
    async fn token_client(&self, id: &str, iat: i64) -> StoreResult<Option<TokenClientNow>> {
        let id = id.to_string();
        self.run(move |st| st.token_client(&id, iat)).await
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
