//! A sync payload (the `GET /v1/sync` body and the snapshot file) from arbitrary bytes:
//! `Snapshot::from_full`, and `apply_delta` on a valid base snapshot. Refusals are errors,
//! never panics; whatever is accepted must survive the snapshot file round trip
//! (`to_payload` then `from_full`), as a sidecar restarting from its file relies on.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use permiso::core::key::Environment;
use permiso::core::snapshot::Snapshot;
use permiso::core::sync::SyncPayload;

/// The base a delta applies to: the same as seed-full.json (epoch "e1", version 3).
const BASE: &str = include_str!("../corpus/sync_payload/seed-full.json");

fn base() -> &'static Snapshot {
    static B: OnceLock<Snapshot> = OnceLock::new();
    B.get_or_init(|| {
        let p: SyncPayload = serde_json::from_str(BASE).expect("seed-full.json parses");
        Snapshot::from_full(&p, Environment::Live, None).expect("seed-full.json is a valid snapshot")
    })
}

fn round_trips(snap: &Snapshot) {
    let written = snap.to_payload();
    let json = serde_json::to_vec(&written).expect("a payload serialises");
    let read: SyncPayload = serde_json::from_slice(&json).expect("a written payload reads back");
    assert_eq!(read, written);
    let again = Snapshot::from_full(&read, snap.environment, None)
        .unwrap_or_else(|e| panic!("snapshot file does not load back: {e}"));
    assert_eq!(again.to_payload(), written);
    assert_eq!(again.key_count(), snap.key_count());
    assert_eq!(again.service_count(), snap.service_count());
}

/// `PERMISO_FUZZ_DEBUG=1` prints what each input led to (for checking what the seeds reach).
fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("PERMISO_FUZZ_DEBUG").is_some())
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let payload = match serde_json::from_slice::<SyncPayload>(data) {
        Ok(p) => p,
        Err(e) => {
            if debug() {
                eprintln!("not a payload: {e}");
            }
            return;
        }
    };
    for env in [Environment::Live, Environment::Test] {
        let full = Snapshot::from_full(&payload, env, None);
        if debug() {
            eprintln!(
                "from_full({env}): {:?}",
                full.as_ref().map(|s| (s.service_count(), s.key_count()))
            );
        }
        if let Ok(snap) = full {
            round_trips(&snap);
        }
    }
    // With a previous snapshot lending rate-limit state.
    let _ = Snapshot::from_full(&payload, Environment::Live, Some(base));
    let delta = base.apply_delta(&payload);
    if debug() {
        eprintln!(
            "apply_delta: {:?}",
            delta.as_ref().map(|s| (s.service_count(), s.key_count()))
        );
    }
    if let Ok(next) = delta {
        assert_eq!(next.version, payload.version);
        round_trips(&next);
    }
});
