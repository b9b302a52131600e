//! The PostgreSQL store's row-level pieces: reading services and keys, the writers' lock and
//! version bump, the audit append, inserts.

use tokio_postgres::{GenericClient, Row, Transaction};

use super::super::{
    hash32, json_list, to_json, Audit, CredentialKind, KeyRecord, NewService, ServiceRecord, SigningKeyRow,
    StoreError, StoreResult, StoredKey,
};
use super::{is_unique_violation, CHANNEL};
use crate::core::key::{Environment, KeyHash};
use crate::core::ratelimit::LimitScope;

pub(super) const SERVICE_COLS: &str =
    "id, name, environment, description, contact_email, is_trusted, scopes, \
     rate_limit_per_minute, rate_limit_per_hour, allowed_ips, disabled, created_at, updated_at, \
     access_token_lifetime, tokens_not_before, rate_limit_scope";

/// kid, public_x, (private_sealed), created_at, activates_at.
pub(super) fn signing_row(r: &Row, private_sealed: Vec<u8>) -> SigningKeyRow {
    SigningKeyRow {
        kid: r.get(0),
        public_x: r.get(1),
        private_sealed,
        created_at: r.get(3),
        activates_at: r.get(4),
    }
}

pub(super) fn u32_of(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

pub(super) fn service_of(r: &Row) -> StoreResult<ServiceRecord> {
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
        rate_limit_scope: {
            let s: String = r.get(15);
            LimitScope::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("rate_limit_scope {s:?}")))?
        },
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

pub(super) async fn load_keys<C: GenericClient>(
    c: &C,
    service_id: &str,
    kind: CredentialKind,
) -> StoreResult<Vec<KeyRecord>> {
    let rows = c
        .query(
            "SELECT id, display_prefix, created_at, expires_at, revoked_at, last_used_at, grace_ends_at, key_expires_at
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
            grace_ends_at: r.get(6),
            own_expires_at: r.get(7),
        })
        .collect())
}

pub(super) async fn load_service<C: GenericClient>(c: &C, id: &str) -> StoreResult<ServiceRecord> {
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
pub(super) async fn lock_writes(tx: &Transaction<'_>) -> StoreResult<()> {
    tx.execute("SELECT value FROM meta WHERE name = 'version' FOR UPDATE", &[])
        .await?;
    Ok(())
}

/// Bumps the version (taking or keeping the writers' lock) and announces it at commit.
pub(super) async fn bump_version(tx: &Transaction<'_>) -> StoreResult<u64> {
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

pub(super) async fn touch_service(tx: &Transaction<'_>, id: &str, v: u64, now: i64) -> StoreResult<()> {
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
pub(super) async fn append_audit(
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

pub(super) async fn insert_service(
    tx: &Transaction<'_>,
    id: &str,
    s: &NewService,
    now: i64,
    v: u64,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        &format!(
            "INSERT INTO services ({SERVICE_COLS}, version) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,false,$11,$11,$12,0,$14,$13)"
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
            &s.rate_limit_scope.name(),
        ],
    )
    .await
}

pub(super) async fn insert_credential(
    tx: &Transaction<'_>,
    service_id: &str,
    kind: CredentialKind,
    id: &str,
    key: &StoredKey,
    now: i64,
) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO credentials (id, service_id, kind, hash, display_prefix, created_at, expires_at, key_expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        &[&id, &service_id, &kind.as_str(), &&key.hash.0[..], &key.display_prefix, &now, &key.expires_at],
    )
    .await?;
    Ok(())
}

pub(super) async fn set_identities(
    tx: &Transaction<'_>,
    service_id: &str,
    identities: &[String],
) -> StoreResult<()> {
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

pub(super) async fn owner_of<C: GenericClient>(
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
