//! `POST /v1/usage`: sidecars report, in batches, when API keys were last used, so admins see
//! whether a rotated-out key is still in use before its grace window ends.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::auth::SyncReader;
use crate::admin::error::ApiError;
use crate::admin::extract::JsonBody;
use crate::admin::AppState;
use crate::core::ids::{self, KEY_ID_PREFIX};

/// More than a sidecar sends at once (it sends 500).
const MAX_MARKS: usize = 1000;
/// How far ahead of ours a sidecar's clock may be; later marks are refused whole.
pub const MAX_CLOCK_SKEW_SECS: i64 = 60;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    pub keys: Vec<UsageMark>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageMark {
    pub key_id: String,
    /// Unix seconds.
    pub last_used_at: i64,
}

/// A sidecar's report of when keys were last used (moves `last_used_at` forward only).
#[utoipa::path(
    post, path = "/v1/usage", tag = "sync",
    request_body = UsageReport,
    responses((status = 200, body = crate::admin::openapi::UsageRecorded), crate::admin::openapi::WriteErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn report(
    State(st): State<AppState>,
    SyncReader(caller): SyncReader,
    JsonBody(body): JsonBody<UsageReport>,
) -> Result<Json<Value>, ApiError> {
    let body = body.ok_or_else(|| ApiError::bad_request("a JSON body is required"))?;
    if body.keys.len() > MAX_MARKS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_MARKS} keys per report"
        )));
    }
    let now = st.clock.now_secs();
    let mut marks = Vec::with_capacity(body.keys.len());
    for m in body.keys {
        if !ids::looks_like_id(&m.key_id, KEY_ID_PREFIX) || m.last_used_at <= 0 {
            return Err(ApiError::bad_request(
                "each entry needs a key id and a positive last_used_at",
            ));
        }
        // A time well in the future is a lie or a broken clock: refuse the report (nothing is
        // written). Within the skew, a clock slightly ahead of ours is clamped to now.
        if m.last_used_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(ApiError::bad_request(format!(
                "last_used_at {} is more than {MAX_CLOCK_SKEW_SECS} s in the future",
                m.last_used_at
            )));
        }
        marks.push((m.key_id, m.last_used_at.min(now)));
    }
    let received = marks.len();
    let moved = st.db(st.store.record_usage(&marks)).await?;
    st.metrics.usage_marks(received);
    tracing::debug!(%caller, received, moved, "key usage recorded");
    Ok(Json(json!({ "received": received, "updated": moved })))
}
