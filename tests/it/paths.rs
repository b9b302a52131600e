//! Differential test of path handling: the sidecar in front of upstreams with real routing
//! (Flask/werkzeug, which decodes paths; Flask behind a lower-casing WSGI layer, as a
//! case-insensitive server reads paths; axum, which routes on the raw path). Thousands of
//! mutated spellings of protected paths are sent raw, with several scope sets; whenever the
//! sidecar lets one through and a handler runs, that handler must be one the caller's scopes
//! allow, and the path the upstream received must be canonical.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use permiso::core::clock::SharedClock;
use permiso::sidecar::{self, SidecarHandle};
use serde_json::{json, Value};

use crate::common::{free_port, Harness, Proc};

const ROUTES: &str = r#"
[[sidecar.routes]]
prefix = "/health"
public = true

[[sidecar.routes]]
prefix = "/api/v1/account"
scopes = ["account:read"]

[[sidecar.routes]]
methods = ["GET"]
prefix = "/api/v1/account/balance"
scopes = ["account:balance"]

[[sidecar.routes]]
prefix = "/api/v1/account/help"
public = true

[[sidecar.routes]]
prefix = "/api/v1/trades"
scopes = ["trade:read"]

[[sidecar.routes]]
prefix = "/api/v1/admin"
scopes = ["admin:system"]
"#;

/// The scope each upstream handler stands behind (None: public).
fn needed(handler: &str) -> Option<&'static str> {
    match handler {
        "health" | "help" => None,
        "account" => Some("account:read"),
        "balance" => Some("account:balance"),
        "trades" => Some("trade:read"),
        "admin" => Some("admin:system"),
        other => panic!("unknown handler {other}"),
    }
}

/// A Python with Flask: `PERMISO_TEST_PYTHON`, else a venv made once under the target dir.
fn python_with_flask() -> PathBuf {
    if let Ok(p) = std::env::var("PERMISO_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    crate::common::python_venv("flask-venv", "flask", "flask==3.1.*")
}

fn start_flask(lower: bool) -> (Proc, SocketAddr) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/frameworks/flask_app.py");
    let mut cmd = Command::new(python_with_flask());
    cmd.arg(script).stdout(Stdio::piped()).stderr(Stdio::null());
    if lower {
        cmd.arg("--lower");
    }
    let mut child = cmd.spawn().expect("python starts");
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let port: u16 = String::from_utf8(line)
        .unwrap()
        .trim()
        .parse()
        .expect("flask printed its port");
    (Proc(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The same handlers in axum, which matches routes on the raw (still encoded) path.
fn start_axum() -> SocketAddr {
    use axum::routing::any;
    let (addr, _thread) = crate::common::serve_on_own_thread(|l| async move {
        let reply = |name: &'static str| {
            move |uri: axum::http::Uri| async move {
                let raw = uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                (
                    [("x-handler", name.to_string()), ("x-raw-target", raw.clone())],
                    axum::Json(json!({"handler": name, "raw": raw})),
                )
            }
        };
        let mut app = axum::Router::new();
        for (prefix, name) in [
            ("/health", "health"),
            ("/api/v1/account", "account"),
            ("/api/v1/account/balance", "balance"),
            ("/api/v1/trades", "trades"),
            ("/api/v1/admin", "admin"),
        ] {
            app = app
                .route(prefix, any(reply(name)))
                .route(&format!("{prefix}/{{*rest}}"), any(reply(name)));
        }
        app = app.route("/api/v1/account/help", any(reply("help")));
        axum::serve(l, app).await.unwrap();
    });
    addr
}

fn start_sidecar_for(h: &Harness, upstream: SocketAddr, n: usize) -> SidecarHandle {
    let mut cfg = h.sidecar_config(ROUTES);
    cfg.listen = free_port();
    cfg.upstream = upstream;
    cfg.snapshot_file = h.dir.path().join(format!("snapshot-{n}.json"));
    let clock: SharedClock = Arc::new(h.clock.clone());
    let s = sidecar::start(cfg, clock).expect("sidecar starts");
    crate::common::wait_ready(&h.http, s.health_addr.unwrap());
    s
}

/// Mutations of a protected path, from a fixed seed.
struct Mutator(u64);

impl Mutator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.next() % one_in == 0
    }

    fn mutate(&mut self, target: &str) -> String {
        // A way in through the public prefix, sometimes.
        let mut out = String::new();
        if self.chance(6) {
            out.push_str(self.pick(&[
                "/health/..",
                "/health/..;",
                "/health/%2e%2e",
                "/health/%2E%2e;",
                "/health/..%3b",
                "/health/.%2e",
                "/health/..%2f..",
                "/health/..\\..",
                "/health/;/..",
                "/health/%252e%252e",
                "/health//..",
                "/health/./..",
                "/health/..%00",
                "/health/..%c0%af..",
            ]));
        }
        for (i, c) in target.char_indices() {
            if c == '/' {
                let sep = if i == 0 || !self.chance(8) {
                    "/"
                } else {
                    self.pick(&[
                        "//", "%2f", "%2F", "\\", "/./", "/;x=1/", "/%2e/", "/.;/", "///", "%5c", "/%20/",
                    ])
                };
                out.push_str(sep);
                continue;
            }
            if self.chance(10) {
                let b = c as u8;
                // Spellings a server decodes to the same character are the most likely, so
                // they are most of the draws.
                match self.next() % 14 {
                    0 | 9 | 10 => out.push_str(&format!("%{b:02x}")),
                    1 | 11 | 12 => out.push_str(&format!("%{b:02X}")),
                    2 => out.push_str(&format!("%25{b:02X}")),
                    3 | 13 => out.push(c.to_ascii_uppercase()),
                    4 => out.push_str(match c {
                        // Characters that case-fold to ASCII letters in Unicode.
                        'i' => "%C4%B0",
                        'k' => "%E2%84%AA",
                        's' => "%C5%BF",
                        _ => "%EF%BD%81",
                    }),
                    5 => out.push_str(&format!("%u00{b:02x}")),
                    6 => {
                        out.push(c);
                        out.push_str(self.pick(&[";", ";a=b", "%3b", "%3B"]));
                    }
                    7 => {
                        out.push(c);
                        out.push_str(self.pick(&[".", "%2e", "%20", "%00", "%09", "%0a", "+", "~"]));
                    }
                    _ => out.push_str(&c.to_uppercase().to_string()),
                }
            } else {
                out.push(c);
            }
        }
        if self.chance(4) {
            out.push_str(self.pick(&[
                "/",
                "?x=1",
                "#frag",
                "/.",
                "/..",
                ";",
                "%2f",
                "?a=/api/v1/admin",
                ".",
            ]));
        }
        out
    }
}

/// What came back for one request.
struct Answer {
    status: u16,
    /// Lower-case header names.
    headers: std::collections::HashMap<String, String>,
    body: Vec<u8>,
}

/// Sends one raw request over `conn` (reconnecting when the sidecar closed it); None when the
/// sidecar's HTTP parser refused the request line outright. HEAD requests go on a connection
/// of their own (`Connection: close`), read to its end.
fn send(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
) -> Option<Answer> {
    let head_only = method.eq_ignore_ascii_case("HEAD");
    for attempt in 0..2 {
        let s = match conn {
            Some(s) if !head_only => s,
            _ => {
                let s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                conn.insert(s)
            }
        };
        let auth = key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        let close = if head_only { "Connection: close\r\n" } else { "" };
        let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}{close}\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            *conn = None;
            continue;
        }
        match read_one(s, head_only) {
            Some((answer, close)) => {
                if close || head_only {
                    *conn = None;
                }
                return Some(answer);
            }
            // Closed without an answer: a kept-alive connection the peer had closed (retry
            // once on a fresh one), or a request line the parser refused.
            None => {
                *conn = None;
                if attempt == 1 {
                    return None;
                }
            }
        }
    }
    None
}

/// One response: its head, and its Content-Length body unless `head_only` (then whatever
/// follows the head is ignored); None if the connection closed before a head.
fn read_one(s: &mut TcpStream, head_only: bool) -> Option<(Answer, bool)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let status: u16 = head.get(9..12)?.parse().ok()?;
        let headers: std::collections::HashMap<String, String> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len = if head_only {
            0
        } else {
            headers
                .get("content-length")
                .map_or(0, |v| v.parse::<usize>().unwrap())
        };
        if buf.len() >= end + 4 + len {
            let close = headers
                .get("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let body = buf[end + 4..end + 4 + len].to_vec();
            return Some((
                Answer {
                    status,
                    headers,
                    body,
                },
                close,
            ));
        }
    }
}

#[derive(Default, Debug)]
struct Tally {
    sent: usize,
    /// Answered by the sidecar itself (400/401/403/...).
    refused: usize,
    /// Refused by the HTTP parser before any decision.
    unparsed: usize,
    /// A handler ran: (handler, was the path mutated).
    reached: std::collections::BTreeMap<String, usize>,
    reached_mutated: std::collections::BTreeMap<String, usize>,
}

#[test]
fn mutated_paths_never_reach_a_handler_the_scopes_do_not_allow() {
    let h = Harness::start_with(ROUTES);
    let callers: Vec<(&str, Vec<&str>)> = vec![
        ("anonymous", vec![]),
        ("reader", vec!["account:read"]),
        ("balance", vec!["account:read", "account:balance"]),
        // Holds the deeper route's scope only: an upstream may serve any path under
        // /api/v1/account/balance from the /api/v1/account handler, so it reaches nothing.
        ("bal-only", vec!["account:balance"]),
        ("trader", vec!["trade:read"]),
    ];
    let keys: Vec<(String, Vec<&str>, Option<String>)> = callers
        .iter()
        .map(|(name, scopes)| {
            let key = (!scopes.is_empty()).then(|| {
                h.create(json!({"service_name": format!("diff-{name}"), "scopes": scopes}))
                    .api_key
            });
            (name.to_string(), scopes.clone(), key)
        })
        .collect();

    let (_flask, flask) = start_flask(false);
    let (_flask_lower, flask_lower) = start_flask(true);
    let axum_addr = start_axum();
    let upstreams = [
        ("flask", flask),
        ("flask-lowercase", flask_lower),
        ("axum", axum_addr),
    ];
    let sidecars: Vec<SidecarHandle> = upstreams
        .iter()
        .enumerate()
        .map(|(i, (_, a))| start_sidecar_for(&h, *a, i))
        .collect();

    let targets = [
        "/api/v1/account/balance",
        "/api/v1/account/balance/usd",
        "/api/v1/admin",
        "/api/v1/admin/users",
        "/api/v1/trades/1",
        "/api/v1/account",
        "/health/live",
        "/api/v1/account/help",
        "/api/v1/account/help/x",
    ];
    let per_target: usize = std::env::var("PERMISO_DIFF_PATHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let mut m = Mutator(0x2545_f491_4f6c_dd1d);
    // (raw path, whether it differs from the plain spelling of its target)
    let mut paths: Vec<(String, bool)> = targets.iter().map(|t| (t.to_string(), false)).collect();
    for t in targets {
        for _ in 0..per_target {
            let p = m.mutate(t);
            let mutated = p != t;
            paths.push((p, mutated));
        }
    }
    // Spellings that the review found, always included.
    for p in [
        "/api/v1/account/%62alance",
        "/api/v1/account/BALANCE",
        "/api/v1/account/balance.",
        "/api/v1/account/balance;x",
        "/api/v1/account//balance",
        "/api/v1/account/balance%00",
        "/api/v1/account/balance%20",
        "/health/..;/api/v1/trades",
        "/health/%2e%2e;/api/v1/trades",
        "/health/..%3b/api/v1/trades",
    ] {
        paths.push((p.to_string(), true));
    }

    let mut report = Vec::new();
    for ((uname, _), sc) in upstreams.iter().zip(&sidecars) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = keys
                .iter()
                .map(|(cname, scopes, key)| {
                    let paths = &paths;
                    let addr = sc.addr;
                    scope.spawn(move || {
                        let mut t = Tally::default();
                        let mut conn = None;
                        // Every path with GET; every fifth with HEAD (frameworks serve it from
                        // the GET handler) and with a lower-case method (servers upper-case it).
                        let requests = paths.iter().enumerate().flat_map(|(i, (p, m))| {
                            let extra: &[&str] = if i % 5 == 0 { &["HEAD", "get"] } else { &[] };
                            std::iter::once("GET").chain(extra.iter().copied()).map(move |method| (method, p, *m))
                        });
                        for (method, p, mutated) in requests {
                            t.sent += 1;
                            let Some(answer) = send(&mut conn, addr, method, p, key.as_deref()) else {
                                t.unparsed += 1;
                                continue;
                            };
                            let Some(handler) = answer.headers.get("x-handler").cloned() else {
                                let v: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
                                if v["error"].is_string() || (method == "HEAD" && answer.status >= 400) {
                                    t.refused += 1;
                                }
                                continue;
                            };
                            let status = answer.status;
                            assert!((200..300).contains(&status), "{method} {p}: {status}");
                            if let Some(scope) = needed(&handler) {
                                assert!(
                                    scopes.contains(&scope),
                                    "{uname}: {cname} (scopes {scopes:?}) reached handler {handler:?} with {method} {p:?}; upstream read {:?}",
                                    answer.headers.get("x-raw-target")
                                );
                            }
                            // The upstream read the canonical path and no other spelling.
                            let raw = answer.headers.get("x-raw-target").cloned().unwrap_or_default();
                            let raw_path = raw.split('?').next().unwrap();
                            let c = permiso::core::path::canonicalize(raw_path);
                            assert!(
                                matches!(c, Ok(std::borrow::Cow::Borrowed(_))),
                                "{uname}: {p:?} was forwarded as {raw:?}, not canonical ({c:?})"
                            );
                            *t.reached.entry(handler.clone()).or_default() += 1;
                            if mutated {
                                *t.reached_mutated.entry(handler).or_default() += 1;
                            }
                        }
                        (cname.clone(), t)
                    })
                })
                .collect();
            for handle in handles {
                let (cname, t) = handle.join().unwrap();
                report.push((uname.to_string(), cname, t));
            }
        });
    }
    let mut total = 0;
    for (u, c, t) in &report {
        println!(
            "{u:16} {c:9} sent {:5} refused {:5} unparsed {:4} reached {:?} (mutated spellings {:?})",
            t.sent, t.refused, t.unparsed, t.reached, t.reached_mutated
        );
        total += t.sent;
    }
    println!("{total} requests");
    // Not vacuous: mutated spellings did get through to the handlers their scopes allow, on
    // every upstream, so the assertions above judged real forwards.
    let reached = |u: &str, c: &str, handler: &str| {
        report
            .iter()
            .find(|(uu, cc, _)| uu == u && cc == c)
            .and_then(|(_, _, t)| t.reached_mutated.get(handler).copied())
            .unwrap_or(0)
    };
    for (u, _) in upstreams {
        assert_eq!(
            reached(u, "bal-only", "balance") + reached(u, "bal-only", "account"),
            0
        );
        assert!(
            reached(u, "anonymous", "health") > 0,
            "{u}: no mutated path reached health"
        );
        assert!(
            reached(u, "balance", "balance") > 0,
            "{u}: no mutated path reached balance"
        );
        assert!(
            reached(u, "reader", "account") > 0,
            "{u}: no mutated path reached account"
        );
        assert!(
            reached(u, "trader", "trades") > 0,
            "{u}: no mutated path reached trades"
        );
    }
}
