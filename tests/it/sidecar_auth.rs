//! What the sidecar lets through, what it tells the upstream, and how it refuses.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{header, Harness};

#[test]
fn valid_key_reaches_upstream_with_identity_and_without_the_key() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "billing", "scopes": ["trade:read", "account:*"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));

    let r = h
        .http
        .get(h.sidecar_url("/api/v1/trades/7?x=1"))
        .bearer_auth(&svc.api_key)
        .header("X-Permiso-Service-Id", "srv_forged")
        .header("x-permiso-scopes", "admin:*")
        .header("X-Permiso-Anything", "forged")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().unwrap();
    let hd = &echo["headers"];
    assert_eq!(echo["path"], "/api/v1/trades/7");
    assert_eq!(hd["x-permiso-service-id"], svc.service_id.as_str());
    assert_eq!(hd["x-permiso-service-name"], "billing");
    assert_eq!(hd["x-permiso-scopes"], "trade:read account:*");
    assert_eq!(hd["x-permiso-key-id"], svc.key_id.as_str());
    assert_eq!(hd["x-permiso-environment"], "live");
    assert!(
        hd.get("x-permiso-anything").is_none(),
        "forged header forwarded: {hd}"
    );
    assert!(hd.get("authorization").is_none(), "credential forwarded: {hd}");
    assert!(!echo.to_string().contains(&svc.api_key));

    // Public route: no identity, forged headers still dropped, a Permiso key still stripped.
    let r = h
        .http
        .get(h.sidecar_url("/health"))
        .bearer_auth(&svc.api_key)
        .header("X-Permiso-Service-Id", "srv_forged")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().unwrap();
    assert!(echo["headers"].get("x-permiso-service-id").is_none());
    assert!(echo["headers"].get("authorization").is_none());
}

fn assert_invalid_token(r: reqwest::blocking::Response) {
    assert_eq!(r.status(), 401);
    let www = header(&r, "www-authenticate").unwrap().to_string();
    assert!(www.starts_with("Bearer realm=\"permiso\""), "{www}");
    assert!(www.contains("error=\"invalid_token\""), "{www}");
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"], "invalid_token");
    assert!(body["error_description"].is_string());
}

#[test]
fn every_refusal_has_its_status_header_and_body() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "reader", "scopes": ["trade:read"]}));
    let test_env =
        h.create(json!({"service_name": "tester", "scopes": ["trade:read"], "environment": "test"}));
    assert!(test_env.api_key.starts_with("svc_test_"));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));

    // No credential: 401 with a bare challenge (RFC 6750 §3.1).
    let r = h.get("/api/v1/trades", None);
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), Some("Bearer realm=\"permiso\""));
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    let body: Value = r.json().unwrap();
    assert!(body["error"].is_string() && body["error_description"].is_string());

    // Unknown (well-formed, right checksum, never issued).
    let stranger = permiso::core::key::generate(permiso::core::key::Environment::Live);
    assert_invalid_token(h.get("/api/v1/trades", Some(stranger.secret.expose())));
    // Bad checksum: flip the last character.
    let mut typo = svc.api_key.clone();
    let last = typo.pop().unwrap();
    typo.push(if last == 'A' { 'B' } else { 'A' });
    assert_invalid_token(h.get("/api/v1/trades", Some(&typo)));
    // Malformed.
    assert_invalid_token(h.get("/api/v1/trades", Some("svc_live_short")));
    // A test key at a live sidecar.
    assert_invalid_token(h.get("/api/v1/trades", Some(&test_env.api_key)));

    // Missing scope: 403 naming it.
    let r = h
        .http
        .post(h.sidecar_url("/api/v1/trades"))
        .bearer_auth(&svc.api_key)
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    let www = header(&r, "www-authenticate").unwrap().to_string();
    assert!(
        www.contains("error=\"insufficient_scope\"") && www.contains("scope=\"trade:open\""),
        "{www}"
    );
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"], "insufficient_scope");

    // No route: default deny.
    let r = h.get("/internal/debug", Some(&svc.api_key));
    assert_eq!(r.status(), 403);
    // A dot-segment path that could escape a public prefix upstream (sent raw: HTTP clients
    // would normalise it away).
    let mut s = std::net::TcpStream::connect(h.sidecar_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for path in [
        "/health/%2e%2e/api/v1/account",
        "/health/../api/v1/account",
        "/health/..%2Fapi",
    ] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        let resp = read_response(&mut s);
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
        assert!(resp.contains("\"error\":\"invalid_request\""), "{resp}");
    }
}

#[test]
fn allowed_ips_are_enforced_and_follow_patches() {
    let h = Harness::start();
    let svc =
        h.create(json!({"service_name": "remote", "scopes": ["trade:read"], "allowed_ips": ["10.0.0.0/8"]}));
    let r = h
        .http
        .get(h.sidecar_url("/api/v1/trades"))
        .bearer_auth(&svc.api_key)
        .send()
        .unwrap();
    // Until the sidecar has the key it is 401; once it has it, loopback is outside 10/8.
    if r.status() == 401 {
        h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 403, Duration::from_secs(1));
    } else {
        assert_eq!(r.status(), 403);
    }
    let r = h.get("/api/v1/trades", Some(&svc.api_key));
    assert_eq!(r.status(), 403);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"], "access_denied");

    let (s, _) = h.admin_req(
        reqwest::Method::PATCH,
        &format!("/auth/admin/services/{}", svc.service_id),
        Some(json!({"allowed_ips": ["10.0.0.0/8", "127.0.0.0/8"]})),
    );
    assert_eq!(s, 200);
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));
}

#[test]
fn scope_removed_by_admin_is_denied_within_a_second() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "acct", "scopes": ["trade:read", "account:read"]}));
    h.wait_for_status("/api/v1/account", Some(&svc.api_key), 200, Duration::from_secs(1));
    let (s, v) = h.admin_req(
        reqwest::Method::PATCH,
        &format!("/auth/admin/services/{}", svc.service_id),
        Some(json!({"scopes": ["trade:read"]})),
    );
    assert_eq!(s, 200, "{v}");
    let took = h.wait_for_status("/api/v1/account", Some(&svc.api_key), 403, Duration::from_secs(1));
    eprintln!("scope removal reached the sidecar in {took:?}");
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);

    // Disabling the service stops all its keys.
    let (s, v) = h.admin_req(
        reqwest::Method::DELETE,
        &format!("/auth/admin/services/{}", svc.service_id),
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(v["disabled"], true);
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 401, Duration::from_secs(1));
}

#[test]
fn revocation_reaches_the_running_sidecar_within_a_second() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "revokee", "scopes": ["trade:read"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));
    let mut samples = Vec::new();
    let mut key = svc.api_key.clone();
    let mut key_id = svc.key_id.clone();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let (s, v) = h.admin_req(
            reqwest::Method::POST,
            &format!("/auth/admin/services/{}/keys/{}/revoke", svc.service_id, key_id),
            None,
        );
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["status"], "revoked");
        h.wait_for_status("/api/v1/trades", Some(&key), 401, Duration::from_secs(1));
        samples.push(started.elapsed());
        // A fresh key for the next round.
        let (s, v) = h.admin_req(
            reqwest::Method::POST,
            &format!("/auth/admin/services/{}/rotate", svc.service_id),
            Some(json!({"grace_seconds": 0})),
        );
        assert_eq!(s, 200, "{v}");
        key = v["api_key"].as_str().unwrap().to_string();
        key_id = v["key_id"].as_str().unwrap().to_string();
        h.wait_for_status("/api/v1/trades", Some(&key), 200, Duration::from_secs(1));
    }
    samples.sort();
    eprintln!(
        "revocation propagation (revoke request sent -> first 401 at the sidecar), 5 runs: min {:?}, median {:?}, max {:?}",
        samples[0], samples[2], samples[4]
    );
}

#[test]
fn rate_limit_answers_429_with_headers_and_recovers_after_the_window() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "chatty", "scopes": ["trade:read"], "rate_limit_per_minute": 3, "rate_limit_per_hour": 100}));
    // Scope denials do not consume quota: five of them first, with the whole quota left...
    let post = || {
        h.http
            .post(h.sidecar_url("/api/v1/trades"))
            .bearer_auth(&svc.api_key)
            .send()
            .unwrap()
            .status()
    };
    for _ in 0..5 {
        assert_eq!(post(), 403);
    }
    // ...and the three allowed requests are all still there.
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    let r = h.get("/api/v1/trades", Some(&svc.api_key));
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "ratelimit-policy"),
        Some("\"minute\";q=3;w=60, \"hour\";q=100;w=3600")
    );
    assert_eq!(header(&r, "ratelimit"), Some("\"minute\";r=1;t=40"));
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    let r = h.get("/api/v1/trades", Some(&svc.api_key));
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), Some("20"));
    assert_eq!(header(&r, "ratelimit"), Some("\"minute\";r=0;t=20"));
    assert!(header(&r, "ratelimit-policy")
        .unwrap()
        .contains("\"minute\";q=3;w=60"));
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"], "rate_limited");
    // Still 403 (not 429) for the scope denial: the scope is judged before the limit.
    assert_eq!(post(), 403);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 429);

    h.clock.advance(Duration::from_secs(60));
    for _ in 0..3 {
        assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    }
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 429);
}

/// Reads one HTTP/1.1 response with a Content-Length body from a raw socket.
fn read_response(s: &mut std::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[test]
fn denials_keep_the_connection_open() {
    let h = Harness::start();
    let mut s = std::net::TcpStream::connect(h.sidecar_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /api/v1/trades HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let resp = read_response(&mut s);
        assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
        assert!(!resp.to_ascii_lowercase().contains("connection: close"), "{resp}");
    }
    // A denied request with a small body: the body is drained and the connection still serves.
    s.write_all(b"POST /api/v1/trades HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 401"));
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 200"));

    // A large unauthenticated body is not read: 401, then the connection closes.
    let mut s = std::net::TcpStream::connect(h.sidecar_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /api/v1/trades HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut s);
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("connection: close"), "{resp}");
}

#[test]
fn request_ids_are_kept_or_minted_and_follow_the_call() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "traced", "scopes": ["trade:read"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));
    let call = |id: Option<&str>, key: Option<&str>| {
        let mut rb = h.http.get(h.sidecar_url("/api/v1/trades"));
        if let Some(i) = id {
            rb = rb.header("X-Request-Id", i);
        }
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        let r = rb.send().unwrap();
        let returned = header(&r, "x-request-id").unwrap().to_string();
        let status = r.status().as_u16();
        let upstream = if status == 200 {
            r.json::<Value>().unwrap()["headers"]["x-request-id"]
                .as_str()
                .map(str::to_string)
        } else {
            None
        };
        (status, returned, upstream)
    };
    // A well-formed id from the caller is kept, sent upstream and returned.
    let (s, back, up) = call(Some("trace-42.a_b:c"), Some(&svc.api_key));
    assert_eq!(
        (s, back.as_str(), up.as_deref()),
        (200, "trace-42.a_b:c", Some("trace-42.a_b:c"))
    );
    // A malformed one is replaced; a missing one is minted; minted ids differ.
    let (_, back1, up1) = call(Some("not ok/../x"), Some(&svc.api_key));
    assert_ne!(back1, "not ok/../x");
    assert_eq!(up1.as_deref(), Some(back1.as_str()));
    let (_, back2, _) = call(None, Some(&svc.api_key));
    assert_ne!(back1, back2);
    // Denials carry it too, so a refused caller can quote it.
    let (s, back, _) = call(Some("denied-1"), None);
    assert_eq!((s, back.as_str()), (401, "denied-1"));
}

/// No denial of any kind reaches the upstream: counted at the upstream itself.
#[test]
fn denied_requests_never_reach_the_upstream() {
    let h = Harness::start();
    let svc =
        h.create(json!({"service_name": "counted", "scopes": ["trade:read"], "rate_limit_per_minute": 1}));
    let hits = || h.upstream.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    let before = hits();
    let stranger = permiso::core::key::generate(permiso::core::key::Environment::Live);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(h.get("/api/v1/trades", None).status().as_u16()); // 401 no credential
        statuses.push(
            h.get("/api/v1/trades", Some(stranger.secret.expose()))
                .status()
                .as_u16(),
        ); // 401
        statuses.push(h.get("/internal", Some(&svc.api_key)).status().as_u16()); // 403 no route
        statuses.push(h.get("/api/v1/account", Some(&svc.api_key)).status().as_u16()); // 403 scope
        statuses.push(h.get("/api/v1/trades", Some(&svc.api_key)).status().as_u16()); // 429
        let r = h
            .http
            .post(h.sidecar_url("/api/v1/trades"))
            .bearer_auth(&svc.api_key)
            .body("payload")
            .send()
            .unwrap();
        statuses.push(r.status().as_u16()); // 403 scope, with a body
    }
    let mut s = std::net::TcpStream::connect(h.sidecar_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /health/..;/api/v1/trades HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 400"));
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 0, "{statuses:?}");
    assert_eq!(
        hits(),
        before,
        "a denied request reached the upstream: {statuses:?}"
    );
    // The counter does count: one allowed request, one more hit.
    assert_eq!(h.get("/health", None).status(), 200);
    assert_eq!(hits(), before + 1);
}
