//! The issue-15 experiment, `permiso passthrough --lean` (pingora-core's HTTP/1 sessions with
//! one upstream connection pinned per downstream connection): a load-bench baseline only, but
//! what it forwards must be what it received. GET, HEAD, a body by Content-Length and a chunked
//! one, many requests on one kept-alive client connection riding one upstream connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{free_port, serve_on_own_thread, spawn, Proc};

/// Answers `<method> <path> <body length> <body>` and counts the connections it accepted.
fn upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let conns = Arc::new(AtomicU64::new(0));
    let counted = conns.clone();
    let (addr, _thread) = serve_on_own_thread(move |l| async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                use http_body_util::BodyExt;
                let (parts, body) = req.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let text = format!(
                    "{} {} {} {}",
                    parts.method,
                    parts.uri.path(),
                    body.len(),
                    String::from_utf8_lossy(&body)
                );
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(text),
                )))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

/// Reads one response (Content-Length framed) from a kept-alive connection: status and body.
fn response(r: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

#[test]
fn the_lean_passthrough_forwards_what_it_received_on_one_pinned_connection() {
    let (up, upstream_conns) = upstream();
    let listen = free_port();
    let dir = tempfile::tempdir().unwrap();
    let _p: Proc = spawn(
        dir.path(),
        "lean",
        env!("CARGO_BIN_EXE_permiso"),
        &[
            "passthrough",
            "--lean",
            "--listen",
            &listen.to_string(),
            "--upstream",
            &up.to_string(),
        ],
    );
    let started = Instant::now();
    let s = loop {
        if let Ok(s) = TcpStream::connect(listen) {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never listened");
        std::thread::sleep(Duration::from_millis(20));
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for i in 0..20 {
        w.write_all(format!("GET /a/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        assert_eq!(response(&mut r), (200, format!("GET /a/{i} 0 ")));
    }
    w.write_all(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world")
        .unwrap();
    assert_eq!(response(&mut r), (200, "POST /p 11 hello world".into()));
    w.write_all(b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n6\r\ned-bod\r\n1\r\ny\r\n0\r\n\r\n")
        .unwrap();
    assert_eq!(response(&mut r), (200, "PUT /c 12 chunked-body".into()));
    w.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(response(&mut r), (200, "GET /after 0 ".into()));
    assert_eq!(
        upstream_conns.load(Ordering::SeqCst),
        1,
        "23 requests on one client connection rode one upstream connection"
    );
}
