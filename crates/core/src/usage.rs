//! Lock-free usage marks: how many requests each service made through this sidecar and when
//! each API key was last used. They live beside the snapshot's service entries and are carried
//! into every rebuilt entry, so the sidecar can count per service for metrics and report key
//! use to the admin plane in batches, never with a write per request.
//!
//! A key's slot is its index in `ServiceEntry::keys`; slots hold only two atomics (16 bytes a
//! key) and are matched across rebuilds by key hash, so no key id is stored twice.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::key::KeyHash;

/// One API key's marks. `reported` is the last `last_used` handed to a report.
#[derive(Debug, Default)]
struct KeySlot {
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
    /// Slots for `keys`. Marks of keys that `previous` (its key list and usage) already had are
    /// carried over; a use marked in `previous` after this copy and before the new snapshot is
    /// stored is lost, and the key's next use marks it again.
    pub fn new(keys: &[KeyHash], previous: Option<(&[KeyHash], &ServiceUsage)>) -> ServiceUsage {
        // Services hold a handful of keys, where a scan beats hashing; an index for the rare
        // service with many.
        let index: Option<std::collections::HashMap<&KeyHash, usize>> = previous
            .filter(|(hashes, _)| hashes.len() > 32)
            .map(|(hashes, _)| hashes.iter().enumerate().map(|(i, h)| (h, i)).collect());
        let slots = keys
            .iter()
            .map(|h| {
                let old = previous.and_then(|(hashes, usage)| {
                    let i = match &index {
                        Some(ix) => ix.get(h).copied(),
                        None => hashes.iter().position(|p| p == h),
                    }?;
                    usage.keys.get(i)
                });
                KeySlot {
                    last_used: AtomicI64::new(old.map_or(0, |s| s.last_used.load(Ordering::Relaxed))),
                    reported: AtomicI64::new(old.map_or(0, |s| s.reported.load(Ordering::Relaxed))),
                }
            })
            .collect();
        ServiceUsage {
            requests: previous.map(|(_, p)| p.requests.clone()).unwrap_or_default(),
            keys: slots,
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

    /// The one slot's unreported mark, taken (a key leaving the snapshot).
    pub fn take_unreported_slot(&self, slot: usize) -> Option<i64> {
        let s = self.keys.get(slot)?;
        let used = s.last_used.load(Ordering::Relaxed);
        if used > s.reported.load(Ordering::Relaxed) {
            s.reported.store(used, Ordering::Relaxed);
            return Some(used);
        }
        None
    }

    /// Appends `(slot, last_used)` for every key used since the last call, and counts them as
    /// reported: the caller keeps them until the admin plane has them.
    pub fn take_unreported(&self, out: &mut Vec<(usize, i64)>) {
        for (i, s) in self.keys.iter().enumerate() {
            let used = s.last_used.load(Ordering::Relaxed);
            if used > s.reported.load(Ordering::Relaxed) {
                s.reported.store(used, Ordering::Relaxed);
                out.push((i, used));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> KeyHash {
        KeyHash([n; 32])
    }

    #[test]
    fn marks_are_reported_once_and_survive_a_rebuild() {
        let first = [h(1), h(2)];
        let u = ServiceUsage::new(&first, None);
        u.record(Some(1), 100);
        u.record(None, 100);
        u.record(Some(7), 100); // a slot that does not exist is ignored
        assert_eq!(u.requests(), 3);
        let mut out = Vec::new();
        u.take_unreported(&mut out);
        assert_eq!(out, vec![(1, 100)]);
        out.clear();
        u.take_unreported(&mut out);
        assert!(out.is_empty(), "nothing new since the last report");

        u.record(Some(0), 150);
        // Key 2 rotated away, key 3 added first: key 1's unreported mark and the count carry over.
        let next = ServiceUsage::new(&[h(3), h(1)], Some((&first, &u)));
        assert_eq!(next.requests(), 4);
        next.record(Some(0), 160);
        next.take_unreported(&mut out);
        out.sort();
        assert_eq!(out, vec![(0, 160), (1, 150)]);
        assert_eq!(u.requests(), 5, "old and new entries share one counter");
    }

    #[test]
    fn many_keys_are_matched_through_an_index() {
        let old: Vec<KeyHash> = (0..40).map(h).collect();
        let u = ServiceUsage::new(&old, None);
        u.record(Some(39), 500);
        let new: Vec<KeyHash> = (1..41).rev().map(h).collect();
        let next = ServiceUsage::new(&new, Some((&old, &u)));
        let mut out = Vec::new();
        next.take_unreported(&mut out);
        assert_eq!(out, vec![(1, 500)], "key 39 is at slot 1 of the reversed list");
    }

    #[test]
    fn an_older_time_never_moves_the_mark_back() {
        let u = ServiceUsage::new(&[h(9)], None);
        u.record(Some(0), 200);
        u.record(Some(0), 150);
        let mut out = Vec::new();
        u.take_unreported(&mut out);
        assert_eq!(out, vec![(0, 200)]);
    }
}
