//! Bounds on failed admin authentications.
//!
//! `FailureThrottle`: after `limit` failures within a minute against one key, that key is
//! refused before its credential is looked at, until the minute is over. Keys are addresses
//! (IPv6 grouped by /64, since one host holds a whole /64: `bucket`) for admin-key attempts,
//! and (client id, address) pairs and addresses for client secrets at the token endpoint. Only
//! failures count, so nobody can lock out a credential used correctly from an address that
//! has not failed. Pruned at most once a minute, and capped, so a spray of keys cannot grow it
//! without bound or make it slow.
//!
//! `AuditBudget`: at most `per_minute` failed authentications are written to the audit log
//! each minute, from all addresses together; the ones beyond are counted, and the next entry
//! written says how many were left out, so the record stays complete in number while the
//! table cannot be grown without bound by an unauthenticated flood.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

const WINDOW_SECS: i64 = 60;
/// Past this many addresses, entries of finished windows are dropped (once per window).
const PRUNE_AT: usize = 10_000;
/// Never more than this many addresses; beyond it new addresses are not tracked (each still
/// gets its failures audited within the budget and counted in metrics).
const MAX_TRACKED: usize = 100_000;

/// The address itself (an IPv4-mapped IPv6 address as IPv4): the key of (client, address)
/// pairs, so a neighbour in the same IPv6 /64 cannot lock out one particular client.
pub fn exact(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The address a failure counts against.
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

struct Seen<K> {
    /// key → (window start, failures in it).
    by_key: HashMap<K, (i64, u32)>,
    last_prune: i64,
}

pub struct FailureThrottle<K = IpAddr> {
    limit: u32,
    /// Admin-plane only, and only on failures and credential attempts: a mutex is fine here.
    seen: Mutex<Seen<K>>,
}

impl<K: std::hash::Hash + Eq> FailureThrottle<K> {
    pub fn new(limit: u32) -> FailureThrottle<K> {
        FailureThrottle {
            limit,
            seen: Mutex::new(Seen {
                by_key: HashMap::new(),
                last_prune: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen<K>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds until `key` may try again, if it is blocked now.
    pub fn blocked(&self, key: &K, now: i64) -> Option<u64> {
        let seen = self.lock();
        let (start, n) = *seen.by_key.get(key)?;
        let end = start + WINDOW_SECS;
        (now < end && n >= self.limit).then(|| (end - now) as u64)
    }

    pub fn record(&self, key: K, now: i64) {
        let mut seen = self.lock();
        if seen.by_key.len() >= PRUNE_AT && now >= seen.last_prune + WINDOW_SECS {
            seen.by_key.retain(|_, (start, _)| now < *start + WINDOW_SECS);
            seen.last_prune = now;
        }
        if seen.by_key.len() >= MAX_TRACKED && !seen.by_key.contains_key(&key) {
            return;
        }
        let e = seen.by_key.entry(key).or_insert((now, 0));
        if now >= e.0 + WINDOW_SECS {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct AuditBudget {
    per_minute: u32,
    /// (window start, entries written in it, failures left out since the last entry written).
    state: Mutex<(i64, u32, u64)>,
}

impl AuditBudget {
    pub fn new(per_minute: u32) -> AuditBudget {
        AuditBudget {
            per_minute,
            state: Mutex::new((i64::MIN, 0, 0)),
        }
    }

    /// `Some(left_out_before)` when this failure may be written (with how many were left out
    /// since the last one written); `None` when the minute's budget is spent.
    pub fn take(&self, now: i64) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now >= s.0.saturating_add(WINDOW_SECS) {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 >= self.per_minute {
            s.2 += 1;
            return None;
        }
        s.1 += 1;
        Some(std::mem::take(&mut s.2))
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
            assert_eq!(t.blocked(&ip, 1000 + s), None);
            t.record(ip, 1000 + s);
        }
        assert_eq!(t.blocked(&ip, 1003), Some(57));
        assert_eq!(t.blocked(&other, 1003), None, "other addresses are not affected");
        assert_eq!(t.blocked(&ip, 1060), None, "a new window starts clean");
        t.record(ip, 1060);
        assert_eq!(t.blocked(&ip, 1061), None);
        // Pairs: a client's failures from one address do not block it from another.
        let pairs: FailureThrottle<(String, IpAddr)> = FailureThrottle::new(1);
        pairs.record(("srv_a".into(), ip), 0);
        assert!(pairs.blocked(&("srv_a".into(), ip), 1).is_some());
        assert!(pairs.blocked(&("srv_a".into(), other), 1).is_none());
    }

    #[test]
    fn an_ipv6_host_is_one_address_across_its_64() {
        let t = FailureThrottle::new(2);
        let b = |s: &str| bucket(s.parse().unwrap());
        t.record(b("2001:db8:1:2::1"), 0);
        t.record(b("2001:db8:1:2:ffff::9"), 0);
        assert!(t.blocked(&b("2001:db8:1:2::77"), 1).is_some());
        assert!(t.blocked(&b("2001:db8:1:3::1"), 1).is_none());
        t.record(b("::ffff:10.1.1.1"), 0);
        t.record(b("10.1.1.1"), 0);
        assert!(t.blocked(&b("10.1.1.1"), 1).is_some(), "v4-mapped is v4");
        // Pairs are keyed on the exact address: a neighbour in the same /64 is another key.
        let e = |s: &str| exact(s.parse().unwrap());
        assert_ne!(e("2001:db8:1:2::1"), e("2001:db8:1:2::2"));
        assert_eq!(e("::ffff:10.1.1.1"), e("10.1.1.1"));
    }

    #[test]
    fn stays_bounded_under_a_spray_of_addresses() {
        let t = FailureThrottle::new(3);
        for i in 0..(PRUNE_AT as u32 + 10) {
            t.record(IpAddr::from(i.to_be_bytes()), 0);
        }
        assert_eq!(t.len(), PRUNE_AT + 10, "all inside the current window");
        // A minute later the old window's entries are dropped on the next insert.
        t.record("10.9.9.9".parse().unwrap(), 61);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_audit_budget_counts_what_it_leaves_out() {
        let b = AuditBudget::new(2);
        assert_eq!(b.take(100), Some(0));
        assert_eq!(b.take(101), Some(0));
        assert_eq!(b.take(102), None);
        assert_eq!(b.take(103), None);
        assert_eq!(
            b.take(160),
            Some(2),
            "the next minute's first entry reports the two left out"
        );
        assert_eq!(b.take(161), Some(0));
    }
}
