//! The pingora shell around `core::decision`: extract request facts, decide, then either write
//! the denial (keeping the connection) or forward with identity headers.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::Result;

use crate::config::{ForwardedFor, TokenSettings};
use crate::core::clock::SharedClock;
use crate::core::decision::{
    admit, Admission, Authorization, Credential, RequestFacts, TokenPolicy, Verdict,
};
use crate::core::denial::{BadRequest, Denial, DenialResponse, InvalidToken};
use crate::core::headers;
use crate::core::jwt::JwtError;
use crate::core::key::Environment;
use crate::core::limiter::RateLimiter;
use crate::core::path::PathError;
use crate::core::routes::RouteTable;
use crate::core::snapshot::Snapshot;
use crate::core::token_cache::TokenCache;
use crate::sidecar::metrics::{Decided, SidecarMetrics};
use crate::sidecar::sync_client::EarlySync;

const REQUEST_ID: &str = "x-request-id";

/// The part of the config a reload (SIGHUP) replaces whole; each request works with the one it
/// started with.
pub struct Live {
    pub routes: RouteTable,
    pub forwarded_for: ForwardedFor,
    pub peer: HttpPeer,
    /// The upstream service's address (`peer`'s, for the HTTP/1 path).
    pub upstream: std::net::SocketAddr,
    pub tokens: TokenSettings,
}

pub struct Shared {
    pub snapshot: Arc<ArcSwapOption<Snapshot>>,
    pub live: ArcSwap<Live>,
    pub environment: Environment,
    pub clock: SharedClock,
    pub token_cache: Arc<TokenCache>,
    pub early_sync: Arc<EarlySync>,
    pub request_ids: crate::core::request_id::RequestIds,
    pub metrics: Arc<SidecarMetrics>,
    pub limiter: crate::sidecar::ratelimit::SidecarLimiter,
}

pub struct SidecarProxy {
    pub shared: Arc<Shared>,
}

pub struct Ctx {
    start: Instant,
    live: Option<Arc<Live>>,
    verdict: Option<Verdict>,
    /// The canonical path, when it differs from the received one: forwarded instead.
    rewritten_path: Option<Box<str>>,
    denial: Option<&'static str>,
    /// Kept from the caller (a reference-counted clone) or minted; sent upstream and back.
    request_id: HeaderValue,
}

/// Request bodies up to this size are read and discarded before a denial, so the connection
/// stays usable; larger or chunked bodies get the denial and a closed connection instead of
/// making us read what an unauthenticated caller sends.
const DRAIN_LIMIT: u64 = 64 * 1024;
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

async fn drain_small_body(session: &mut Session) {
    if session.is_body_done() {
        return;
    }
    let small = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= DRAIN_LIMIT);
    if small {
        // On error or timeout pingora closes the connection after the response: still correct.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, session.drain_request_body()).await;
    }
}

async fn write_denial(session: &mut Session, denial: &Denial, request_id: &HeaderValue) -> Result<()> {
    drain_small_body(session).await;
    write_json(session, denial.response(), request_id).await
}

/// Writes one of core's JSON error responses.
async fn write_json(session: &mut Session, r: DenialResponse, request_id: &HeaderValue) -> Result<()> {
    let mut h = ResponseHeader::build(r.status, Some(5 + r.headers.len()))?;
    h.insert_header("X-Request-Id", request_id.clone())?;
    h.insert_header("Content-Type", "application/json")?;
    h.insert_header("Content-Length", r.body.len().to_string())?;
    h.insert_header("Cache-Control", "no-store")?;
    for (name, value) in r.headers {
        h.insert_header(name, value)?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(Bytes::from(r.body)), true)
        .await?;
    Ok(())
}

/// Sets the forwarded request-target to `path` (canonical) and the received query.
fn set_target(upstream: &mut RequestHeader, path: &str) -> Result<()> {
    let target = match upstream.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let uri = http::Uri::builder()
        .path_and_query(target)
        .build()
        .map_err(|e| pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "canonical path", e))?;
    upstream.set_uri(uri);
    Ok(())
}

/// The peer's address as text, without the formatting machinery for the usual IPv4 case.
fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if *o >= 100 {
                    s.push((b'0' + o / 100) as char);
                }
                if *o >= 10 {
                    s.push((b'0' + o / 10 % 10) as char);
                }
                s.push((b'0' + o % 10) as char);
            }
            s
        }
        std::net::IpAddr::V6(v6) => v6.to_string(),
    }
}

/// `for=` value of RFC 7239: IPv6 addresses quoted and bracketed.
fn forwarded_node(ip: std::net::IpAddr, text: &str) -> String {
    match ip {
        std::net::IpAddr::V4(_) => ["for=", text].concat(),
        std::net::IpAddr::V6(_) => ["for=\"[", text, "]\""].concat(),
    }
}

/// Drops every header the caller may not send upstream (identity and forwarding headers, in
/// any spelling), then sets the forwarding chain from the TCP peer.
fn set_forwarding(
    upstream: &mut RequestHeader,
    peer: Option<std::net::IpAddr>,
    mode: ForwardedFor,
) -> Result<()> {
    let (mut xff, mut fwd) = (None, None);
    if mode == ForwardedFor::Append {
        let join = |name: &str| {
            let v: Vec<&str> = upstream
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!v.is_empty()).then(|| v.join(", "))
        };
        (xff, fwd) = (join("x-forwarded-for"), join("forwarded"));
    }
    // One scan; allocation only when a caller sent something to drop.
    if upstream.headers.keys().any(|n| headers::is_reserved(n.as_str())) {
        let drop: Vec<http::HeaderName> = upstream
            .headers
            .keys()
            .filter(|n| headers::is_reserved(n.as_str()))
            .cloned()
            .collect();
        for name in drop {
            upstream.remove_header(&name);
        }
    }
    if let Some(ip) = peer {
        let ip_s = ip_text(ip);
        let node = forwarded_node(ip, &ip_s);
        let xff = match xff {
            Some(chain) => format!("{chain}, {ip_s}"),
            None => ip_s,
        };
        let fwd = match fwd {
            Some(chain) => format!("{chain}, {node}"),
            None => node,
        };
        upstream.insert_header("X-Forwarded-For", xff)?;
        upstream.insert_header("Forwarded", fwd)?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for SidecarProxy {
    type CTX = Ctx;

    /// No downstream modules. pingora's default adds a response-compression module, disabled,
    /// that still costs a box and two boxed calls per request; a sidecar forwards bodies as the
    /// upstream wrote them.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            live: None,
            verdict: None,
            rewritten_path: None,
            denial: None,
            request_id: HeaderValue::from_static(""),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        crate::sidecar::listener::head_read();
        crate::sidecar::listener::body_progress(0, session.is_body_done());
        let shared = &self.shared;
        let snapshot = shared.snapshot.load();
        let live = shared.live.load_full();
        let now_nanos = shared.clock.now_nanos();
        let decision = {
            let req = session.req_header();
            // pingora keeps a target that is not UTF-8 verbatim for the wire and routes a lossy
            // copy: never forward bytes other than the ones judged.
            let lossy = !req.raw_path_is_utf8();
            let mut incoming_ids = req.headers.get_all(REQUEST_ID).iter();
            let incoming = match (incoming_ids.next(), incoming_ids.next()) {
                (Some(v), None) => Some(v),
                _ => None,
            };
            ctx.request_id = shared.request_ids.keep_or_mint(incoming);
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
                client_ip: session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()),
                peer: session
                    .digest()
                    .and_then(|d| d.ssl_digest.as_ref())
                    .and_then(|s| s.extension.get::<crate::core::peer::PeerCert>()),
            };
            let tokens = TokenPolicy {
                audience: &live.tokens.audience,
                leeway_secs: live.tokens.leeway_secs,
                cache: Some(&shared.token_cache),
            };
            if lossy {
                Err(Denial::BadRequest(BadRequest::Path(PathError::NotUtf8)))
            } else {
                admit(
                    &live.routes,
                    snapshot.as_deref(),
                    shared.environment,
                    &facts,
                    now_nanos,
                    &tokens,
                )
            }
        };
        // The snapshot guard is not held across the limiter's round trip (the pending
        // decision holds what it needs).
        drop(snapshot);
        // The last step: the limiter (atomics here, or one round trip to the shared one).
        let decision = match decision {
            Ok(Admission::Pass(pass)) => Ok(pass),
            Ok(Admission::Limit(pending)) => {
                let outcome = shared.limiter.check(pending.service(), now_nanos).outcome().await;
                pending.finish(outcome)
            }
            Err(d) => Err(d),
        };
        ctx.live = Some(live);
        match decision {
            Ok(pass) => {
                match &pass.verdict {
                    Verdict::Allowed { principal, .. } => {
                        principal.record_use((now_nanos / 1_000_000_000) as i64);
                        shared.metrics.allowed();
                    }
                    Verdict::Public { .. } => shared.metrics.public(),
                }
                ctx.verdict = Some(pass.verdict);
                ctx.rewritten_path = pass.rewritten_path;
                Ok(false)
            }
            Err(denial) => {
                if denial == Denial::InvalidToken(InvalidToken::Jwt(JwtError::UnknownKid)) {
                    // Maybe a key published since our last sync: fetch now (rate-limited).
                    shared.early_sync.request();
                }
                shared.metrics.denied(&denial);
                ctx.denial = Some(denial.reason());
                write_denial(session, &denial, &ctx.request_id).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // The upstream of the config this request was decided under, even if a reload landed since.
        let peer = match &ctx.live {
            Some(l) => l.peer.clone(),
            None => self.shared.live.load().peer.clone(),
        };
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The upstream reads exactly the path that was routed: the canonical one, in
        // origin-form (an absolute-form target is kept verbatim by pingora otherwise).
        match &ctx.rewritten_path {
            Some(p) => set_target(upstream, p)?,
            None if upstream.raw_path()
                != upstream
                    .uri
                    .path_and_query()
                    .map_or(&b""[..], |p| p.as_str().as_bytes()) =>
            {
                let p = upstream.uri.path().to_string();
                set_target(upstream, &p)?
            }
            None => {}
        }
        // Framing: one Content-Length value, never a list (pingora already framed the body by
        // the reconciled value and refused conflicting ones), and none beside
        // Transfer-Encoding (RFC 9112 §6.3: a proxy removes it).
        if upstream.headers.contains_key(http::header::TRANSFER_ENCODING) {
            upstream.remove_header(&http::header::CONTENT_LENGTH);
        } else {
            let mut cl = upstream.headers.get_all(http::header::CONTENT_LENGTH).iter();
            let listed = match (cl.next(), cl.next()) {
                (Some(first), None) => first.as_bytes().contains(&b','),
                (Some(_), Some(_)) => true,
                (None, _) => false,
            };
            if listed {
                let values = upstream
                    .headers
                    .get_all(http::header::CONTENT_LENGTH)
                    .iter()
                    .map(|v| v.as_bytes());
                let n = headers::single_content_length(values).ok_or_else(|| {
                    pingora::Error::explain(pingora::ErrorType::HTTPStatus(400), "conflicting Content-Length")
                })?;
                upstream.insert_header("Content-Length", n.to_string())?;
            }
        }
        // Callers must never be able to claim an identity or a forwarding chain.
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let mode = ctx
            .live
            .as_ref()
            .map_or(ForwardedFor::Overwrite, |l| l.forwarded_for);
        set_forwarding(upstream, peer, mode)?;
        upstream.insert_header("X-Request-Id", ctx.request_id.clone())?;
        match &ctx.verdict {
            Some(Verdict::Allowed {
                principal,
                cert_identity,
                ..
            }) => {
                upstream.remove_header(&http::header::AUTHORIZATION);
                if let Some(identity) = cert_identity {
                    upstream.insert_header("X-Permiso-Client-Cert-Identity", identity.clone())?;
                }
                let s = &principal.service;
                // Prebuilt values: each insert clones a reference count.
                upstream.insert_header("X-Permiso-Service-Id", s.id_header.clone())?;
                upstream.insert_header("X-Permiso-Service-Name", s.name_header.clone())?;
                upstream.insert_header("X-Permiso-Scopes", principal.scopes_header().clone())?;
                match &principal.credential {
                    Credential::ApiKey { key_id, .. } => {
                        upstream.insert_header("X-Permiso-Key-Id", &**key_id)?
                    }
                    Credential::AccessToken(t) => {
                        upstream.insert_header("X-Permiso-Token-Id", t.jti_header.clone())?
                    }
                    // The identity is in X-Permiso-Client-Cert-Identity.
                    Credential::ClientCert { .. } => {}
                }
                let env = HeaderValue::from_static(s.environment.as_str());
                upstream.insert_header("X-Permiso-Environment", env)?;
            }
            // A credential sent to a public route must not leak upstream, in any form.
            Some(Verdict::Public {
                forward_authorization: true,
            }) => {}
            Some(Verdict::Public { .. }) | None => {
                upstream.remove_header(&http::header::AUTHORIZATION);
            }
        }
        // Meant for this proxy, never for the service behind it.
        if upstream.headers.contains_key(http::header::PROXY_AUTHORIZATION) {
            upstream.remove_header(&http::header::PROXY_AUTHORIZATION);
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        crate::sidecar::listener::body_progress(body.as_ref().map_or(0, |b| b.len()), end_of_stream);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        response.insert_header("X-Request-Id", ctx.request_id.clone())?;
        if let Some(Verdict::Allowed { principal, rate, .. }) = &ctx.verdict {
            if let Some(value) = rate.header() {
                match &rate.applied {
                    // A share of the limit, counted here while Redis is out of reach.
                    Some(l) => response.insert_header("RateLimit-Policy", l.policy_header())?,
                    None => {
                        response.insert_header("RateLimit-Policy", principal.service.policy_header.clone())?
                    }
                }
                response.insert_header("RateLimit", value)?;
            }
        }
        Ok(())
    }

    /// Upstream failures answer JSON like every denial, with the request id (pingora's default
    /// is a bare text page).
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut Ctx,
    ) -> pingora::proxy::FailToProxy {
        use pingora::ErrorType::*;
        let code = match (e.etype(), e.esource()) {
            (HTTPStatus(code), _) => *code,
            (ConnectTimedout | ReadTimedout | WriteTimedout, pingora::ErrorSource::Upstream) => 504,
            (_, pingora::ErrorSource::Upstream) => 502,
            // The client is gone: nothing to answer.
            (WriteError | ReadError | ConnectionClosed, pingora::ErrorSource::Downstream) => 0,
            (_, pingora::ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if ctx.request_id.is_empty() {
            // Failed before the request was read far enough to keep the caller's.
            ctx.request_id = self.shared.request_ids.keep_or_mint(None);
        }
        if code > 0 {
            // pingora 0.9 closes the client connection after a failed upstream attempt (it
            // reports the downstream as not reusable once a peer was chosen): say so
            // (`Connection: close`), so the client does not send its next request into a reset.
            session.set_keepalive(None);
            if let Err(we) = write_json(session, DenialResponse::proxy_failure(code), &ctx.request_id).await {
                tracing::debug!(error = %we, "could not answer a failed proxy attempt");
            }
        }
        pingora::proxy::FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&pingora::Error>, ctx: &mut Ctx) {
        let metrics = &self.shared.metrics;
        let decided = match (&ctx.verdict, ctx.denial) {
            (_, Some(_)) => Some(Decided::Denied),
            (Some(Verdict::Allowed { .. }), None) => Some(Decided::Allowed),
            (Some(Verdict::Public { .. }), None) => Some(Decided::Public),
            // Failed before a decision (malformed request, client gone): nothing to time.
            (None, None) => None,
        };
        if let Some(d) = decided {
            metrics.latency(d, ctx.start.elapsed().as_secs_f64());
        }
        if let (Some(e), Some(Decided::Allowed | Decided::Public)) = (error, decided) {
            // A client that hung up is not the upstream's failure.
            if *e.esource() == pingora::ErrorSource::Upstream {
                metrics.upstream_error(e.etype().as_str());
            }
        }
        // Build nothing for a line that will not be written.
        if !tracing::enabled!(target: "permiso::access", tracing::Level::INFO) {
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        let (decision, service_id, key_id) = match (&ctx.verdict, ctx.denial) {
            (_, Some(reason)) => (reason, None, None),
            (Some(Verdict::Allowed { principal, .. }), None) => (
                "allowed",
                Some(principal.service.id.clone()),
                Some(principal.credential_id().to_string()),
            ),
            (Some(Verdict::Public { .. }), None) => ("public", None, None),
            (None, None) => ("none", None, None),
        };
        tracing::info!(
            target: "permiso::access",
            request_id = %ctx.request_id.to_str().unwrap_or("-"),
            method = %req.method,
            path = req.uri.path(),
            status,
            decision,
            service_id = service_id.as_deref(),
            key_id = key_id.as_deref(),
            latency_us = ctx.start.elapsed().as_micros() as u64,
            error = error.map(|e| e.to_string()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_render_as_the_standard_library_does() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.1.9",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        assert_eq!(forwarded_node(v6, &ip_text(v6)), "for=\"[::1]\"");
    }
}
