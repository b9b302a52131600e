//! The egress listener in process: credentials attached and refreshed, caller headers
//! replaced, unknown destinations refused, a dead destination cut off.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{free_port, Harness, ADMIN_KEY};

/// A second sidecar whose egress calls out as `client` (client credentials) to `svc` (the
/// harness sidecar), `echo` (the echo upstream directly, to see what is sent) and `dead`.
fn egress_sidecar(
    h: &Harness,
    client: &crate::common::Created,
    dir: &std::path::Path,
) -> permiso::sidecar::SidecarHandle {
    let secret_file = dir.join("client.secret");
    std::fs::write(&secret_file, &client.client_secret).unwrap();
    let dead = free_port();
    let text = format!(
        r#"
[sidecar]
listen = "{listen}"
upstream = "{upstream}"
snapshot_file = "{snap}"
admin_listen = "127.0.0.1:0"
[sidecar.sync]
admin_url = "http://{admin}"
[sidecar.egress]
listen = "{egress}"
retry_deadline_ms = 200
breaker_failures = 2
breaker_cooldown_ms = 60000
[sidecar.egress.destinations.svc]
url = "http://{svc}"
client_id = "{id}"
client_secret_file = "{secret}"
scopes = ["trade:read"]
[sidecar.egress.destinations.echo]
url = "http://{upstream}"
client_id = "{id}"
client_secret_file = "{secret}"
scopes = ["trade:read"]
[sidecar.egress.destinations.dead]
url = "http://{dead}"
client_id = "{id}"
client_secret_file = "{secret}"
scopes = ["trade:read"]
[[sidecar.routes]]
prefix = "/health"
public = true
"#,
        listen = free_port(),
        upstream = h.upstream.addr,
        snap = dir.join("egress-snap.json").display(),
        admin = h.admin_addr,
        egress = free_port(),
        svc = h.sidecar_addr,
        id = client.service_id,
        secret = secret_file.display(),
    );
    let f = permiso::config::parse_file(&text, std::path::Path::new("egress.toml")).unwrap();
    let cfg = permiso::config::SidecarConfig::from_file(
        f.sidecar.as_ref().unwrap(),
        permiso::core::key::Secret::new(h.sync_key.clone()),
    )
    .unwrap();
    permiso::sidecar::start(cfg, std::sync::Arc::new(permiso::core::clock::SystemClock)).unwrap()
}

#[test]
fn egress_attaches_refreshes_and_cuts_off() {
    let h = Harness::start();
    let client = h.create(json!({"service_name": "mt5-api-service", "scopes": ["trade:read"]}));
    let dir = tempfile::tempdir().unwrap();
    let side = egress_sidecar(&h, &client, dir.path());
    let egress = format!("http://{}", side.egress_addr.unwrap());

    // What the egress sends: a Bearer JWT of its own, never the caller's header or X-Permiso-*.
    let r = h
        .http
        .get(format!("{egress}/echo/anything?q=1"))
        .header("Authorization", "Bearer the-callers-own-secret")
        .header("X-Permiso-Service-Id", "srv_forged")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().unwrap();
    assert_eq!(echo["path"], "/anything");
    let auth = echo["headers"]["authorization"].as_str().unwrap().to_string();
    assert!(auth.starts_with("Bearer eyJ"), "{auth}");
    assert!(echo["headers"].get("x-permiso-service-id").is_none());
    let first = auth.trim_start_matches("Bearer ").to_string();

    // Through the destination's sidecar: identified as the client.
    let r = h.http.get(format!("{egress}/svc/api/v1/trades")).send().unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().unwrap();
    assert_eq!(
        echo["headers"]["x-permiso-service-id"],
        client.service_id.as_str()
    );

    // The token is revoked: the destination answers 401, the egress fetches a new token
    // once and retries the (idempotent) request: the caller sees 200.
    let r = h
        .http
        .post(h.admin_url("/oauth/revoke"))
        .header("X-Admin-Api-Key", ADMIN_KEY)
        .form(&[("token", &first)])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    h.wait_for_status("/api/v1/trades", Some(&first), 401, Duration::from_secs(1));
    let r = h.http.get(format!("{egress}/svc/api/v1/trades")).send().unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = h
        .http
        .get(format!("{egress}/echo/x"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_ne!(
        echo["headers"]["authorization"].as_str().unwrap(),
        auth,
        "token was not replaced"
    );

    // A non-idempotent request is never replayed: revoke the token in use again, POST through
    // the egress, and count the decisions the destination's sidecar made (a replay with the
    // refreshed token would be a second one).
    let in_use = echo["headers"]["authorization"]
        .as_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_string();
    let r = h
        .http
        .post(h.admin_url("/oauth/revoke"))
        .header("X-Admin-Api-Key", ADMIN_KEY)
        .form(&[("token", &in_use)])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    h.wait_for_status("/api/v1/trades", Some(&in_use), 401, Duration::from_secs(1));
    let decisions = || -> u64 {
        let health = h.sidecar.as_ref().unwrap().health_addr.unwrap();
        let text = h
            .http
            .get(format!("http://{health}/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("permiso_sidecar_decisions_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = decisions();
    let r = h
        .http
        .post(format!("{egress}/svc/api/v1/trades"))
        .body("order")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "the POST's own answer, not a replay's");
    assert_eq!(decisions(), before + 1, "the POST was sent once");
    // The refresh happened all the same: the next call carries a new token and goes through.
    let r = h.http.get(format!("{egress}/svc/api/v1/trades")).send().unwrap();
    assert_eq!(r.status(), 200);

    // Unknown destination: 404, nothing forwarded.
    let r = h.http.get(format!("{egress}/nowhere/x")).send().unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().unwrap()["error"], "unknown_destination");

    // A dead destination: retried within the deadline, then 502; after two failures the
    // circuit opens and the answer is an immediate 503.
    for _ in 0..2 {
        let r = h.http.get(format!("{egress}/dead/x")).send().unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(r.json::<Value>().unwrap()["error"], "destination_unreachable");
    }
    let started = Instant::now();
    let r = h.http.get(format!("{egress}/dead/x")).send().unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().unwrap()["error"], "destination_unavailable");
    eprintln!("open circuit answered in {took:?}");
    // Other destinations are unaffected.
    assert_eq!(
        h.http
            .get(format!("{egress}/svc/api/v1/trades"))
            .send()
            .unwrap()
            .status(),
        200
    );

    // Every outcome is counted per destination on the sidecar's metrics port.
    let metrics = h
        .http
        .get(format!("http://{}/metrics", side.health_addr.unwrap()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let count = |dest: &str, outcome: &str| -> f64 {
        let series =
            format!("permiso_sidecar_egress_requests_total{{destination=\"{dest}\",outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{metrics}"))
    };
    assert_eq!(count("dead", "destination_unreachable"), 2.0);
    assert_eq!(count("dead", "circuit_open"), 1.0);
    assert_eq!(count("dead", "relayed"), 0.0);
    assert!(count("echo", "relayed") >= 2.0);
    assert!(count("svc", "relayed") >= 1.0);
    assert_eq!(count("svc", "credential_unavailable"), 0.0);
    assert!(metrics.contains("permiso_sidecar_egress_request_duration_seconds_count{destination=\"dead\"} 2"));
    drop(side);
}

/// A destination that reads each request and drops the connection without answering (it may
/// have acted on the request: a replayed POST is a duplicate trade). Counted where it arrives:
/// a GET is sent again within the retry deadline, a POST and a PATCH exactly once; once the
/// circuit is open, nothing reaches the destination at all.
#[test]
fn a_failed_attempt_is_replayed_only_for_idempotent_methods() {
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let h = Harness::start();
    let dir = tempfile::tempdir().unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let drop_addr = l.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let methods: Arc<Mutex<Vec<String>>> = Default::default();
    {
        let (connections, methods) = (connections.clone(), methods.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                connections.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                methods
                    .lock()
                    .unwrap()
                    .push(line.split(' ').next().unwrap_or("").to_string());
                // Dropped here: the request was received, no answer is sent.
            }
        });
    }
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "svc_live_whatever").unwrap();
    let text = format!(
        r#"
[sidecar]
listen = "{listen}"
upstream = "{upstream}"
snapshot_file = "{snap}"
admin_listen = "127.0.0.1:0"
[sidecar.sync]
admin_url = "http://{admin}"
[sidecar.egress]
listen = "127.0.0.1:0"
retry_deadline_ms = 400
breaker_failures = 3
breaker_cooldown_ms = 60000
[sidecar.egress.destinations.drop]
url = "http://{drop_addr}"
api_key_file = "{key}"
[[sidecar.routes]]
prefix = "/health"
public = true
"#,
        listen = free_port(),
        upstream = h.upstream.addr,
        snap = dir.path().join("snap.json").display(),
        admin = h.admin_addr,
        key = key_file.display(),
    );
    let f = permiso::config::parse_file(&text, std::path::Path::new("egress.toml")).unwrap();
    let cfg = permiso::config::SidecarConfig::from_file(
        f.sidecar.as_ref().unwrap(),
        permiso::core::key::Secret::new(h.sync_key.clone()),
    )
    .unwrap();
    let side = permiso::sidecar::start(cfg, std::sync::Arc::new(permiso::core::clock::SystemClock)).unwrap();
    let egress = format!("http://{}/drop/order", side.egress_addr.unwrap());
    let count = |m: &str| methods.lock().unwrap().iter().filter(|x| *x == m).count();

    let r = h.http.get(&egress).send().unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.json::<Value>().unwrap()["error"], "destination_unreachable");
    let gets = count("GET");
    assert!(
        gets >= 2,
        "a GET that failed after it was sent is retried; sent {gets}×"
    );
    eprintln!("a failed GET was sent {gets} times within the 400 ms retry deadline");
    for m in ["POST", "PATCH"] {
        let r = h
            .http
            .request(reqwest::Method::from_bytes(m.as_bytes()).unwrap(), &egress)
            .body("buy 1 lot")
            .send()
            .unwrap();
        assert_eq!(r.status(), 502, "{m}");
        assert_eq!(count(m), 1, "a {m} is never replayed after it was sent");
    }
    // Three failures: the circuit is open. The answer is 503 and no connection is made.
    let before = connections.load(Ordering::SeqCst);
    for m in ["GET", "POST"] {
        let r = h
            .http
            .request(reqwest::Method::from_bytes(m.as_bytes()).unwrap(), &egress)
            .send()
            .unwrap();
        assert_eq!(r.status(), 503, "{m}");
        assert_eq!(r.json::<Value>().unwrap()["error"], "destination_unavailable");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        before,
        "an open circuit sends nothing"
    );
    assert_eq!(count("GET"), gets);
    drop(side);
}
