//! Every way the sidecar refuses a request, and the one place that turns a refusal into status,
//! headers and body. Callers see the RFC error code and a generic description; the precise
//! reason goes to the log only (`Denial::reason`).

use crate::jwt::JwtError;
use crate::key::KeyError;
use crate::path::PathError;
use crate::ratelimit::Exceeded;

/// Why a presented credential is not accepted. All of these look the same to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidToken {
    Malformed,
    BadChecksum,
    WrongEnvironment,
    /// Unknown or revoked: the snapshot does not hold it.
    Unknown,
    /// A rotated key whose grace window has ended.
    GraceEnded,
    /// A key or client secret past its own expiry (`expires_at` / `ttl_seconds`).
    Expired,
    ServiceDisabled,
    /// An access token (JWT) that failed verification or was revoked.
    Jwt(JwtError),
    /// A valid token whose client no longer exists in the snapshot.
    UnknownClient,
    /// A bearer credential of one service over a client certificate of another.
    CertificateOfAnotherService,
    /// A client certificate whose identities belong to more than one service.
    CertificateAmbiguous,
    /// A certificate-bound token (RFC 8705) over a connection without that certificate.
    CertificateBinding,
}

impl InvalidToken {
    /// Every reason except the JWT ones (`JwtError::ALL` has those).
    pub const NOT_JWT: [InvalidToken; 11] = [
        InvalidToken::Malformed,
        InvalidToken::BadChecksum,
        InvalidToken::WrongEnvironment,
        InvalidToken::Unknown,
        InvalidToken::GraceEnded,
        InvalidToken::Expired,
        InvalidToken::ServiceDisabled,
        InvalidToken::UnknownClient,
        InvalidToken::CertificateOfAnotherService,
        InvalidToken::CertificateAmbiguous,
        InvalidToken::CertificateBinding,
    ];
}

impl From<KeyError> for InvalidToken {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Malformed => InvalidToken::Malformed,
            KeyError::BadChecksum => InvalidToken::BadChecksum,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No Bearer credential at all (RFC 6750 §3.1: no error code).
    MissingCredential,
    InvalidToken(InvalidToken),
    /// The `scope` attribute lists what the route needs.
    InsufficientScope {
        required: String,
    },
    IpNotAllowed,
    /// The route requires a trusted service (`trusted = true`) and the caller is not one.
    NotTrusted,
    RateLimited(Exceeded),
    NoRoute,
    BadRequest(BadRequest),
    /// No snapshot yet (never synced, no snapshot file): fail closed.
    NoSnapshot,
    /// The shared rate limiter could not answer and this sidecar refuses then
    /// (`on_redis_error = "closed"`).
    LimiterUnavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    Path(PathError),
    /// A method with lower-case letters: routes name upper-case methods, and servers that
    /// upper-case the method would run a handler the route did not guard.
    MethodCase,
    DuplicateAuthorization,
    AuthorizationNotAscii,
}

/// What goes on the wire for a denial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenialResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl DenialResponse {
    /// A request that was allowed but could not be proxied: the upstream refused, failed or
    /// timed out (502/504), the request broke off (400), asked for a tunnel (405), or we failed
    /// (500). Same JSON shape
    /// as a denial; the cause is logged, not sent.
    pub fn proxy_failure(status: u16) -> DenialResponse {
        let (code, description) = match status {
            504 => ("gateway_timeout", "The upstream service did not answer in time"),
            502 => (
                "bad_gateway",
                "The upstream service could not be reached or failed",
            ),
            405 => ("method_not_allowed", "The sidecar does not proxy CONNECT tunnels"),
            400..=499 => ("invalid_request", "The request could not be read"),
            _ => ("server_error", "The sidecar failed to proxy the request"),
        };
        DenialResponse {
            status,
            headers: vec![],
            body: body(code, description),
        }
    }
}

const REALM: &str = "Bearer realm=\"permiso\"";

fn body(error: &str, description: &str) -> String {
    serde_json::json!({ "error": error, "error_description": description }).to_string()
}

impl Denial {
    /// The precise reason, for logs and metrics only. Static, low-cardinality strings.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::MissingCredential => "missing_credential",
            Denial::InvalidToken(t) => match t {
                InvalidToken::Malformed => "malformed_key",
                InvalidToken::BadChecksum => "bad_checksum",
                InvalidToken::WrongEnvironment => "wrong_environment",
                InvalidToken::Unknown => "unknown_or_revoked_key",
                InvalidToken::GraceEnded => "grace_ended",
                InvalidToken::Expired => "expired",
                InvalidToken::ServiceDisabled => "service_disabled",
                InvalidToken::Jwt(e) => e.reason(),
                InvalidToken::UnknownClient => "jwt_unknown_client",
                InvalidToken::CertificateOfAnotherService => "certificate_of_another_service",
                InvalidToken::CertificateAmbiguous => "certificate_ambiguous",
                InvalidToken::CertificateBinding => "certificate_binding_mismatch",
            },
            Denial::InsufficientScope { .. } => "insufficient_scope",
            Denial::IpNotAllowed => "ip_not_allowed",
            Denial::NotTrusted => "not_trusted",
            Denial::RateLimited(e) => match e.window {
                crate::ratelimit::Window::Minute => "rate_limited_minute",
                crate::ratelimit::Window::Hour => "rate_limited_hour",
            },
            Denial::NoRoute => "no_route",
            Denial::BadRequest(b) => match b {
                BadRequest::Path(_) => "unsafe_path",
                BadRequest::MethodCase => "lowercase_method",
                BadRequest::DuplicateAuthorization => "duplicate_authorization",
                BadRequest::AuthorizationNotAscii => "authorization_not_ascii",
            },
            Denial::NoSnapshot => "no_snapshot",
            Denial::LimiterUnavailable => "rate_limiter_unavailable",
        }
    }

    /// The coarse class an operator counts and alerts on (the `outcome` metric label).
    /// Unknown and revoked API keys share "invalid": the snapshot drops revoked keys, so the
    /// sidecar cannot tell them apart (revoked access tokens it can).
    pub fn outcome(&self) -> &'static str {
        match self {
            Denial::MissingCredential => "missing",
            Denial::InvalidToken(InvalidToken::GraceEnded) => "grace_ended",
            Denial::InvalidToken(InvalidToken::Jwt(JwtError::Expired) | InvalidToken::Expired) => "expired",
            Denial::InvalidToken(InvalidToken::Jwt(JwtError::Revoked)) => "revoked",
            Denial::InvalidToken(_) => "invalid",
            Denial::InsufficientScope { .. } => "scope",
            Denial::IpNotAllowed => "ip",
            Denial::NotTrusted => "trusted",
            Denial::RateLimited(_) => "rate_limited",
            Denial::NoRoute => "no_route",
            Denial::BadRequest(_) => "bad_request",
            Denial::NoSnapshot | Denial::LimiterUnavailable => "unavailable",
        }
    }

    /// One denial of every reason, so metrics can create each counter before the first
    /// request (the request path then only increments).
    pub fn every_kind() -> Vec<Denial> {
        use crate::ratelimit::{Limits, Window};
        let mut all = vec![
            Denial::MissingCredential,
            Denial::InsufficientScope {
                required: String::new(),
            },
            Denial::IpNotAllowed,
            Denial::NotTrusted,
            Denial::NoRoute,
            Denial::NoSnapshot,
            Denial::LimiterUnavailable,
            Denial::BadRequest(BadRequest::Path(PathError::NotAbsolute)),
            Denial::BadRequest(BadRequest::DuplicateAuthorization),
            Denial::BadRequest(BadRequest::MethodCase),
            Denial::BadRequest(BadRequest::AuthorizationNotAscii),
        ];
        for window in [Window::Minute, Window::Hour] {
            all.push(Denial::RateLimited(Exceeded {
                window,
                retry_after_secs: 0,
                limits: Limits::default(),
            }));
        }
        for t in InvalidToken::NOT_JWT {
            all.push(Denial::InvalidToken(t));
        }
        for e in JwtError::ALL {
            all.push(Denial::InvalidToken(InvalidToken::Jwt(e)));
        }
        all
    }

    pub fn response(&self) -> DenialResponse {
        match self {
            Denial::MissingCredential => DenialResponse {
                status: 401,
                headers: vec![("WWW-Authenticate", REALM.to_string())],
                body: body("unauthorized", "A Bearer credential is required"),
            },
            Denial::InvalidToken(_) => {
                let d = "The access token is invalid, expired or revoked";
                DenialResponse {
                    status: 401,
                    headers: vec![(
                        "WWW-Authenticate",
                        format!("{REALM}, error=\"invalid_token\", error_description=\"{d}\""),
                    )],
                    body: body("invalid_token", d),
                }
            }
            Denial::InsufficientScope { required } => DenialResponse {
                status: 403,
                headers: vec![(
                    "WWW-Authenticate",
                    format!("{REALM}, error=\"insufficient_scope\", scope=\"{required}\""),
                )],
                body: body(
                    "insufficient_scope",
                    &format!("This route requires the scope(s): {required}"),
                ),
            },
            Denial::IpNotAllowed => DenialResponse {
                status: 403,
                headers: vec![],
                body: body(
                    "access_denied",
                    "Calls from this address are not allowed for this service",
                ),
            },
            Denial::RateLimited(e) => DenialResponse {
                status: 429,
                headers: vec![
                    ("Retry-After", e.retry_after_secs.to_string()),
                    ("RateLimit-Policy", e.limits.policy_header()),
                    ("RateLimit", e.ratelimit_header()),
                ],
                body: body(
                    "rate_limited",
                    &format!("Rate limit exceeded; retry after {} s", e.retry_after_secs),
                ),
            },
            Denial::NotTrusted => DenialResponse {
                status: 403,
                headers: vec![],
                body: body("access_denied", "This route requires a trusted service client"),
            },
            Denial::NoRoute => DenialResponse {
                status: 403,
                headers: vec![],
                body: body("access_denied", "No route allows this method and path"),
            },
            Denial::BadRequest(BadRequest::Path(e)) => DenialResponse {
                status: 400,
                headers: vec![],
                body: body("invalid_request", e.describe()),
            },
            Denial::BadRequest(BadRequest::MethodCase) => DenialResponse {
                status: 400,
                headers: vec![],
                body: body("invalid_request", "The method must be upper case"),
            },
            Denial::BadRequest(_) => DenialResponse {
                status: 400,
                headers: vec![],
                body: body("invalid_request", "The request is malformed"),
            },
            Denial::NoSnapshot => DenialResponse {
                status: 503,
                headers: vec![("Retry-After", "1".to_string())],
                body: body(
                    "temporarily_unavailable",
                    "The sidecar has no key state yet; try again shortly",
                ),
            },
            Denial::LimiterUnavailable => DenialResponse {
                status: 503,
                headers: vec![("Retry-After", "1".to_string())],
                body: body(
                    "temporarily_unavailable",
                    "The rate limiter cannot be reached; try again shortly",
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{Limits, Window};

    fn header<'a>(r: &'a DenialResponse, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn every_kind_covers_each_reason_once() {
        let all = Denial::every_kind();
        let reasons: std::collections::HashSet<_> = all.iter().map(|d| d.reason()).collect();
        // 10 + 2 rate windows + 11 credential reasons + 11 JWT reasons; path errors share one reason.
        assert_eq!(reasons.len(), all.len());
        assert_eq!(reasons.len(), 35);
        let outcomes: std::collections::HashSet<_> = all.iter().map(|d| d.outcome()).collect();
        for o in [
            "missing",
            "invalid",
            "revoked",
            "expired",
            "grace_ended",
            "trusted",
            "scope",
            "ip",
            "rate_limited",
        ] {
            assert!(outcomes.contains(o), "{o}");
        }
    }

    #[test]
    fn missing_credential_has_no_error_code() {
        let r = Denial::MissingCredential.response();
        assert_eq!(r.status, 401);
        assert_eq!(header(&r, "WWW-Authenticate"), Some("Bearer realm=\"permiso\""));
    }

    #[test]
    fn invalid_token_reasons_are_indistinguishable_on_the_wire() {
        let mut all = InvalidToken::NOT_JWT.to_vec();
        all.push(InvalidToken::Jwt(JwtError::Expired));
        let first = Denial::InvalidToken(all[0]).response();
        assert!(header(&first, "WWW-Authenticate")
            .unwrap()
            .contains("error=\"invalid_token\""));
        for t in &all {
            assert_eq!(Denial::InvalidToken(*t).response(), first);
        }
        let reasons: std::collections::HashSet<_> =
            all.iter().map(|t| Denial::InvalidToken(*t).reason()).collect();
        assert_eq!(reasons.len(), all.len());
    }

    #[test]
    fn scope_and_rate_limit_headers() {
        let r = Denial::InsufficientScope {
            required: "trade:open".into(),
        }
        .response();
        assert_eq!(r.status, 403);
        assert!(header(&r, "WWW-Authenticate")
            .unwrap()
            .ends_with("scope=\"trade:open\""));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"], "insufficient_scope");
        let e = Exceeded {
            window: Window::Minute,
            retry_after_secs: 12,
            limits: Limits {
                per_minute: Some(5),
                per_hour: None,
            },
        };
        let r = Denial::RateLimited(e).response();
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "Retry-After"), Some("12"));
        assert_eq!(header(&r, "RateLimit-Policy"), Some("\"minute\";q=5;w=60"));
        assert_eq!(header(&r, "RateLimit"), Some("\"minute\";r=0;t=12"));
    }
}
