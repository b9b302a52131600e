//! Pure rules of the egress side: where a local call goes, when a client-credentials token is
//! refreshed, how retries back off, and when a failing destination is cut off.

use std::time::{Duration, Instant};

/// Splits `/account/api/v1/x` into (`account`, `/api/v1/x`).
pub fn split_destination(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (name, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    (!name.is_empty()).then_some((name, tail))
}

/// Methods that may be sent twice without changing the outcome (RFC 9110 §9.2.2).
pub fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// How long after issuance a token should be replaced: at most 80 % of its lifetime and at
/// least 60 s before it expires (whichever comes first), never negative.
pub fn refresh_after(lifetime: Duration) -> Duration {
    let eighty = lifetime.mul_f64(0.8);
    let minus_minute = lifetime.saturating_sub(Duration::from_secs(60));
    eighty.min(minus_minute)
}

/// Exponential backoff with full jitter: attempt 0 waits up to `base`, then 2×, 4×, … capped.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, jitter01: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    exp.min(cap).mul_f64(jitter01.clamp(0.0, 1.0))
}

/// A per-destination circuit breaker: after `threshold` consecutive failures it opens for
/// `cooldown`, answering at once; then one trial request decides whether it closes again.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Half-open: this request is the trial.
    Trial,
    Rejected,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            open_until: None,
            trial_in_flight: false,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.open_until {
            None => Admission::Allowed,
            Some(t) if now < t => Admission::Rejected,
            Some(_) if self.trial_in_flight => Admission::Rejected,
            Some(_) => {
                self.trial_in_flight = true;
                Admission::Trial
            }
        }
    }

    /// The trial ended without an outcome (its request was cancelled): the next request may
    /// try again, rather than the destination staying refused for good.
    pub fn abandon_trial(&mut self) {
        self.trial_in_flight = false;
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.trial_in_flight = false;
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures += 1;
        self.trial_in_flight = false;
        if self.failures >= self.threshold || self.open_until.is_some() {
            self.open_until = Some(now + self.cooldown);
        }
    }

    pub fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|t| now < t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            split_destination("/account/api/v1/x"),
            Some(("account", "/api/v1/x"))
        );
        assert_eq!(split_destination("/account"), Some(("account", "/")));
        assert_eq!(split_destination("/"), None);
        assert_eq!(split_destination("//x"), None);
        assert_eq!(split_destination("account"), None);
    }

    #[test]
    fn refresh_schedule() {
        // One hour: 80 % (48 min) comes before "60 s before expiry" (59 min).
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(2880)
        );
        // Two minutes: 60 s before expiry (60 s) comes before 80 % (96 s).
        assert_eq!(refresh_after(Duration::from_secs(120)), Duration::from_secs(60));
        assert_eq!(refresh_after(Duration::from_secs(30)), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Duration::from_millis(50);
        let cap = Duration::from_millis(1000);
        assert_eq!(backoff(0, b, cap, 1.0), Duration::from_millis(50));
        assert_eq!(backoff(3, b, cap, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(10, b, cap, 1.0), cap);
        assert_eq!(backoff(3, b, cap, 0.5), Duration::from_millis(200));
    }

    #[test]
    fn an_abandoned_trial_lets_the_next_request_try() {
        let t0 = Instant::now();
        let mut br = Breaker::new(1, Duration::from_secs(5));
        br.failure(t0);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(br.admit(later), Admission::Trial);
        assert_eq!(br.admit(later), Admission::Rejected, "one trial at a time");
        br.abandon_trial();
        assert_eq!(br.admit(later), Admission::Trial);
    }

    #[test]
    fn breaker_opens_cools_down_and_recovers() {
        let t0 = Instant::now();
        let mut br = Breaker::new(3, Duration::from_secs(5));
        for _ in 0..2 {
            assert_eq!(br.admit(t0), Admission::Allowed);
            br.failure(t0);
        }
        assert_eq!(br.admit(t0), Admission::Allowed);
        br.failure(t0);
        assert_eq!(br.admit(t0 + Duration::from_secs(1)), Admission::Rejected);
        // After the cooldown one trial goes through; others wait for its outcome.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(br.admit(later), Admission::Trial);
        assert_eq!(br.admit(later), Admission::Rejected);
        br.failure(later);
        assert_eq!(br.admit(later + Duration::from_secs(1)), Admission::Rejected);
        let again = later + Duration::from_secs(5);
        assert_eq!(br.admit(again), Admission::Trial);
        br.success();
        assert_eq!(br.admit(again), Admission::Allowed);
        assert!(!br.is_open(again));
    }
}
