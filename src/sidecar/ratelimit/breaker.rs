//! A lock-free circuit breaker for the shared limiter, on the injected clock: after
//! `threshold` consecutive failures it opens for `cooldown` (requests fall back at once,
//! without waiting out a timeout each); then one request tries Redis again and its result
//! closes or re-opens it. Transitions are reported once, to the caller that made them.
//!
//! (The egress breaker in `core::egress` sits behind a mutex with `Instant`s; this one is on
//! every cluster-scope request, so it is atomics, and on the sidecar's clock so tests can
//! move time instead of sleeping.)

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

pub struct Breaker {
    threshold: u32,
    cooldown_nanos: u64,
    failures: AtomicU32,
    /// Clock nanoseconds until which Redis is not tried; 0 when closed.
    open_until: AtomicU64,
    /// A half-open trial is in flight.
    trial: AtomicBool,
}

pub enum Try<'a> {
    /// Ask Redis, then report how it went on the attempt.
    Yes(Attempt<'a>),
    /// The breaker is open: fall back now.
    No,
}

/// One call to Redis. Dropping it unsettled (the request was cancelled) frees a trial slot,
/// so a cancelled trial cannot keep the breaker open for ever.
pub struct Attempt<'a> {
    breaker: &'a Breaker,
    trial: bool,
    settled: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown_nanos: cooldown.as_nanos() as u64,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            trial: AtomicBool::new(false),
        }
    }

    pub fn admit(&self, now_nanos: u64) -> Try<'_> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Try::Yes(Attempt {
                breaker: self,
                trial: false,
                settled: false,
            });
        }
        if now_nanos < until
            || self
                .trial
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return Try::No;
        }
        Try::Yes(Attempt {
            breaker: self,
            trial: true,
            settled: false,
        })
    }

    pub fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }
}

impl Attempt<'_> {
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// Redis answered. True when this closed an open breaker. Only the trial closes it: a
    /// call sent before the breaker opened and answered late says nothing about Redis now
    /// (letting it close the breaker would make a Redis hovering at the budget flap).
    pub fn succeeded(mut self) -> bool {
        self.settled = true;
        let b = self.breaker;
        if !self.trial {
            if b.open_until.load(Ordering::Acquire) == 0 {
                b.failures.store(0, Ordering::Release);
            }
            return false;
        }
        b.failures.store(0, Ordering::Release);
        let was_open = b.open_until.swap(0, Ordering::AcqRel) != 0;
        b.trial.store(false, Ordering::Release);
        was_open
    }

    /// Redis did not answer. True when this opened a closed breaker.
    pub fn failed(mut self, now_nanos: u64) -> bool {
        self.settled = true;
        let b = self.breaker;
        let n = b.failures.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let mut opened = false;
        if self.trial || n >= b.threshold {
            let until = now_nanos.saturating_add(b.cooldown_nanos).max(1);
            opened = b.open_until.swap(until, Ordering::AcqRel) == 0;
        }
        if self.trial {
            b.trial.store(false, Ordering::Release);
        }
        opened
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled && self.trial {
            self.breaker.trial.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn attempt(b: &Breaker, now: u64) -> Option<Attempt<'_>> {
        match b.admit(now) {
            Try::Yes(a) => Some(a),
            Try::No => None,
        }
    }

    #[test]
    fn opens_after_the_threshold_and_one_trial_closes_it() {
        let b = Breaker::new(3, Duration::from_millis(1000));
        let t = 5_000 * MS;
        assert!(!attempt(&b, t).unwrap().failed(t));
        assert!(!attempt(&b, t).unwrap().failed(t));
        assert!(!b.is_open());
        assert!(
            attempt(&b, t).unwrap().failed(t),
            "the third failure opens, and says so"
        );
        assert!(b.is_open());
        assert!(
            attempt(&b, t + 999 * MS).is_none(),
            "open: fall back without trying"
        );
        let trial = attempt(&b, t + 1000 * MS).expect("cooldown over: one trial");
        assert!(attempt(&b, t + 1000 * MS).is_none(), "only one trial at a time");
        assert!(trial.succeeded(), "the trial closes it, and says so");
        assert!(!b.is_open());
        assert!(
            !attempt(&b, t + 1000 * MS).unwrap().succeeded(),
            "already closed: no transition"
        );
    }

    #[test]
    fn a_failed_trial_reopens_without_a_second_transition() {
        let b = Breaker::new(1, Duration::from_millis(10));
        assert!(attempt(&b, MS).unwrap().failed(MS));
        let trial = attempt(&b, 11 * MS).unwrap();
        assert!(!trial.failed(11 * MS), "still open: not a new transition");
        assert!(
            attempt(&b, 20 * MS).is_none(),
            "re-opened from the trial's failure"
        );
        assert!(attempt(&b, 21 * MS).is_some());
    }

    #[test]
    fn a_cancelled_trial_frees_the_slot() {
        let b = Breaker::new(1, Duration::from_millis(10));
        attempt(&b, MS).unwrap().failed(MS);
        drop(attempt(&b, 11 * MS).unwrap());
        assert!(
            attempt(&b, 11 * MS).is_some(),
            "the dropped trial did not keep the slot"
        );
    }

    #[test]
    fn a_late_answer_to_a_call_sent_before_opening_does_not_close_it() {
        let b = Breaker::new(1, Duration::from_millis(10));
        let early = attempt(&b, MS).unwrap();
        assert!(attempt(&b, MS).unwrap().failed(MS));
        assert!(!early.succeeded(), "not the trial: no transition");
        assert!(b.is_open(), "still open until a trial answers");
        assert!(attempt(&b, 11 * MS).unwrap().succeeded());
    }

    #[test]
    fn successes_reset_the_failure_count() {
        let b = Breaker::new(2, Duration::from_millis(10));
        for _ in 0..10 {
            assert!(!attempt(&b, MS).unwrap().failed(MS));
            attempt(&b, MS).unwrap().succeeded();
        }
        assert!(!b.is_open());
    }
}
