//! Several admin-plane replicas on one PostgreSQL database: changes made through replica A
//! reach a sidecar long-polling replica B; a signing key rotated through A is served by B; a
//! replica killed with SIGKILL mid-burst loses no acknowledged write; a database outage gives
//! 503 JSON meanwhile, the replica recovers by itself and the sidecar keeps serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{json, Value};

use crate::common::{
    free_port, pg_database, start_admin_postgres, EchoUpstream, ADMIN_KEY, ROUTES, TEST_KEK,
};

fn admin(
    http: &Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = http
        .request(method, format!("{base}{path}"))
        .header("X-Admin-Api-Key", ADMIN_KEY);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

fn sidecar_status(http: &Client, side: std::net::SocketAddr, key: &str) -> u16 {
    http.get(format!("http://{side}/api/v1/trades"))
        .bearer_auth(key)
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Polls until the sidecar answers `want` for `key`; the time it took.
fn until(http: &Client, side: std::net::SocketAddr, key: &str, want: u16) -> Duration {
    let started = Instant::now();
    loop {
        if sidecar_status(http, side, key) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the sidecar polling replica B did not answer {want} within 1 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A sidecar of `upstream` long-polling `admin` (25 s waits: only a wake-up gets a change
/// there fast).
fn sidecar_on(
    admin: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    dir: &std::path::Path,
    sync_key: &str,
    clock: &permiso::core::clock::ManualClock,
) -> (permiso::sidecar::SidecarHandle, std::net::SocketAddr) {
    let listen = free_port();
    let text = format!(
        "[sidecar]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\nsnapshot_file = \"{}\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [sidecar.sync]\nadmin_url = \"http://{admin}\"\nwait_seconds = 25\n{ROUTES}",
        dir.join("snap.json").display()
    );
    let f = permiso::config::parse_file(&text, std::path::Path::new("r.toml")).unwrap();
    let cfg = permiso::config::SidecarConfig::from_file(
        f.sidecar.as_ref().unwrap(),
        permiso::core::key::Secret::new(sync_key.to_string()),
    )
    .unwrap();
    (
        permiso::sidecar::start(cfg, Arc::new(clock.clone())).unwrap(),
        listen,
    )
}

#[test]
fn changes_through_replica_a_reach_a_sidecar_polling_replica_b_within_a_second() {
    let url = pg_database(&format!("permiso_rep_{}", std::process::id()));
    let clock = permiso::core::clock::ManualClock::starting_now();
    let (a, b) = (
        start_admin_postgres(&url, &clock),
        start_admin_postgres(&url, &clock),
    );
    let (a_url, b_url) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
    let http = Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (s, sync) = admin(
        &http,
        &a_url,
        reqwest::Method::POST,
        "/auth/admin/services",
        Some(json!({"service_name": "sync", "scopes": ["sync:read"]})),
    );
    assert_eq!(s, 201);
    let dir = tempfile::tempdir().unwrap();
    let upstream = EchoUpstream::start();
    let (_side, side) = sidecar_on(
        b.addr,
        upstream.addr,
        dir.path(),
        sync["api_key"].as_str().unwrap(),
        &clock,
    );

    let (mut created, mut rotated, mut revoked, mut scoped) = (vec![], vec![], vec![], vec![]);
    for i in 0..15 {
        let (s, svc) = admin(
            &http,
            &a_url,
            reqwest::Method::POST,
            "/auth/admin/services",
            Some(json!({"service_name": format!("svc-{i}"), "scopes": ["trade:read"]})),
        );
        assert_eq!(s, 201);
        let id = svc["service_id"].as_str().unwrap();
        let key = svc["api_key"].as_str().unwrap();
        created.push(until(&http, side, key, 200));

        let (s, r) = admin(
            &http,
            &a_url,
            reqwest::Method::POST,
            &format!("/auth/admin/services/{id}/rotate"),
            Some(json!({"grace_seconds": 0})),
        );
        assert_eq!(s, 200, "{r}");
        let new_key = r["api_key"].as_str().unwrap();
        rotated.push(until(&http, side, new_key, 200));
        assert_eq!(sidecar_status(&http, side, key), 401, "the old key ended at once");

        let (s, _) = admin(
            &http,
            &a_url,
            reqwest::Method::PATCH,
            &format!("/auth/admin/services/{id}"),
            Some(json!({"scopes": ["trade:open"]})),
        );
        assert_eq!(s, 200);
        scoped.push(until(&http, side, new_key, 403));

        let (s, _) = admin(
            &http,
            &a_url,
            reqwest::Method::POST,
            &format!(
                "/auth/admin/services/{id}/keys/{}/revoke",
                r["key_id"].as_str().unwrap()
            ),
            None,
        );
        assert_eq!(s, 200);
        revoked.push(until(&http, side, new_key, 401));
    }
    for (what, v) in [
        ("create", &mut created),
        ("rotate", &mut rotated),
        ("scope change", &mut scoped),
        ("revoke", &mut revoked),
    ] {
        v.sort();
        eprintln!(
            "{what} through replica A → sidecar on replica B: p50 {:?}, p99 {:?} ({} changes)",
            pct(v, 0.5),
            pct(v, 0.99),
            v.len()
        );
    }

    // A signing key rotated through A is published by B at once, and B signs with the keys
    // A wrote (the keyring follows the change feed).
    let (s, rot) = admin(
        &http,
        &a_url,
        reqwest::Method::POST,
        "/auth/admin/signing-keys/rotate",
        None,
    );
    assert_eq!(s, 200, "{rot}");
    let kid = rot["new_kid"].as_str().unwrap();
    let started = Instant::now();
    loop {
        let jwks: Value = http
            .get(format!("{b_url}/.well-known/jwks.json"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if jwks["keys"].as_array().unwrap().iter().any(|k| k["kid"] == kid) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "replica B's JWKS lacks {kid}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, listed) = admin(
        &http,
        &b_url,
        reqwest::Method::GET,
        "/auth/admin/signing-keys",
        None,
    );
    assert!(
        listed["published_kids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == kid),
        "{listed}"
    );

    // One audit chain over both replicas' writes.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_permiso"))
        .args(["audit", "verify"])
        .env("PERMISO_ADMIN_URL", &b_url)
        .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop((a, b));
}

/// A replica process killed with SIGKILL in the middle of a burst of creates: every create it
/// acknowledged (201) is there afterwards, read through another replica.
#[test]
fn a_replica_killed_mid_burst_loses_no_acknowledged_write() {
    let url = pg_database(&format!("permiso_kill_{}", std::process::id()));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let victim = {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_permiso"));
        c.args(["admin", "--listen", &port.to_string(), "--database", &url])
            .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
            .env("PERMISO_SIGNING_KEK", TEST_KEK)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("victim.log")).unwrap());
        crate::common::Proc(c.spawn().unwrap())
    };
    let http = Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    crate::common::wait_ok(&http, &format!("http://{port}/healthz"), "replica");
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (http, acked) = (http.clone(), acked.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    let name = format!("burst-{w}-{i}");
                    let r = http
                        .post(format!("http://{port}/auth/admin/services"))
                        .header("X-Admin-Api-Key", ADMIN_KEY)
                        .json(&json!({"service_name": name, "scopes": ["trade:read"]}))
                        .send();
                    match r {
                        Ok(r) if r.status() == 201 => acked.lock().unwrap().push(name),
                        _ => return,
                    }
                }
            })
        })
        .collect();
    // Kill once a good number of writes are acknowledged (counted, not timed).
    while acked.lock().unwrap().len() < 40 {
        std::thread::yield_now();
    }
    let pid = victim.0.id();
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let clock = permiso::core::clock::ManualClock::starting_now();
    let other = start_admin_postgres(&url, &clock);
    let (_, list) = admin(
        &http,
        &format!("http://{}", other.addr),
        reqwest::Method::GET,
        "/auth/admin/services?limit=200",
        None,
    );
    let stored: std::collections::HashSet<&str> = list["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service_name"].as_str().unwrap())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|n| !stored.contains(n.as_str())).collect();
    eprintln!(
        "SIGKILL mid-burst: {} creates acknowledged, {} stored, {} lost",
        acked.len(),
        stored.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
}

/// The database goes away under a running replica the way a restart looks from outside: the
/// server terminates its connections (SQLSTATE 57P01) and refuses new ones for a while.
/// Writes answer 503 JSON meanwhile, the sidecar keeps serving from its snapshot, and when
/// the database is back the replica serves writes again by itself.
#[test]
fn a_database_outage_gives_503_and_the_replica_recovers_by_itself() {
    let name = format!("permiso_outage_{}", std::process::id());
    let url = pg_database(&name);
    let clock = permiso::core::clock::ManualClock::starting_now();
    let a = start_admin_postgres(&url, &clock);
    let base = format!("http://{}", a.addr);
    let http = Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (_, sync) = admin(
        &http,
        &base,
        reqwest::Method::POST,
        "/auth/admin/services",
        Some(json!({"service_name": "sync", "scopes": ["sync:read"]})),
    );
    let (_, svc) = admin(
        &http,
        &base,
        reqwest::Method::POST,
        "/auth/admin/services",
        Some(json!({"service_name": "trader", "scopes": ["trade:read"]})),
    );
    let key = svc["api_key"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let upstream = EchoUpstream::start();
    let (_side, side) = sidecar_on(
        a.addr,
        upstream.addr,
        dir.path(),
        sync["api_key"].as_str().unwrap(),
        &clock,
    );
    until(&http, side, &key, 200);

    let server = crate::common::pg_server();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sql = |q: String| {
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c.batch_execute(&q).await.unwrap();
        })
    };
    sql(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"));
    sql(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ));
    let (status, body) = admin(
        &http,
        &base,
        reqwest::Method::POST,
        "/auth/admin/services",
        Some(json!({"service_name": "during", "scopes": ["trade:read"]})),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(body["error_description"].is_string());
    for _ in 0..20 {
        assert_eq!(
            sidecar_status(&http, side, &key),
            200,
            "the sidecar serves from its snapshot"
        );
    }

    sql(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"));
    let started = Instant::now();
    loop {
        let (status, _) = admin(
            &http,
            &base,
            reqwest::Method::POST,
            "/auth/admin/services",
            Some(json!({"service_name": "after", "scopes": ["trade:read"]})),
        );
        if status == 201 {
            break;
        }
        assert_eq!(status, 503, "only 503 while it reconnects");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the replica never recovered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "replica writing again {:?} after the database came back",
        started.elapsed()
    );
    let (_, listed) = admin(
        &http,
        &base,
        reqwest::Method::GET,
        "/auth/admin/services?limit=100",
        None,
    );
    let names: Vec<&str> = listed["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service_name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"during"), "a refused write wrote nothing");
    assert!(names.contains(&"after"));
}

/// A replica never migrates: on a database without the schema it refuses to start and names
/// `permiso migrate`; `permiso migrate` applies version 1 once; then the replica serves.
#[test]
fn a_replica_refuses_an_unmigrated_database_until_permiso_migrate() {
    let url = crate::common::pg_empty_database(&format!("permiso_mig_{}", std::process::id()));
    let permiso = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_permiso"))
            .args(args)
            .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
            .env("PERMISO_SIGNING_KEK", TEST_KEK)
            .env("RUST_LOG", "off")
            .output()
            .unwrap()
    };
    let port = free_port().to_string();
    let refused = permiso(&["admin", "--listen", &port, "--database", &url]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("version 0") && err.contains("run `permiso migrate`"),
        "{err}"
    );

    let first = permiso(&["migrate", "--database", &url]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied [1]"));
    let again = permiso(&["migrate", "--database", &url]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to apply"));

    // Without the shared KEK a PostgreSQL replica does not start either.
    let no_kek = std::process::Command::new(env!("CARGO_BIN_EXE_permiso"))
        .args(["admin", "--listen", &port, "--database", &url])
        .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
        .env_remove("PERMISO_SIGNING_KEK")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!no_kek.status.success());
    assert!(String::from_utf8_lossy(&no_kek.stderr).contains("PERMISO_SIGNING_KEK is required"));

    let clock = permiso::core::clock::ManualClock::starting_now();
    let replica = start_admin_postgres(&url, &clock);
    let http = Client::new();
    crate::common::wait_ok(
        &http,
        &format!("http://{}/readyz", replica.addr),
        "migrated replica",
    );
}
