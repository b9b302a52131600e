//! Bounds on the proxy listener's client connections, around pingora's HTTP app:
//! - a deadline for each request head: a new connection gets `header_read_timeout`, a
//!   kept-alive one `idle_timeout` to send its next one (pingora alone re-arms its 60 s timer on
//!   every byte, so a client trickling one header line every few seconds is never cut);
//! - a floor on the request body's rate once the head is in: after `body_rate_grace`, at least
//!   `body_min_rate` bytes a second on average, or the connection is closed (a client sending a
//!   large Content-Length and then a byte now and then would otherwise hold its connection busy,
//!   and busy connections are never shed);
//! - at most `max_connections` open at once, the oldest idle one shed for a new one
//!   (`conn_limit`).
//!
//! pingora calls `process_new` once per request (and again with the same stream for the next
//! request on a kept-alive connection), in one task with the proxy's hooks, so the proxy
//! reports "head read" and body progress through a task-local (`head_read`, `body_progress`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::conn_limit::{Admission, Conn, ConnTable};
use crate::sidecar::metrics::SidecarMetrics;

struct HeadSignal {
    head_at: OnceLock<Instant>,
    body_bytes: AtomicU64,
    body_done: AtomicBool,
    conn: Arc<Conn>,
}

tokio::task_local! {
    static HEAD: Arc<HeadSignal>;
}

/// Called by the proxy once it has a request head: the connection is busy, the head deadline
/// no longer applies (the body's rate floor does). A no-op outside a guarded listener.
pub fn head_read() {
    let _ = HEAD.try_with(|h| {
        let _ = h.head_at.set(Instant::now());
        h.conn.busy();
    });
}

/// Called by the proxy as request body bytes arrive; `done` once the body is complete (or
/// there is none).
pub fn body_progress(bytes: usize, done: bool) {
    let _ = HEAD.try_with(|h| {
        h.body_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if done {
            h.body_done.store(true, Ordering::Relaxed);
        }
    });
}

pub struct Guarded<A> {
    pub inner: Arc<A>,
    pub table: Arc<ConnTable>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_rate_grace: Duration,
    /// Bytes a second.
    pub body_min_rate: u64,
    pub metrics: Arc<SidecarMetrics>,
}

/// Forgets the connection when its request future ends without handing the stream back
/// (closed, cut, or a panic in a hook), so the table never keeps an entry for a dead fd.
struct Entry<'a> {
    table: &'a ConnTable,
    key: u64,
    conn: Arc<Conn>,
    reused: bool,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if !self.reused {
            self.table.remove(self.key, &self.conn);
        }
    }
}

enum Phase {
    Head,
    Body,
    Done,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // The file descriptor: unique among open connections.
        let key = stream.id() as u64;
        let (conn, limit, timeout_reason) = match self.table.admit(key) {
            Admission::Known(c) => (c, self.idle_timeout, "idle_timeout"),
            Admission::New(c) => (c, self.header_read_timeout, "header_timeout"),
            Admission::Refused => {
                self.metrics.connection_closed("refused");
                return None;
            }
        };
        let mut entry = Entry {
            table: &self.table,
            key,
            conn: conn.clone(),
            reused: false,
        };
        self.table.idle(&conn);
        let signal = Arc::new(HeadSignal {
            head_at: OnceLock::new(),
            body_bytes: AtomicU64::new(0),
            body_done: AtomicBool::new(false),
            conn: conn.clone(),
        });
        let served = HEAD.scope(signal.clone(), self.inner.process_new(stream, shutdown));
        tokio::pin!(served);
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        let mut phase = Phase::Head;
        let out = loop {
            tokio::select! {
                r = &mut served => break r,
                _ = &mut deadline, if !matches!(phase, Phase::Done) => {
                    let Some(head_at) = signal.head_at.get().copied() else {
                        // Dropping the request future closes the connection.
                        self.metrics.connection_closed(timeout_reason);
                        break None;
                    };
                    if signal.body_done.load(Ordering::Relaxed) {
                        phase = Phase::Done;
                        continue;
                    }
                    // The body so far buys this much time after the head, beyond the grace.
                    let bytes = signal.body_bytes.load(Ordering::Relaxed);
                    let allowed = self.body_rate_grace
                        + Duration::from_secs_f64(bytes as f64 / self.body_min_rate.max(1) as f64);
                    if head_at.elapsed() >= allowed {
                        self.metrics.connection_closed("slow_body");
                        break None;
                    }
                    phase = Phase::Body;
                    deadline.as_mut().reset((head_at + allowed).into());
                }
                _ = conn.shed(), if matches!(phase, Phase::Head) => {
                    if signal.head_at.get().is_some() {
                        // Chosen while idle, busy since: serve it. It is out of the table
                        // now; its next request comes back as a new connection.
                        phase = Phase::Body;
                        continue;
                    }
                    self.metrics.connection_closed("shed");
                    break None;
                }
            }
        };
        entry.reused = out.is_some();
        out
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Raises the soft file-descriptor limit to the hard one and returns both (0, 0 if unknown),
/// so a flood of connections meets `max_connections` before the process runs out.
pub fn raise_fd_limit() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (0, 0);
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return (hard, hard);
    }
    (soft, hard)
}

/// File descriptors kept for everything but client connections (upstream connections, the
/// snapshot file, sync, health, logs).
pub const FD_RESERVE: u64 = 512;

/// `max_connections`, lowered when the file-descriptor limit cannot hold it: each client
/// connection may need an upstream one too.
pub fn fit_max_connections(wanted: usize, fd_soft: u64) -> usize {
    if fd_soft == 0 {
        return wanted;
    }
    let room = (fd_soft.saturating_sub(FD_RESERVE) / 2).max(1) as usize;
    wanted.min(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_fits_the_descriptor_limit() {
        assert_eq!(fit_max_connections(10_000, 1_048_576), 10_000);
        assert_eq!(fit_max_connections(10_000, 1024), 256);
        assert_eq!(fit_max_connections(10_000, 100), 1);
        assert_eq!(fit_max_connections(10_000, 0), 10_000);
        let (soft, hard) = raise_fd_limit();
        assert!(soft > 0 && soft == hard, "soft {soft} raised to hard {hard}");
    }
}
