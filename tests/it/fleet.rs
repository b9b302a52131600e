//! Issue 16 at the admin plane: the fleet of sidecars, whether a change reached every one of
//! them (`--wait-applied` included), the scope catalog and its warnings, and keys in grace
//! with their last uses. Three real sidecars (two in-process, one a process that can be
//! stopped with SIGSTOP), a real admin plane and the CLI binary.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{free_port, signal, Harness, Proc, ADMIN_KEY, ROUTES};

fn permiso(h: &Harness, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_permiso"))
        .args(args)
        .env("PERMISO_ADMIN_URL", format!("http://{}", h.admin_addr))
        .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
        .env("RUST_LOG", "off")
        .output()
        .expect("permiso runs")
}

fn fleet(h: &Harness) -> Value {
    let (s, v) = h.admin_req(Method::GET, "/auth/admin/sidecars", None);
    assert_eq!(s, 200, "{v}");
    v
}

/// Polls `what` until `done` holds of it, for up to `within`.
fn until(within: Duration, what: impl Fn() -> Value, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let v = what();
        if done(&v) {
            return v;
        }
        assert!(started.elapsed() < within, "not reached within {within:?}: {v}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `permiso sidecar` process for this harness. A port picked free can be taken by a test
/// running in parallel before the process binds it (it then exits, and another process may
/// answer on its health port): started again on new ports until it runs and is ready.
fn sidecar_process(h: &Harness) -> Proc {
    let key_file = h.dir.path().join("proc-sync.key");
    std::fs::write(&key_file, &h.sync_key).unwrap();
    let config = h.dir.path().join("proc-sidecar.toml");
    for _ in 0..3 {
        let (listen, health) = (free_port(), free_port());
        std::fs::write(
            &config,
            format!(
                "[sidecar]\nlisten = \"{listen}\"\nupstream = \"{}\"\nadmin_listen = \"{health}\"\nsnapshot_file = \"{}\"\n[sidecar.sync]\nadmin_url = \"http://{}\"\ncredential_file = \"{}\"\nwait_seconds = 1\n{ROUTES}",
                h.upstream.addr,
                h.dir.path().join("proc-snapshot.json").display(),
                h.admin_addr,
                key_file.display(),
            ),
        )
        .unwrap();
        let mut p = crate::common::spawn(
            h.dir.path(),
            "proc-sidecar",
            env!("CARGO_BIN_EXE_permiso"),
            &["sidecar", "--config", config.to_str().unwrap()],
        );
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if p.0.try_wait().unwrap().is_some() {
                break;
            }
            let ready = h
                .http
                .get(format!("http://{health}/readyz"))
                .send()
                .is_ok_and(|r| r.status() == 200);
            if ready && p.0.try_wait().unwrap().is_none() {
                return p;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("the sidecar process never became ready");
}

#[test]
fn a_change_is_confirmed_on_every_live_sidecar_and_stragglers_are_named() {
    let h = Harness::start();
    let b = h.start_extra_sidecar("b", "", ROUTES);
    let before: Vec<String> = fleet(&h)["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["instance_id"].as_str().unwrap().to_string())
        .collect();
    let proc = sidecar_process(&h);
    let v = until(Duration::from_secs(5), || fleet(&h), |v| v["live"] == 3);
    let c_id = v["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["instance_id"].as_str().unwrap().to_string())
        .find(|id| !before.contains(id))
        .expect("the process's instance id");
    for s in v["sidecars"].as_array().unwrap() {
        assert_eq!(s["status"], "live", "{s}");
        assert_eq!(s["environment"], "live");
        assert_eq!(s["upstream"], h.upstream.addr.to_string());
        assert_eq!(s["mode"], "enforce");
        assert!(s["sync_key_id"].as_str().unwrap().starts_with("key_"), "{s}");
        let scopes: Vec<&str> = s["routes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r["scopes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap())
            })
            .collect();
        assert!(
            scopes.contains(&"trade:read") && scopes.contains(&"account:read"),
            "{s}"
        );
    }

    // A revocation: applied by all three within a second.
    let svc = h.create(json!({"service_name": "app", "scopes": ["trade:read"]}));
    let started = Instant::now();
    let (s, v) = h.admin_req(
        Method::POST,
        &format!(
            "/auth/admin/services/{}/keys/{}/revoke",
            svc.service_id, svc.key_id
        ),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let version = v["version"].as_u64().unwrap();
    let p = until(
        Duration::from_secs(1),
        || {
            h.admin_req(Method::GET, &format!("/auth/admin/changes/{version}"), None)
                .1
        },
        |p| p["complete"] == true,
    );
    let took = started.elapsed();
    assert_eq!(p["applied"].as_array().unwrap().len(), 3, "{p}");
    assert_eq!(p["summary"], "applied by 3 of 3 live sidecars");
    eprintln!("revocation applied by 3 of 3 sidecars in {took:?}");
    // Asked about a version not created yet, or not a version.
    assert_eq!(
        h.admin_req(
            Method::GET,
            &format!("/auth/admin/changes/{}", version + 100),
            None
        )
        .0,
        404
    );
    assert_eq!(h.admin_req(Method::GET, "/auth/admin/changes/-1", None).0, 400);
    assert_eq!(h.admin_req(Method::GET, "/auth/admin/changes/abc", None).0, 400);

    // --wait-applied: success names the count.
    let other = h.create(json!({"service_name": "other", "scopes": ["trade:read"]}));
    let out = permiso(
        &h,
        &[
            "services",
            "revoke",
            &other.service_id,
            &other.key_id,
            "--wait-applied",
            "--wait-timeout",
            "5",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("applied by 3 of 3 live sidecars"), "{stdout}");

    // Stopped before the change: --wait-applied times out naming it.
    // Stopped while parked in a long poll: the change answers that poll (into its socket
    // buffer) and it never asks again.
    signal(&proc, "-STOP");
    let out = permiso(
        &h,
        &[
            "services",
            "rotate",
            &other.service_id,
            "--grace-seconds",
            "0",
            "--wait-applied",
            "--wait-timeout",
            "2",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(11), "{stderr}");
    assert!(stderr.contains(&c_id), "the straggler is named: {stderr}");
    assert!(stderr.contains("applied by 2 of 3 live sidecars"), "{stderr}");

    // Once it has not polled for sidecar_stale_after_seconds it is stale, not a straggler.
    h.clock.advance(Duration::from_secs(121));
    let v = until(
        Duration::from_secs(10),
        || fleet(&h),
        |v| {
            v["sidecars"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| (s["instance_id"] == c_id.as_str()) == (s["status"] == "stale"))
        },
    );
    assert_eq!(
        (v["live"].as_u64(), v["stale"].as_u64()),
        (Some(2), Some(1)),
        "{v}"
    );
    let out = permiso(&h, &["sidecars"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        table.contains(&c_id) && table.contains("stale") && table.contains("2 live, 1 stale"),
        "{table}"
    );
    let out = permiso(
        &h,
        &[
            "services",
            "patch",
            &other.service_id,
            "--description",
            "x",
            "--wait-applied",
            "--wait-timeout",
            "5",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("applied by 2 of 2 live sidecars"), "{stdout}");
    let p = h
        .admin_req(Method::GET, &format!("/auth/admin/changes/{version}"), None)
        .1;
    assert_eq!(p["stale"], json!([c_id]));
    signal(&proc, "-CONT");
    drop(proc);
    b.stop();
}

#[test]
fn scopes_no_sidecar_route_requires_are_warned_about() {
    let h = Harness::start();
    let (s, v) = h.admin_req(
        Method::POST,
        "/auth/admin/services",
        Some(json!({"service_name": "typo", "scopes": ["trade:raed", "account:read"]})),
    );
    assert_eq!(s, 201, "{v}");
    let w = v["warnings"].as_array().expect("warnings");
    assert_eq!(w.len(), 1, "{v}");
    assert!(w[0].as_str().unwrap().contains("trade:raed"));
    let id = v["service_id"].as_str().unwrap().to_string();
    // A known one, or a wildcard covering one: no warnings.
    let (s, v) = h.admin_req(
        Method::PATCH,
        &format!("/auth/admin/services/{id}"),
        Some(json!({"scopes": ["trade:*", "account:read"]})),
    );
    assert_eq!(s, 200);
    assert!(v.get("warnings").is_none(), "{v}");
    let (_, v) = h.admin_req(
        Method::PATCH,
        &format!("/auth/admin/services/{id}"),
        Some(json!({"scopes": ["trade:read", "market:data"]})),
    );
    assert_eq!(v["warnings"].as_array().map(|w| w.len()), Some(1), "{v}");
    // The catalog: each scope with the routes that require it.
    let (_, cat) = h.admin_req(Method::GET, "/auth/admin/scopes", None);
    assert_eq!(cat["sidecars"], 1);
    let trade = cat["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scope"] == "trade:open")
        .expect("trade:open in use");
    assert_eq!(trade["routes"][0]["prefix"], "/api/v1/trades");
    assert_eq!(trade["routes"][0]["methods"], json!(["POST"]));
    // The CLI shows the warning.
    let out = permiso(
        &h,
        &[
            "services",
            "create",
            "--name",
            "cli-typo",
            "--scope",
            "acount:read",
        ],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("warning: scope \"acount:read\""));
}

#[test]
fn the_last_uses_of_a_key_leaving_the_snapshot_are_reported() {
    let h = Harness::start();
    // A sidecar that reports usage only when it stops: whatever it reports was kept.
    let quiet = h.start_extra_sidecar("quiet", "usage_report_interval_ms = 600000", ROUTES);
    let quiet_url = format!("http://{}", quiet.addr);
    let svc = h.create(json!({"service_name": "app", "scopes": ["trade:read"]}));
    let (s, v) = h.admin_req(
        Method::POST,
        &format!("/auth/admin/services/{}/rotate", svc.service_id),
        Some(json!({"grace_seconds": 10})),
    );
    assert_eq!(s, 200, "{v}");
    let end = h.clock_secs() + 10;
    h.wait_sidecar_caught_up();
    let health = quiet.health_addr.unwrap();
    let caught_up = || {
        let current = fleet(&h)["current_version"].clone();
        until(
            Duration::from_secs(3),
            || {
                h.http
                    .get(format!("http://{health}/readyz"))
                    .send()
                    .unwrap()
                    .json::<Value>()
                    .unwrap()
            },
            |v| v["snapshot_version"] == current,
        );
    };
    caught_up();
    // Used through the chatty sidecar: listed as a grace key in use, by API and CLI.
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    let listed = until(
        Duration::from_secs(2),
        || {
            h.admin_req(Method::GET, "/auth/admin/keys?status=grace&used_since=1h", None)
                .1
        },
        |v| {
            v["keys"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k["key_id"] == svc.key_id.as_str()))
        },
    );
    let k = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == svc.key_id.as_str())
        .unwrap();
    assert_eq!(k["service_id"], svc.service_id.as_str());
    assert!(k["last_used_at"].is_string());
    let health_a = h.sidecar.as_ref().unwrap().health_addr.unwrap();
    assert_eq!(
        crate::common::scrape(
            &h.http,
            &format!("http://{health_a}/metrics"),
            "permiso_sidecar_grace_key_requests_total"
        ),
        Some(1),
        "the grace key's request is flagged"
    );
    let out = permiso(&h, &["keys", "list", "--status", "grace", "--used-since", "1h"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&svc.key_id));
    for bad in [
        "status=active",
        "status=grace&used_since=soon",
        "status=grace&extra=1",
        "",
    ] {
        let (s, v) = h.admin_req(Method::GET, &format!("/auth/admin/keys?{bad}"), None);
        assert_eq!(s, 400, "{bad}: {v}");
    }

    // The last second of its grace, through the quiet sidecar; then the key leaves its
    // snapshot (grace ended, and a change to the service replaces its entry).
    h.clock.advance(Duration::from_secs(9));
    let r = h
        .http
        .get(format!("{quiet_url}/api/v1/trades"))
        .bearer_auth(&svc.api_key)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 401);
    let (s, _) = h.admin_req(
        Method::PATCH,
        &format!("/auth/admin/services/{}", svc.service_id),
        Some(json!({"description": "a change"})),
    );
    assert_eq!(s, 200);
    caught_up();
    quiet.stop();
    let (_, v) = h.admin_req(
        Method::GET,
        &format!("/auth/admin/services/{}", svc.service_id),
        None,
    );
    let old = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == svc.key_id.as_str())
        .unwrap();
    let want = chrono::DateTime::from_timestamp(end as i64 - 1, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(old["last_used_at"], want, "{old}");
    assert_eq!(old["status"], "expired");
}
