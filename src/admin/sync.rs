//! `GET /v1/sync`: what sidecars pull. Answers at once when something changed since `after`,
//! otherwise holds the request until a change or `wait` seconds, so changes reach sidecars in
//! milliseconds without polling load.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::Json;

use crate::admin::auth::SyncReader;
use crate::admin::error::ApiError;
use crate::admin::model::SyncParams;
use crate::admin::AppState;
use crate::core::sync::SyncPayload;

pub async fn sync(
    State(st): State<AppState>,
    SyncReader(actor): SyncReader,
    q: Result<Query<SyncParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SyncPayload>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(st.cfg.sync_max_wait);
    let same_epoch = q.epoch.as_deref() == Some(st.store.epoch());
    if let (Some(after), true) = (q.after, same_epoch) {
        let mut versions = st.versions.subscribe();
        let mut shutdown = st.shutdown.clone();
        if *versions.borrow_and_update() <= after && !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::timeout(wait, versions.wait_for(|v| *v > after)) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        }
    }
    let now = st.clock.now_secs();
    let (epoch, after) = (q.epoch, q.after);
    let max_lifetime = i64::from(crate::admin::model::MAX_TOKEN_LIFETIME);
    let mut payload = st
        .db(move |s| {
            s.sync_payload(epoch.as_deref(), after, now, &|rows, now| {
                crate::admin::signing::published(rows, now, max_lifetime)
            })
        })
        .await?;
    payload.issuer = st.issuer.clone();
    tracing::debug!(%actor, version = payload.version, full = payload.full, services = payload.services.len(), "sync served");
    Ok(Json(payload))
}
