//! The one interface every rate limiter answers through, so the decision stays pure: `decision::admit`
//! stops at "allowed if the limit allows", a limiter (this sidecar's atomics, or the shared
//! limiter in Redis) answers, and `Pending::finish` turns the answer into the verdict.
//!
//! A local limiter answers at once (`LimitCheck::Ready`, no allocation); a shared one after a
//! round trip (`LimitCheck::Pending`). Either way the answer is an `Outcome`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::ratelimit::{Exceeded, Limits, RateStatus};
use crate::snapshot::ServiceEntry;

/// Why a limiter did not admit a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Over a window of the limits applied (which the `Exceeded` names).
    Exceeded(Exceeded),
    /// The shared limiter could not answer and this sidecar is set to refuse then
    /// (`on_redis_error = "closed"`).
    Unavailable,
}

/// A limiter's answer for one request.
pub type Outcome = Result<RateStatus, Refused>;

/// An answer still on its way (a round trip to a shared limiter).
pub type PendingOutcome<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

pub enum LimitCheck<'a> {
    Ready(Outcome),
    Pending(PendingOutcome<'a>),
}

impl LimitCheck<'_> {
    /// The answer, waiting for it if it is not there yet.
    pub async fn outcome(self) -> Outcome {
        match self {
            LimitCheck::Ready(o) => o,
            LimitCheck::Pending(f) => f.await,
        }
    }
}

/// Counts one request against a service's limits, consuming nothing from any window when a
/// window refuses. Only called for services that have limits.
pub trait RateLimiter: Send + Sync {
    fn check<'a>(&'a self, service: &'a Arc<ServiceEntry>, now_nanos: u64) -> LimitCheck<'a>;
}

/// This sidecar's own count of every service, at the service's full limits (the behaviour of
/// `rate_limit_scope = "sidecar"`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Local {
    pub fn outcome(service: &ServiceEntry, now_nanos: u64) -> Outcome {
        service
            .limiter
            .check(&service.limits, now_nanos)
            .map_err(Refused::Exceeded)
    }
}

impl Local {
    /// A shadow-mode request: counted at the full limits in the service's own shadow count,
    /// so shadow traffic never spends enforced quota (and cluster limits are estimated by
    /// each sidecar alone).
    pub fn shadow_outcome(service: &ServiceEntry, now_nanos: u64) -> Outcome {
        service
            .shadow_limiter
            .check(&service.limits, now_nanos)
            .map_err(Refused::Exceeded)
    }
}

impl RateLimiter for Local {
    fn check<'a>(&'a self, service: &'a Arc<ServiceEntry>, now_nanos: u64) -> LimitCheck<'a> {
        LimitCheck::Ready(Local::outcome(service, now_nanos))
    }
}

/// This sidecar's share of a cluster limit, counted here alone: what each of `replicas`
/// sidecars enforces while the shared limiter is out of reach. The answer names the share it
/// applied, so `RateLimit-Policy` states what was enforced.
pub fn local_share(service: &ServiceEntry, replicas: u32, now_nanos: u64) -> Outcome {
    let share: Limits = service.limits.share(replicas);
    // The share has its own state: the service's full-limit cell is this sidecar's count
    // under `scope = sidecar`, never mixed with a share's.
    match service.share_limiter.check(&share, now_nanos) {
        Ok(mut status) => {
            status.applied = Some(share);
            Ok(status)
        }
        Err(e) => Err(Refused::Exceeded(e)),
    }
}

/// The shared test vectors (`vectors/ratelimit.json`): request sequences every limiter must
/// answer alike. Read by this crate's tests and by the Redis limiter's.
pub mod vectors {
    use serde::Deserialize;

    use crate::ratelimit::Limits;

    pub const JSON: &str = include_str!("../vectors/ratelimit.json");

    #[derive(Debug, Deserialize)]
    pub struct Vectors {
        pub t0_us: u64,
        pub cases: Vec<Case>,
    }

    #[derive(Debug, Deserialize)]
    pub struct Case {
        pub name: String,
        pub per_minute: Option<u32>,
        pub per_hour: Option<u32>,
        pub steps: Vec<Step>,
    }

    #[derive(Debug, Deserialize, PartialEq, Eq, Clone)]
    pub struct Step {
        pub at_us: u64,
        pub allowed: bool,
        #[serde(default)]
        pub retry_after: Option<u64>,
        pub ratelimit: String,
    }

    impl Case {
        pub fn limits(&self) -> Limits {
            Limits {
                per_minute: self.per_minute,
                per_hour: self.per_hour,
            }
        }
    }

    pub fn load() -> Vectors {
        serde_json::from_str(JSON).expect("vectors/ratelimit.json parses")
    }

    /// An answer written as a step (at `at_us`), to compare with the expected one.
    pub fn observed(at_us: u64, outcome: &super::Outcome) -> Step {
        match outcome {
            Ok(s) => Step {
                at_us,
                allowed: true,
                retry_after: None,
                ratelimit: s.header().unwrap_or_default(),
            },
            Err(super::Refused::Exceeded(e)) => Step {
                at_us,
                allowed: false,
                retry_after: Some(e.retry_after_secs),
                ratelimit: e.ratelimit_header(),
            },
            Err(super::Refused::Unavailable) => Step {
                at_us,
                allowed: false,
                retry_after: None,
                ratelimit: "unavailable".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::LimiterState;

    #[test]
    fn the_local_limiter_answers_every_shared_vector() {
        let v = vectors::load();
        assert!(v.cases.len() >= 5);
        for case in &v.cases {
            let st = LimiterState::default();
            let limits = case.limits();
            for (i, step) in case.steps.iter().enumerate() {
                let now_nanos = (v.t0_us + step.at_us) * 1_000;
                let got = st.check(&limits, now_nanos).map_err(Refused::Exceeded);
                assert_eq!(
                    vectors::observed(step.at_us, &got),
                    *step,
                    "{}: step {i}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn a_share_never_adds_up_to_more_than_the_limit() {
        let l = Limits {
            per_minute: Some(100),
            per_hour: Some(7),
        };
        for n in 1..=12u32 {
            let s = l.share(n);
            assert!(s.per_minute.unwrap() * n <= 100 || s.per_minute == Some(1), "{n}");
            assert!(s.per_hour.unwrap() * n <= 7 || s.per_hour == Some(1), "{n}");
            assert!(s.per_minute.unwrap() >= 1 && s.per_hour.unwrap() >= 1);
        }
        assert_eq!(l.share(3).per_minute, Some(33));
        assert_eq!(l.share(0), l, "zero replicas is taken as one");
        assert_eq!(Limits::default().share(4), Limits::default());
    }
}
