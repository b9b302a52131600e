//! Per-service rate limits: a per-minute and a per-hour quota checked together with GCRA (the
//! algorithm governor uses), lock-free on atomics.
//!
//! The arithmetic is in whole microseconds so the shared limiter's Lua script (run in Redis,
//! whose numbers are doubles: exact to 2^53, enough for microseconds since 1970 but not for
//! nanoseconds) computes exactly the same answers; `tests/vectors/ratelimit.json` holds
//! sequences both must answer alike.
//!
//! Why not two governor limiters: governor checks one quota at a time and cannot undo a
//! consumed cell, so a request the hour limit refuses would still use up minute capacity. The
//! issue requires that a request denied by one limit consumes neither; here both quotas are
//! judged first and only then committed.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

const MICROS_PER_SEC: u64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Hour,
}

impl Window {
    pub fn name(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
        }
    }

    pub fn seconds(self) -> u64 {
        match self {
            Window::Minute => 60,
            Window::Hour => 3600,
        }
    }
}

/// Where a service's limits are counted, set per service on the admin plane (not to be
/// confused with `scope::Scope`, what a caller may do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    /// Each sidecar counts alone (n replicas admit up to n times the limit).
    #[default]
    Sidecar,
    /// Every sidecar with a shared (Redis) limiter counts against one limit.
    Cluster,
}

impl LimitScope {
    pub fn name(self) -> &'static str {
        match self {
            LimitScope::Sidecar => "sidecar",
            LimitScope::Cluster => "cluster",
        }
    }

    pub fn parse(s: &str) -> Option<LimitScope> {
        match s {
            "sidecar" => Some(LimitScope::Sidecar),
            "cluster" => Some(LimitScope::Cluster),
            _ => None,
        }
    }

    pub fn is_sidecar(&self) -> bool {
        *self == LimitScope::Sidecar
    }
}

/// The limits of one service. `None` means unlimited for that window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_minute: Option<u32>,
    pub per_hour: Option<u32>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self.per_minute.is_none() && self.per_hour.is_none()
    }

    /// One sidecar's share of a cluster limit when `replicas` sidecars enforce it alone
    /// (the shared limiter unreachable): rounded down so the replicas together never admit
    /// more than the limit, but at least one request per window.
    pub fn share(&self, replicas: u32) -> Limits {
        let n = replicas.max(1);
        Limits {
            per_minute: self.per_minute.map(|q| (q / n).max(1)),
            per_hour: self.per_hour.map(|q| (q / n).max(1)),
        }
    }

    pub fn quota(&self, w: Window) -> Option<u32> {
        match w {
            Window::Minute => self.per_minute,
            Window::Hour => self.per_hour,
        }
    }

    /// `RateLimit-Policy` value (draft-ietf-httpapi-ratelimit-headers):
    /// `"minute";q=60;w=60, "hour";q=1000;w=3600`.
    pub fn policy_header(&self) -> String {
        let mut out = String::new();
        for w in [Window::Minute, Window::Hour] {
            if let Some(q) = self.quota(w) {
                if !out.is_empty() {
                    out.push_str(", ");
                }
                let _ = write!(out, "\"{}\";q={};w={}", w.name(), q, w.seconds());
            }
        }
        out
    }
}

/// The state of one window after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowStatus {
    pub window: Window,
    pub remaining: u64,
    /// Seconds until the quota is whole again.
    pub reset_secs: u64,
}

/// What a successful check leaves: the tightest window, for the `RateLimit` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateStatus {
    pub tightest: Option<WindowStatus>,
    /// The limits applied when they are not the service's own (a sidecar's share while the
    /// shared limiter is unreachable), so `RateLimit-Policy` names what was enforced.
    pub applied: Option<Limits>,
}

impl RateStatus {
    /// `RateLimit` value: `"minute";r=59;t=1`. None when the service is unlimited.
    pub fn header(&self) -> Option<String> {
        self.tightest
            .map(|s| format!("\"{}\";r={};t={}", s.window.name(), s.remaining, s.reset_secs))
    }
}

/// A refusal: which window, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub window: Window,
    pub retry_after_secs: u64,
    pub limits: Limits,
}

impl Exceeded {
    pub fn ratelimit_header(&self) -> String {
        format!("\"{}\";r=0;t={}", self.window.name(), self.retry_after_secs)
    }
}

/// The last refusal a shared limiter gave a service, kept by each sidecar so it answers 429
/// alone until the shared count would admit again: a refused caller that keeps calling costs no
/// round trip (and cannot load Redis into its time budget for everyone). Exact, never early:
/// the wait is the script's own, counted from before the call was sent.
#[derive(Debug, Default)]
pub struct RefusedUntil {
    /// Clock nanoseconds; 0 when nothing is cached.
    until: AtomicU64,
    /// 0 minute, 1 hour: the window the refusal named.
    hour: std::sync::atomic::AtomicBool,
}

impl RefusedUntil {
    pub fn set(&self, sent_at_nanos: u64, wait_us: u64, window: Window) {
        self.hour.store(window == Window::Hour, Ordering::Relaxed);
        let until = sent_at_nanos.saturating_add(wait_us.saturating_mul(1_000));
        self.until.fetch_max(until, Ordering::AcqRel);
    }

    /// The refusal to repeat at `now_nanos`, if one still holds.
    pub fn check(&self, now_nanos: u64, limits: &Limits) -> Option<Exceeded> {
        let until = self.until.load(Ordering::Acquire);
        if now_nanos >= until {
            return None;
        }
        let window = if self.hour.load(Ordering::Relaxed) {
            Window::Hour
        } else {
            Window::Minute
        };
        Some(Exceeded {
            window,
            retry_after_secs: (until - now_nanos).div_ceil(1_000_000_000).max(1),
            limits: *limits,
        })
    }
}

/// The theoretical arrival times of the two windows, in clock microseconds. Lives as long as the
/// service's limits stay the same, across snapshot swaps.
#[derive(Debug, Default)]
pub struct LimiterState {
    minute_tat: AtomicU64,
    hour_tat: AtomicU64,
}

struct Plan {
    new_tat: u64,
    status: WindowStatus,
}

/// GCRA for one window: emission interval `t = window / quota`; a request fits when the new
/// theoretical arrival time is at most one window ahead of now (a full quota may burst).
fn plan(tat: u64, now: u64, quota: u32, window: Window) -> Result<Plan, u64> {
    let window_us = window.seconds() * MICROS_PER_SEC;
    // At least 1 µs: a quota above one per microsecond (a sync payload can carry any u32)
    // must not make the interval 0.
    let t = (window_us / quota.max(1) as u64).max(1);
    let new_tat = tat.max(now) + t;
    if new_tat - now > window_us {
        // Wait until new_tat - window <= now.
        return Err(new_tat - window_us - now);
    }
    let ahead = new_tat - now;
    Ok(Plan {
        new_tat,
        status: WindowStatus {
            window,
            remaining: (window_us - ahead) / t,
            reset_secs: ahead.div_ceil(MICROS_PER_SEC),
        },
    })
}

fn cell(state: &LimiterState, w: Window) -> &AtomicU64 {
    match w {
        Window::Minute => &state.minute_tat,
        Window::Hour => &state.hour_tat,
    }
}

impl LimiterState {
    /// Checks both windows and consumes one request from each only if both allow it.
    /// `now_nanos` is the clock's reading; the windows count whole microseconds.
    pub fn check(&self, limits: &Limits, now_nanos: u64) -> Result<RateStatus, Exceeded> {
        let now = now_nanos / 1_000;
        let windows: [(Window, Option<u32>); 2] = [
            (Window::Minute, limits.per_minute),
            (Window::Hour, limits.per_hour),
        ];
        'retry: loop {
            let mut plans: [Option<(u64, Plan)>; 2] = [None, None];
            let mut refused: Option<Exceeded> = None;
            for (i, (w, q)) in windows.iter().enumerate() {
                let Some(q) = q else { continue };
                let old = cell(self, *w).load(Ordering::Acquire);
                match plan(old, now, *q, *w) {
                    Ok(p) => plans[i] = Some((old, p)),
                    Err(wait) => {
                        let secs = wait.div_ceil(MICROS_PER_SEC).max(1);
                        if refused.is_none_or(|r| secs > r.retry_after_secs) {
                            refused = Some(Exceeded {
                                window: *w,
                                retry_after_secs: secs,
                                limits: *limits,
                            });
                        }
                    }
                }
            }
            if let Some(r) = refused {
                return Err(r);
            }
            // Commit in order; if a later window moved under us, give back what we took and
            // judge again, so a refusal never leaves anything consumed.
            for i in 0..2 {
                let Some((old, p)) = &plans[i] else { continue };
                let c = cell(self, windows[i].0);
                if c.compare_exchange(*old, p.new_tat, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    for (j, (w, q)) in windows.iter().enumerate().take(i) {
                        if plans[j].is_some() {
                            give_back(cell(self, *w), *w, *q);
                        }
                    }
                    continue 'retry;
                }
            }
            let tightest = plans
                .iter()
                .flatten()
                .map(|(_, p)| p.status)
                .min_by_key(|s| s.remaining);
            return Ok(RateStatus {
                tightest,
                applied: None,
            });
        }
    }
}

/// Undo one request's worth of a window. Subtracting the emission interval is exact when the
/// window was busy and errs on the strict side (forgets idle credit) when it was idle.
fn give_back(c: &AtomicU64, w: Window, quota: Option<u32>) {
    let t = (w.seconds() * MICROS_PER_SEC / quota.unwrap_or(1).max(1) as u64).max(1);
    let _ = c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(t)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * S;

    #[test]
    fn minute_quota_allows_burst_then_refuses_then_recovers() {
        let l = Limits {
            per_minute: Some(3),
            per_hour: None,
        };
        let st = LimiterState::default();
        let r: Vec<_> = (0..3).map(|_| st.check(&l, T0).unwrap()).collect();
        assert_eq!(r[0].tightest.unwrap().remaining, 2);
        assert_eq!(r[2].tightest.unwrap().remaining, 0);
        let e = st.check(&l, T0).unwrap_err();
        assert_eq!(e.window, Window::Minute);
        assert_eq!(e.retry_after_secs, 20);
        // One emission interval later, exactly one more fits.
        st.check(&l, T0 + 20 * S).unwrap();
        assert!(st.check(&l, T0 + 20 * S).is_err());
        // After a whole window the full quota is back.
        for _ in 0..3 {
            st.check(&l, T0 + 80 * S).unwrap();
        }
    }

    #[test]
    fn refusal_by_hour_does_not_consume_minute_and_vice_versa() {
        let l = Limits {
            per_minute: Some(2),
            per_hour: Some(2),
        };
        let st = LimiterState::default();
        st.check(&l, T0).unwrap();
        st.check(&l, T0).unwrap();
        // Both exhausted now; hour refusal is the longer wait.
        let e = st.check(&l, T0).unwrap_err();
        assert_eq!(e.window, Window::Hour);
        let minute_before = st.minute_tat.load(Ordering::SeqCst);
        for _ in 0..100 {
            assert!(st.check(&l, T0 + 61 * S).is_err());
        }
        assert_eq!(st.minute_tat.load(Ordering::SeqCst), minute_before);

        let l2 = Limits {
            per_minute: Some(1),
            per_hour: Some(100),
        };
        let st2 = LimiterState::default();
        st2.check(&l2, T0).unwrap();
        let hour_before = st2.hour_tat.load(Ordering::SeqCst);
        for _ in 0..50 {
            assert_eq!(st2.check(&l2, T0).unwrap_err().window, Window::Minute);
        }
        assert_eq!(st2.hour_tat.load(Ordering::SeqCst), hour_before);
    }

    #[test]
    fn unlimited_never_refuses_and_reports_nothing() {
        let l = Limits::default();
        let st = LimiterState::default();
        for _ in 0..10_000 {
            assert_eq!(st.check(&l, T0).unwrap().header(), None);
        }
        // What lets the decision skip the limiter altogether.
        assert!(l.is_unlimited());
        for one in [
            Limits {
                per_minute: Some(1),
                per_hour: None,
            },
            Limits {
                per_minute: None,
                per_hour: Some(1),
            },
        ] {
            assert!(!one.is_unlimited(), "{one:?}");
        }
    }

    #[test]
    fn equal_waits_name_the_minute() {
        // Both windows refuse with the same wait: the shorter window is reported.
        let l = Limits {
            per_minute: Some(1),
            per_hour: Some(1),
        };
        let st = LimiterState::default();
        // The cells hold microseconds.
        st.minute_tat.store((T0 + 10 * S) / 1_000, Ordering::Relaxed);
        st.hour_tat.store((T0 + 10 * S) / 1_000, Ordering::Relaxed);
        let e = st.check(&l, T0).unwrap_err();
        assert_eq!((e.window, e.retry_after_secs), (Window::Minute, 10));
    }

    #[test]
    fn giving_back_undoes_one_emission_interval() {
        let c = AtomicU64::new(1_000 * MICROS_PER_SEC);
        give_back(&c, Window::Minute, Some(60));
        assert_eq!(c.load(Ordering::Relaxed), 999 * MICROS_PER_SEC);
        give_back(&c, Window::Hour, Some(1800));
        assert_eq!(c.load(Ordering::Relaxed), 997 * MICROS_PER_SEC);
        give_back(&c, Window::Minute, None);
        assert_eq!(c.load(Ordering::Relaxed), 937 * MICROS_PER_SEC);
        let small = AtomicU64::new(5);
        give_back(&small, Window::Hour, Some(1));
        assert_eq!(small.load(Ordering::Relaxed), 0, "never below zero");
    }

    #[test]
    fn a_cached_refusal_holds_exactly_until_its_wait_ends() {
        let l = Limits {
            per_minute: Some(3),
            per_hour: None,
        };
        let r = RefusedUntil::default();
        assert_eq!(r.check(T0, &l), None, "nothing cached");
        r.set(T0, 2_500_000, Window::Minute);
        let e = r.check(T0 + S, &l).unwrap();
        assert_eq!((e.window, e.retry_after_secs, e.limits), (Window::Minute, 2, l));
        assert_eq!(r.check(T0 + 2_499_999_999, &l).unwrap().retry_after_secs, 1);
        assert_eq!(
            r.check(T0 + 2_500_000_000, &l),
            None,
            "free again at the end of the wait"
        );
        // An earlier-ending refusal never shortens a later one.
        r.set(T0, 9_000_000, Window::Hour);
        r.set(T0, 1_000_000, Window::Hour);
        assert_eq!(r.check(T0 + 8 * S, &l).unwrap().window, Window::Hour);
    }

    #[test]
    fn headers() {
        let l = Limits {
            per_minute: Some(60),
            per_hour: Some(1000),
        };
        assert_eq!(l.policy_header(), "\"minute\";q=60;w=60, \"hour\";q=1000;w=3600");
        let st = LimiterState::default();
        let s = st.check(&l, T0).unwrap();
        assert_eq!(s.header().unwrap(), "\"minute\";r=59;t=1");
        let e = Exceeded {
            window: Window::Hour,
            retry_after_secs: 7,
            limits: l,
        };
        assert_eq!(e.ratelimit_header(), "\"hour\";r=0;t=7");
    }

    #[test]
    fn concurrent_checks_never_exceed_quota() {
        use std::sync::Arc;
        let l = Limits {
            per_minute: Some(500),
            per_hour: Some(700),
        };
        let st = Arc::new(LimiterState::default());
        let allowed = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let st = st.clone();
                let allowed = allowed.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if st.check(&l, T0).is_ok() {
                            allowed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(allowed.load(Ordering::SeqCst), 500);
    }
}
