//! Review findings on what reaches the upstream and how failures look: credentials on public
//! routes, identity-like headers in other spellings, the forwarding chain, Content-Length
//! lists, upstream failures, and logs at trace level.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use permiso::config::ForwardedFor;
use permiso::core::clock::SharedClock;
use serde_json::{json, Value};

use crate::common::{free_port, header, scrape, Harness, ROUTES};

const PASS_ROUTE: &str = r#"
[[sidecar.routes]]
prefix = "/pass"
public = true
forward_authorization = true
"#;

/// Sends raw request bytes and returns the upstream echo (JSON body) or the raw response.
fn raw(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
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
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn echo_headers(body: &str) -> serde_json::Map<String, Value> {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["headers"].as_object().unwrap().clone()
}

#[test]
fn credentials_and_identity_lookalikes_never_reach_the_upstream() {
    let h = Harness::start_with(&format!("{ROUTES}{PASS_ROUTE}"));
    let svc = h.create(json!({"service_name": "caller", "scopes": ["trade:read"]}));
    let jwt = h.token(&svc, None);
    let key = svc.api_key.as_str();
    // Any form of credential to a public route is removed: a JWT, a key after a tab, a key
    // without a scheme, Basic, and Proxy-Authorization (meant for a proxy, never the service).
    for auth in [
        format!("Bearer {jwt}"),
        format!("Bearer\t{key}"),
        key.to_string(),
        "Basic dTpw".into(),
    ] {
        let (s, body) = raw(
            h.sidecar_addr,
            &format!("GET /health HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\nProxy-Authorization: Basic dTpw\r\n\r\n"),
        );
        assert_eq!(s, 200, "{auth:.20}");
        let headers = echo_headers(&body);
        assert!(!headers.contains_key("authorization"), "{auth:.20}: {headers:?}");
        assert!(!headers.contains_key("proxy-authorization"));
        assert!(!body.contains(key) && !body.contains(&jwt));
    }
    // A public route that opts in forwards it unchanged.
    let (_, body) = raw(
        h.sidecar_addr,
        &format!("GET /pass HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {jwt}\r\n\r\n"),
    );
    assert_eq!(echo_headers(&body)["authorization"], format!("Bearer {jwt}"));

    // Identity-like headers in any spelling (CGI maps `_` and `-` alike) and a forged
    // forwarding chain, with and without a credential.
    let forged = "X_Permiso_Service_Id: srv_forged\r\nX-Permiso_Scopes: admin:*\r\nx-permiso-key-id: key_forged\r\n\
                  X.Permiso.Trusted: forged\r\nX_Request_Id: forged\r\nX-Forwarded-For: 6.6.6.6\r\nx_forwarded_for: 6.6.6.6\r\n\
                  Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Host: forged.example\r\n\
                  X-Original-URL: /forged\r\nTrue-Client-IP: 6.6.6.6\r\nX-HTTP-Method-Override: DELETE\r\n";
    for (path, auth) in [
        ("/health", String::new()),
        ("/api/v1/trades", format!("Authorization: Bearer {key}\r\n")),
    ] {
        let (s, body) = raw(
            h.sidecar_addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\n{auth}{forged}\r\n"),
        );
        assert_eq!(s, 200, "{path}: {body}");
        let headers = echo_headers(&body);
        for (name, value) in &headers {
            let dashed = name.replace('_', "-");
            assert!(
                !name.contains('_') || !dashed.starts_with("x-permiso-"),
                "{path}: {name} passed"
            );
            assert!(
                !value.as_str().unwrap().contains("forged"),
                "{path}: {name}: {value}"
            );
            assert!(
                !value.as_str().unwrap().contains("6.6.6.6"),
                "{path}: {name}: {value}"
            );
        }
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{path}");
        assert_eq!(headers["forwarded"], "for=127.0.0.1", "{path}");
        for gone in [
            "x-real-ip",
            "x-forwarded-host",
            "x-original-url",
            "true-client-ip",
            "x-http-method-override",
        ] {
            assert!(!headers.contains_key(gone), "{path}: {gone} passed");
        }
        if path == "/api/v1/trades" {
            assert_eq!(headers["x-permiso-service-id"], svc.service_id.as_str());
            assert_eq!(headers["x-permiso-scopes"], "trade:read");
        } else {
            assert!(!headers.keys().any(|k| k.starts_with("x-permiso-")));
        }
    }
}

#[test]
fn forwarded_for_append_keeps_the_chain_then_adds_the_peer() {
    let h = Harness::start();
    let mut cfg = h.sidecar_config(ROUTES);
    cfg.listen = free_port();
    cfg.snapshot_file = h.dir.path().join("append.json");
    cfg.forwarded_for = ForwardedFor::Append;
    let clock: SharedClock = std::sync::Arc::new(h.clock.clone());
    let sc = permiso::sidecar::start(cfg, clock).unwrap();
    let (s, body) = raw(
        sc.addr,
        "GET /health HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\nForwarded: for=10.0.0.1\r\n\r\n",
    );
    assert_eq!(s, 200);
    let headers = echo_headers(&body);
    assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
    assert_eq!(headers["forwarded"], "for=10.0.0.1, for=127.0.0.1");
}

#[test]
fn content_length_lists_are_collapsed_or_refused() {
    let h = Harness::start();
    let (s, body) = raw(
        h.sidecar_addr,
        "POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello",
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(echo_headers(&body)["content-length"], "5");
    let (s, _) = raw(
        h.sidecar_addr,
        "POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(s, 200);
    // Conflicting values never reach the upstream.
    for conflicting in ["Content-Length: 5, 6", "Content-Length: 5\r\nContent-Length: 6"] {
        let (s, body) = raw(
            h.sidecar_addr,
            &format!("POST /health HTTP/1.1\r\nHost: t\r\n{conflicting}\r\n\r\nhello!"),
        );
        assert!(s == 400 || s == 0, "{conflicting}: {s} {body}");
        assert!(
            !body.contains("\"upstream\""),
            "{conflicting}: reached the upstream"
        );
    }
}

#[test]
fn upstream_failures_answer_json_with_the_request_id() {
    let h = Harness::start();
    let mut cfg = h.sidecar_config(ROUTES);
    cfg.listen = free_port();
    cfg.snapshot_file = h.dir.path().join("dead-upstream.json");
    // Nothing listens there.
    cfg.upstream = free_port();
    let clock: SharedClock = std::sync::Arc::new(h.clock.clone());
    let sc = permiso::sidecar::start(cfg, clock).unwrap();
    let r = h
        .http
        .get(format!("http://{}/health", sc.addr))
        .header("X-Request-Id", "trace-me-502")
        .send()
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-request-id"), Some("trace-me-502"));
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    // The client connection stays usable: the request was read whole (pingora-proxy closed it
    // after any failed upstream attempt; the sidecar's own HTTP/1 path does not).
    assert_eq!(header(&r, "connection"), Some("keep-alive"));
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"], "bad_gateway", "{v}");
    assert!(v["error_description"].is_string());
    // Without an id of its own the caller still gets one.
    let r = h.http.get(format!("http://{}/health", sc.addr)).send().unwrap();
    assert_eq!(r.status(), 502);
    assert!(header(&r, "x-request-id").is_some_and(|v| !v.is_empty()));
}

/// With RUST_LOG=trace, no key, token or sync credential reaches the sidecar's log (pingora's
/// and the HTTP clients' own trace lines print whole headers).
#[test]
fn a_trace_level_log_holds_no_credential() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "traced", "scopes": ["trade:read"]}));
    let jwt = h.token(&svc, None);
    let (listen, health) = (free_port(), free_port());
    let key_file = h.dir.path().join("trace-sync.key");
    std::fs::write(&key_file, &h.sync_key).unwrap();
    let config = h.dir.path().join("trace.toml");
    std::fs::write(
        &config,
        format!(
            "[sidecar]\nlisten = \"{listen}\"\nupstream = \"{}\"\nadmin_listen = \"{health}\"\nsnapshot_file = \"{}\"\nusage_report_interval_ms = 50\n[sidecar.sync]\nadmin_url = \"http://{}\"\ncredential_file = \"{}\"\nwait_seconds = 1\n{ROUTES}",
            h.upstream.addr,
            h.dir.path().join("trace-snapshot.json").display(),
            h.admin_addr,
            key_file.display(),
        ),
    )
    .unwrap();
    let log_path = h.dir.path().join("trace.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_permiso"))
        .args(["sidecar", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "trace")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _p = crate::common::Proc(child);
    crate::common::wait_ready(&h.http, health);
    let base = format!("http://{listen}");
    for _ in 0..3 {
        let r = h
            .http
            .get(format!("{base}/api/v1/trades"))
            .bearer_auth(&svc.api_key)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = h
            .http
            .get(format!("{base}/api/v1/trades"))
            .bearer_auth(&jwt)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = h
            .http
            .get(format!("{base}/health"))
            .bearer_auth(&jwt)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Wait until a usage report and a few syncs went out (they carry the sync key).
    let metric = |series: &str| scrape(&h.http, &format!("http://{health}/metrics"), series).unwrap_or(0);
    let started = std::time::Instant::now();
    while metric("permiso_sidecar_usage_reports_total{result=\"ok\"}") < 1
        || metric("permiso_sidecar_syncs_total") < 3
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no usage report or syncs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.contains("TRACE") || text.contains("DEBUG"),
        "the log really is verbose"
    );
    assert!(text.contains("permiso::access"), "requests were logged");
    for (what, secret) in [
        ("api key", svc.api_key.as_str()),
        ("jwt", jwt.as_str()),
        ("sync key", h.sync_key.as_str()),
    ] {
        assert!(!text.contains(secret), "the {what} is in the trace log");
        assert!(
            !text.contains(&secret[secret.len() - 16..]),
            "part of the {what} is in the trace log"
        );
    }
}

/// A client that opened a connection and sent part of a request head, then nothing.
fn slowloris(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .unwrap();
    s
}

/// A fresh connection each time: the tight sidecar below closes idle connections after 300 ms,
/// and a pooled one could be reused just as it closes.
fn metric(_h: &Harness, health: std::net::SocketAddr, series: &str) -> u64 {
    let fresh = reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    scrape(&fresh, &format!("http://{health}/metrics"), series).unwrap_or_else(|| panic!("no {series}"))
}

/// Review finding: 2,000 connections trickling a header line every few seconds were held for
/// good, idle connections on the health port too, and at the descriptor limit legitimate
/// requests and /readyz timed out.
#[test]
fn slow_and_idle_connections_never_starve_real_clients() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "steady", "scopes": ["trade:read"]}));
    let health = h.sidecar.as_ref().unwrap().health_addr.unwrap();
    let steady = |addr: std::net::SocketAddr, n: usize| {
        // Fresh connections (what a flood would starve) and one kept-alive client.
        let fresh = || {
            reqwest::blocking::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap()
        };
        let kept = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        for i in 0..n {
            let client = if i % 2 == 0 { fresh() } else { kept.clone() };
            let r = client
                .get(format!("http://{addr}/api/v1/trades"))
                .bearer_auth(&svc.api_key)
                .send();
            assert_eq!(
                r.map(|r| r.status().as_u16()).ok(),
                Some(200),
                "request {i} through the flood"
            );
            let r = client.get(format!("http://{health}/readyz")).send();
            assert_eq!(
                r.map(|r| r.status().as_u16()).ok(),
                Some(200),
                "probe {i} through the flood"
            );
        }
    };

    // Defaults: 2,000 slow connections on the proxy port and 400 idle ones on the health port
    // are held while real traffic goes through.
    let flood: Vec<TcpStream> = (0..2000).map(|_| slowloris(h.sidecar_addr)).collect();
    let idle: Vec<TcpStream> = (0..400).map(|_| TcpStream::connect(health).unwrap()).collect();
    steady(h.sidecar_addr, 50);
    assert!(metric(&h, health, "permiso_sidecar_open_connections") >= 2000);
    drop(flood);

    // Tight limits: at max_connections the oldest idle connection makes room; the slow ones
    // are cut at the header deadline.
    let mut cfg = h.sidecar_config(ROUTES);
    cfg.listen = free_port();
    cfg.admin_listen = Some(free_port());
    cfg.snapshot_file = h.dir.path().join("tight.json");
    cfg.max_connections = 32;
    cfg.header_read_timeout = Duration::from_millis(300);
    cfg.idle_timeout = Duration::from_millis(600);
    cfg.body_rate_grace = Duration::from_millis(300);
    cfg.body_min_rate = 10_000;
    let clock: SharedClock = std::sync::Arc::new(h.clock.clone());
    let tight = permiso::sidecar::start(cfg, clock).unwrap();
    let th = tight.health_addr.unwrap();
    crate::common::wait_ready(&h.http, th);
    let flood: Vec<TcpStream> = (0..300).map(|_| slowloris(tight.addr)).collect();
    steady(tight.addr, 40);
    assert!(
        metric(
            &h,
            th,
            "permiso_sidecar_connections_closed_total{reason=\"shed\"}"
        ) > 0
    );
    assert!(metric(&h, th, "permiso_sidecar_open_connections") <= 32);
    // A connection that keeps trickling bytes is closed at the deadline anyway.
    let mut trickle = slowloris(tight.addr);
    trickle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = std::time::Instant::now();
    let closed = loop {
        if trickle.write_all(b"x").is_err() {
            break true;
        }
        let mut b = [0u8; 1];
        trickle
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(0) = trickle.read(&mut b) {
            break true;
        }
        if started.elapsed() > Duration::from_secs(10) {
            break false;
        }
    };
    assert!(closed, "a trickling connection was never cut");
    assert!(
        metric(
            &h,
            th,
            "permiso_sidecar_connections_closed_total{reason=\"header_timeout\"}"
        ) > 0
    );
    // A large announced body trickled in (busy connections are never shed) is cut once it
    // falls below the rate floor; a body sent at once goes through.
    let mut slow = TcpStream::connect(tight.addr).unwrap();
    slow.write_all(b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\nabc")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let read = slow.read_to_end(&mut buf);
    assert!(read.is_ok() || buf.is_empty(), "the slow body is cut: {read:?}");
    assert!(
        metric(
            &h,
            th,
            "permiso_sidecar_connections_closed_total{reason=\"slow_body\"}"
        ) > 0
    );
    // The floor is on the request body only: a bodiless request waiting on a slow upstream
    // (1 s, past the 300 ms grace) and a body sent at once both go through.
    let r = reqwest::blocking::Client::new()
        .get(format!("http://{}/health/slow", tight.addr))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{}/health/slow", tight.addr))
        .body("small")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = vec![b'x'; 200_000];
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{}/health", tight.addr))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    drop((flood, idle));
}
