//! Starts real servers on loopback for one test: the admin plane (SQLite file in a temp dir),
//! a small echo upstream, and a sidecar in front of it, all sharing one manual clock.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use permiso::admin::{self, AdminHandle};
use permiso::config::{self, AdminConfig, SidecarConfig};
use permiso::core::clock::{ManualClock, SharedClock};
use permiso::core::key::Secret;
use permiso::sidecar::{self, SidecarHandle};
use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef";

pub const ROUTES: &str = r#"
[[sidecar.routes]]
prefix = "/health"
public = true

[[sidecar.routes]]
methods = ["GET"]
prefix = "/api/v1/trades"
scopes = ["trade:read"]

[[sidecar.routes]]
methods = ["POST"]
prefix = "/api/v1/trades"
scopes = ["trade:open"]

[[sidecar.routes]]
prefix = "/api/v1/account"
scopes = ["account:read"]
"#;

pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// An upstream that answers every request with what it received, as JSON.
pub struct EchoUpstream {
    pub addr: SocketAddr,
    /// Requests that reached it.
    pub hits: Arc<std::sync::atomic::AtomicU64>,
    _thread: std::thread::JoinHandle<()>,
}

/// Serves a loopback listener on a thread of its own with a current-thread runtime (the
/// tests' upstreams): `serve` gets the listener. Returns its address and the thread.
pub fn serve_on_own_thread<F, Fut>(serve: F) -> (SocketAddr, std::thread::JoinHandle<()>)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move { serve(tokio::net::TcpListener::from_std(l).unwrap()).await });
    });
    (addr, thread)
}

impl EchoUpstream {
    pub fn start() -> EchoUpstream {
        let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = hits.clone();
        let (addr, thread) = serve_on_own_thread(move |l| async move {
            let addr = l.local_addr().unwrap();
            let app = axum::Router::new().fallback(
                move |method: axum::http::Method,
                      uri: axum::http::Uri,
                      headers: axum::http::HeaderMap,
                      body: axum::body::Body| async move {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Read the whole body before answering, as a real service would: answering
                    // first makes hyper close the connection when the body arrives late, and
                    // the sidecar's pool could hand that closing connection to the next
                    // request (a 502 seen once under load in a clean-clone .ci/run).
                    let _ = http_body_util::BodyExt::collect(body).await;
                    // A slow upstream, for in-flight requests across reloads and shutdowns.
                    if uri.path().contains("/slow") {
                        tokio::time::sleep(Duration::from_millis(1000)).await;
                    }
                    let mut h = serde_json::Map::new();
                    for (k, v) in headers.iter() {
                        h.insert(
                            k.as_str().to_string(),
                            json!(String::from_utf8_lossy(v.as_bytes())),
                        );
                    }
                    axum::Json(
                        json!({"method": method.as_str(), "path": uri.path(), "headers": h, "upstream": addr.to_string()}),
                    )
                },
            );
            axum::serve(l, app).await.unwrap();
        });
        EchoUpstream {
            addr,
            hits,
            _thread: thread,
        }
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
    pub admin: Option<AdminHandle>,
    pub admin_addr: SocketAddr,
    pub upstream: EchoUpstream,
    pub sidecar: Option<SidecarHandle>,
    pub sidecar_addr: SocketAddr,
    pub sync_key: String,
    pub http: Client,
}

#[derive(Debug, Clone)]
pub struct Created {
    pub service_id: String,
    pub api_key: String,
    pub key_id: String,
    pub client_secret: String,
}

impl Harness {
    pub fn start() -> Harness {
        Self::start_with(ROUTES)
    }

    pub fn start_with(routes: &str) -> Harness {
        Self::start_custom(routes, |_| {})
    }

    /// `tweak` adjusts the admin plane's file config before it starts.
    pub fn start_custom(routes: &str, tweak: fn(&mut config::file::AdminPlane)) -> Harness {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::starting_now();
        let http = Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let admin = start_admin_with(
            &dir.path().join("permiso.db"),
            "127.0.0.1:0".parse().unwrap(),
            &clock,
            tweak,
        );
        let admin_addr = admin.addr;
        let upstream = EchoUpstream::start();
        let mut h = Harness {
            dir,
            clock,
            admin: Some(admin),
            admin_addr,
            upstream,
            sidecar: None,
            sidecar_addr: free_port(),
            sync_key: String::new(),
            http,
        };
        let sync = h.create(json!({"service_name": "sidecar-sync", "scopes": ["sync:read"]}));
        h.sync_key = sync.api_key;
        h.start_sidecar(routes);
        h.wait_synced();
        h
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("permiso.db")
    }

    pub fn snapshot_path(&self) -> PathBuf {
        self.dir.path().join("snapshot.json")
    }

    pub fn sidecar_config(&self, routes: &str) -> SidecarConfig {
        self.sidecar_config_at(
            self.sidecar_addr,
            self.admin_addr,
            &self.snapshot_path(),
            5,
            routes,
        )
    }

    /// A sidecar config for this harness's upstream with its own listener, admin address (a
    /// relay in front of the admin plane, say), snapshot file and long-poll wait.
    pub fn sidecar_config_at(
        &self,
        listen: SocketAddr,
        admin: SocketAddr,
        snapshot: &Path,
        wait_seconds: u64,
        routes: &str,
    ) -> SidecarConfig {
        let text = format!(
            "[sidecar]\nlisten = \"{}\"\nupstream = \"{}\"\nsnapshot_file = \"{}\"\nadmin_listen = \"127.0.0.1:0\"\nusage_report_interval_ms = 50\n[sidecar.sync]\nadmin_url = \"http://{}\"\nwait_seconds = {wait_seconds}\n{}",
            listen,
            self.upstream.addr,
            snapshot.display(),
            admin,
            routes
        );
        let f = config::parse_file(&text, std::path::Path::new("test.toml")).unwrap();
        SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new(self.sync_key.clone())).unwrap()
    }

    /// Another in-process sidecar in front of this harness's upstream: its own port and
    /// snapshot file, `sidecar_keys` added to its `[sidecar]` table (`mode = "shadow"`, say),
    /// a 1 s long-poll wait. The one clock of the harness.
    pub fn start_extra_sidecar(&self, name: &str, sidecar_keys: &str, routes: &str) -> SidecarHandle {
        let listen = free_port();
        let report = if sidecar_keys.contains("usage_report_interval_ms") {
            ""
        } else {
            "usage_report_interval_ms = 50"
        };
        let text = format!(
            "[sidecar]\nlisten = \"{listen}\"\nupstream = \"{}\"\nsnapshot_file = \"{}\"\nadmin_listen = \"127.0.0.1:0\"\n{report}\n{sidecar_keys}\n[sidecar.sync]\nadmin_url = \"http://{}\"\nwait_seconds = 1\n{routes}",
            self.upstream.addr,
            self.dir.path().join(format!("{name}-snapshot.json")).display(),
            self.admin_addr,
        );
        let f = config::parse_file(&text, std::path::Path::new("test.toml")).unwrap();
        let cfg = SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new(self.sync_key.clone()))
            .unwrap();
        let clock: SharedClock = Arc::new(self.clock.clone());
        let s = sidecar::start(cfg, clock).expect("sidecar starts");
        let started = Instant::now();
        while !self.dir.path().join(format!("{name}-snapshot.json")).exists() {
            assert!(started.elapsed() < Duration::from_secs(5), "{name} never synced");
            std::thread::sleep(Duration::from_millis(5));
        }
        s
    }

    pub fn start_sidecar(&mut self, routes: &str) {
        // A fresh port each time: a port given back by a stopped sidecar can be taken by a
        // test running in parallel before the restart binds it again.
        self.sidecar_addr = free_port();
        let cfg = self.sidecar_config(routes);
        let clock: SharedClock = Arc::new(self.clock.clone());
        self.sidecar = Some(sidecar::start(cfg, clock).expect("sidecar starts"));
        // Pooled connections to a previous sidecar on this port are dead now.
        self.http = Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
    }

    pub fn stop_sidecar(&mut self) {
        if let Some(s) = self.sidecar.take() {
            s.stop();
        }
    }

    pub fn stop_admin(&mut self) {
        if let Some(a) = self.admin.take() {
            a.stop();
        }
    }

    /// Restarts the admin plane on the same address and database.
    pub fn restart_admin(&mut self) {
        self.stop_admin();
        self.admin = Some(start_admin(&self.db_path(), self.admin_addr, &self.clock));
    }

    /// Waits until the sidecar has applied the admin plane's current version.
    pub fn wait_synced(&self) {
        let started = Instant::now();
        while !self.snapshot_path().exists() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "sidecar never wrote a snapshot"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    pub fn sidecar_url(&self, path: &str) -> String {
        format!("http://{}{}", self.sidecar_addr, path)
    }

    pub fn admin_req(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, self.admin_url(path))
            .header("X-Admin-Api-Key", ADMIN_KEY);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// Waits until the running sidecar has applied the admin plane's current state version,
    /// so a test never races the sync it is not measuring (under load, a token can be minted
    /// and presented before the new service reaches the sidecar).
    pub fn wait_sidecar_caught_up(&self) {
        let Some(health) = self.sidecar.as_ref().and_then(|s| s.health_addr) else {
            return;
        };
        let metrics = self
            .http
            .get(self.admin_url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        let want: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("permiso_admin_state_version "))
            .and_then(|v| v.trim().parse().ok())
            .expect("admin state version");
        let started = Instant::now();
        loop {
            let v: Value = self
                .http
                .get(format!("http://{health}/readyz"))
                .send()
                .unwrap()
                .json()
                .unwrap();
            if v["snapshot_version"].as_u64().is_some_and(|have| have >= want) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "sidecar still at {v}, admin plane at version {want}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Creates a service and waits until the running sidecar has it.
    pub fn create(&self, body: Value) -> Created {
        let c = self.create_unsynced(body);
        self.wait_sidecar_caught_up();
        c
    }

    /// Creates a service without waiting for any sidecar.
    pub fn create_unsynced(&self, body: Value) -> Created {
        let (status, v) = self.admin_req(reqwest::Method::POST, "/auth/admin/services", Some(body));
        assert_eq!(status, 201, "create failed: {v}");
        Created {
            service_id: v["service_id"].as_str().unwrap().to_string(),
            api_key: v["api_key"].as_str().unwrap().to_string(),
            key_id: v["key_id"].as_str().unwrap().to_string(),
            client_secret: v["client_secret"].as_str().unwrap().to_string(),
        }
    }

    /// A client-credentials token by form parameters (client_secret_post); panics unless 200.
    pub fn token(&self, svc: &Created, scope: Option<&str>) -> String {
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", svc.service_id.as_str()),
            ("client_secret", svc.client_secret.as_str()),
        ];
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        let r = self
            .http
            .post(self.admin_url("/oauth/token"))
            .form(&form)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn get(&self, path: &str, key: Option<&str>) -> Response {
        let mut rb = self.http.get(self.sidecar_url(path));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        rb.send()
            .unwrap_or_else(|e| panic!("GET {path} through the sidecar: {e:?}"))
    }

    /// Polls the sidecar until `path` answers `status` for `key`; returns how long it took.
    pub fn wait_for_status(&self, path: &str, key: Option<&str>, status: u16, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let got = self.get(path, key).status().as_u16();
            if got == status {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{path} still answers {got}, not {status}, after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn clock_secs(&self) -> u64 {
        use permiso::core::clock::Clock;
        self.clock.now_secs() as u64
    }

    /// Runs SQL on the admin plane's database behind its back (SQLite file or PostgreSQL),
    /// as someone with access to the database would; the database's error text on failure.
    pub fn exec_sql(&self, sql: &str) -> Result<(), String> {
        if !on_postgres() {
            let conn = rusqlite::Connection::open(self.db_path()).map_err(|e| e.to_string())?;
            return conn.execute_batch(sql).map_err(|e| e.to_string());
        }
        let url = pg_database_for(&self.db_path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            c.batch_execute(sql).await.map_err(|e| {
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_string())
            })
        })
    }

    pub fn list_all(&self) -> Value {
        let (s, v) = self.admin_req(reqwest::Method::GET, "/auth/admin/services?limit=200", None);
        assert_eq!(s, 200);
        v
    }
}

pub fn start_admin(db: &std::path::Path, listen: SocketAddr, clock: &ManualClock) -> AdminHandle {
    start_admin_with(db, listen, clock, |_| {})
}

pub fn start_admin_with(
    db: &std::path::Path,
    listen: SocketAddr,
    clock: &ManualClock,
    tweak: impl FnOnce(&mut config::file::AdminPlane),
) -> AdminHandle {
    let mut f = config::file::AdminPlane {
        listen: listen.to_string(),
        database: db.display().to_string(),
        max_body_bytes: 4096,
        ..Default::default()
    };
    // PERMISO_TEST_BACKEND=postgres: the same tests on PostgreSQL, one database per SQLite
    // path (a restart with the same path finds the same data).
    let postgres = on_postgres().then(|| pg_database_for(db));
    if let Some(url) = &postgres {
        f.database = url.clone();
    }
    tweak(&mut f);
    let mut cfg = AdminConfig::from_file(&f, Some(ADMIN_KEY.to_string())).unwrap();
    if postgres.is_some() || cfg.database.is_postgres() {
        cfg.signing_kek = Some(permiso::core::key::Secret::new(TEST_KEK.to_string()));
    }
    let clock: SharedClock = Arc::new(clock.clone());
    // The previous instance may take a moment to release the port.
    let started = Instant::now();
    loop {
        match admin::start(cfg.clone(), clock.clone()) {
            Ok(h) => return h,
            Err(e) if started.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("admin plane did not start: {e}"),
        }
    }
}

/// The value of the Prometheus sample whose name-and-labels part is exactly `series`, scraped
/// from `url` (a `/metrics` endpoint).
pub fn scrape(http: &Client, url: &str, series: &str) -> Option<u64> {
    let text = http.get(url).send().ok()?.text().ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls a sidecar's `/readyz` at `health` until it answers 200.
pub fn wait_ready(http: &Client, health: SocketAddr) {
    let started = Instant::now();
    while http
        .get(format!("http://{health}/readyz"))
        .send()
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sidecar at {health} never ready"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Test-captured logs; `RUST_LOG=debug cargo test ...` shows them for a failing test.
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A TCP relay in front of a server, to lose a server's answers the way a broken network
/// does: after `mute()`, whatever the server sends on connections opened before it is
/// dropped (their clients wait for answers that never come), while connections opened after
/// it relay normally. Its threads end when both ends close; the listener lives as long as
/// the test binary.
pub struct Relay {
    pub addr: SocketAddr,
    opened: Arc<std::sync::atomic::AtomicU64>,
    muted_below: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicU64, Ordering};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let opened = Arc::new(AtomicU64::new(0));
        let muted_below = Arc::new(AtomicU64::new(0));
        let (o, m) = (opened.clone(), muted_below.clone());
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let id = o.fetch_add(1, Ordering::SeqCst);
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_in, mut c_out, m) = (server, client, m.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) if id >= m.load(Ordering::SeqCst) => {
                                if c_out.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {} // muted: lost on the way
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Relay {
            addr,
            opened,
            muted_below,
        }
    }

    /// From now on, answers on the connections already open are lost.
    pub fn mute(&self) {
        use std::sync::atomic::Ordering;
        self.muted_below
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Python venv under the target dir (one per `name`, made once) with `spec` installed from
/// PyPI; returns its interpreter. `import` is the module whose presence means it is ready.
pub fn python_venv(name: &str, import: &str, spec: &str) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let py = venv.join("bin/python");
    let ready = |py: &Path| {
        Command::new(py)
            .args(["-c", &format!("import {import}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&py) {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "python3 -m venv {} failed (Debian: apt-get install python3-venv)",
            venv.display()
        );
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", spec])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install {spec} failed: this test needs PyPI");
    }
    py
}

/// Sends a signal (`-HUP`, `-TERM`, …) to a child process.
pub fn signal(p: &Proc, sig: &str) {
    // The shell's builtin kill: no dependency on procps being installed.
    let ok = Command::new("sh")
        .args(["-c", &format!("kill {sig} {}", p.0.id())])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Starts one of our binaries with its output in `<dir>/<name>.log`.
pub fn spawn(dir: &Path, name: &str, exe: &str, args: &[&str]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(exe)
        .args(args)
        .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {exe}: {e}"));
    Proc(child)
}

pub fn wait_ok(http: &reqwest::blocking::Client, url: &str, what: &str) {
    let started = Instant::now();
    while http.get(url).send().map(|r| r.status() != 200).unwrap_or(true) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what} never became ready at {url}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether this run puts the admin plane on PostgreSQL (`PERMISO_TEST_BACKEND=postgres`).
pub fn on_postgres() -> bool {
    std::env::var("PERMISO_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// The PostgreSQL server the tests use: `PERMISO_TEST_POSTGRES`, default the local one with
/// trust authentication (.ci/run starts one when nothing listens).
pub fn pg_server() -> String {
    std::env::var("PERMISO_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The KEK every replica of a PostgreSQL test shares (base64url of 32 bytes).
pub const TEST_KEK: &str = "dGVzdC1rZWstMzItYnl0ZXMtZm9yLXBlcm1pc28tISE";

/// A fresh, migrated database on the test server, named after `key`; its URL. Created once
/// per name (a second call, a restart, reuses it).
pub fn pg_database_for(key: &std::path::Path) -> String {
    let name = format!(
        "permiso_t_{}",
        &blake3::hash(key.display().to_string().as_bytes()).to_hex()[..16]
    );
    pg_database(&name)
}

pub fn pg_database(name: &str) -> String {
    let url = pg_empty_database(name);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = permiso::config::database::parse(&url, None, 4, None).unwrap();
        permiso::admin::storage::migrate(&db, None).await.unwrap();
    });
    url
}

/// A database on the test server, created if missing, not migrated; its URL.
pub fn pg_empty_database(name: &str) -> String {
    let server = pg_server();
    let url = format!("{server}/{name}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {server} (PERMISO_TEST_POSTGRES): {e}"));
        let driver = tokio::spawn(conn);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .unwrap()
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
        }
        drop(client);
        let _ = driver.await;
    });
    url
}

/// An admin-plane replica on the PostgreSQL database `url` (migrated), in this process.
pub fn start_admin_postgres(url: &str, clock: &ManualClock) -> AdminHandle {
    let url = url.to_string();
    start_admin_with(
        std::path::Path::new("unused.db"),
        "127.0.0.1:0".parse().unwrap(),
        clock,
        move |f| f.database = url,
    )
}
