//! The upstream connection a client connection owns: opened on its first forwarded request,
//! kept while both sides keep alive, dropped when a reload points the sidecar elsewhere.
//! Replaces pingora's shared pool (one `Arc<Mutex>`, a oneshot, a `Notify` and an idle-watch
//! task per request): the sidecar fronts one local service, so a client connection never
//! needs anyone else's upstream connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pingora::protocols::Stream;
use pingora::{Error, ErrorType};
use tokio::io::ReadBuf;

/// How long opening the upstream connection may take (a local service: long enough for a
/// loaded host, short enough that a caller is not left waiting on a dead one).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Pinned {
    addr: SocketAddr,
    stream: Stream,
}

#[derive(Default)]
pub struct UpstreamSlot {
    pinned: Option<Pinned>,
}

/// A connection to send the next request on.
pub struct Lease {
    pub stream: Stream,
    /// Kept from an earlier request, or new.
    pub reused: bool,
}

impl UpstreamSlot {
    /// The kept connection to `addr`, if it is still open and quiet; otherwise a new one.
    pub async fn lease(&mut self, addr: SocketAddr) -> pingora::Result<Lease> {
        if let Some(mut p) = self.pinned.take() {
            if p.addr == addr && quiet(&mut p.stream) {
                return Ok(Lease {
                    stream: p.stream,
                    reused: true,
                });
            }
            // Closed by the upstream, or it sent bytes nobody asked for, or a reload moved
            // the upstream: dropped (closed) here.
        }
        Ok(Lease {
            stream: connect(addr).await?,
            reused: false,
        })
    }

    /// Keeps `stream` (returned by a finished exchange that left it reusable) for the next.
    pub fn keep(&mut self, addr: SocketAddr, stream: Stream) {
        self.pinned = Some(Pinned { addr, stream });
    }
}

/// True when nothing can be read from a kept connection now: no EOF, no error, no stray
/// bytes. One non-blocking poll, no wait; tokio answers from its readiness state when it knows
/// the socket has nothing, otherwise one `recv` that returns EAGAIN.
fn quiet(stream: &mut Stream) -> bool {
    let mut probe = [0u8; 1];
    let mut buf = ReadBuf::new(&mut probe);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(
        Pin::new(&mut **stream).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}

/// Opens a connection to the upstream, with Nagle off (requests and answers are small and
/// written whole).
pub async fn connect(addr: SocketAddr) -> pingora::Result<Stream> {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let kind = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                    ErrorType::ConnectNoRoute
                }
                _ => ErrorType::ConnectError,
            };
            return Err(Error::because(kind, format!("connecting to {addr}"), e));
        }
        Err(_) => {
            return Err(Error::explain(
                ErrorType::ConnectTimedout,
                format!("connecting to {addr}: no answer in {CONNECT_TIMEOUT:?}"),
            ))
        }
    };
    let _ = tcp.set_nodelay(true);
    Ok(Box::new(pingora::protocols::l4::stream::Stream::from(tcp)))
}
