//! The wire format sidecars pull from `GET /v1/sync`, also the format of the snapshot file.
//! It carries key hashes and policies, never keys.

use crate::ratelimit::LimitScope;
use serde::{Deserialize, Serialize};

use crate::key::Environment;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SyncPayload {
    /// Identifies the admin plane's database; versions are only comparable within one epoch.
    pub epoch: String,
    /// The version this payload brings the receiver to.
    pub version: u64,
    /// True: `services` is everything. False: `services` replaces just those services.
    pub full: bool,
    pub services: Vec<SyncService>,
    /// `iss` of the access tokens this admin plane mints.
    #[serde(default)]
    pub issuer: String,
    /// Every published token-verification key (always complete, also in deltas).
    #[serde(default)]
    pub signing_keys: Vec<SyncSigningKey>,
    /// Every revoked, not yet expired access token (always complete, also in deltas).
    #[serde(default)]
    pub revoked_tokens: Vec<SyncRevokedToken>,
    /// The admin plane's wall clock (Unix ms) when it built this payload, right after the
    /// change it carries; the sidecar reports the difference as its sync lag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_at_ms: Option<i64>,
    /// Only in a sidecar's snapshot file: the instance id it reports to the admin plane,
    /// kept across restarts. Ignored in what the admin plane sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

/// Header a sidecar sends on every sync request: `SidecarReport` as compact JSON.
pub const SIDECAR_HEADER: &str = "permiso-sidecar";

/// Who a sidecar is, as it tells the admin plane on every sync request: the fleet view,
/// propagation checks and the scope catalog are built from these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SidecarReport {
    /// Generated once, kept in the snapshot file.
    pub instance_id: String,
    /// The permiso build (`CARGO_PKG_VERSION`).
    pub build: String,
    pub environment: Environment,
    /// The service it protects (host:port).
    pub upstream: String,
    /// "enforce" or "shadow" (the sidecar-wide mode).
    pub mode: String,
    pub routes: Vec<RouteReport>,
    /// Routes left out to keep the header small.
    #[serde(default, skip_serializing_if = "is_false")]
    pub routes_truncated: bool,
}

/// One protected route as reported (public routes are left out: they require nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RouteReport {
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub trusted: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
}

impl SidecarReport {
    /// Checks what the admin plane stores and shows: bounded sizes, plain characters, scopes
    /// that parse.
    pub fn validate(&self) -> Result<(), String> {
        let plain = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x21..0x7f).contains(&b))
        };
        if !plain(&self.instance_id, 64)
            || !self
                .instance_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err("instance_id must be 1 to 64 letters, digits, '_' or '-'".into());
        }
        if !plain(&self.build, 64) || !plain(&self.upstream, 255) {
            return Err("build and upstream must be short printable strings".into());
        }
        if self.mode != "enforce" && self.mode != "shadow" {
            return Err("mode must be enforce or shadow".into());
        }
        if self.routes.len() > MAX_REPORTED_ROUTES {
            return Err(format!("at most {MAX_REPORTED_ROUTES} routes"));
        }
        self.routes.iter().try_for_each(RouteReport::validate)
    }
}

impl RouteReport {
    /// One route's share of `SidecarReport::validate`; a sidecar leaves out the routes that
    /// fail it rather than have its sync refused.
    pub fn validate(&self) -> Result<(), String> {
        let plain = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x21..0x7f).contains(&b))
        };
        if !plain(&self.prefix, 1024) || !self.prefix.starts_with('/') {
            return Err("a route prefix is 1 to 1024 visible characters starting with '/'".into());
        }
        if self.methods.len() > 32 || self.methods.iter().any(|m| !plain(m, 32)) {
            return Err("route methods are short tokens".into());
        }
        if self.scopes.is_empty() || self.scopes.len() > 64 {
            return Err("a reported route requires 1 to 64 scopes".into());
        }
        crate::scope::ScopeSet::parse(&self.scopes).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Routes a report carries at most.
pub const MAX_REPORTED_ROUTES: usize = 256;

/// An Ed25519 verification key, as in its JWK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SyncSigningKey {
    pub kid: String,
    /// base64url of the 32-byte public key.
    pub x: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SyncRevokedToken {
    pub jti: String,
    /// The token's own `exp`: the entry is useless after it.
    pub expires_at: i64,
}

/// One service with its whole policy and every key that may still authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SyncService {
    pub service_id: String,
    pub service_name: String,
    pub environment: Environment,
    pub scopes: Vec<String>,
    pub disabled: bool,
    pub rate_limit_per_minute: Option<u32>,
    pub rate_limit_per_hour: Option<u32>,
    /// Where the limits are counted; absent means `sidecar` (what every sidecar did before
    /// the shared limiter existed, so an older payload still reads the same).
    #[serde(default, skip_serializing_if = "LimitScope::is_sidecar")]
    pub rate_limit_scope: LimitScope,
    pub allowed_ips: Vec<String>,
    /// Access tokens issued (`iat`) before this are refused: the service was disabled since.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens_not_before: i64,
    pub keys: Vec<SyncKey>,
    /// Client-certificate identities that authenticate as this service (canonical spelling,
    /// `core::peer`); each belongs to one service at most.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_identities: Vec<String>,
    /// Routes marked `trusted = true` admit this service (seed 002's "trusted service client").
    #[serde(default, skip_serializing_if = "is_false")]
    pub is_trusted: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SyncKey {
    pub key_id: String,
    /// Lower-case hex blake3 of the key.
    pub hash: String,
    /// Unix seconds after which the key no longer works: the end of a rotation grace window
    /// or the key's own expiry, whichever comes first.
    pub expires_at: Option<i64>,
    /// Set when the key was rotated out: the end of its grace window (`expires_at` is this or
    /// the key's own earlier expiry). Requests made with such a key are flagged as grace-key
    /// use; when this is what ends the key the reason is `grace_ended`, else `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ends_at: Option<i64>,
}
