//! What the process-level benches share: ports, child processes (stopped with SIGTERM first),
//! CPU accounting from /proc, a minimal upstream, and waiting for readiness. Each bench uses a
//! part of it.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const ADMIN_KEY: &str = "load-test-admin-key-0123456789";

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

pub struct Proc(pub Child);

impl Drop for Proc {
    /// SIGTERM first: nginx's master stops its workers on it (SIGKILL would orphan them).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(dir: &Path, name: &str, exe: &str, args: &[&str]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Proc(
        Command::new(exe)
            .args(args)
            .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("{exe}: {e}")),
    )
}

/// User + system CPU ticks of a process and its direct children (nginx workers).
pub fn cpu_ticks(pid: u32) -> u64 {
    fn stat(path: &Path) -> Option<(u32, u64)> {
        let s = std::fs::read_to_string(path).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the command: state(0) ppid(1) ... utime(11) stime(12).
        Some((
            f[1].parse().ok()?,
            f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?,
        ))
    }
    let mut total = stat(&Path::new("/proc").join(pid.to_string()).join("stat")).map_or(0, |(_, t)| t);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some((ppid, t)) = stat(&e.path().join("stat")) {
                if ppid == pid {
                    total += t;
                }
            }
        }
    }
    total
}

pub fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// An upstream that answers every request at once: `200 ok`, keep-alive.
pub fn start_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    let mut filled = 0;
                    loop {
                        let Ok(n) = s.read(&mut buf[filled..]).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        filled += n;
                        let mut start = 0;
                        let mut out = Vec::new();
                        while let Some(end) = find(&buf[start..filled], b"\r\n\r\n") {
                            start += end + 4;
                            out.extend_from_slice(
                                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
                            );
                        }
                        buf.copy_within(start..filled, 0);
                        filled -= start;
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    addr
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn wait_until(what: &str, f: impl Fn() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < Duration::from_secs(120), "{what} not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Redis URL from `var` (default the local one) and its host:port.
pub fn redis_from_env(var: &str) -> (String, String) {
    let url = std::env::var(var).unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let addr = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    (url, addr)
}
