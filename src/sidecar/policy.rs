//! One request judged: the facts read off a pingora request head, `core::decision::admit`
//! under the live config and the current snapshot (one `load()` each), then the limiter, and
//! the metrics of the outcome. No I/O but the shared limiter's round trip, when a service's
//! limits are cluster-wide.

use http::HeaderValue;
use pingora::http::RequestHeader;

use crate::core::decision::{
    admit, Admission, Authorization, Pass, Refusal, RequestFacts, TokenPolicy, Verdict,
};
use crate::core::denial::{BadRequest, Denial, InvalidToken};
use crate::core::jwt::JwtError;
use crate::core::limiter::RateLimiter;
use crate::core::path::PathError;
use crate::core::peer::PeerCert;
use crate::sidecar::forward::REQUEST_ID;
use crate::sidecar::state::{Live, Shared};

/// What the connection adds to the request head.
pub struct Peer<'a> {
    pub ip: Option<std::net::IpAddr>,
    pub cert: Option<&'a PeerCert>,
}

/// The request id to use (the caller's, when it sent exactly one well-formed one) and the
/// verdict. `live` is the config this request is judged and forwarded under.
pub async fn judge(
    shared: &Shared,
    live: &Live,
    req: &RequestHeader,
    peer: Peer<'_>,
) -> (HeaderValue, Result<Pass, Refusal>) {
    let now_nanos = shared.clock.now_nanos();
    let mut incoming_ids = req.headers.get_all(REQUEST_ID).iter();
    let incoming = match (incoming_ids.next(), incoming_ids.next()) {
        (Some(v), None) => Some(v),
        _ => None,
    };
    let request_id = shared.request_ids.keep_or_mint(incoming);
    let admission = {
        let snapshot = shared.snapshot.load();
        // pingora keeps a target that is not UTF-8 verbatim for the wire and routes a lossy
        // copy: never forward bytes other than the ones judged.
        if !req.raw_path_is_utf8() {
            Err(Denial::BadRequest(BadRequest::Path(PathError::NotUtf8)).into())
        } else {
            let mut auth_values = req.headers.get_all(http::header::AUTHORIZATION).iter();
            let authorization = match (auth_values.next(), auth_values.next()) {
                (None, _) => Authorization::Absent,
                (Some(v), None) => Authorization::One(v.as_bytes()),
                (Some(_), Some(_)) => Authorization::Several,
            };
            let facts = RequestFacts {
                method: req.method.as_str(),
                path: req.uri.path(),
                authorization,
                client_ip: peer.ip,
                peer: peer.cert,
            };
            let tokens = TokenPolicy {
                audience: &live.tokens.audience,
                leeway_secs: live.tokens.leeway_secs,
                cache: Some(&shared.token_cache),
            };
            admit(
                &live.routes,
                snapshot.as_deref(),
                shared.environment,
                &facts,
                now_nanos,
                &tokens,
            )
        }
        // The snapshot guard is not held across the limiter's round trip (the pending
        // decision holds what it needs).
    };
    // The last step: the limiter (atomics here, or one round trip to the shared one).
    let decision = match admission {
        Ok(Admission::Pass(pass)) => Ok(pass),
        Ok(Admission::Limit(pending)) => {
            let outcome = if pending.is_shadow() {
                crate::core::limiter::Local::shadow_outcome(pending.service(), now_nanos)
            } else {
                shared.limiter.check(pending.service(), now_nanos).outcome().await
            };
            pending.finish(outcome)
        }
        Err(d) => Err(d),
    };
    match &decision {
        Ok(pass) => {
            match &pass.verdict {
                Verdict::Allowed { principal, .. } => {
                    principal.record_use((now_nanos / 1_000_000_000) as i64);
                    if principal.grace_key() {
                        shared.metrics.grace_key_request();
                    }
                    shared.metrics.allowed();
                }
                Verdict::Public { .. } => shared.metrics.public(),
            }
            if let Some(d) = &pass.shadow {
                shared.metrics.shadow_denied(d);
            }
        }
        Err(Refusal { denial, .. }) => {
            if *denial == Denial::InvalidToken(InvalidToken::Jwt(JwtError::UnknownKid)) {
                // Maybe a key published since our last sync: fetch now (rate-limited).
                shared.early_sync.request();
            }
            shared.metrics.denied(denial);
        }
    }
    (request_id, decision)
}
