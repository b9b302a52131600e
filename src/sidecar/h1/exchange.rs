//! One request on a client connection: read its head under the connection's deadline, judge
//! it (`policy`), then either answer the denial (draining a small body so the connection stays
//! usable) or forward it on the pinned upstream connection and stream the answer back. Every
//! failure becomes one JSON answer here (`fail`), while the client can still be answered;
//! the cause goes to the log and the metrics, never to the caller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::protocols::http::v1::server::HttpSession as Downstream;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType};

use super::upstream;
use super::{Client, Gate};
use crate::core::decision::{Pass, Refusal, Verdict};
use crate::core::denial::{Denial, DenialResponse};
use crate::core::peer::PeerCert;
use crate::sidecar::forward;
use crate::sidecar::metrics::Decided;
use crate::sidecar::policy::{self, Peer};
use crate::sidecar::state::Live;

/// Request bodies up to this size are read and discarded before a denial, so the connection
/// stays usable; larger or chunked bodies get the denial and a closed connection instead of
/// making us read what an unauthenticated caller sends.
const DRAIN_LIMIT: u64 = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a request goes, and under which config.
enum Target {
    /// Judged under this live config (kept for the whole exchange, even if a reload lands).
    Policy(Arc<Live>),
    Bare(SocketAddr),
}

impl Target {
    fn upstream(&self) -> SocketAddr {
        match self {
            Target::Policy(live) => live.upstream,
            Target::Bare(addr) => *addr,
        }
    }
}

/// How a forwarded request ended.
struct Forwarded {
    status: u16,
    error: Option<Box<Error>>,
    /// The client connection can serve another request.
    keep: bool,
}

/// Where an exchange broke before the upstream's answer was written to the client.
enum Broke {
    Upstream(Box<Error>),
    /// Reading the client's body failed (malformed chunking, a reset).
    Downstream(Box<Error>),
    /// The client's body came slower than the configured floor.
    SlowBody,
}

fn up(mut e: Box<Error>) -> Box<Error> {
    e.as_up();
    e
}

fn client_ip(d: &Downstream) -> Option<std::net::IpAddr> {
    d.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
}

fn expects_continue(d: &Downstream) -> bool {
    d.req_header()
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// An upgrade request: `Upgrade` with `upgrade` among the `Connection` options (RFC 9110
/// §7.8; pingora's own test looks at `Upgrade` alone). Anything else is forwarded as a plain
/// request, its `Upgrade` dropped as hop-by-hop.
fn asks_upgrade(d: &Downstream) -> bool {
    d.is_upgrade_req()
        && d.req_header()
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// The body length the client declared. A `Content-Length` beside `Transfer-Encoding` never
/// counts: pingora's server session drops it while reading the head (it frames by the coding,
/// RFC 9112 §6.3), which the test below pins, so a small declared length cannot make a denial
/// drain a chunked body of any size.
fn declared_length(d: &Downstream) -> Option<u64> {
    let v = d.req_header().headers.get(header::CONTENT_LENGTH)?;
    std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()
}

/// RFC 9110 §9.2.2.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The connection failed under the request (reset, closed, unwritable) rather than the
/// upstream answering something unreadable or late.
fn connection_lost(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
    )
}

fn informational(u: &Upstream) -> bool {
    u.resp_header()
        .is_some_and(|r| r.status.is_informational() && r.status != http::StatusCode::SWITCHING_PROTOCOLS)
}

/// The status a failure is answered with (0: nobody to answer).
fn status_of(e: &Error) -> u16 {
    use pingora::ErrorSource;
    use ErrorType::*;
    match (e.etype(), e.esource()) {
        (HTTPStatus(code), _) => *code,
        (ConnectTimedout | ReadTimedout | WriteTimedout, ErrorSource::Upstream) => 504,
        (_, ErrorSource::Upstream) => 502,
        // The client is gone.
        (WriteError | ReadError | ConnectionClosed, ErrorSource::Downstream) => 0,
        (_, ErrorSource::Downstream) => 400,
        _ => 500,
    }
}

/// Writes one of core's JSON answers.
async fn answer_json(
    d: &mut Downstream,
    r: &DenialResponse,
    request_id: &HeaderValue,
) -> pingora::Result<()> {
    let head = ResponseHeader::from(forward::json_head(r, request_id)?);
    d.write_response_header(Box::new(head)).await?;
    d.write_body(r.body.as_bytes()).await?;
    d.finish_body().await?;
    Ok(())
}

impl Client<'_> {
    /// Serves one request; the client stream when the connection goes on.
    pub(super) async fn serve(&mut self, down: Stream) -> Option<Stream> {
        let mut d = Downstream::new(down);
        self.read_head(&mut d).await?;
        let start = Instant::now();
        self.served += 1;
        d.respect_keepalive();
        if self.served >= self.app.limits.max_requests {
            d.set_server_keepalive(None);
        }
        let app = self.app;
        if d.req_header().method == Method::CONNECT {
            // As pingora-proxy: a tunnel is not a request this proxy judges or forwards.
            d.set_server_keepalive(None);
            let id = app.mint_request_id();
            let _ = answer_json(&mut d, &DenialResponse::proxy_failure(405), &id).await;
            return None;
        }
        let (request_id, decision, target) = match &app.gate {
            Gate::Policy(shared) => {
                let live = shared.live.load_full();
                let peer = Peer {
                    ip: client_ip(&d),
                    cert: d
                        .digest()
                        .ssl_digest
                        .as_ref()
                        .and_then(|s| s.extension.get::<PeerCert>()),
                };
                let (id, decision) = policy::judge(shared, &live, d.req_header(), peer).await;
                (id, decision, Target::Policy(live))
            }
            Gate::Bare { upstream } => {
                let pass = Pass {
                    verdict: Verdict::Public {
                        forward_authorization: true,
                    },
                    rewritten_path: None,
                    shadow: None,
                };
                (HeaderValue::from_static(""), Ok(pass), Target::Bare(*upstream))
            }
        };
        let (decided, outcome) = match &decision {
            Err(refusal) => (
                Decided::Denied,
                self.deny(&mut d, &refusal.denial, &request_id).await,
            ),
            Ok(pass) => {
                let decided = match pass.verdict {
                    Verdict::Allowed { .. } => Decided::Allowed,
                    Verdict::Public { .. } => Decided::Public,
                };
                (decided, self.forward(&mut d, &target, pass, &request_id).await)
            }
        };
        app.metrics.latency(decided, start.elapsed().as_secs_f64());
        if let Target::Policy(_) = target {
            self.log(&d, start, &request_id, &decision, &outcome);
        }
        if !outcome.keep {
            return None;
        }
        Some(d.reuse().await.ok()??.into_parts().0)
    }

    /// Reads the next request head, within its deadline; `None` closes the connection.
    async fn read_head(&mut self, d: &mut Downstream) -> Option<()> {
        let limits = self.app.limits;
        let metrics = &self.app.metrics;
        let (limit, reason) = if self.served == 0 {
            (limits.header_read_timeout, "header_timeout")
        } else {
            (limits.idle_timeout, "idle_timeout")
        };
        self.app.table.idle(&self.conn);
        if *self.shutdown.borrow() {
            return None;
        }
        self.timer.as_mut().reset((Instant::now() + limit).into());
        let read = tokio::select! {
            biased;
            r = d.read_request() => r,
            _ = &mut self.timer => {
                metrics.connection_closed(reason);
                return None;
            }
            _ = self.conn.shed() => {
                metrics.connection_closed("shed");
                return None;
            }
            // Idle connections close when the server is told to stop.
            _ = self.shutdown.changed() => return None,
        };
        match read {
            Ok(Some(_)) => {
                self.conn.busy();
                self.head_at = Instant::now();
                Some(())
            }
            // The client closed between requests.
            Ok(None) => None,
            Err(e) => {
                // A head that is not HTTP gets a 400 (JSON, like every refusal) and the
                // connection closes; a broken connection gets nothing.
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                    tracing::debug!(error = %e, "unreadable request head");
                    d.set_server_keepalive(None);
                    let id = self.app.mint_request_id();
                    let _ = answer_json(d, &DenialResponse::proxy_failure(400), &id).await;
                }
                None
            }
        }
    }

    /// Answers a denial. A small body is read and dropped so the connection stays usable; a
    /// larger or chunked one, or one the client waits to send (`Expect: 100-continue`), is not
    /// read, and the answer says `Connection: close`.
    async fn deny(&mut self, d: &mut Downstream, denial: &Denial, request_id: &HeaderValue) -> Forwarded {
        if !d.is_body_done() {
            let small = declared_length(d).is_some_and(|n| n <= DRAIN_LIMIT) && !expects_continue(d);
            let drained = small
                && matches!(
                    tokio::time::timeout(DRAIN_TIMEOUT, d.drain_request_body()).await,
                    Ok(Ok(()))
                );
            if !drained {
                d.set_server_keepalive(None);
            }
        }
        if *self.shutdown.borrow() {
            d.set_server_keepalive(None);
        }
        let r = denial.response();
        let keep = answer_json(d, &r, request_id).await.is_ok();
        Forwarded {
            status: r.status,
            error: None,
            keep,
        }
    }

    /// Answers a failure before any of the upstream's answer reached the client: JSON with the
    /// status for its cause; the client connection stays when its request was read whole.
    async fn fail(&mut self, d: &mut Downstream, e: Box<Error>, request_id: &HeaderValue) -> Forwarded {
        let status = status_of(&e);
        if *e.esource() == pingora::ErrorSource::Upstream {
            self.app.metrics.upstream_error(e.etype().as_str());
        }
        if status == 0 {
            return Forwarded {
                status,
                error: Some(e),
                keep: false,
            };
        }
        if !d.is_body_done() || *self.shutdown.borrow() {
            d.set_server_keepalive(None);
        }
        let keep = answer_json(d, &DenialResponse::proxy_failure(status), request_id)
            .await
            .is_ok();
        Forwarded {
            status,
            error: Some(e),
            keep,
        }
    }

    /// The head sent upstream: one copy of the client's, without pingora's case-preserving
    /// name map (`forward`), with the sidecar's edits. Built again for a retry rather than
    /// copied ahead of one that rarely happens.
    fn upstream_head(
        d: &Downstream,
        target: &Target,
        pass: &Pass,
        request_id: &HeaderValue,
        upgrade: bool,
        expect_continue: bool,
    ) -> pingora::Result<Box<RequestHeader>> {
        let mut req = d.req_header().as_owned_parts();
        // Room for what the sidecar adds, so the map grows once at most.
        req.headers.reserve(10);
        match target {
            Target::Policy(live) => forward::rewrite_request(
                &mut req,
                pass,
                request_id,
                client_ip(d),
                live.forwarded_for,
                upgrade,
            )?,
            Target::Bare(_) => {
                forward::strip_hop_by_hop(&mut req, upgrade);
                forward::frame_body(&mut req)?
            }
        }
        // Answered here once the request is allowed (as Envoy does): the upstream gets the
        // body without waiting.
        if expect_continue {
            req.headers.remove(header::EXPECT);
        }
        Ok(Box::new(RequestHeader::from(req)))
    }

    async fn forward(
        &mut self,
        d: &mut Downstream,
        target: &Target,
        pass: &Pass,
        request_id: &HeaderValue,
    ) -> Forwarded {
        let upgrade = asks_upgrade(d);
        let expect_continue = expects_continue(d) && !d.is_body_done();
        let upstream_addr = target.upstream();
        let mut req = match Self::upstream_head(d, target, pass, request_id, upgrade, expect_continue) {
            Ok(r) => r,
            Err(mut e) => {
                // A request that cannot be forwarded as judged (a Content-Length list that
                // does not agree): refused, and the body it frames is not read.
                e.as_down();
                d.set_server_keepalive(None);
                return self.fail(d, e, request_id).await;
            }
        };
        let lease = match self.upstream.lease(upstream_addr).await {
            Ok(l) => l,
            Err(e) => return self.fail(d, up(e), request_id).await,
        };
        // A kept connection the upstream closed in the instant before we used it (its idle
        // timeout, a restart) fails the request before any answer: an idempotent request
        // without a body is sent once more on a new connection (RFC 9110 §9.2.2, nginx's
        // proxy_next_upstream); anything else gets its 502.
        let mut may_retry = lease.reused && d.is_body_done() && idempotent(&req.method);
        let mut u = Upstream::new(lease.stream);
        let early = loop {
            match self.send(d, &mut u, req, expect_continue).await {
                Ok(early) => break early,
                Err(Broke::Upstream(e)) if may_retry && connection_lost(&e) => {
                    may_retry = false;
                    tracing::debug!(error = %e, "kept upstream connection lost; sending again on a new one");
                    req = match Self::upstream_head(d, target, pass, request_id, upgrade, expect_continue) {
                        Ok(r) => r,
                        Err(e) => return self.fail(d, e, request_id).await,
                    };
                    u = match upstream::connect(upstream_addr).await {
                        Ok(s) => Upstream::new(s),
                        Err(e) => return self.fail(d, up(e), request_id).await,
                    };
                }
                Err(Broke::Upstream(e)) => return self.fail(d, e, request_id).await,
                Err(Broke::Downstream(mut e)) => {
                    e.as_down();
                    d.set_server_keepalive(None);
                    return self.fail(d, e, request_id).await;
                }
                Err(Broke::SlowBody) => {
                    self.app.metrics.connection_closed("slow_body");
                    return Forwarded {
                        status: 0,
                        error: None,
                        keep: false,
                    };
                }
            }
        };
        self.respond(d, u, target, pass, request_id, early).await
    }

    /// Sends the request head and body, and reads the answer's head. `Ok(true)` when the
    /// upstream answered before the whole body was sent (the rest is not forwarded).
    async fn send(
        &mut self,
        d: &mut Downstream,
        u: &mut Upstream,
        req: Box<RequestHeader>,
        expect_continue: bool,
    ) -> Result<bool, Broke> {
        u.write_request_header(req)
            .await
            .map_err(|e| Broke::Upstream(up(e)))?;
        if expect_continue {
            d.write_continue_response().await.map_err(Broke::Downstream)?;
        }
        let early = if d.is_body_done() {
            false
        } else {
            self.pump_body(d, u).await?
        };
        if !early {
            u.finish_body().await.map_err(|e| Broke::Upstream(up(e)))?;
            u.read_response().await.map_err(|e| Broke::Upstream(up(e)))?;
        }
        // 1xx other than 101 are not relayed (`Expect` was answered here): read on.
        while informational(u) {
            u.read_response().await.map_err(|e| Broke::Upstream(up(e)))?;
        }
        Ok(early)
    }

    /// Streams the client's body to the upstream under the body-rate floor, while watching for
    /// an early answer. `Ok(true)` when the upstream answered first.
    async fn pump_body(&mut self, d: &mut Downstream, u: &mut Upstream) -> Result<bool, Broke> {
        let limits = self.app.limits;
        let head_at = self.head_at;
        let mut bytes = 0u64;
        self.timer
            .as_mut()
            .reset((head_at + limits.body_allowance(0)).into());
        loop {
            tokio::select! {
                biased;
                r = u.read_response() => {
                    r.map_err(|e| Broke::Upstream(up(e)))?;
                    if !informational(u) {
                        return Ok(true);
                    }
                }
                chunk = d.read_body_bytes() => match chunk {
                    Ok(Some(b)) => {
                        bytes += b.len() as u64;
                        u.write_body(&b).await.map_err(|e| Broke::Upstream(up(e)))?;
                        self.timer.as_mut().reset((head_at + limits.body_allowance(bytes)).into());
                    }
                    Ok(None) => return Ok(false),
                    Err(e) => return Err(Broke::Downstream(e)),
                },
                _ = &mut self.timer => {
                    let allowed = limits.body_allowance(bytes);
                    if head_at.elapsed() >= allowed {
                        return Err(Broke::SlowBody);
                    }
                    self.timer.as_mut().reset((head_at + allowed).into());
                }
            }
        }
    }

    /// Writes the upstream's answer to the client: its head with the request id and RateLimit
    /// headers, then its body; an accepted upgrade becomes a tunnel.
    #[allow(clippy::too_many_arguments)]
    async fn respond(
        &mut self,
        d: &mut Downstream,
        mut u: Upstream,
        target: &Target,
        pass: &Pass,
        request_id: &HeaderValue,
        early: bool,
    ) -> Forwarded {
        u.respect_keepalive();
        // pingora's client session lends its response head only by reference: one copy,
        // without the case-preserving name map.
        let Some(head) = u.resp_header() else {
            let e = Error::explain(ErrorType::InvalidHTTPHeader, "no response head");
            return self.fail(d, up(e), request_id).await;
        };
        let mut head = head.as_owned_parts();
        if let Target::Policy(_) = target {
            if let Err(e) = forward::decorate_response(&mut head, request_id, &pass.verdict) {
                return self.fail(d, e, request_id).await;
            }
        }
        let head = Box::new(ResponseHeader::from(head));
        if (early && !d.is_body_done()) || *self.shutdown.borrow() {
            // The rest of the client's body is not read: the connection cannot carry another.
            d.set_server_keepalive(None);
        }
        let status = head.status.as_u16();
        if d.write_response_header(head).await.is_err() {
            return Forwarded {
                status,
                error: None,
                keep: false,
            };
        }
        if d.was_upgraded() {
            u.maybe_upgrade_body_writer();
            tunnel(d, &mut u).await;
            return Forwarded {
                status,
                error: None,
                keep: false,
            };
        }
        loop {
            match u.read_body_ref().await {
                Ok(Some(chunk)) => {
                    if d.write_body(chunk).await.is_err() {
                        // The client is gone; the upstream's answer is left unread.
                        return Forwarded {
                            status,
                            error: None,
                            keep: false,
                        };
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // Too late for another answer: the client sees the connection close
                    // before the body's end.
                    let e = up(e);
                    self.app.metrics.upstream_error(e.etype().as_str());
                    return Forwarded {
                        status,
                        error: Some(e),
                        keep: false,
                    };
                }
            }
        }
        let keep = d.finish_body().await.is_ok();
        // Kept only when both the request and the answer went through whole.
        if !early {
            if let Some(stream) = u.reuse().await {
                self.upstream.keep(target.upstream(), stream);
            }
        }
        Forwarded {
            status,
            error: None,
            keep,
        }
    }

    /// The access log line (target `permiso::access`), built only when it is written.
    fn log(
        &self,
        d: &Downstream,
        start: Instant,
        request_id: &HeaderValue,
        decision: &Result<Pass, Refusal>,
        outcome: &Forwarded,
    ) {
        if !tracing::enabled!(target: "permiso::access", tracing::Level::INFO) {
            return;
        }
        let req = d.req_header();
        let (decision, service_id, key_id, grace_key, shadow_denial) = match decision {
            Err(Refusal { denial, caller }) => (
                denial.reason(),
                caller.as_ref().map(|p| p.service.id.clone()),
                caller.as_ref().map(|p| p.credential_id().to_string()),
                caller.as_ref().is_some_and(|p| p.grace_key()),
                None,
            ),
            Ok(Pass {
                verdict: Verdict::Allowed { principal, .. },
                shadow,
                ..
            }) => (
                "allowed",
                Some(principal.service.id.clone()),
                Some(principal.credential_id().to_string()),
                principal.grace_key(),
                shadow.as_ref().map(Denial::reason),
            ),
            Ok(Pass {
                verdict: Verdict::Public { .. },
                shadow,
                ..
            }) => ("public", None, None, false, shadow.as_ref().map(Denial::reason)),
        };
        tracing::info!(
            target: "permiso::access",
            request_id = %request_id.to_str().unwrap_or("-"),
            method = %req.method,
            path = req.uri.path(),
            status = outcome.status,
            decision,
            service_id = service_id.as_deref(),
            key_id = key_id.as_deref(),
            grace_key = grace_key.then_some(true),
            shadow_denial,
            latency_us = start.elapsed().as_micros() as u64,
            error = outcome.error.as_ref().map(|e| e.to_string()),
        );
    }
}

/// An accepted upgrade (`101 Switching Protocols`): bytes both ways as they come, until either
/// side closes; then both connections close.
async fn tunnel(d: &mut Downstream, u: &mut Upstream) {
    loop {
        tokio::select! {
            r = d.read_body_bytes() => match r {
                Ok(Some(b)) => {
                    if u.write_body(&b).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
            r = u.read_body_ref() => match r {
                Ok(Some(b)) => {
                    if d.write_body(b).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request head read by pingora's server session from a real loopback connection (the
    /// client side is returned so it stays open).
    async fn head(raw: &'static [u8]) -> (Downstream, tokio::net::TcpStream) {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        c.write_all(raw).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let mut d = Downstream::new(Box::new(pingora::protocols::l4::stream::Stream::from(s)));
        d.read_request().await.unwrap().unwrap();
        (d, c)
    }

    #[tokio::test]
    async fn only_a_content_length_that_frames_the_body_counts_as_declared() {
        let cl = head(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n").await;
        assert_eq!(declared_length(&cl.0), Some(5));
        let both =
            head(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
        assert_eq!(declared_length(&both.0), None);
        let none = head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(declared_length(&none.0), None);
    }
}
