//! Ending a SIGTERM early. pingora's graceful shutdown stops accepting, tells every connection
//! to finish, then sleeps the whole `grace_period_seconds` (`shutdown_grace_seconds`) whatever
//! is left in flight. This watches the proxy's connection table from that point and says when
//! the last connection has closed, so the process exits as soon as it is drained: at once when
//! idle, after the slowest in-flight request otherwise, and never later than the grace.
//!
//! With an egress listener the local service may still be calling out while it shuts down
//! (it got the same SIGTERM): the process then also waits until no egress call is in flight
//! and none has ended for `EGRESS_QUIET`, so those calls are not refused early.

use std::sync::Arc;
use std::time::Duration;

use pingora::server::ExecutionPhase;
use tokio::sync::broadcast;

use crate::conn_limit::ConnTable;
use crate::sidecar::egress::Egress;

/// How long the egress listener must have been quiet before a drained SIGTERM ends the
/// process.
pub const EGRESS_QUIET: Duration = Duration::from_secs(1);

/// How often the table is looked at during the grace period (a 20 ms late exit is nothing
/// next to a grace of seconds).
const POLL: Duration = Duration::from_millis(20);

/// Blocks until the server is in its grace period and `connections` is empty (true), or until
/// the server ends without a grace period (false: SIGINT, or the phases channel closed).
pub fn drained_after_term(
    mut phases: broadcast::Receiver<ExecutionPhase>,
    connections: Arc<ConnTable>,
    egress: Option<Arc<Egress>>,
) -> bool {
    loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownGracePeriod) => break,
            Ok(ExecutionPhase::ShutdownRuntimes | ExecutionPhase::Terminated) => return false,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return false,
        }
    }
    // Idle keep-alive connections close on the shutdown broadcast; busy ones after their
    // current exchange.
    while !connections.is_empty() || egress.as_ref().is_some_and(|e| !e.idle_for(EGRESS_QUIET)) {
        std::thread::sleep(POLL);
    }
    true
}
