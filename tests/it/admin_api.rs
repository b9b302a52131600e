//! The admin API: authentication, bad input (4xx, JSON body, nothing written), listing, sync.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{Harness, ADMIN_KEY};

fn sync_version(h: &Harness) -> u64 {
    let r = h
        .http
        .get(h.admin_url("/v1/sync"))
        .bearer_auth(&h.sync_key)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().unwrap()["version"].as_u64().unwrap()
}

fn raw(h: &Harness, method: Method, path: &str, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut rb = h
        .http
        .request(method, h.admin_url(path))
        .header("X-Admin-Api-Key", ADMIN_KEY)
        .body(body);
    if let Some(ct) = content_type {
        rb = rb.header("Content-Type", ct);
    }
    let r = rb.send().unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

#[test]
fn bad_input_gets_its_4xx_and_writes_nothing() {
    let h = Harness::start();
    let existing = h.create(json!({"service_name": "existing", "scopes": ["a:b"]}));
    let other = h.create(json!({"service_name": "other", "scopes": ["a:b"]}));
    let before = h.list_all();
    let version_before = sync_version(&h);
    let svc_path = format!("/auth/admin/services/{}", existing.service_id);
    let json_ct = Some("application/json");
    type Case<'a> = (&'a str, Method, String, Option<&'a str>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            Method::POST,
            "/auth/admin/services".into(),
            json_ct,
            b"{\"service_name\":".to_vec(),
            400,
        ),
        (
            "unknown field",
            Method::POST,
            "/auth/admin/services".into(),
            json_ct,
            br#"{"service_name":"x","admin":true}"#.to_vec(),
            400,
        ),
        (
            "bad scope",
            Method::POST,
            "/auth/admin/services".into(),
            json_ct,
            br#"{"service_name":"x","scopes":["trade::open"]}"#.to_vec(),
            400,
        ),
        (
            "bad CIDR",
            Method::POST,
            "/auth/admin/services".into(),
            json_ct,
            br#"{"service_name":"x","allowed_ips":["10.0.0.0/40"]}"#.to_vec(),
            400,
        ),
        (
            "empty name",
            Method::POST,
            "/auth/admin/services".into(),
            json_ct,
            br#"{"service_name":"  "}"#.to_vec(),
            400,
        ),
        (
            "duplicate name",
            Method::POST,
            "/auth/admin/services".into(),
            json_ct,
            br#"{"service_name":"EXISTING"}"#.to_vec(),
            409,
        ),
        (
            "bad environment",
            Method::POST,
            "/auth/admin/services".into(),
            json_ct,
            br#"{"service_name":"x","environment":"prod"}"#.to_vec(),
            400,
        ),
        (
            "zero rate limit",
            Method::POST,
            "/auth/admin/services".into(),
            json_ct,
            br#"{"service_name":"x","rate_limit_per_minute":0}"#.to_vec(),
            400,
        ),
        (
            "wrong content type",
            Method::POST,
            "/auth/admin/services".into(),
            Some("text/plain"),
            br#"{"service_name":"x"}"#.to_vec(),
            415,
        ),
        (
            "no content type",
            Method::POST,
            "/auth/admin/services".into(),
            None,
            br#"{"service_name":"x"}"#.to_vec(),
            415,
        ),
        (
            "body too large",
            Method::POST,
            "/auth/admin/services".into(),
            json_ct,
            format!(r#"{{"service_name":"x","description":"{}"}}"#, "d".repeat(10_000)).into_bytes(),
            413,
        ),
        (
            "unknown service",
            Method::GET,
            "/auth/admin/services/srv_doesnotexist".into(),
            None,
            vec![],
            404,
        ),
        (
            "not an id",
            Method::GET,
            "/auth/admin/services/..%2f..".into(),
            None,
            vec![],
            404,
        ),
        (
            "patch unknown service",
            Method::PATCH,
            "/auth/admin/services/srv_nope".into(),
            json_ct,
            br#"{"disabled":true}"#.to_vec(),
            404,
        ),
        (
            "patch bad scope",
            Method::PATCH,
            svc_path.clone(),
            json_ct,
            br#"{"scopes":["*"]}"#.to_vec(),
            400,
        ),
        (
            "patch unknown field",
            Method::PATCH,
            svc_path.clone(),
            json_ct,
            br#"{"service_name":"renamed"}"#.to_vec(),
            400,
        ),
        (
            "patch nothing",
            Method::PATCH,
            svc_path.clone(),
            json_ct,
            b"{}".to_vec(),
            400,
        ),
        (
            "rotate bad body",
            Method::POST,
            format!("{svc_path}/rotate"),
            json_ct,
            br#"{"grace_seconds":-1}"#.to_vec(),
            400,
        ),
        (
            "rotate unknown field",
            Method::POST,
            format!("{svc_path}/rotate"),
            json_ct,
            br#"{"grace":5}"#.to_vec(),
            400,
        ),
        (
            "rotate unknown service",
            Method::POST,
            "/auth/admin/services/srv_nope/rotate".into(),
            None,
            vec![],
            404,
        ),
        (
            "revoke unknown key",
            Method::POST,
            format!("{svc_path}/keys/key_nope/revoke"),
            None,
            vec![],
            404,
        ),
        (
            "revoke another service's key",
            Method::POST,
            format!(
                "/auth/admin/services/{}/keys/{}/revoke",
                other.service_id, existing.key_id
            ),
            None,
            vec![],
            404,
        ),
        (
            "delete unknown",
            Method::DELETE,
            "/auth/admin/services/srv_nope".into(),
            None,
            vec![],
            404,
        ),
        (
            "bad list limit",
            Method::GET,
            "/auth/admin/services?limit=0".into(),
            None,
            vec![],
            400,
        ),
        (
            "bad list param",
            Method::GET,
            "/auth/admin/services?limit=abc".into(),
            None,
            vec![],
            400,
        ),
        // Found by schemathesis (tests/it/contract.rs): counters beyond int64 were accepted,
        // and a duration whose last character is multi-byte panicked the handler.
        (
            "audit cursor beyond int64",
            Method::GET,
            "/auth/admin/audit?after=9223372036854775808".into(),
            None,
            vec![],
            400,
        ),
        (
            "sync version beyond int64",
            Method::GET,
            "/v1/sync?after=9223372036854775808".into(),
            None,
            vec![],
            400,
        ),
        (
            "sync wait beyond int64",
            Method::GET,
            "/v1/sync?wait=18446744073709551615".into(),
            None,
            vec![],
            400,
        ),
        (
            "used_since ending in a multi-byte character",
            Method::GET,
            "/auth/admin/keys?status=grace&used_since=%C2%80".into(),
            None,
            vec![],
            400,
        ),
        // Found in review: a path segment that is not UTF-8 got axum's plain-text 400.
        (
            "service id not UTF-8",
            Method::GET,
            "/auth/admin/services/%FF".into(),
            None,
            vec![],
            400,
        ),
        (
            "key id not UTF-8",
            Method::POST,
            "/auth/admin/services/%FF/keys/%FE/revoke".into(),
            None,
            vec![],
            400,
        ),
        (
            "change version not UTF-8",
            Method::GET,
            "/auth/admin/changes/%FF".into(),
            None,
            vec![],
            400,
        ),
        (
            "unknown endpoint",
            Method::GET,
            "/auth/admin/nothing".into(),
            None,
            vec![],
            404,
        ),
        (
            "wrong method",
            Method::PUT,
            "/auth/admin/services".into(),
            None,
            vec![],
            405,
        ),
    ];
    for (name, method, path, ct, body, want) in cases {
        let (got, v) = raw(&h, method, &path, ct, body);
        assert_eq!(got, want, "{name}: {v}");
        assert!(
            v["error"].is_string() && v["error_description"].is_string(),
            "{name}: body {v}"
        );
    }
    assert_eq!(h.list_all(), before, "a refused request changed the database");
    assert_eq!(sync_version(&h), version_before);
}

#[test]
fn admin_authentication() {
    let h = Harness::start();
    let list = |key: Option<(&str, &str)>| {
        let mut rb = h.http.get(h.admin_url("/auth/admin/services"));
        if let Some((name, value)) = key {
            rb = rb.header(name, value);
        }
        let r = rb.send().unwrap();
        let www = r.headers().get("www-authenticate").is_some();
        (r.status().as_u16(), www, r.json::<Value>().unwrap())
    };
    let (s, www, v) = list(None);
    assert_eq!((s, www), (401, true));
    assert_eq!(v["error"], "unauthorized");
    assert_eq!(
        list(Some(("X-Admin-Api-Key", "wrong-key-wrong-key-wrong"))).0,
        401
    );
    assert_eq!(
        list(Some(("X-Admin-Api-Key", &ADMIN_KEY[..ADMIN_KEY.len() - 1]))).0,
        401
    );
    assert_eq!(list(Some(("X-Admin-Api-Key", ADMIN_KEY))).0, 200);

    // A service key holding admin:* is an admin; one without is refused; a garbage bearer is 401.
    let admin_svc = h.create(json!({"service_name": "ops-bot", "scopes": ["admin:*"]}));
    let plain = h.create(json!({"service_name": "plain", "scopes": ["trade:read"]}));
    let bearer = |k: &str| format!("Bearer {k}");
    assert_eq!(list(Some(("Authorization", &bearer(&admin_svc.api_key)))).0, 200);
    assert_eq!(list(Some(("Authorization", &bearer(&plain.api_key)))).0, 403);
    assert_eq!(list(Some(("Authorization", "Bearer svc_live_garbage"))).0, 401);

    // The admin service key can act: create through it.
    let r = h
        .http
        .post(h.admin_url("/auth/admin/services"))
        .bearer_auth(&admin_svc.api_key)
        .json(&json!({"service_name": "made-by-bot"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);

    // Once its service is disabled, its key is no longer an admin.
    let (s, _) = h.admin_req(
        Method::DELETE,
        &format!("/auth/admin/services/{}", admin_svc.service_id),
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(list(Some(("Authorization", &bearer(&admin_svc.api_key)))).0, 401);
}

#[test]
fn listing_paginates_and_never_shows_secrets() {
    let h = Harness::start();
    let mut keys = vec![];
    for i in 0..5 {
        keys.push(
            h.create(json!({"service_name": format!("svc-{i}"), "scopes": ["x:y"]}))
                .api_key,
        );
    }
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/auth/admin/services?limit=2&cursor={c}"),
            None => "/auth/admin/services?limit=2".to_string(),
        };
        let (s, v) = h.admin_req(Method::GET, &path, None);
        assert_eq!(s, 200);
        let text = v.to_string();
        for k in &keys {
            assert!(!text.contains(k.as_str()), "a key leaked into a listing");
        }
        assert!(!text.contains(&h.sync_key));
        for svc in v["services"].as_array().unwrap() {
            seen.push(svc["service_name"].as_str().unwrap().to_string());
            let key = &svc["keys"][0];
            assert!(key["prefix"].as_str().unwrap().starts_with("svc_live_"));
            assert_eq!(key["prefix"].as_str().unwrap().len(), 13);
            assert!(key["created_at"].is_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec!["sidecar-sync", "svc-0", "svc-1", "svc-2", "svc-3", "svc-4"]
    );
}

#[test]
fn sync_endpoint_scopes_deltas_long_polls_and_carries_no_keys() {
    let h = Harness::start();
    // Needs sync:read (or the admin key); admin:* alone is not enough.
    let admin_svc = h.create(json!({"service_name": "ops", "scopes": ["admin:*"]}));
    let r = h
        .http
        .get(h.admin_url("/v1/sync"))
        .bearer_auth(&admin_svc.api_key)
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(h.http.get(h.admin_url("/v1/sync")).send().unwrap().status(), 401);
    let r = h
        .http
        .get(h.admin_url("/v1/sync"))
        .header("X-Admin-Api-Key", ADMIN_KEY)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    let full: Value = h
        .http
        .get(h.admin_url("/v1/sync"))
        .bearer_auth(&h.sync_key)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(full["full"], true);
    let text = full.to_string();
    assert!(
        !text.contains(&admin_svc.api_key) && !text.contains(&h.sync_key),
        "sync payload carries a key"
    );
    let epoch = full["epoch"].as_str().unwrap().to_string();
    let version = full["version"].as_u64().unwrap();

    // Up to date: an empty delta.
    let url =
        |after: u64, wait: u64| h.admin_url(&format!("/v1/sync?after={after}&epoch={epoch}&wait={wait}"));
    let d: Value = h
        .http
        .get(url(version, 0))
        .bearer_auth(&h.sync_key)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        (d["full"].as_bool(), d["services"].as_array().unwrap().len()),
        (Some(false), 0)
    );
    // Another epoch (a different database): full.
    let f: Value = h
        .http
        .get(h.admin_url(&format!("/v1/sync?after={version}&epoch=other")))
        .bearer_auth(&h.sync_key)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(f["full"], true);

    // A long poll returns as soon as something changes, with just that service.
    let client = h.http.clone();
    let sync_key = h.sync_key.clone();
    let poll_url = url(version, 5);
    let started = Instant::now();
    let poll = std::thread::spawn(move || {
        let v: Value = client
            .get(poll_url)
            .bearer_auth(sync_key)
            .send()
            .unwrap()
            .json()
            .unwrap();
        (v, started.elapsed())
    });
    // Parked: the harness's sidecar and this poll are the only long pollers, so two parked
    // means this one is waiting at the admin plane (not merely sent, or not yet).
    let parked =
        || crate::common::scrape(&h.http, &h.admin_url("/metrics"), "permiso_admin_sync_long_polls").unwrap();
    while parked() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the long poll never parked"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!poll.is_finished(), "the long poll answered before any change");
    let created = h.create(json!({"service_name": "late", "scopes": ["q:r"]}));
    let (delta, took) = poll.join().unwrap();
    assert!(took < Duration::from_secs(2), "long poll took {took:?}");
    assert_eq!(delta["full"], false);
    let services = delta["services"].as_array().unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0]["service_id"], created.service_id.as_str());
    assert_eq!(services[0]["keys"][0]["hash"].as_str().unwrap().len(), 64);
}

/// The admin plane checks a service key's allowed_ips as the sidecar does.
#[test]
fn a_service_key_outside_its_allowed_ips_is_refused_at_the_admin_plane() {
    let h = Harness::start();
    let far = h.create(json!({"service_name": "far-admin", "scopes": ["admin:*", "sync:read"], "allowed_ips": ["10.0.0.0/8"]}));
    let near = h
        .create(json!({"service_name": "near-admin", "scopes": ["admin:*"], "allowed_ips": ["127.0.0.0/8"]}));
    let get = |key: &str, path: &str| h.http.get(h.admin_url(path)).bearer_auth(key).send().unwrap();
    let r = get(&far.api_key, "/auth/admin/services");
    assert_eq!(r.status(), 403);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"], "forbidden", "{v}");
    assert!(
        v["error_description"].as_str().unwrap().contains("address"),
        "{v}"
    );
    assert_eq!(get(&far.api_key, "/v1/sync").status(), 403);
    assert_eq!(get(&near.api_key, "/auth/admin/services").status(), 200);
    // Widened to include loopback: accepted at once.
    let (s, _) = h.admin_req(
        reqwest::Method::PATCH,
        &format!("/auth/admin/services/{}", far.service_id),
        Some(json!({"allowed_ips": ["10.0.0.0/8", "127.0.0.1"]})),
    );
    assert_eq!(s, 200);
    assert_eq!(get(&far.api_key, "/auth/admin/services").status(), 200);
}

/// `PERMISO_SIGNING_KEK` seals the token signing keys: no `<database>.kek` file is created,
/// another KEK cannot open them, and an empty or malformed one is refused at start.
#[test]
fn the_signing_kek_comes_from_the_environment() {
    use base64::Engine;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kek.db");
    let kek = |byte: u8| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([byte; 32]);
    let admin = |kek: &str| {
        let addr = crate::common::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_permiso"))
            .args([
                "admin",
                "--database",
                db.to_str().unwrap(),
                "--listen",
                &addr.to_string(),
            ])
            .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
            .env("PERMISO_SIGNING_KEK", kek)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (crate::common::Proc(child), addr)
    };
    let http = reqwest::blocking::Client::new();
    let (mut first, addr) = admin(&kek(7));
    let started = Instant::now();
    let jwks = loop {
        if let Ok(r) = http.get(format!("http://{addr}/.well-known/jwks.json")).send() {
            break r.json::<Value>().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "admin plane never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert!(
        !dir.path().join("kek.db.kek").exists(),
        "no KEK file beside the database"
    );
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    // Another KEK cannot unseal the key: the admin plane refuses to start.
    for (what, value) in [
        ("another KEK", kek(8)),
        ("an empty KEK", String::new()),
        ("not base64url", "!!".into()),
    ] {
        let (mut p, _) = admin(&value);
        let status = p.0.wait().unwrap();
        assert!(!status.success(), "{what}: started anyway");
        let mut err = String::new();
        std::io::Read::read_to_string(p.0.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(err.to_lowercase().contains("key"), "{what}: {err}");
    }
    assert!(!dir.path().join("kek.db.kek").exists());
}

/// Review finding: loops of full syncs rebuilt a 2 MB payload each (admin latency 1 → 150 ms).
/// Full snapshots are now built once per version and second and shared.
#[test]
fn full_syncs_at_one_version_share_one_build() {
    let h = Harness::start();
    for i in 0..20 {
        h.create_unsynced(json!({"service_name": format!("bulk-{i}"), "scopes": ["trade:read"]}));
    }
    let built = || {
        crate::common::scrape(
            &h.http,
            &h.admin_url("/metrics"),
            "permiso_admin_full_syncs_built_total",
        )
        .unwrap()
    };
    let before = built();
    // The clock is the harness's manual one: every request below is in the same second.
    let bodies: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..24)
            .map(|_| {
                s.spawn(|| {
                    let r = h
                        .http
                        .get(h.admin_url("/v1/sync"))
                        .bearer_auth(&h.sync_key)
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.text().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(built() - before, 1, "24 full syncs, one build");
    let first: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(first["full"], true);
    assert!(first["services"].as_array().unwrap().len() >= 21);
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every caller got the same snapshot"
    );
    // A change, or the next second, builds anew.
    h.create_unsynced(json!({"service_name": "one-more", "scopes": ["trade:read"]}));
    let r = h
        .http
        .get(h.admin_url("/v1/sync"))
        .bearer_auth(&h.sync_key)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(built() - before, 2);
}

/// Each sync credential has a bounded number of syncs open at once (long polls included).
#[test]
fn a_sync_credential_has_a_bounded_number_of_concurrent_syncs() {
    let h = Harness::start_custom(crate::common::ROUTES, |f| {
        f.sync_max_concurrent_per_credential = 3
    });
    let other = h.create(json!({"service_name": "other-sync", "scopes": ["sync:read"]}));
    let (version, epoch) = {
        let r = h
            .http
            .get(h.admin_url("/v1/sync"))
            .bearer_auth(&other.api_key)
            .send()
            .unwrap();
        let v: Value = r.json().unwrap();
        (
            v["version"].as_u64().unwrap(),
            v["epoch"].as_str().unwrap().to_string(),
        )
    };
    let parked = format!("/v1/sync?after={version}&epoch={epoch}&wait=30");
    // The harness's own sidecar holds one long poll with its key; two more fill the bound.
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let (url, key) = (h.admin_url(&parked), h.sync_key.clone());
            std::thread::spawn(move || {
                reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(40))
                    .build()
                    .unwrap()
                    .get(url)
                    .bearer_auth(key)
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    // Wait until the bound is reached: the next sync with that key gets 429.
    let started = Instant::now();
    let refused = loop {
        let r = h
            .http
            .get(h.admin_url("/v1/sync"))
            .bearer_auth(&h.sync_key)
            .send()
            .unwrap();
        if r.status() == 429 {
            break r;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never refused");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(refused.headers().get("retry-after").is_some());
    assert_eq!(refused.json::<Value>().unwrap()["error"], "rate_limited");
    // Another credential is not affected.
    let r = h
        .http
        .get(h.admin_url("/v1/sync"))
        .bearer_auth(&other.api_key)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // A change ends the long polls; the slots are free again.
    h.create_unsynced(json!({"service_name": "wake-up", "scopes": []}));
    for p in polls {
        assert_eq!(p.join().unwrap(), 200);
    }
    let started = Instant::now();
    while h
        .http
        .get(h.admin_url("/v1/sync"))
        .bearer_auth(&h.sync_key)
        .send()
        .unwrap()
        .status()
        != 200
    {
        assert!(started.elapsed() < Duration::from_secs(10), "slots never freed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A refused admin request says what to send; the admin key sent as Bearer is recognised and
/// told so, and such attempts are throttled like X-Admin-Api-Key ones (else the different
/// answer would let the admin key be guessed without the throttle).
#[test]
fn a_refused_admin_request_says_what_to_send() {
    let h = Harness::start_custom(crate::common::ROUTES, |a| a.auth_failures_per_minute_per_ip = 3);
    let get = |auth: Option<&str>| {
        let mut rb = h.http.get(h.admin_url("/auth/admin/services"));
        if let Some(a) = auth {
            rb = rb.header("Authorization", a);
        }
        let r = rb.send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap_or(Value::Null))
    };
    let (s, v) = get(None);
    assert_eq!(s, 401);
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("X-Admin-Api-Key"),
        "{v}"
    );
    let (s, v) = get(Some(&format!("Bearer {ADMIN_KEY}")));
    assert_eq!(s, 401);
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("this is the admin key"),
        "{v}"
    );
    // Wrong guesses sent as Bearer count like admin-key attempts: a few more reach the limit
    // of 3 from this address, and then even the right key is refused before it is looked at.
    let mut throttled = false;
    for i in 0..5 {
        let (s, v) = get(Some(&format!("Bearer not-the-admin-key-{i}")));
        if s == 429 {
            throttled = true;
            break;
        }
        assert_eq!(s, 401, "{v}");
        assert!(!v["error_description"]
            .as_str()
            .unwrap()
            .contains("this is the admin key"));
    }
    assert!(throttled, "Bearer guesses were never throttled");
    let (s, v) = get(Some(&format!("Bearer {ADMIN_KEY}")));
    assert_eq!(s, 429, "{v}");
    // The refusal says why and for how long.
    let d = v["error_description"].as_str().unwrap();
    assert!(
        d.contains("failed admin-key attempts") && d.contains("retry after"),
        "{v}"
    );
}
