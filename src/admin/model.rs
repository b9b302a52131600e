//! Admin API request and response bodies, and the validation that turns a request into a
//! store command. Validation completes before anything is written.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::admin::error::ApiError;
use crate::admin::storage::{KeyRecord, NewService, ServicePatch, ServiceRecord};
use crate::core::key::Environment;
use crate::core::ratelimit::LimitScope;
use crate::core::scope::ScopeSet;
use crate::core::snapshot::parse_cidr;

pub const MAX_NAME_LEN: usize = 100;
pub const MAX_DESCRIPTION_LEN: usize = 1000;
pub const MAX_ALLOWED_IPS: usize = 100;
pub const MAX_RATE_LIMIT: u32 = 10_000_000;

/// `Some(None)` for an explicit `null`, `None` when the field is absent.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    /// Unique (without regard to case); leading and trailing spaces are trimmed.
    #[schema(min_length = 1, max_length = 100, example = "mt5-api")]
    pub service_name: String,
    /// `resource:action` scopes (`trade:read`, `account:*`).
    #[serde(default)]
    #[schema(value_type = Vec<crate::admin::openapi::ScopeName>, max_items = 64, example = json!(["trade:read", "account:read"]))]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub environment: Option<Environment>,
    #[schema(max_length = 1000)]
    pub description: Option<String>,
    /// Routes marked `trusted = true` admit it.
    pub is_trusted: Option<bool>,
    #[schema(minimum = 1, maximum = 10000000)]
    pub rate_limit_per_minute: Option<u32>,
    #[schema(minimum = 1, maximum = 10000000)]
    pub rate_limit_per_hour: Option<u32>,
    /// `sidecar` (default): each sidecar counts alone; `cluster`: one count shared by every
    /// sidecar with the Redis limiter.
    pub rate_limit_scope: Option<LimitScope>,
    /// CIDRs the service may call from (none: anywhere).
    #[schema(max_items = 100, example = json!(["10.0.0.0/8"]))]
    pub allowed_ips: Option<Vec<String>>,
    pub contact_email: Option<String>,
    /// Seconds; default 3600, 60..=86400.
    #[schema(minimum = 60, maximum = 86400)]
    pub access_token_lifetime: Option<u32>,
    /// Client-certificate identities (`spiffe://…` URI SANs, `dns:<name>` DNS SANs).
    pub tls_identities: Option<Vec<String>>,
    /// When the first API key and client secret stop working (RFC 3339); or `ttl_seconds`.
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(minimum = 1, maximum = 315360000)]
    pub ttl_seconds: Option<u64>,
}

/// Only the fields present change; `null` clears a limit, the description or the contact.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchService {
    #[schema(value_type = Option<Vec<crate::admin::openapi::ScopeName>>, max_items = 64)]
    pub scopes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10000000)]
    pub rate_limit_per_minute: Option<Option<u32>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10000000)]
    pub rate_limit_per_hour: Option<Option<u32>>,
    pub rate_limit_scope: Option<LimitScope>,
    #[schema(max_items = 100)]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 1000)]
    pub description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub contact_email: Option<Option<String>>,
    pub is_trusted: Option<bool>,
    pub disabled: Option<bool>,
    #[schema(minimum = 60, maximum = 86400)]
    pub access_token_lifetime: Option<u32>,
    pub tls_identities: Option<Vec<String>>,
}

/// Body of a rotation (optional: an empty body takes the defaults).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// Seconds the old credentials keep working (default: `admin_plane.rotation_grace_seconds`,
    /// 7 days); at most a year.
    #[schema(maximum = 31536000)]
    pub grace_seconds: Option<u64>,
    /// When the new credential stops working (RFC 3339); or `ttl_seconds`.
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(minimum = 1, maximum = 315360000)]
    pub ttl_seconds: Option<u64>,
}

/// `PATCH /auth/admin/services/{id}/keys/{key_id}`: a credential's own expiry. Exactly one
/// of `expires_at` (RFC 3339, or null to remove it) and `ttl_seconds`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchKey {
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Option<String>>,
    #[schema(minimum = 1, maximum = 315360000)]
    pub ttl_seconds: Option<u64>,
}

/// The longest a credential's own lifetime may be set to: ten years.
pub const MAX_CREDENTIAL_LIFETIME: u64 = 10 * 365 * 24 * 3600;

/// A credential's own expiry from `expires_at` (RFC 3339) or `ttl_seconds`, at most one of
/// them: in the future, within `MAX_CREDENTIAL_LIFETIME`.
pub fn expiry(expires_at: Option<&str>, ttl_seconds: Option<u64>, now: i64) -> Result<Option<i64>, ApiError> {
    let max = now.saturating_add(MAX_CREDENTIAL_LIFETIME as i64);
    let at = match (expires_at, ttl_seconds) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("set expires_at or ttl_seconds, not both")),
        (None, None) => return Ok(None),
        (None, Some(ttl)) => {
            if ttl == 0 || ttl > MAX_CREDENTIAL_LIFETIME {
                return Err(ApiError::bad_request(format!(
                    "ttl_seconds must be 1..={MAX_CREDENTIAL_LIFETIME}"
                )));
            }
            now.saturating_add(ttl as i64)
        }
        (Some(s), None) => {
            let at = chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|_| {
                    ApiError::bad_request("expires_at must be an RFC 3339 date-time (2027-01-31T12:00:00Z)")
                })?
                .timestamp();
            if at <= now {
                return Err(ApiError::bad_request("expires_at must be in the future"));
            }
            if at > max {
                return Err(ApiError::bad_request("expires_at must be within ten years"));
            }
            at
        }
    };
    Ok(Some(at))
}

/// A write's answer: its body, the sync `version` it created (to check with
/// `GET /auth/admin/changes/{version}` that every sidecar has it) and any warnings.
#[derive(Debug, Serialize, ToSchema)]
pub struct Written<T: Serialize> {
    #[serde(flatten)]
    pub body: T,
    pub version: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl<T: Serialize> Written<T> {
    pub fn new(body: T, version: u64) -> Written<T> {
        Written {
            body,
            version,
            warnings: vec![],
        }
    }
}

fn validate_name(name: &str) -> Result<String, ApiError> {
    let n = name.trim();
    if n.is_empty() || n.len() > MAX_NAME_LEN {
        return Err(ApiError::bad_request(format!(
            "service_name must be 1 to {MAX_NAME_LEN} characters"
        )));
    }
    // It travels in the X-Permiso-Service-Name header, so keep it to plain ASCII.
    if !n
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'_' | b'-' | b'.'))
    {
        return Err(ApiError::bad_request(
            "service_name may contain only letters, digits, space, '_', '-' and '.'",
        ));
    }
    Ok(n.to_string())
}

fn validate_scopes(scopes: &[String]) -> Result<Vec<String>, ApiError> {
    ScopeSet::parse(scopes)
        .map(|s| s.to_strings())
        .map_err(|e| ApiError::bad_request(format!("scopes: {e}")))
}

fn validate_limit(field: &str, v: Option<u32>) -> Result<Option<u32>, ApiError> {
    match v {
        Some(0) => Err(ApiError::bad_request(format!(
            "{field} must be at least 1 (omit it or use null for no limit)"
        ))),
        Some(n) if n > MAX_RATE_LIMIT => Err(ApiError::bad_request(format!(
            "{field} must be at most {MAX_RATE_LIMIT}"
        ))),
        other => Ok(other),
    }
}

/// Client-certificate identities per service.
pub const MAX_TLS_IDENTITIES: usize = 10;

fn validate_identities(ids: &[String]) -> Result<Vec<String>, ApiError> {
    if ids.len() > MAX_TLS_IDENTITIES {
        return Err(ApiError::bad_request(format!(
            "tls_identities: at most {MAX_TLS_IDENTITIES} entries"
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(ids.len());
    for id in ids {
        let c = crate::core::peer::canonical_identity(id)
            .map_err(|e| ApiError::bad_request(format!("tls_identities: {id:?}: {e}")))?;
        if out.contains(&c) {
            return Err(ApiError::bad_request(format!(
                "tls_identities: {id:?} is listed twice"
            )));
        }
        out.push(c);
    }
    Ok(out)
}

fn validate_ips(ips: &[String]) -> Result<Vec<String>, ApiError> {
    if ips.len() > MAX_ALLOWED_IPS {
        return Err(ApiError::bad_request(format!(
            "allowed_ips: at most {MAX_ALLOWED_IPS} entries"
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(ips.len());
    for ip in ips {
        let net = parse_cidr(ip.trim()).ok_or_else(|| {
            ApiError::bad_request(format!("allowed_ips: {ip:?} is not an IP address or CIDR"))
        })?;
        let s = net.to_string();
        if out.contains(&s) {
            return Err(ApiError::bad_request(format!(
                "allowed_ips: {ip:?} is listed twice"
            )));
        }
        out.push(s);
    }
    Ok(out)
}

pub const DEFAULT_TOKEN_LIFETIME: u32 = 3600;
pub const MAX_TOKEN_LIFETIME: u32 = 86_400;

fn validate_lifetime(v: Option<u32>) -> Result<Option<u32>, ApiError> {
    match v {
        Some(n) if !(60..=MAX_TOKEN_LIFETIME).contains(&n) => Err(ApiError::bad_request(format!(
            "access_token_lifetime must be 60..={MAX_TOKEN_LIFETIME} seconds"
        ))),
        other => Ok(other),
    }
}

fn validate_description(d: Option<String>) -> Result<Option<String>, ApiError> {
    match d {
        Some(d) if d.chars().count() > MAX_DESCRIPTION_LEN => Err(ApiError::bad_request(format!(
            "description must be at most {MAX_DESCRIPTION_LEN} characters"
        ))),
        other => Ok(other),
    }
}

fn validate_email(e: Option<String>) -> Result<Option<String>, ApiError> {
    match e {
        None => Ok(None),
        Some(e) => {
            let ok = e.len() <= 254
                && !e.chars().any(|c| c.is_whitespace() || c.is_control())
                && e.split_once('@')
                    .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.contains('@'));
            if ok {
                Ok(Some(e))
            } else {
                Err(ApiError::bad_request("contact_email is not an email address"))
            }
        }
    }
}

impl CreateService {
    pub fn validate(self) -> Result<NewService, ApiError> {
        Ok(NewService {
            name: validate_name(&self.service_name)?,
            environment: self.environment.unwrap_or(Environment::Live),
            description: validate_description(self.description)?,
            contact_email: validate_email(self.contact_email)?,
            is_trusted: self.is_trusted.unwrap_or(false),
            scopes: validate_scopes(&self.scopes)?,
            rate_limit_per_minute: validate_limit("rate_limit_per_minute", self.rate_limit_per_minute)?,
            rate_limit_per_hour: validate_limit("rate_limit_per_hour", self.rate_limit_per_hour)?,
            rate_limit_scope: self.rate_limit_scope.unwrap_or_default(),
            allowed_ips: validate_ips(self.allowed_ips.as_deref().unwrap_or(&[]))?,
            access_token_lifetime: validate_lifetime(self.access_token_lifetime)?
                .unwrap_or(DEFAULT_TOKEN_LIFETIME),
            tls_identities: validate_identities(self.tls_identities.as_deref().unwrap_or(&[]))?,
        })
    }
}

impl PatchService {
    pub fn validate(self) -> Result<ServicePatch, ApiError> {
        let p = ServicePatch {
            scopes: self.scopes.as_deref().map(validate_scopes).transpose()?,
            rate_limit_per_minute: self
                .rate_limit_per_minute
                .map(|v| validate_limit("rate_limit_per_minute", v))
                .transpose()?,
            rate_limit_per_hour: self
                .rate_limit_per_hour
                .map(|v| validate_limit("rate_limit_per_hour", v))
                .transpose()?,
            rate_limit_scope: self.rate_limit_scope,
            allowed_ips: self.allowed_ips.as_deref().map(validate_ips).transpose()?,
            description: self.description.map(validate_description).transpose()?,
            contact_email: self.contact_email.map(validate_email).transpose()?,
            is_trusted: self.is_trusted,
            disabled: self.disabled,
            access_token_lifetime: validate_lifetime(self.access_token_lifetime)?,
            tls_identities: self
                .tls_identities
                .as_deref()
                .map(validate_identities)
                .transpose()?,
        };
        let empty = p.scopes.is_none()
            && p.rate_limit_per_minute.is_none()
            && p.rate_limit_per_hour.is_none()
            && p.rate_limit_scope.is_none()
            && p.allowed_ips.is_none()
            && p.description.is_none()
            && p.contact_email.is_none()
            && p.is_trusted.is_none()
            && p.disabled.is_none()
            && p.access_token_lifetime.is_none()
            && p.tls_identities.is_none();
        if empty {
            return Err(ApiError::bad_request("the patch changes nothing"));
        }
        Ok(p)
    }
}

pub fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| secs.to_string())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub key_id: String,
    /// The first characters of the key, to recognise it (never enough to use it).
    pub prefix: String,
    /// active | grace | expired | revoked
    #[schema(value_type = String, pattern = "^(active|grace|expired|revoked)$")]
    pub status: &'static str,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When it stops working: the earlier of its own expiry and a rotation's grace end.
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    /// When its rotation's grace window ends (rotated-out credentials only).
    #[schema(format = DateTime)]
    pub grace_ends_at: Option<String>,
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
    /// Last use reported by a sidecar (minute precision).
    #[schema(format = DateTime)]
    pub last_used_at: Option<String>,
}

impl KeyView {
    pub fn of(k: &KeyRecord, now: i64) -> KeyView {
        let status = match (k.revoked_at, k.expires_at, k.grace_ends_at) {
            (Some(_), _, _) => "revoked",
            (None, Some(e), _) if e <= now => "expired",
            (None, _, Some(_)) => "grace",
            (None, _, None) => "active",
        };
        KeyView {
            key_id: k.id.clone(),
            prefix: k.display_prefix.clone(),
            status,
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            grace_ends_at: k.grace_ends_at.map(rfc3339),
            revoked_at: k.revoked_at.map(rfc3339),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceView {
    pub service_id: String,
    pub service_name: String,
    pub environment: Environment,
    pub description: Option<String>,
    pub contact_email: Option<String>,
    pub is_trusted: bool,
    pub scopes: Vec<String>,
    pub rate_limit_per_minute: Option<u32>,
    pub rate_limit_per_hour: Option<u32>,
    pub rate_limit_scope: LimitScope,
    pub allowed_ips: Vec<String>,
    pub tls_identities: Vec<String>,
    pub disabled: bool,
    /// The OAuth2 client id: the service id.
    pub client_id: String,
    pub access_token_lifetime: u32,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    pub keys: Vec<KeyView>,
    pub client_secrets: Vec<KeyView>,
}

impl ServiceView {
    pub fn of(s: ServiceRecord, now: i64) -> ServiceView {
        ServiceView {
            keys: s.keys.iter().map(|k| KeyView::of(k, now)).collect(),
            client_secrets: s.secrets.iter().map(|k| KeyView::of(k, now)).collect(),
            client_id: s.id.clone(),
            access_token_lifetime: s.access_token_lifetime,
            service_id: s.id,
            service_name: s.name,
            environment: s.environment,
            description: s.description,
            contact_email: s.contact_email,
            is_trusted: s.is_trusted,
            scopes: s.scopes,
            rate_limit_per_minute: s.rate_limit_per_minute,
            rate_limit_per_hour: s.rate_limit_per_hour,
            rate_limit_scope: s.rate_limit_scope,
            allowed_ips: s.allowed_ips,
            tls_identities: s.tls_identities,
            disabled: s.disabled,
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
        }
    }
}

/// 201 body of a create: the service plus its first key and client secret, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    #[serde(flatten)]
    pub service: ServiceView,
    pub api_key: String,
    pub key_id: String,
    pub client_secret: String,
    pub client_secret_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EndedKey {
    pub key_id: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Rotated {
    pub service_id: String,
    pub api_key: String,
    pub key_id: String,
    /// The new key's own expiry, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    /// When the previously active keys stop working (the latest of them).
    #[schema(format = DateTime)]
    pub old_keys_expire_at: Option<String>,
    pub old_keys: Vec<EndedKey>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SecretRotated {
    pub service_id: String,
    pub client_id: String,
    pub client_secret: String,
    pub client_secret_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(format = DateTime)]
    pub old_secrets_expire_at: Option<String>,
    pub old_secrets: Vec<EndedKey>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Page {
    pub services: Vec<ServiceView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Services per page, 1..=200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Only services whose id is this, or whose name holds it (ASCII letters compared
    /// without case).
    #[param(max_length = 200)]
    pub search: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SyncParams {
    /// The version the sidecar holds: answer with the changes since (a delta).
    pub after: Option<u64>,
    /// The epoch of the version in `after`; another epoch gets a full snapshot.
    pub epoch: Option<String>,
    /// Seconds to hold the request open until something changes (long poll).
    pub wait: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(json: &str) -> Result<NewService, ApiError> {
        serde_json::from_str::<CreateService>(json)
            .map_err(|e| ApiError::bad_request(e.to_string()))?
            .validate()
    }

    #[test]
    fn create_validation() {
        let ok = create(r#"{"service_name":" Billing Service ","scopes":["user:read"],"allowed_ips":["10.1.2.3/8","192.168.0.1"]}"#).unwrap();
        assert_eq!(ok.name, "Billing Service");
        assert_eq!(ok.environment, Environment::Live);
        assert_eq!(ok.allowed_ips, vec!["10.0.0.0/8", "192.168.0.1/32"]);
        for bad in [
            r#"{"service_name":""}"#,
            r#"{"service_name":"   "}"#,
            r#"{"service_name":"x","scopes":["a::b"]}"#,
            r#"{"service_name":"x","scopes":["a:b","a:b"]}"#,
            r#"{"service_name":"x","allowed_ips":["10.0.0.0/33"]}"#,
            r#"{"service_name":"x","rate_limit_per_minute":0}"#,
            r#"{"service_name":"x","rate_limit_per_minute":-1}"#,
            r#"{"service_name":"x","environment":"prod"}"#,
            r#"{"service_name":"x","contact_email":"nope"}"#,
            r#"{"service_name":"x","surprise":1}"#,
            r#"{"service_name":"x\ny"}"#,
            r#"{"scopes":[]}"#,
        ] {
            assert!(create(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn patch_distinguishes_null_from_absent() {
        let p: PatchService = serde_json::from_str(r#"{"rate_limit_per_minute":null}"#).unwrap();
        assert_eq!(p.validate().unwrap().rate_limit_per_minute, Some(None));
        let p: PatchService = serde_json::from_str(r#"{"disabled":true}"#).unwrap();
        assert_eq!(p.validate().unwrap().rate_limit_per_minute, None);
        let p: PatchService = serde_json::from_str(r#"{}"#).unwrap();
        assert!(p.validate().is_err());
    }
}
