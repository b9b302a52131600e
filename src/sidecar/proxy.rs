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

use crate::config::TokenSettings;
use crate::core::clock::SharedClock;
use crate::core::decision::{decide, Authorization, Credential, RequestFacts, TokenPolicy, Verdict};
use crate::core::denial::{Denial, InvalidToken};
use crate::core::jwt::JwtError;
use crate::core::key::{Environment, KEY_FAMILY_PREFIX};
use crate::core::routes::RouteTable;
use crate::core::snapshot::Snapshot;
use crate::core::token_cache::TokenCache;
use crate::sidecar::metrics::{Decided, SidecarMetrics};
use crate::sidecar::sync_client::EarlySync;

pub const HEADER_PREFIX: &str = "x-permiso-";
const REQUEST_ID: &str = "x-request-id";

/// The part of the config a reload (SIGHUP) replaces whole; each request works with the one it
/// started with.
pub struct Live {
    pub routes: RouteTable,
    pub peer: HttpPeer,
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
}

pub struct SidecarProxy {
    pub shared: Arc<Shared>,
}

pub struct Ctx {
    start: Instant,
    live: Option<Arc<Live>>,
    verdict: Option<Verdict>,
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
    let r = denial.response();
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

fn is_permiso_key(auth: Option<&http::HeaderValue>) -> bool {
    auth.and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(_, t)| t.trim_start().starts_with(KEY_FAMILY_PREFIX))
}

#[async_trait]
impl ProxyHttp for SidecarProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            live: None,
            verdict: None,
            denial: None,
            request_id: HeaderValue::from_static(""),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let shared = &self.shared;
        let snapshot = shared.snapshot.load();
        let live = shared.live.load_full();
        let now_nanos = shared.clock.now_nanos();
        let decision = {
            let req = session.req_header();
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
            };
            let tokens = TokenPolicy {
                audience: &live.tokens.audience,
                leeway_secs: live.tokens.leeway_secs,
                cache: Some(&shared.token_cache),
            };
            decide(
                &live.routes,
                snapshot.as_deref(),
                shared.environment,
                &facts,
                now_nanos,
                &tokens,
            )
        };
        ctx.live = Some(live);
        match decision {
            Ok(v) => {
                match &v {
                    Verdict::Allowed { principal, .. } => {
                        principal.record_use((now_nanos / 1_000_000_000) as i64);
                        shared.metrics.allowed();
                    }
                    Verdict::Public => shared.metrics.public(),
                }
                ctx.verdict = Some(v);
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
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Callers must never be able to claim an identity: drop every incoming X-Permiso-*.
        // One scan, no allocation in the usual case where nobody tried.
        while let Some(name) = upstream
            .headers
            .keys()
            .find(|n| n.as_str().starts_with(HEADER_PREFIX))
            .cloned()
        {
            upstream.remove_header(&name);
        }
        upstream.insert_header("X-Request-Id", ctx.request_id.clone())?;
        match &ctx.verdict {
            Some(Verdict::Allowed { principal, .. }) => {
                upstream.remove_header(&http::header::AUTHORIZATION);
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
                }
                let env = HeaderValue::from_static(s.environment.as_str());
                upstream.insert_header("X-Permiso-Environment", env)?;
            }
            // A Permiso key sent to a public route still must not leak upstream.
            Some(Verdict::Public) if is_permiso_key(upstream.headers.get(http::header::AUTHORIZATION)) => {
                upstream.remove_header(&http::header::AUTHORIZATION);
            }
            Some(Verdict::Public) | None => {}
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        response.insert_header("X-Request-Id", ctx.request_id.clone())?;
        if let Some(Verdict::Allowed { principal, rate }) = &ctx.verdict {
            if let Some(value) = rate.header() {
                response.insert_header("RateLimit-Policy", principal.service.policy_header.clone())?;
                response.insert_header("RateLimit", value)?;
            }
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, error: Option<&pingora::Error>, ctx: &mut Ctx) {
        let metrics = &self.shared.metrics;
        let decided = match (&ctx.verdict, ctx.denial) {
            (_, Some(_)) => Some(Decided::Denied),
            (Some(Verdict::Allowed { .. }), None) => Some(Decided::Allowed),
            (Some(Verdict::Public), None) => Some(Decided::Public),
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
            (Some(Verdict::Public), None) => ("public", None, None),
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
