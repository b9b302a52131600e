//! Criterion benchmarks of the request path's pure pieces: key parse + checksum, hash +
//! snapshot lookup, scope check, rate-limit check and the whole decision, on snapshots of
//! 10k, 100k and 1M keys; JWT verification cold and from the cache.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use permiso::core::decision::{decide, Authorization, RequestFacts, TokenPolicy};
use permiso::core::key::{self, Environment};
use permiso::core::ratelimit::{LimiterState, Limits};
use permiso::core::routes::{Access, Route, RouteTable};
use permiso::core::scope::{Scope, ScopeSet};
use permiso::core::snapshot::Snapshot;
use permiso::core::sync::{SyncKey, SyncPayload, SyncService};

/// A snapshot of `n` keys over n/10 services, and one valid key in it.
fn snapshot(n: usize) -> (Snapshot, String) {
    let mut probe = None;
    let services = (0..n / 10)
        .map(|s| {
            let keys = (0..10)
                .map(|k| {
                    let nk = key::generate(Environment::Live);
                    if probe.is_none() {
                        probe = Some(nk.secret.expose().to_string());
                    }
                    SyncKey {
                        key_id: format!("key_{s}_{k}"),
                        hash: nk.hash.to_hex(),
                        expires_at: None,
                        grace_ends_at: None,
                    }
                })
                .collect();
            SyncService {
                tls_identities: vec![],
                service_id: format!("srv_{s}"),
                service_name: format!("service-{s}"),
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
        })
        .collect();
    let payload = SyncPayload {
        epoch: "bench".into(),
        version: 1,
        full: true,
        services,
        ..Default::default()
    };
    (
        Snapshot::from_full(&payload, Environment::Live, None).unwrap(),
        probe.unwrap(),
    )
}

fn sizes() -> Vec<usize> {
    vec![10_000, 100_000, 1_000_000]
}

fn benches(c: &mut Criterion) {
    let k = key::generate(Environment::Live);
    let text = k.secret.expose().to_string();
    c.bench_function("key parse + checksum", |b| {
        b.iter(|| key::parse(black_box(&text)).unwrap())
    });

    let scopes = ScopeSet::parse(&["trade:read", "account:*", "market:data"]).unwrap();
    c.bench_function("scope check (wildcard)", |b| {
        b.iter(|| scopes.allows(black_box("account:balance")))
    });

    let limits = Limits {
        per_minute: Some(u32::MAX),
        per_hour: Some(u32::MAX),
    };
    let state = LimiterState::default();
    let mut now = 1_800_000_000_000_000_000u64;
    c.bench_function("rate-limit check (two windows)", |b| {
        b.iter(|| {
            // 1 µs apart: the emission interval of u32::MAX a minute is ~14 ns, so 1 ns steps
            // would run into the limit once the burst is spent (longer measurement times did).
            now += 1_000;
            state.check(black_box(&limits), now).unwrap()
        })
    });

    let routes = RouteTable::new(vec![
        Route::new(vec![], "/health".into(), Access::Public),
        Route::new(
            vec!["GET".into()],
            "/api/v1/trades".into(),
            Access::Scopes(vec![Scope::parse("trade:read").unwrap()]),
        ),
        Route::new(
            vec![],
            "/api/v1/account".into(),
            Access::Scopes(vec![Scope::parse("account:read").unwrap()]),
        ),
    ]);
    // JWT: one token, verified cold (Ed25519 + claims) and then served from the cache.
    let (der, x) = permiso::core::jwt::generate_ed25519();
    let signer = permiso::core::jwt::Signer::new("k1".into(), &der);
    let now = 1_800_000_000i64;
    let claims = permiso::core::jwt::AccessClaims {
        is_trusted: false,
        iss: "https://auth".into(),
        sub: "srv_0".into(),
        aud: "permiso".into(),
        exp: now + 3600,
        iat: now,
        nbf: now,
        jti: "jti".into(),
        client_id: "srv_0".into(),
        scope: "trade:read".into(),
        cnf: None,
    };
    let token = signer.sign(&claims).unwrap();
    let mut keys = permiso::core::jwt::KeySet::default();
    keys.insert("k1", &x);
    let want = permiso::core::jwt::Expectations {
        issuer: "https://auth",
        audience: "permiso",
        leeway_secs: 30,
    };
    c.bench_function("JWT verify (EdDSA, cold)", |b| {
        b.iter(|| permiso::core::jwt::verify(black_box(&token), &keys, &want, now).unwrap())
    });

    let now_nanos = now as u64 * 1_000_000_000;
    let decide_once = |snap: &Snapshot, header: &[u8], policy: &TokenPolicy<'_>| {
        let facts = RequestFacts {
            method: "GET",
            path: "/api/v1/trades/42",
            authorization: Authorization::One(black_box(header)),
            client_ip: Some([127, 0, 0, 1].into()),
            peer: None,
        };
        decide(&routes, Some(snap), Environment::Live, &facts, now_nanos, policy).is_ok()
    };
    let mut group = c.benchmark_group("snapshot");
    for n in sizes() {
        let (mut snap, probe) = snapshot(n);
        snap.tokens.issuer = "https://auth".into();
        snap.tokens.keys = keys.clone();
        group.bench_with_input(BenchmarkId::new("hash + lookup", n), &n, |b, _| {
            b.iter(|| snap.lookup(&key::KeyHash::of(black_box(&probe))).is_some())
        });
        let key_header = format!("Bearer {probe}").into_bytes();
        let no_cache = TokenPolicy {
            audience: "permiso",
            leeway_secs: 30,
            cache: None,
        };
        group.bench_with_input(BenchmarkId::new("whole decision, API key", n), &n, |b, _| {
            b.iter(|| assert!(decide_once(&snap, &key_header, &no_cache)))
        });
        let cache = permiso::core::token_cache::TokenCache::new(10_000);
        let jwt_header = format!("Bearer {token}").into_bytes();
        let cached = TokenPolicy {
            audience: "permiso",
            leeway_secs: 30,
            cache: Some(&cache),
        };
        group.bench_with_input(BenchmarkId::new("whole decision, cached JWT", n), &n, |b, _| {
            b.iter(|| assert!(decide_once(&snap, &jwt_header, &cached)))
        });
    }
    group.finish();
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
