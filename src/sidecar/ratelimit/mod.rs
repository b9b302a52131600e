//! The sidecar's rate limiter: the one `core::limiter::RateLimiter` the proxy asks. A service
//! with `rate_limit_scope = "sidecar"` is counted here alone (atomics, no I/O). A `cluster`
//! service is counted in Redis when the backend is `redis` (one script call, within a budget
//! of a few milliseconds, behind a breaker), else by this sidecar's share of the limit.
//!
//! While Redis cannot answer, `on_redis_error` decides: `local` (this sidecar's share),
//! `open` (no limit) or `closed` (503). Every such request is counted in
//! `permiso_ratelimit_fallback_total{mode}`; the log gets one line when Redis is lost and one
//! when it is back, never one per request.

mod breaker;
mod redis;

use std::sync::Arc;

use prometheus::{IntCounter, IntGauge};

use crate::config::file::OnRedisError;
use crate::config::RateLimitConfig;
use crate::core::limiter::{local_share, LimitCheck, Local, Outcome, RateLimiter, Refused};
use crate::core::ratelimit::{RateStatus, Scope};
use crate::core::snapshot::ServiceEntry;
use crate::sidecar::metrics::SidecarMetrics;

pub use self::redis::RedisLimiter;
use breaker::{Breaker, Try};

/// What the limiter counts, resolved once at start (the request path only adds).
pub struct LimiterCounters {
    pub answered: IntCounter,
    pub timeouts: IntCounter,
    pub errors: IntCounter,
    /// By mode: local, open, closed.
    pub fallback: [IntCounter; 3],
    /// 1 while Redis answers (breaker closed), 0 while this sidecar counts alone.
    pub up: IntGauge,
}

impl LimiterCounters {
    pub fn new(metrics: &SidecarMetrics) -> LimiterCounters {
        metrics.limiter_counters()
    }

    fn fallback(&self, mode: OnRedisError) -> &IntCounter {
        &self.fallback[match mode {
            OnRedisError::Local => 0,
            OnRedisError::Open => 1,
            OnRedisError::Closed => 2,
        }]
    }
}

pub struct SidecarLimiter {
    replicas: u32,
    shared: Option<Shared>,
}

struct Shared {
    redis: RedisLimiter,
    breaker: Breaker,
    on_error: OnRedisError,
    counters: LimiterCounters,
}

impl SidecarLimiter {
    /// `password`: PERMISO_REDIS_PASSWORD, read by the caller. Nothing is dialled here: the
    /// first cluster-scope request connects, so a sidecar starts while Redis is down.
    pub fn new(
        cfg: &RateLimitConfig,
        password: Option<String>,
        metrics: &SidecarMetrics,
    ) -> anyhow::Result<SidecarLimiter> {
        let shared = match &cfg.redis {
            None => None,
            Some(r) => {
                let counters = LimiterCounters::new(metrics);
                counters.up.set(1);
                Some(Shared {
                    redis: RedisLimiter::new(r, password)?,
                    breaker: Breaker::new(r.breaker_failures, r.breaker_cooldown),
                    on_error: r.on_error,
                    counters,
                })
            }
        };
        Ok(SidecarLimiter {
            replicas: cfg.replicas,
            shared,
        })
    }

    fn fallback(&self, shared: &Shared, service: &ServiceEntry, now_nanos: u64) -> Outcome {
        shared.counters.fallback(shared.on_error).inc();
        match shared.on_error {
            OnRedisError::Local => local_share(service, self.replicas, now_nanos),
            OnRedisError::Open => Ok(RateStatus::default()),
            OnRedisError::Closed => Err(Refused::Unavailable),
        }
    }
}

impl RateLimiter for SidecarLimiter {
    fn check<'a>(&'a self, service: &'a Arc<ServiceEntry>, now_nanos: u64) -> LimitCheck<'a> {
        if service.rate_limit_scope == Scope::Sidecar {
            return LimitCheck::Ready(Local::outcome(service, now_nanos));
        }
        let Some(shared) = &self.shared else {
            // No shared counter configured: this sidecar enforces its share.
            return LimitCheck::Ready(local_share(service, self.replicas, now_nanos));
        };
        let attempt = match shared.breaker.admit(now_nanos) {
            Try::No => return LimitCheck::Ready(self.fallback(shared, service, now_nanos)),
            Try::Yes(attempt) => attempt,
        };
        LimitCheck::Pending(Box::pin(async move {
            match shared.redis.check(service).await {
                Ok(outcome) => {
                    shared.counters.answered.inc();
                    if attempt.succeeded() {
                        shared.counters.up.set(1);
                        tracing::warn!(
                            "shared rate limiter: Redis answers again; cluster limits are shared again"
                        );
                    }
                    outcome
                }
                Err(e) => {
                    match e {
                        redis::SharedError::Timeout => shared.counters.timeouts.inc(),
                        redis::SharedError::Redis(_) | redis::SharedError::Reply(_) => {
                            shared.counters.errors.inc()
                        }
                    }
                    if attempt.failed(now_nanos) {
                        shared.counters.up.set(0);
                        tracing::error!(
                            error = %e,
                            fallback = shared.on_error.name(),
                            "shared rate limiter: Redis cannot answer; cluster-scope services fall back until it does"
                        );
                    } else {
                        tracing::debug!(error = %e, "shared rate limiter: Redis call failed");
                    }
                    self.fallback(shared, service, now_nanos)
                }
            }
        }))
    }
}
