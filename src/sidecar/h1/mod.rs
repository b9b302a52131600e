//! The sidecar's HTTP/1 request path: a pingora `ServerApp` on pingora-core's HTTP/1 server
//! and client sessions, owning each client connection for its whole life (pingora's server
//! still accepts, terminates TLS, runs the worker threads and drains on shutdown).
//!
//! Why not pingora-proxy: for a keep-alive request it returns the upstream connection to a
//! shared pool (allocations and an idle-watch task spawned per request), boxes a future per
//! hook, runs the two halves under `try_join!` with channels, and can only keep the client
//! connection after an upstream failure by closing it. Here each client connection pins one
//! upstream connection (`upstream`), the request head is judged by `policy` and rewritten by
//! `forward`, and one task does the whole exchange (`exchange`).
//!
//! The connection's bounds live in its loop (no task-local signalling): a deadline for each
//! request head (`header_read_timeout` for the first, `idle_timeout` for the next ones: a
//! client trickling one header line every few seconds is cut), a floor on the request body's
//! rate after `body_rate_grace`, `max_requests` per connection, at most `max_connections` open
//! (the oldest idle one shed for a new one, `conn_limit`), and on shutdown idle connections
//! close while busy ones finish their request with `Connection: close`.

mod exchange;
pub mod upstream;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::HeaderValue;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::time::Sleep;

use crate::conn_limit::{Admission, Conn, ConnTable};
use crate::sidecar::metrics::SidecarMetrics;
use crate::sidecar::state::Shared;

/// Per-connection bounds, fixed at start (a reload does not change them).
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_rate_grace: Duration,
    /// Bytes a second.
    pub body_min_rate: u64,
    /// Requests served on one client connection; the last one is answered with
    /// `Connection: close` (nginx's `keepalive_requests`).
    pub max_requests: u32,
}

impl ConnLimits {
    /// How long after its head a request body of `bytes` so far may have taken.
    fn body_allowance(&self, bytes: u64) -> Duration {
        self.body_rate_grace + Duration::from_secs_f64(bytes as f64 / self.body_min_rate.max(1) as f64)
    }
}

/// What stands between the client and the upstream.
pub enum Gate {
    /// The sidecar: each request judged under the live config and snapshot, then forwarded
    /// with the identity and forwarding headers, or answered with its denial.
    Policy(Arc<Shared>),
    /// `permiso passthrough`: the same transport with no policy and no edits beyond the
    /// hop-by-hop ones, to `upstream`; the load bench's baseline, so the difference between
    /// the two is what authentication and identity cost.
    Bare { upstream: SocketAddr },
}

pub struct H1Sidecar {
    pub gate: Gate,
    pub metrics: Arc<SidecarMetrics>,
    pub table: Arc<ConnTable>,
    pub limits: ConnLimits,
}

impl H1Sidecar {
    /// A request id for an answer given before a request was judged (a malformed head, a
    /// CONNECT): minted by the sidecar, none from the bare passthrough.
    fn mint_request_id(&self) -> HeaderValue {
        match &self.gate {
            Gate::Policy(shared) => shared.request_ids.keep_or_mint(None),
            Gate::Bare { .. } => HeaderValue::from_static(""),
        }
    }
}

/// Forgets the connection when it ends, however it ends (closed, cut, a panic), so the table
/// never keeps an entry for a dead file descriptor.
struct Entry<'a> {
    table: &'a ConnTable,
    key: u64,
    conn: Arc<Conn>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        self.table.remove(self.key, &self.conn);
    }
}

/// One client connection's state across its requests.
struct Client<'a> {
    app: &'a H1Sidecar,
    conn: Arc<Conn>,
    shutdown: ShutdownWatch,
    upstream: upstream::UpstreamSlot,
    served: u32,
    /// When the current request's head was read: its body's rate is measured from there.
    head_at: Instant,
    /// One timer per connection, re-armed for each deadline (no allocation per request).
    timer: Pin<Box<Sleep>>,
}

#[async_trait]
impl ServerApp for H1Sidecar {
    /// The whole connection in one call: the pinned upstream and the timer live as long as it.
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // The file descriptor: unique among open connections.
        let key = stream.id() as u64;
        let conn = match self.table.admit(key) {
            Admission::New(c) | Admission::Known(c) => c,
            Admission::Refused => {
                self.metrics.connection_closed("refused");
                return None;
            }
        };
        let _entry = Entry {
            table: &self.table,
            key,
            conn: conn.clone(),
        };
        let mut client = Client {
            app: self,
            conn,
            shutdown: shutdown.clone(),
            upstream: Default::default(),
            served: 0,
            head_at: Instant::now(),
            timer: Box::pin(tokio::time::sleep(self.limits.header_read_timeout)),
        };
        let mut down = stream;
        while let Some(next) = client.serve(down).await {
            down = next;
        }
        None
    }
}
