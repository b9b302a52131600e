//! Cluster-wide rate limits on a real Redis (issue 14): the shared vectors and random request
//! sequences judged alike by the local limiter and the Lua script; three sidecars sharing one
//! cluster limit under a burst; a private Redis stopped (SIGSTOP) and killed under sidecars in
//! each `on_redis_error` mode, and limits shared again once it is back; the admin API's
//! `rate_limit_scope`.
//!
//! The shared Redis is 127.0.0.1:6379 (or PERMISO_TEST_REDIS); each test uses its own key
//! prefix. The outage tests run a redis-server of their own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use permiso::config::file::OnRedisError;
use permiso::config::ratelimit::RedisLimit;
use permiso::core::clock::SharedClock;
use permiso::core::limiter::{vectors, Refused};
use permiso::core::ratelimit::{LimiterState, Limits};
use permiso::sidecar::ratelimit::RedisLimiter;
use permiso::sidecar::{self, SidecarHandle};
use rand::{Rng, SeedableRng};
use reqwest::blocking::Client;
use serde_json::{json, Value};

use crate::common::{free_port, header, scrape, wait_ready, Harness, Proc, ROUTES};

fn shared_redis() -> String {
    std::env::var("PERMISO_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix of this test's own, so tests share one Redis in parallel.
fn prefix(test: &str) -> String {
    format!("permiso-test:{test}:{:016x}:", rand::random::<u64>())
}

fn limiter(url: &str, prefix: &str) -> RedisLimiter {
    limiter_with(url, prefix, false, None)
}

/// A limiter called directly (no sidecar): `cluster` for a Redis Cluster node, `password` as
/// PERMISO_REDIS_PASSWORD would give it.
fn limiter_with(url: &str, prefix: &str, cluster: bool, password: Option<&str>) -> RedisLimiter {
    RedisLimiter::new(
        &RedisLimit {
            url: url.into(),
            cluster,
            key_prefix: prefix.into(),
            // Generous: these calls judge answers, not speed, on a busy 2-core machine.
            timeout: Duration::from_secs(2),
            on_error: OnRedisError::Closed,
            breaker_failures: 1,
            breaker_cooldown: Duration::from_secs(1),
        },
        password.map(str::to_string),
    )
    .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_redis_script_answers_every_shared_vector_like_the_local_limiter() {
    let v = vectors::load();
    let redis = limiter(&shared_redis(), &prefix("vectors"));
    rt().block_on(async {
        for (n, case) in v.cases.iter().enumerate() {
            let service = format!("srv_case{n}");
            for (i, step) in case.steps.iter().enumerate() {
                let got = redis
                    .count(&service, case.limits(), Some(v.t0_us + step.at_us))
                    .await
                    .unwrap()
                    .outcome;
                assert_eq!(
                    vectors::observed(step.at_us, &got),
                    *step,
                    "{}: step {i}",
                    case.name
                );
            }
        }
    });
}

/// Differential: random limits and random request times (bursts, pauses, whole windows),
/// each request judged by a fresh local limiter and by the script; every answer and header
/// must agree.
#[test]
fn random_sequences_get_the_same_answers_locally_and_in_redis() {
    let redis = limiter(&shared_redis(), &prefix("differential"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let t0: u64 = 1_700_000_000_000_000;
    let mut compared = 0;
    rt().block_on(async {
        for seq in 0..40 {
            let quota = |rng: &mut rand::rngs::StdRng| match rng.random_range(0..5) {
                0 => None,
                1 => Some(rng.random_range(1..5)),
                2 => Some(rng.random_range(5..200)),
                3 => Some(rng.random_range(200..2_000_000)),
                // Beyond what the admin API accepts: a payload can still carry it.
                _ => Some(rng.random_range(2_000_000..=u32::MAX)),
            };
            let mut limits = Limits {
                per_minute: quota(&mut rng),
                per_hour: quota(&mut rng),
            };
            if limits.is_unlimited() {
                limits.per_minute = Some(7);
            }
            let local = LimiterState::default();
            let mut at = 0u64;
            for step in 0..60 {
                at += match rng.random_range(0..10) {
                    0..=4 => 0,
                    5..=7 => rng.random_range(1..2_000_000),
                    8 => rng.random_range(1..120_000_000),
                    _ => rng.random_range(1..4_000_000_000),
                };
                let mine = local.check(&limits, (t0 + at) * 1_000).map_err(Refused::Exceeded);
                let theirs = redis
                    .count(&format!("srv_{seq}"), limits, Some(t0 + at))
                    .await
                    .unwrap()
                    .outcome;
                assert_eq!(
                    vectors::observed(at, &theirs),
                    vectors::observed(at, &mine),
                    "sequence {seq} ({limits:?}), step {step}"
                );
                compared += 1;
            }
        }
    });
    assert_eq!(compared, 40 * 60);
}

/// A sidecar in front of the harness's upstream with `[sidecar.rate_limit]` set to `table`.
fn start_sidecar(h: &Harness, name: &str, table: &str) -> SidecarHandle {
    let listen = free_port();
    let routes = format!("{ROUTES}\n[sidecar.rate_limit]\n{table}\n");
    let cfg = h.sidecar_config_at(
        listen,
        h.admin_addr,
        &h.dir.path().join(format!("{name}.snapshot.json")),
        5,
        &routes,
    );
    let clock: SharedClock = Arc::new(h.clock.clone());
    let s = sidecar::start(cfg, clock).expect("sidecar starts");
    wait_ready(&h.http, s.health_addr.unwrap());
    s
}

fn get(http: &Client, side: SocketAddr, key: &str) -> reqwest::blocking::Response {
    http.get(format!("http://{side}/api/v1/trades"))
        .bearer_auth(key)
        .send()
        .unwrap()
}

/// Waits until every sidecar knows `probe`'s key, created after the services under test:
/// they then know those too, and no limited request was spent finding out.
fn wait_all_synced(h: &Harness, sides: &[&SidecarHandle], probe: &str) {
    let started = Instant::now();
    for s in sides {
        while get(&h.http, s.addr, probe).status() != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a sidecar never synced"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A series the sidecar must expose (absent is a failure, not 0).
fn metric(h: &Harness, s: &SidecarHandle, series: &str) -> u64 {
    scrape(
        &h.http,
        &format!("http://{}/metrics", s.health_addr.unwrap()),
        series,
    )
    .unwrap_or_else(|| panic!("{series} is not exposed"))
}

/// Status, RateLimit, RateLimit-Policy, Retry-After, body.
type Answer = (u16, Option<String>, Option<String>, Option<String>, Value);

#[test]
fn three_sidecars_share_one_cluster_limit_under_a_burst() {
    let h = Harness::start();
    let table = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"{}\"\nreplicas = 3\ntimeout_ms = 1000",
        shared_redis(),
        prefix("burst")
    );
    let sides: Vec<SidecarHandle> = (0..3)
        .map(|i| start_sidecar(&h, &format!("s{i}"), &table))
        .collect();
    // 30 an hour: one request every 120 s, so the burst below meets exactly 30.
    let limited = h.create(json!({
        "service_name": "burst-caller", "scopes": ["trade:read"],
        "rate_limit_per_minute": 1000, "rate_limit_per_hour": 30, "rate_limit_scope": "cluster"
    }));
    let probe = h.create(json!({"service_name": "probe", "scopes": ["trade:read"]}));
    wait_all_synced(&h, &sides.iter().collect::<Vec<_>>(), &probe.api_key);

    // Six callers, 25 requests each, spread over the three sidecars: 150 for a limit of 30.
    let addrs: Vec<SocketAddr> = sides.iter().map(|s| s.addr).collect();
    let answers: Vec<Answer> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..6)
            .map(|w| {
                let addrs = &addrs;
                let key = &limited.api_key;
                sc.spawn(move || {
                    let http = Client::new();
                    (0..25)
                        .map(|i| {
                            let r = get(&http, addrs[(w + i) % 3], key);
                            let hv = |n: &str| header(&r, n).map(str::to_string);
                            let (rl, policy, retry) =
                                (hv("ratelimit"), hv("ratelimit-policy"), hv("retry-after"));
                            let status = r.status().as_u16();
                            let body = r.json().unwrap_or(Value::Null);
                            (status, rl, policy, retry, body)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let policy = "\"minute\";q=1000;w=60, \"hour\";q=30;w=3600";
    let mut remaining: Vec<u64> = vec![];
    let mut refused = 0;
    for (status, rl, pol, retry, body) in &answers {
        assert_eq!(pol.as_deref(), Some(policy), "status {status}");
        match status {
            200 => {
                let rl = rl.as_deref().unwrap();
                let r = rl
                    .strip_prefix("\"hour\";r=")
                    .and_then(|x| x.split(';').next())
                    .unwrap_or_else(|| panic!("tightest window is the hour: {rl}"));
                remaining.push(r.parse().unwrap());
                assert!(retry.is_none());
            }
            429 => {
                refused += 1;
                let secs: u64 = retry.as_deref().unwrap().parse().unwrap();
                assert!((1..=120).contains(&secs), "Retry-After {secs}");
                assert_eq!(rl.as_deref(), Some(format!("\"hour\";r=0;t={secs}").as_str()));
                assert_eq!(body["error"], "rate_limited");
            }
            s => panic!("unexpected status {s}: {body}"),
        }
    }
    remaining.sort_unstable();
    // Exactly the limit was admitted across the three sidecars, and each admission saw its own
    // place in the one shared count (29 left, 28, ... 0): no sidecar counted alone.
    assert_eq!(
        remaining,
        (0..30).collect::<Vec<u64>>(),
        "admitted {}",
        remaining.len()
    );
    assert_eq!(refused, 150 - 30);
    let answered: u64 = sides
        .iter()
        .map(|s| metric(&h, s, "permiso_ratelimit_redis_calls_total{result=\"answered\"}"))
        .sum();
    let cached: u64 = sides
        .iter()
        .map(|s| metric(&h, s, "permiso_ratelimit_cached_refusals_total"))
        .sum();
    // Each request asked Redis once, or repeated a refusal Redis had given that sidecar (a
    // refused caller hammering on costs no round trip): the 30 admissions all asked.
    assert_eq!(answered + cached, 150, "answered {answered}, cached {cached}");
    assert!(
        answered >= 30 && cached > 0,
        "answered {answered}, cached {cached}"
    );
    for s in &sides {
        assert_eq!(
            metric(&h, s, "permiso_ratelimit_fallback_total{mode=\"local\"}"),
            0
        );
    }
    // A sidecar-scope caller on the same sidecars is still counted by each alone.
    let local = h.create(json!({
        "service_name": "local-caller", "scopes": ["trade:read"], "rate_limit_per_hour": 2
    }));
    wait_all_synced(&h, &sides.iter().collect::<Vec<_>>(), &local.api_key);
    for s in &sides {
        assert_eq!(
            get(&h.http, s.addr, &local.api_key).status(),
            200,
            "its second of two here"
        );
        assert_eq!(get(&h.http, s.addr, &local.api_key).status(), 429);
    }
}

/// A redis-server of this test's own, on a free port, keeping nothing on disk.
struct PrivateRedis {
    port: u16,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> PrivateRedis {
        let mut r = PrivateRedis {
            port: free_port().port(),
            proc: None,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.launch();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("redis-server (Debian: apt-get install redis-server; .ci/run installs it)");
        let child = Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "no",
                "--dir",
                &self.dir.path().display().to_string(),
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
        let started = Instant::now();
        while !self.answers() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server never answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut buf).is_ok()
            // A server with a password answers -NOAUTH; only then is that "up".
            && (&buf == b"+PONG\r\n" || (self.extra.iter().any(|a| a == "--requirepass") && buf[0] == b'-'))
    }

    fn signal(&self, sig: &str) {
        crate::common::signal(self.proc.as_ref().unwrap(), sig);
    }

    fn kill(&mut self) {
        self.proc.take();
    }
}

fn status_and_headers(
    http: &Client,
    side: SocketAddr,
    key: &str,
) -> (u16, Option<String>, Option<String>, Value) {
    let started = Instant::now();
    let r = get(http, side, key);
    // Bounded by the time budget (200 ms here), not the client's 10 s: a hung Redis must not
    // hang the caller. A functional bound, not a speed figure.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let policy = header(&r, "ratelimit-policy").map(str::to_string);
    let rl = header(&r, "ratelimit").map(str::to_string);
    (r.status().as_u16(), policy, rl, r.json().unwrap_or(Value::Null))
}

#[test]
fn redis_stopped_or_killed_applies_each_fallback_and_sharing_resumes() {
    let mut redis = PrivateRedis::start();
    let h = Harness::start();
    let table = |mode: &str| {
        let replicas = if mode == "local" { "replicas = 3\n" } else { "" };
        format!(
            "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"outage:\"\n{replicas}on_redis_error = \"{mode}\"\ntimeout_ms = 200\nbreaker_failures = 1\nbreaker_cooldown_ms = 1000",
            redis.url()
        )
    };
    let local = start_sidecar(&h, "local", &table("local"));
    let open = start_sidecar(&h, "open", &table("open"));
    let closed = start_sidecar(&h, "closed", &table("closed"));
    // One caller per outage, so what one round leaves (counts, cached refusals) cannot decide
    // the next.
    let callers: Vec<_> = ["stopped", "killed"]
        .iter()
        .map(|n| {
            h.create(json!({
                "service_name": format!("outage-{n}"), "scopes": ["trade:read"],
                "rate_limit_per_hour": 12, "rate_limit_scope": "cluster"
            }))
        })
        .collect();
    let probe = h.create(json!({"service_name": "probe", "scopes": ["trade:read"]}));
    wait_all_synced(&h, &[&local, &open, &closed], &probe.api_key);
    let http = &h.http;

    for (round, outage) in ["SIGSTOP", "kill"].into_iter().enumerate() {
        let key = callers[round].api_key.as_str();
        // Redis up: one shared count (12 an hour) across the three.
        for (i, s) in [&local, &open, &closed].iter().enumerate() {
            let (st, _, rl, body) = status_and_headers(http, s.addr, key);
            let want = format!("\"hour\";r={};t={}", 11 - i, 300 * (i + 1));
            assert_eq!(
                (st, rl.as_deref()),
                (200, Some(want.as_str())),
                "{outage}: {body}"
            );
        }
        match outage {
            "SIGSTOP" => redis.signal("-STOP"),
            _ => redis.kill(),
        }
        // local: this sidecar's share, 12 / 3 = 4 an hour, counted here; the policy says so.
        let share_policy = Some("\"hour\";q=4;w=3600".to_string());
        let mut admitted = 0;
        for _ in 0..6 {
            let (st, policy, _, body) = status_and_headers(http, local.addr, key);
            assert_eq!(policy, share_policy, "{outage}: {st} {body}");
            if st == 200 {
                admitted += 1;
            } else {
                assert_eq!(
                    (st, body["error"].as_str()),
                    (429, Some("rate_limited")),
                    "{outage}"
                );
            }
        }
        assert_eq!(admitted, 4, "{outage}");
        // open: no limit while Redis is out, and no RateLimit header claiming one.
        for _ in 0..6 {
            let (st, policy, rl, _) = status_and_headers(http, open.addr, key);
            assert_eq!((st, policy, rl), (200, None, None), "{outage}");
        }
        // closed: 503, the JSON error of every refusal, Retry-After.
        for _ in 0..3 {
            let r = get(http, closed.addr, key);
            assert_eq!(r.status(), 503, "{outage}");
            assert_eq!(header(&r, "retry-after"), Some("1"));
            let body: Value = r.json().unwrap();
            assert_eq!(body["error"], "temporarily_unavailable");
        }
        let n = round as u64 + 1;
        for (s, mode, per_round) in [(&local, "local", 6), (&open, "open", 6), (&closed, "closed", 3)] {
            assert_eq!(metric(&h, s, "permiso_ratelimit_redis_up"), 0, "{outage} {mode}");
            let fell_back = metric(
                &h,
                s,
                &format!("permiso_ratelimit_fallback_total{{mode=\"{mode}\"}}"),
            );
            assert_eq!(
                fell_back,
                per_round * n,
                "{outage}: every request of the outage decided by {mode}"
            );
            // The breaker: one failed call opened it; the rest fell back without asking.
            let failed = metric(&h, s, "permiso_ratelimit_redis_calls_total{result=\"timeout\"}")
                + metric(&h, s, "permiso_ratelimit_redis_calls_total{result=\"error\"}");
            assert_eq!(failed, n, "{outage} {mode}: one failed call per outage");
        }

        // Redis back: after the cooldown one trial request finds it and sharing resumes.
        match outage {
            "SIGSTOP" => redis.signal("-CONT"),
            _ => redis.launch(),
        }
        for s in [&local, &open, &closed] {
            let started = Instant::now();
            loop {
                h.clock.advance(Duration::from_millis(1001));
                let (st, _, _, _) = status_and_headers(http, s.addr, key);
                if metric(&h, s, "permiso_ratelimit_redis_up") == 1 {
                    assert_ne!(st, 503, "{outage}: Redis answered");
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "{outage}: never back on Redis"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Shared again: the open sidecar, unlimited during the outage, now meets the one count
        // and is refused once the cluster limit is spent; the refusal is then repeated without
        // a round trip.
        let mut refused_on_open = false;
        for _ in 0..30 {
            let (st, policy, _, _) = status_and_headers(http, open.addr, key);
            if st == 429 {
                assert_eq!(policy.as_deref(), Some("\"hour\";q=12;w=3600"));
                refused_on_open = true;
                break;
            }
        }
        assert!(
            refused_on_open,
            "{outage}: the open sidecar never met the shared limit again"
        );
        let cached = metric(&h, &open, "permiso_ratelimit_cached_refusals_total");
        let (st, policy, rl, _) = status_and_headers(http, open.addr, key);
        assert_eq!(
            (st, policy.as_deref()),
            (429, Some("\"hour\";q=12;w=3600")),
            "{outage}"
        );
        assert!(rl.is_some_and(|v| v.starts_with("\"hour\";r=0;t=")));
        assert_eq!(
            metric(&h, &open, "permiso_ratelimit_cached_refusals_total"),
            cached + 1
        );
        let (st, policy, _, _) = status_and_headers(http, local.addr, key);
        assert_eq!(
            (st, policy.as_deref()),
            (429, Some("\"hour\";q=12;w=3600")),
            "{outage}"
        );
    }
}

#[test]
fn the_admin_api_sets_and_refuses_rate_limit_scopes() {
    let h = Harness::start();
    let (st, body) = h.admin_req(
        reqwest::Method::POST,
        "/auth/admin/services",
        Some(json!({"service_name": "x", "scopes": ["trade:read"], "rate_limit_scope": "global"})),
    );
    assert_eq!(st, 400, "{body}");
    assert!(
        body["error"].is_string() && body["error_description"].is_string(),
        "{body}"
    );
    let svc =
        h.create(json!({"service_name": "scoped", "scopes": ["trade:read"], "rate_limit_per_minute": 5}));
    let path = format!("/auth/admin/services/{}", svc.service_id);
    let (_, v) = h.admin_req(reqwest::Method::GET, &path, None);
    assert_eq!(v["rate_limit_scope"], "sidecar", "{v}");
    for bad in [json!("Cluster"), json!(""), json!(1), json!(["cluster"])] {
        let (st, body) = h.admin_req(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"rate_limit_scope": bad})),
        );
        assert_eq!(st, 400, "{bad}: {body}");
    }
    let (st, v) = h.admin_req(
        reqwest::Method::PATCH,
        &path,
        Some(json!({"rate_limit_scope": "cluster"})),
    );
    assert_eq!((st, &v["rate_limit_scope"]), (200, &json!("cluster")), "{v}");
    let (_, audit) = h.admin_req(
        reqwest::Method::GET,
        &format!("/auth/admin/audit?target={}", svc.service_id),
        None,
    );
    let last = audit["entries"]
        .as_array()
        .and_then(|e| e.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["change"]["rate_limit_scope"], "cluster", "{audit}");
}

/// The password reaches Redis from PERMISO_REDIS_PASSWORD (passed to the limiter at start),
/// never from the URL: with it the script answers; without it or with a wrong one the call
/// fails (and the sidecar would fall back).
#[test]
fn a_redis_password_comes_from_the_environment_not_the_url() {
    let redis = PrivateRedis::start_with(&["--requirepass", "s3cret-for-tests"]);
    let limits = Limits {
        per_minute: Some(5),
        per_hour: None,
    };
    let cfg = |password: Option<&str>| limiter_with(&redis.url(), "auth:", false, password);
    rt().block_on(async {
        let ok = cfg(Some("s3cret-for-tests"))
            .count("srv_a", limits, None)
            .await
            .unwrap();
        assert_eq!(ok.outcome.unwrap().header().unwrap(), "\"minute\";r=4;t=12");
        for wrong in [None, Some("guess")] {
            let e = cfg(wrong).count("srv_a", limits, None).await.unwrap_err();
            let text = e.to_string();
            assert!(!text.contains("s3cret"), "{text}");
            assert!(
                text.contains("NOAUTH") || text.contains("WRONGPASS") || text.contains("auth"),
                "{wrong:?}: {text}"
            );
        }
    });
}

/// A three-node Redis Cluster of this test's own (no replicas), nothing on disk.
struct PrivateCluster {
    nodes: Vec<PrivateRedis>,
}

impl PrivateCluster {
    fn start() -> PrivateCluster {
        let nodes: Vec<PrivateRedis> = (0..3)
            .map(|_| {
                // The bus port explicitly: the default (port + 10000) may be past 65535, or a
                // port another test just picked.
                let bus = free_port().port().to_string();
                PrivateRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian's redis-tools)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        let started = Instant::now();
        for a in &addrs {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-u", &format!("redis://{a}"), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "cluster never ok at {a}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        PrivateCluster { nodes }
    }
}

/// On a Redis Cluster the script's one key per call lands on its slot's node: with
/// `redis_cluster = true` every service's answers (spread over the three nodes' slots) are the
/// shared vectors'; a single-node client on the same cluster is refused (MOVED) for the
/// services whose slot is elsewhere, and that counts as Redis' answer, not an outage.
#[test]
fn on_a_redis_cluster_every_slot_answers_the_shared_vectors() {
    let cluster = PrivateCluster::start();
    let url = cluster.nodes[0].url();
    let make = |is_cluster: bool| limiter_with(&url, "cluster:", is_cluster, None);
    let v = vectors::load();
    let case = &v.cases[0];
    rt().block_on(async {
        let clustered = make(true);
        // The cluster connection is made in the background.
        let started = Instant::now();
        while let Err(e) = clustered.count("srv_warmup", case.limits(), Some(v.t0_us)).await {
            assert!(e.is_transport(), "{e}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never connected: {e}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for n in 0..24 {
            let service = format!("srv_spread_{n}");
            for (i, step) in case.steps.iter().enumerate() {
                let got = clustered
                    .count(&service, case.limits(), Some(v.t0_us + step.at_us))
                    .await
                    .unwrap()
                    .outcome;
                assert_eq!(vectors::observed(step.at_us, &got), *step, "{service}: step {i}");
            }
        }
        let single = make(false);
        let mut moved = 0;
        for n in 0..24 {
            match single
                .count(&format!("srv_single_{n}"), case.limits(), Some(v.t0_us))
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    assert!(!e.is_transport(), "a redirect is an answer, not an outage: {e}");
                    assert!(
                        e.to_string().contains("MOVED") || e.to_string().contains("Moved"),
                        "{e}"
                    );
                    moved += 1;
                }
            }
        }
        assert!(
            moved > 0 && moved < 24,
            "{moved} of 24 services live on other nodes"
        );
    });
}
