//! Several admin-plane replicas on one PostgreSQL database: changes made through replica A
//! reach a sidecar long-polling replica B; a signing key rotated through A is served by B; a
//! replica killed with SIGKILL mid-burst loses no acknowledged write; PostgreSQL restarted
//! under a replica gives 503 JSON meanwhile, the replica recovers by itself and the sidecar
//! keeps serving; a replica refuses a schema it does not know.

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

    // Writes through both replicas at once, then one audit chain over all of them.
    let writers: Vec<_> = [a_url.clone(), b_url.clone()]
        .into_iter()
        .enumerate()
        .map(|(n, base)| {
            let http = http.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    let (s, v) = admin(
                        &http,
                        &base,
                        reqwest::Method::POST,
                        "/auth/admin/services",
                        Some(json!({"service_name": format!("both-{n}-{i}"), "scopes": ["trade:read"]})),
                    );
                    assert_eq!(s, 201, "{v}");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
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

/// A PostgreSQL server of its own (Debian's binaries, a cluster in a temporary directory, run
/// as the `postgres` user), so the test can restart it without disturbing the others.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: std::path::PathBuf,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        Self::start_with(None)
    }

    /// With `tls`, the server also speaks TLS with this certificate (cert PEM, key PEM).
    fn start_with(tls: Option<(&str, &str)>) -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries (/usr/lib/postgresql/<version>/bin; .ci/run installs them)")
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("pg_ctl").exists())
            .max()
            .expect("pg_ctl");
        let dir = tempfile::tempdir().unwrap();
        if let Some((cert, key)) = tls {
            std::fs::write(dir.path().join("server.crt"), cert).unwrap();
            let key_file = dir.path().join("server.key");
            std::fs::write(&key_file, key).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let ok = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres", &dir.path().display().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown to postgres (the test runs as root, as .ci/run does)");
        let pg = PrivatePostgres {
            port: free_port().port(),
            dir,
            bin,
        };
        pg.run(
            "initdb",
            &["-D", &pg.data(), "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        pg.ctl("start");
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ctl(&self, action: &str) {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        if self.dir.path().join("server.crt").exists() {
            let d = self.dir.path().display();
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"
            ));
        }
        let log = self.dir.path().join("server.log").display().to_string();
        let mut args = vec!["-D".to_string(), self.data(), "-w".into(), "-l".into(), log];
        if action == "stop" {
            args.extend(["-m".into(), "fast".into()]);
        } else {
            args.extend(["-o".into(), opts]);
        }
        args.push(action.into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run("pg_ctl", &args);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

/// PostgreSQL restarted under a running replica (a real stop and start of the server): writes
/// answer 503 JSON and write nothing meanwhile, the sidecar keeps serving from its snapshot,
/// and once the server is back the replica writes again by itself.
#[test]
fn a_postgres_restart_gives_503_meanwhile_and_the_replica_recovers_by_itself() {
    let pg = PrivatePostgres::start();
    let url = {
        let server = pg.url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c.batch_execute("CREATE DATABASE permiso").await.unwrap();
            let url = format!("{server}/permiso");
            let db = permiso::config::database::parse(&url, None, 4, None).unwrap();
            permiso::admin::storage::migrate(&db, None).await.unwrap();
            url
        })
    };
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

    pg.ctl("stop");
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
    let ready = http.get(format!("{base}/readyz")).send().unwrap();
    assert_eq!(ready.status(), 503, "not ready without its database");
    for _ in 0..20 {
        assert_eq!(
            sidecar_status(&http, side, &key),
            200,
            "the sidecar serves from its snapshot"
        );
    }

    pg.ctl("start");
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
        "replica writing again {:?} after PostgreSQL was back",
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
    // And a change made after the restart reaches the sidecar.
    let (_, late) = admin(
        &http,
        &base,
        reqwest::Method::POST,
        "/auth/admin/services",
        Some(json!({"service_name": "late", "scopes": ["trade:read"]})),
    );
    until(&http, side, late["api_key"].as_str().unwrap(), 200);
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
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(out.contains("applied [1, 2, 3]"), "{out}");
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

/// A replica reaches PostgreSQL over TLS verified against `database_ca_file`
/// (`sslmode=require`): every connection it holds is encrypted (pg_stat_ssl), and without the
/// CA it does not start, naming the certificate problem.
#[test]
fn replicas_reach_postgres_over_tls_verified_against_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::certs::Ca::new(dir.path(), "db-ca");
    let server = ca.server("db", 2040);
    let pg = PrivatePostgres::start_with(Some((&server.cert_pem, &server.key_pem)));
    let admin_sql = |q: &str| -> Vec<tokio_postgres::Row> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&format!("{}/postgres", pg.url()), tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c.query(q, &[]).await.unwrap()
        })
    };
    admin_sql("CREATE DATABASE permiso");
    let url = format!("{}/permiso?sslmode=require", pg.url());
    let ca_file = ca.pem_file.display().to_string();
    let db = permiso::config::database::parse(&url, None, 4, Some(&ca_file)).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(permiso::admin::storage::migrate(&db, None))
        .unwrap();

    let clock = permiso::core::clock::ManualClock::starting_now();
    let config = |ca: Option<String>| {
        let f = permiso::config::file::AdminPlane {
            listen: "127.0.0.1:0".into(),
            database: url.clone(),
            database_ca_file: ca,
            ..Default::default()
        };
        let mut cfg = permiso::config::AdminConfig::from_file(&f, Some(ADMIN_KEY.to_string())).unwrap();
        cfg.signing_kek = Some(permiso::core::key::Secret::new(TEST_KEK.to_string()));
        cfg
    };
    let replica = permiso::admin::start(config(Some(ca_file.clone())), Arc::new(clock.clone())).unwrap();
    let http = Client::new();
    let (s, v) = admin(
        &http,
        &format!("http://{}", replica.addr),
        reqwest::Method::POST,
        "/auth/admin/services",
        Some(json!({"service_name": "over-tls", "scopes": ["trade:read"]})),
    );
    assert_eq!(s, 201, "{v}");
    let rows = admin_sql(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = 'permiso'",
    );
    let (all, encrypted): (i64, i64) = (rows[0].get(0), rows[0].get(1));
    assert!(all >= 2, "the pool and the listener hold connections ({all})");
    assert_eq!(encrypted, all, "every connection of the replica is TLS");

    let refused = permiso::admin::start(config(None), Arc::new(clock.clone()))
        .err()
        .expect("a replica that cannot verify the database started")
        .to_string();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    drop(replica);
}
