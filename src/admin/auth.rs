//! Who may call the admin plane: the admin key (`X-Admin-Api-Key`, compared in constant time
//! through its blake3 hash) or a service key whose service holds the scope the endpoint needs.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use crate::admin::error::ApiError;
use crate::admin::storage::Audit;
use crate::admin::throttle;
use crate::admin::AppState;
use crate::core::decision::{bearer_token, Authorization};
use crate::core::key;
use crate::core::scope::ScopeSet;

pub const ADMIN_KEY_HEADER: &str = "x-admin-api-key";

/// Who performed an action, for logs and the audit log. Never a secret.
#[derive(Debug, Clone)]
pub enum Actor {
    AdminKey,
    Service { service_id: String, key_id: String },
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::AdminKey => f.write_str("admin-key"),
            Actor::Service { service_id, key_id } => write!(f, "service:{service_id}/{key_id}"),
        }
    }
}

/// An authenticated caller and the address it called from.
#[derive(Debug, Clone)]
pub struct Caller {
    pub actor: Actor,
    pub source: Option<IpAddr>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.actor.fmt(f)
    }
}

impl Caller {
    pub fn audit(&self) -> Audit {
        Audit {
            actor: self.actor.to_string(),
            source_ip: self.source.map(|ip| ip.to_string()),
        }
    }
}

fn peer(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip())
}

/// The admin key, or a service key (Bearer) whose service holds `needed_scope`.
pub async fn authenticate(
    headers: &HeaderMap,
    source: Option<IpAddr>,
    state: &AppState,
    needed_scope: &str,
) -> Result<Caller, ApiError> {
    // Only the admin key can be guessed (it is chosen by people); service keys carry 256
    // random bits behind a checksum. So only admin-key attempts are throttled: throttling
    // Bearer keys too would let anyone sharing an address (a NAT, a proxy, the same host) lock
    // sidecars out of sync, and revocations would stop reaching them.
    // A Bearer credential that is no service key may be the admin key sent the wrong way
    // (recognised below, and told so): it is throttled like an admin-key attempt, or the
    // difference in answers would let it be guessed unthrottled.
    let admin_key_attempt = headers.contains_key(ADMIN_KEY_HEADER) || bearer_not_a_service_key(headers);
    if let (true, Some(ip)) = (admin_key_attempt, source) {
        // Refused before the key is even looked at.
        if let Some(retry) = state
            .auth_failures
            .blocked(&throttle::bucket(ip), state.clock.now_secs())
        {
            state.metrics.auth_throttled();
            let mut e = ApiError::rate_limited(retry);
            e.description = format!(
                "too many failed admin-key attempts from this address; retry after {} s",
                retry.max(1)
            );
            return Err(e);
        }
    }
    match check_credential(headers, source, state, needed_scope).await {
        Ok(actor) => Ok(Caller { actor, source }),
        Err(Failure::Denied(reason)) => {
            let now = state.clock.now_secs();
            tracing::warn!(reason, source = ?source, "admin plane: authentication failed");
            state.metrics.auth_failed();
            if let (true, Some(ip)) = (admin_key_attempt, source) {
                state.auth_failures.record(throttle::bucket(ip), now);
            }
            audit_failure(state, source, reason, None).await;
            Err(ApiError::unauthorized(if reason == ADMIN_KEY_AS_BEARER {
                "this is the admin key: send it in the X-Admin-Api-Key header, not as Authorization: Bearer"
            } else {
                "missing or invalid credential: send the admin key in the X-Admin-Api-Key header, or a service key holding the endpoint's scope as Authorization: Bearer"
            }))
        }
        Err(Failure::Error(e)) => Err(e),
    }
}

/// Writes a failed authentication to the audit log within the per-minute budget shared by
/// admin-key and client-secret failures. `target` names the client a secret was tried for.
pub async fn audit_failure(
    state: &AppState,
    source: Option<IpAddr>,
    reason: &'static str,
    target: Option<String>,
) {
    let now = state.clock.now_secs();
    let Some(left_out) = state.auth_audit_budget.take(now) else {
        return;
    };
    let who = Audit {
        actor: "unauthenticated".into(),
        source_ip: source.map(|ip| ip.to_string()),
    };
    // A database error here must not turn a 401 into a 500.
    let audited = state
        .db(state
            .store
            .audit_failed_auth(now, &who, reason, target.as_deref(), left_out))
        .await;
    if let Err(e) = audited {
        tracing::error!(error = ?e, "could not audit a failed authentication");
    }
}

const ADMIN_KEY_AS_BEARER: &str = "admin key sent as Bearer";

/// A Bearer credential without a service key's prefix: maybe the admin key. (A mistyped
/// service key keeps its prefix and stays a service-key failure: those are not throttled, so
/// a sidecar sharing an address keeps syncing.)
fn looks_like_admin_key(token: &str) -> bool {
    !(token.starts_with("svc_live_") || token.starts_with("svc_test_"))
}

/// A single Bearer credential that may be the admin key sent the wrong way.
fn bearer_not_a_service_key(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => matches!(
            bearer_token(Authorization::One(v.as_bytes())),
            Ok(Some(t)) if looks_like_admin_key(t)
        ),
        _ => false,
    }
}

/// Why authentication did not succeed: a wrong credential (401, audited, counted against the
/// source address) or anything else (scope missing, database error) passed on as it is.
enum Failure {
    Denied(&'static str),
    Error(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Error(e)
    }
}

async fn check_credential(
    headers: &HeaderMap,
    source: Option<IpAddr>,
    state: &AppState,
    needed_scope: &str,
) -> Result<Actor, Failure> {
    let admin_headers: Vec<_> = headers.get_all(ADMIN_KEY_HEADER).iter().collect();
    if !admin_headers.is_empty() {
        let presented = match admin_headers.as_slice() {
            [one] => one.as_bytes(),
            _ => return Err(Failure::Denied("several X-Admin-Api-Key headers")),
        };
        // blake3::Hash equality is constant-time, and hashing first hides the length too.
        if blake3::hash(presented) == state.admin_key_hash {
            return Ok(Actor::AdminKey);
        }
        return Err(Failure::Denied("wrong admin key"));
    }
    let auth: Vec<_> = headers.get_all(header::AUTHORIZATION).iter().collect();
    let auth = match auth.as_slice() {
        [] => Authorization::Absent,
        [one] => Authorization::One(one.as_bytes()),
        _ => Authorization::Several,
    };
    let token = match bearer_token(auth) {
        Ok(Some(t)) => t,
        Ok(None) => return Err(Failure::Denied("no credential")),
        Err(_) => return Err(Failure::Denied("malformed Authorization header")),
    };
    let Ok(parsed) = key::parse(token) else {
        // blake3::Hash equality is constant-time.
        if looks_like_admin_key(token) && blake3::hash(token.as_bytes()) == state.admin_key_hash {
            return Err(Failure::Denied(ADMIN_KEY_AS_BEARER));
        }
        return Err(Failure::Denied("malformed service key"));
    };
    let hash = parsed.hash();
    let now = state.clock.now_secs();
    let owner = state
        .db(state.store.key_owner(&hash, now))
        .await?
        .ok_or(Failure::Denied("unknown, revoked or expired service key"))?;
    // The same address check the sidecar makes: a key restricted to some networks is refused
    // here from anywhere else too.
    if !crate::core::snapshot::ip_allowed(&crate::core::snapshot::parse_cidrs(&owner.allowed_ips), source) {
        tracing::warn!(service_id = %owner.service_id, key_id = %owner.key_id, source = ?source, "admin plane: service key used from an address outside its allowed_ips");
        return Err(Failure::Error(ApiError::forbidden(
            "this service key may not be used from this address",
        )));
    }
    let scopes = ScopeSet::parse(&owner.scopes).map_err(|e| Failure::Error(ApiError::internal(e)))?;
    if !scopes.allows(needed_scope) {
        tracing::warn!(service_id = %owner.service_id, key_id = %owner.key_id, needed_scope, "admin plane: scope missing");
        return Err(Failure::Error(ApiError::forbidden(format!(
            "this endpoint requires the {needed_scope} scope"
        ))));
    }
    Ok(Actor::Service {
        service_id: owner.service_id,
        key_id: owner.key_id,
    })
}

/// An admin: the admin key, or a service key holding `admin:*`.
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authenticate(&parts.headers, peer(parts), state, "admin:*")
            .await
            .map(Admin)
    }
}

/// A sidecar pulling key state: the admin key, or a service key holding `sync:read`.
pub struct SyncReader(pub Caller);

impl FromRequestParts<AppState> for SyncReader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authenticate(&parts.headers, peer(parts), state, "sync:read")
            .await
            .map(SyncReader)
    }
}
