//! The sidecar's whole decision (`core::decision::decide`) with an arbitrary Authorization
//! header value and an arbitrary path: a verdict or a denial, never a panic.
//!
//! Input layout (kept human-writable so seeds are readable):
//!   byte 0            flags: bits 0-1 method, 2-3 Authorization form, 4-5 client address,
//!                     6-7 which sidecar (live, live, test, live without a snapshot)
//!   bytes 1..'\n'     the path (lossy UTF-8, as the proxy hands over a &str)
//!   after the '\n'    the raw Authorization header value
//!
//! The snapshot is fixed and deterministic: keys and the token-signing key are constants whose
//! secrets are in the seed corpus, so the fuzzer starts from requests that are allowed.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use permiso::core::decision::{self, Authorization, Credential, RequestFacts, TokenPolicy, Verdict};
use permiso::core::key::{self, Environment, KeyHash};
use permiso::core::routes::{Access, Route, RouteTable};
use permiso::core::scope::Scope;
use permiso::core::snapshot::Snapshot;
use permiso::core::sync::{SyncKey, SyncPayload, SyncRevokedToken, SyncService, SyncSigningKey};
use permiso::core::token_cache::TokenCache;

const NOW_SECS: i64 = 1_800_000_000;
const NOW_NANOS: u64 = NOW_SECS as u64 * 1_000_000_000;

/// Seed keys (fuzz/gen_seeds.py): srv_a, srv_b, srv_a with an ended grace, srv_t (test).
const LIVE_A: &str = "svc_live_b9eqNJ5qy7h65_-5-q8wkmTKWgMbrVG5BffpRnlXo-0ccx_bA";
const LIVE_B: &str = "svc_live_Gbb-6SDIwrkhg89qdsaYxSGPCcWdxbPge2_yQ5q3LDsHs7XNw";
const LIVE_ENDED: &str = "svc_live_FLn9wSnYtL-BcermkR2MTwSiv_MPVi9sDqfn7UoQaUEr7i0vQ";
const TEST_T: &str = "svc_test_GtinhZRBhQ71lmnNji_4WrKF-ALO-Uf4zRyMmMMSyH43Kebrg";
/// Public half of the seed token-signing key, published as kid "k1".
const SEED_X: &str = "C1Pbu2BidF0M5l2rwiUp6bypEr0IhZcWu9SGepruUxk";

struct Fixture {
    routes: RouteTable,
    live: Snapshot,
    test: Snapshot,
    cache: TokenCache,
}

fn scopes(s: &[&str]) -> Access {
    Access::Scopes(s.iter().map(|x| Scope::parse(x).unwrap()).collect())
}

fn sync_key(id: &str, secret: &str, expires_at: Option<i64>) -> SyncKey {
    // Also checks the constants are still well-formed keys for this library version.
    assert!(key::parse(secret).is_ok(), "seed key {id} no longer parses");
    SyncKey {
        key_id: id.into(),
        hash: KeyHash::of(secret).to_hex(),
        expires_at,
        // A key with an end here is a rotated one in its grace window.
        grace_ends_at: expires_at,
    }
}

fn service(id: &str, env: Environment, scopes: &[&str], keys: Vec<SyncKey>) -> SyncService {
    SyncService {
        tls_identities: vec![],
        service_id: id.into(),
        service_name: format!("name-{id}"),
        environment: env,
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
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

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let routes = RouteTable::new(vec![
            Route::new(vec!["OPTIONS".into()], "/".into(), Access::Public),
            Route::new(vec![], "/health".into(), Access::Public),
            Route::new(
                vec!["GET".into()],
                "/api/v1/trades".into(),
                scopes(&["trade:read", "account:read"]),
            ),
            Route::new(
                vec!["POST".into()],
                "/api/v1/trades".into(),
                scopes(&["trade:open"]),
            ),
            Route::new(
                vec!["DELETE".into()],
                "/api/v1/trades".into(),
                scopes(&["trade:close"]),
            ),
            Route::new(
                vec!["GET".into()],
                "/api/v1/account".into(),
                scopes(&["account:read"]),
            ),
            Route::new(
                vec!["GET".into()],
                "/api/v1/account/balance".into(),
                scopes(&["account:balance"]),
            ),
            Route::new(vec![], "/api/v1/market".into(), scopes(&["market:data"])),
            Route::new(vec![], "/api/v1/admin/".into(), scopes(&["admin:system"])),
        ]);
        let a = service(
            "srv_a",
            Environment::Live,
            &["trade:*", "account:read"],
            vec![
                sync_key("key_a", LIVE_A, None),
                sync_key("key_ended", LIVE_ENDED, Some(NOW_SECS - 1)),
            ],
        );
        // Rate-limited (with quotas no fuzz run can exhaust, so verdicts do not depend on how
        // many inputs ran before) and restricted to 10/8 and ::1.
        let mut b = service(
            "srv_b",
            Environment::Live,
            &["market:data", "account:*"],
            vec![sync_key("key_b", LIVE_B, Some(NOW_SECS + 3600))],
        );
        b.rate_limit_per_minute = Some(u32::MAX);
        b.rate_limit_per_hour = Some(u32::MAX);
        b.allowed_ips = vec!["10.0.0.0/8".into(), "::1".into()];
        let mut disabled = service("srv_off", Environment::Live, &["trade:*"], vec![]);
        disabled.disabled = true;
        let t = service(
            "srv_t",
            Environment::Test,
            &["admin:*"],
            vec![sync_key("key_t", TEST_T, None)],
        );
        let payload = SyncPayload {
            epoch: "e1".into(),
            version: 1,
            full: true,
            services: vec![a, b, disabled, t],
            issuer: "https://auth".into(),
            signing_keys: vec![SyncSigningKey {
                kid: "k1".into(),
                x: SEED_X.into(),
            }],
            revoked_tokens: vec![SyncRevokedToken {
                jti: "revoked-1".into(),
                expires_at: NOW_SECS + 3600,
            }],
            ..Default::default()
        };
        Fixture {
            routes,
            live: Snapshot::from_full(&payload, Environment::Live, None).expect("live fixture"),
            test: Snapshot::from_full(&payload, Environment::Test, None).expect("test fixture"),
            cache: TokenCache::new(64),
        }
    })
}

/// `PERMISO_FUZZ_DEBUG=1` prints each verdict (for checking what the seeds reach).
fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("PERMISO_FUZZ_DEBUG").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (path, header) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let path = String::from_utf8_lossy(path);
    let method = ["GET", "POST", "DELETE", "OPTIONS"][(flags & 3) as usize];
    let authorization = match (flags >> 2) & 3 {
        0 | 1 => Authorization::One(header),
        2 => Authorization::Absent,
        _ => Authorization::Several,
    };
    let client_ip: Option<IpAddr> = match (flags >> 4) & 3 {
        0 => None,
        1 => Some("127.0.0.1".parse().unwrap()),
        2 => Some("10.1.2.3".parse().unwrap()),
        _ => Some("::ffff:10.9.9.9".parse().unwrap()),
    };
    let f = fixture();
    let (environment, snapshot) = match flags >> 6 {
        0 | 1 => (Environment::Live, Some(&f.live)),
        2 => (Environment::Test, Some(&f.test)),
        _ => (Environment::Live, None),
    };
    let facts = RequestFacts {
        method,
        path: &path,
        authorization,
        client_ip,
        peer: None,
    };
    // With and without the token cache: the cached path re-judges a verified token, and must
    // reach the same verdict.
    let mut outcomes = Vec::with_capacity(2);
    for cache in [None, Some(&f.cache)] {
        let policy = TokenPolicy {
            audience: "permiso",
            leeway_secs: 30,
            cache,
        };
        let verdict = decision::decide(&f.routes, snapshot, environment, &facts, NOW_NANOS, &policy);
        if debug() {
            eprintln!("{method} {path:?} cache={}: {verdict:?}", cache.is_some());
        }
        let outcome = match verdict {
            Ok(pass) => {
                let canonical = pass.rewritten_path.as_deref().unwrap_or(&path).to_string();
                match pass.verdict {
                    Verdict::Public { .. } => {
                        // Public only when no protected route covers the canonical path.
                        let j = f.routes.judge(method, &canonical).expect("a route matched");
                        assert!(j.required(method, &canonical).next().is_none(), "public with a protected route: {path:?}");
                        "public".to_string()
                    }
                    Verdict::Allowed { principal, rate, .. } => {
                        let snap = snapshot.expect("allowed without a snapshot");
                        let svc = &principal.service;
                        assert!(!svc.disabled);
                        assert_eq!(svc.environment, environment);
                        // The address is inside the service's allowed ranges.
                        assert!(svc.ip_allowed(client_ip), "allowed from outside allowed_ips");
                        // Every protected route covering the path is satisfied by what the
                        // caller holds now (and, for a token, by what the token grants).
                        let j = f.routes.judge(method, &canonical).expect("a route matched");
                        let mut any = false;
                        for r in j.required(method, &canonical) {
                            any = true;
                            if let Access::Scopes(needed) = &r.access {
                                assert!(svc.scopes.allows_all(needed), "service lacks {} for {path:?}", r.scope_attr);
                                if let Credential::AccessToken(t) = &principal.credential {
                                    assert!(t.scopes.allows_all(needed), "token lacks {}", r.scope_attr);
                                }
                            }
                        }
                        assert!(any, "allowed on a path no protected route covers");
                        match &principal.credential {
                            Credential::ApiKey { key_id, .. } => {
                                // The key is in the snapshot and its grace has not ended.
                                let raw = std::str::from_utf8(header).unwrap();
                                let token = raw.split_once(' ').map(|(_, t)| t.trim_matches(' ')).unwrap();
                                let entry = snap.lookup(&KeyHash::of(token)).expect("allowed key is in the snapshot");
                                assert_eq!(&*entry.key_id, &**key_id);
                                assert!(entry.expires_at().is_none_or(|end| NOW_SECS < end), "grace ended");
                            }
                            Credential::AccessToken(t) => {
                                assert!(!snap.tokens.revoked.contains(&*t.jti), "revoked jti allowed");
                                assert!(t.exp + 30 > NOW_SECS, "expired token allowed");
                                assert!(t.iat >= svc.tokens_not_before);
                            }
                            Credential::ClientCert { .. } => panic!("no client certificate is presented here"),
                        }
                        let _ = (principal.scopes_header(), rate.header());
                        // What the proxy does next for an allowed request.
                        principal.record_use(NOW_SECS);
                        format!("allowed {} {}", svc.id, principal.credential_id())
                    }
                }
            }
            Err(denial) => {
                // Every denial must turn into a response without panicking.
                let _ = (denial.reason(), denial.response());
                format!("{denial:?}")
            }
        };
        outcomes.push(outcome);
    }
    assert_eq!(outcomes[0], outcomes[1], "cached and uncached verdicts differ for {path:?}");
});
