//! Open client connections on one listener, bounded, with the oldest idle one shed when a new
//! one arrives at the limit (rather than stalling accepts, so a flood of slow or idle
//! connections cannot starve real clients, and the process never runs into its file-descriptor
//! limit, where accept fails and everything stalls). Shared by the sidecar's proxy listener
//! (pingora) and its health listener (hyper).
//!
//! A connection is *idle* while it waits for a request head: between requests, and while a
//! slow client trickles its headers. Busy connections (a request being served, a long poll)
//! are never shed. Idle ones are ordered by when they became idle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

pub struct ConnTable {
    max: usize,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Source of idle stamps; 0 means busy.
    stamp: AtomicU64,
    shed: AtomicU64,
    refused: AtomicU64,
}

pub struct Conn {
    idle_since: AtomicU64,
    shed: Notify,
}

/// What `admit` decided for a connection.
pub enum Admission {
    /// Seen before (a kept-alive connection coming back for its next request).
    Known(Arc<Conn>),
    /// New, and admitted (maybe after shedding the oldest idle connection).
    New(Arc<Conn>),
    /// New, at the limit, and every connection busy: close it.
    Refused,
}

impl ConnTable {
    pub fn new(max: usize) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            max: max.max(1),
            conns: Mutex::new(HashMap::new()),
            stamp: AtomicU64::new(1),
            shed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `key` up (a connection's id, unique while it is open), admitting it if new.
    pub fn admit(&self, key: u64) -> Admission {
        let mut conns = self.lock();
        if let Some(c) = conns.get(&key) {
            return Admission::Known(c.clone());
        }
        if conns.len() >= self.max {
            let oldest = conns
                .iter()
                .filter(|(_, c)| c.idle_since.load(Ordering::Relaxed) != 0)
                .min_by_key(|(_, c)| c.idle_since.load(Ordering::Relaxed))
                .map(|(k, _)| *k);
            match oldest.and_then(|k| conns.remove(&k)) {
                Some(victim) => {
                    // A stored permit: the victim closes even if it is not waiting right now.
                    victim.shed.notify_one();
                    self.shed.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Admission::Refused;
                }
            }
        }
        let c = Arc::new(Conn {
            idle_since: AtomicU64::new(0),
            shed: Notify::new(),
        });
        conns.insert(key, c.clone());
        Admission::New(c)
    }

    /// Forgets a closed connection (only this one: its key may already be reused).
    pub fn remove(&self, key: u64, conn: &Arc<Conn>) {
        let mut conns = self.lock();
        if conns.get(&key).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            conns.remove(&key);
        }
    }

    pub fn idle(&self, conn: &Conn) {
        conn.idle_since
            .store(self.stamp.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connections closed to make room for new ones, and new ones refused, so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shed.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

impl Conn {
    pub fn busy(&self) {
        self.idle_since.store(0, Ordering::Relaxed);
    }

    /// Resolves when this connection was chosen to be shed.
    pub async fn shed(&self) {
        self.shed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(t: &ConnTable, k: u64) -> Arc<Conn> {
        match t.admit(k) {
            Admission::New(c) => c,
            _ => panic!("{k} not admitted as new"),
        }
    }

    #[tokio::test]
    async fn at_the_limit_the_oldest_idle_connection_is_shed() {
        let t = ConnTable::new(3);
        let (a, b, c) = (new(&t, 1), new(&t, 2), new(&t, 3));
        t.idle(&b);
        t.idle(&a);
        // c is busy; b became idle first.
        let d = new(&t, 4);
        assert_eq!(t.len(), 3);
        tokio::time::timeout(std::time::Duration::from_secs(1), b.shed())
            .await
            .expect("b is shed");
        assert!(matches!(t.admit(1), Admission::Known(_)), "a stays");
        // Next: a (idle), then nobody idle: refused.
        let _e = new(&t, 5);
        a.shed().await;
        assert!(matches!(t.admit(6), Admission::Refused));
        assert_eq!(t.counts(), (2, 1));
        // A closed connection frees its slot; a stale remove does not touch a reused key.
        t.remove(3, &c);
        t.remove(4, &a);
        assert_eq!(t.len(), 2);
        assert!(matches!(t.admit(4), Admission::Known(_)));
        drop(d);
    }
}
