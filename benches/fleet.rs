//! Many sidecars on the admin plane: what long-polling costs it with a simulated fleet of sync
//! clients, and its write throughput (`cargo bench --bench fleet`; PERMISO_FLEET=1000 clients
//! by default).
//!
//! PERMISO_FLEET_BACKEND=postgres runs two admin replicas on one PostgreSQL database
//! (PERMISO_TEST_POSTGRES, default postgres://postgres@127.0.0.1:5432; the bench makes and
//! migrates database permiso_fleet_bench), half the fleet polling each, every change made
//! through replica A: a change reaches the other half only through the NOTIFY wake-up.
//!
//! Each admin plane runs as its own process (so its CPU and memory are its own; PostgreSQL's
//! CPU is not counted). Each simulated sidecar does what `sidecar::sync_client` does: a full
//! sync, then `GET /v1/sync?after=…&wait=25` in a loop on its own connection. Measured: write
//! throughput (creates, then rotations, from 8 concurrent clients), admin memory and CPU with
//! the whole fleet parked in long polls, and how long one change takes to reach every client.
//! Each client identifies itself as a sidecar does (`Permiso-Sidecar`, recorded by the admin
//! plane for the fleet view); PERMISO_FLEET_REPORT=0 leaves the header out, for comparison.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ADMIN_KEY: &str = "fleet-bench-admin-key-0123456789";

struct Proc(Child);

/// The PostgreSQL database of a `postgres` run, made fresh and migrated.
fn fresh_postgres() -> String {
    let server = std::env::var("PERMISO_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL (PERMISO_TEST_POSTGRES)");
        tokio::spawn(conn);
        c.batch_execute("DROP DATABASE IF EXISTS permiso_fleet_bench WITH (FORCE)")
            .await
            .unwrap();
        c.batch_execute("CREATE DATABASE permiso_fleet_bench")
            .await
            .unwrap();
    });
    let url = format!("{server}/permiso_fleet_bench");
    let out = Command::new(env!("CARGO_BIN_EXE_permiso"))
        .args(["migrate", "--database", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    url
}

/// Creates (`rotate` false) or rotations of `services` (true) from `clients` concurrent
/// clients for `dur`, spread over `bases`; returns the acknowledged count per second.
fn write_rate(bases: &[String], services: &[String], rotate: bool, clients: usize, dur: Duration) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + dur;
    rt.block_on(async {
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let (base, done) = (bases[c % bases.len()].clone(), done.clone());
                let services = services.to_vec();
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    let mut i = 0usize;
                    while Instant::now() < deadline {
                        let rb = if rotate {
                            let id = &services[(c + i * clients) % services.len()];
                            http.post(format!("{base}/auth/admin/services/{id}/rotate"))
                                .json(&json!({"grace_seconds": 0}))
                        } else {
                            http.post(format!("{base}/auth/admin/services")).json(
                                &json!({"service_name": format!("w-{c}-{i}"), "scopes": ["trade:read"]}),
                            )
                        };
                        let r = rb.header("X-Admin-Api-Key", ADMIN_KEY).send().await.unwrap();
                        assert!(r.status().is_success(), "{}", r.status());
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    done.load(Ordering::Relaxed) as f64 / dur.as_secs_f64()
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn main() {
    let clients: usize = std::env::var("PERMISO_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let changes = 10;
    let postgres = std::env::var("PERMISO_FLEET_BACKEND").is_ok_and(|b| b == "postgres");
    let dir = tempfile::tempdir().unwrap();
    // Every simulated sidecar shares one sync key: allow them all a long poll at once.
    let config = dir.path().join("admin.toml");
    std::fs::write(
        &config,
        format!(
            "[admin_plane]\nsync_max_concurrent_per_credential = {}\n",
            clients * 2
        ),
    )
    .unwrap();
    let database = if postgres {
        fresh_postgres()
    } else {
        dir.path().join("p.db").display().to_string()
    };
    let replicas = if postgres { 2 } else { 1 };
    let admins: Vec<(Proc, String)> = (0..replicas)
        .map(|r| {
            let addr: SocketAddr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            let log = std::fs::File::create(dir.path().join(format!("admin-{r}.log"))).unwrap();
            let p = Proc(
                Command::new(env!("CARGO_BIN_EXE_permiso"))
                    .args([
                        "admin",
                        "--config",
                        &config.display().to_string(),
                        "--listen",
                        &addr.to_string(),
                        "--database",
                        &database,
                    ])
                    .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
                    .env(
                        "PERMISO_SIGNING_KEK",
                        "ZmxlZXQtYmVuY2gta2VrLTMyLWJ5dGVzLWxvbmctISE",
                    )
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::from(log.try_clone().unwrap()))
                    .stderr(Stdio::from(log))
                    .spawn()
                    .unwrap(),
            );
            (p, format!("http://{addr}"))
        })
        .collect();
    let pids: Vec<u32> = admins.iter().map(|(p, _)| p.0.id()).collect();
    let bases: Vec<String> = admins.iter().map(|(_, b)| b.clone()).collect();
    let cpu = || pids.iter().map(|p| proc_cpu_ticks(*p)).sum::<u64>();
    let rss = || pids.iter().map(|p| rss_mb(*p)).sum::<f64>();
    let base = bases[0].clone();
    let blocking = reqwest::blocking::Client::new();
    let started = Instant::now();
    for b in &bases {
        while blocking.get(format!("{b}/healthz")).send().is_err() {
            assert!(started.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let create = |name: String, scopes: Value| -> Value {
        blocking
            .post(format!("{base}/auth/admin/services"))
            .header("X-Admin-Api-Key", ADMIN_KEY)
            .json(&json!({"service_name": name, "scopes": scopes}))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let sync_key = create("fleet-sync".into(), json!(["sync:read"]))["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(
            create(format!("svc-{i}"), json!(["trade:read"]))["service_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let rss_before = rss();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Each client records the version it has; the bench watches them converge.
    let versions: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    let report = std::env::var("PERMISO_FLEET_REPORT").map_or(true, |v| v != "0");
    for i in 0..clients {
        // What `sidecar::fleet_report` sends for the demo's routes.
        let header = report.then(|| {
            json!({
                "instance_id": format!("sc_bench_{i:06}"),
                "build": "bench",
                "environment": "live",
                "upstream": "127.0.0.1:8001",
                "mode": "enforce",
                "routes": [
                    {"prefix": "/api/v1/trades", "methods": ["GET"], "scopes": ["trade:read", "account:read"]},
                    {"prefix": "/api/v1/trades", "methods": ["POST"], "scopes": ["trade:open"]},
                    {"prefix": "/api/v1/account", "methods": ["GET"], "scopes": ["account:read"]},
                    {"prefix": "/api/v1/market", "scopes": ["market:data"]},
                ],
            })
            .to_string()
        });
        let (versions, base, key) = (versions.clone(), bases[i % bases.len()].clone(), sync_key.clone());
        rt.spawn(async move {
            // One connection per client, as separate sidecars would have.
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let (mut after, mut epoch) = (None::<u64>, String::new());
            loop {
                let url = match after {
                    Some(a) => format!("{base}/v1/sync?after={a}&epoch={epoch}&wait=25"),
                    None => format!("{base}/v1/sync"),
                };
                let mut req = http.get(url).bearer_auth(&key);
                if let Some(h) = &header {
                    req = req.header("permiso-sidecar", h);
                }
                let Ok(r) = req.send().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(v) = r.json::<Value>().await else { continue };
                let version = v["version"].as_u64().unwrap_or(0);
                epoch = v["epoch"].as_str().unwrap_or("").to_string();
                after = Some(version);
                versions[i].store(version, Ordering::Relaxed);
            }
        });
    }
    // Wait for the whole fleet to hold a snapshot and park in its long poll.
    let started = Instant::now();
    while versions.iter().any(|v| v.load(Ordering::Relaxed) == 0) {
        assert!(started.elapsed() < Duration::from_secs(120), "fleet never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
    let initial = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));

    let idle_window = Duration::from_secs(10);
    let c0 = cpu();
    std::thread::sleep(idle_window);
    let idle_cpu = (cpu() - c0) as f64 / 100.0 / idle_window.as_secs_f64() * 100.0;
    let rss_parked = rss();

    let mut target: u64 = {
        let r: Value = blocking
            .get(format!("{base}/v1/sync"))
            .bearer_auth(&sync_key)
            .send()
            .unwrap()
            .json()
            .unwrap();
        r["version"].as_u64().unwrap()
    };
    let mut fanout = Vec::new();
    let mut confirmed = Vec::new();
    let mut cpu_per_change = Vec::new();
    for i in 0..changes {
        let c0 = cpu();
        let t = Instant::now();
        let v = create(format!("change-{i}"), json!(["trade:read"]))["service_id"].clone();
        assert!(v.is_string());
        // Nothing else writes: each create is the next version. (Asking the admin plane for
        // it here would queue behind the fleet's own requests and time that queue instead.)
        target += 1;
        let mut reached = vec![Duration::ZERO; clients];
        let mut left = clients;
        while left > 0 {
            for (j, v) in versions.iter().enumerate() {
                if reached[j].is_zero() && v.load(Ordering::Relaxed) >= target {
                    reached[j] = t.elapsed();
                    left -= 1;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "change never reached {left} clients"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        reached.sort();
        fanout.push((
            reached[clients / 2],
            reached[clients * 99 / 100],
            reached[clients - 1],
        ));
        // The admin plane (replica A) confirms every client holds it: what `--wait-applied`
        // waits for. Clients report the version they hold on their next poll.
        if report {
            loop {
                let p: Value = blocking
                    .get(format!("{base}/auth/admin/changes/{target}"))
                    .header("X-Admin-Api-Key", ADMIN_KEY)
                    .send()
                    .unwrap()
                    .json()
                    .unwrap();
                if p["complete"] == true && p["applied"].as_array().map_or(0, |a| a.len()) == clients {
                    confirmed.push(t.elapsed());
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "never confirmed: {}",
                    p["summary"]
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        cpu_per_change.push((cpu() - c0) as f64 * 10.0);
    }
    // The fleet stops; then write throughput, through every replica at once (a fleet parked
    // on a database of thousands of services would measure the fan-out instead).
    drop(rt);
    let window = Duration::from_secs(5);
    let c0 = cpu();
    let creates = write_rate(&bases, &ids, false, 8, window);
    let create_cpu = (cpu() - c0) as f64 * 10_000.0 / (creates * window.as_secs_f64());
    let c0 = cpu();
    let rotations = write_rate(&bases, &ids, true, 8, window);
    let rotate_cpu = (cpu() - c0) as f64 * 10_000.0 / (rotations * window.as_secs_f64());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let avg = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let what = if postgres {
        "two admin replicas on PostgreSQL, half the fleet on each, changes through replica A"
    } else {
        "one admin plane on SQLite"
    };
    println!("\nfleet: {clients} simulated sidecars long-polling {what} (1 worker thread for the fleet)\n");
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| admin writes, 8 concurrent clients: creates / rotations per second | {creates:.0} / {rotations:.0} |"
    );
    println!(
        "| admin CPU per create / per rotation (all replicas; not the database's) | {create_cpu:.0} / {rotate_cpu:.0} µs |"
    );
    println!("| initial full sync of the whole fleet | {:.0} ms |", ms(initial));
    println!(
        "| admin RSS (all replicas) before the fleet / with the fleet parked | {rss_before:.1} MB / {rss_parked:.1} MB |"
    );
    println!("| admin CPU with the fleet parked in long polls | {idle_cpu:.2} % of one core |");
    println!(
        "| one change → all {clients} clients have it: p50 client / p99 client / last client (median of {changes} changes) | {:.1} / {:.1} / {:.1} ms |",
        ms(median(fanout.iter().map(|f| f.0).collect())),
        ms(median(fanout.iter().map(|f| f.1).collect())),
        ms(median(fanout.iter().map(|f| f.2).collect()))
    );
    if report {
        println!(
            "| one change → GET /auth/admin/changes/{{v}} on replica A says applied by all {clients} (median of {changes}) | {:.1} ms |",
            ms(median(confirmed.clone()))
        );
    }
    println!(
        "| admin CPU (all replicas) per change fanned out to the fleet{} | {:.0} ms |",
        if report { ", reports recorded" } else { "" },
        avg(&cpu_per_change)
    );
    println!(
        "\n(clients {} the Permiso-Sidecar report)",
        if report { "send" } else { "do not send" }
    );
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}
