//! Many sidecars on one admin plane: what long-polling costs the admin plane with a simulated
//! fleet of sync clients (`cargo bench --bench fleet`; PERMISO_FLEET=1000 clients by default).
//!
//! The admin plane runs as its own process (so its CPU and memory are its own). Each simulated
//! sidecar does what `sidecar::sync_client` does: a full sync, then `GET /v1/sync?after=…&
//! wait=25` in a loop on its own connection. Measured: admin memory and CPU with the whole
//! fleet parked in long polls, and how long one change takes to reach every client.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ADMIN_KEY: &str = "fleet-bench-admin-key-0123456789";

struct Proc(Child);

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
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let log = std::fs::File::create(dir.path().join("admin.log")).unwrap();
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
    let admin = Proc(
        Command::new(env!("CARGO_BIN_EXE_permiso"))
            .args([
                "admin",
                "--config",
                &config.display().to_string(),
                "--listen",
                &addr.to_string(),
                "--database",
                &dir.path().join("p.db").display().to_string(),
            ])
            .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let pid = admin.0.id();
    let base = format!("http://{addr}");
    let blocking = reqwest::blocking::Client::new();
    let started = Instant::now();
    while blocking.get(format!("{base}/healthz")).send().is_err() {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
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
    for i in 0..100 {
        create(format!("svc-{i}"), json!(["trade:read"]));
    }
    let rss_before = rss_mb(pid);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Each client records the version it has; the bench watches them converge.
    let versions: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    for i in 0..clients {
        let (versions, base, key) = (versions.clone(), base.clone(), sync_key.clone());
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
                let Ok(r) = http.get(url).bearer_auth(&key).send().await else {
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
    let c0 = proc_cpu_ticks(pid);
    std::thread::sleep(idle_window);
    let idle_cpu = (proc_cpu_ticks(pid) - c0) as f64 / 100.0 / idle_window.as_secs_f64() * 100.0;
    let rss_parked = rss_mb(pid);

    let mut fanout = Vec::new();
    let mut cpu_per_change = Vec::new();
    for i in 0..changes {
        let c0 = proc_cpu_ticks(pid);
        let t = Instant::now();
        let v = create(format!("change-{i}"), json!(["trade:read"]))["service_id"].clone();
        assert!(v.is_string());
        let target = {
            let r: Value = blocking
                .get(format!("{base}/v1/sync"))
                .bearer_auth(&sync_key)
                .send()
                .unwrap()
                .json()
                .unwrap();
            r["version"].as_u64().unwrap()
        };
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
        std::thread::sleep(Duration::from_millis(300));
        cpu_per_change.push((proc_cpu_ticks(pid) - c0) as f64 * 10.0);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let avg = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    println!("\nfleet: {clients} simulated sidecars long-polling one admin plane (1 worker thread for the fleet)\n");
    println!("| measure | value |");
    println!("|---|---|");
    println!("| initial full sync of the whole fleet | {:.0} ms |", ms(initial));
    println!(
        "| admin RSS before the fleet / with the fleet parked | {rss_before:.1} MB / {rss_parked:.1} MB |"
    );
    println!("| admin CPU with the fleet parked in long polls | {idle_cpu:.2} % of one core |");
    println!(
        "| one change → all {clients} clients have it: p50 client / p99 client / last client (median of {changes} changes) | {:.1} / {:.1} / {:.1} ms |",
        ms(median(fanout.iter().map(|f| f.0).collect())),
        ms(median(fanout.iter().map(|f| f.1).collect())),
        ms(median(fanout.iter().map(|f| f.2).collect()))
    );
    println!(
        "| admin CPU per change fanned out to the fleet | {:.0} ms |",
        avg(&cpu_per_change)
    );
    drop(rt);
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}
