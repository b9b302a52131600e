//! `/auth/admin/signing-keys`: list the token signing keys and rotate them.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::admin::auth::Admin;
use crate::admin::error::ApiError;
use crate::admin::model::{rfc3339, MAX_TOKEN_LIFETIME};
use crate::admin::signing::{self, KeyRing};
use crate::admin::AppState;

fn describe(ring: &KeyRing, now: i64) -> Value {
    let published: Vec<String> = ring
        .published(now, i64::from(MAX_TOKEN_LIFETIME))
        .into_iter()
        .map(|k| k.kid)
        .collect();
    let signing = ring.signer_at(now).map(|s| s.kid.clone());
    let keys: Vec<Value> = ring
        .rows()
        .iter()
        .map(|r| {
            let status = if Some(&r.kid) == signing.as_ref() {
                "signing"
            } else if r.activates_at > now {
                "pending"
            } else if published.contains(&r.kid) {
                "retired_published"
            } else {
                "retired"
            };
            json!({"kid": r.kid, "status": status, "created_at": rfc3339(r.created_at), "activates_at": rfc3339(r.activates_at)})
        })
        .collect();
    json!({ "signing_kid": signing, "published_kids": published, "keys": keys })
}

/// The access-token signing keys: which signs, which are published.
#[utoipa::path(
    get, path = "/auth/admin/signing-keys", tag = "oauth",
    responses((status = 200, body = crate::admin::openapi::SigningKeys), crate::admin::openapi::ReadErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn list(State(st): State<AppState>, Admin(_): Admin) -> Json<Value> {
    Json(describe(&st.keyring.load(), st.clock.now_secs()))
}

/// Adds a key that is published now and signs after `signing_key_publish_delay_seconds`.
#[utoipa::path(
    post, path = "/auth/admin/signing-keys/rotate", tag = "oauth",
    responses((status = 200, body = crate::admin::openapi::SigningKeys), crate::admin::openapi::WriteErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn rotate(State(st): State<AppState>, Admin(actor): Admin) -> Result<Json<Value>, ApiError> {
    let now = st.clock.now_secs();
    let activates_at = now + st.cfg.signing_key_publish_delay.as_secs() as i64;
    let who = actor.audit();
    let (kid, version) = signing::add_key(&*st.store, &st.kek, now, activates_at, &who)
        .await
        .map_err(ApiError::internal)?;
    st.keyring.store(std::sync::Arc::new(
        KeyRing::load(&*st.store, &st.kek)
            .await
            .map_err(ApiError::internal)?,
    ));
    st.published(version);
    tracing::info!(%actor, kid = %kid, activates_at, "signing key rotated");
    let mut v = describe(&st.keyring.load(), now);
    v["new_kid"] = json!(kid);
    v["new_key_signs_from"] = json!(rfc3339(activates_at));
    v["version"] = json!(version);
    Ok(Json(v))
}
