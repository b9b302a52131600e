//! Issue 16 at the sidecar: trusted routes, key expiry judged by the sidecar's clock, and
//! shadow mode, over real HTTP with a real admin plane, sidecars and upstream.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{header, scrape, Harness, ROUTES};

/// ROUTES plus a trusted admin area, as seed 002 protects it.
const TRUSTED_ROUTES: &str = r#"
[[sidecar.routes]]
prefix = "/api/v1/admin"
scopes = ["trade:read"]
trusted = true
"#;

fn routes_with_admin() -> String {
    format!("{ROUTES}{TRUSTED_ROUTES}")
}

/// What the echo upstream saw: its request headers.
fn upstream_headers(r: reqwest::blocking::Response) -> Value {
    r.json::<Value>().unwrap()["headers"].clone()
}

fn error_of(r: reqwest::blocking::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().unwrap_or(Value::Null);
    (status, v["error"].as_str().unwrap_or("").to_string())
}

/// The JSON claims of a JWT (unverified: the test only reads what was minted).
fn claims(jwt: &str) -> Value {
    use base64::Engine;
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

fn sidecar_metric(h: &Harness, series: &str) -> u64 {
    let health = h.sidecar.as_ref().unwrap().health_addr.unwrap();
    scrape(&h.http, &format!("http://{health}/metrics"), series).unwrap_or(0)
}

#[test]
fn trusted_routes_admit_trusted_services_only() {
    let h = Harness::start_with(&routes_with_admin());
    let trusted = h.create(json!({"service_name": "ops", "scopes": ["trade:read"], "is_trusted": true}));
    let plain = h.create(json!({"service_name": "app", "scopes": ["trade:read"]}));
    // Trusted: forwarded, and the upstream is told.
    let r = h.get("/api/v1/admin/stats", Some(&trusted.api_key));
    assert_eq!(r.status(), 200);
    assert_eq!(upstream_headers(r)["x-permiso-trusted"], "true");
    // Not trusted: 403 access_denied on the trusted route, yet allowed elsewhere (and told so).
    assert_eq!(
        error_of(h.get("/api/v1/admin/stats", Some(&plain.api_key))),
        (403, "access_denied".into())
    );
    let r = h.get("/api/v1/trades", Some(&plain.api_key));
    assert_eq!(r.status(), 200);
    assert_eq!(upstream_headers(r)["x-permiso-trusted"], "false");
    // A caller cannot claim trust with a header of its own.
    let r = h
        .http
        .get(h.sidecar_url("/api/v1/trades"))
        .bearer_auth(&plain.api_key)
        .header("X-Permiso-Trusted", "true")
        .send()
        .unwrap();
    assert_eq!(upstream_headers(r)["x-permiso-trusted"], "false");
    // Access tokens carry the claim (seed 002 reads it), and it is judged too.
    let jwt = h.token(&trusted, None);
    assert_eq!(claims(&jwt)["is_trusted"], true);
    assert_eq!(claims(&h.token(&plain, None))["is_trusted"], false);
    assert_eq!(h.get("/api/v1/admin/stats", Some(&jwt)).status(), 200);
    // Trust withdrawn: the sidecar refuses within a second, the key and the earlier token alike.
    let (s, v) = h.admin_req(
        Method::PATCH,
        &format!("/auth/admin/services/{}", trusted.service_id),
        Some(json!({"is_trusted": false})),
    );
    assert_eq!(s, 200, "{v}");
    assert!(
        v["version"].as_u64().is_some(),
        "a write answers with its version: {v}"
    );
    h.wait_for_status(
        "/api/v1/admin/stats",
        Some(&trusted.api_key),
        403,
        Duration::from_secs(1),
    );
    assert_eq!(h.get("/api/v1/admin/stats", Some(&jwt)).status(), 403);
    assert!(
        sidecar_metric(
            &h,
            "permiso_sidecar_decisions_total{outcome=\"trusted\",reason=\"not_trusted\"}"
        ) >= 2
    );
}

#[test]
fn a_key_expires_by_the_sidecars_clock_even_with_the_admin_plane_down() {
    let mut h = Harness::start();
    let svc = h.create(json!({"service_name": "contractor", "scopes": ["trade:read"], "ttl_seconds": 600}));
    let show = |h: &Harness| {
        let (s, v) = h.admin_req(
            Method::GET,
            &format!("/auth/admin/services/{}", svc.service_id),
            None,
        );
        assert_eq!(s, 200);
        v
    };
    let v = show(&h);
    assert_eq!(v["keys"][0]["status"], "active", "{v}");
    assert!(v["keys"][0]["expires_at"].is_string());
    assert!(
        v["client_secrets"][0]["expires_at"].is_string(),
        "the secret expires too: {v}"
    );
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    h.stop_admin();
    h.clock.advance(Duration::from_secs(599));
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    h.clock.advance(Duration::from_secs(1));
    let r = h.get("/api/v1/trades", Some(&svc.api_key));
    assert_eq!(
        header(&r, "www-authenticate").map(|w| w.contains("invalid_token")),
        Some(true)
    );
    assert_eq!(r.status(), 401);
    assert_eq!(
        sidecar_metric(
            &h,
            "permiso_sidecar_decisions_total{outcome=\"expired\",reason=\"expired\"}"
        ),
        1
    );
    h.restart_admin();
    let v = show(&h);
    assert_eq!(v["keys"][0]["status"], "expired", "{v}");
    // The client secret ended with it: no more tokens.
    let r = h
        .http
        .post(h.admin_url("/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", svc.service_id.as_str()),
            ("client_secret", svc.client_secret.as_str()),
        ])
        .send()
        .unwrap();
    assert_eq!(error_of(r), (401, "invalid_client".into()));
}

#[test]
fn a_patched_expiry_reaches_the_sidecar_and_bad_values_write_nothing() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "ci-job", "scopes": ["trade:read"]}));
    let path = format!("/auth/admin/services/{}/keys/{}", svc.service_id, svc.key_id);
    let version =
        |h: &Harness| scrape(&h.http, &h.admin_url("/metrics"), "permiso_admin_state_version").unwrap();
    let audit_len = |h: &Harness| {
        let (_, v) = h.admin_req(Method::GET, "/auth/admin/audit?limit=1000", None);
        v["entries"].as_array().map_or(0, |e| e.len())
    };
    let (v0, a0) = (version(&h), audit_len(&h));
    let now = h.clock_secs() as i64;
    let rfc = |t: i64| chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339();
    for bad in [
        json!({"expires_at": "tomorrow"}),
        json!({"expires_at": rfc(now - 1)}),
        json!({"expires_at": rfc(now)}),
        json!({"expires_at": rfc(now + 11 * 365 * 86_400)}),
        json!({"ttl_seconds": 0}),
        json!({"ttl_seconds": -5}),
        json!({"ttl_seconds": 400_000_000u64}),
        json!({"expires_at": rfc(now + 60), "ttl_seconds": 60}),
        json!({"expires_at": null, "ttl_seconds": 60}),
        json!({}),
        json!({"expires": rfc(now + 60)}),
    ] {
        let (s, v) = h.admin_req(Method::PATCH, &path, Some(bad.clone()));
        assert_eq!(s, 400, "{bad} -> {v}");
        assert_eq!(v["error"], "invalid_request", "{bad} -> {v}");
        assert!(v["error_description"].is_string());
    }
    // Create and rotate refuse the same way.
    for (p, body) in [
        (
            "/auth/admin/services".to_string(),
            json!({"service_name": "x", "ttl_seconds": 0}),
        ),
        (
            "/auth/admin/services".to_string(),
            json!({"service_name": "x", "expires_at": "2001-01-01T00:00:00Z"}),
        ),
        (
            format!("/auth/admin/services/{}/rotate", svc.service_id),
            json!({"ttl_seconds": 0}),
        ),
    ] {
        let (s, v) = h.admin_req(Method::POST, &p, Some(body.clone()));
        assert_eq!(s, 400, "{body} -> {v}");
    }
    assert_eq!(
        (version(&h), audit_len(&h)),
        (v0, a0),
        "a refused change writes nothing"
    );
    // Another service's key under this service's path is not found.
    let other = h.create(json!({"service_name": "other", "scopes": ["trade:read"]}));
    let (s, _) = h.admin_req(
        Method::PATCH,
        &format!("/auth/admin/services/{}/keys/{}", svc.service_id, other.key_id),
        Some(json!({"ttl_seconds": 60})),
    );
    assert_eq!(s, 404);
    // Set: the sidecar has it within a second and holds it to the second.
    let (s, v) = h.admin_req(Method::PATCH, &path, Some(json!({"expires_at": rfc(now + 30)})));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "active");
    let written = v["version"].as_u64().unwrap();
    assert!(written > v0);
    h.wait_sidecar_caught_up();
    h.clock.advance(Duration::from_secs(29));
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    h.clock.advance(Duration::from_secs(1));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 401, Duration::from_secs(1));
    // An ended key's expiry cannot be changed back.
    let (s, v) = h.admin_req(Method::PATCH, &path, Some(json!({"expires_at": null})));
    assert_eq!(s, 409, "{v}");
    // A rotated key: its own expiry and its grace end, the earlier applies, and null removes
    // only its own.
    let k2 = h.create(json!({"service_name": "rotating", "scopes": ["trade:read"]}));
    let (s, v) = h.admin_req(
        Method::POST,
        &format!("/auth/admin/services/{}/rotate", k2.service_id),
        Some(json!({"grace_seconds": 100, "ttl_seconds": 1000})),
    );
    assert_eq!(s, 200, "{v}");
    assert!(v["expires_at"].is_string(), "the new key's expiry: {v}");
    let kpath = format!("/auth/admin/services/{}/keys/{}", k2.service_id, k2.key_id);
    let (_, v) = h.admin_req(Method::PATCH, &kpath, Some(json!({"ttl_seconds": 10})));
    assert_eq!(v["status"], "grace");
    let end10 = v["expires_at"].clone();
    let (_, v) = h.admin_req(Method::PATCH, &kpath, Some(json!({"expires_at": null})));
    assert_ne!(v["expires_at"], end10, "back to the grace end: {v}");
    assert_eq!(v["status"], "grace");
}

/// One route per kind of denial, the same for both sidecars.
const SHADOW_ROUTES: &str = r#"
[[sidecar.routes]]
prefix = "/health"
public = true

[[sidecar.routes]]
prefix = "/api/v1/trades"
scopes = ["trade:read"]

[[sidecar.routes]]
prefix = "/api/v1/account"
scopes = ["account:read"]

[[sidecar.routes]]
prefix = "/api/v1/admin"
scopes = ["trade:read"]
trusted = true
"#;

#[test]
fn shadow_mode_forwards_every_would_be_denial_and_enforce_mode_denies_it() {
    let h = Harness::start_with(SHADOW_ROUTES);
    let shadow = h.start_extra_sidecar("shadow", "mode = \"shadow\"", SHADOW_ROUTES);
    let svc = h.create(json!({"service_name": "app", "scopes": ["trade:read"]}));
    let limited =
        h.create(json!({"service_name": "limited", "scopes": ["trade:read"], "rate_limit_per_minute": 3}));
    let far =
        h.create(json!({"service_name": "far", "scopes": ["trade:read"], "allowed_ips": ["10.0.0.0/8"]}));
    let test_key = h.create(json!({"service_name": "t", "scopes": ["trade:read"], "environment": "test"}));
    let unknown = permiso::core::key::generate(permiso::core::key::Environment::Live);
    let unknown = unknown.secret.expose().to_string();
    let cases: Vec<(&str, Option<&str>, &str, u16)> = vec![
        ("/api/v1/trades", None, "missing_credential", 401),
        ("/api/v1/trades", Some("svc_live_nope"), "malformed_key", 401),
        ("/api/v1/trades", Some(&unknown), "unknown_or_revoked_key", 401),
        (
            "/api/v1/trades",
            Some(&test_key.api_key),
            "wrong_environment",
            401,
        ),
        ("/api/v1/account", Some(&svc.api_key), "insufficient_scope", 403),
        ("/api/v1/trades", Some(&far.api_key), "ip_not_allowed", 403),
        ("/api/v1/admin", Some(&svc.api_key), "not_trusted", 403),
        ("/nowhere", Some(&svc.api_key), "no_route", 403),
    ];
    let shadow_url = format!("http://{}", shadow.addr);
    let health = shadow.health_addr.unwrap();
    let shadow_metric = |reason: &str| {
        scrape(
            &h.http,
            &format!("http://{health}/metrics"),
            &format!("permiso_sidecar_shadow_denials_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0)
    };
    for (path, key, reason, status) in cases {
        // Enforce mode denies.
        let r = h.get(path, key);
        assert_eq!(r.status().as_u16(), status, "{path} {key:?} enforced");
        let before = shadow_metric(reason);
        // Shadow mode forwards, names the would-be denial, counts it.
        let mut rb = h.http.get(format!("{shadow_url}{path}"));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        let r = rb.send().unwrap();
        assert_eq!(r.status(), 200, "{path} {key:?} in shadow mode");
        let seen = upstream_headers(r);
        assert_eq!(seen["x-permiso-shadow-denial"], reason, "{path} {key:?}: {seen}");
        assert_eq!(shadow_metric(reason), before + 1, "{reason}");
        // The caller's identity goes along when one was established.
        let identified = matches!(reason, "insufficient_scope" | "ip_not_allowed" | "not_trusted");
        assert_eq!(
            seen["x-permiso-service-id"].is_string(),
            identified,
            "{reason}: {seen}"
        );
    }
    // An allowed request carries no shadow header; a forged one is dropped.
    let r = h
        .http
        .get(format!("{shadow_url}/api/v1/trades"))
        .bearer_auth(&svc.api_key)
        .header("X-Permiso-Shadow-Denial", "forged")
        .send()
        .unwrap();
    assert!(upstream_headers(r)["x-permiso-shadow-denial"].is_null());
    // The limit: 3 a minute. Shadow mode forwards past it, flagging what it would refuse.
    let mut flagged = 0;
    for _ in 0..5 {
        let r = h
            .http
            .get(format!("{shadow_url}/api/v1/trades"))
            .bearer_auth(&limited.api_key)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        flagged += (upstream_headers(r)["x-permiso-shadow-denial"] == "rate_limited_minute") as u32;
    }
    assert_eq!(flagged, 2, "5 calls against 3 a minute: the last 2 flagged");
    // Enforce mode denies it at its own count.
    for _ in 0..3 {
        assert_eq!(h.get("/api/v1/trades", Some(&limited.api_key)).status(), 200);
    }
    assert_eq!(h.get("/api/v1/trades", Some(&limited.api_key)).status(), 429);
    // Malformed requests are refused in every mode.
    let r = h
        .http
        .get(format!("{shadow_url}/api/v1/trades"))
        .header("Authorization", "Bearer a")
        .header("Authorization", "Bearer b")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    shadow.stop();
}

/// A shadow route beside an enforced one: the shadowed limit spends its own count only, and
/// a reload switches the route to enforce.
#[test]
fn a_shadowed_limit_leaves_enforced_quota_alone_and_a_reload_enforces() {
    let routes = |mode: &str| {
        format!(
            r#"
[[sidecar.routes]]
prefix = "/api/v1/new"
scopes = ["trade:read"]
mode = "{mode}"

[[sidecar.routes]]
prefix = "/api/v1/trades"
scopes = ["trade:read"]
"#
        )
    };
    let h = Harness::start_with(&routes("shadow"));
    let svc = h.create(json!({"service_name": "app", "scopes": ["trade:read"], "rate_limit_per_minute": 2}));
    for i in 0..6 {
        let r = h.get("/api/v1/new", Some(&svc.api_key));
        assert_eq!(r.status(), 200, "shadowed call {i}");
    }
    // The enforced route still has its whole quota.
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 429);
    // Switching the route to enforce is a reload.
    let s = h.sidecar.as_ref().unwrap();
    s.reloader.apply(h.sidecar_config(&routes("enforce")));
    assert_eq!(h.get("/api/v1/new", Some(&svc.api_key)).status(), 429);
    let r = h.get("/api/v1/new", None);
    assert_eq!(r.status(), 401);
}
