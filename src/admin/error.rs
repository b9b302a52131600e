//! The admin plane's one error type and its JSON body `{"error","error_description"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::admin::storage::StoreError;

/// The body of every refusal, on every plane (RFC 6749 §5.2's shape).
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A machine-readable code: `invalid_request`, `unauthorized`, `not_found`, `conflict`,
    /// `rate_limited`, `invalid_client`, `invalid_scope`, …
    pub error: String,
    /// What went wrong and, where it helps, what to do about it.
    pub error_description: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub description: String,
    /// `WWW-Authenticate` for a 401; the admin API's Bearer challenge unless set.
    pub challenge: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            description: description.into(),
            challenge: None,
            retry_after: None,
        }
    }

    pub fn with_challenge(mut self, challenge: &'static str) -> Self {
        self.challenge = Some(challenge);
        self
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests; slow down",
        );
        e.retry_after = Some(retry_after_secs.max(1));
        e
    }

    pub fn bad_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// Unsigned counters in queries are int64 in the API (the OpenAPI document, the
    /// databases): a larger value is refused rather than wrapped or clamped.
    pub fn int64(name: &str, v: Option<u64>) -> Result<(), Self> {
        match v {
            Some(n) if n > i64::MAX as u64 => {
                Err(Self::bad_request(format!("{name} must be at most {}", i64::MAX)))
            }
            _ => Ok(()),
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }

    pub fn unauthorized(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", description)
    }

    pub fn forbidden(description: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", description)
    }

    /// Logs the detail; the caller only learns that something failed on our side.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "admin plane internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal error",
        )
    }

    pub fn from_store(e: StoreError, what: &str) -> Self {
        match e {
            StoreError::NotFound => Self::not_found(what),
            StoreError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            // The database is down or unreachable: a temporary condition, nothing was written.
            StoreError::Unavailable(detail) => {
                // Every request fails the same way while the database is away: one line per
                // 10 s, the rest at debug (the 503s are counted by the HTTP metrics).
                static WINDOW: std::sync::OnceLock<crate::telemetry::LogWindow> = std::sync::OnceLock::new();
                let window = WINDOW.get_or_init(|| crate::telemetry::LogWindow::new(10_000));
                if window.admit(crate::telemetry::monotonic_ms()) {
                    tracing::error!(error = %detail, "database unavailable");
                } else {
                    tracing::debug!(error = %detail, "database unavailable");
                }
                let mut e = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "the database is unavailable; retry shortly",
                );
                e.retry_after = Some(1);
                e
            }
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_owned(),
            error_description: self.description,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = self.challenge.unwrap_or("Bearer realm=\"permiso-admin\"");
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp.headers_mut()
            .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        resp
    }
}
