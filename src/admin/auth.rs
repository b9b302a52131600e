//! Who may call the admin plane: the admin key (`X-Admin-Api-Key`, compared in constant time
//! through its blake3 hash) or a service key whose service holds the scope the endpoint needs.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use crate::admin::error::ApiError;
use crate::admin::AppState;
use crate::core::decision::{bearer_token, Authorization};
use crate::core::key;
use crate::core::scope::ScopeSet;

pub const ADMIN_KEY_HEADER: &str = "x-admin-api-key";

/// Who performed an action, for logs (and the audit log later). Never a secret.
#[derive(Debug, Clone)]
pub enum Actor {
    AdminKey,
    Service { service_id: String, key_id: String },
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::AdminKey => f.write_str("admin-key"),
            Actor::Service { service_id, key_id } => write!(f, "{service_id}/{key_id}"),
        }
    }
}

/// The admin key, or a service key (Bearer) whose service holds `needed_scope`.
pub async fn authenticate(
    headers: &HeaderMap,
    state: &AppState,
    needed_scope: &str,
) -> Result<Actor, ApiError> {
    let admin_headers: Vec<_> = headers.get_all(ADMIN_KEY_HEADER).iter().collect();
    if !admin_headers.is_empty() {
        let presented = match admin_headers.as_slice() {
            [one] => one.as_bytes(),
            _ => return Err(deny("several X-Admin-Api-Key headers")),
        };
        // blake3::Hash equality is constant-time, and hashing first hides the length too.
        if blake3::hash(presented) == state.admin_key_hash {
            return Ok(Actor::AdminKey);
        }
        return Err(deny("wrong admin key"));
    }
    let auth: Vec<_> = headers.get_all(header::AUTHORIZATION).iter().collect();
    let auth = match auth.as_slice() {
        [] => Authorization::Absent,
        [one] => Authorization::One(one.as_bytes()),
        _ => Authorization::Several,
    };
    let token = match bearer_token(auth) {
        Ok(Some(t)) => t,
        Ok(None) => return Err(deny("no credential")),
        Err(_) => return Err(deny("malformed Authorization header")),
    };
    let parsed = key::parse(token).map_err(|e| deny(&format!("service key rejected: {e}")))?;
    let hash = parsed.hash();
    let now = state.clock.now_secs();
    let owner = state
        .db(move |s| s.key_owner(&hash, now))
        .await?
        .ok_or_else(|| deny("unknown, revoked or expired service key"))?;
    let scopes = ScopeSet::parse(&owner.scopes).map_err(ApiError::internal)?;
    if !scopes.allows(needed_scope) {
        tracing::warn!(service_id = %owner.service_id, key_id = %owner.key_id, needed_scope, "admin plane: scope missing");
        return Err(ApiError::forbidden(format!(
            "this endpoint requires the {needed_scope} scope"
        )));
    }
    Ok(Actor::Service {
        service_id: owner.service_id,
        key_id: owner.key_id,
    })
}

fn deny(reason: &str) -> ApiError {
    tracing::warn!(reason, "admin plane: authentication failed");
    ApiError::unauthorized("missing or invalid admin credential")
}

/// An admin: the admin key, or a service key holding `admin:*`.
pub struct Admin(pub Actor);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authenticate(&parts.headers, state, "admin:*").await.map(Admin)
    }
}

/// A sidecar pulling key state: the admin key, or a service key holding `sync:read`.
pub struct SyncReader(pub Actor);

impl FromRequestParts<AppState> for SyncReader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authenticate(&parts.headers, state, "sync:read")
            .await
            .map(SyncReader)
    }
}
