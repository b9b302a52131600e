//! PostgreSQL's side of the fleet and key-lifecycle views (`LifecycleStore`).

use async_trait::async_trait;

use super::super::{credential_kind, GraceKey, LifecycleStore, SidecarRecord, StoreResult};
use super::Postgres;

#[async_trait]
impl LifecycleStore for Postgres {
    async fn record_sidecars(&self, all: &[SidecarRecord]) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = (**c).transaction().await?;
        let st = tx
            .prepare(
            "INSERT INTO sidecars (instance_id, credential, service_id, epoch, applied_version, first_seen, last_seen, report)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (instance_id) DO UPDATE SET
                credential = EXCLUDED.credential, service_id = EXCLUDED.service_id,
                epoch = EXCLUDED.epoch, applied_version = EXCLUDED.applied_version,
                last_seen = EXCLUDED.last_seen, report = EXCLUDED.report
             WHERE EXCLUDED.last_seen >= sidecars.last_seen
               AND EXCLUDED.service_id IS NOT DISTINCT FROM sidecars.service_id",
            )
            .await?;
        for s in all {
            tx.execute(
                &st,
                &[
                    &s.instance_id,
                    &s.credential,
                    &s.service_id,
                    &s.epoch,
                    &s.applied_version.map(|v| v as i64),
                    &s.first_seen,
                    &s.last_seen,
                    &s.report,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn sidecars(&self, since: i64) -> StoreResult<Vec<SidecarRecord>> {
        let c = self.client().await?;
        c.execute("DELETE FROM sidecars WHERE last_seen < $1", &[&since])
            .await?;
        let rows = c
            .query(
                "SELECT instance_id, credential, service_id, epoch, applied_version, first_seen, last_seen, report
                 FROM sidecars ORDER BY first_seen, instance_id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| SidecarRecord {
                instance_id: r.get(0),
                credential: r.get(1),
                service_id: r.get(2),
                epoch: r.get(3),
                applied_version: r.get::<_, Option<i64>>(4).map(|v| v as u64),
                first_seen: r.get(5),
                last_seen: r.get(6),
                report: r.get(7),
            })
            .collect())
    }

    async fn grace_keys(&self, now: i64, used_since: Option<i64>) -> StoreResult<Vec<GraceKey>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT c.service_id, s.name, c.id, c.kind, c.display_prefix, c.grace_ends_at, c.expires_at, c.last_used_at
                 FROM credentials c JOIN services s ON s.id = c.service_id
                 WHERE c.grace_ends_at IS NOT NULL AND c.revoked_at IS NULL AND c.expires_at > $1
                   AND ($2::BIGINT IS NULL OR c.last_used_at >= $2)
                 ORDER BY c.expires_at, c.id",
                &[&now, &used_since],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(GraceKey {
                    service_id: r.get(0),
                    service_name: r.get(1),
                    key_id: r.get(2),
                    kind: credential_kind(r.get(3))?,
                    display_prefix: r.get(4),
                    grace_ends_at: r.get(5),
                    expires_at: r.get(6),
                    last_used_at: r.get(7),
                })
            })
            .collect()
    }
}
