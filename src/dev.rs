//! `permiso dev`: the admin plane (temporary SQLite file), the demo MT5 API and a sidecar in
//! one process, with copy-paste curl lines. `--self-test` runs that walkthrough itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::TryRngCore;
use serde_json::{json, Value};

use crate::config::{self, AdminConfig, SidecarConfig};
use crate::core::clock::{SharedClock, SystemClock};
use crate::core::key::Secret;

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Admin plane port.
    #[arg(long, default_value_t = 8000)]
    pub admin_port: u16,
    /// Demo MT5 API port.
    #[arg(long, default_value_t = 8001)]
    pub upstream_port: u16,
    /// Sidecar port.
    #[arg(long, default_value_t = 9001)]
    pub sidecar_port: u16,
    /// The sidecar's /readyz, /healthz and /metrics port (0: any free one, printed).
    #[arg(long, default_value_t = 0)]
    pub health_port: u16,
    /// Run the walkthrough (create, call, 401/403, rotate, revoke) and exit.
    #[arg(long)]
    pub self_test: bool,
    /// Serve everything over HTTPS with a throwaway CA, server and client certificates
    /// (generated into the temporary directory); adds the mTLS and RFC 8705 steps.
    #[arg(long)]
    pub tls: bool,
}

/// The identity of the demo client certificate.
const CLIENT_IDENTITY: &str = "spiffe://permiso/trading-dashboard";

const SHIPPED_CONFIG: &str = include_str!("../config.toml");

fn random_admin_key() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut b)
        .expect("OS CSPRNG unavailable");
    format!("adm_{}", URL_SAFE_NO_PAD.encode(b))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> anyhow::Result<TempDir> {
    let mut b = [0u8; 6];
    rand::rngs::OsRng
        .try_fill_bytes(&mut b)
        .expect("OS CSPRNG unavailable");
    let p = std::env::temp_dir().join(format!(
        "permiso-dev-{}-{}",
        std::process::id(),
        URL_SAFE_NO_PAD.encode(b)
    ));
    std::fs::create_dir_all(&p)?;
    Ok(TempDir(p))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn server_tls(pki: &crate::tls::dev_pki::DevPki) -> config::file::ServerTls {
    config::file::ServerTls {
        cert_file: pki.server_cert.display().to_string(),
        key_file: pki.server_key.display().to_string(),
        client_ca_file: Some(pki.ca.display().to_string()),
        client_auth: config::file::ClientAuthMode::Optional,
    }
}

fn sidecar_config(
    dir: &Path,
    args: &DevArgs,
    admin_url: &str,
    pki: Option<&crate::tls::dev_pki::DevPki>,
    credential: Secret,
) -> anyhow::Result<SidecarConfig> {
    let mut file = config::parse_file(SHIPPED_CONFIG, Path::new("config.toml"))?;
    let sc = file
        .sidecar
        .as_mut()
        .context("shipped config.toml has no [sidecar]")?;
    sc.listen = local(args.sidecar_port).to_string();
    sc.upstream = local(args.upstream_port).to_string();
    sc.snapshot_file = dir.join("snapshot.json").display().to_string();
    // Health and metrics too, on the port the banner prints.
    sc.admin_listen = Some(local(args.health_port).to_string());
    sc.sync.admin_url = admin_url.to_string();
    if let Some(pki) = pki {
        sc.tls = Some(server_tls(pki));
        sc.sync.ca_file = Some(pki.ca.display().to_string());
    }
    Ok(SidecarConfig::from_file(sc, credential)?)
}

pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let clock: SharedClock = Arc::new(SystemClock);
    let admin_key = random_admin_key();
    let file = config::parse_file(SHIPPED_CONFIG, Path::new("config.toml"))?;
    let pki = if args.tls {
        Some(crate::tls::dev_pki::DevPki::generate(&dir.0, CLIENT_IDENTITY)?)
    } else {
        None
    };
    let scheme = if pki.is_some() { "https" } else { "http" };
    let mut admin_file = file.admin_plane;
    admin_file.listen = local(args.admin_port).to_string();
    admin_file.database = dir.0.join("permiso.db").display().to_string();
    // The walkthrough shows the console too.
    admin_file.console = true;
    admin_file.tls = pki.as_ref().map(server_tls);
    let admin_cfg = AdminConfig::from_file(&admin_file, Some(admin_key.clone()))?;
    let admin = crate::admin::start(admin_cfg, clock.clone())
        .with_context(|| format!("starting the admin plane on port {}", args.admin_port))?;
    let admin_url = format!("{scheme}://{}", admin.addr);

    let rt = tokio::runtime::Runtime::new()?;
    let upstream_addr = local(args.upstream_port);
    let upstream_listener = std::net::TcpListener::bind(upstream_addr)
        .with_context(|| format!("binding the demo MT5 API on {upstream_addr}"))?;
    upstream_listener.set_nonblocking(true)?;
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(upstream_listener).expect("listener");
        let _ = axum::serve(l, crate::demo_upstream::router()).await;
    });

    // Trusts the throwaway CA in --tls mode; `with_cert` also presents the client certificate.
    let client_tls = |with_cert: bool| crate::tls::ClientTls {
        ca_file: pki.as_ref().map(|p| p.ca.clone()),
        client_cert_file: pki.as_ref().filter(|_| with_cert).map(|p| p.client_cert.clone()),
        client_key_file: pki.as_ref().filter(|_| with_cert).map(|p| p.client_key.clone()),
    };
    let http = crate::tls::client::http_client(&client_tls(false), reqwest::Client::builder())?;
    let with_cert = crate::tls::client::http_client(&client_tls(true), reqwest::Client::builder())?;
    let sync_key = rt.block_on(async {
        let r = http
            .post(format!("{admin_url}/auth/admin/services"))
            .header("X-Admin-Api-Key", &admin_key)
            .json(
                &json!({"service_name": "permiso-sidecar-mt5", "scopes": ["sync:read"],
                          "description": "the MT5 sidecar's sync credential"}),
            )
            .send()
            .await?;
        let v: Value = r.error_for_status()?.json().await?;
        anyhow::Ok(v["api_key"].as_str().context("no api_key")?.to_string())
    })?;
    let sidecar_cfg = sidecar_config(&dir.0, &args, &admin_url, pki.as_ref(), Secret::new(sync_key))?;
    let sidecar = crate::sidecar::start(sidecar_cfg, clock)?;
    let sidecar_url = format!("{scheme}://{}", sidecar.addr);
    let health_url = sidecar
        .health_addr
        .map(|a| format!("http://{a}"))
        .context("the sidecar's health listener")?;

    let curl = match &pki {
        Some(p) => format!("curl --cacert {}", p.ca.display()),
        None => "curl".to_string(),
    };
    print_banner(
        &admin_url,
        &sidecar_url,
        &health_url,
        &admin_key,
        upstream_addr,
        &curl,
    );
    if let Some(p) = &pki {
        print_tls_banner(&admin_url, &sidecar_url, &curl, p);
    }

    let result = if args.self_test {
        rt.block_on(async {
            self_test(&http, &admin_url, &sidecar_url, &admin_key).await?;
            // The sidecar's own health and metrics (plain HTTP, on loopback).
            let plain = reqwest::Client::new();
            expect(
                "sidecar /readyz",
                plain.get(format!("{health_url}/readyz")).send().await?,
                200,
            )
            .await?;
            let metrics = plain
                .get(format!("{health_url}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            if !metrics.contains("permiso_sidecar_decisions_total{outcome=\"allowed\"") {
                bail!("sidecar /metrics has no decisions");
            }
            println!("ok  sidecar /metrics: {} bytes", metrics.len());
            if pki.is_some() {
                mtls_self_test(&http, &with_cert, &admin_url, &sidecar_url, &admin_key).await?;
            }
            println!("self-test passed");
            anyhow::Ok(())
        })
    } else {
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        Ok(())
    };
    drop(sidecar);
    admin.stop();
    drop(rt);
    drop(dir);
    result
}

fn print_tls_banner(admin: &str, sidecar: &str, curl: &str, p: &crate::tls::dev_pki::DevPki) {
    let cert = format!(
        "--cert {} --key {}",
        p.client_cert.display(),
        p.client_key.display()
    );
    println!(
        r#"# 8. mTLS: give the service the demo client certificate's identity; the certificate alone
#    is then its credential (X-Permiso-Client-Cert-Identity upstream).
{curl} -s -X PATCH {admin}/auth/admin/services/$SID -H "X-Admin-Api-Key: $ADMIN_KEY" \
  -H 'Content-Type: application/json' -d '{{"tls_identities":["{CLIENT_IDENTITY}"]}}'
{curl} {cert} -s {sidecar}/api/v1/trades

# 9. RFC 8705: a token asked for with the certificate is bound to it (cnf.x5t#S256).
{curl} {cert} -s -X POST {admin}/oauth/token -d grant_type=client_credentials -d client_id=$SID
{curl} {cert} -s {sidecar}/api/v1/trades -H "Authorization: Bearer <access_token>"   # 200
{curl} -si {sidecar}/api/v1/trades -H "Authorization: Bearer <access_token>"   # 401 without it
"#
    );
}

fn print_banner(admin: &str, sidecar: &str, health: &str, admin_key: &str, upstream: SocketAddr, curl: &str) {
    let ca_arg = curl
        .strip_prefix("curl --cacert ")
        .map(|ca| format!(" --ca-file {ca}"))
        .unwrap_or_default();
    println!(
        r#"
Permiso dev is running (Ctrl-C stops it; all state is temporary).

  admin plane   {admin}
  web console   {admin}/console   (sign in with the admin key below)
  sidecar       {sidecar}   (its /readyz and /metrics: {health})
  demo MT5 API  http://{upstream}   (on loopback and unprotected itself: callers go through
                the sidecar; in a deployment, bind the service where only its sidecar reaches it)

export ADMIN={admin} SIDECAR={sidecar} ADMIN_KEY='{admin_key}'

# 1. Create a service account; its key and client secret are shown only in this response
#    (with jq, the line below exports them; else copy api_key, service_id, client_secret).
eval "$({curl} -s -X POST $ADMIN/auth/admin/services -H "X-Admin-Api-Key: $ADMIN_KEY" \
  -H 'Content-Type: application/json' \
  -d '{{"service_name":"trading-dashboard","scopes":["trade:read","account:read","market:data"]}}' \
  | jq -r '"export KEY=\(.api_key) SID=\(.service_id) SECRET=\(.client_secret)"')"

# 2. Call the MT5 API through the sidecar: 200, with the caller identified upstream.
{curl} -s $SIDECAR/api/v1/trades -H "Authorization: Bearer $KEY"

# 3. Denials: no key -> 401; missing scope trade:open -> 403; unknown route -> 403.
{curl} -si $SIDECAR/api/v1/trades
{curl} -si -X POST $SIDECAR/api/v1/trades -H "Authorization: Bearer $KEY"
{curl} -si $SIDECAR/internal -H "Authorization: Bearer $KEY"

# 4. Rotate: a new key; the old one keeps working for the grace window (7 days by default).
{curl} -s -X POST $ADMIN/auth/admin/services/$SID/rotate -H "X-Admin-Api-Key: $ADMIN_KEY"

# 5. OAuth2 client credentials (client_id is the service id): GET /api/v1/trades needs
#    trade:read and account:read, so ask for both (space-separated).
TOKEN=$({curl} -s -X POST $ADMIN/oauth/token -u "$SID:$SECRET" \
  -d grant_type=client_credentials -d 'scope=trade:read account:read' | jq -r .access_token)
{curl} -s $SIDECAR/api/v1/trades -H "Authorization: Bearer $TOKEN"

# 6. Revoke a key by id (GET $ADMIN/auth/admin/services/$SID lists them): it stops at once.
{curl} -s -X POST $ADMIN/auth/admin/services/$SID/keys/<key_id>/revoke -H "X-Admin-Api-Key: $ADMIN_KEY"

# 7. What happened: the hash-chained audit log, checked client-side, and the metrics.
export PERMISO_ADMIN_URL={admin} PERMISO_ADMIN_API_KEY=$ADMIN_KEY
cargo run --release -- audit{ca_arg} && cargo run --release -- audit verify{ca_arg}
{curl} -s {admin}/metrics | grep '^permiso_admin_http_requests_total'
"#
    );
}

async fn expect(step: &str, resp: reqwest::Response, status: u16) -> anyhow::Result<Value> {
    let got = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if got != status {
        bail!("{step}: expected {status}, got {got}: {body}");
    }
    println!("ok  {step}: {got}");
    Ok(body)
}

/// Polls until `url` answers `status` for `bearer` (changes reach the sidecar by long-poll).
async fn wait_for(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
    status: u16,
    within: Duration,
    step: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let got = http.get(url).bearer_auth(bearer).send().await?.status().as_u16();
        if got == status {
            println!("ok  {step}: {status} after {} ms", start.elapsed().as_millis());
            return Ok(());
        }
        if start.elapsed() > within {
            bail!(
                "{step}: still {got}, not {status}, after {} ms",
                within.as_millis()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn self_test(
    http: &reqwest::Client,
    admin: &str,
    sidecar: &str,
    admin_key: &str,
) -> anyhow::Result<()> {
    let created = expect(
        "create service",
        http.post(format!("{admin}/auth/admin/services"))
            .header("X-Admin-Api-Key", admin_key)
            .json(&json!({"service_name": "trading-dashboard", "scopes": ["trade:read", "account:read", "market:data"]}))
            .send()
            .await?,
        201,
    )
    .await?;
    let key = created["api_key"].as_str().context("api_key")?.to_string();
    let sid = created["service_id"].as_str().context("service_id")?.to_string();
    let old_key_id = created["key_id"].as_str().context("key_id")?.to_string();
    let trades = format!("{sidecar}/api/v1/trades");

    // The new key reaches the sidecar through the long poll.
    wait_for(
        http,
        &trades,
        &key,
        200,
        Duration::from_secs(2),
        "call with the new key",
    )
    .await?;
    expect("no key", http.get(&trades).send().await?, 401).await?;
    expect(
        "missing scope trade:open",
        http.post(&trades).bearer_auth(&key).send().await?,
        403,
    )
    .await?;
    expect(
        "unknown route",
        http.get(format!("{sidecar}/internal"))
            .bearer_auth(&key)
            .send()
            .await?,
        403,
    )
    .await?;
    // Seed 002's admin endpoint: trusted service clients only.
    let admin_stats = format!("{sidecar}/api/v1/admin/stats");
    expect(
        "untrusted caller on a trusted route",
        http.get(&admin_stats).bearer_auth(&key).send().await?,
        403,
    )
    .await?;
    let ops = expect(
        "create a trusted service",
        http.post(format!("{admin}/auth/admin/services"))
            .header("X-Admin-Api-Key", admin_key)
            .json(&json!({"service_name": "ops-console", "scopes": ["admin:system"], "is_trusted": true}))
            .send()
            .await?,
        201,
    )
    .await?;
    let ops_key = ops["api_key"].as_str().context("api_key")?.to_string();
    wait_for(
        http,
        &admin_stats,
        &ops_key,
        200,
        Duration::from_secs(2),
        "trusted caller on a trusted route",
    )
    .await?;
    let rotated = expect(
        "rotate",
        http.post(format!("{admin}/auth/admin/services/{sid}/rotate"))
            .header("X-Admin-Api-Key", admin_key)
            .send()
            .await?,
        200,
    )
    .await?;
    let new_key = rotated["api_key"].as_str().context("api_key")?.to_string();
    println!("    old key works until {}", rotated["old_keys_expire_at"]);
    wait_for(
        http,
        &trades,
        &new_key,
        200,
        Duration::from_secs(2),
        "call with the rotated key",
    )
    .await?;
    expect(
        "old key during grace",
        http.get(&trades).bearer_auth(&key).send().await?,
        200,
    )
    .await?;
    expect(
        "new key",
        http.get(&trades).bearer_auth(&new_key).send().await?,
        200,
    )
    .await?;
    expect(
        "revoke old key",
        http.post(format!(
            "{admin}/auth/admin/services/{sid}/keys/{old_key_id}/revoke"
        ))
        .header("X-Admin-Api-Key", admin_key)
        .send()
        .await?,
        200,
    )
    .await?;
    wait_for(
        http,
        &trades,
        &key,
        401,
        Duration::from_secs(1),
        "revoked key refused",
    )
    .await?;
    expect(
        "new key still works",
        http.get(&trades).bearer_auth(&new_key).send().await?,
        200,
    )
    .await?;

    // OAuth2 client credentials: a JWT checked locally by the sidecar.
    let secret = created["client_secret"].as_str().context("client_secret")?;
    let tok = expect(
        "client credentials token",
        http.post(format!("{admin}/oauth/token"))
            .basic_auth(&sid, Some(secret))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "trade:read account:read"),
            ])
            .send()
            .await?,
        200,
    )
    .await?;
    let jwt = tok["access_token"].as_str().context("access_token")?.to_string();
    expect(
        "call with the JWT",
        http.get(&trades).bearer_auth(&jwt).send().await?,
        200,
    )
    .await?;
    expect(
        "JWT lacks market:data",
        http.get(format!("{sidecar}/api/v1/market/EURUSD"))
            .bearer_auth(&jwt)
            .send()
            .await?,
        403,
    )
    .await?;
    expect(
        "revoke the JWT",
        http.post(format!("{admin}/oauth/revoke"))
            .basic_auth(&sid, Some(secret))
            .form(&[("token", jwt.as_str())])
            .send()
            .await?,
        200,
    )
    .await?;
    wait_for(
        http,
        &trades,
        &jwt,
        401,
        Duration::from_secs(1),
        "revoked JWT refused",
    )
    .await?;
    // Every change above is in the audit log, and the chain verifies from the API's output.
    let page = expect(
        "read the audit log",
        http.get(format!("{admin}/auth/admin/audit?limit=1000"))
            .header("X-Admin-Api-Key", admin_key)
            .send()
            .await?,
        200,
    )
    .await?;
    let entries: Vec<crate::core::audit::AuditEntry> = serde_json::from_value(page["entries"].clone())?;
    let mut chain = crate::core::audit::Verifier::default();
    for e in &entries {
        chain.push(e)?;
    }
    let head = chain.finish();
    let revocations = entries.iter().filter(|e| e.action.ends_with(".revoke")).count();
    anyhow::ensure!(
        revocations >= 2,
        "the key and token revocations are not in the audit log"
    );
    println!(
        "ok  audit chain intact: {} entries, head {}:{}",
        head.entries,
        head.seq,
        &head.hash[..16]
    );
    Ok(())
}

/// The `--tls` steps: a certificate as the service's credential, and a token bound to it.
async fn mtls_self_test(
    http: &reqwest::Client,
    with_cert: &reqwest::Client,
    admin: &str,
    sidecar: &str,
    admin_key: &str,
) -> anyhow::Result<()> {
    let list = expect(
        "list services",
        http.get(format!("{admin}/auth/admin/services"))
            .header("X-Admin-Api-Key", admin_key)
            .send()
            .await?,
        200,
    )
    .await?;
    let sid = list["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["service_name"] == "trading-dashboard"))
        .and_then(|s| s["service_id"].as_str())
        .context("the walkthrough's service")?
        .to_string();
    let trades = format!("{sidecar}/api/v1/trades");
    expect(
        "certificate before it is mapped",
        with_cert.get(&trades).send().await?,
        401,
    )
    .await?;
    expect(
        "map the certificate's identity",
        http.patch(format!("{admin}/auth/admin/services/{sid}"))
            .header("X-Admin-Api-Key", admin_key)
            .json(&json!({ "tls_identities": [CLIENT_IDENTITY] }))
            .send()
            .await?,
        200,
    )
    .await?;
    let start = Instant::now();
    loop {
        let got = with_cert.get(&trades).send().await?.status().as_u16();
        if got == 200 {
            println!(
                "ok  the certificate alone: 200 after {} ms",
                start.elapsed().as_millis()
            );
            break;
        }
        if start.elapsed() > Duration::from_secs(2) {
            bail!("the certificate alone: still {got}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let tok = expect(
        "token by tls_client_auth",
        with_cert
            .post(format!("{admin}/oauth/token"))
            .form(&[("grant_type", "client_credentials"), ("client_id", sid.as_str())])
            .send()
            .await?,
        200,
    )
    .await?;
    let bound = tok["access_token"].as_str().context("access_token")?.to_string();
    expect(
        "bound token with its certificate",
        with_cert.get(&trades).bearer_auth(&bound).send().await?,
        200,
    )
    .await?;
    expect(
        "bound token without its certificate",
        http.get(&trades).bearer_auth(&bound).send().await?,
        401,
    )
    .await?;
    Ok(())
}
