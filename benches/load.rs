//! Bundled load test: `cargo bench --bench load`. Needs only the repository and the Rust
//! toolchain; uses nginx too when it is installed (`apt-get install -y nginx`).
//!
//! On loopback it starts a fast upstream, a passthrough on the sidecar's own HTTP/1 path (no
//! auth, same settings), pingora-proxy as a passthrough (the sidecar's path before issue 15), the sidecar with 100k keys (PERMISO_LOAD_KEYS=1000000 for 1M)
//! synced from a real admin plane, and nginx as a plain reverse proxy. Every proxy runs ONE
//! worker thread/process. A bundled generator drives each with the same load (keep-alive
//! connections, fixed duration) and the run prints one table, then measures how long a
//! revocation takes to reach the sidecar while it serves that load.
//!
//! Knobs: PERMISO_LOAD_SECS (default 5), PERMISO_LOAD_CONNS (default 32),
//! PERMISO_LOAD_KEYS (default 100000), PERMISO_LOAD_REVOCATIONS (default 20),
//! PERMISO_LOAD_THREADS (default 1: worker threads of the sidecar and the passthroughs, worker
//! processes of nginx, threads of haproxy).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use permiso::admin::storage::sqlite::Store;
use permiso::admin::storage::{BulkService, NewService, StoredKey};
use permiso::core::ids;
use permiso::core::key::{self, Environment};
use permiso::core::ratelimit::LimitScope;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
// The bench's TLS client (the library's own rustls).
use tokio_rustls::rustls;

mod support;
use support::*;

#[derive(Default)]
struct LoadResult {
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    elapsed: Duration,
}

/// Where the generator connects: plain TCP, or TLS verified against the bench's CA.
#[derive(Clone)]
enum Target {
    Plain(SocketAddr),
    Tls(SocketAddr, Arc<rustls::ClientConfig>),
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(t: &Target) -> std::io::Result<Box<dyn Stream>> {
    let addr = match t {
        Target::Plain(a) | Target::Tls(a, _) => *a,
    };
    let s = tokio::net::TcpStream::connect(addr).await?;
    let _ = s.set_nodelay(true);
    match t {
        Target::Plain(_) => Ok(Box::new(s)),
        Target::Tls(_, cfg) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, s)
                .await?;
            Ok(Box::new(tls))
        }
    }
}

/// The bench's TLS client: TLS 1.3 or 1.2 as the server picks, the bench CA only, and no
/// session resumption when `full_handshakes` (every connection pays the whole handshake).
fn tls_client(ca: &Path, full_handshakes: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in permiso::tls::read_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(permiso::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if full_handshakes {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(cfg)
}

/// Reads one response; returns its status and whether the server closes the connection after
/// it (`Connection: close`, as the sidecar says after `max_requests_per_connection`).
async fn read_response(s: &mut Box<dyn Stream>, buf: &mut Vec<u8>) -> std::io::Result<(u16, bool)> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
            let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let close = head.lines().any(|l| {
                    l.split_once(':').is_some_and(|(k, v)| {
                        k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
                    })
                });
                buf.drain(..end + 4 + len);
                return Ok((status, close));
            }
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `conns` connections sending `request` back to back for `dur`: kept alive, or with
/// `new_conn_each` a new connection (and for TLS a full handshake) per request, timed from
/// the connect. A connection the server announces it will close is reopened, as a client
/// would; one it drops is counted as an error and reopened.
fn run_load(
    target: Target,
    request: Vec<u8>,
    conns: usize,
    dur: Duration,
    new_conn_each: bool,
) -> LoadResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let started = Instant::now();
        let deadline = started + dur;
        let tasks: Vec<_> = (0..conns)
            .map(|_| {
                let (request, target) = (request.clone(), target.clone());
                tokio::spawn(async move {
                    let mut r = LoadResult::default();
                    let mut conn: Option<Box<dyn Stream>> = None;
                    let mut buf = Vec::with_capacity(8192);
                    while Instant::now() < deadline {
                        let mut t = Instant::now();
                        let s = match conn.as_mut() {
                            Some(s) => s,
                            None => match connect(&target).await {
                                Ok(s) => {
                                    if !new_conn_each {
                                        t = Instant::now();
                                    }
                                    buf.clear();
                                    conn.insert(s)
                                }
                                Err(_) => {
                                    r.errors += 1;
                                    break;
                                }
                            },
                        };
                        if s.write_all(&request).await.is_err() {
                            r.errors += 1;
                            conn = None;
                            continue;
                        }
                        match read_response(s, &mut buf).await {
                            Ok((status, close)) => {
                                r.latencies_us.push(t.elapsed().as_micros() as u32);
                                *r.statuses.entry(status).or_default() += 1;
                                if close || new_conn_each {
                                    conn = None;
                                }
                            }
                            Err(_) => {
                                r.errors += 1;
                                conn = None;
                            }
                        }
                    }
                    r
                })
            })
            .collect();
        let mut total = LoadResult::default();
        for t in tasks {
            let r = t.await.unwrap();
            total.latencies_us.extend(r.latencies_us);
            total.errors += r.errors;
            for (k, v) in r.statuses {
                *total.statuses.entry(k).or_default() += v;
            }
        }
        total.elapsed = started.elapsed();
        total.latencies_us.sort_unstable();
        total
    })
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn request(auth: Option<&str>) -> Vec<u8> {
    let mut r = String::from("GET /api/v1/trades HTTP/1.1\r\nHost: bench\r\n");
    if let Some(a) = auth {
        r.push_str(&format!("Authorization: Bearer {a}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// A request after which the server closes the connection (so the server, not the
/// generator, holds the TIME_WAIT of each of the many short connections).
fn request_then_close(auth: Option<&str>) -> Vec<u8> {
    let mut r = request(auth);
    r.truncate(r.len() - 2);
    r.extend_from_slice(b"Connection: close\r\n\r\n");
    r
}

fn new_service(name: &str, scopes: &[&str], per_minute: Option<u32>, scope: LimitScope) -> NewService {
    NewService {
        rate_limit_per_minute: per_minute,
        rate_limit_scope: scope,
        ..NewService::named(name, scopes)
    }
}

struct Seeded {
    valid_key: String,
    limited_key: String,
    /// Limits high enough never to refuse, so every request runs the limiter and passes:
    /// counted by the sidecar alone, and in Redis (cluster scope).
    metered_local_key: String,
    metered_cluster_key: String,
    sync_key: String,
    jwt_client: (String, String),
}

/// `n` keys over n/10 services, plus the bench's own accounts, in one transaction.
fn seed(db: &Path, n: usize) -> Seeded {
    let store = Store::open(db).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut first_key = None;
    let mut bulk = Vec::with_capacity(n / 10 + 3);
    let mut make = |name: String,
                    scopes: &[&str],
                    per_minute: Option<u32>,
                    keys: usize,
                    scope: LimitScope|
     -> (String, Vec<String>, String) {
        let id = ids::new_service_id();
        let mut secrets = Vec::new();
        let mut stored = Vec::new();
        for _ in 0..keys {
            let k = key::generate(Environment::Live);
            stored.push((ids::new_key_id(), StoredKey::of(&k)));
            secrets.push(k.secret.expose().to_string());
        }
        let cs = key::generate_client_secret();
        bulk.push(BulkService {
            id: id.clone(),
            service: new_service(&name, scopes, per_minute, scope),
            keys: stored,
            secret: (ids::new_secret_id(), StoredKey::of(&cs)),
        });
        (id, secrets, cs.secret.expose().to_string())
    };
    for i in 0..n / 10 {
        let (_, keys, _) = make(format!("svc-{i}"), &["trade:read"], None, 10, LimitScope::Sidecar);
        first_key.get_or_insert(keys[0].clone());
    }
    let (_, sync, _) = make("bench-sync".into(), &["sync:read"], None, 1, LimitScope::Sidecar);
    let (_, limited, _) = make(
        "bench-limited".into(),
        &["trade:read"],
        Some(1),
        1,
        LimitScope::Sidecar,
    );
    let (jwt_id, _, jwt_secret) = make("bench-jwt".into(), &["trade:read"], None, 1, LimitScope::Sidecar);
    let (_, metered_local, _) = make(
        "bench-metered-local".into(),
        &["trade:read"],
        Some(10_000_000),
        1,
        LimitScope::Sidecar,
    );
    let (_, metered_cluster, _) = make(
        "bench-metered-cluster".into(),
        &["trade:read"],
        Some(10_000_000),
        1,
        LimitScope::Cluster,
    );
    store
        .bulk_create(&bulk, now, &permiso::admin::storage::Audit::system())
        .unwrap();
    Seeded {
        valid_key: first_key.unwrap(),
        limited_key: limited[0].clone(),
        metered_local_key: metered_local[0].clone(),
        metered_cluster_key: metered_cluster[0].clone(),
        sync_key: sync[0].clone(),
        jwt_client: (jwt_id, jwt_secret),
    }
}

fn main() {
    let secs = env_or("PERMISO_LOAD_SECS", 5);
    let conns = env_or("PERMISO_LOAD_CONNS", 32) as usize;
    let n_keys = env_or("PERMISO_LOAD_KEYS", 100_000) as usize;
    let revocations = env_or("PERMISO_LOAD_REVOCATIONS", 20) as usize;
    let workers = env_or("PERMISO_LOAD_THREADS", 1) as usize;
    let dur = Duration::from_secs(secs);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let permiso = env!("CARGO_BIN_EXE_permiso");
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    eprintln!("seeding {n_keys} keys ...");
    let t = Instant::now();
    let seeded = seed(&d.join("permiso.db"), n_keys);
    eprintln!("seeded in {:.1} s", t.elapsed().as_secs_f64());

    let upstream = start_upstream();
    let admin = free_port();
    let _admin = spawn(
        d,
        "admin",
        permiso,
        &[
            "admin",
            "--listen",
            &admin.to_string(),
            "--database",
            &d.join("permiso.db").display().to_string(),
        ],
    );
    wait_until("admin plane", || {
        http.get(format!("http://{admin}/healthz")).send().is_ok()
    });

    let sidecar = free_port();
    std::fs::write(d.join("sync.key"), &seeded.sync_key).unwrap();
    // The shared limiter's rows need Redis (PERMISO_LOAD_REDIS, default 127.0.0.1:6379); the
    // other rows never touch it (their services are counted by the sidecar alone).
    let (redis, redis_addr) = redis_from_env("PERMISO_LOAD_REDIS");
    let redis_pid = redis_pid(&redis_addr);
    let rate_limit = match redis_pid {
        Some(_) => format!(
            "[sidecar.rate_limit]\nbackend = \"redis\"\nredis_url = \"{redis}\"\nkey_prefix = \"permiso-load:{}:\"\nreplicas = 1\n",
            std::process::id()
        ),
        None => String::new(),
    };
    let cfg = format!(
        "[sidecar]\nlisten = \"{sidecar}\"\nupstream = \"{upstream}\"\nsnapshot_file = \"{}\"\nthreads = {workers}\n\
         [sidecar.sync]\nadmin_url = \"http://{admin}\"\ncredential_file = \"{}\"\n{rate_limit}\
         [[sidecar.routes]]\nprefix = \"/api/v1/trades\"\nscopes = [\"trade:read\"]\n",
        d.join("snapshot.json").display(),
        d.join("sync.key").display()
    );
    std::fs::write(d.join("sidecar.toml"), cfg).unwrap();
    let sidecar_proc = spawn(
        d,
        "sidecar",
        permiso,
        &[
            "sidecar",
            "--config",
            &d.join("sidecar.toml").display().to_string(),
        ],
    );
    let t = Instant::now();
    wait_until("sidecar with its snapshot", || {
        http.get(format!("http://{sidecar}/api/v1/trades"))
            .bearer_auth(&seeded.valid_key)
            .send()
            .is_ok_and(|r| r.status() == 200)
    });
    eprintln!(
        "sidecar serving {n_keys} keys {:.1} s after start",
        t.elapsed().as_secs_f64()
    );

    // The same sidecar over TLS (a second process on the same admin plane), and nginx below
    // with the same certificate: ECDSA P-256 from a throwaway CA.
    let pki = permiso::tls::dev_pki::DevPki::generate(d, "spiffe://permiso/bench").unwrap();
    let sidecar_tls = free_port();
    std::fs::write(
        d.join("sidecar-tls.toml"),
        format!(
            "[sidecar]\nlisten = \"{sidecar_tls}\"\nupstream = \"{upstream}\"\nsnapshot_file = \"{}\"\nthreads = {workers}\n\
             [sidecar.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             [sidecar.sync]\nadmin_url = \"http://{admin}\"\ncredential_file = \"{}\"\n\
             [[sidecar.routes]]\nprefix = \"/api/v1/trades\"\nscopes = [\"trade:read\"]\n",
            d.join("snapshot-tls.json").display(),
            pki.server_cert.display(),
            pki.server_key.display(),
            d.join("sync.key").display()
        ),
    )
    .unwrap();
    let sidecar_tls_proc = spawn(
        d,
        "sidecar-tls",
        permiso,
        &[
            "sidecar",
            "--config",
            &d.join("sidecar-tls.toml").display().to_string(),
        ],
    );
    let tls_ka = tls_client(&pki.ca, false);
    let tls_full = tls_client(&pki.ca, true);
    wait_until("TLS sidecar with its snapshot", || {
        let r = run_load(
            Target::Tls(sidecar_tls, tls_ka.clone()),
            request(Some(&seeded.valid_key)),
            1,
            Duration::from_millis(1),
            false,
        );
        r.statuses.contains_key(&200)
    });
    wait_until("TLS sidecar's snapshot file", || {
        d.join("snapshot-tls.json").exists()
    });

    // Let start-up work finish before measuring anything: the sidecar writes its snapshot
    // file (15 MB at 100k keys) right after the first sync, and that would land in the first row.
    wait_until("snapshot file", || d.join("snapshot.json").exists());
    std::thread::sleep(Duration::from_secs(3));

    // The baseline: the sidecar's own HTTP/1 path with no policy, same settings.
    let bare = free_port();
    let bare_proc = spawn(
        d,
        "passthrough",
        permiso,
        &[
            "passthrough",
            "--listen",
            &bare.to_string(),
            "--upstream",
            &upstream.to_string(),
            "--threads",
            &workers.to_string(),
        ],
    );
    wait_until("passthrough", || std::net::TcpStream::connect(bare).is_ok());
    // pingora's own reverse proxy (pingora-proxy), the path the sidecar ran on before issue 15.
    let pproxy = free_port();
    let pproxy_proc = spawn(
        d,
        "passthrough-pingora-proxy",
        permiso,
        &[
            "passthrough",
            "--pingora-proxy",
            "--listen",
            &pproxy.to_string(),
            "--upstream",
            &upstream.to_string(),
            "--threads",
            &workers.to_string(),
        ],
    );
    wait_until("pingora-proxy passthrough", || {
        std::net::TcpStream::connect(pproxy).is_ok()
    });

    let nginx = which_nginx().map(|exe| {
        let (port, tls_port) = (free_port(), free_port());
        let (cert, key) = (pki.server_cert.display(), pki.server_key.display());
        let conf = format!(
            "worker_processes {workers};\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n  upstream u {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}\n  \
             server {{\n    listen {port};\n    location / {{ proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n\
             server {{\n    listen {tls_port} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    \
             location / {{ proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n\
               client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n}}\n",
            dir = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let p = spawn(d, "nginx", &exe, &["-c", &d.join("nginx.conf").display().to_string(), "-p", &d.display().to_string(), "-g", "daemon off;"]);
        wait_until("nginx", || {
            std::net::TcpStream::connect(port).is_ok() && std::net::TcpStream::connect(tls_port).is_ok()
        });
        (port, tls_port, p)
    });

    // haproxy (Debian's, when installed) as a second reference: `workers` threads, HTTP mode, upstream
    // connections reused, no logging.
    let haproxy = which(&["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"]).map(|exe| {
        let port = free_port();
        let conf = format!(
            "global\n  nbthread {workers}\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n\
             frontend f\n  bind {port}\n  default_backend b\n\
             backend b\n  server u {upstream}\n"
        );
        std::fs::write(d.join("haproxy.cfg"), conf).unwrap();
        let p = spawn(d, "haproxy", &exe, &["-f", &d.join("haproxy.cfg").display().to_string(), "-db"]);
        wait_until("haproxy", || std::net::TcpStream::connect(port).is_ok());
        (port, p)
    });

    let token: String = {
        let r: Value = http
            .post(format!("http://{admin}/oauth/token"))
            .basic_auth(&seeded.jwt_client.0, Some(&seeded.jwt_client.1))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .unwrap()
            .json()
            .unwrap();
        r["access_token"].as_str().unwrap().to_string()
    };
    let invalid = key::generate(Environment::Live);
    let ticks = clock_ticks_per_sec();

    struct Row {
        name: String,
        rps: f64,
        p50: f64,
        p99: f64,
        p999: f64,
        cpu_us: f64,
        statuses: String,
    }
    // `expected`: the statuses this row may see, the first of them for most responses. A row
    // with any other status, or any connection error, is refused: an all-401 "valid key" row
    // would otherwise just look fast.
    let measure_with =
        |name: &str, target: Target, new_conn_each: bool, pid: u32, req: Vec<u8>, expected: &[u16]| -> Row {
            // Warm up connections and caches, then measure.
            let _ = run_load(
                target.clone(),
                req.clone(),
                conns,
                Duration::from_millis(500),
                new_conn_each,
            );
            let c0 = cpu_ticks(pid);
            let r = run_load(target, req, conns, dur, new_conn_each);
            let c1 = cpu_ticks(pid);
            let total: u64 = r.statuses.values().sum();
            assert!(
                r.errors == 0
                    && r.statuses.keys().all(|s| expected.contains(s))
                    && r.statuses.get(&expected[0]).copied().unwrap_or(0) * 2 > total,
                "{name}: refusing to report a row with statuses {:?} and {} errors (expected mostly {})",
                r.statuses,
                r.errors,
                expected[0]
            );
            let n = r.latencies_us.len() as f64;
            Row {
                name: name.into(),
                rps: n / r.elapsed.as_secs_f64(),
                p50: pct(&r.latencies_us, 0.5),
                p99: pct(&r.latencies_us, 0.99),
                p999: pct(&r.latencies_us, 0.999),
                cpu_us: (c1 - c0) as f64 / ticks * 1e6 / n.max(1.0),
                statuses: format!(
                    "{:?}{}",
                    r.statuses,
                    if r.errors > 0 {
                        format!(" errors={}", r.errors)
                    } else {
                        String::new()
                    }
                ),
            }
        };
    let measure = |name: &str, addr: SocketAddr, pid: u32, req: Vec<u8>, expected: &[u16]| -> Row {
        measure_with(name, Target::Plain(addr), false, pid, req, expected)
    };
    let mut rows = vec![measure(
        "passthrough (the sidecar's HTTP/1 path, no auth)",
        bare,
        bare_proc.0.id(),
        request(Some(&seeded.valid_key)),
        &[200],
    )];
    if let Some((port, _, p)) = &nginx {
        rows.push(measure(
            "nginx proxy_pass (no auth)",
            *port,
            p.0.id(),
            request(Some(&seeded.valid_key)),
            &[200],
        ));
    }
    if let Some((port, p)) = &haproxy {
        rows.push(measure(
            "haproxy (no auth)",
            *port,
            p.0.id(),
            request(Some(&seeded.valid_key)),
            &[200],
        ));
    }
    rows.push(measure(
        "pingora-proxy passthrough (the sidecar's path before issue 15)",
        pproxy,
        pproxy_proc.0.id(),
        request(Some(&seeded.valid_key)),
        &[200],
    ));
    let sid = sidecar_proc.0.id();
    rows.push(measure(
        "sidecar: valid API key",
        sidecar,
        sid,
        request(Some(&seeded.valid_key)),
        &[200],
    ));
    rows.push(measure(
        "sidecar: valid JWT",
        sidecar,
        sid,
        request(Some(&token)),
        &[200],
    ));
    rows.push(measure(
        "sidecar: invalid key (401)",
        sidecar,
        sid,
        request(Some(invalid.secret.expose())),
        &[401],
    ));
    rows.push(measure(
        "sidecar: over the limit (429)",
        sidecar,
        sid,
        request(Some(&seeded.limited_key)),
        // The per-minute window lets a request through now and then.
        &[429, 200],
    ));
    // A limiter on every request: counted here, then in Redis (one round trip each).
    let metered_local = rows.len();
    rows.push(measure(
        "sidecar: limited key, local limiter",
        sidecar,
        sid,
        request(Some(&seeded.metered_local_key)),
        &[200],
    ));
    let redis_cpu0 = redis_pid.map(cpu_ticks);
    let metered_redis = redis_pid.map(|_| {
        rows.push(measure(
            "sidecar: limited key, Redis limiter (cluster scope)",
            sidecar,
            sid,
            request(Some(&seeded.metered_cluster_key)),
            &[200],
        ));
        rows.len() - 1
    });
    let redis_cpu = redis_pid.zip(redis_cpu0).map(|(p, c0)| cpu_ticks(p) - c0);
    // The same baseline again, last: the spread between the two rows is this run's drift.
    rows.push(measure(
        "passthrough (again)",
        bare,
        bare_proc.0.id(),
        request(Some(&seeded.valid_key)),
        &[200],
    ));

    let bare_rps = rows[0].rps;
    let nginx_row = nginx.as_ref().map(|_| (rows[1].rps, rows[1].cpu_us));
    println!(
        "\nload: {conns} keep-alive connections, {secs} s per row, {workers} worker thread(s)/process(es) for every proxy, sidecar snapshot {n_keys} keys\n"
    );
    println!("| path | req/s | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/req | req/s × passthrough | req/s × nginx | CPU × nginx | statuses |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let (vs_nginx, cpu_vs_nginx) = match nginx_row {
            Some((rps, cpu)) => (format!("{:.2}", r.rps / rps), format!("{:.2}", r.cpu_us / cpu)),
            None => ("n/a (nginx not installed)".to_string(), "n/a".to_string()),
        };
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {} | {} | {} |",
            r.name,
            r.rps,
            r.p50,
            r.p99,
            r.p999,
            r.cpu_us,
            r.rps / bare_rps,
            vs_nginx,
            cpu_vs_nginx,
            r.statuses
        );
    }

    match metered_redis {
        Some(i) => {
            let (l, r) = (&rows[metered_local], &rows[i]);
            // Redis' own CPU over the Redis row (its warm-up included: an upper bound).
            let redis_us = redis_cpu.unwrap_or(0) as f64 / ticks * 1e6 / (r.rps * secs as f64).max(1.0);
            println!(
                "\nshared limiter (Redis at {redis}, same machine): added p50 {:+.3} ms, p99 {:+.3} ms, proxy CPU {:+.1} µs/req ({:.2}× the local limiter's), throughput {:.2}× ; Redis server CPU ≈ {:.1} µs/req",
                r.p50 - l.p50,
                r.p99 - l.p99,
                r.cpu_us - l.cpu_us,
                r.cpu_us / l.cpu_us,
                r.rps / l.rps,
                redis_us
            );
        }
        None => println!("\nshared limiter: no Redis at {redis} (PERMISO_LOAD_REDIS), rows skipped"),
    }

    // TLS: the same proxies behind TLS 1.3 (ECDSA P-256 certificate, both from one CA),
    // kept alive, then with a new connection and a full handshake (no resumption) per
    // request. Each row against nginx in the same mode.
    let stid = sidecar_tls_proc.0.id();
    let tls_ka_to = |a: SocketAddr| Target::Tls(a, tls_ka.clone());
    let tls_full_to = |a: SocketAddr| Target::Tls(a, tls_full.clone());
    let mut tls_rows: Vec<(Row, Option<usize>)> = Vec::new();
    let nginx_ka = nginx.as_ref().map(|(_, tls_port, p)| {
        tls_rows.push((
            measure_with(
                "nginx TLS proxy_pass, keep-alive",
                tls_ka_to(*tls_port),
                false,
                p.0.id(),
                request(Some(&seeded.valid_key)),
                &[200],
            ),
            None,
        ));
        tls_rows.len() - 1
    });
    tls_rows.push((
        measure_with(
            "sidecar TLS: valid API key, keep-alive",
            tls_ka_to(sidecar_tls),
            false,
            stid,
            request(Some(&seeded.valid_key)),
            &[200],
        ),
        nginx_ka,
    ));
    tls_rows.push((
        measure_with(
            "sidecar TLS: valid JWT, keep-alive",
            tls_ka_to(sidecar_tls),
            false,
            stid,
            request(Some(&token)),
            &[200],
        ),
        nginx_ka,
    ));
    let nginx_full = nginx.as_ref().map(|(_, tls_port, p)| {
        tls_rows.push((
            measure_with(
                "nginx TLS: full handshake per request",
                tls_full_to(*tls_port),
                true,
                p.0.id(),
                request_then_close(Some(&seeded.valid_key)),
                &[200],
            ),
            None,
        ));
        tls_rows.len() - 1
    });
    tls_rows.push((
        measure_with(
            "sidecar TLS: full handshake per request, valid key",
            tls_full_to(sidecar_tls),
            true,
            stid,
            request_then_close(Some(&seeded.valid_key)),
            &[200],
        ),
        nginx_full,
    ));
    let nginx_plain_new = nginx.as_ref().map(|(port, _, p)| {
        tls_rows.push((
            measure_with(
                "nginx plain: new connection per request",
                Target::Plain(*port),
                true,
                p.0.id(),
                request_then_close(Some(&seeded.valid_key)),
                &[200],
            ),
            None,
        ));
        tls_rows.len() - 1
    });
    tls_rows.push((
        measure_with(
            "sidecar plain: new connection per request, valid key",
            Target::Plain(sidecar),
            true,
            sid,
            request_then_close(Some(&seeded.valid_key)),
            &[200],
        ),
        nginx_plain_new,
    ));
    println!("\nTLS 1.3 (rustls in the sidecar, OpenSSL in nginx; the generator shares the 2 cores): {conns} connections, {secs} s per row\n");
    println!(
        "| path | req/s | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/req | × nginx, same mode | statuses |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (r, reference) in &tls_rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} |",
            r.name,
            r.rps,
            r.p50,
            r.p99,
            r.p999,
            r.cpu_us,
            match reference {
                Some(i) => format!(
                    "{:.2}× req/s, {:.2}× CPU",
                    r.rps / tls_rows[*i].0.rps,
                    r.cpu_us / tls_rows[*i].0.cpu_us
                ),
                None if nginx.is_none() => "n/a (nginx not installed)".into(),
                None => "1.00 (reference)".into(),
            },
            r.statuses
        );
    }
    drop(sidecar_tls_proc);

    // Revocation under load: the sidecar serves the valid-key load while keys are revoked.
    let load_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (flag, key_for_load) = (load_stop.clone(), seeded.valid_key.clone());
    let background = std::thread::spawn(move || {
        let mut total = 0usize;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            total += run_load(
                Target::Plain(sidecar),
                request(Some(&key_for_load)),
                conns,
                Duration::from_secs(1),
                false,
            )
            .latencies_us
            .len();
        }
        total
    });
    // Let the background load reach steady state before the first revocation.
    std::thread::sleep(Duration::from_secs(1));
    let mut samples = Vec::new();
    for i in 0..revocations {
        let r: Value = http
            .post(format!("http://{admin}/auth/admin/services"))
            .header("X-Admin-Api-Key", ADMIN_KEY)
            .json(&json!({"service_name": format!("revokee-{i}"), "scopes": ["trade:read"]}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let (k, sid_, kid) = (
            r["api_key"].as_str().unwrap(),
            r["service_id"].as_str().unwrap(),
            r["key_id"].as_str().unwrap(),
        );
        let ok = |status: u16| {
            http.get(format!("http://{sidecar}/api/v1/trades"))
                .bearer_auth(k)
                .send()
                .is_ok_and(|r| r.status() == status)
        };
        wait_until("new key at the sidecar", || ok(200));
        let t = Instant::now();
        let resp = http
            .post(format!(
                "http://{admin}/auth/admin/services/{sid_}/keys/{kid}/revoke"
            ))
            .header("X-Admin-Api-Key", ADMIN_KEY)
            .send()
            .unwrap();
        assert!(resp.status().is_success());
        while !ok(401) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the revocation never reached the sidecar"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        samples.push(t.elapsed());
    }
    load_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = background.join().unwrap();
    samples.sort();
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "\nrevocation → first 401 at the sidecar under load ({revocations} revocations, {served} requests served meanwhile): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p(0.5),
        p(0.99),
        p(1.0)
    );
}

fn which_nginx() -> Option<String> {
    which(&["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"])
}

fn which(candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| p.to_string())
}

/// The pid of the Redis server at `addr` (INFO server), when one answers there.
fn redis_pid(addr: &str) -> Option<u32> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"INFO server\r\n").ok()?;
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}
