//! `/auth/admin/services*`: create, list, show, patch, disable, rotate, revoke.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;

use crate::admin::auth::Admin;
use crate::admin::error::ApiError;
use crate::admin::extract::{JsonBody, PathParams};
use crate::admin::model::*;
use crate::admin::openapi::{ReadErrors, WriteErrors};
use crate::admin::storage::{CredentialKind, StoredKey};
use crate::admin::AppState;
use crate::core::ids::{self, KEY_ID_PREFIX, SERVICE_ID_PREFIX};
use crate::core::key;

fn service_id(id: String) -> Result<String, ApiError> {
    if ids::looks_like_id(&id, SERVICE_ID_PREFIX) {
        Ok(id)
    } else {
        Err(ApiError::not_found("service"))
    }
}

/// Register a service: its first API key and client secret are in the answer, once.
#[utoipa::path(
    post, path = "/auth/admin/services", tag = "services",
    request_body = CreateService,
    responses((status = 201, description = "Created; `api_key` and `client_secret` are shown this once", body = Written<Created>), WriteErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn create(
    State(st): State<AppState>,
    Admin(actor): Admin,
    JsonBody(body): JsonBody<CreateService>,
) -> Result<(StatusCode, Json<Written<Created>>), ApiError> {
    let mut body = body.expect("required body");
    let now = st.clock.now_secs();
    let ends = expiry(body.expires_at.take().as_deref(), body.ttl_seconds.take(), now)?;
    let new = body.validate()?;
    let id = ids::new_service_id();
    let key_id = ids::new_key_id();
    let key = key::generate(new.environment);
    let secret_id = ids::new_secret_id();
    let secret = key::generate_client_secret();
    let (rec, version) = {
        let (id, key_id, secret_id, new) = (id.clone(), key_id.clone(), secret_id.clone(), new.clone());
        let stored = StoredKey::of(&key).expiring(ends);
        let stored_secret = StoredKey::of(&secret).expiring(ends);
        let who = actor.audit();
        st.db_named(
            "service",
            st.store.create_service(
                &id,
                &new,
                (&key_id, &stored),
                (&secret_id, &stored_secret),
                now,
                &who,
            ),
        )
        .await?
    };
    st.published(version);
    tracing::info!(%actor, service_id = %rec.id, key_id = %key_id, key_prefix = %key.display_prefix, version, "service created");
    let warnings = crate::admin::fleet::unknown_scopes(&st, &rec.scopes).await;
    let created = Created {
        service: ServiceView::of(rec, now),
        api_key: key.secret.expose().to_string(),
        key_id,
        client_secret: secret.secret.expose().to_string(),
        client_secret_id: secret_id,
    };
    Ok((
        StatusCode::CREATED,
        Json(Written {
            warnings,
            ..Written::new(created, version)
        }),
    ))
}

/// A page of services in creation order, optionally searched.
#[utoipa::path(
    get, path = "/auth/admin/services", tag = "services",
    params(ListParams),
    responses((status = 200, description = "A page; `next_cursor` continues it", body = Page), ReadErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn list(
    State(st): State<AppState>,
    Admin(_): Admin,
    q: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1..=200"));
    }
    if let Some(c) = &q.cursor {
        if !ids::looks_like_id(c, SERVICE_ID_PREFIX) {
            return Err(ApiError::bad_request("cursor is not a service id"));
        }
    }
    let search = q.search.as_deref().filter(|s| !s.is_empty());
    if let Some(s) = search {
        if s.chars().count() > 200 || s.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "search must be at most 200 characters, without control characters",
            ));
        }
    }
    let now = st.clock.now_secs();
    let cursor = q.cursor.clone();
    let (recs, more) = st
        .db(st.store.list_services(limit, cursor.as_deref(), search))
        .await
        .map_err(|e| {
            if e.code == "not_found" {
                ApiError::bad_request("unknown cursor")
            } else {
                e
            }
        })?;
    let next_cursor = if more {
        recs.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Json(Page {
        services: recs.into_iter().map(|r| ServiceView::of(r, now)).collect(),
        next_cursor,
    }))
}

/// One service with its keys and client secrets.
#[utoipa::path(
    get, path = "/auth/admin/services/{id}", tag = "services",
    params(("id" = String, Path, description = "The service's id")),
    responses((status = 200, body = ServiceView), ReadErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn show(
    State(st): State<AppState>,
    Admin(_): Admin,
    PathParams(id): PathParams<String>,
) -> Result<Json<ServiceView>, ApiError> {
    let id = service_id(id)?;
    let now = st.clock.now_secs();
    let rec = st.db_named("service", st.store.get_service(&id)).await?;
    Ok(Json(ServiceView::of(rec, now)))
}

/// Change some fields of a service; the rest stay.
#[utoipa::path(
    patch, path = "/auth/admin/services/{id}", tag = "services",
    params(("id" = String, Path, description = "The service's id")),
    request_body = PatchService,
    responses((status = 200, description = "The service as it is now", body = Written<ServiceView>), WriteErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn patch(
    State(st): State<AppState>,
    Admin(actor): Admin,
    PathParams(id): PathParams<String>,
    JsonBody(body): JsonBody<PatchService>,
) -> Result<Json<Written<ServiceView>>, ApiError> {
    let id = service_id(id)?;
    let patch = body.expect("required body").validate()?;
    let now = st.clock.now_secs();
    let who = actor.audit();
    let (rec, version) = st
        .db_named(
            "service",
            st.store.patch_service(&id, &patch, now, &who, "service.patch"),
        )
        .await?;
    st.published(version);
    tracing::info!(%actor, service_id = %rec.id, version, "service patched");
    // Only the scopes this patch sets are checked against the routes sidecars report.
    let warnings = match patch.scopes.as_deref() {
        Some(s) => crate::admin::fleet::unknown_scopes(&st, s).await,
        None => vec![],
    };
    Ok(Json(Written {
        warnings,
        ..Written::new(ServiceView::of(rec, now), version)
    }))
}

/// Disables the service: every key stops working. The record stays for the audit trail.
/// Disable a service: its keys and tokens stop working; the record stays.
#[utoipa::path(
    delete, path = "/auth/admin/services/{id}", tag = "services",
    params(("id" = String, Path, description = "The service's id")),
    responses((status = 200, description = "The disabled service", body = Written<ServiceView>), WriteErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn disable(
    State(st): State<AppState>,
    Admin(actor): Admin,
    PathParams(id): PathParams<String>,
) -> Result<Json<Written<ServiceView>>, ApiError> {
    let id = service_id(id)?;
    let now = st.clock.now_secs();
    let patch = crate::admin::storage::ServicePatch {
        disabled: Some(true),
        ..Default::default()
    };
    let who = actor.audit();
    let (rec, version) = st
        .db_named(
            "service",
            st.store.patch_service(&id, &patch, now, &who, "service.disable"),
        )
        .await?;
    st.published(version);
    tracing::info!(%actor, service_id = %rec.id, version, "service disabled");
    Ok(Json(Written::new(ServiceView::of(rec, now), version)))
}

/// Validates the optional rotate body: the grace period in seconds, and the new
/// credential's own expiry.
fn grace_of(st: &AppState, body: Option<Rotate>) -> Result<(u64, Option<i64>), ApiError> {
    let body = body.unwrap_or_default();
    let grace = body.grace_seconds.unwrap_or(st.cfg.rotation_grace.as_secs());
    if grace > 365 * 24 * 3600 {
        return Err(ApiError::bad_request("grace_seconds must be at most one year"));
    }
    let ends = expiry(body.expires_at.as_deref(), body.ttl_seconds, st.clock.now_secs())?;
    Ok((grace, ends))
}

/// Issues a new credential of `kind` and ends the active ones after the grace period.
async fn rotate_credential(
    st: &AppState,
    id: String,
    kind: CredentialKind,
    (grace, ends): (u64, Option<i64>),
    who: crate::admin::storage::Audit,
) -> Result<(crate::admin::storage::Rotation, key::NewKey, String, u64), ApiError> {
    let now = st.clock.now_secs();
    let (new, new_id) = match kind {
        CredentialKind::ApiKey => {
            let environment = st
                .db_named("service", st.store.get_service(&id))
                .await?
                .environment;
            (key::generate(environment), ids::new_key_id())
        }
        CredentialKind::ClientSecret => (key::generate_client_secret(), ids::new_secret_id()),
    };
    let max_active = st.cfg.max_active_keys_per_service;
    let stored = StoredKey::of(&new).expiring(ends);
    let (rotation, version) = {
        let new_id = new_id.clone();
        st.db_named(
            "service",
            st.store
                .rotate(&id, kind, &new_id, &stored, grace, max_active, now, &who),
        )
        .await?
    };
    st.published(version);
    Ok((rotation, new, new_id, version))
}

fn ended(rotation: &crate::admin::storage::Rotation) -> (Option<String>, Vec<EndedKey>) {
    (
        rotation.ended.iter().map(|(_, e)| *e).max().map(rfc3339),
        rotation
            .ended
            .iter()
            .map(|(key_id, e)| EndedKey {
                key_id: key_id.clone(),
                expires_at: rfc3339(*e),
            })
            .collect(),
    )
}

/// Issue a new API key; the active ones keep working for the grace period.
#[utoipa::path(
    post, path = "/auth/admin/services/{id}/rotate", tag = "services",
    params(("id" = String, Path, description = "The service's id")),
    request_body(content = Option<Rotate>, description = "Optional; an empty body takes the defaults"),
    responses((status = 200, description = "The new key, shown this once", body = Written<Rotated>), WriteErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn rotate(
    State(st): State<AppState>,
    Admin(actor): Admin,
    PathParams(id): PathParams<String>,
    JsonBody(body): JsonBody<Rotate, true>,
) -> Result<Json<Written<Rotated>>, ApiError> {
    let id = service_id(id)?;
    let (grace, ends) = grace_of(&st, body)?;
    let (rotation, key, key_id, version) = rotate_credential(
        &st,
        id.clone(),
        CredentialKind::ApiKey,
        (grace, ends),
        actor.audit(),
    )
    .await?;
    tracing::info!(%actor, service_id = %id, key_id = %key_id, key_prefix = %key.display_prefix, grace, version, "service key rotated");
    let (old_keys_expire_at, old_keys) = ended(&rotation);
    let rotated = Rotated {
        service_id: rotation.service.id,
        api_key: key.secret.expose().to_string(),
        key_id,
        expires_at: ends.map(rfc3339),
        old_keys_expire_at,
        old_keys,
    };
    Ok(Json(Written::new(rotated, version)))
}

/// Issue a new OAuth2 client secret; the active ones keep working for the grace period.
#[utoipa::path(
    post, path = "/auth/admin/services/{id}/secret/rotate", tag = "services",
    params(("id" = String, Path, description = "The service's id")),
    request_body(content = Option<Rotate>, description = "Optional; an empty body takes the defaults"),
    responses((status = 200, description = "The new secret, shown this once", body = Written<SecretRotated>), WriteErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn rotate_secret(
    State(st): State<AppState>,
    Admin(actor): Admin,
    PathParams(id): PathParams<String>,
    JsonBody(body): JsonBody<Rotate, true>,
) -> Result<Json<Written<SecretRotated>>, ApiError> {
    let id = service_id(id)?;
    let (grace, ends) = grace_of(&st, body)?;
    let (rotation, secret, secret_id, version) = rotate_credential(
        &st,
        id.clone(),
        CredentialKind::ClientSecret,
        (grace, ends),
        actor.audit(),
    )
    .await?;
    tracing::info!(%actor, service_id = %id, secret_id = %secret_id, grace, "client secret rotated");
    let (old_secrets_expire_at, old_secrets) = ended(&rotation);
    let rotated = SecretRotated {
        client_id: rotation.service.id.clone(),
        service_id: rotation.service.id,
        client_secret: secret.secret.expose().to_string(),
        client_secret_id: secret_id,
        expires_at: ends.map(rfc3339),
        old_secrets_expire_at,
        old_secrets,
    };
    Ok(Json(Written::new(rotated, version)))
}

/// Revoke one API key at once.
#[utoipa::path(
    post, path = "/auth/admin/services/{id}/keys/{key_id}/revoke", tag = "services",
    params(
        ("id" = String, Path, description = "The service's id"),
        ("key_id" = String, Path, description = "The key's id (`key_…`)"),
    ),
    responses((status = 200, description = "The revoked key (revoking a revoked key changes nothing)", body = Written<KeyView>), WriteErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn revoke(
    State(st): State<AppState>,
    Admin(actor): Admin,
    PathParams((id, key_id)): PathParams<(String, String)>,
) -> Result<Json<Written<KeyView>>, ApiError> {
    let id = service_id(id)?;
    if !ids::looks_like_id(&key_id, KEY_ID_PREFIX) {
        return Err(ApiError::not_found("key"));
    }
    let now = st.clock.now_secs();
    let (rec, version) = {
        let (id, key_id) = (id.clone(), key_id.clone());
        let who = actor.audit();
        st.db_named("key", st.store.revoke_key(&id, &key_id, now, &who))
            .await?
    };
    st.published(version);
    tracing::info!(%actor, service_id = %id, key_id = %key_id, version, "key revoked");
    Ok(Json(Written::new(KeyView::of(&rec, now), version)))
}

/// `PATCH /auth/admin/services/{id}/keys/{key_id}`: sets (or removes, with null) the own
/// expiry of an API key (`key_…`) or client secret (`sec_…`). The sidecars judge it by their
/// own clocks, so it holds while the admin plane is down.
/// Set or remove when one API key or client secret stops working by itself.
#[utoipa::path(
    patch, path = "/auth/admin/services/{id}/keys/{key_id}", tag = "services",
    params(
        ("id" = String, Path, description = "The service's id"),
        ("key_id" = String, Path, description = "The key's (`key_…`) or client secret's (`sec_…`) id"),
    ),
    request_body = PatchKey,
    responses((status = 200, body = Written<KeyView>), WriteErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn patch_key(
    State(st): State<AppState>,
    Admin(actor): Admin,
    PathParams((id, key_id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<PatchKey>,
) -> Result<Json<Written<KeyView>>, ApiError> {
    let id = service_id(id)?;
    let kind = if ids::looks_like_id(&key_id, KEY_ID_PREFIX) {
        CredentialKind::ApiKey
    } else if ids::looks_like_id(&key_id, ids::SECRET_ID_PREFIX) {
        CredentialKind::ClientSecret
    } else {
        return Err(ApiError::not_found("key"));
    };
    let body = body.expect("required body");
    let now = st.clock.now_secs();
    let own = match (&body.expires_at, body.ttl_seconds) {
        (None, None) => return Err(ApiError::bad_request("set expires_at (or null) or ttl_seconds")),
        (Some(None), None) => None,
        (Some(Some(at)), ttl) => expiry(Some(at), ttl, now)?,
        (Some(None), Some(_)) => {
            return Err(ApiError::bad_request("set expires_at or ttl_seconds, not both"))
        }
        (None, Some(ttl)) => expiry(None, Some(ttl), now)?,
    };
    let who = actor.audit();
    let (rec, version) = st
        .db_named("key", st.store.set_expiry(&id, kind, &key_id, own, now, &who))
        .await?;
    st.published(version);
    tracing::info!(%actor, service_id = %id, key_id = %key_id, expires_at = own, version, "credential expiry set");
    Ok(Json(Written::new(KeyView::of(&rec, now), version)))
}
