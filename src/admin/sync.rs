//! `GET /v1/sync`: what sidecars pull. Answers at once when something changed since `after`,
//! otherwise holds the request until a change or `wait` seconds, so changes reach sidecars in
//! milliseconds without polling load.
//!
//! When a change lands, every parked sidecar wakes and asks for the same delta; the first one
//! builds it (one database read, one serialisation) and the rest get the same bytes. Full
//! snapshots are shared the same way: built once per version and second, whoever asks, so a
//! loop of full syncs costs bytes on the wire, not a database read and a serialisation each.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::admin::auth::SyncReader;
use crate::admin::error::ApiError;
use crate::admin::model::SyncParams;
use crate::admin::AppState;

/// Sync requests open per credential (long polls included), bounded so one leaked or
/// misused sync key cannot hold the admin plane's connections and memory.
pub struct SyncSlots {
    max: usize,
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

pub struct SyncSlot<'a> {
    slots: &'a SyncSlots,
    credential: String,
}

impl SyncSlots {
    pub fn new(max: usize) -> SyncSlots {
        SyncSlots {
            max,
            open: Default::default(),
        }
    }

    fn acquire(&self, credential: String) -> Option<SyncSlot<'_>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(credential.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SyncSlot {
            slots: self,
            credential,
        })
    }
}

impl Drop for SyncSlot<'_> {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.credential) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.credential);
            }
        }
    }
}

/// The last delta served: valid for the same `after`, the same current version, and the same
/// second (payloads drop keys and revoked tokens whose time has passed).
#[derive(Default)]
pub struct DeltaCache {
    last: tokio::sync::Mutex<Option<(u64, u64, i64, Bytes)>>,
    /// The last full snapshot: (version, second, bytes).
    full: tokio::sync::Mutex<Option<(u64, i64, Bytes)>>,
}

async fn build(
    st: &AppState,
    epoch: Option<String>,
    after: Option<u64>,
    now: i64,
) -> Result<(u64, Bytes), ApiError> {
    let max_lifetime = i64::from(crate::admin::model::MAX_TOKEN_LIFETIME);
    let (mut payload, signing) = st.db(st.store.sync_payload(epoch.as_deref(), after, now)).await?;
    payload.signing_keys = crate::admin::signing::published(&signing, now, max_lifetime);
    payload.issuer = st.issuer.clone();
    payload.generated_at_ms = Some(crate::core::clock::unix_millis());
    let body = serde_json::to_vec(&payload).map_err(ApiError::internal)?;
    Ok((payload.version, Bytes::from(body)))
}

/// What a sidecar pulls: a full snapshot, or the changes since `after`, waiting up to `wait`
/// seconds for one (long poll).
#[utoipa::path(
    get, path = "/v1/sync", tag = "sync",
    params(
        SyncParams,
        ("permiso-sidecar" = Option<String>, Header, description = "The sidecar's report (compact JSON of its instance id, build, upstream and routes)"),
    ),
    responses((status = 200, body = crate::core::sync::SyncPayload), crate::admin::openapi::ReadErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn sync(
    State(st): State<AppState>,
    SyncReader(actor): SyncReader,
    headers: axum::http::HeaderMap,
    q: Result<Query<SyncParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    ApiError::int64("after", q.after)?;
    ApiError::int64("wait", q.wait)?;
    let report = crate::admin::fleet::report_of(&headers)?;
    let credential = match &actor.actor {
        crate::admin::auth::Actor::AdminKey => "admin-key".to_string(),
        crate::admin::auth::Actor::Service { key_id, .. } => key_id.clone(),
    };
    let Some(_slot) = st.sync_slots.acquire(credential) else {
        tracing::warn!(%actor, "too many concurrent syncs for one credential");
        return Err(ApiError::rate_limited(1));
    };
    // Marks the sidecar polling (live) until this request ends; it holds `after`.
    let _polling = match &report {
        Some(r) => Some(crate::admin::fleet::seen(
            &st,
            r,
            &actor.actor,
            q.epoch.as_deref(),
            q.after,
        )),
        None => None,
    };
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(st.cfg.sync_max_wait);
    let same_epoch = q.epoch.as_deref() == Some(st.store.epoch());
    let mut current = None;
    if let (Some(after), true) = (q.after, same_epoch) {
        let mut versions = st.versions.subscribe();
        let mut shutdown = st.shutdown.clone();
        if *versions.borrow_and_update() <= after && !wait.is_zero() {
            let _parked = st.metrics.long_poll();
            tokio::select! {
                _ = tokio::time::timeout(wait, versions.wait_for(|v| *v > after)) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        }
        current = Some(*versions.borrow());
    }
    let now = st.clock.now_secs();
    let body = match (q.after, current) {
        // A delta within this database: share it with every sidecar asking the same.
        (Some(after), Some(version)) if after <= version => {
            let mut cache = st.delta_cache.last.lock().await;
            match cache.as_ref() {
                Some((a, v, t, body)) if *a == after && *v == version && *t == now => body.clone(),
                _ => {
                    let (built_version, body) = build(&st, q.epoch.clone(), Some(after), now).await?;
                    // Cache only what matches the version the long poll saw.
                    if built_version == version {
                        *cache = Some((after, version, now, body.clone()));
                    }
                    body
                }
            }
        }
        // Everything else is a full snapshot (no `after`, another epoch, `after` ahead).
        _ => {
            let version = *st.versions.borrow();
            let mut cache = st.delta_cache.full.lock().await;
            match cache.as_ref() {
                Some((v, t, body)) if *v == version && *t == now => body.clone(),
                _ => {
                    let (built_version, body) = build(&st, None, None, now).await?;
                    if built_version == version {
                        *cache = Some((version, now, body.clone()));
                    }
                    st.metrics.full_sync_built();
                    body
                }
            }
        }
    };
    if let Some(r) = &report {
        // Seen again at the end of a long poll, for replicas that only read the store.
        crate::admin::fleet::record(&st, r, &actor.actor, q.epoch.as_deref(), q.after);
    }
    tracing::debug!(%actor, bytes = body.len(), "sync served");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
