//! `/auth/admin/services*`: create, list, show, patch, disable, rotate, revoke.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use crate::admin::auth::Admin;
use crate::admin::db::StoredKey;
use crate::admin::error::ApiError;
use crate::admin::extract::JsonBody;
use crate::admin::model::*;
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

pub async fn create(
    State(st): State<AppState>,
    Admin(actor): Admin,
    JsonBody(body): JsonBody<CreateService>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let new = body.expect("required body").validate()?;
    let id = ids::new_service_id();
    let key_id = ids::new_key_id();
    let key = key::generate(new.environment);
    let now = st.clock.now_secs();
    let (rec, version) = {
        let (id, key_id, new) = (id.clone(), key_id.clone(), new.clone());
        let stored = StoredKey {
            hash: key.hash,
            display_prefix: key.display_prefix.clone(),
        };
        st.db_named("service", move |s| {
            s.create_service(&id, &new, &key_id, &stored, now)
        })
        .await?
    };
    st.published(version);
    tracing::info!(%actor, service_id = %rec.id, key_id = %key_id, key_prefix = %key.display_prefix, version, "service created");
    Ok((
        StatusCode::CREATED,
        Json(Created {
            service: ServiceView::of(rec, now),
            api_key: key.secret.expose().to_string(),
            key_id,
        }),
    ))
}

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
    let now = st.clock.now_secs();
    let cursor = q.cursor.clone();
    let (recs, more) = st
        .db(move |s| s.list_services(limit, cursor.as_deref()))
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

pub async fn show(
    State(st): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    let id = service_id(id)?;
    let now = st.clock.now_secs();
    let rec = st.db_named("service", move |s| s.get_service(&id)).await?;
    Ok(Json(ServiceView::of(rec, now)))
}

pub async fn patch(
    State(st): State<AppState>,
    Admin(actor): Admin,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PatchService>,
) -> Result<Json<ServiceView>, ApiError> {
    let id = service_id(id)?;
    let patch = body.expect("required body").validate()?;
    let now = st.clock.now_secs();
    let (rec, version) = st
        .db_named("service", move |s| s.patch_service(&id, &patch, now))
        .await?;
    st.published(version);
    tracing::info!(%actor, service_id = %rec.id, version, "service patched");
    Ok(Json(ServiceView::of(rec, now)))
}

/// Disables the service: every key stops working. The record stays for the audit trail.
pub async fn disable(
    State(st): State<AppState>,
    Admin(actor): Admin,
    Path(id): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    let id = service_id(id)?;
    let now = st.clock.now_secs();
    let patch = crate::admin::db::ServicePatch {
        disabled: Some(true),
        ..Default::default()
    };
    let (rec, version) = st
        .db_named("service", move |s| s.patch_service(&id, &patch, now))
        .await?;
    st.published(version);
    tracing::info!(%actor, service_id = %rec.id, version, "service disabled");
    Ok(Json(ServiceView::of(rec, now)))
}

pub async fn rotate(
    State(st): State<AppState>,
    Admin(actor): Admin,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Rotate, true>,
) -> Result<Json<Rotated>, ApiError> {
    let id = service_id(id)?;
    let grace = body
        .unwrap_or_default()
        .grace_seconds
        .unwrap_or(st.cfg.rotation_grace.as_secs());
    if grace > 365 * 24 * 3600 {
        return Err(ApiError::bad_request(
            "grace_seconds must be at most one year",
        ));
    }
    let now = st.clock.now_secs();
    let environment = st
        .db_named("service", {
            let id = id.clone();
            move |s| s.get_service(&id)
        })
        .await?
        .environment;
    let key = key::generate(environment);
    let key_id = ids::new_key_id();
    let max_active = st.cfg.max_active_keys_per_service;
    let (rotation, version) = {
        let (id, key_id) = (id.clone(), key_id.clone());
        let stored = StoredKey {
            hash: key.hash,
            display_prefix: key.display_prefix.clone(),
        };
        st.db_named("service", move |s| {
            s.rotate(&id, &key_id, &stored, grace, max_active, now)
        })
        .await?
    };
    st.published(version);
    tracing::info!(%actor, service_id = %id, key_id = %key_id, key_prefix = %key.display_prefix, grace, version, "service key rotated");
    Ok(Json(Rotated {
        service_id: rotation.service.id,
        api_key: key.secret.expose().to_string(),
        key_id,
        old_keys_expire_at: rotation.ended.iter().map(|(_, e)| *e).max().map(rfc3339),
        old_keys: rotation
            .ended
            .into_iter()
            .map(|(key_id, e)| EndedKey {
                key_id,
                expires_at: rfc3339(e),
            })
            .collect(),
    }))
}

pub async fn revoke(
    State(st): State<AppState>,
    Admin(actor): Admin,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<Json<KeyView>, ApiError> {
    let id = service_id(id)?;
    if !ids::looks_like_id(&key_id, KEY_ID_PREFIX) {
        return Err(ApiError::not_found("key"));
    }
    let now = st.clock.now_secs();
    let (rec, version) = {
        let (id, key_id) = (id.clone(), key_id.clone());
        st.db_named("key", move |s| s.revoke_key(&id, &key_id, now))
            .await?
    };
    st.published(version);
    tracing::info!(%actor, service_id = %id, key_id = %key_id, version, "key revoked");
    Ok(Json(KeyView::of(&rec, now)))
}
