//! The sidecar without its admin plane: keeps serving, restarts from its snapshot file, fails
//! closed with nothing, and catches up by itself when the admin plane returns.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{Harness, ROUTES};

#[test]
fn sidecar_serves_from_memory_and_file_while_the_admin_plane_is_down() {
    let mut h = Harness::start();
    let svc = h.create(json!({"service_name": "steady", "scopes": ["trade:read"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));

    h.stop_admin();
    for _ in 0..20 {
        assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    }

    // Restart the sidecar with the admin plane still down: it serves from its snapshot file.
    h.stop_sidecar();
    h.start_sidecar(ROUTES);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    assert_eq!(h.get("/api/v1/trades", None).status(), 401);

    // The admin plane returns: the sidecar catches up without being told.
    h.restart_admin();
    // Unsynced: the catch-up itself is what this measures.
    let later = h.create_unsynced(json!({"service_name": "after-outage", "scopes": ["trade:read"]}));
    let took = h.wait_for_status(
        "/api/v1/trades",
        Some(&later.api_key),
        200,
        Duration::from_secs(15),
    );
    eprintln!("sidecar caught up {took:?} after the admin plane returned");
}

#[test]
fn no_snapshot_and_no_admin_plane_fails_closed() {
    let mut h = Harness::start();
    let svc = h.create(json!({"service_name": "orphan", "scopes": ["trade:read"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));
    h.stop_sidecar();
    h.stop_admin();
    std::fs::remove_file(h.snapshot_path()).unwrap();
    h.start_sidecar(ROUTES);
    let r = h.get("/api/v1/trades", Some(&svc.api_key));
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");
    // Public routes do not need key state.
    assert_eq!(h.get("/health", None).status(), 200);
}

#[test]
fn a_corrupt_snapshot_file_is_refused_not_half_applied() {
    let mut h = Harness::start();
    let svc = h.create(json!({"service_name": "corrupt", "scopes": ["trade:read"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));
    h.stop_sidecar();
    h.stop_admin();
    let text = std::fs::read_to_string(h.snapshot_path()).unwrap();
    std::fs::write(h.snapshot_path(), &text[..text.len() * 2 / 3]).unwrap();
    h.start_sidecar(ROUTES);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 503);
}

#[test]
fn readiness_follows_the_snapshot_age_and_the_database() {
    let mut h = Harness::start();
    let svc = h.create(json!({"service_name": "ready", "scopes": ["trade:read"]}));
    // Generous: with the whole suite running on two cores a sync can take more than a second.
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(10));
    let probe = |h: &Harness, path: &str| {
        let addr = h.sidecar.as_ref().unwrap().health_addr.unwrap();
        let r = h.http.get(format!("http://{addr}{path}")).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    assert_eq!(probe(&h, "/healthz").0, 200);
    let (s, v) = probe(&h, "/readyz");
    assert_eq!((s, v["ready"].as_bool()), (200, Some(true)), "{v}");
    let r = h.http.get(h.admin_url("/readyz")).send().unwrap();
    assert_eq!(r.status(), 200);
    // Another writer holds the database: the admin plane cannot write, so it is not ready
    // (after its 5 s busy timeout), and is again once the lock is gone.
    let locker = rusqlite::Connection::open(h.db_path()).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let r = h.http.get(h.admin_url("/readyz")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().unwrap()["reason"], "database not writable");
    locker.execute_batch("COMMIT").unwrap();
    assert_eq!(h.http.get(h.admin_url("/readyz")).send().unwrap().status(), 200);

    // The admin plane goes away and time passes: the sidecar still serves, but says its
    // key state is stale once the last sync is older than the bound (60 s).
    h.stop_admin();
    // A long poll answered during the shutdown may still be applied: wait until the sidecar has
    // failed to reach the admin plane at least once, so no success lands after the clock moves.
    let health = h.sidecar.as_ref().unwrap().health_addr.unwrap();
    let started = std::time::Instant::now();
    while crate::common::scrape(
        &h.http,
        &format!("http://{health}/metrics"),
        "permiso_sidecar_sync_failures_total{cause=\"request\"}",
    )
    .unwrap_or(0)
        == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the sidecar never noticed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    h.clock.advance(Duration::from_secs(61));
    let (s, v) = probe(&h, "/readyz");
    assert_eq!((s, v["reason"].as_str()), (503, Some("snapshot too old")), "{v}");
    assert_eq!(probe(&h, "/healthz").0, 200);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);

    // No snapshot at all: not ready.
    h.stop_sidecar();
    std::fs::remove_file(h.snapshot_path()).unwrap();
    h.start_sidecar(ROUTES);
    let (s, v) = probe(&h, "/readyz");
    assert_eq!((s, v["reason"].as_str()), (503, Some("no snapshot")), "{v}");
}

#[test]
fn a_sidecar_refuses_to_start_on_a_busy_port_instead_of_running_deaf() {
    let h = Harness::start();
    // The harness's sidecar holds this port already.
    let cfg = h.sidecar_config(ROUTES);
    let clock: permiso::core::clock::SharedClock = std::sync::Arc::new(h.clock.clone());
    let err = permiso::sidecar::start(cfg, clock)
        .err()
        .expect("a second sidecar on a busy port");
    assert!(
        err.to_string()
            .contains(&format!("cannot listen on {}", h.sidecar_addr)),
        "{err}"
    );
    assert_eq!(h.get("/health", None).status(), 200, "the first one is untouched");
}

/// Review finding: with write access to the snapshot file, adding a scope and restarting the
/// sidecar granted it, and it survived the admin plane's return. The file is authenticated now.
#[test]
fn an_edited_snapshot_file_grants_nothing() {
    let mut h = Harness::start();
    let svc = h.create(json!({"service_name": "edited", "scopes": ["trade:read"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));
    assert_eq!(h.get("/api/v1/account", Some(&svc.api_key)).status(), 403);
    h.stop_sidecar();
    h.stop_admin();
    let text = std::fs::read_to_string(h.snapshot_path()).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    let granted = body.replacen("\"trade:read\"", "\"trade:read\",\"account:read\"", 1);
    assert_ne!(granted, body, "the scope is in the file");
    std::fs::write(h.snapshot_path(), format!("{header}\n{granted}")).unwrap();

    // Refused whole: protected routes fail closed until a sync.
    h.start_sidecar(ROUTES);
    assert_eq!(h.get("/api/v1/account", Some(&svc.api_key)).status(), 503);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 503);

    // The admin plane returns: the sidecar takes the real state, not the file's.
    h.restart_admin();
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(15));
    assert_eq!(h.get("/api/v1/account", Some(&svc.api_key)).status(), 403);
    // And writes it back authenticated: a restart with the admin plane down serves from it.
    let started = std::time::Instant::now();
    while std::fs::read_to_string(h.snapshot_path())
        .unwrap()
        .contains("\"account:read\"")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the file was never rewritten"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    h.stop_sidecar();
    h.stop_admin();
    h.start_sidecar(ROUTES);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    assert_eq!(h.get("/api/v1/account", Some(&svc.api_key)).status(), 403);
}

#[test]
fn a_snapshot_file_that_cannot_be_written_is_counted_and_turns_readiness_red() {
    let h = Harness::start();
    // The file's directory is a regular file: every write fails.
    let blocker = h.dir.path().join("blocker");
    std::fs::write(&blocker, "not a directory").unwrap();
    let mut cfg = h.sidecar_config(ROUTES);
    cfg.listen = crate::common::free_port();
    cfg.snapshot_file = blocker.join("snapshot.json");
    let clock: permiso::core::clock::SharedClock = std::sync::Arc::new(h.clock.clone());
    let sc = permiso::sidecar::start(cfg, clock).unwrap();
    let health = sc.health_addr.unwrap();
    let probe = || {
        let r = h.http.get(format!("http://{health}/readyz")).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let failed_writes = || {
        let url = format!("http://{health}/metrics");
        crate::common::scrape(
            &h.http,
            &url,
            "permiso_sidecar_snapshot_file_writes_total{result=\"failed\"}",
        )
        .unwrap()
    };
    let started = std::time::Instant::now();
    while failed_writes() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no failed write counted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Within the bound it still serves and says ready.
    assert_eq!(probe().0, 200);
    h.clock.advance(Duration::from_secs(61));
    let (s, v) = probe();
    assert_eq!(
        (s, v["reason"].as_str()),
        (503, Some("snapshot file cannot be written")),
        "{v}"
    );
    // The disk is fixed: the next change is written and readiness returns.
    std::fs::remove_file(&blocker).unwrap();
    std::fs::create_dir(&blocker).unwrap();
    h.create(json!({"service_name": "after-fix", "scopes": ["trade:read"]}));
    let started = std::time::Instant::now();
    while probe().0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still not ready: {:?}",
            probe()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(blocker.join("snapshot.json").exists());
}
