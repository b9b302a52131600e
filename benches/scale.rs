//! How the sidecar's cost grows with the number of keys: snapshot memory, sync payload size,
//! full apply (parse + build), one-change delta apply, and the time of one allow decision.
//!
//!   cargo bench --bench scale              # 10k, 100k, 1M keys
//!   PERMISO_SCALE="10000" cargo bench --bench scale
//!
//! Memory is the net heap the snapshot keeps (a counting allocator around the build), not RSS.

use std::alloc::System;
use std::hint::black_box;
use std::time::{Duration, Instant};

use permiso::core::decision::{decide, Authorization, RequestFacts, TokenPolicy};
use permiso::core::key::{self, Environment};
use permiso::core::routes::{Access, Route, RouteTable};
use permiso::core::scope::Scope;
use permiso::core::snapshot::Snapshot;
use permiso::core::sync::{SyncKey, SyncPayload, SyncService};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KEYS_PER_SERVICE: usize = 10;

fn service(i: usize, keys: Vec<SyncKey>) -> SyncService {
    SyncService {
        tls_identities: vec![],
        service_id: format!("srv_{i:022}"),
        service_name: format!("service-{i}"),
        environment: Environment::Live,
        scopes: vec!["trade:read".into(), "account:*".into()],
        disabled: false,
        rate_limit_per_minute: None,
        rate_limit_per_hour: None,
        rate_limit_scope: Default::default(),
        allowed_ips: vec![],
        tokens_not_before: 0,
        is_trusted: false,
        keys,
    }
}

fn sync_key(i: usize, k: &key::NewKey) -> SyncKey {
    SyncKey {
        key_id: format!("key_{i:016}"),
        hash: k.hash.to_hex(),
        expires_at: None,
        grace_ends_at: None,
    }
}

/// A full payload of `n` keys over n/10 services.
fn payload(n: usize) -> SyncPayload {
    let services = (0..n / KEYS_PER_SERVICE)
        .map(|s| {
            let keys = (0..KEYS_PER_SERVICE)
                .map(|k| sync_key(s * KEYS_PER_SERVICE + k, &key::generate(Environment::Live)))
                .collect();
            service(s, keys)
        })
        .collect();
    SyncPayload {
        epoch: "bench".into(),
        version: 1,
        full: true,
        services,
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let sizes: Vec<usize> = std::env::var("PERMISO_SCALE")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000]);
    let routes = RouteTable::new(vec![Route::new(
        vec![],
        "/api/v1/trades".into(),
        Access::Scopes(vec![Scope::parse("trade:read").unwrap()]),
    )]);
    println!("| keys | snapshot memory | sync payload (JSON) | full apply (parse + build) | one-change delta p50 / p99 | allow decision |");
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        let p = payload(n);
        let json = serde_json::to_vec(&p).unwrap();
        drop(p);

        // Full apply: what a sidecar does with a full sync or its snapshot file.
        let started = Instant::now();
        let parsed: SyncPayload = serde_json::from_slice(&json).unwrap();
        let region = Region::new(GLOBAL);
        let snap = Snapshot::from_full(&parsed, Environment::Live, None).unwrap();
        let stats = region.change();
        let full = started.elapsed();
        drop(parsed);
        let memory =
            stats.bytes_allocated as i64 - stats.bytes_deallocated as i64 + stats.bytes_reallocated as i64;

        // Delta: one service gets a new key (a rotation), applied to the big snapshot.
        let mut deltas = Vec::new();
        let mut current = snap;
        for round in 0..200 {
            let nk = key::generate(Environment::Live);
            let delta = SyncPayload {
                epoch: "bench".into(),
                version: current.version + 1,
                full: false,
                services: vec![service(
                    round % (n / KEYS_PER_SERVICE),
                    vec![sync_key(n + round, &nk)],
                )],
                ..Default::default()
            };
            let t = Instant::now();
            let next = current.apply_delta(&delta).unwrap();
            deltas.push(t.elapsed());
            current = next;
        }
        deltas.sort();

        // One allow decision on the big snapshot: add a service with a key we hold.
        let probe_key = key::generate(Environment::Live);
        let add = SyncPayload {
            epoch: "bench".into(),
            version: current.version + 1,
            full: false,
            services: vec![service(usize::MAX, vec![sync_key(usize::MAX, &probe_key)])],
            ..Default::default()
        };
        let holder = current.apply_delta(&add).unwrap();
        let header = format!("Bearer {}", probe_key.secret.expose()).into_bytes();
        let policy = TokenPolicy {
            audience: "permiso",
            leeway_secs: 30,
            cache: None,
        };
        let iterations = 200_000;
        let t = Instant::now();
        for _ in 0..iterations {
            let facts = RequestFacts {
                method: "GET",
                path: "/api/v1/trades/1",
                authorization: Authorization::One(black_box(&header)),
                client_ip: None,
                peer: None,
            };
            assert!(decide(
                &routes,
                Some(&holder),
                Environment::Live,
                &facts,
                1_800_000_000_000_000_000,
                &policy
            )
            .is_ok());
        }
        let check = t.elapsed() / iterations;

        println!(
            "| {n} | {:.1} MB | {:.1} MB | {:.0} ms | {:.1} / {:.1} µs | {:.0} ns |",
            memory as f64 / 1e6,
            json.len() as f64 / 1e6,
            full.as_secs_f64() * 1e3,
            percentile(&deltas, 0.5).as_secs_f64() * 1e6,
            percentile(&deltas, 0.99).as_secs_f64() * 1e6,
            check.as_nanos()
        );
    }
}
