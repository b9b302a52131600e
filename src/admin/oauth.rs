//! OAuth2 on the admin plane: the client credentials grant (RFC 6749 §4.4) minting RFC 9068
//! JWTs, JWKS (RFC 7517), server metadata (RFC 8414), introspection (RFC 7662) and revocation
//! (RFC 7009).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use crate::admin::auth::{self, Actor};
use crate::admin::error::ApiError;
use crate::admin::extract::FormBody;
use crate::admin::model::MAX_TOKEN_LIFETIME;
use crate::admin::storage::TokenClientNow;
use crate::admin::throttle;
use crate::admin::AppState;
use crate::core::ids;
use crate::core::jwt::{self, AccessClaims, Expectations};
use crate::core::key::{self, KeyHash};
use crate::core::scope::{Scope, ScopeSet};
use crate::core::snapshot::parse_cidrs;

const BASIC_CHALLENGE: &str = "Basic realm=\"permiso\"";

fn oauth_error(status: StatusCode, code: &'static str, description: impl Into<String>) -> ApiError {
    ApiError::new(status, code, description)
}

fn invalid_request(d: impl Into<String>) -> ApiError {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_request", d)
}

fn invalid_client() -> ApiError {
    oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "client authentication failed",
    )
    .with_challenge(BASIC_CHALLENGE)
}

/// Client credentials as presented, by one method only (RFC 6749 §2.3).
struct ClientCredentials {
    client_id: String,
    secret: String,
}

fn form_decode(s: &str) -> Option<String> {
    // RFC 6749 §2.3.1: Basic credentials are form-urlencoded before base64.
    let wrapped = format!("v={s}");
    form_urlencoded::parse(wrapped.as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
}

fn basic_credentials(headers: &HeaderMap) -> Result<Option<ClientCredentials>, ApiError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| invalid_client())?;
    let Some((scheme, rest)) = v.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let decoded = STANDARD.decode(rest.trim()).map_err(|_| invalid_client())?;
    let text = String::from_utf8(decoded).map_err(|_| invalid_client())?;
    let (id, secret) = text.split_once(':').ok_or_else(invalid_client)?;
    Ok(Some(ClientCredentials {
        client_id: form_decode(id).ok_or_else(invalid_client)?,
        secret: form_decode(secret).ok_or_else(invalid_client)?,
    }))
}

fn client_credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<Option<ClientCredentials>, ApiError> {
    let basic = basic_credentials(headers)?;
    let post = form.get("client_secret").map(|secret| ClientCredentials {
        client_id: form.get("client_id").cloned().unwrap_or_default(),
        secret: secret.clone(),
    });
    match (basic, post) {
        (Some(_), Some(_)) => Err(invalid_request("use one client authentication method, not both")),
        (Some(b), None) => {
            if form.get("client_id").is_some_and(|id| *id != b.client_id) {
                return Err(invalid_request(
                    "client_id in the body differs from the authenticated client",
                ));
            }
            Ok(Some(b))
        }
        (None, p) => Ok(p),
    }
}

/// The token endpoint's general per-address limit (every request counts).
fn throttle<K: std::hash::Hash + Eq + Clone>(
    limiter: &governor::DefaultKeyedRateLimiter<K>,
    key: &K,
) -> Result<(), ApiError> {
    use governor::clock::{Clock, DefaultClock};
    limiter.check_key(key).map_err(|not_until| {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        ApiError::rate_limited(wait.as_secs() + 1)
    })
}

/// A client whose secret checked out.
struct AuthenticatedClient {
    service_id: String,
    record: crate::admin::storage::ClientRecord,
}

/// Checks a client secret. Only failures are counted, per (client, address) and per address,
/// and only those keys are refused (429) once over their limit: a client using its secret
/// correctly from an address that has not failed is never throttled by what others try with
/// its id, which is not secret (it is every token's `sub`).
async fn authenticate_client(
    st: &AppState,
    c: ClientCredentials,
    peer: IpAddr,
) -> Result<AuthenticatedClient, ApiError> {
    let now = st.clock.now_secs();
    let addr = throttle::bucket(peer);
    let pair = (c.client_id.clone(), throttle::exact(peer));
    let blocked = st
        .client_pair_failures
        .blocked(&pair, now)
        .or_else(|| st.client_addr_failures.blocked(&addr, now));
    if let Some(retry) = blocked {
        st.metrics.auth_throttled();
        return Err(ApiError::rate_limited(retry));
    }
    let malformed = !ids::looks_like_id(&c.client_id, ids::SERVICE_ID_PREFIX) || c.secret.len() > 256;
    let record = if malformed {
        None
    } else {
        let hash = KeyHash::of(&c.secret);
        let id = c.client_id.clone();
        st.db(st.store.authenticate_client(&id, &hash, now)).await?
    };
    match record {
        Some(record) => Ok(AuthenticatedClient {
            service_id: c.client_id,
            record,
        }),
        None => {
            let reason = if malformed {
                "malformed client credentials"
            } else {
                "wrong client secret"
            };
            tracing::warn!(reason, source = %peer, "client authentication failed");
            st.metrics.auth_failed();
            // A malformed id is the caller's text of any length: it counts against the
            // address only, never as a key of its own.
            if !malformed {
                st.client_pair_failures.record(pair, now);
            }
            st.client_addr_failures.record(addr, now);
            // The client id is only named when it is well-formed (it is the caller's text).
            let target = (!malformed).then_some(c.client_id);
            auth::audit_failure(st, Some(peer), reason, target).await;
            Err(invalid_client())
        }
    }
}

fn ip_allowed(allowed: &[String], ip: IpAddr) -> bool {
    crate::core::snapshot::ip_allowed(&parse_cidrs(allowed), Some(ip))
}

/// The requested scope must be a subset of what the client holds; none requested means all.
fn granted_scope(requested: Option<&String>, held: &ScopeSet) -> Result<String, ApiError> {
    let Some(req) = requested else {
        return Ok(held.joined());
    };
    let mut out: Vec<Scope> = Vec::new();
    for s in req.split(' ').filter(|s| !s.is_empty()) {
        let scope = Scope::parse(s).map_err(|_| {
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                format!(
                    "{s:?} is not a valid scope; scopes are space-separated, as in \"trade:read account:read\""
                ),
            )
        })?;
        if !held.allows(scope.as_str()) {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                // The client is authenticated here: naming its own scopes tells it nothing new.
                format!(
                    "the client may not request {s:?}; it may request: {}",
                    held.joined()
                ),
            ));
        }
        if !out.contains(&scope) {
            out.push(scope);
        }
    }
    Ok(crate::core::scope::join(&out))
}

/// `{"cnf": null}` is dropped: unbound tokens have no confirmation at all.
trait StripNullCnf {
    fn pipe_strip_null_cnf(self) -> Self;
}

impl StripNullCnf for Json<Value> {
    fn pipe_strip_null_cnf(mut self) -> Self {
        if self.0["cnf"].is_null() {
            if let Some(o) = self.0.as_object_mut() {
                o.remove("cnf");
            }
        }
        self
    }
}

/// RFC 8705 §2.1 `tls_client_auth`: the client names itself with `client_id` and proves it
/// with the verified certificate of the connection, one of whose identities must be among
/// the client's `tls_identities`. Failures count like wrong secrets.
async fn authenticate_tls_client(
    st: &AppState,
    client_id: &str,
    cert: &crate::core::peer::PeerCert,
    peer: IpAddr,
) -> Result<AuthenticatedClient, ApiError> {
    let now = st.clock.now_secs();
    let addr = throttle::bucket(peer);
    if let Some(retry) = st.client_addr_failures.blocked(&addr, now) {
        st.metrics.auth_throttled();
        return Err(ApiError::rate_limited(retry));
    }
    let record = if ids::looks_like_id(client_id, ids::SERVICE_ID_PREFIX) {
        let id = client_id.to_string();
        st.db(async {
            match st.store.get_service(&id).await {
                Ok(r) => Ok(Some(r)),
                Err(crate::admin::storage::StoreError::NotFound) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await?
    } else {
        None
    };
    match record {
        Some(record) if record.tls_identities.iter().any(|i| cert.identities.contains(i)) => {
            Ok(AuthenticatedClient {
                service_id: client_id.to_string(),
                record: crate::admin::storage::ClientRecord {
                    is_trusted: record.is_trusted,
                    service_id: record.id,
                    scopes: record.scopes,
                    disabled: record.disabled,
                    allowed_ips: record.allowed_ips,
                    access_token_lifetime: record.access_token_lifetime,
                },
            })
        }
        _ => {
            tracing::warn!(source = %peer, "client certificate authentication failed");
            st.metrics.auth_failed();
            st.client_addr_failures.record(addr, now);
            let target = ids::looks_like_id(client_id, ids::SERVICE_ID_PREFIX).then(|| client_id.to_string());
            auth::audit_failure(
                st,
                Some(peer),
                "client certificate not among the client's identities",
                target,
            )
            .await;
            Err(invalid_client())
        }
    }
}

async fn issue(
    st: AppState,
    peer: SocketAddr,
    peer_cert: Option<crate::http_server::PeerCertificate>,
    headers: HeaderMap,
    form: HashMap<String, String>,
    grant_required: bool,
) -> Result<Response, ApiError> {
    let cert = peer_cert.map(|c| crate::tls::peer::read_peer_cert(&c.0));
    throttle(&st.ip_limiter, &peer.ip())?;
    match form.get("grant_type").map(String::as_str) {
        None if grant_required => return Err(invalid_request("grant_type is required")),
        None | Some("client_credentials") => {}
        Some(other) => {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant_type {other:?} is not supported; use client_credentials"),
            ))
        }
    }
    let client = match (client_credentials(&headers, &form)?, &cert, form.get("client_id")) {
        (Some(creds), _, _) => authenticate_client(&st, creds, peer.ip()).await?,
        (None, Some(cert), Some(id)) => authenticate_tls_client(&st, id, cert, peer.ip()).await?,
        _ => return Err(invalid_client()),
    };
    if client.record.disabled {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "the client is disabled",
        ));
    }
    if !ip_allowed(&client.record.allowed_ips, peer.ip()) {
        tracing::warn!(client_id = %client.service_id, ip = %peer.ip(), "token refused: address not allowed");
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "the client may not request tokens from this address",
        ));
    }
    let held = ScopeSet::parse(&client.record.scopes).map_err(ApiError::internal)?;
    let scope = granted_scope(form.get("scope"), &held)?;
    let now = st.clock.now_secs();
    let lifetime = i64::from(client.record.access_token_lifetime);
    let claims = AccessClaims {
        iss: st.issuer.clone(),
        sub: client.service_id.clone(),
        aud: st.cfg.token_audience.clone(),
        exp: now + lifetime,
        iat: now,
        nbf: now,
        jti: ids::new_jti(),
        client_id: client.service_id.clone(),
        scope: scope.clone(),
        // RFC 8705 §3: a token asked for over a connection with a client certificate is
        // bound to that certificate, whatever authenticated the client.
        cnf: cert.as_ref().map(|c| jwt::Confirmation {
            x5t_s256: c.x5t_s256.clone(),
        }),
        is_trusted: client.record.is_trusted,
    };
    let ring = st.keyring.load();
    let signer = ring
        .signer_at(now)
        .ok_or_else(|| ApiError::internal("no active signing key"))?;
    let token = signer.sign(&claims).map_err(ApiError::internal)?;
    st.metrics.token_issued();
    tracing::info!(client_id = %client.service_id, jti = %claims.jti, kid = %signer.kid, scope = %scope, "access token issued");
    let mut resp = Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": lifetime,
        "scope": scope,
    }))
    .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// `POST /oauth/token`: the client credentials grant (RFC 6749 §4.4).
#[utoipa::path(
    post, path = "/oauth/token", tag = "oauth",
    request_body(content = crate::admin::openapi::TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, body = crate::admin::openapi::TokenResponse,
         headers(("Cache-Control" = String, description = "no-store"))),
        crate::admin::openapi::OAuthErrors
    ),
    security((), ("client_basic" = []))
)]
pub async fn token(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    cert: Option<axum::Extension<crate::http_server::PeerCertificate>>,
    headers: HeaderMap,
    FormBody(form): FormBody,
) -> Result<Response, ApiError> {
    issue(st, peer, cert.map(|c| c.0), headers, form, true).await
}

/// `POST /auth/service-token`: the same grant for clients written against the seed documents,
/// where `grant_type` may be omitted.
#[utoipa::path(
    post, path = "/auth/service-token", tag = "oauth",
    request_body(content = crate::admin::openapi::TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, body = crate::admin::openapi::TokenResponse,
         headers(("Cache-Control" = String, description = "no-store"))),
        crate::admin::openapi::OAuthErrors
    ),
    security((), ("client_basic" = []))
)]
pub async fn service_token(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    cert: Option<axum::Extension<crate::http_server::PeerCertificate>>,
    headers: HeaderMap,
    FormBody(form): FormBody,
) -> Result<Response, ApiError> {
    issue(st, peer, cert.map(|c| c.0), headers, form, false).await
}

/// `GET /.well-known/jwks.json`: every published token-verification key.
#[utoipa::path(
    get, path = "/.well-known/jwks.json", tag = "oauth",
    responses((status = 200, body = crate::admin::openapi::Jwks)),
    security(())
)]
pub async fn jwks(State(st): State<AppState>) -> Response {
    let now = st.clock.now_secs();
    let keys: Vec<Value> = st
        .keyring
        .load()
        .published(now, i64::from(MAX_TOKEN_LIFETIME))
        .into_iter()
        .map(
            |k| json!({"kty": "OKP", "crv": "Ed25519", "x": k.x, "kid": k.kid, "alg": "EdDSA", "use": "sig"}),
        )
        .collect();
    let mut resp = Json(json!({ "keys": keys })).into_response();
    // Verifiers may cache the set for as long as a new key waits before it signs.
    let max_age = st.cfg.signing_key_publish_delay.as_secs();
    if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={max_age}")) {
        resp.headers_mut().insert(header::CACHE_CONTROL, v);
    }
    resp
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
#[utoipa::path(
    get, path = "/.well-known/oauth-authorization-server", tag = "oauth",
    responses((status = 200, body = crate::admin::openapi::ServerMetadata)),
    security(())
)]
pub async fn metadata(State(st): State<AppState>) -> Json<Value> {
    let iss = &st.issuer;
    let methods = ["client_secret_basic", "client_secret_post"];
    // Certificates reach the token endpoint only when the listener asks for them.
    let mtls = st
        .cfg
        .tls
        .as_ref()
        .is_some_and(|t| t.client_auth != crate::tls::ClientAuth::Off);
    let token_methods: Vec<&str> = methods
        .iter()
        .copied()
        .chain(mtls.then_some("tls_client_auth"))
        .collect();
    Json(json!({
        "tls_client_certificate_bound_access_tokens": mtls,
        "issuer": iss,
        "token_endpoint": format!("{iss}/oauth/token"),
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "introspection_endpoint": format!("{iss}/oauth/introspect"),
        "revocation_endpoint": format!("{iss}/oauth/revoke"),
        "grant_types_supported": ["client_credentials"],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": token_methods,
        "introspection_endpoint_auth_methods_supported": methods,
        "revocation_endpoint_auth_methods_supported": methods,
        "access_token_signing_alg_values_supported": ["EdDSA"],
    }))
}

/// Who is calling introspection or revocation.
enum Caller {
    Admin,
    /// `privileged`: holds the endpoint's scope (`token:introspect`, `token:revoke`), so it may
    /// act on other services' tokens where the endpoint allows that.
    Client {
        id: String,
        privileged: bool,
    },
}

impl Caller {
    /// May this caller learn about, or act on, a token of `owner`?
    fn may_see(&self, owner: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Client { id, privileged } => *privileged || id == owner,
        }
    }

    fn audit(&self, source: SocketAddr) -> crate::admin::storage::Audit {
        crate::admin::storage::Audit {
            actor: match self {
                Caller::Admin => "admin-key".to_string(),
                Caller::Client { id, .. } => format!("client:{id}"),
            },
            source_ip: Some(source.ip().to_string()),
        }
    }
}

/// A client (Basic or post), a service key holding `bearer_scope` (Bearer), or the admin key.
/// A client authenticated by its secret is privileged when it holds `bearer_scope` too.
async fn caller(
    st: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    bearer_scope: &str,
) -> Result<Caller, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "));
    if headers.contains_key(auth::ADMIN_KEY_HEADER) || bearer {
        return match auth::authenticate(headers, Some(peer.ip()), st, bearer_scope)
            .await?
            .actor
        {
            Actor::AdminKey => Ok(Caller::Admin),
            Actor::Service { service_id, .. } => Ok(Caller::Client {
                id: service_id,
                privileged: true,
            }),
        };
    }
    let creds = client_credentials(headers, form)?.ok_or_else(invalid_client)?;
    let client = authenticate_client(st, creds, peer.ip()).await?;
    if client.record.disabled {
        return Err(invalid_client());
    }
    let held = ScopeSet::parse(&client.record.scopes).map_err(ApiError::internal)?;
    Ok(Caller::Client {
        id: client.service_id,
        privileged: held.allows(bearer_scope),
    })
}

/// Verifies one of our JWTs as the admin plane sees it now (published keys, revocation, its
/// client enabled), with that client's scopes and trust as they are now.
async fn active_claims(
    st: &AppState,
    token: &str,
) -> Result<Option<(AccessClaims, TokenClientNow)>, ApiError> {
    let now = st.clock.now_secs();
    let keys = st.keyring.load().verifier(now, i64::from(MAX_TOKEN_LIFETIME));
    let want = Expectations {
        issuer: &st.issuer,
        audience: &st.cfg.token_audience,
        leeway_secs: 0,
    };
    let Ok(c) = jwt::verify(token, &keys, &want, now) else {
        return Ok(None);
    };
    let (jti, client, iat) = (c.jti.clone(), c.client_id.clone(), c.iat);
    let (revoked, client_now) = st
        .db(async {
            Ok((
                st.store.token_revoked(&jti).await?,
                st.store.token_client(&client, iat).await?,
            ))
        })
        .await?;
    Ok(client_now.filter(|_| !revoked).map(|now| (c, now)))
}

fn inactive() -> Json<Value> {
    Json(json!({ "active": false }))
}

/// `POST /oauth/introspect` (RFC 7662).
#[utoipa::path(
    post, path = "/oauth/introspect", tag = "oauth",
    request_body(content = crate::admin::openapi::TokenParam, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = crate::admin::openapi::Introspection), crate::admin::openapi::OAuthErrors),
    security(("admin_key" = []), ("service_key" = []), ("client_basic" = []))
)]
pub async fn introspect(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    FormBody(form): FormBody,
) -> Result<Json<Value>, ApiError> {
    // Without token:introspect a client learns about its own tokens only; anything else is
    // exactly {"active": false}, like an unknown token.
    let who = caller(&st, peer, &headers, &form, "token:introspect").await?;
    let token = form
        .get("token")
        .ok_or_else(|| invalid_request("token is required"))?;
    if jwt::looks_like_jwt(token) {
        let (c, svc) = match active_claims(&st, token).await? {
            Some((c, svc)) if who.may_see(&c.client_id) => (c, svc),
            _ => return Ok(inactive()),
        };
        // What the token may do now, as the sidecar judges it: the scopes its service still
        // holds, trusted only while the service is (RFC 7662 §2.2 leaves "active" and what
        // it carries to the server; an answer wider than the sidecar's would let a
        // standalone resource server accept what the sidecar refuses).
        let held = ScopeSet::parse(&svc.scopes).unwrap_or_default();
        let scope = held.still_held(c.scope.split(' ')).join(" ");
        return Ok(Json(json!({
            "active": true,
            "scope": scope,
            "client_id": c.client_id,
            "sub": c.sub,
            "aud": c.aud,
            "iss": c.iss,
            "exp": c.exp,
            "iat": c.iat,
            "nbf": c.nbf,
            "jti": c.jti,
            "is_trusted": c.is_trusted && svc.is_trusted,
            "token_type": "Bearer",
            // RFC 8705 §3.2: a bound token's confirmation.
            "cnf": c.cnf,
        }))
        .pipe_strip_null_cnf());
    }
    let Ok(parsed) = key::parse(token) else {
        return Ok(inactive());
    };
    let hash = parsed.hash();
    let now = st.clock.now_secs();
    Ok(match st.db(st.store.key_info(&hash, now)).await? {
        Some(info) if who.may_see(&info.service_id) => {
            let mut v = json!({
                "active": true,
                "scope": info.scopes.join(" "),
                "client_id": info.service_id,
                // As the sidecar: a key of a trusted service is trusted.
                "is_trusted": info.is_trusted,
                "sub": info.service_id,
                "iat": info.created_at,
                "token_type": "Bearer",
            });
            if let Some(e) = info.expires_at {
                v["exp"] = json!(e);
            }
            Json(v)
        }
        _ => inactive(),
    })
}

/// `POST /oauth/revoke` (RFC 7009). A client may revoke its own tokens and keys; the admin key
/// any. Unknown, invalid or someone else's tokens get the same 200, so the endpoint cannot be
/// used to probe tokens.
#[utoipa::path(
    post, path = "/oauth/revoke", tag = "oauth",
    request_body(content = crate::admin::openapi::TokenParam, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "Revoked, or nothing to revoke (the same answer)"), crate::admin::openapi::OAuthErrors),
    security(("admin_key" = []), ("service_key" = []), ("client_basic" = []))
)]
pub async fn revoke(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    FormBody(form): FormBody,
) -> Result<Response, ApiError> {
    let who = caller(&st, peer, &headers, &form, "token:revoke").await?;
    let audit = who.audit(peer);
    let token = form
        .get("token")
        .ok_or_else(|| invalid_request("token is required"))?;
    // Revocation stays owner-only for clients, whatever they hold (RFC 7009 §2.1).
    let owner = match &who {
        Caller::Admin => None,
        Caller::Client { id, .. } => Some(id.clone()),
    };
    let now = st.clock.now_secs();
    if jwt::looks_like_jwt(token) {
        if let Some((c, _)) = active_claims(&st, token).await? {
            if owner.as_deref().is_none_or(|o| o == c.client_id) {
                let (jti, client) = (c.jti.clone(), c.client_id.clone());
                let audit = audit.clone();
                if let Some(v) = st
                    .db(st.store.revoke_token(&jti, &client, c.exp, now, &audit))
                    .await?
                {
                    st.published(v);
                    tracing::info!(jti = %c.jti, client_id = %c.client_id, "access token revoked");
                }
            }
        }
    } else if let Ok(parsed) = key::parse(token) {
        let hash = parsed.hash();
        if let Some(v) = st
            .db(st.store.revoke_key_by_hash(&hash, owner.as_deref(), now, &audit))
            .await?
        {
            st.published(v);
            tracing::info!("api key revoked through /oauth/revoke");
        }
    }
    Ok(StatusCode::OK.into_response())
}
