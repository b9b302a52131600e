//! Failed admin authentications per source address: after `limit` failures within a minute
//! the address is refused before its credential is looked at, until that minute is over. Keyed
//! by address only, so a flood of made-up credentials cannot grow it beyond one entry per
//! address, and entries of past minutes are dropped as it grows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

const WINDOW_SECS: i64 = 60;
/// Past this many addresses, entries of finished windows are dropped on the next insert.
const PRUNE_AT: usize = 10_000;

pub struct FailureThrottle {
    limit: u32,
    /// address → (window start, failures in it). Admin-plane only: a mutex is fine here.
    seen: Mutex<HashMap<IpAddr, (i64, u32)>>,
}

impl FailureThrottle {
    pub fn new(limit: u32) -> FailureThrottle {
        FailureThrottle {
            limit,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (i64, u32)>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds until `ip` may try again, if it is blocked now.
    pub fn blocked(&self, ip: IpAddr, now: i64) -> Option<u64> {
        let seen = self.lock();
        let (start, n) = *seen.get(&ip)?;
        let end = start + WINDOW_SECS;
        (now < end && n >= self.limit).then(|| (end - now) as u64)
    }

    pub fn record(&self, ip: IpAddr, now: i64) {
        let mut seen = self.lock();
        if seen.len() >= PRUNE_AT {
            seen.retain(|_, (start, _)| now < *start + WINDOW_SECS);
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if now >= e.0 + WINDOW_SECS {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let t = FailureThrottle::new(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for s in 0..3 {
            assert_eq!(t.blocked(ip, 1000 + s), None);
            t.record(ip, 1000 + s);
        }
        assert_eq!(t.blocked(ip, 1003), Some(57));
        assert_eq!(t.blocked(other, 1003), None, "other addresses are not affected");
        assert_eq!(t.blocked(ip, 1060), None, "a new window starts clean");
        t.record(ip, 1060);
        assert_eq!(t.blocked(ip, 1061), None);
    }

    #[test]
    fn stays_bounded_under_a_spray_of_addresses() {
        let t = FailureThrottle::new(3);
        for i in 0..(PRUNE_AT as u32 + 10) {
            t.record(IpAddr::from(i.to_be_bytes()), 0);
        }
        // A minute later the old window's entries are dropped on the next insert.
        t.record("10.9.9.9".parse().unwrap(), 61);
        assert_eq!(t.len(), 1);
    }
}
