//! The admin plane's accept loop: hyper's HTTP/1 server with the limits axum::serve does not
//! expose. Everything an outside client controls is bounded: header bytes, time to send the
//! headers, open connections, requests per connection (the last response says
//! `Connection: close`); body size and
//! body read time are bounded in `extract`. Shutdown stops accepting and lets in-flight
//! requests (long polls end at once through `Inner::shutdown`) finish.

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

/// The limits that apply to each connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub max_requests_per_connection: u32,
    /// Open connections at once; further clients wait in the listen backlog.
    pub max_connections: usize,
}

/// Serves `app` until `shutdown` turns true, then waits for open requests to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
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
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "admin plane: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let served = Arc::new(AtomicU32::new(0));
        let max = limits.max_requests_per_connection;
        let svc = app
            .clone()
            .map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.map(axum::body::Body::new)
            })
            .map_response(move |mut resp: axum::response::Response| {
                if served.fetch_add(1, Ordering::Relaxed) + 1 >= max {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            });
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(svc),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            // Errors here are the client's (reset, malformed, too slow): nothing to report.
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
    drop(listener);
    // Long polls end at once on shutdown; anything else gets a bounded wait.
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}
