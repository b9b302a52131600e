//! `GET /auth/admin/audit`: the audit log, filtered and paginated by sequence number. Entries
//! are served exactly as hashed, so a client can verify the chain itself (`permiso audit verify`).

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::admin::auth::Admin;
use crate::admin::error::ApiError;
use crate::admin::openapi::ReadErrors;
use crate::admin::storage::AuditQuery;
use crate::admin::AppState;
use crate::core::audit::AuditEntry;

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// "admin-key", "service:<id>/<key_id>", "client:<id>", "unauthenticated" or "system".
    pub actor: Option<String>,
    /// e.g. service.create, key.rotate, key.revoke, auth.failed.
    pub action: Option<String>,
    /// A service id or signing key id.
    pub target: Option<String>,
    /// Unix seconds, inclusive.
    pub since: Option<i64>,
    /// Unix seconds, inclusive.
    pub until: Option<i64>,
    /// Sequence number to continue after (the previous page's `next_after`).
    pub after: Option<u64>,
    /// Entries per page, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<u64>,
}

/// The audit log, oldest first, served exactly as hashed so a client can verify the chain.
#[utoipa::path(
    get, path = "/auth/admin/audit", tag = "audit",
    params(AuditParams),
    responses((status = 200, body = AuditPage), ReadErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn list(
    State(st): State<AppState>,
    Admin(_caller): Admin,
    q: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(p) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    ApiError::int64("after", p.after)?;
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!("limit must be 1..={MAX_LIMIT}")));
    }
    if let (Some(s), Some(u)) = (p.since, p.until) {
        if s > u {
            return Err(ApiError::bad_request("since must not be after until"));
        }
    }
    let query = AuditQuery {
        actor: p.actor,
        action: p.action,
        target: p.target,
        since: p.since,
        until: p.until,
        after: p.after.unwrap_or(0),
        limit,
    };
    let (entries, more) = st.db(st.store.audit_page(&query)).await?;
    let next_after = if more { entries.last().map(|e| e.seq) } else { None };
    Ok(Json(AuditPage { entries, next_after }))
}
