//! `GET /auth/admin/keys`: credentials across every service, by lifecycle state. Today the one
//! state asked for is `grace`: rotated-out keys still working, and whether callers still use
//! them (`used_since`), so an admin can see who has yet to move to the new key.

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::admin::auth::Admin;
use crate::admin::error::ApiError;
use crate::admin::model::rfc3339;
use crate::admin::openapi::ReadErrors;
use crate::admin::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KeyListParams {
    /// Only "grace" for now: anything else is refused rather than ignored.
    #[param(pattern = "^grace$")]
    pub status: String,
    /// RFC 3339, or a duration back from now: `90s`, `15m`, `1h`, `7d`.
    pub used_since: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GraceKeyView {
    pub service_id: String,
    pub service_name: String,
    pub key_id: String,
    /// "api_key" or "client_secret".
    pub kind: &'static str,
    pub prefix: String,
    pub status: &'static str,
    #[schema(format = DateTime)]
    pub grace_ends_at: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    #[schema(format = DateTime)]
    pub last_used_at: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyList {
    pub keys: Vec<GraceKeyView>,
}

/// `used_since` as Unix seconds.
pub fn since(s: &str, now: i64) -> Result<i64, ApiError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp());
    }
    let bad = || ApiError::bad_request("used_since must be RFC 3339 or a duration such as 90s, 15m, 1h, 7d");
    // The unit is the last character, whatever its width (a multi-byte one is no unit).
    let split = s.char_indices().last().ok_or_else(bad)?.0;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if !(0..=3650 * 86_400).contains(&n.saturating_mul(mult)) {
        return Err(bad());
    }
    Ok(now - n * mult)
}

/// Credentials across every service by lifecycle state: rotated-out keys still working.
#[utoipa::path(
    get, path = "/auth/admin/keys", tag = "services",
    params(KeyListParams),
    responses((status = 200, body = KeyList), ReadErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn list(
    State(st): State<AppState>,
    Admin(_): Admin,
    q: Result<Query<KeyListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<KeyList>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if q.status != "grace" {
        return Err(ApiError::bad_request("status must be \"grace\""));
    }
    let now = st.clock.now_secs();
    let used_since = q.used_since.as_deref().map(|s| since(s, now)).transpose()?;
    let keys = st.db(st.store.grace_keys(now, used_since)).await?;
    Ok(Json(KeyList {
        keys: keys
            .into_iter()
            .map(|k| GraceKeyView {
                service_id: k.service_id,
                service_name: k.service_name,
                key_id: k.key_id,
                kind: k.kind.as_str(),
                prefix: k.display_prefix,
                status: "grace",
                grace_ends_at: rfc3339(k.grace_ends_at),
                expires_at: rfc3339(k.expires_at),
                last_used_at: k.last_used_at.map(rfc3339),
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::since;

    #[test]
    fn used_since_reads_durations_and_dates() {
        let now = 1_800_000_000;
        assert_eq!(since("1h", now).unwrap(), now - 3600);
        assert_eq!(since("90s", now).unwrap(), now - 90);
        assert_eq!(since("7d", now).unwrap(), now - 7 * 86_400);
        assert_eq!(since("2027-01-15T08:00:00Z", now).unwrap(), 1_800_000_000);
        // "\u{80}" and "1é": found by schemathesis, a split inside a character panicked the
        // handler (the connection closed without an answer).
        for bad in [
            "",
            "h",
            "1y",
            "-1h",
            "1.5h",
            "99999999999d",
            "yesterday",
            "\u{80}",
            "1é",
            "é",
        ] {
            assert!(since(bad, now).is_err(), "{bad}");
        }
    }
}
