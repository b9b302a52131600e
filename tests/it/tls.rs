//! TLS on every hop, over real loopback connections with certificates generated in the test:
//! the sidecar's HTTPS listener (versions, plain HTTP, client-certificate modes, rotation),
//! the admin plane over HTTPS with sync, usage reports, egress and the CLI verifying it against
//! a private CA, and an unverifiable admin plane named in the sync failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::certs::{Ca, Issued};
use crate::common::{free_port, scrape, Harness, ROUTES};

fn https_client(ca: Option<&Ca>, identity: Option<&Issued>) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .tls_info(true)
        .timeout(Duration::from_secs(10));
    if let Some(ca) = ca {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap());
    }
    if let Some(id) = identity {
        b = b.identity(reqwest::Identity::from_pem(&id.identity_pem()).unwrap());
    }
    b.build().unwrap()
}

fn tls_section(table: &str, server: &Issued, client_ca: Option<&Ca>, mode: &str) -> String {
    let mut s = format!(
        "[{table}]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_auth = \"{mode}\"\n",
        server.cert_file.display(),
        server.key_file.display()
    );
    if let Some(ca) = client_ca {
        s.push_str(&format!("client_ca_file = \"{}\"\n", ca.pem_file.display()));
    }
    s
}

/// A second sidecar of the harness's upstream, listening with `tls` (a `[sidecar.tls]` text).
fn tls_sidecar(h: &Harness, dir: &Path, tls: &str) -> (permiso::sidecar::SidecarHandle, SocketAddr) {
    let cfg = h.sidecar_config_at(
        free_port(),
        h.admin_addr,
        &dir.join("tls-snap.json"),
        5,
        &format!("{tls}{ROUTES}"),
    );
    let listen = cfg.listen;
    let side = permiso::sidecar::start(cfg, std::sync::Arc::new(h.clock.clone())).unwrap();
    (side, listen)
}

fn get(
    c: &reqwest::blocking::Client,
    url: &str,
    key: Option<&str>,
) -> reqwest::Result<reqwest::blocking::Response> {
    let mut rb = c.get(url);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    rb.send()
}

/// Waits for the sidecar at `url` to know the service (its own sync), then returns.
fn until_ok(c: &reqwest::blocking::Client, url: &str, key: &str) {
    let started = Instant::now();
    loop {
        match get(c, url, Some(key)) {
            Ok(r) if r.status() == 200 => return,
            other => assert!(
                started.elapsed() < Duration::from_secs(10),
                "{url} never answered 200: {:?}",
                other.map(|r| r.status())
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A hand-written TLS 1.1 ClientHello (rustls clients cannot send one): the answer must be
/// an alert or a closed connection, never a ServerHello.
fn tls11_client_hello(addr: SocketAddr) -> Option<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, AES128-SHA
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, (hello.len() >> 8) as u8, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    let mut record = vec![
        0x16,
        0x03,
        0x02,
        (handshake.len() >> 8) as u8,
        handshake.len() as u8,
    ];
    record.extend_from_slice(&handshake);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&record).unwrap();
    let mut first = [0u8; 1];
    match s.read(&mut first) {
        Ok(1) => Some(first[0]),
        _ => None,
    }
}

#[test]
fn the_sidecar_serves_https_and_refuses_plain_http_old_versions_and_unknown_cas() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "trader", "scopes": ["trade:read"]}));
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "site");
    let server = ca.server("sidecar", 2040);
    let (side, addr) = tls_sidecar(&h, dir.path(), &tls_section("sidecar.tls", &server, None, "off"));
    let url = format!("https://127.0.0.1:{}/api/v1/trades", addr.port());
    let client = https_client(Some(&ca), None);
    until_ok(&client, &url, &svc.api_key);
    let r = get(&client, &url, Some(&svc.api_key)).unwrap();
    let echo: Value = r.json().unwrap();
    assert_eq!(echo["headers"]["x-permiso-service-id"], svc.service_id.as_str());
    // Under localhost too (the DNS SAN), and without a key the usual 401.
    let r = get(
        &client,
        &format!("https://localhost:{}/api/v1/trades", addr.port()),
        None,
    )
    .unwrap();
    assert_eq!(r.status(), 401);

    // A client that does not trust the CA: the handshake fails on its side.
    let stranger = Ca::new(dir.path(), "stranger");
    let e = get(&https_client(Some(&stranger), None), &url, Some(&svc.api_key)).unwrap_err();
    assert!(
        permiso::tls::client::tls_failure(&e).is_some_and(|r| r.contains("UnknownIssuer")),
        "{e:?}"
    );
    // Plain HTTP to the TLS port: no answer but a closed connection, and the listener lives on.
    let plain = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = get(
        &plain,
        &format!("http://{addr}/api/v1/trades"),
        Some(&svc.api_key),
    );
    assert!(
        r.is_err(),
        "plain HTTP got an answer: {:?}",
        r.map(|r| r.status())
    );
    // TLS 1.1: an alert (0x15) or a closed connection, never a handshake record (0x16).
    let answer = tls11_client_hello(addr);
    assert!(
        matches!(answer, None | Some(0x15)),
        "TLS 1.1 answered with record type {answer:?}"
    );
    assert_eq!(get(&client, &url, Some(&svc.api_key)).unwrap().status(), 200);

    // The certificate's expiry is a metric.
    let health = side.health_addr.unwrap();
    let left = scrape(
        &h.http,
        &format!("http://{health}/metrics"),
        "permiso_tls_cert_expiry_seconds{listener=\"sidecar\"}",
    )
    .expect("expiry gauge");
    let expected = 2_208_988_800 - h.clock_secs(); // 2040-01-01T00:00:00Z
    assert_eq!(left, expected);
    drop(side);
}

#[test]
fn client_certificates_required_optional_and_from_an_untrusted_ca() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "trader", "scopes": ["trade:read"]}));
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "site");
    let clients = Ca::new(dir.path(), "clients");
    let other = Ca::new(dir.path(), "other");
    let server = ca.server("sidecar", 2040);
    let mine = clients.client("mt5", "spiffe://permiso/mt5");
    let foreign = other.client("foreign", "spiffe://permiso/mt5");

    for mode in ["required", "optional"] {
        let (side, addr) = tls_sidecar(
            &h,
            dir.path(),
            &tls_section("sidecar.tls", &server, Some(&clients), mode),
        );
        let url = format!("https://127.0.0.1:{}/api/v1/trades", addr.port());
        let with_cert = https_client(Some(&ca), Some(&mine));
        until_ok(&with_cert, &url, &svc.api_key);
        // A certificate from another CA fails the handshake in either mode.
        let e = get(&https_client(Some(&ca), Some(&foreign)), &url, Some(&svc.api_key)).unwrap_err();
        assert!(e.is_connect() || e.is_request(), "{mode}: {e:?}");
        let without = https_client(Some(&ca), None);
        match mode {
            "required" => {
                let e = get(&without, &url, Some(&svc.api_key)).unwrap_err();
                assert!(e.is_connect() || e.is_request(), "{e:?}");
            }
            _ => {
                assert_eq!(get(&without, &url, None).unwrap().status(), 401);
                assert_eq!(get(&without, &url, Some(&svc.api_key)).unwrap().status(), 200);
            }
        }
        drop(side);
    }
}

#[test]
fn a_new_certificate_is_served_without_a_restart_and_a_bad_one_is_refused() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "trader", "scopes": ["trade:read"]}));
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "site");
    let first = ca.server("sidecar", 2040);
    let (side, addr) = tls_sidecar(&h, dir.path(), &tls_section("sidecar.tls", &first, None, "off"));
    let url = format!("https://127.0.0.1:{}/api/v1/trades", addr.port());
    until_ok(&https_client(Some(&ca), None), &url, &svc.api_key);
    // A new client per request: every request is a new handshake.
    let presented = || -> (u16, Vec<u8>) {
        let r = get(&https_client(Some(&ca), None), &url, Some(&svc.api_key)).unwrap();
        let der = r
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .unwrap()
            .to_vec();
        (r.status().as_u16(), der)
    };
    assert_eq!(presented(), (200, first.der.clone()));

    // Steady traffic on kept-alive connections while the files are replaced.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let (c, url, key, stop) = (
            https_client(Some(&ca), None),
            url.clone(),
            svc.api_key.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get(&c, &url, Some(&key)) {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    let second = ca.server("sidecar-next", 2041);
    std::fs::copy(&second.key_file, &first.key_file).unwrap();
    std::fs::copy(&second.cert_file, &first.cert_file).unwrap();
    let started = Instant::now();
    loop {
        let (status, der) = presented();
        assert_eq!(status, 200);
        if der == second.der {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "new certificate served {:?} after the files changed",
        started.elapsed()
    );

    // A broken certificate file is refused and counted: the one in use stays.
    let metrics = format!("http://{}/metrics", side.health_addr.unwrap());
    let refused = || {
        scrape(
            &reqwest::blocking::Client::new(),
            &metrics,
            "permiso_tls_cert_reload_failures_total{listener=\"sidecar\"}",
        )
        .unwrap_or(0)
    };
    let refused_before = refused();
    std::fs::write(&first.cert_file, "not a certificate").unwrap();
    side.reloader.apply(h.sidecar_config_at(
        addr,
        h.admin_addr,
        &dir.path().join("tls-snap.json"),
        5,
        &format!("{}{ROUTES}", tls_section("sidecar.tls", &first, None, "off")),
    ));
    assert!(
        refused() > refused_before,
        "the broken file was not refused by the reload"
    );
    for _ in 0..5 {
        assert_eq!(presented(), (200, second.der.clone()));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = stream.join().unwrap();
    eprintln!("steady stream during certificate rotation: {ok} ok, {failed} failed");
    assert!(ok > 0);
    assert_eq!(failed, 0);
    drop(side);
}

/// A sidecar config as text: `sync_extra` goes into `[sidecar.sync]`, `tables` after it.
fn sidecar_text(
    listen: SocketAddr,
    upstream: SocketAddr,
    snapshot: &Path,
    admin_url: &str,
    sync_extra: &str,
    tables: &str,
) -> String {
    format!(
        "[sidecar]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\nsnapshot_file = \"{}\"\nadmin_listen = \"127.0.0.1:0\"\nusage_report_interval_ms = 50\n[sidecar.sync]\nadmin_url = \"{admin_url}\"\nwait_seconds = 5\n{sync_extra}\n{tables}{ROUTES}",
        snapshot.display()
    )
}

fn start_sidecar(
    text: &str,
    sync_key: &str,
    clock: &permiso::core::clock::ManualClock,
) -> permiso::sidecar::SidecarHandle {
    let f = permiso::config::parse_file(text, Path::new("tls.toml")).unwrap();
    let cfg = permiso::config::SidecarConfig::from_file(
        f.sidecar.as_ref().unwrap(),
        permiso::core::key::Secret::new(sync_key.to_string()),
    )
    .unwrap();
    permiso::sidecar::start(cfg, std::sync::Arc::new(clock.clone())).unwrap()
}

/// An admin plane serving HTTPS with a certificate from `ca`; with `clients`, it asks for
/// client certificates from that CA (optional). Returns it and its https:// URL.
fn https_admin(
    d: &Path,
    ca: &Ca,
    clients: Option<&Ca>,
    clock: &permiso::core::clock::ManualClock,
) -> (permiso::admin::AdminHandle, String, Issued) {
    let admin_cert = ca.server("admin", 2040);
    let tls = permiso::config::file::ServerTls {
        cert_file: admin_cert.cert_file.display().to_string(),
        key_file: admin_cert.key_file.display().to_string(),
        client_ca_file: clients.map(|c| c.pem_file.display().to_string()),
        client_auth: match clients {
            Some(_) => permiso::config::file::ClientAuthMode::Optional,
            None => permiso::config::file::ClientAuthMode::Off,
        },
    };
    let admin = crate::common::start_admin_with(
        &d.join("permiso.db"),
        "127.0.0.1:0".parse().unwrap(),
        clock,
        |f| f.tls = Some(tls),
    );
    let url = format!("https://127.0.0.1:{}", admin.addr.port());
    (admin, url, admin_cert)
}

#[test]
fn sync_usage_egress_and_the_cli_reach_an_https_admin_plane_through_a_private_ca() {
    use crate::common::{EchoUpstream, ADMIN_KEY};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "site");
    let clients = Ca::new(d, "clients");
    let clock = permiso::core::clock::ManualClock::starting_now();
    let (admin, admin_url, admin_cert) = https_admin(d, &ca, None, &clock);
    let https = https_client(Some(&ca), None);
    // Plain HTTP to the admin plane's TLS port gets nothing.
    assert!(reqwest::blocking::get(format!("http://{}/healthz", admin.addr)).is_err());
    let create = |name: &str, scopes: Value| -> Value {
        let r = https
            .post(format!("{admin_url}/auth/admin/services"))
            .header("X-Admin-Api-Key", ADMIN_KEY)
            .json(&json!({"service_name": name, "scopes": scopes}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json().unwrap()
    };
    let sync_key = create("sidecar-sync", json!(["sync:read"]))["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let trader = create("trader", json!(["trade:read"]));
    let trader_key = trader["api_key"].as_str().unwrap().to_string();
    // Metadata names the HTTPS issuer.
    let meta: Value = get(
        &https,
        &format!("{admin_url}/.well-known/oauth-authorization-server"),
        None,
    )
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(meta["issuer"], admin_url.as_str());

    // A sidecar whose sync trusts the private CA: it syncs, serves, and reports usage.
    let upstream = EchoUpstream::start();
    let site = ca.server("sidecar", 2040);
    let snap = d.join("a.json");
    let a = start_sidecar(
        &sidecar_text(
            free_port(),
            upstream.addr,
            &snap,
            &admin_url,
            &format!("ca_file = \"{}\"", ca.pem_file.display()),
            &tls_section("sidecar.tls", &site, Some(&clients), "required"),
        ),
        &sync_key,
        &clock,
    );
    let a_url = format!("https://127.0.0.1:{}/api/v1/trades", a.addr.port());
    let mt5_cert = clients.client("mt5", "spiffe://permiso/mt5");
    until_ok(&https_client(Some(&ca), Some(&mt5_cert)), &a_url, &trader_key);
    let started = Instant::now();
    loop {
        let v: Value = https
            .get(format!(
                "{admin_url}/auth/admin/services/{}",
                trader["service_id"].as_str().unwrap()
            ))
            .header("X-Admin-Api-Key", ADMIN_KEY)
            .send()
            .unwrap()
            .json()
            .unwrap();
        if v["keys"][0]["last_used_at"].is_string() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "usage never reported over HTTPS: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Egress over HTTPS to that sidecar, which requires a client certificate: the egress
    // presents one and trusts the private CA.
    let egress_text = sidecar_text(
        free_port(),
        upstream.addr,
        &d.join("b.json"),
        &admin_url,
        &format!("ca_file = \"{}\"", ca.pem_file.display()),
        &format!(
            "[sidecar.egress]\nlisten = \"127.0.0.1:0\"\n[sidecar.egress.destinations.trades]\nurl = \"https://127.0.0.1:{}\"\napi_key_file = \"{}\"\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            a.addr.port(),
            {
                let p = d.join("trader.key");
                std::fs::write(&p, &trader_key).unwrap();
                p.display().to_string()
            },
            ca.pem_file.display(),
            mt5_cert.cert_file.display(),
            mt5_cert.key_file.display(),
        ),
    );
    let b = start_sidecar(&egress_text, &sync_key, &clock);
    let r =
        reqwest::blocking::get(format!("http://{}/trades/api/v1/trades", b.egress_addr.unwrap())).unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().unwrap();
    assert_eq!(echo["headers"]["x-permiso-service-id"], trader["service_id"]);

    // The egress's client certificate is rotated without a restart: both identities mapped
    // to the trader, the files replaced (key first, as examples/certs.sh does), and the next
    // calls present the new certificate although the old one's connection is still pooled.
    let patched = https
        .patch(format!(
            "{admin_url}/auth/admin/services/{}",
            trader["service_id"].as_str().unwrap()
        ))
        .header("X-Admin-Api-Key", ADMIN_KEY)
        .json(&json!({"tls_identities": ["spiffe://permiso/mt5", "spiffe://permiso/mt5-next"]}))
        .send()
        .unwrap();
    assert_eq!(patched.status(), 200);
    let egress_url = format!("http://{}/trades/api/v1/trades", b.egress_addr.unwrap());
    let presented = || -> Value {
        let r = reqwest::blocking::get(&egress_url).unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().unwrap()["headers"]["x-permiso-client-cert-identity"].clone()
    };
    let until_presented = |want: &str| {
        let started = Instant::now();
        while presented() != want {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the egress never presented {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    until_presented("spiffe://permiso/mt5");
    let b_metrics = format!("http://{}/metrics", b.health_addr.unwrap());
    let plain = reqwest::blocking::Client::new();
    assert!(
        scrape(
            &plain,
            &b_metrics,
            "permiso_tls_cert_expiry_seconds{listener=\"client:egress:trades\"}"
        )
        .is_some_and(|left| left > 0),
        "the egress client certificate's expiry is reported"
    );
    let next = clients.client("mt5-next", "spiffe://permiso/mt5-next");
    std::fs::copy(&next.key_file, &mt5_cert.key_file).unwrap();
    std::fs::copy(&next.cert_file, &mt5_cert.cert_file).unwrap();
    until_presented("spiffe://permiso/mt5-next");

    // The CLI, trusting the CA through --ca-file.
    let cli = |ca_file: Option<&Path>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_permiso"));
        c.args(["services", "list", "--json"])
            .env("PERMISO_ADMIN_URL", &admin_url)
            .env("PERMISO_ADMIN_API_KEY", ADMIN_KEY)
            .env("RUST_LOG", "off");
        if let Some(f) = ca_file {
            c.arg("--ca-file").arg(f);
        }
        c.output().unwrap()
    };
    let out = cli(Some(&ca.pem_file));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("trader"));
    let out = cli(None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TLS failed") && err.contains("UnknownIssuer"),
        "{err}"
    );

    // A sidecar that cannot verify the admin plane (system roots only): the sync fails with
    // cause "tls", and it serves from the snapshot file sidecar A wrote.
    let c_snap = d.join("c.json");
    std::fs::copy(&snap, &c_snap).unwrap();
    let c = start_sidecar(
        &sidecar_text(free_port(), upstream.addr, &c_snap, &admin_url, "", ""),
        &sync_key,
        &clock,
    );
    let health = c.health_addr.unwrap();
    let plain = reqwest::blocking::Client::new();
    let started = Instant::now();
    while scrape(
        &plain,
        &format!("http://{health}/metrics"),
        "permiso_sidecar_sync_failures_total{cause=\"tls\"}",
    )
    .unwrap_or(0)
        == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no TLS sync failure counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = get(
        &plain,
        &format!("http://{}/api/v1/trades", c.addr),
        Some(&trader_key),
    )
    .unwrap();
    assert_eq!(r.status(), 200, "serving from the snapshot file");

    // The admin plane's certificate: its expiry on /metrics, and new files served without a
    // restart (the same watch as the sidecar's, here on the admin listener).
    let expiry = || {
        let text = https
            .get(format!("{admin_url}/metrics"))
            .header("X-Admin-Api-Key", ADMIN_KEY)
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("permiso_tls_cert_expiry_seconds{listener=\"admin\"} "))
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    let now = permiso::core::clock::Clock::now_secs(&clock);
    assert_eq!(expiry(), Some(2_208_988_800 - now), "notAfter 2040-01-01");
    let next = ca.server("admin-next", 2041);
    std::fs::copy(&next.key_file, &admin_cert.key_file).unwrap();
    std::fs::copy(&next.cert_file, &admin_cert.cert_file).unwrap();
    let started = Instant::now();
    loop {
        let r = get(
            &https_client(Some(&ca), None),
            &format!("{admin_url}/healthz"),
            None,
        )
        .unwrap();
        let der = r
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .unwrap()
            .to_vec();
        if der == next.der {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the admin plane never served the new certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        expiry(),
        Some(2_240_611_200 - now),
        "notAfter 2041-01-01 (2040 is a leap year)"
    );
    drop((a, b, c, admin));
}

/// A client certificate mapped to a service is its credential: identity headers upstream,
/// scopes enforced, a bearer credential of another service over it refused, and removing the
/// mapping at the admin plane stops it within a second. Identities are unique and canonical.
#[test]
fn a_mapped_client_certificate_authenticates_as_its_service() {
    let h = Harness::start();
    let mt5 = h.create(json!({"service_name": "mt5", "scopes": ["trade:read"],
        "tls_identities": ["SPIFFE://Permiso/mt5", "dns:MT5.internal"]}));
    let acct = h.create(json!({"service_name": "acct", "scopes": ["account:read"],
        "tls_identities": ["spiffe://permiso/acct"]}));
    // Stored in canonical form, shown on the service.
    let (_, v) = h.admin_req(
        reqwest::Method::GET,
        &format!("/auth/admin/services/{}", mt5.service_id),
        None,
    );
    assert_eq!(
        v["tls_identities"],
        json!(["spiffe://permiso/mt5", "dns:mt5.internal"])
    );
    // One identity, one service: 409, and nothing written.
    let (s, v) = h.admin_req(
        reqwest::Method::POST,
        "/auth/admin/services",
        Some(
            json!({"service_name": "thief", "tls_identities": ["spiffe://permiso/MT5", "dns:mt5.internal"]}),
        ),
    );
    assert_eq!((s, v["error"].as_str()), (409, Some("conflict")), "{v}");
    let (s, _) = h.admin_req(reqwest::Method::GET, "/auth/admin/services?limit=100", None);
    assert_eq!(s, 200);
    assert!(
        !h.list_all().to_string().contains("thief"),
        "the refused service was written"
    );
    for bad in ["CN=mt5", "spiffe://permiso/../x", "https://mt5", "dns:*.internal"] {
        let (s, v) = h.admin_req(
            reqwest::Method::PATCH,
            &format!("/auth/admin/services/{}", acct.service_id),
            Some(json!({"tls_identities": [bad]})),
        );
        assert_eq!(
            (s, v["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}: {v}"
        );
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .contains("tls_identities"));
    }

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "site");
    let clients = Ca::new(dir.path(), "clients");
    let server = ca.server("sidecar", 2040);
    let mt5_cert = clients.client("mt5", "spiffe://permiso/mt5");
    let acct_cert = clients.client("acct", "spiffe://permiso/acct");
    let (side, addr) = tls_sidecar(
        &h,
        dir.path(),
        &tls_section("sidecar.tls", &server, Some(&clients), "optional"),
    );
    let url = format!("https://127.0.0.1:{}/api/v1/trades", addr.port());
    let as_mt5 = https_client(Some(&ca), Some(&mt5_cert));
    until_ok(&as_mt5, &url, &mt5.api_key);

    // The certificate alone: mt5, with its identity.
    let r = get(&as_mt5, &url, None).unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().unwrap();
    assert_eq!(echo["headers"]["x-permiso-service-id"], mt5.service_id.as_str());
    assert_eq!(
        echo["headers"]["x-permiso-client-cert-identity"],
        "spiffe://permiso/mt5"
    );
    assert!(echo["headers"].get("authorization").is_none());
    // acct's certificate lacks the route's scope.
    let as_acct = https_client(Some(&ca), Some(&acct_cert));
    let r = get(&as_acct, &url, None).unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().unwrap()["error"], "insufficient_scope");
    // mt5's key over acct's certificate: 401 invalid_token; over its own: 200.
    let r = get(&as_acct, &url, Some(&mt5.api_key)).unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().unwrap()["error"], "invalid_token");
    assert_eq!(get(&as_mt5, &url, Some(&mt5.api_key)).unwrap().status(), 200);
    // A caller sending its own identity header gets it replaced, not forwarded.
    let echo: Value = as_mt5
        .get(&url)
        .header("X-Permiso-Client-Cert-Identity", "spiffe://permiso/admin")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        echo["headers"]["x-permiso-client-cert-identity"],
        "spiffe://permiso/mt5"
    );

    // The mapping removed at the admin plane: the certificate alone is no credential within 1 s.
    let (s, _) = h.admin_req(
        reqwest::Method::PATCH,
        &format!("/auth/admin/services/{}", mt5.service_id),
        Some(json!({"tls_identities": []})),
    );
    assert_eq!(s, 200);
    let started = Instant::now();
    loop {
        let r = get(&as_mt5, &url, None).unwrap();
        if r.status() == 401 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "still {} after 1 s",
            r.status()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!(
        "certificate mapping removal reached the sidecar in {:?}",
        started.elapsed()
    );
    drop(side);
}

/// RFC 8705: a client authenticating with its certificate (`tls_client_auth`) over an mTLS
/// admin plane gets a token bound to that certificate (`cnf.x5t#S256`), which a sidecar only
/// accepts over a connection presenting the same certificate. Introspection shows `cnf`.
#[test]
fn certificate_bound_tokens_work_only_with_their_certificate() {
    use crate::common::{EchoUpstream, ADMIN_KEY};
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "site");
    let clients = Ca::new(d, "clients");
    let clock = permiso::core::clock::ManualClock::starting_now();
    let (admin, admin_url, _) = https_admin(d, &ca, Some(&clients), &clock);
    let https = https_client(Some(&ca), None);
    let admin_post = |path: &str, body: Value| -> Value {
        let r = https
            .post(format!("{admin_url}{path}"))
            .header("X-Admin-Api-Key", ADMIN_KEY)
            .json(&body)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().unwrap()
    };
    let sync_key = admin_post(
        "/auth/admin/services",
        json!({"service_name": "sync", "scopes": ["sync:read"]}),
    )["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let mt5 = admin_post(
        "/auth/admin/services",
        json!({"service_name": "mt5", "scopes": ["trade:read"], "tls_identities": ["spiffe://permiso/mt5"]}),
    );
    let mt5_id = mt5["service_id"].as_str().unwrap().to_string();
    let x = clients.client("mt5", "spiffe://permiso/mt5");
    let y = clients.client("other", "spiffe://permiso/other");
    let meta: Value = get(
        &https,
        &format!("{admin_url}/.well-known/oauth-authorization-server"),
        None,
    )
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(meta["tls_client_certificate_bound_access_tokens"], true);
    assert!(meta["token_endpoint_auth_methods_supported"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "tls_client_auth"));

    // tls_client_auth: client_id in the form, the certificate as the proof.
    let token_with = |cert: &Issued| {
        https_client(Some(&ca), Some(cert))
            .post(format!("{admin_url}/oauth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", mt5_id.as_str()),
            ])
            .send()
            .unwrap()
    };
    let r = token_with(&x);
    assert_eq!(r.status(), 200);
    let bound = r.json::<Value>().unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(bound.split('.').nth(1).unwrap()).unwrap()).unwrap();
    let thumb = permiso::tls::peer::read_peer_cert(&x.der).x5t_s256;
    assert_eq!(payload["cnf"]["x5t#S256"], thumb.as_str());
    // A certificate that is not among the client's identities: invalid_client.
    let r = token_with(&y);
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().unwrap()["error"], "invalid_client");
    // Introspection shows the binding.
    let v: Value = https
        .post(format!("{admin_url}/oauth/introspect"))
        .header("X-Admin-Api-Key", ADMIN_KEY)
        .form(&[("token", bound.as_str())])
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["active"], true);
    assert_eq!(v["cnf"]["x5t#S256"], thumb.as_str());
    // A token asked for with the secret and no certificate is not bound.
    let secret = mt5["client_secret"].as_str().unwrap();
    let free: Value = https
        .post(format!("{admin_url}/oauth/token"))
        .basic_auth(&mt5_id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .unwrap()
        .json()
        .unwrap();
    let free = free["access_token"].as_str().unwrap().to_string();

    // At a sidecar asking for client certificates.
    let upstream = EchoUpstream::start();
    let site = ca.server("sidecar", 2040);
    let side = start_sidecar(
        &sidecar_text(
            free_port(),
            upstream.addr,
            &d.join("s.json"),
            &admin_url,
            &format!("ca_file = \"{}\"", ca.pem_file.display()),
            &tls_section("sidecar.tls", &site, Some(&clients), "optional"),
        ),
        &sync_key,
        &clock,
    );
    let url = format!("https://127.0.0.1:{}/api/v1/trades", side.addr.port());
    let over_x = https_client(Some(&ca), Some(&x));
    until_ok(&over_x, &url, &free);
    assert_eq!(get(&over_x, &url, Some(&bound)).unwrap().status(), 200);
    for (what, c) in [
        ("another certificate", https_client(Some(&ca), Some(&y))),
        ("no certificate", https_client(Some(&ca), None)),
    ] {
        let r = get(&c, &url, Some(&bound)).unwrap();
        assert_eq!(r.status(), 401, "{what}");
        assert_eq!(r.json::<Value>().unwrap()["error"], "invalid_token", "{what}");
        assert_eq!(
            get(&c, &url, Some(&free)).unwrap().status(),
            200,
            "unbound token, {what}"
        );
    }
    let health = side.health_addr.unwrap();
    assert_eq!(
        scrape(
            &reqwest::blocking::Client::new(),
            &format!("http://{health}/metrics"),
            "permiso_sidecar_decisions_total{outcome=\"invalid\",reason=\"certificate_binding_mismatch\"}"
        ),
        Some(2)
    );

    // The oauth2 crate over mTLS: client_secret_basic on a connection with certificate x, so
    // the token is bound to x.
    {
        use oauth2::basic::BasicClient;
        use oauth2::{AuthType, ClientId, ClientSecret, TokenResponse, TokenUrl};
        let client = BasicClient::new(ClientId::new(mt5_id.clone()))
            .set_client_secret(ClientSecret::new(secret.to_string()))
            .set_token_uri(TokenUrl::new(format!("{admin_url}/oauth/token")).unwrap())
            .set_auth_type(AuthType::BasicAuth);
        let tok = client.exchange_client_credentials().request(&over_x).unwrap();
        let t = tok.access_token().secret().clone();
        assert_eq!(get(&over_x, &url, Some(&t)).unwrap().status(), 200);
        let over_y = https_client(Some(&ca), Some(&y));
        assert_eq!(get(&over_y, &url, Some(&t)).unwrap().status(), 401);
    }

    // Python `requests` with a client certificate: tls_client_auth, then the bound token with
    // and without the certificate.
    let py = crate::common::python_venv("requests-venv", "requests", "requests==2.32.*");
    let script = r#"
import json, sys, requests
admin, sidecar, ca, cert, key, client_id = sys.argv[1:7]
r = requests.post(admin + "/oauth/token", cert=(cert, key), verify=ca,
                  data={"grant_type": "client_credentials", "client_id": client_id})
token = r.json()["access_token"]
h = {"Authorization": "Bearer " + token}
with_cert = requests.get(sidecar, headers=h, cert=(cert, key), verify=ca).status_code
without = requests.get(sidecar, headers=h, verify=ca).status_code
print(json.dumps([r.status_code, with_cert, without]))
"#;
    let out = std::process::Command::new(py)
        .args(["-c", script, &admin_url, &url])
        .arg(&ca.pem_file)
        .arg(&x.cert_file)
        .arg(&x.key_file)
        .arg(&mt5_id)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let statuses: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        statuses,
        json!([200, 200, 401]),
        "token, with the certificate, without"
    );
    drop((side, admin));
}

/// A port scan against the TLS listener (plain HTTP, bare connects, a client certificate from
/// another CA) is counted exactly, and pingora's ERROR line for each failed handshake reaches
/// the log at most once per 10 s. A real `permiso sidecar` process: the counting lives in
/// the binary's log setup.
#[test]
fn failed_handshakes_are_counted_and_logged_once_per_window() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "site");
    let stranger = Ca::new(d, "stranger");
    let site = ca.server("sidecar", 2040);
    let (listen, health) = (free_port(), free_port());
    let key = permiso::core::key::generate(permiso::core::key::Environment::Live);
    std::fs::write(d.join("sync.key"), key.secret.expose()).unwrap();
    // No admin plane: the listener serves while the sync retries.
    let text = format!(
        "[sidecar]\nlisten = \"{listen}\"\nupstream = \"127.0.0.1:9\"\nsnapshot_file = \"{}\"\nadmin_listen = \"{health}\"\n\
         [sidecar.sync]\nadmin_url = \"http://127.0.0.1:9\"\ncredential_file = \"{}\"\n{}{ROUTES}",
        d.join("snap.json").display(),
        d.join("sync.key").display(),
        tls_section("sidecar.tls", &site, Some(&ca), "optional"),
    );
    std::fs::write(d.join("sidecar.toml"), text).unwrap();
    let _sidecar = crate::common::spawn(
        d,
        "sidecar",
        env!("CARGO_BIN_EXE_permiso"),
        &[
            "sidecar",
            "--config",
            &d.join("sidecar.toml").display().to_string(),
        ],
    );
    let plain = reqwest::blocking::Client::new();
    crate::common::wait_ok(&plain, &format!("http://{health}/healthz"), "sidecar");
    let started = Instant::now();
    // A handshake that works is not counted. The health listener can answer before pingora's
    // listener is bound: a refused connection (never accepted, so never counted) is tried
    // again, nothing else.
    let client = https_client(Some(&ca), None);
    let url = format!("https://127.0.0.1:{}/api/v1/trades", listen.port());
    let r = loop {
        match get(&client, &url, None) {
            Err(e) if e.is_connect() && started.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => break r.unwrap(),
        }
    };
    assert_eq!(r.status(), 401, "no credential");
    let mut attempts = 0;
    for _ in 0..20 {
        let mut s = TcpStream::connect(listen).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        attempts += 1;
    }
    for _ in 0..10 {
        drop(TcpStream::connect(listen).unwrap());
        attempts += 1;
    }
    let foreign = stranger.client("intruder", "spiffe://permiso/intruder");
    for _ in 0..10 {
        let r = https_client(Some(&ca), Some(&foreign))
            .get(format!("https://127.0.0.1:{}/api/v1/trades", listen.port()))
            .send();
        assert!(r.is_err(), "a certificate from another CA got an answer");
        attempts += 1;
    }
    let counted = || {
        scrape(
            &plain,
            &format!("http://{health}/metrics"),
            "permiso_tls_handshake_failures_total",
        )
        .unwrap()
    };
    let waiting = Instant::now();
    while counted() < attempts {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "{} of {attempts} failed handshakes counted",
            counted()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counted(), attempts, "only the failed handshakes are counted");
    let log = std::fs::read_to_string(d.join("sidecar.log")).unwrap();
    let lines = log.matches("Downstream handshake").count() as u64;
    let windows = 1 + started.elapsed().as_secs() / 10;
    assert!(
        (1..=windows).contains(&lines),
        "{lines} handshake lines logged for {attempts} failures over {windows} window(s)"
    );
}
