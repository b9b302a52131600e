//! Injectable wall clock: grace ends, token expiry and rate limits all read time through it, so
//! tests move time forward instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_nanos(&self) -> u64;

    /// Whole seconds since the Unix epoch.
    fn now_secs(&self) -> i64 {
        (self.now_nanos() / 1_000_000_000) as i64
    }
}

/// The machine's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_nanos(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}

/// The real wall clock in Unix milliseconds, for figures compared across machines (sync lag),
/// never for decisions: those read the injected `Clock`.
pub fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A clock that only moves when told to. Cloning shares the same time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Starts at the current real time, so timestamps look plausible in responses.
    pub fn starting_now() -> Self {
        Self::at_nanos(SystemClock.now_nanos())
    }

    pub fn at_nanos(nanos: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(nanos)))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Moves time backwards (to test clock skew: a token from a clock that runs ahead).
    pub fn rewind(&self, by: Duration) {
        self.0.fetch_sub(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub type SharedClock = Arc<dyn Clock>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced_and_clones_share_time() {
        let c = ManualClock::at_nanos(5_000_000_000);
        let c2 = c.clone();
        assert_eq!(c.now_secs(), 5);
        c2.advance(Duration::from_secs(3));
        assert_eq!(c.now_secs(), 8);
        assert_eq!(c.now_nanos(), 8_000_000_000);
    }
}
