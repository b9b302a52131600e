//! Request extractors that fail with our JSON errors instead of axum's plain-text ones:
//! wrong content type → 415 (JSON) or 400 (OAuth form endpoints, RFC 6749 §5.2), too large →
//! 413, too slow → 408, malformed or unknown fields → 400.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use http_body_util::LengthLimitError;
use serde::de::DeserializeOwned;

use crate::admin::error::ApiError;
use crate::admin::AppState;

/// The media type of the request without parameters, lower-cased; None when absent.
fn media_type(req: &Request) -> Option<String> {
    req.headers().get(header::CONTENT_TYPE).map(|v| {
        v.to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    })
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body exceeds {limit} bytes"),
    )
}

/// Reads the whole body, refusing more than `max_body_bytes` (early, by Content-Length, when
/// the client declared it).
async fn read_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    let limit = state.cfg.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    // A client that trickles its body must not hold a connection and a task forever.
    let read = tokio::time::timeout(
        state.cfg.body_read_timeout,
        axum::body::to_bytes(req.into_body(), limit),
    );
    let Ok(read) = read.await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body was not received in time",
        ));
    };
    read.map_err(|e| {
        if e.into_inner().is::<LengthLimitError>() {
            too_large(limit)
        } else {
            ApiError::bad_request("could not read the request body")
        }
    })
}

/// Path parameters, refused as JSON like everything else (axum's own rejection is plain
/// text, e.g. for `%FF` in a path segment).
pub struct PathParams<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| PathParams(v))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// A JSON body. With `OPTIONAL = true` an empty body without a content type, or `null`, yields
/// `None`.
pub struct JsonBody<T, const OPTIONAL: bool = false>(pub Option<T>);

impl<T: DeserializeOwned, const OPTIONAL: bool> FromRequest<AppState> for JsonBody<T, OPTIONAL> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let media = media_type(&req);
        let bytes = read_body(req, state).await?;
        if OPTIONAL && bytes.is_empty() && media.is_none() {
            return Ok(JsonBody(None));
        }
        if media.as_deref() != Some("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Content-Type must be application/json",
            ));
        }
        // An optional body may also be sent as JSON `null` (what a generated client sends for
        // "no options").
        if OPTIONAL && bytes.trim_ascii() == b"null" {
            return Ok(JsonBody(None));
        }
        serde_json::from_slice::<T>(&bytes)
            .map(|v| JsonBody(Some(v)))
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// An `application/x-www-form-urlencoded` body (RFC 6749 endpoints). A parameter sent twice is
/// an `invalid_request` (§3.2); empty values count as absent (§3.1).
pub struct FormBody(pub HashMap<String, String>);

impl FromRequest<AppState> for FormBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if media_type(&req).as_deref() != Some("application/x-www-form-urlencoded") {
            return Err(ApiError::bad_request(
                "Content-Type must be application/x-www-form-urlencoded",
            ));
        }
        let bytes = read_body(req, state).await?;
        let mut out = HashMap::new();
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
