//! Bounds on the proxy listener's client connections, around pingora's HTTP app: a deadline
//! for each request head (a new connection gets `header_read_timeout`, a kept-alive one
//! `idle_timeout` to send its next one: pingora alone re-arms its 60 s timer on every byte, so a
//! client trickling one header line every few seconds is never cut), and at most
//! `max_connections` open at once, the oldest idle one shed for a new one (`conn_limit`).
//!
//! pingora calls `process_new` once per request (and again with the same stream for the next
//! request on a kept-alive connection), in one task with the proxy's hooks, so the proxy marks
//! "head read" through a task-local (`head_read`), and the deadline stops applying.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::conn_limit::{Admission, Conn, ConnTable};
use crate::sidecar::metrics::SidecarMetrics;

struct HeadSignal {
    done: AtomicBool,
    conn: Arc<Conn>,
}

tokio::task_local! {
    static HEAD: Arc<HeadSignal>;
}

/// Called by the proxy once it has a request head: the connection is busy, the head deadline
/// no longer applies. A no-op outside a guarded listener.
pub fn head_read() {
    let _ = HEAD.try_with(|h| {
        h.done.store(true, Ordering::Relaxed);
        h.conn.busy();
    });
}

pub struct Guarded<A> {
    pub inner: Arc<A>,
    pub table: Arc<ConnTable>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub metrics: Arc<SidecarMetrics>,
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
        self.table.idle(&conn);
        let signal = Arc::new(HeadSignal {
            done: AtomicBool::new(false),
            conn: conn.clone(),
        });
        let served = HEAD.scope(signal.clone(), self.inner.process_new(stream, shutdown));
        tokio::pin!(served);
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        let mut watching = true;
        let out = loop {
            tokio::select! {
                r = &mut served => break r,
                _ = &mut deadline, if watching => {
                    if signal.done.load(Ordering::Relaxed) {
                        watching = false;
                        continue;
                    }
                    // Dropping the request future closes the connection.
                    self.metrics.connection_closed(timeout_reason);
                    break None;
                }
                _ = conn.shed(), if watching => {
                    if signal.done.load(Ordering::Relaxed) {
                        watching = false;
                        continue;
                    }
                    self.metrics.connection_closed("shed");
                    break None;
                }
            }
        };
        if out.is_none() {
            self.table.remove(key, &conn);
        }
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
