//! The admin plane's OpenAPI 3.1 document: assembled by utoipa from the `#[utoipa::path]`
//! annotations beside each handler and the schemas derived on the bodies they read and write,
//! so the contract is the code's. Served at `GET /openapi.json`; `permiso openapi` writes it
//! to `docs/openapi.json` (a test keeps that file equal to what the code generates), and the
//! contract test fuzzes the live admin plane from it with schemathesis.
//!
//! The response sets below are the refusals an endpoint can give, each with the one JSON body
//! (`ErrorBody`); the bodies that handlers build as JSON values are described here as types.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::admin::error::ErrorBody;

/// Refusals of an authenticated admin read with query parameters.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ReadErrors {
    #[response(
        status = 400,
        description = "A query parameter is malformed, unknown or out of range"
    )]
    BadRequest(ErrorBody),
    #[response(
        status = 401,
        description = "No admin key, or a wrong one (send it as X-Admin-Api-Key)",
        headers(("WWW-Authenticate" = String, description = "The Bearer challenge"))
    )]
    Unauthorized(ErrorBody),
    #[response(
        status = 403,
        description = "A service key without the scope this endpoint needs"
    )]
    Forbidden(ErrorBody),
    #[response(status = 404, description = "What the path names does not exist")]
    NotFound(ErrorBody),
    #[response(
        status = 429,
        description = "Too many failed admin-key attempts from this address; on /v1/sync also too many syncs open for one credential",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    TooMany(ErrorBody),
    #[response(
        status = 500,
        description = "Something failed on our side (logged); nothing was written"
    )]
    Internal(ErrorBody),
    #[response(
        status = 503,
        description = "The database is unavailable; nothing was written",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    Unavailable(ErrorBody),
}

/// Refusals of an admin write: those of a read, and those of a request body.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum WriteErrors {
    #[response(
        status = 400,
        description = "The body or a parameter is invalid; nothing was written"
    )]
    BadRequest(ErrorBody),
    #[response(
        status = 401,
        description = "No admin key, or a wrong one (send it as X-Admin-Api-Key)",
        headers(("WWW-Authenticate" = String, description = "The Bearer challenge"))
    )]
    Unauthorized(ErrorBody),
    #[response(
        status = 403,
        description = "A service key without the scope this endpoint needs"
    )]
    Forbidden(ErrorBody),
    #[response(status = 404, description = "What the path names does not exist")]
    NotFound(ErrorBody),
    #[response(status = 408, description = "The body did not arrive in time")]
    Timeout(ErrorBody),
    #[response(
        status = 409,
        description = "The change conflicts with the current state (a name taken, a key already ended)"
    )]
    Conflict(ErrorBody),
    #[response(status = 413, description = "The body exceeds admin_plane.max_body_bytes")]
    TooLarge(ErrorBody),
    #[response(status = 415, description = "The body is not application/json")]
    MediaType(ErrorBody),
    #[response(
        status = 429,
        description = "Too many failed admin-key attempts from this address",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    TooMany(ErrorBody),
    #[response(
        status = 500,
        description = "Something failed on our side (logged); nothing was written"
    )]
    Internal(ErrorBody),
    #[response(
        status = 503,
        description = "The database is unavailable; nothing was written",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    Unavailable(ErrorBody),
}

/// Refusals of the OAuth endpoints (RFC 6749 §5.2, RFC 7009, RFC 7662).
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum OAuthErrors {
    #[response(
        status = 400,
        description = "invalid_request, invalid_grant, invalid_scope (the description lists the scopes the client may ask for) or unsupported_grant_type"
    )]
    BadRequest(ErrorBody),
    #[response(
        status = 401,
        description = "invalid_client: the client could not be authenticated",
        headers(("WWW-Authenticate" = String, description = "The Basic challenge"))
    )]
    Unauthorized(ErrorBody),
    #[response(
        status = 403,
        description = "The credential may not use this endpoint (scope, source address)"
    )]
    Forbidden(ErrorBody),
    #[response(status = 408, description = "The body did not arrive in time")]
    Timeout(ErrorBody),
    #[response(status = 413, description = "The body exceeds admin_plane.max_body_bytes")]
    TooLarge(ErrorBody),
    #[response(
        status = 429,
        description = "Too many requests or failed client authentications",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    TooMany(ErrorBody),
    #[response(status = 500, description = "Something failed on our side (logged)")]
    Internal(ErrorBody),
    #[response(
        status = 503,
        description = "The database is unavailable",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    Unavailable(ErrorBody),
}

/// A scope as the admin API takes it (`core::scope::Scope::parse`): segments of letters,
/// digits, `_`, `.` and `-` separated by `:`; a last `*` grants every action under the rest.
/// At most 128 characters.
#[derive(ToSchema)]
#[schema(pattern = "^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*(:[*])?$")]
#[allow(dead_code)]
pub struct ScopeName(String);

/// The form of `POST /oauth/token` (RFC 6749 §4.4). Client credentials go in HTTP Basic
/// (preferred) or in the form; a client certificate may stand in for the secret
/// (`tls_client_auth`, RFC 8705).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TokenForm {
    /// `client_credentials` (optional on `/auth/service-token`).
    pub grant_type: Option<String>,
    /// Space-separated scopes, a subset of the client's; default all of them.
    pub scope: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// RFC 6749 §5.1.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TokenResponse {
    /// A JWT (RFC 9068) signed with EdDSA.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds.
    pub expires_in: u64,
    pub scope: String,
}

/// The form of `POST /oauth/introspect` and `POST /oauth/revoke`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TokenParam {
    /// An access token or an API key.
    pub token: String,
    pub token_type_hint: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// RFC 7662 §2.2: `{"active": false}` for anything the caller may not see, or the claims.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Introspection {
    pub active: bool,
    pub scope: Option<String>,
    pub client_id: Option<String>,
    pub sub: Option<String>,
    pub aud: Option<String>,
    pub iss: Option<String>,
    pub exp: Option<i64>,
    pub iat: Option<i64>,
    pub nbf: Option<i64>,
    pub jti: Option<String>,
    pub is_trusted: Option<bool>,
    pub token_type: Option<String>,
    /// RFC 8705 §3.2: the certificate a bound token is tied to.
    #[schema(value_type = Option<Object>)]
    pub cnf: Option<serde_json::Value>,
}

/// One published Ed25519 key (RFC 8037).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub kid: String,
    pub alg: String,
    #[schema(rename = "use")]
    pub use_: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// RFC 8414.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ServerMetadata {
    pub issuer: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    pub introspection_endpoint: String,
    pub revocation_endpoint: String,
    pub grant_types_supported: Vec<String>,
    pub response_types_supported: Vec<String>,
    pub token_endpoint_auth_methods_supported: Vec<String>,
    pub introspection_endpoint_auth_methods_supported: Vec<String>,
    pub revocation_endpoint_auth_methods_supported: Vec<String>,
    pub access_token_signing_alg_values_supported: Vec<String>,
    pub tls_client_certificate_bound_access_tokens: bool,
}

/// One access-token signing key.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SigningKeyView {
    pub kid: String,
    /// signing (signs new tokens), pending (published, signs from `activates_at`),
    /// retired_published (no longer signs; published while its tokens live), retired.
    #[schema(pattern = "^(signing|pending|retired_published|retired)$")]
    pub status: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub activates_at: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SigningKeys {
    /// The key new tokens are signed with (none before the first one activates).
    pub signing_kid: Option<String>,
    pub published_kids: Vec<String>,
    pub keys: Vec<SigningKeyView>,
    /// After a rotation: the new key, when it starts signing, and the sync version.
    pub new_kid: Option<String>,
    #[schema(format = DateTime)]
    pub new_key_signs_from: Option<String>,
    pub version: Option<u64>,
}

/// What `POST /v1/usage` did with a report.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UsageRecorded {
    pub received: u64,
    /// Keys whose last use moved forward.
    pub updated: u64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Ready {
    pub ready: bool,
    /// Why not, when not.
    pub reason: Option<String>,
}

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "admin_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Admin-Api-Key",
                "The admin key (PERMISO_ADMIN_API_KEY)",
            ))),
        );
        c.add_security_scheme(
            "service_key",
            SecurityScheme::Http(Http::builder().scheme(HttpAuthScheme::Bearer).description(Some(
                "A service's API key holding the endpoint's scope (admin:*, sync:read, token:introspect, token:revoke)",
            )).build()),
        );
        c.add_security_scheme(
            "client_basic",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Permiso admin plane",
        description = "Service accounts, API keys, the OAuth2 server and the sync feed of Permiso's sidecars. Every refusal is JSON {\"error\", \"error_description\"} and writes nothing.",
        license(name = "Apache-2.0")
    ),
    paths(
        crate::admin::services::create,
        crate::admin::services::list,
        crate::admin::services::show,
        crate::admin::services::patch,
        crate::admin::services::disable,
        crate::admin::services::rotate,
        crate::admin::services::rotate_secret,
        crate::admin::services::revoke,
        crate::admin::services::patch_key,
        crate::admin::keys::list,
        crate::admin::audit::list,
        crate::admin::fleet::list,
        crate::admin::fleet::change,
        crate::admin::fleet::scopes,
        crate::admin::signing_keys::list,
        crate::admin::signing_keys::rotate,
        crate::admin::oauth::token,
        crate::admin::oauth::service_token,
        crate::admin::oauth::introspect,
        crate::admin::oauth::revoke,
        crate::admin::oauth::jwks,
        crate::admin::oauth::metadata,
        crate::admin::sync::sync,
        crate::admin::usage::report,
        crate::admin::healthz,
        crate::admin::readyz,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Security),
    tags(
        (name = "services", description = "Service accounts, their API keys and client secrets"),
        (name = "audit", description = "The hash-chained audit log"),
        (name = "fleet", description = "The sidecars syncing from this admin plane"),
        (name = "oauth", description = "OAuth2 client credentials, introspection, revocation, keys"),
        (name = "sync", description = "What sidecars pull and report"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

/// The document as served and written to docs/openapi.json (pretty, with a final newline).
pub fn document() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published copy is what the code generates (`permiso openapi --out docs/openapi.json`
    /// after changing an endpoint).
    #[test]
    fn docs_openapi_json_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        let published = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            published == document(),
            "docs/openapi.json differs from the code's document: run `permiso openapi --out docs/openapi.json`"
        );
    }

    #[test]
    fn the_document_is_openapi_3_1_and_covers_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/auth/admin/services",
            "/auth/admin/services/{id}",
            "/auth/admin/services/{id}/rotate",
            "/auth/admin/services/{id}/secret/rotate",
            "/auth/admin/services/{id}/keys/{key_id}/revoke",
            "/auth/admin/services/{id}/keys/{key_id}",
            "/auth/admin/keys",
            "/auth/admin/audit",
            "/auth/admin/sidecars",
            "/auth/admin/changes/{version}",
            "/auth/admin/scopes",
            "/auth/admin/signing-keys",
            "/auth/admin/signing-keys/rotate",
            "/oauth/token",
            "/auth/service-token",
            "/oauth/introspect",
            "/oauth/revoke",
            "/.well-known/jwks.json",
            "/.well-known/oauth-authorization-server",
            "/v1/sync",
            "/v1/usage",
            "/healthz",
            "/readyz",
        ] {
            assert!(paths.contains_key(p), "{p} is not in the document");
        }
        // Every operation documents its refusals with the one error body.
        for (path, ops) in paths {
            for (method, op) in ops.as_object().unwrap() {
                if path == "/healthz" || path == "/readyz" || path.starts_with("/.well-known") {
                    continue;
                }
                let four = op["responses"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(s, _)| s.starts_with('4'))
                    .count();
                assert!(four > 0, "{method} {path} documents no refusal");
            }
        }
    }
}
