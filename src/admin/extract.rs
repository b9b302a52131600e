//! Request extractors that fail with our JSON errors instead of axum's plain-text ones:
//! wrong content type → 415, too large → 413, malformed or unknown fields → 400.

use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use http_body_util::LengthLimitError;
use serde::de::DeserializeOwned;

use crate::admin::error::ApiError;
use crate::admin::AppState;

/// A JSON body. With `OPTIONAL = true` an empty body without a content type yields `None`.
pub struct JsonBody<T, const OPTIONAL: bool = false>(pub Option<T>);

fn is_json(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

impl<T: DeserializeOwned, const OPTIONAL: bool> FromRequest<AppState> for JsonBody<T, OPTIONAL> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.cfg.max_body_bytes;
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_string());
        let declared_len = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_len.is_some_and(|n| n > limit as u64) {
            return Err(too_large(limit));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
            if e.into_inner().is::<LengthLimitError>() {
                too_large(limit)
            } else {
                ApiError::bad_request("could not read the request body")
            }
        })?;
        if OPTIONAL && bytes.is_empty() && content_type.is_none() {
            return Ok(JsonBody(None));
        }
        match content_type.as_deref() {
            Some(ct) if is_json(ct) => {}
            _ => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "Content-Type must be application/json",
                ))
            }
        }
        serde_json::from_slice::<T>(&bytes)
            .map(|v| JsonBody(Some(v)))
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body exceeds {limit} bytes"),
    )
}

/// An `application/x-www-form-urlencoded` body (RFC 6749 endpoints). A parameter sent twice is
/// an `invalid_request` (§3.2); empty values count as absent (§3.1).
pub struct FormBody(pub std::collections::HashMap<String, String>);

impl FromRequest<AppState> for FormBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.cfg.max_body_bytes;
        let is_form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| ct.split(';').next().unwrap_or("").trim())
            .is_some_and(|e| e.eq_ignore_ascii_case("application/x-www-form-urlencoded"));
        if !is_form {
            return Err(ApiError::bad_request(
                "Content-Type must be application/x-www-form-urlencoded",
            ));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
            if e.into_inner().is::<LengthLimitError>() {
                too_large(limit)
            } else {
                ApiError::bad_request("could not read the request body")
            }
        })?;
        let mut out = std::collections::HashMap::new();
        for (k, v) in form_urlencoded::parse(&bytes) {
            if v.is_empty() {
                continue;
            }
            if out.insert(k.to_string(), v.to_string()).is_some() {
                return Err(ApiError::bad_request(format!("parameter {k:?} is repeated")));
            }
        }
        Ok(FormBody(out))
    }
}
