//! The wire format sidecars pull from `GET /v1/sync`, also the format of the snapshot file.
//! It carries key hashes and policies, never keys.

use crate::ratelimit::LimitScope;
use serde::{Deserialize, Serialize};

use crate::key::Environment;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// An Ed25519 verification key, as in its JWK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSigningKey {
    pub kid: String,
    /// base64url of the 32-byte public key.
    pub x: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRevokedToken {
    pub jti: String,
    /// The token's own `exp`: the entry is useless after it.
    pub expires_at: i64,
}

/// One service with its whole policy and every key that may still authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
