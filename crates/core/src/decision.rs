//! The whole allow/deny decision for one request, as a checklist of pure steps:
//! canonical path → route → authenticate (API key or JWT) → authorize → rate-limit. Each
//! returns `Result<_, Denial>`. What passes carries the path to forward, so the upstream reads
//! the path that was routed and no other.
//!
//! The rate limit is the last step and may need a round trip (the shared limiter), so the
//! checklist is split there: `admit` runs everything before it and hands back a `Pending`
//! when a limit applies; any `limiter::RateLimiter` answers; `Pending::finish` judges the
//! answer. `decide` is the whole checklist with this sidecar's own (local) limiter.
//!
//! Shadow mode (`Route::shadow`, `RouteTable::shadow`): a would-be denial is forwarded with
//! `Pass::shadow` naming it. A denial that belongs to one route (scope, trust) follows that
//! route's mode; one that belongs to the whole request (no credential, a bad one, the source
//! address, the rate limit, no snapshot) is shadowed only when every route judging the
//! request is in shadow mode: enforcement wins. Malformed requests (unsafe paths, duplicate
//! or non-ASCII credentials) are refused in every mode: they guard the upstream's parser,
//! not a policy being rolled out.

use std::net::IpAddr;
use std::sync::Arc;

use crate::denial::{BadRequest, Denial, InvalidToken};
use crate::jwt::{self, Expectations, JwtError};
use crate::key::{self, Environment};
use crate::key_id::KeyId;
use crate::limiter::{Local, Outcome, Refused};
use crate::path;
use crate::ratelimit::RateStatus;
use crate::routes::{Access, Route, RouteTable};
use crate::scope::{Scope, ScopeSet};
use crate::snapshot::{ServiceEntry, Snapshot};
use crate::token_cache::{TokenCache, VerifiedToken};

/// What the proxy extracted from the request; borrowed, nothing copied.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// As received (the path of the request target, without the query).
    pub path: &'a str,
    pub authorization: Authorization<'a>,
    pub client_ip: Option<IpAddr>,
    /// The verified client certificate of the connection, if any.
    pub peer: Option<&'a crate::peer::PeerCert>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorization<'a> {
    Absent,
    One(&'a [u8]),
    Several,
}

/// How the caller proved who it is.
#[derive(Debug, Clone)]
pub enum Credential {
    /// `slot` indexes the key's usage marks in its service entry.
    ApiKey {
        key_id: KeyId,
        slot: u32,
        /// A rotated-out key still in its grace window.
        grace: bool,
    },
    AccessToken(Arc<VerifiedToken>),
    /// A verified client certificate carrying `identity`, mapped to the service.
    ClientCert {
        identity: Arc<str>,
    },
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone)]
pub struct Principal {
    pub service: Arc<ServiceEntry>,
    pub credential: Credential,
}

impl Principal {
    /// An API key acts with its service's scopes; a token with the scopes it was granted that
    /// its service still holds. A scope the admin removed after the token was issued is not
    /// passed on: the route checks no longer honour it, and an upstream checking scopes itself
    /// must not either. The common case (nothing removed) is the header built at verification.
    pub fn scopes_header(&self) -> std::borrow::Cow<'_, http::HeaderValue> {
        use std::borrow::Cow;
        match &self.credential {
            Credential::ApiKey { .. } | Credential::ClientCert { .. } => {
                Cow::Borrowed(&self.service.scopes_header)
            }
            Credential::AccessToken(t) => {
                let held = &self.service.scopes;
                if t.scopes.iter().all(|s| held.allows(s.as_str())) {
                    return Cow::Borrowed(&t.scopes_header);
                }
                let kept = held.still_held(t.scopes.iter().map(Scope::as_str));
                Cow::Owned(
                    http::HeaderValue::from_str(&kept.join(" "))
                        .unwrap_or(http::HeaderValue::from_static("")),
                )
            }
        }
    }

    /// Whether the caller is a trusted service: the service's flag now and, for an access
    /// token, also its `is_trusted` claim (a token never grants more than its service holds).
    pub fn trusted(&self) -> bool {
        self.service.trusted
            && match &self.credential {
                Credential::AccessToken(t) => t.is_trusted,
                Credential::ApiKey { .. } | Credential::ClientCert { .. } => true,
            }
    }

    /// An API key in its rotation grace window made the request.
    pub fn grace_key(&self) -> bool {
        matches!(self.credential, Credential::ApiKey { grace: true, .. })
    }

    /// Counts an allowed request for its service and marks the key used (atomics only).
    pub fn record_use(&self, now_secs: i64) {
        let slot = match &self.credential {
            Credential::ApiKey { slot, .. } => Some(*slot),
            Credential::AccessToken(_) | Credential::ClientCert { .. } => None,
        };
        self.service.usage.record(slot, now_secs);
    }

    /// Key id or token id, for headers and logs.
    pub fn credential_id(&self) -> &str {
        match &self.credential {
            Credential::ApiKey { key_id, .. } => key_id,
            Credential::AccessToken(t) => &t.jti,
            Credential::ClientCert { identity } => identity,
        }
    }
}

/// How this sidecar checks access tokens.
#[derive(Clone, Copy)]
pub struct TokenPolicy<'a> {
    pub audience: &'a str,
    pub leeway_secs: i64,
    pub cache: Option<&'a TokenCache>,
}

#[derive(Debug, Clone)]
pub enum Verdict {
    /// A public route: forward without identity, and without the caller's `Authorization`
    /// unless the route says otherwise.
    Public { forward_authorization: bool },
    Allowed {
        principal: Principal,
        rate: RateStatus,
        /// `X-Permiso-Client-Cert-Identity`: the identity of the connection's certificate
        /// that belongs to the calling service, when there is one.
        cert_identity: Option<http::HeaderValue>,
    },
}

/// A request that may be forwarded.
#[derive(Debug, Clone)]
pub struct Pass {
    pub verdict: Verdict,
    /// The canonical path to forward instead of the received one; `None` when they are equal.
    pub rewritten_path: Option<Box<str>>,
    /// Shadow mode: the denial this request would have had (the first one found).
    pub shadow: Option<Denial>,
}

/// The Bearer token in an Authorization header, if the scheme is Bearer.
pub fn bearer_token(auth: Authorization<'_>) -> Result<Option<&str>, Denial> {
    let raw = match auth {
        Authorization::Absent => return Ok(None),
        Authorization::Several => return Err(Denial::BadRequest(BadRequest::DuplicateAuthorization)),
        Authorization::One(raw) => raw,
    };
    let text = std::str::from_utf8(raw)
        .ok()
        .filter(|t| t.is_ascii())
        .ok_or(Denial::BadRequest(BadRequest::AuthorizationNotAscii))?;
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        // Another scheme (Basic, ...) is "no usable credential" per RFC 6750 §3.1.
        return Ok(None);
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() {
        return Err(Denial::InvalidToken(InvalidToken::Malformed));
    }
    Ok(Some(token))
}

/// Checks the key against the snapshot and the sidecar's clock (grace ends hold offline too).
pub fn authenticate(
    snapshot: &Snapshot,
    environment: Environment,
    token: &str,
    now_secs: i64,
) -> Result<Principal, Denial> {
    let parsed = key::parse(token).map_err(|e| Denial::InvalidToken(e.into()))?;
    if parsed.environment != environment {
        return Err(Denial::InvalidToken(InvalidToken::WrongEnvironment));
    }
    let entry = snapshot
        .lookup(&parsed.hash())
        .ok_or(Denial::InvalidToken(InvalidToken::Unknown))?;
    if entry.expires_at().is_some_and(|end| now_secs >= end) {
        return Err(Denial::InvalidToken(if entry.ends_by_grace() {
            InvalidToken::GraceEnded
        } else {
            InvalidToken::Expired
        }));
    }
    if entry.service.disabled {
        return Err(Denial::InvalidToken(InvalidToken::ServiceDisabled));
    }
    Ok(Principal {
        service: entry.service.clone(),
        credential: Credential::ApiKey {
            key_id: entry.key_id.clone(),
            slot: entry.slot,
            grace: entry.grace,
        },
    })
}

fn jwt_denial(e: JwtError) -> Denial {
    Denial::InvalidToken(InvalidToken::Jwt(e))
}

/// Verifies an access token locally (cache first), then finds its client in the snapshot.
pub fn authenticate_token(
    snapshot: &Snapshot,
    environment: Environment,
    token: &str,
    policy: &TokenPolicy<'_>,
    now_secs: i64,
) -> Result<Principal, Denial> {
    let tokens = &snapshot.tokens;
    let cache_key = policy.cache.map(|_| TokenCache::key(token));
    let cached = match (policy.cache, &cache_key) {
        (Some(c), Some(k)) => c.get(k),
        _ => None,
    };
    let (verified, to_cache) = match cached {
        Some(v) => {
            // Re-judge what can change after verification: keys, issuer, time.
            if v.iss != tokens.issuer {
                return Err(jwt_denial(JwtError::WrongIssuer));
            }
            if v.aud != policy.audience {
                return Err(jwt_denial(JwtError::WrongAudience));
            }
            if !tokens.keys.contains(&v.kid) {
                return Err(jwt_denial(JwtError::UnknownKid));
            }
            jwt::check_time(v.exp, v.nbf, policy.leeway_secs, now_secs).map_err(jwt_denial)?;
            (v, None)
        }
        None => {
            let want = Expectations {
                issuer: &tokens.issuer,
                audience: policy.audience,
                leeway_secs: policy.leeway_secs,
            };
            let (c, kid) = jwt::verify_with_kid(token, &tokens.keys, &want, now_secs).map_err(jwt_denial)?;
            let scope_list: Vec<&str> = c.scope.split(' ').filter(|s| !s.is_empty()).collect();
            let scopes = ScopeSet::parse(&scope_list).map_err(|_| jwt_denial(JwtError::Malformed))?;
            let header =
                |v: &str| http::HeaderValue::from_str(v).map_err(|_| jwt_denial(JwtError::Malformed));
            let (scopes_header, jti_header) = (header(&scopes.joined())?, header(&c.jti)?);
            let v = Arc::new(VerifiedToken {
                cnf_x5t: c.cnf.map(|c| Arc::from(c.x5t_s256.as_str())),
                is_trusted: c.is_trusted,
                iss: c.iss,
                aud: c.aud,
                kid,
                client_id: Arc::from(c.client_id.as_str()),
                jti: Arc::from(c.jti.as_str()),
                exp: c.exp,
                nbf: c.nbf,
                iat: c.iat,
                scopes_header,
                jti_header,
                scopes,
            });
            (v, cache_key)
        }
    };
    if tokens.revoked.contains(&*verified.jti) {
        return Err(jwt_denial(JwtError::Revoked));
    }
    // Cached only once known not revoked: the sync evicts revoked tokens, and replaying one
    // must not put it back.
    if let (Some(cache), Some(k)) = (policy.cache, to_cache) {
        cache.insert(k, verified.clone());
    }
    let service = snapshot
        .service(&verified.client_id)
        .ok_or(Denial::InvalidToken(InvalidToken::UnknownClient))?;
    if service.environment != environment {
        return Err(Denial::InvalidToken(InvalidToken::WrongEnvironment));
    }
    if service.disabled {
        return Err(Denial::InvalidToken(InvalidToken::ServiceDisabled));
    }
    // Issued before the service was last disabled: dead for good, even once it is re-enabled.
    if verified.iat < service.tokens_not_before {
        return Err(jwt_denial(JwtError::Revoked));
    }
    Ok(Principal {
        service: service.clone(),
        credential: Credential::AccessToken(verified),
    })
}

/// Source address first (the service may not call from there at all), then trust, then
/// scopes.
pub fn authorize(principal: &Principal, route: &Route, client_ip: Option<IpAddr>) -> Result<(), Denial> {
    if !principal.service.ip_allowed(client_ip) {
        return Err(Denial::IpNotAllowed);
    }
    if route.trusted && !principal.trusted() {
        return Err(Denial::NotTrusted);
    }
    if let Access::Scopes(needed) = &route.access {
        // A token never grants more than its service holds now, even if the admin narrowed
        // the service after the token was issued.
        let token_ok = match &principal.credential {
            Credential::ApiKey { .. } | Credential::ClientCert { .. } => true,
            Credential::AccessToken(t) => t.scopes.allows_all(needed),
        };
        if !token_ok || !principal.service.scopes.allows_all(needed) {
            return Err(Denial::InsufficientScope {
                required: route.scope_attr.clone(),
            });
        }
    }
    Ok(())
}

/// The checklist up to the rate limit.
pub enum Admission {
    /// Decided: public, or a caller without limits.
    Pass(Pass),
    /// Allowed if the caller's service's limits allow one more request.
    Limit(Pending),
}

/// A denial, with the caller when it was identified before it (scope, address, trusted, rate
/// limit): the access log names who was refused. Pre-authentication denials carry nobody.
#[derive(Debug)]
pub struct Refusal {
    pub denial: Denial,
    pub caller: Option<Box<Principal>>,
}

impl Refusal {
    fn of(denial: Denial, caller: Principal) -> Refusal {
        Refusal {
            denial,
            caller: Some(Box::new(caller)),
        }
    }
}

impl From<Denial> for Refusal {
    fn from(denial: Denial) -> Refusal {
        Refusal { denial, caller: None }
    }
}

/// An authenticated, authorized request waiting for a limiter's answer.
#[derive(Debug)]
pub struct Pending {
    principal: Principal,
    cert_identity: Option<http::HeaderValue>,
    rewritten_path: Option<Box<str>>,
    shadow: Option<Denial>,
    /// The limit is enforced: some route judging the request enforces and nothing was
    /// shadowed before it. Otherwise the request is counted in the service's shadow count.
    enforced: bool,
}

impl Pending {
    /// The service whose limits apply.
    pub fn service(&self) -> &Arc<ServiceEntry> {
        &self.principal.service
    }

    /// Counted in `ServiceEntry::shadow_limiter` (`Local::shadow_outcome`), never against
    /// enforced quota.
    pub fn is_shadow(&self) -> bool {
        !self.enforced
    }

    /// The last step: the limiter's answer decides.
    pub fn finish(self, outcome: Outcome) -> Result<Pass, Refusal> {
        let mut shadow = self.shadow;
        let rate = match outcome {
            Ok(rate) => rate,
            Err(r) => {
                let denial = match r {
                    Refused::Exceeded(e) => Denial::RateLimited(e),
                    Refused::Unavailable => Denial::LimiterUnavailable,
                };
                if self.enforced {
                    return Err(Refusal::of(denial, self.principal));
                }
                shadow.get_or_insert(denial);
                RateStatus::default()
            }
        };
        Ok(Pass {
            verdict: Verdict::Allowed {
                principal: self.principal,
                rate,
                cert_identity: self.cert_identity,
            },
            rewritten_path: self.rewritten_path,
            shadow,
        })
    }
}

/// The checklist before the rate limit. `snapshot` is None before the first sync: protected
/// routes fail closed.
pub fn admit(
    routes: &RouteTable,
    snapshot: Option<&Snapshot>,
    environment: Environment,
    req: &RequestFacts<'_>,
    now_nanos: u64,
    tokens: &TokenPolicy<'_>,
) -> Result<Admission, Refusal> {
    if req.method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(Denial::BadRequest(BadRequest::MethodCase).into());
    }
    let canonical = path::canonicalize(req.path).map_err(|e| Denial::BadRequest(BadRequest::Path(e)))?;
    let judged = judge(routes, snapshot, environment, req, &canonical, now_nanos, tokens)?;
    let rewritten_path = match canonical {
        std::borrow::Cow::Borrowed(_) => None,
        std::borrow::Cow::Owned(p) => Some(p.into_boxed_str()),
    };
    Ok(match judged {
        Judged::Public {
            forward_authorization,
        } => Admission::Pass(Pass {
            verdict: Verdict::Public {
                forward_authorization,
            },
            rewritten_path,
            shadow: None,
        }),
        // Nobody identified: forwarded as received, the caller's credential included (during
        // a rollout the upstream may still check its own).
        Judged::Shadowed(denial) => Admission::Pass(Pass {
            verdict: Verdict::Public {
                forward_authorization: true,
            },
            rewritten_path,
            shadow: Some(denial),
        }),
        Judged::Authenticated {
            principal,
            cert_identity,
            shadow,
            ..
        } if principal.service.limits.is_unlimited() => Admission::Pass(Pass {
            verdict: Verdict::Allowed {
                principal,
                rate: RateStatus::default(),
                cert_identity,
            },
            rewritten_path,
            shadow,
        }),
        Judged::Authenticated {
            principal,
            cert_identity,
            shadow,
            enforced,
        } => Admission::Limit(Pending {
            principal,
            cert_identity,
            rewritten_path,
            shadow,
            enforced,
        }),
    })
}

/// The whole checklist, with this sidecar's own count as the limiter (the denial alone; the
/// sidecar itself goes through `admit` to log who was refused).
pub fn decide(
    routes: &RouteTable,
    snapshot: Option<&Snapshot>,
    environment: Environment,
    req: &RequestFacts<'_>,
    now_nanos: u64,
    tokens: &TokenPolicy<'_>,
) -> Result<Pass, Denial> {
    match admit(routes, snapshot, environment, req, now_nanos, tokens).map_err(|r| r.denial)? {
        Admission::Pass(p) => Ok(p),
        Admission::Limit(p) => {
            let outcome = if p.is_shadow() {
                Local::shadow_outcome(p.service(), now_nanos)
            } else {
                Local::outcome(p.service(), now_nanos)
            };
            p.finish(outcome).map_err(|r| r.denial)
        }
    }
}

/// What `judge` leaves for the limiter step.
enum Judged {
    Public {
        forward_authorization: bool,
    },
    Authenticated {
        principal: Principal,
        cert_identity: Option<http::HeaderValue>,
        shadow: Option<Denial>,
        enforced: bool,
    },
    /// A would-be denial before anyone was identified, let through in shadow mode.
    Shadowed(Denial),
}

fn judge(
    routes: &RouteTable,
    snapshot: Option<&Snapshot>,
    environment: Environment,
    req: &RequestFacts<'_>,
    canonical_path: &str,
    now_nanos: u64,
    tokens: &TokenPolicy<'_>,
) -> Result<Judged, Refusal> {
    let Some(judgement) = routes.judge(req.method, canonical_path) else {
        return match routes.shadow() {
            true => Ok(Judged::Shadowed(Denial::NoRoute)),
            false => Err(Denial::NoRoute.into()),
        };
    };
    let mut required = judgement.required(req.method, canonical_path).peekable();
    if required.peek().is_none() {
        return Ok(Judged::Public {
            forward_authorization: judgement.public.is_some_and(|r| r.forward_authorization),
        });
    }
    // Whether a denial of the whole request (or its limit) is enforced. A table without shadow
    // routes answers at once: the request path in enforce mode never walks the table twice.
    let enforced =
        || !routes.any_shadow() || judgement.required(req.method, canonical_path).any(|r| !r.shadow);
    let (principal, by_cert) = match identify(snapshot, environment, req, now_nanos, tokens) {
        Ok(found) => found,
        Err(d) if matches!(d, Denial::BadRequest(_)) || enforced() => return Err(d.into()),
        Err(d) => return Ok(Judged::Shadowed(d)),
    };
    let mut shadow = None;
    for route in required {
        match authorize(&principal, route, req.client_ip) {
            Ok(()) => {}
            // The source address is the service's rule, not the route's.
            Err(d @ Denial::IpNotAllowed) if enforced() => return Err(Refusal::of(d, principal)),
            Err(d) if d != Denial::IpNotAllowed && !route.shadow => return Err(Refusal::of(d, principal)),
            Err(d) => {
                shadow.get_or_insert(d);
            }
        }
    }
    let cert_identity = by_cert.map(|(s, i)| s.identity_headers[i].clone());
    let enforced = shadow.is_none() && enforced();
    Ok(Judged::Authenticated {
        principal,
        cert_identity,
        shadow,
        enforced,
    })
}

/// The service a client certificate maps to, with the index of its matching identity.
type CertService = (Arc<ServiceEntry>, usize);

/// Who calls: the bearer credential, else a client certificate mapped to a service; with the
/// certificate's service when there is one.
fn identify(
    snapshot: Option<&Snapshot>,
    environment: Environment,
    req: &RequestFacts<'_>,
    now_nanos: u64,
    tokens: &TokenPolicy<'_>,
) -> Result<(Principal, Option<CertService>), Denial> {
    let token = bearer_token(req.authorization)?;
    if token.is_none() && req.peer.is_none() {
        return Err(Denial::MissingCredential);
    }
    let snapshot = snapshot.ok_or(Denial::NoSnapshot)?;
    let now_secs = (now_nanos / 1_000_000_000) as i64;
    let by_cert = match req.peer {
        Some(p) => certificate_service(snapshot, p)?,
        None => None,
    };
    // A bearer credential decides who calls; a certificate mapped to a service must then be
    // that service's. Without one, a mapped certificate is the credential.
    let principal = match (token, &by_cert) {
        (Some(token), _) => {
            let p = if jwt::looks_like_jwt(token) {
                authenticate_token(snapshot, environment, token, tokens, now_secs)?
            } else {
                authenticate(snapshot, environment, token, now_secs)?
            };
            // RFC 8705 §3: a bound token only over the connection of its certificate.
            if let Credential::AccessToken(t) = &p.credential {
                if let Some(x5t) = &t.cnf_x5t {
                    if req.peer.is_none_or(|peer| peer.x5t_s256 != **x5t) {
                        return Err(Denial::InvalidToken(InvalidToken::CertificateBinding));
                    }
                }
            }
            if by_cert.as_ref().is_some_and(|(s, _)| s.id != p.service.id) {
                return Err(Denial::InvalidToken(InvalidToken::CertificateOfAnotherService));
            }
            p
        }
        (None, Some((service, i))) => authenticate_certificate(service, *i, environment)?,
        (None, None) => return Err(Denial::MissingCredential),
    };
    Ok((principal, by_cert))
}

/// The one service the certificate's identities belong to (with the index of the matching
/// identity in that service's list), None when none does, refused when several do.
fn certificate_service(
    snapshot: &Snapshot,
    peer: &crate::peer::PeerCert,
) -> Result<Option<(Arc<ServiceEntry>, usize)>, Denial> {
    let mut found: Option<(Arc<ServiceEntry>, usize)> = None;
    for identity in &peer.identities {
        let Some(service) = snapshot.service_by_identity(identity) else {
            continue;
        };
        match &found {
            Some((s, _)) if s.id != service.id => {
                return Err(Denial::InvalidToken(InvalidToken::CertificateAmbiguous))
            }
            Some(_) => {}
            None => {
                let i = service
                    .tls_identities
                    .iter()
                    .position(|x| **x == **identity)
                    .expect("the identity map and the service agree");
                found = Some((service.clone(), i));
            }
        }
    }
    Ok(found)
}

/// A certificate mapped to `service` (its identity number `i`) as the credential.
fn authenticate_certificate(
    service: &Arc<ServiceEntry>,
    i: usize,
    environment: Environment,
) -> Result<Principal, Denial> {
    if service.environment != environment {
        return Err(Denial::InvalidToken(InvalidToken::WrongEnvironment));
    }
    if service.disabled {
        return Err(Denial::InvalidToken(InvalidToken::ServiceDisabled));
    }
    Ok(Principal {
        service: service.clone(),
        credential: Credential::ClientCert {
            identity: service.tls_identities[i].clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::NewKey;
    use crate::scope::Scope;
    use crate::snapshot::fixtures::{service, sync_key};
    use crate::sync::SyncPayload;

    const NOW: u64 = 1_800_000_000 * 1_000_000_000;

    struct Fixture {
        routes: RouteTable,
        snap: Snapshot,
        key: NewKey,
        other_env_key: NewKey,
    }

    fn fixture(tweak: impl FnOnce(&mut crate::sync::SyncService)) -> Fixture {
        let key = key::generate(Environment::Live);
        let other_env_key = key::generate(Environment::Test);
        let mut s = service("srv_a", &["trade:*"], vec![sync_key("key_1", &key)]);
        tweak(&mut s);
        let payload = SyncPayload {
            epoch: "e".into(),
            version: 1,
            full: true,
            services: vec![s],
            ..Default::default()
        };
        let routes = RouteTable::new(vec![
            Route::new(vec![], "/health".into(), Access::Public),
            Route::new(
                vec![],
                "/api/v1/trades".into(),
                Access::Scopes(vec![Scope::parse("trade:open").unwrap()]),
            ),
            Route::new(
                vec![],
                "/api/v1/account".into(),
                Access::Scopes(vec![Scope::parse("account:read").unwrap()]),
            ),
        ]);
        Fixture {
            routes,
            snap: Snapshot::from_full(&payload, Environment::Live, None).unwrap(),
            key,
            other_env_key,
        }
    }

    /// A GET of `path` from `ip` with this Authorization value, if any.
    fn get_facts<'a>(path: &'a str, auth: Option<&'a [u8]>, ip: &str) -> RequestFacts<'a> {
        RequestFacts {
            method: "GET",
            path,
            authorization: auth.map_or(Authorization::Absent, Authorization::One),
            client_ip: Some(ip.parse().unwrap()),
            peer: None,
        }
    }

    fn run(f: &Fixture, path: &str, auth: Option<String>, ip: &str, now: u64) -> Result<Verdict, Denial> {
        let header = auth.map(|a| a.into_bytes());
        let facts = get_facts(path, header.as_deref(), ip);
        decide(
            &f.routes,
            Some(&f.snap),
            Environment::Live,
            &facts,
            now,
            &NO_TOKENS,
        )
        .map(|p| p.verdict)
    }

    /// A client certificate: alone it is the credential of the service its identity maps
    /// to; beside a bearer credential it must be that credential's service's; identities of
    /// two services, or of none, authenticate nothing.
    #[test]
    fn client_certificates_authenticate_as_their_service() {
        let (ka, kb) = (key::generate(Environment::Live), key::generate(Environment::Live));
        let mut a = service("srv_a", &["trade:read"], vec![sync_key("key_a", &ka)]);
        a.tls_identities = vec!["spiffe://permiso/a".into(), "dns:a.internal".into()];
        let mut b = service("srv_b", &["other:read"], vec![sync_key("key_b", &kb)]);
        b.tls_identities = vec!["spiffe://permiso/b".into()];
        let payload = SyncPayload {
            epoch: "e".into(),
            version: 1,
            full: true,
            services: vec![a, b],
            ..Default::default()
        };
        let snap = Snapshot::from_full(&payload, Environment::Live, None).unwrap();
        let routes = RouteTable::new(vec![Route::new(
            vec![],
            "/t".into(),
            Access::Scopes(vec![Scope::parse("trade:read").unwrap()]),
        )]);
        let cert = |ids: &[&str]| crate::peer::PeerCert {
            identities: ids.iter().map(|s| s.to_string()).collect(),
            x5t_s256: "x".into(),
        };
        let run = |peer: Option<&crate::peer::PeerCert>, auth: Option<String>| {
            let header = auth.map(String::into_bytes);
            let facts = RequestFacts {
                method: "GET",
                path: "/t",
                authorization: header
                    .as_deref()
                    .map_or(Authorization::Absent, Authorization::One),
                client_ip: None,
                peer,
            };
            decide(&routes, Some(&snap), Environment::Live, &facts, NOW, &NO_TOKENS).map(|p| p.verdict)
        };
        // The second SAN maps: authenticated as srv_a, identity forwarded.
        let a_cert = cert(&["spiffe://elsewhere/x", "dns:a.internal"]);
        match run(Some(&a_cert), None).unwrap() {
            Verdict::Allowed {
                principal,
                cert_identity,
                ..
            } => {
                assert_eq!(&*principal.service.id, "srv_a");
                assert_eq!(principal.credential_id(), "dns:a.internal");
                assert_eq!(cert_identity.unwrap(), "dns:a.internal");
            }
            v => panic!("{v:?}"),
        }
        // srv_b's certificate: authenticated, but srv_b lacks the route's scope.
        assert!(matches!(
            run(Some(&cert(&["spiffe://permiso/b"])), None),
            Err(Denial::InsufficientScope { .. })
        ));
        // An unmapped certificate is no credential.
        assert_eq!(
            run(Some(&cert(&["spiffe://permiso/z"])), None).unwrap_err(),
            Denial::MissingCredential
        );
        // Identities of two services: refused.
        assert_eq!(
            run(Some(&cert(&["spiffe://permiso/a", "spiffe://permiso/b"])), None).unwrap_err(),
            Denial::InvalidToken(InvalidToken::CertificateAmbiguous)
        );
        // A bearer key decides; over its own service's certificate the identity is forwarded.
        match run(Some(&a_cert), bearer(&ka)).unwrap() {
            Verdict::Allowed {
                principal,
                cert_identity,
                ..
            } => {
                assert_eq!(principal.credential_id(), "key_a");
                assert!(cert_identity.is_some());
            }
            v => panic!("{v:?}"),
        }
        // srv_b's key over srv_a's certificate, or srv_a's key over srv_b's: 401.
        assert_eq!(
            run(Some(&a_cert), bearer(&kb)).unwrap_err(),
            Denial::InvalidToken(InvalidToken::CertificateOfAnotherService)
        );
        assert_eq!(
            run(Some(&cert(&["spiffe://permiso/b"])), bearer(&ka)).unwrap_err(),
            Denial::InvalidToken(InvalidToken::CertificateOfAnotherService)
        );
        // A key over an unmapped certificate: the key decides.
        assert!(run(Some(&cert(&["spiffe://permiso/z"])), bearer(&ka)).is_ok());
        // One identity in two services' lists: the payload is refused whole.
        let mut dup = payload.clone();
        dup.services[1].tls_identities = vec!["dns:a.internal".into()];
        assert!(matches!(
            Snapshot::from_full(&dup, Environment::Live, None),
            Err(crate::snapshot::SnapshotError::DuplicateIdentity(_))
        ));
        let mut odd = payload.clone();
        odd.services[0].tls_identities = vec!["DNS:A.internal".into()];
        assert!(
            Snapshot::from_full(&odd, Environment::Live, None).is_err(),
            "not canonical"
        );
        // A delta that drops srv_a's identities frees them.
        let mut delta = payload.clone();
        delta.full = false;
        delta.version = 2;
        delta.services = vec![payload.services[0].clone()];
        delta.services[0].tls_identities.clear();
        let next = snap.apply_delta(&delta).unwrap();
        assert!(next.service_by_identity("dns:a.internal").is_none());
        assert!(next.service_by_identity("spiffe://permiso/b").is_some());
    }

    const NO_TOKENS: TokenPolicy<'static> = TokenPolicy {
        audience: "permiso",
        leeway_secs: 30,
        cache: None,
    };

    fn bearer(k: &NewKey) -> Option<String> {
        Some(format!("Bearer {}", k.secret.expose()))
    }

    #[test]
    fn allowed_with_identity() {
        let f = fixture(|_| {});
        match run(&f, "/api/v1/trades/1", bearer(&f.key), "127.0.0.1", NOW).unwrap() {
            Verdict::Allowed { principal, .. } => {
                assert_eq!(principal.credential_id(), "key_1");
                assert_eq!(&*principal.service.id, "srv_a");
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            run(&f, "/health", None, "127.0.0.1", NOW),
            Ok(Verdict::Public {
                forward_authorization: false
            })
        ));
    }

    #[test]
    fn recording_a_use_counts_the_request_and_marks_the_key() {
        let f = fixture(|_| {});
        let Ok(Verdict::Allowed { principal, .. }) =
            run(&f, "/api/v1/trades/1", bearer(&f.key), "127.0.0.1", NOW)
        else {
            panic!("allowed expected")
        };
        let usage = &principal.service.usage;
        assert_eq!(usage.requests(), 0, "deciding records nothing by itself");
        principal.record_use(1_800_000_000);
        assert_eq!(usage.requests(), 1);
        let mut marks = Vec::new();
        usage.take_unreported(&mut marks);
        assert_eq!(
            marks,
            [(0, 1_800_000_000)],
            "the key's slot is marked used at that second"
        );
    }

    #[test]
    fn each_denial_in_order() {
        let f = fixture(|_| {});
        let d = |p: &str, a: Option<String>| run(&f, p, a, "127.0.0.1", NOW).unwrap_err();
        assert_eq!(d("/nope", bearer(&f.key)), Denial::NoRoute);
        assert_eq!(d("/api/v1/trades", None), Denial::MissingCredential);
        assert_eq!(
            d("/api/v1/trades", Some("Basic Zm9vOmJhcg==".into())),
            Denial::MissingCredential
        );
        assert_eq!(
            d("/api/v1/trades", Some("Bearer ".into())),
            Denial::InvalidToken(InvalidToken::Malformed)
        );
        assert_eq!(
            d("/api/v1/trades", Some("Bearer svc_live_xyz".into())),
            Denial::InvalidToken(InvalidToken::Malformed)
        );
        let mut typo = f.key.secret.expose().to_string();
        let last = typo.pop().unwrap();
        typo.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(
            d("/api/v1/trades", Some(format!("Bearer {typo}"))),
            Denial::InvalidToken(InvalidToken::BadChecksum)
        );
        assert_eq!(
            d("/api/v1/trades", bearer(&f.other_env_key)),
            Denial::InvalidToken(InvalidToken::WrongEnvironment)
        );
        let stranger = key::generate(Environment::Live);
        assert_eq!(
            d("/api/v1/trades", bearer(&stranger)),
            Denial::InvalidToken(InvalidToken::Unknown)
        );
        assert_eq!(
            d("/api/v1/account", bearer(&f.key)),
            Denial::InsufficientScope {
                required: "account:read".into()
            }
        );
        assert!(matches!(
            d("/health/../api/v1/trades", None),
            Denial::BadRequest(_)
        ));
    }

    #[test]
    fn a_refusal_names_the_caller_only_once_identified() {
        let f = fixture(|_| {});
        let refuse = |p: &str, a: Option<String>| {
            let h = a.map(|a| a.into_bytes());
            let facts = get_facts(p, h.as_deref(), "127.0.0.1");
            match admit(
                &f.routes,
                Some(&f.snap),
                Environment::Live,
                &facts,
                NOW,
                &NO_TOKENS,
            ) {
                Err(r) => r,
                Ok(_) => panic!("{p} admitted"),
            }
        };
        assert!(refuse("/api/v1/trades", None).caller.is_none());
        assert!(
            refuse("/nope", bearer(&f.key)).caller.is_none(),
            "routing comes first"
        );
        let stranger = key::generate(Environment::Live);
        assert!(refuse("/api/v1/trades", bearer(&stranger)).caller.is_none());
        let refusal = refuse("/api/v1/account", bearer(&f.key));
        assert!(matches!(refusal.denial, Denial::InsufficientScope { .. }));
        let caller = refusal.caller.expect("identified before the scope check");
        let Verdict::Allowed { principal, .. } =
            run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).unwrap()
        else {
            panic!("the key passes where it has the scope")
        };
        assert_eq!(
            (caller.service.id.clone(), caller.credential_id()),
            (principal.service.id.clone(), principal.credential_id())
        );
    }

    #[test]
    fn routes_on_the_canonical_path_and_forwards_it() {
        let f = fixture(|_| {});
        let pass = |p: &str, a: Option<String>| {
            let h = a.map(|a| a.into_bytes());
            let facts = get_facts(p, h.as_deref(), "127.0.0.1");
            decide(
                &f.routes,
                Some(&f.snap),
                Environment::Live,
                &facts,
                NOW,
                &NO_TOKENS,
            )
        };
        let p = pass("//api/v1/%74rades/%31", bearer(&f.key)).unwrap();
        assert_eq!(p.rewritten_path.as_deref(), Some("/api/v1/trades/1"));
        assert!(pass("/api/v1/trades/1", bearer(&f.key))
            .unwrap()
            .rewritten_path
            .is_none());
        // Another spelling of a protected prefix is judged by that prefix's route.
        for spelling in [
            "/api/v1/%61ccount",
            "/api/v1/account/%2E%2Ex",
            "/api//v1/account/x",
        ] {
            assert_eq!(
                pass(spelling, bearer(&f.key)).unwrap_err(),
                Denial::InsufficientScope {
                    required: "account:read".into()
                },
                "{spelling}"
            );
        }
        // A case that only matches without regard to case matches no route.
        assert_eq!(
            pass("/API/v1/Account", bearer(&f.key)).unwrap_err(),
            Denial::NoRoute
        );
        // A path under a public prefix that, read without case, is under a protected one needs
        // that one's scopes (and a route that does not match without case gives none).
        let routes = RouteTable::new(vec![
            Route::new(vec![], "/pub".into(), Access::Public),
            Route::new(
                vec![],
                "/pub/secret".into(),
                Access::Scopes(vec![crate::scope::Scope::parse("account:read").unwrap()]),
            ),
        ]);
        let facts = RequestFacts {
            method: "GET",
            path: "/pub/SECRET",
            authorization: Authorization::Absent,
            client_ip: None,
            peer: None,
        };
        assert_eq!(
            decide(&routes, Some(&f.snap), Environment::Live, &facts, NOW, &NO_TOKENS).unwrap_err(),
            Denial::MissingCredential
        );
        // A lower-case method never slips past a method-restricted route.
        for method in ["get", "Get", "pOST"] {
            let facts = RequestFacts {
                method,
                path: "/api/v1/trades",
                authorization: Authorization::Absent,
                client_ip: None,
                peer: None,
            };
            assert_eq!(
                decide(
                    &f.routes,
                    Some(&f.snap),
                    Environment::Live,
                    &facts,
                    NOW,
                    &NO_TOKENS
                )
                .unwrap_err(),
                Denial::BadRequest(BadRequest::MethodCase)
            );
        }
        for bad in [
            "/health/..;/api/v1/trades",
            "/health/%2e%2e;/api/v1/trades",
            "/health/..%3b/api",
        ] {
            assert_eq!(
                pass(bad, None).unwrap_err(),
                Denial::BadRequest(BadRequest::Path(path::PathError::Semicolon)),
                "{bad}"
            );
        }
    }

    /// The checklist's order, where two checks fail at once: the first one is reported.
    #[test]
    fn two_failures_at_once_report_the_first_in_the_checklist() {
        // Outside allowed_ips and lacking the route's scope: the address is judged first.
        let f = fixture(|s| s.allowed_ips = vec!["10.0.0.0/8".into()]);
        assert_eq!(
            run(&f, "/api/v1/account", bearer(&f.key), "127.0.0.1", NOW).unwrap_err(),
            Denial::IpNotAllowed
        );
        // Lacking the scope and over the limit: the scope is judged first, and consumes nothing.
        let f = fixture(|s| s.rate_limit_per_minute = Some(1));
        assert!(run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).is_ok());
        assert!(matches!(
            run(&f, "/api/v1/account", bearer(&f.key), "127.0.0.1", NOW).unwrap_err(),
            Denial::InsufficientScope { .. }
        ));
        // A disabled service's key outside its addresses: invalid before the address.
        let f = fixture(|s| {
            s.disabled = true;
            s.allowed_ips = vec!["10.0.0.0/8".into()];
        });
        assert_eq!(
            run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).unwrap_err(),
            Denial::InvalidToken(InvalidToken::ServiceDisabled)
        );
        // No credential and no key state: the credential is asked for first.
        let facts = RequestFacts {
            method: "GET",
            path: "/api/v1/trades",
            authorization: Authorization::Absent,
            client_ip: None,
            peer: None,
        };
        assert_eq!(
            decide(&f.routes, None, Environment::Live, &facts, NOW, &NO_TOKENS).unwrap_err(),
            Denial::MissingCredential
        );
        // An unsafe path with no route behind it: the path is judged before routing.
        assert!(matches!(
            run(&f, "/nope/../x", None, "127.0.0.1", NOW).unwrap_err(),
            Denial::BadRequest(_)
        ));
    }

    /// A key's end is judged by the sidecar's clock, to the second: its own expiry reads
    /// `expired`, a rotation's grace end `grace_ended`, and the earlier of the two applies.
    #[test]
    fn key_ends_are_judged_by_the_clock() {
        let secs = (NOW / 1_000_000_000) as i64;
        let at = |s: i64| NOW + (s as u64) * 1_000_000_000;
        let cases = [
            (Some(secs + 10), None, 10, InvalidToken::Expired),
            (None, Some(secs + 10), 10, InvalidToken::GraceEnded),
            (Some(secs + 5), Some(secs + 10), 5, InvalidToken::Expired),
            (Some(secs + 10), Some(secs + 5), 5, InvalidToken::GraceEnded),
        ];
        for (own, grace, end, reason) in cases {
            let f = fixture(|s| {
                s.keys[0].expires_at = match (own, grace) {
                    (Some(o), Some(g)) => Some(o.min(g)),
                    (o, g) => o.or(g),
                };
                s.keys[0].grace_ends_at = grace;
            });
            let ok = run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", at(end - 1)).unwrap();
            let Verdict::Allowed { principal, .. } = ok else {
                panic!("allowed expected")
            };
            assert_eq!(principal.grace_key(), grace.is_some(), "{own:?} {grace:?}");
            assert_eq!(
                run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", at(end)).unwrap_err(),
                Denial::InvalidToken(reason),
                "{own:?} {grace:?}"
            );
            // Written to the snapshot file and read back, the key ends the same way.
            let back = Snapshot::from_full(&f.snap.to_payload(), Environment::Live, None).unwrap();
            let f2 = Fixture { snap: back, ..f };
            assert_eq!(
                run(&f2, "/api/v1/trades", bearer(&f2.key), "127.0.0.1", at(end)).unwrap_err(),
                Denial::InvalidToken(reason),
                "{own:?} {grace:?} after a round trip"
            );
        }
    }

    fn trusted_routes() -> RouteTable {
        let mut admin = Route::new(
            vec![],
            "/api/v1/admin".into(),
            Access::Scopes(vec![Scope::parse("trade:open").unwrap()]),
        );
        admin.trusted = true;
        RouteTable::new(vec![admin])
    }

    /// `trusted = true`: the service must be trusted, and a token must say so too.
    #[test]
    fn trusted_routes_admit_trusted_services_only() {
        for (flag, want) in [(true, None), (false, Some(Denial::NotTrusted))] {
            let mut f = fixture(|s| s.is_trusted = flag);
            f.routes = trusted_routes();
            let got = run(&f, "/api/v1/admin/stats", bearer(&f.key), "127.0.0.1", NOW);
            match want {
                None => {
                    let Verdict::Allowed { principal, .. } = got.unwrap() else {
                        panic!("allowed expected")
                    };
                    assert!(principal.trusted());
                }
                Some(d) => assert_eq!(got.unwrap_err(), d),
            }
        }
        // The untrusted caller is refused before its scopes are looked at.
        let mut f = fixture(|s| s.scopes = vec!["other:read".into()]);
        f.routes = trusted_routes();
        assert_eq!(
            run(&f, "/api/v1/admin", bearer(&f.key), "127.0.0.1", NOW).unwrap_err(),
            Denial::NotTrusted
        );
    }

    /// The same table with every route, and the sidecar as a whole, in shadow mode.
    fn shadowed(table: &RouteTable) -> RouteTable {
        let routes = table
            .routes()
            .iter()
            .cloned()
            .map(|mut r| {
                r.shadow = true;
                r
            })
            .collect();
        RouteTable::new(routes).shadowing_unmatched(true)
    }

    fn shadow_run(f: &Fixture, path: &str, auth: Option<String>, ip: &str, now: u64) -> Result<Pass, Denial> {
        let header = auth.map(|a| a.into_bytes());
        let facts = get_facts(path, header.as_deref(), ip);
        decide(
            &shadowed(&f.routes),
            Some(&f.snap),
            Environment::Live,
            &facts,
            now,
            &NO_TOKENS,
        )
    }

    /// Every would-be denial of the checklist, in shadow mode, is forwarded naming it, with
    /// the caller's identity when one was established; malformed requests stay refused.
    #[test]
    fn shadow_mode_forwards_every_would_be_denial() {
        let f = fixture(|s| s.allowed_ips = vec!["127.0.0.0/8".into()]);
        let stranger = key::generate(Environment::Live);
        let mut typo = f.key.secret.expose().to_string();
        let last = typo.pop().unwrap();
        typo.push(if last == 'A' { 'B' } else { 'A' });
        let cases: Vec<(&str, Option<String>, &str, bool)> = vec![
            ("/nope", bearer(&f.key), "127.0.0.1", false),
            ("/api/v1/trades", None, "127.0.0.1", false),
            (
                "/api/v1/trades",
                Some("Bearer svc_live_xyz".into()),
                "127.0.0.1",
                false,
            ),
            (
                "/api/v1/trades",
                Some(format!("Bearer {typo}")),
                "127.0.0.1",
                false,
            ),
            ("/api/v1/trades", bearer(&f.other_env_key), "127.0.0.1", false),
            ("/api/v1/trades", bearer(&stranger), "127.0.0.1", false),
            ("/api/v1/account", bearer(&f.key), "127.0.0.1", true),
            ("/api/v1/trades", bearer(&f.key), "10.9.9.9", true),
        ];
        for (path, auth, ip, identified) in cases {
            let enforced = run(&f, path, auth.clone(), ip, NOW).unwrap_err();
            let pass = shadow_run(&f, path, auth.clone(), ip, NOW)
                .unwrap_or_else(|d| panic!("{path} {auth:?}: shadow mode denied {d:?}"));
            assert_eq!(pass.shadow.as_ref(), Some(&enforced), "{path} {auth:?}");
            match (&pass.verdict, identified) {
                (Verdict::Allowed { principal, .. }, true) => assert_eq!(&*principal.service.id, "srv_a"),
                (
                    Verdict::Public {
                        forward_authorization,
                    },
                    false,
                ) => assert!(forward_authorization),
                (v, _) => panic!("{path}: unexpected verdict {v:?}"),
            }
        }
        // Trust, and no key state at all.
        let mut f2 = fixture(|_| {});
        f2.routes = trusted_routes();
        let pass = shadow_run(&f2, "/api/v1/admin", bearer(&f2.key), "127.0.0.1", NOW).unwrap();
        assert_eq!(pass.shadow, Some(Denial::NotTrusted));
        let h = bearer(&f.key).map(String::into_bytes);
        let facts = get_facts("/api/v1/trades", h.as_deref(), "127.0.0.1");
        let pass = decide(
            &shadowed(&f.routes),
            None,
            Environment::Live,
            &facts,
            NOW,
            &NO_TOKENS,
        )
        .unwrap();
        assert_eq!(pass.shadow, Some(Denial::NoSnapshot));
        // Malformed requests are refused in every mode.
        assert!(matches!(
            shadow_run(&f, "/health/../api/v1/trades", None, "127.0.0.1", NOW),
            Err(Denial::BadRequest(_))
        ));
        // An allowed request carries no shadow denial.
        assert!(shadow_run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW)
            .unwrap()
            .shadow
            .is_none());
    }

    /// A shadowed limit counts in its own cell: shadow traffic over the limit is forwarded
    /// and never spends what the enforced routes allow, and the reverse.
    #[test]
    fn a_shadowed_limit_does_not_consume_enforced_quota() {
        let mut f = fixture(|s| s.rate_limit_per_minute = Some(2));
        // /api/v1/account enforced (the service holds its scope here), /api/v1/trades shadowed.
        let mut trades = Route::new(
            vec![],
            "/api/v1/trades".into(),
            Access::Scopes(vec![Scope::parse("trade:open").unwrap()]),
        );
        trades.shadow = true;
        let account = Route::new(
            vec![],
            "/api/v1/account".into(),
            Access::Scopes(vec![Scope::parse("trade:read").unwrap()]),
        );
        f.routes = RouteTable::new(vec![trades, account]);
        let call = |path: &str| run_pass(&f, path, NOW);
        for _ in 0..5 {
            let p = call("/api/v1/trades").unwrap();
            let _ = p;
        }
        let over = call("/api/v1/trades").unwrap();
        assert!(
            matches!(over.shadow, Some(Denial::RateLimited(_))),
            "{:?}",
            over.shadow
        );
        // The enforced route still has its whole quota, and then refuses.
        assert!(call("/api/v1/account").unwrap().shadow.is_none());
        assert!(call("/api/v1/account").unwrap().shadow.is_none());
        assert!(matches!(call("/api/v1/account"), Err(Denial::RateLimited(_))));
        // A request judged by both an enforced and a shadow route is enforced.
        let mut all = Route::new(
            vec![],
            "/api".into(),
            Access::Scopes(vec![Scope::parse("trade:open").unwrap()]),
        );
        all.shadow = false;
        let mut f2 = fixture(|_| {});
        let mut trades = Route::new(
            vec![],
            "/api/v1/trades".into(),
            Access::Scopes(vec![Scope::parse("other:write").unwrap()]),
        );
        trades.shadow = true;
        f2.routes = RouteTable::new(vec![all, trades]);
        // The shadow route's scope is only flagged; the enforced one still denies a stranger.
        let pass = run_pass(&f2, "/api/v1/trades", NOW).unwrap();
        assert!(matches!(pass.shadow, Some(Denial::InsufficientScope { .. })));
        assert_eq!(
            decide(
                &f2.routes,
                Some(&f2.snap),
                Environment::Live,
                &get_facts("/api/v1/trades", None, "127.0.0.1"),
                NOW,
                &NO_TOKENS
            )
            .unwrap_err(),
            Denial::MissingCredential
        );
    }

    /// Differential, over random requests: enforce mode and shadow mode judge alike. What
    /// enforce denies (a malformed request aside) shadow forwards naming that very denial;
    /// what enforce allows shadow allows unflagged, for the same caller and path.
    #[test]
    fn shadow_mode_mirrors_enforce_mode_on_random_requests() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let f = fixture(|s| s.allowed_ips = vec!["127.0.0.0/8".into()]);
        let shadow = shadowed(&f.routes);
        let stranger = key::generate(Environment::Live);
        let paths = [
            "/api/v1/trades",
            "/api/v1/trades/1",
            "/api/v1/account",
            "/api/v1/account.json",
            "/API/v1/Account",
            "//api/v1/%74rades",
            "/health",
            "/health/x",
            "/health/../api/v1/account",
            "/health/..;/x",
            "/nope",
            "",
        ];
        let auths: Vec<Option<String>> = vec![
            None,
            bearer(&f.key),
            bearer(&f.other_env_key),
            bearer(&stranger),
            Some("Bearer ".into()),
            Some("Basic Zm9vOmJhcg==".into()),
            Some("bearer svc_live_x".into()),
            Some("Bearer \u{e9}".into()),
        ];
        let methods = ["GET", "POST", "HEAD", "DELETE", "get"];
        let ips = ["127.0.0.1", "10.1.1.1", "::1"];
        let who = |p: &Pass| match &p.verdict {
            Verdict::Allowed { principal, .. } => Some(principal.credential_id().to_string()),
            Verdict::Public { .. } => None,
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4000 {
            let auth = auths[rng.random_range(0..auths.len())]
                .clone()
                .map(String::into_bytes);
            let authorization = match (rng.random_range(0..8), &auth) {
                (0, _) => Authorization::Several,
                (_, Some(a)) => Authorization::One(a),
                (_, None) => Authorization::Absent,
            };
            let facts = RequestFacts {
                method: methods[rng.random_range(0..methods.len())],
                path: paths[rng.random_range(0..paths.len())],
                authorization,
                client_ip: Some(ips[rng.random_range(0..ips.len())].parse().unwrap()),
                peer: None,
            };
            let snap = (rng.random_range(0..10) > 0).then_some(&f.snap);
            let enforced = decide(&f.routes, snap, Environment::Live, &facts, NOW, &NO_TOKENS);
            let shadowed = decide(&shadow, snap, Environment::Live, &facts, NOW, &NO_TOKENS);
            match (enforced, shadowed) {
                (Ok(e), Ok(s)) => {
                    assert!(s.shadow.is_none(), "{facts:?}");
                    assert_eq!(
                        (who(&e), e.rewritten_path),
                        (who(&s), s.rewritten_path),
                        "{facts:?}"
                    );
                    seen.insert("allowed");
                }
                (Err(d), Ok(s)) => {
                    assert!(
                        !matches!(d, Denial::BadRequest(_)),
                        "{facts:?}: malformed forwarded"
                    );
                    seen.insert(d.reason());
                    assert_eq!(s.shadow, Some(d), "{facts:?}");
                }
                (Err(d), Err(d2)) => {
                    assert!(
                        matches!(d, Denial::BadRequest(_)),
                        "{facts:?}: {d:?} refused in shadow mode"
                    );
                    assert_eq!(d, d2);
                    seen.insert("bad_request");
                }
                (Ok(_), Err(d)) => panic!("{facts:?}: allowed in enforce mode, {d:?} in shadow mode"),
            }
        }
        // The walk reached every kind it can (a check on the generator, not on the code).
        for kind in [
            "allowed",
            "bad_request",
            "no_route",
            "missing_credential",
            "malformed_key",
            "wrong_environment",
            "unknown_or_revoked_key",
            "insufficient_scope",
            "ip_not_allowed",
            "no_snapshot",
        ] {
            assert!(seen.contains(kind), "{kind} never reached: {seen:?}");
        }
    }

    fn run_pass(f: &Fixture, path: &str, now: u64) -> Result<Pass, Denial> {
        let header = bearer(&f.key).map(String::into_bytes);
        let facts = get_facts(path, header.as_deref(), "127.0.0.1");
        decide(
            &f.routes,
            Some(&f.snap),
            Environment::Live,
            &facts,
            now,
            &NO_TOKENS,
        )
    }

    #[test]
    fn disabled_ip_and_rate() {
        let f = fixture(|s| s.disabled = true);
        assert_eq!(
            run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).unwrap_err(),
            Denial::InvalidToken(InvalidToken::ServiceDisabled)
        );
        let f = fixture(|s| s.allowed_ips = vec!["10.0.0.0/8".into()]);
        assert_eq!(
            run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).unwrap_err(),
            Denial::IpNotAllowed
        );
        assert!(run(&f, "/api/v1/trades", bearer(&f.key), "10.9.9.9", NOW).is_ok());
        let f = fixture(|s| s.rate_limit_per_minute = Some(1));
        assert!(run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).is_ok());
        assert!(matches!(
            run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).unwrap_err(),
            Denial::RateLimited(_)
        ));
        // A scope denial does not consume the rate limit.
        let f = fixture(|s| s.rate_limit_per_minute = Some(1));
        for _ in 0..5 {
            assert!(matches!(
                run(&f, "/api/v1/account", bearer(&f.key), "127.0.0.1", NOW).unwrap_err(),
                Denial::InsufficientScope { .. }
            ));
        }
        assert!(run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).is_ok());
    }

    #[test]
    fn admission_stops_before_the_limiter_and_finish_judges_its_answer() {
        use crate::limiter::{Outcome, Refused};
        use crate::ratelimit::{Exceeded, Window};
        let admit_one = |f: &Fixture| {
            let h = bearer(&f.key).unwrap().into_bytes();
            let facts = get_facts("/api/v1/%74rades", Some(&h), "127.0.0.1");
            admit(
                &f.routes,
                Some(&f.snap),
                Environment::Live,
                &facts,
                NOW,
                &NO_TOKENS,
            )
            .unwrap()
        };
        // Without limits there is nothing to ask a limiter.
        let f = fixture(|_| {});
        assert!(matches!(admit_one(&f), Admission::Pass(_)));
        // With limits: admitting consumes nothing; only the limiter's answer decides.
        let f = fixture(|s| s.rate_limit_per_minute = Some(1));
        for _ in 0..3 {
            assert!(matches!(admit_one(&f), Admission::Limit(_)));
        }
        let Admission::Limit(p) = admit_one(&f) else {
            panic!()
        };
        let exceeded = Exceeded {
            window: Window::Minute,
            retry_after_secs: 9,
            limits: p.service().limits,
        };
        let refusals: [(Outcome, Denial); 2] = [
            (Err(Refused::Exceeded(exceeded)), Denial::RateLimited(exceeded)),
            (Err(Refused::Unavailable), Denial::LimiterUnavailable),
        ];
        for (outcome, denial) in refusals {
            let Admission::Limit(p) = admit_one(&f) else {
                panic!()
            };
            let service = p.service().id.clone();
            let refusal = p.finish(outcome).unwrap_err();
            assert_eq!(refusal.denial, denial);
            // The log names who was refused.
            assert_eq!(refusal.caller.map(|c| c.service.id.clone()), Some(service));
        }
        let Admission::Limit(p) = admit_one(&f) else {
            panic!()
        };
        let pass = p.finish(Ok(RateStatus::default())).unwrap();
        assert_eq!(pass.rewritten_path.as_deref(), Some("/api/v1/trades"));
        assert!(matches!(pass.verdict, Verdict::Allowed { .. }));
        // None of the above touched the local count: the whole quota of one is still there.
        assert!(run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).is_ok());
        assert!(run(&f, "/api/v1/trades", bearer(&f.key), "127.0.0.1", NOW).is_err());
    }

    #[test]
    fn no_snapshot_fails_closed_but_public_routes_work() {
        let f = fixture(|_| {});
        let h = bearer(&f.key).unwrap().into_bytes();
        let facts = RequestFacts {
            method: "GET",
            path: "/api/v1/trades",
            authorization: Authorization::One(&h),
            client_ip: None,
            peer: None,
        };
        assert_eq!(
            decide(&f.routes, None, Environment::Live, &facts, NOW, &NO_TOKENS).unwrap_err(),
            Denial::NoSnapshot
        );
        let public = RequestFacts {
            path: "/health",
            ..facts
        };
        assert!(decide(&f.routes, None, Environment::Live, &public, NOW, &NO_TOKENS).is_ok());
    }

    #[test]
    fn authorization_header_parsing() {
        assert_eq!(bearer_token(Authorization::Absent), Ok(None));
        assert_eq!(bearer_token(Authorization::One(b"bearer abc")), Ok(Some("abc")));
        assert_eq!(bearer_token(Authorization::One(b"BEARER  abc ")), Ok(Some("abc")));
        assert_eq!(
            bearer_token(Authorization::One(b"Bearer")),
            Err(Denial::InvalidToken(InvalidToken::Malformed))
        );
        assert!(matches!(
            bearer_token(Authorization::One(b"Bearer \xff\xfe")),
            Err(Denial::BadRequest(_))
        ));
        assert!(matches!(
            bearer_token(Authorization::Several),
            Err(Denial::BadRequest(_))
        ));
    }

    mod tokens {
        use super::*;
        use crate::jwt::{generate_ed25519, AccessClaims, Signer};
        use crate::sync::{SyncRevokedToken, SyncSigningKey};

        const SECS: i64 = (NOW / 1_000_000_000) as i64;

        fn snapshot(service_scopes: &[&str], revoked: &[&str], x: &str) -> Snapshot {
            let payload = SyncPayload {
                epoch: "e".into(),
                version: 1,
                full: true,
                services: vec![service("srv_a", service_scopes, vec![])],
                issuer: "https://auth".into(),
                signing_keys: vec![SyncSigningKey {
                    kid: "k1".into(),
                    x: x.into(),
                }],
                revoked_tokens: revoked
                    .iter()
                    .map(|j| SyncRevokedToken {
                        jti: j.to_string(),
                        expires_at: SECS + 3600,
                    })
                    .collect(),
                generated_at_ms: None,
                instance_id: None,
            };
            Snapshot::from_full(&payload, Environment::Live, None).unwrap()
        }

        fn token(signer: &Signer, scope: &str, jti: &str) -> String {
            signer
                .sign(&AccessClaims {
                    is_trusted: false,
                    iss: "https://auth".into(),
                    sub: "srv_a".into(),
                    aud: "permiso".into(),
                    exp: SECS + 600,
                    iat: SECS,
                    nbf: SECS,
                    jti: jti.into(),
                    client_id: "srv_a".into(),
                    scope: scope.into(),
                    cnf: None,
                })
                .unwrap()
        }

        fn call(
            snap: &Snapshot,
            path: &str,
            tok: &str,
            now: u64,
            cache: Option<&TokenCache>,
        ) -> Result<Verdict, Denial> {
            call_over(snap, path, tok, now, cache, None)
        }

        fn call_over(
            snap: &Snapshot,
            path: &str,
            tok: &str,
            now: u64,
            cache: Option<&TokenCache>,
            peer: Option<&crate::peer::PeerCert>,
        ) -> Result<Verdict, Denial> {
            let routes = RouteTable::new(vec![
                Route::new(
                    vec![],
                    "/t".into(),
                    Access::Scopes(vec![Scope::parse("trade:read").unwrap()]),
                ),
                Route::new(
                    vec![],
                    "/a".into(),
                    Access::Scopes(vec![Scope::parse("account:read").unwrap()]),
                ),
            ]);
            let h = format!("Bearer {tok}").into_bytes();
            let facts = RequestFacts {
                method: "GET",
                path,
                authorization: Authorization::One(&h),
                client_ip: None,
                peer,
            };
            let policy = TokenPolicy {
                audience: "permiso",
                leeway_secs: 30,
                cache,
            };
            decide(&routes, Some(snap), Environment::Live, &facts, now, &policy).map(|p| p.verdict)
        }

        #[test]
        fn token_scopes_bound_what_the_service_holds_and_vice_versa() {
            let (der, x) = generate_ed25519();
            let signer = Signer::new("k1".into(), &der);
            let snap = snapshot(&["trade:read", "account:read"], &[], &x);
            let narrow = token(&signer, "trade:read", "j1");
            assert!(call(&snap, "/t", &narrow, NOW, None).is_ok());
            assert!(matches!(
                call(&snap, "/a", &narrow, NOW, None),
                Err(Denial::InsufficientScope { .. })
            ));
            // The admin removed trade:read after the token was issued.
            let narrowed = snapshot(&["account:read"], &[], &x);
            assert!(matches!(
                call(&narrowed, "/t", &narrow, NOW, None),
                Err(Denial::InsufficientScope { .. })
            ));
            // Revoked jti.
            let revoked = snapshot(&["trade:read"], &["j1"], &x);
            assert_eq!(
                call(&revoked, "/t", &narrow, NOW, None).unwrap_err(),
                Denial::InvalidToken(InvalidToken::Jwt(JwtError::Revoked))
            );
        }

        #[test]
        fn tokens_issued_before_a_disable_stay_dead_after_re_enabling() {
            let (der, x) = generate_ed25519();
            let signer = Signer::new("k1".into(), &der);
            let cache = TokenCache::new(10);
            let t = token(&signer, "trade:read", "j-old");
            let snap = snapshot(&["trade:read"], &[], &x);
            assert!(call(&snap, "/t", &t, NOW, Some(&cache)).is_ok());
            // Disabled and re-enabled since: the floor is after the token's iat.
            let mut payload = snap.to_payload();
            payload.services[0].tokens_not_before = SECS + 1;
            let re_enabled = Snapshot::from_full(&payload, Environment::Live, None).unwrap();
            for c in [None, Some(&cache)] {
                assert_eq!(
                    call(&re_enabled, "/t", &t, NOW, c).unwrap_err(),
                    Denial::InvalidToken(InvalidToken::Jwt(JwtError::Revoked))
                );
            }
            payload.services[0].tokens_not_before = SECS;
            let at_iat = Snapshot::from_full(&payload, Environment::Live, None).unwrap();
            assert!(
                call(&at_iat, "/t", &t, NOW, None).is_ok(),
                "issued at the floor: valid"
            );
        }

        /// RFC 8705 §3: a token carrying `cnf.x5t#S256` works only over a connection whose
        /// client certificate has that thumbprint, cached or not.
        #[test]
        fn a_certificate_bound_token_needs_its_certificate() {
            let (der, x) = generate_ed25519();
            let signer = Signer::new("k1".into(), &der);
            let snap = snapshot(&["trade:read"], &[], &x);
            let bound = signer
                .sign(&AccessClaims {
                    is_trusted: false,
                    iss: "https://auth".into(),
                    sub: "srv_a".into(),
                    aud: "permiso".into(),
                    exp: SECS + 600,
                    iat: SECS,
                    nbf: SECS,
                    jti: "j-bound".into(),
                    client_id: "srv_a".into(),
                    scope: "trade:read".into(),
                    cnf: Some(jwt::Confirmation {
                        x5t_s256: "thumb-x".into(),
                    }),
                })
                .unwrap();
            let cert = |t: &str| crate::peer::PeerCert {
                identities: vec![],
                x5t_s256: t.into(),
            };
            let cache = TokenCache::new(10);
            for c in [None, Some(&cache), Some(&cache)] {
                assert!(call_over(&snap, "/t", &bound, NOW, c, Some(&cert("thumb-x"))).is_ok());
                for peer in [None, Some(&cert("thumb-y"))] {
                    assert_eq!(
                        call_over(&snap, "/t", &bound, NOW, c, peer).unwrap_err(),
                        Denial::InvalidToken(InvalidToken::CertificateBinding)
                    );
                }
            }
            // An unbound token does not care about the connection.
            let free = token(&signer, "trade:read", "j-free");
            assert!(call_over(&snap, "/t", &free, NOW, None, Some(&cert("thumb-y"))).is_ok());
            assert!(call(&snap, "/t", &free, NOW, None).is_ok());
        }

        #[test]
        fn a_revoked_token_is_never_cached() {
            let (der, x) = generate_ed25519();
            let signer = Signer::new("k1".into(), &der);
            let cache = TokenCache::new(10);
            let t = token(&signer, "trade:read", "j-revoked");
            let revoked = snapshot(&["trade:read"], &["j-revoked"], &x);
            for _ in 0..3 {
                assert_eq!(
                    call(&revoked, "/t", &t, NOW, Some(&cache)).unwrap_err(),
                    Denial::InvalidToken(InvalidToken::Jwt(JwtError::Revoked))
                );
            }
            assert_eq!(cache.len(), 0, "the sync's eviction would be undone by a replay");
        }

        #[test]
        fn cached_tokens_are_rejudged_on_every_hit() {
            let (der, x) = generate_ed25519();
            let signer = Signer::new("k1".into(), &der);
            let snap = snapshot(&["trade:read"], &[], &x);
            let cache = TokenCache::new(100);
            let t = token(&signer, "trade:read", "j2");
            assert!(call(&snap, "/t", &t, NOW, Some(&cache)).is_ok());
            assert_eq!(cache.len(), 1);
            // A hit still checks the clock...
            let late = NOW + 631 * 1_000_000_000;
            assert_eq!(
                call(&snap, "/t", &t, late, Some(&cache)).unwrap_err(),
                Denial::InvalidToken(InvalidToken::Jwt(JwtError::Expired))
            );
            // ...and the deny list of the current snapshot.
            let revoked = snapshot(&["trade:read"], &["j2"], &x);
            assert!(call(&revoked, "/t", &t, NOW, Some(&cache)).is_err());
            // ...and whether the signing key is still published.
            let mut no_keys = snapshot(&["trade:read"], &[], &x);
            no_keys.tokens.keys = Default::default();
            assert_eq!(
                call(&no_keys, "/t", &t, NOW, Some(&cache)).unwrap_err(),
                Denial::InvalidToken(InvalidToken::Jwt(JwtError::UnknownKid))
            );
            // ...and the audience, which a config reload may have changed.
            let h = format!("Bearer {t}").into_bytes();
            let routes = RouteTable::new(vec![Route::new(
                vec![],
                "/t".into(),
                Access::Scopes(vec![Scope::parse("trade:read").unwrap()]),
            )]);
            let facts = RequestFacts {
                method: "GET",
                path: "/t",
                authorization: Authorization::One(&h),
                client_ip: None,
                peer: None,
            };
            let reloaded = TokenPolicy {
                audience: "another-audience",
                leeway_secs: 30,
                cache: Some(&cache),
            };
            assert_eq!(
                decide(&routes, Some(&snap), Environment::Live, &facts, NOW, &reloaded).unwrap_err(),
                Denial::InvalidToken(InvalidToken::Jwt(JwtError::WrongAudience))
            );
        }
    }
}
