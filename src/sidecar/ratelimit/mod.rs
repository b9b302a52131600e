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
use crate::core::clock::SharedClock;
use crate::core::limiter::{local_share, LimitCheck, Local, Outcome, RateLimiter, Refused};
use crate::core::ratelimit::{LimitScope, RateStatus};
use crate::core::snapshot::ServiceEntry;
use crate::sidecar::metrics::SidecarMetrics;

pub use self::redis::RedisLimiter;
use breaker::{Breaker, Try};

/// What the limiter counts, resolved once at start (the request path only adds).
pub struct LimiterCounters {
    pub answered: IntCounter,
    pub timeouts: IntCounter,
    pub errors: IntCounter,
    /// 429s repeated from a refusal Redis gave, before its wait ended: no round trip.
    pub cached_refusals: IntCounter,
    /// By mode: local, open, closed.
    pub fallback: [IntCounter; 3],
    /// 1 while the breaker is closed (Redis is asked), 0 while this sidecar decides alone.
    pub up: IntGauge,
}

impl LimiterCounters {
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
    clock: SharedClock,
    /// Server-side errors (not outages) are logged at most once per window.
    errors_logged: crate::telemetry::LogWindow,
}

impl SidecarLimiter {
    /// `password`: PERMISO_REDIS_PASSWORD, read by the caller. Requests never wait for a
    /// connection made here: it is made in the background, so a sidecar starts while Redis is
    /// down.
    pub fn new(
        cfg: &RateLimitConfig,
        password: Option<String>,
        metrics: &SidecarMetrics,
        clock: SharedClock,
    ) -> anyhow::Result<SidecarLimiter> {
        let shared = match &cfg.redis {
            None => None,
            Some(r) => {
                let counters = metrics.limiter_counters();
                counters.up.set(1);
                Some(Shared {
                    redis: RedisLimiter::new(r, password)?,
                    breaker: Breaker::new(r.breaker_failures, r.breaker_cooldown),
                    on_error: r.on_error,
                    counters,
                    clock,
                    errors_logged: crate::telemetry::LogWindow::new(10_000),
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
        if service.rate_limit_scope == LimitScope::Sidecar {
            return LimitCheck::Ready(Local::outcome(service, now_nanos));
        }
        let Some(shared) = &self.shared else {
            // No shared counter configured: this sidecar enforces its share.
            return LimitCheck::Ready(local_share(service, self.replicas, now_nanos));
        };
        if let Some(e) = service.shared_refusal.check(now_nanos, &service.limits) {
            shared.counters.cached_refusals.inc();
            return LimitCheck::Ready(Err(Refused::Exceeded(e)));
        }
        let attempt = match shared.breaker.admit(now_nanos) {
            Try::No => return LimitCheck::Ready(self.fallback(shared, service, now_nanos)),
            Try::Yes(attempt) => attempt,
        };
        LimitCheck::Pending(Box::pin(async move {
            match shared.redis.check(service).await {
                Ok(verdict) => {
                    shared.counters.answered.inc();
                    if attempt.succeeded() {
                        shared.counters.up.set(i64::from(!shared.breaker.is_open()));
                        tracing::warn!(
                            "shared rate limiter: Redis answers again; cluster limits are shared again"
                        );
                    }
                    if let (Err(Refused::Exceeded(e)), Some(wait_us)) = (&verdict.outcome, verdict.wait_us) {
                        service.shared_refusal.set(now_nanos, wait_us, e.window);
                    }
                    verdict.outcome
                }
                Err(e) if e.is_transport() => {
                    match e {
                        redis::SharedError::Timeout => shared.counters.timeouts.inc(),
                        _ => shared.counters.errors.inc(),
                    }
                    let trial = attempt.is_trial();
                    // The cooldown runs from when the call failed, not from when it was sent
                    // (a budget as long as the cooldown would otherwise start a trial at once).
                    if attempt.failed(shared.clock.now_nanos()) {
                        shared.counters.up.set(i64::from(!shared.breaker.is_open()));
                        tracing::error!(
                            error = %e,
                            fallback = shared.on_error.name(),
                            "shared rate limiter: Redis cannot answer; cluster-scope services fall back until it does"
                        );
                    } else {
                        tracing::debug!(error = %e, "shared rate limiter: Redis call failed");
                    }
                    if trial && !matches!(e, redis::SharedError::Timeout) {
                        // A failed trial on a broken (not slow) connection: start afresh, in
                        // case the failure is cached in the connection manager.
                        shared.redis.reconnect();
                    }
                    self.fallback(shared, service, now_nanos)
                }
                Err(e) => {
                    // Redis answered, with an error for this key or an unreadable reply: this
                    // request falls back; Redis is not down, so the breaker is left alone.
                    drop(attempt);
                    shared.counters.errors.inc();
                    if shared.errors_logged.admit(crate::telemetry::monotonic_ms()) {
                        tracing::error!(error = %e, service = %service.id, "shared rate limiter: Redis refused the call");
                    }
                    self.fallback(shared, service, now_nanos)
                }
            }
        }))
    }
}
