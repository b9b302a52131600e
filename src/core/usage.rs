//! Lock-free usage marks: how many requests each service made through this sidecar and when
//! each API key was last used. They live beside the snapshot's service entries and are carried
//! into every rebuilt entry, so the sidecar can count per service for metrics and report key
//! use to the admin plane in batches, never with a write per request.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// One API key's marks. `reported` is the last `last_used` handed to a report.
#[derive(Debug)]
struct KeySlot {
    key_id: Arc<str>,
    last_used: AtomicI64,
    reported: AtomicI64,
}

#[derive(Debug)]
pub struct ServiceUsage {
    /// Shared by every rebuilt entry of the same service, so the count never restarts while
    /// the sidecar runs.
    requests: Arc<AtomicU64>,
    keys: Box<[KeySlot]>,
}

impl ServiceUsage {
    /// Slots for `key_ids` (in key order: a key's index is its slot). Marks of keys that
    /// `previous` already had are carried over; a use marked in `previous` after this copy and
    /// before the new snapshot is stored is lost, and the key's next use marks it again.
    pub fn new<'a>(key_ids: impl Iterator<Item = &'a str>, previous: Option<&ServiceUsage>) -> ServiceUsage {
        // Services hold a handful of keys, where a scan beats hashing; an index for the rare
        // service with many.
        let index: Option<std::collections::HashMap<&str, &KeySlot>> = previous
            .filter(|p| p.keys.len() > 32)
            .map(|p| p.keys.iter().map(|s| (&*s.key_id, s)).collect());
        let find = |id: &str| match (&index, previous) {
            (Some(ix), _) => ix.get(id).copied(),
            (None, Some(p)) => p.keys.iter().find(|s| &*s.key_id == id),
            (None, None) => None,
        };
        let keys = key_ids
            .map(|id| {
                let old = find(id);
                KeySlot {
                    key_id: Arc::from(id),
                    last_used: AtomicI64::new(old.map_or(0, |s| s.last_used.load(Ordering::Relaxed))),
                    reported: AtomicI64::new(old.map_or(0, |s| s.reported.load(Ordering::Relaxed))),
                }
            })
            .collect();
        ServiceUsage {
            requests: previous.map(|p| p.requests.clone()).unwrap_or_default(),
            keys,
        }
    }

    /// One allowed request; with `key_slot` when an API key made it.
    pub fn record(&self, key_slot: Option<u32>, now_secs: i64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = key_slot.and_then(|i| self.keys.get(i as usize)) {
            // Read first: under load the same second is marked many times, and a plain load
            // keeps the cache line shared between cores.
            if slot.last_used.load(Ordering::Relaxed) < now_secs {
                slot.last_used.store(now_secs, Ordering::Relaxed);
            }
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Appends `(key_id, last_used)` for every key used since the last call, and counts them as
    /// reported: the caller keeps them until the admin plane has them.
    pub fn take_unreported(&self, out: &mut Vec<(Arc<str>, i64)>) {
        for s in self.keys.iter() {
            let used = s.last_used.load(Ordering::Relaxed);
            if used > s.reported.load(Ordering::Relaxed) {
                s.reported.store(used, Ordering::Relaxed);
                out.push((s.key_id.clone(), used));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_reported_once_and_survive_a_rebuild() {
        let u = ServiceUsage::new(["key_a", "key_b"].into_iter(), None);
        u.record(Some(1), 100);
        u.record(None, 100);
        u.record(Some(7), 100); // a slot that does not exist is ignored
        assert_eq!(u.requests(), 3);
        let mut out = Vec::new();
        u.take_unreported(&mut out);
        assert_eq!(out, vec![(Arc::from("key_b"), 100)]);
        out.clear();
        u.take_unreported(&mut out);
        assert!(out.is_empty(), "nothing new since the last report");

        u.record(Some(0), 150);
        // key_b rotated away, key_c added: key_a's unreported mark and the count carry over.
        let next = ServiceUsage::new(["key_c", "key_a"].into_iter(), Some(&u));
        assert_eq!(next.requests(), 4);
        next.record(Some(0), 160);
        next.take_unreported(&mut out);
        out.sort();
        assert_eq!(out, vec![(Arc::from("key_a"), 150), (Arc::from("key_c"), 160)]);
        assert_eq!(u.requests(), 5, "old and new entries share one counter");
    }

    #[test]
    fn an_older_time_never_moves_the_mark_back() {
        let u = ServiceUsage::new(["k"].into_iter(), None);
        u.record(Some(0), 200);
        u.record(Some(0), 150);
        let mut out = Vec::new();
        u.take_unreported(&mut out);
        assert_eq!(out, vec![(Arc::from("k"), 200)]);
    }
}
