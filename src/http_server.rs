//! The accept loop for our axum apps (the admin plane, the sidecar's health listener): hyper's
//! HTTP/1 server with the limits axum::serve does not expose. Everything an outside client
//! controls is bounded: header bytes, time to send the headers, open connections, requests per
//! connection (the last response says `Connection: close`); the admin plane bounds body size
//! and body read time in `admin::extract`. At the connection limit, new clients either wait in
//! the listen backlog (the admin plane) or take the place of the oldest idle connection (the
//! health listener, whose probes must get through a flood). Shutdown stops accepting and lets
//! in-flight requests (long polls end at once through `Inner::shutdown`) finish.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::conn_limit::{Admission, ConnTable};

/// The limits that apply to each connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub max_requests_per_connection: u32,
    /// Open connections at once; see `at_capacity` for what happens to more.
    pub max_connections: usize,
    pub at_capacity: AtCapacity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtCapacity {
    /// Further clients wait in the kernel's listen backlog until a connection closes.
    Wait,
    /// The oldest idle connection is closed for the new one (`conn_limit`); with none idle,
    /// the new one is closed.
    ShedOldestIdle,
}

/// A connection's byte stream, plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The client certificate a TLS connection presented (DER of the leaf), as a request
/// extension; absent on plain connections and on TLS ones without a certificate.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<Vec<u8>>);

/// Serves `app` until `shutdown` turns true, then waits for open requests to finish. With
/// `tls`, each connection's handshake must complete within the header-read timeout.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let slots = Arc::new(tokio::sync::Semaphore::new(match limits.at_capacity {
        AtCapacity::Wait => limits.max_connections,
        // Slots are not what bounds connections then: the table is.
        AtCapacity::ShedOldestIdle => tokio::sync::Semaphore::MAX_PERMITS,
    }));
    let table = ConnTable::new(limits.max_connections);
    let mut next_key = 0u64;
    loop {
        // Take a slot before accepting: at the limit, new clients wait in the kernel's backlog
        // instead of each costing a task and a file descriptor here.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            // Out of file descriptors and the like: back off instead of spinning.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next_key += 1;
        let key = next_key;
        let tracked = match limits.at_capacity {
            AtCapacity::Wait => None,
            AtCapacity::ShedOldestIdle => match table.admit(key) {
                Admission::New(c) | Admission::Known(c) => {
                    table.idle(&c);
                    Some(c)
                }
                Admission::Refused => {
                    tracing::debug!(%peer, "at the connection limit with every connection busy: closing the new one");
                    continue;
                }
            },
        };
        let served = Arc::new(AtomicU32::new(0));
        let max = limits.max_requests_per_connection;
        let (app, http, watcher, table, acceptor) = (
            app.clone(),
            http.clone(),
            graceful.watcher(),
            table.clone(),
            acceptor.clone(),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let accepted: Result<(Box<dyn Io>, Option<PeerCertificate>), String> = match acceptor {
                None => Ok((Box::new(stream), None)),
                Some(a) => match tokio::time::timeout(limits.header_read_timeout, a.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let cert = s
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| PeerCertificate(Arc::new(c.to_vec())));
                        Ok((Box::new(s), cert))
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".into()),
                },
            };
            let (io, peer_cert) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    crate::telemetry::tls_handshake_failed();
                    if let Some(c) = &tracked {
                        table.remove(key, c);
                    }
                    return;
                }
            };
            let (busy, idle) = (tracked.clone(), tracked.clone());
            let table_for_idle = table.clone();
            let svc = app
                .map_request(move |mut req: Request<hyper::body::Incoming>| {
                    if let Some(c) = &busy {
                        c.busy();
                    }
                    req.extensions_mut().insert(ConnectInfo(peer));
                    if let Some(cert) = &peer_cert {
                        req.extensions_mut().insert(cert.clone());
                    }
                    req.map(axum::body::Body::new)
                })
                .map_response(move |mut resp: axum::response::Response| {
                    if let Some(c) = &idle {
                        table_for_idle.idle(c);
                    }
                    if served.fetch_add(1, Ordering::Relaxed) + 1 >= max {
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    resp
                });
            let conn = http.serve_connection(
                TokioIo::new(io),
                hyper_util::service::TowerToHyperService::new(svc),
            );
            let conn = watcher.watch(conn);
            let ended = match &tracked {
                // Dropping the connection future closes it.
                Some(c) => tokio::select! {
                    r = conn => r,
                    _ = c.shed() => Ok(()),
                },
                None => conn.await,
            };
            if let Some(c) = &tracked {
                table.remove(key, c);
            }
            // Errors here are the client's (reset, malformed, too slow): nothing to report.
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    // Long polls end at once on shutdown; anything else gets a bounded wait.
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}
