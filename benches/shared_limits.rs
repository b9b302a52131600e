//! Accuracy of cluster-wide rate limits: `cargo bench --bench shared_limits`. Needs Redis on
//! 127.0.0.1:6379 (or PERMISO_BENCH_REDIS).
//!
//! Starts an admin plane and three `permiso sidecar` processes sharing one Redis, and three
//! caller services, each with a cluster limit of N per minute. Each caller sends at a steady
//! rate (0.9×, 1× and 10× its limit), round robin over the three sidecars, for one window or
//! more. Reported per caller: admitted ÷ N in each 60 s window, and admitted ÷ what ONE
//! limiter with the same limit admits for the same send times (a local `LimiterState` fed the
//! recorded times): 1.00 means the three sidecars together behave as one limiter.
//!
//! Knobs: PERMISO_ACCURACY_LIMIT (N, default 300), PERMISO_ACCURACY_SECS (default 60).

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use permiso::core::ratelimit::{LimiterState, Limits};
use serde_json::{json, Value};

mod support;
use support::*;

fn main() {
    let (redis, redis_addr) = redis_from_env("PERMISO_BENCH_REDIS");
    if std::net::TcpStream::connect(&redis_addr).is_err() {
        eprintln!(
            "shared_limits bench: no Redis at {redis}; start one (redis-server) or set PERMISO_BENCH_REDIS"
        );
        return;
    }
    let n = env_or("PERMISO_ACCURACY_LIMIT", 300) as u32;
    let secs = env_or("PERMISO_ACCURACY_SECS", 60);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let http = reqwest::blocking::Client::new();

    let admin = free_port();
    let _admin = spawn(
        d,
        "admin",
        env!("CARGO_BIN_EXE_permiso"),
        &[
            "admin",
            "--listen",
            &admin.to_string(),
            "--database",
            &d.join("p.db").display().to_string(),
        ],
    );
    wait_until("admin plane", || {
        http.get(format!("http://{admin}/healthz")).send().is_ok()
    });
    let create = |body: Value| -> Value {
        http.post(format!("http://{admin}/auth/admin/services"))
            .header("X-Admin-Api-Key", ADMIN_KEY)
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let key = |v: &Value| v["api_key"].as_str().unwrap().to_string();
    let sync = key(&create(json!({"service_name": "sync", "scopes": ["sync:read"]})));
    let factors = [0.9, 1.0, 10.0];
    let callers: Vec<String> = factors
        .iter()
        .map(|f| {
            key(&create(json!({
                "service_name": format!("caller-{f}"), "scopes": ["trade:read"],
                "rate_limit_per_minute": n, "rate_limit_scope": "cluster"
            })))
        })
        .collect();
    let probe = key(&create(
        json!({"service_name": "probe", "scopes": ["trade:read"]}),
    ));
    std::fs::write(d.join("sync.key"), &sync).unwrap();

    let upstream = start_upstream();
    let prefix = format!(
        "permiso-accuracy:{}:",
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
    );
    let sidecars: Vec<(SocketAddr, Proc)> = (0..3)
        .map(|i| {
            let listen = free_port();
            let cfg = d.join(format!("sidecar-{i}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "[sidecar]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\nsnapshot_file = \"{}\"\nthreads = 1\n\
                     [sidecar.sync]\nadmin_url = \"http://{admin}\"\ncredential_file = \"{}\"\n\
                     [sidecar.rate_limit]\nbackend = \"redis\"\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\"\nreplicas = 3\n\
                     [[sidecar.routes]]\nprefix = \"/api\"\nscopes = [\"trade:read\"]\n",
                    d.join(format!("snapshot-{i}.json")).display(),
                    d.join("sync.key").display()
                ),
            )
            .unwrap();
            let p = spawn(d, &format!("sidecar-{i}"), env!("CARGO_BIN_EXE_permiso"), &["sidecar", "--config", &cfg.display().to_string()]);
            (listen, p)
        })
        .collect();
    for (addr, _) in &sidecars {
        wait_until("sidecar synced", || {
            http.get(format!("http://{addr}/api/x"))
                .bearer_auth(&probe)
                .send()
                .is_ok_and(|r| r.status() == 200)
        });
    }
    let addrs: Vec<SocketAddr> = sidecars.iter().map(|(a, _)| *a).collect();

    eprintln!("three sidecars, cluster limit {n}/min per caller, {secs} s at 0.9x, 1x and 10x ...");
    let results: Vec<(f64, Vec<(Duration, u16)>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = factors
            .iter()
            .zip(&callers)
            .map(|(f, caller)| {
                let addrs = &addrs;
                sc.spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    let per_sec = f * n as f64 / 60.0;
                    let gap = Duration::from_secs_f64(1.0 / per_sec);
                    let start = Instant::now();
                    let mut sent = Vec::new();
                    let mut i = 0u32;
                    loop {
                        // Open loop: each request at its scheduled time, not after the last answer.
                        let due = gap * i;
                        if due >= Duration::from_secs(secs) {
                            break;
                        }
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                        let at = start.elapsed();
                        let status = client
                            .get(format!("http://{}/api/x", addrs[i as usize % 3]))
                            .bearer_auth(caller)
                            .send()
                            .map(|r| r.status().as_u16())
                            .unwrap_or(0);
                        sent.push((at, status));
                        i += 1;
                    }
                    (*f, sent)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    println!("\nshared limits: 3 sidecars, one Redis, cluster limit {n}/min per caller, {secs} s, send rate as a multiple of the limit\n");
    println!("| rate | sent | admitted | admitted ÷ N per 60 s window | admitted ÷ one limiter's admissions | other statuses |");
    println!("|---|---|---|---|---|---|");
    for (f, sent) in &results {
        let admitted = sent.iter().filter(|(_, s)| *s == 200).count();
        let other: Vec<u16> = sent
            .iter()
            .map(|(_, s)| *s)
            .filter(|s| *s != 200 && *s != 429)
            .collect();
        // One limiter, same limit, same send times (offset onto a plausible clock).
        let one = LimiterState::default();
        let limits = Limits {
            per_minute: Some(n),
            per_hour: None,
        };
        let t0 = 1_700_000_000_000_000_000u64;
        let reference = sent
            .iter()
            .filter(|(at, _)| one.check(&limits, t0 + at.as_nanos() as u64).is_ok())
            .count();
        let windows: Vec<String> = (0..secs.div_ceil(60))
            .map(|w| {
                let lo = Duration::from_secs(w * 60);
                let hi = lo + Duration::from_secs(60);
                let a = sent
                    .iter()
                    .filter(|(at, s)| *s == 200 && *at >= lo && *at < hi)
                    .count();
                format!("{:.2}", a as f64 / n as f64)
            })
            .collect();
        println!(
            "| {f}× | {} | {admitted} | {} | {:.3} | {} |",
            sent.len(),
            windows.join(", "),
            admitted as f64 / reference.max(1) as f64,
            if other.is_empty() {
                "none".to_string()
            } else {
                format!("{other:?}")
            }
        );
    }
    println!(
        "\nGCRA lets a full quota burst: from idle, a window can admit up to 2N (the burst, then the refill); the local limiter does the same, so the exactness measure is the last column."
    );
}
