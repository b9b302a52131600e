//! SQLite's side of the fleet and key-lifecycle views (`LifecycleStore`).

use async_trait::async_trait;
use rusqlite::params;

use super::super::{credential_kind, GraceKey, LifecycleStore, SidecarRecord, StoreResult};
use super::traits::Sqlite;
use super::Store;

impl Store {
    fn record_sidecars(&self, all: &[SidecarRecord]) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
            "INSERT INTO sidecars (instance_id, credential, service_id, epoch, applied_version, first_seen, last_seen, report)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (instance_id) DO UPDATE SET
                credential = excluded.credential, service_id = excluded.service_id,
                epoch = excluded.epoch, applied_version = excluded.applied_version,
                last_seen = excluded.last_seen, report = excluded.report
             WHERE excluded.last_seen >= sidecars.last_seen
               AND excluded.service_id IS sidecars.service_id",
            )?;
            for s in all {
                st.execute(params![
                    s.instance_id,
                    s.credential,
                    s.service_id,
                    s.epoch,
                    s.applied_version.map(|v| v as i64),
                    s.first_seen,
                    s.last_seen,
                    s.report
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn sidecars(&self, since: i64) -> StoreResult<Vec<SidecarRecord>> {
        let conn = self.conn();
        conn.execute("DELETE FROM sidecars WHERE last_seen < ?1", [since])?;
        let mut st = conn.prepare_cached(
            "SELECT instance_id, credential, service_id, epoch, applied_version, first_seen, last_seen, report
             FROM sidecars ORDER BY first_seen, instance_id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(SidecarRecord {
                instance_id: r.get(0)?,
                credential: r.get(1)?,
                service_id: r.get(2)?,
                epoch: r.get(3)?,
                applied_version: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                first_seen: r.get(5)?,
                last_seen: r.get(6)?,
                report: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn grace_keys(&self, now: i64, used_since: Option<i64>) -> StoreResult<Vec<GraceKey>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT c.service_id, s.name, c.id, c.kind, c.display_prefix, c.grace_ends_at, c.expires_at, c.last_used_at
             FROM credentials c JOIN services s ON s.id = c.service_id
             WHERE c.grace_ends_at IS NOT NULL AND c.revoked_at IS NULL AND c.expires_at > ?1
               AND (?2 IS NULL OR c.last_used_at >= ?2)
             ORDER BY c.expires_at, c.id",
        )?;
        let rows = st.query_map(params![now, used_since], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })?;
        rows.map(|row| {
            let (
                service_id,
                service_name,
                key_id,
                kind,
                display_prefix,
                grace_ends_at,
                expires_at,
                last_used_at,
            ) = row?;
            Ok(GraceKey {
                service_id,
                service_name,
                key_id,
                kind: credential_kind(&kind)?,
                display_prefix,
                grace_ends_at,
                expires_at,
                last_used_at,
            })
        })
        .collect()
    }
}

#[async_trait]
impl LifecycleStore for Sqlite {
    async fn record_sidecars(&self, s: &[SidecarRecord]) -> StoreResult<()> {
        let s = s.to_vec();
        self.run(move |st| st.record_sidecars(&s)).await
    }

    async fn sidecars(&self, since: i64) -> StoreResult<Vec<SidecarRecord>> {
        self.run(move |st| st.sidecars(since)).await
    }

    async fn grace_keys(&self, now: i64, used_since: Option<i64>) -> StoreResult<Vec<GraceKey>> {
        self.run(move |st| st.grace_keys(now, used_since)).await
    }
}
