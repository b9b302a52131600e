//! The sidecar: a pingora reverse proxy in front of one service, enforcing the key snapshot
//! that `sync_client` keeps current. `start` runs it on background threads (tests, `permiso
//! dev`); `run` runs it in the foreground with pingora's signal handling.

pub mod drain;
pub mod egress;
pub mod fleet_report;
pub mod forward;
pub mod h1;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod passthrough;
pub mod policy;
pub mod ratelimit;
pub mod snapshot_file;
pub mod state;
pub mod sync_client;
pub mod usage_report;

use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::watch;

use crate::config::SidecarConfig;
use crate::core::clock::SharedClock;
use crate::core::snapshot::Snapshot;
use crate::core::token_cache::TokenCache;
use state::Shared;
use sync_client::{EarlySync, SyncClient};

/// Loads the snapshot file, if any. A bad file (one that does not verify under this sync
/// credential included) is refused with a log line and the sidecar starts without a snapshot
/// (failing closed until the first sync) rather than trusting it.
fn initial_snapshot(
    cfg: &SidecarConfig,
    key: &snapshot_file::FileKey,
) -> Option<(Arc<Snapshot>, i64, Option<String>)> {
    match snapshot_file::load_with_instance(&cfg.snapshot_file, cfg.environment, key) {
        Ok(Some((s, written_at, instance))) => {
            tracing::info!(path = %cfg.snapshot_file.display(), version = s.version, keys = s.key_count(), written_at, "loaded snapshot file");
            Some((Arc::new(s), written_at, instance))
        }
        Ok(None) => {
            tracing::warn!(path = %cfg.snapshot_file.display(), "no snapshot file; protected routes answer 503 until the first sync");
            None
        }
        Err(e) => {
            tracing::error!(path = %cfg.snapshot_file.display(), error = %e, "refusing snapshot file; protected routes answer 503 until the first sync");
            None
        }
    }
}

/// pingora settings shared by the sidecar and the bare passthrough it is benchmarked against.
pub(crate) fn server_conf(threads: usize, shutdown_grace: Duration) -> ServerConf {
    ServerConf {
        threads,
        grace_period_seconds: Some(shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(2),
        ..ServerConf::default()
    }
}

fn live_of(cfg: &SidecarConfig) -> state::Live {
    state::Live {
        routes: cfg.routes.clone(),
        forwarded_for: cfg.forwarded_for,
        upstream: cfg.upstream,
        tokens: cfg.tokens.clone(),
    }
}

/// Settings a reload cannot change (they are bound to sockets, threads, files or the sync
/// loop); a reload that changes them applies the rest and says which ones wait for a restart.
fn needs_restart(old: &SidecarConfig, new: &SidecarConfig) -> Vec<&'static str> {
    let (o, n) = (old, new);
    [
        (o.listen != n.listen, "listen"),
        (o.admin_listen != n.admin_listen, "admin_listen"),
        (o.threads != n.threads, "threads"),
        (
            o.max_requests_per_connection != n.max_requests_per_connection,
            "max_requests_per_connection",
        ),
        (o.shutdown_grace != n.shutdown_grace, "shutdown_grace_seconds"),
        (
            o.header_read_timeout != n.header_read_timeout,
            "header_read_timeout_ms",
        ),
        (o.idle_timeout != n.idle_timeout, "idle_timeout_ms"),
        (o.body_rate_grace != n.body_rate_grace, "body_rate_grace_ms"),
        (
            o.body_min_rate != n.body_min_rate,
            "body_min_rate_bytes_per_second",
        ),
        (o.max_connections != n.max_connections, "max_connections"),
        (o.rate_limit != n.rate_limit, "rate_limit"),
        (o.environment != n.environment, "environment"),
        (o.snapshot_file != n.snapshot_file, "snapshot_file"),
        (
            o.ready_max_snapshot_age != n.ready_max_snapshot_age,
            "ready_max_snapshot_age_seconds",
        ),
        (
            o.metrics_max_service_labels != n.metrics_max_service_labels,
            "metrics_max_service_labels",
        ),
        (
            o.usage_report_interval != n.usage_report_interval,
            "usage_report_interval_ms",
        ),
        (o.admin_url != n.admin_url, "sync.admin_url"),
        (
            o.tls != n.tls,
            "tls (listener settings; new certificate files reload live)",
        ),
        (o.sync_tls != n.sync_tls, "sync TLS settings"),
        (o.sync_wait != n.sync_wait, "sync.wait_seconds"),
        (
            o.sync_credential.expose() != n.sync_credential.expose(),
            "sync credential",
        ),
        (
            o.tokens.cache_entries != n.tokens.cache_entries,
            "tokens.cache_entries",
        ),
        (
            o.tokens.early_sync_min_interval != n.tokens.early_sync_min_interval,
            "tokens.early_sync_min_interval_ms",
        ),
    ]
    .into_iter()
    .filter_map(|(changed, name)| changed.then_some(name))
    .chain(egress_needs_restart(o.egress.as_ref(), n.egress.as_ref()))
    .collect()
}

/// Egress takes up new credentials on a reload; its listener, limits and the set of
/// destinations (names and URLs) are bound at start.
fn egress_needs_restart(
    o: Option<&crate::config::EgressConfig>,
    n: Option<&crate::config::EgressConfig>,
) -> Vec<&'static str> {
    let (o, n) = match (o, n) {
        (None, None) => return vec![],
        (Some(o), Some(n)) => (o, n),
        _ => return vec!["egress"],
    };
    let places = |e: &crate::config::EgressConfig| -> Vec<(String, String)> {
        let mut v: Vec<_> = e
            .destinations
            .iter()
            .map(|d| (d.name.clone(), d.url.clone()))
            .collect();
        v.sort();
        v
    };
    [
        (o.listen != n.listen, "egress.listen"),
        (o.retry_deadline != n.retry_deadline, "egress.retry_deadline_ms"),
        (
            o.request_timeout != n.request_timeout,
            "egress.request_timeout_ms",
        ),
        (o.max_body_bytes != n.max_body_bytes, "egress.max_body_bytes"),
        (
            o.breaker_failures != n.breaker_failures,
            "egress.breaker_failures",
        ),
        (
            o.breaker_cooldown != n.breaker_cooldown,
            "egress.breaker_cooldown_ms",
        ),
        (
            places(o) != places(n),
            "egress.destinations (names, urls and TLS settings)",
        ),
    ]
    .into_iter()
    .filter_map(|(changed, name)| changed.then_some(name))
    .collect()
}

/// Replaces the live part (routes, upstream, token checks) of a running sidecar. In-flight
/// requests finish with the settings they started with; no connection is dropped.
pub struct Reloader {
    shared: Arc<Shared>,
    /// The listener's and the clients' (sync, egress) certificates, re-read on every reload.
    certs: Mutex<Vec<Arc<crate::tls::ReloadingCert>>>,
    /// Takes up the destinations' credentials (a rotated key file is read again).
    egress: Option<Arc<egress::Egress>>,
    /// The config the process started with: what restart-only settings still are.
    started: SidecarConfig,
}

impl Reloader {
    /// `next` has been validated already (`SidecarConfig::from_file`): a bad file never gets
    /// here, and the running config stays. Cached access tokens are re-judged against the new
    /// audience on their next use (the cache keeps each token's `aud`). Egress credentials
    /// are replaced for every destination still at its URL.
    pub fn apply(&self, next: SidecarConfig) {
        let pending = needs_restart(&self.started, &next);
        for c in self.certs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            // A bad new pair is refused (and logged) inside; the old one stays.
            let _ = c.reload();
        }
        self.shared.live.store(Arc::new(live_of(&next)));
        if let (Some(eg), Some(cfg)) = (&self.egress, &next.egress) {
            let replaced = eg.reload_credentials(cfg);
            if !replaced.is_empty() {
                tracing::info!(destinations = ?replaced, "egress credentials replaced");
            }
        }
        tracing::info!(upstream = %next.upstream, routes = next.routes.len(), "config reloaded");
        if !pending.is_empty() {
            tracing::warn!(settings = ?pending, "config reload: these settings only change on restart");
        }
    }
}

struct Parts {
    server: Server,
    reloader: Arc<Reloader>,
    egress: Option<Arc<egress::Egress>>,
    sync: SyncClient,
    usage: usage_report::UsageReporter,
    health: health::Health,
}

fn build(cfg: &SidecarConfig, clock: SharedClock) -> anyhow::Result<Parts> {
    check_port_free(cfg.listen)?;
    let file_key = snapshot_file::FileKey::from_credential(&cfg.sync_credential);
    // A snapshot from the file is as old as its authenticated write time (not the file's
    // mtime, which anyone who can write the file can set).
    let (initial, loaded_at, instance) = match initial_snapshot(cfg, &file_key) {
        Some((s, written_at, instance)) => (Some(s), written_at, instance),
        None => (None, 0, None),
    };
    let instance_id: Arc<str> = Arc::from(instance.unwrap_or_else(fleet_report::new_instance_id));
    tracing::info!(instance_id = %instance_id, "sidecar instance");
    let departed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let last_sync = Arc::new(std::sync::atomic::AtomicI64::new(loaded_at));
    let write_failing_since = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let current = Arc::new(ArcSwapOption::new(initial));
    let token_cache = Arc::new(TokenCache::new(cfg.tokens.cache_entries));
    let early = Arc::new(EarlySync::new(cfg.tokens.early_sync_min_interval));
    let metrics = Arc::new(metrics::SidecarMetrics::new(cfg.metrics_max_service_labels));
    let shared = Arc::new(Shared {
        snapshot: current.clone(),
        live: ArcSwap::from_pointee(live_of(cfg)),
        environment: cfg.environment,
        clock: clock.clone(),
        token_cache: token_cache.clone(),
        early_sync: early.clone(),
        request_ids: Default::default(),
        limiter: crate::sidecar::ratelimit::SidecarLimiter::new(
            &cfg.rate_limit,
            std::env::var("PERMISO_REDIS_PASSWORD").ok(),
            &metrics,
            clock.clone(),
        )?,
        metrics: metrics.clone(),
    });
    let mut server = Server::new_with_opt_and_conf(None, server_conf(cfg.threads, cfg.shutdown_grace));
    server.bootstrap();
    let egress = cfg
        .egress
        .as_ref()
        .map(|e| egress::Egress::new(e, &cfg.sync_tls, &metrics).map(Arc::new))
        .transpose()?;
    let reloader = Arc::new(Reloader {
        shared: shared.clone(),
        certs: Mutex::new(Vec::new()),
        egress: egress.clone(),
        started: cfg.clone(),
    });
    let (fd_soft, fd_hard) = listener::raise_fd_limit();
    let max_connections = listener::fit_max_connections(cfg.max_connections, fd_soft);
    if max_connections < cfg.max_connections {
        tracing::warn!(
            wanted = cfg.max_connections,
            max_connections,
            fd_soft,
            fd_hard,
            "max_connections lowered to fit the file-descriptor limit"
        );
    }
    tracing::info!(fd_soft, fd_hard, max_connections, "file-descriptor limit");
    let connections = crate::conn_limit::ConnTable::new(max_connections);
    let mut service = pingora::services::listening::Service::new(
        "permiso sidecar".to_string(),
        h1::H1Sidecar {
            gate: h1::Gate::Policy(shared.clone()),
            metrics: metrics.clone(),
            table: connections.clone(),
            limits: h1::ConnLimits {
                header_read_timeout: cfg.header_read_timeout,
                idle_timeout: cfg.idle_timeout,
                body_rate_grace: cfg.body_rate_grace,
                body_min_rate: cfg.body_min_rate,
                max_requests: cfg.max_requests_per_connection,
            },
        },
    );
    let mut certs = Vec::new();
    match &cfg.tls {
        Some(t) => {
            let cert = crate::tls::ReloadingCert::load("sidecar", t.cert_file.clone(), t.key_file.clone())?;
            // pingora's rustls listener: TLS 1.2 and 1.3 only; our resolver (reloaded without a
            // restart) and client-certificate verifier.
            // The callback reads a client certificate's identities once per connection.
            let mut settings = pingora::listeners::tls::TlsSettings::with_callbacks(Box::new(
                crate::tls::peer::PeerCertCallback,
            ))?;
            settings.set_cert_resolver(cert.clone());
            if let Some(v) = crate::tls::client_verifier(t)? {
                settings.set_client_cert_verifier(v);
            }
            settings.set_alpn(pingora::listeners::ALPN::H1);
            service.add_tls_with_settings(&cfg.listen.to_string(), None, settings);
            certs.push(cert);
        }
        None => service.add_tcp(&cfg.listen.to_string()),
    }
    server.add_service(service);
    crate::tls::client::warn_if_clear("sidecar.sync.admin_url", &cfg.admin_url);
    // The sync's long poll and the usage reports share one client; it starts a new pool when
    // its client certificate is replaced.
    let admin_http = Arc::new(crate::tls::client::RotatingClient::new(
        &cfg.sync_tls,
        "client:sync",
        || reqwest::Client::builder().connect_timeout(Duration::from_secs(3)),
    )?);
    let sync_cert = admin_http.cert().cloned();
    // Client certificates are watched, reloaded on SIGHUP and reported like the listener's.
    certs.extend(sync_cert);
    if let Some(eg) = &egress {
        certs.extend(eg.client_certs().iter().cloned());
    }
    *reloader.certs.lock().unwrap_or_else(|p| p.into_inner()) = certs.clone();
    let sync = SyncClient {
        admin_url: cfg.admin_url.clone(),
        http: admin_http.clone(),
        credential: cfg.sync_credential.clone(),
        wait: cfg.sync_wait,
        environment: cfg.environment,
        snapshot_file: cfg.snapshot_file.clone(),
        current: current.clone(),
        token_cache: token_cache.clone(),
        early,
        last_sync: last_sync.clone(),
        clock: clock.clone(),
        metrics: metrics.clone(),
        file_key,
        write_failing_since: write_failing_since.clone(),
        need_full: std::sync::atomic::AtomicBool::new(true),
        instance_id,
        shared,
        departed: departed.clone(),
    };
    let usage = usage_report::UsageReporter {
        admin_url: cfg.admin_url.clone(),
        http: admin_http.clone(),
        credential: cfg.sync_credential.clone(),
        current: current.clone(),
        interval: cfg.usage_report_interval,
        metrics: metrics.clone(),
        departed,
    };
    let health = health::Health {
        current,
        last_sync,
        write_failing_since,
        clock,
        max_age: cfg.ready_max_snapshot_age,
        metrics,
        connections: Some(connections),
        token_cache: token_cache.clone(),
        certs: certs.clone(),
    };
    Ok(Parts {
        server,
        reloader,
        egress,
        sync,
        usage,
        health,
    })
}

/// The threads beside the proxy, and where their listeners ended up.
struct SideJobs {
    egress_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Starts egress and health (when configured) and the sync loop, all stopping on `stop`.
fn spawn_side_jobs(
    cfg: &SidecarConfig,
    egress: Option<Arc<egress::Egress>>,
    sync: SyncClient,
    usage: usage_report::UsageReporter,
    health: health::Health,
    stop: watch::Receiver<bool>,
) -> std::io::Result<SideJobs> {
    let certs = health.certs.clone();
    let mut threads = Vec::new();
    let egress_addr = match (&cfg.egress, egress) {
        (Some(e), Some(eg)) => {
            let (addr, t) = egress::spawn(e, eg, stop.clone())?;
            threads.push(t);
            Some(addr)
        }
        _ => None,
    };
    let health_addr = match cfg.admin_listen {
        Some(addr) => {
            let (a, t) = health::spawn(addr, health, cfg.header_read_timeout, stop.clone())?;
            threads.push(t);
            Some(a)
        }
        None => None,
    };
    threads.push(spawn_sync(sync, usage, certs, stop)?);
    Ok(SideJobs {
        egress_addr,
        health_addr,
        threads,
    })
}

/// Runs `task` on a named thread with its own single-threaded runtime: the sidecar's side
/// jobs (sync, health, reload) stay off pingora's proxy threads.
pub(crate) fn spawn_on_own_thread<F>(name: &str, task: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(task);
    })
}

/// The sync loop and the usage reporter share one thread: both are mostly waiting.
/// The sync loop, the usage reporter and the certificate watch share one thread: all are
/// mostly waiting.
fn spawn_sync(
    sync: SyncClient,
    usage: usage_report::UsageReporter,
    certs: Vec<Arc<crate::tls::ReloadingCert>>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let clock = sync.clock.clone();
    spawn_on_own_thread("permiso-sync", async move {
        tokio::join!(
            sync.run(stop.clone()),
            usage.run(stop.clone()),
            crate::tls::reload::watch(certs, CERT_CHECK_INTERVAL, clock, stop)
        );
    })
}

/// How often certificate files are checked for a change.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Re-reads the config file on every SIGHUP and applies it if it is valid; a file that fails
/// to parse or validate is refused with a log line and the running config stays.
fn spawn_reload_on_sighup(
    reloader: Arc<Reloader>,
    load: Box<dyn Fn() -> anyhow::Result<SidecarConfig> + Send>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    spawn_on_own_thread("permiso-reload", async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot listen for SIGHUP; config reload disabled");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match load() {
                    Ok(next) => reloader.apply(next),
                    Err(e) => tracing::error!(error = format!("{e:#}"), "config reload refused; the running config stays"),
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}

/// pingora retries a busy port for 30 s and then runs on without listening: refuse to start
/// instead, with the reason. A port taken by someone else between this check and pingora's
/// bind still falls to pingora's behaviour (and `start`'s readiness probe would reach that
/// other listener); the window is the few milliseconds of server start-up.
fn check_port_free(listen: SocketAddr) -> anyhow::Result<()> {
    std::net::TcpListener::bind(listen)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))
}

/// Runs in the foreground until SIGTERM (graceful: in-flight requests finish within
/// shutdown_grace_seconds) or SIGINT (fast). SIGHUP reloads the config through `reload`.
pub fn run(
    cfg: SidecarConfig,
    clock: SharedClock,
    reload: Box<dyn Fn() -> anyhow::Result<SidecarConfig> + Send>,
) -> anyhow::Result<()> {
    let Parts {
        server,
        reloader,
        egress,
        sync,
        usage,
        health,
    } = build(&cfg, clock)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let reload_thread = spawn_reload_on_sighup(reloader, reload, stop_rx.clone())?;
    let connections = health.connections.clone();
    let egress_idle = egress.clone();
    let side = spawn_side_jobs(&cfg, egress, sync, usage, health, stop_rx)?;
    tracing::info!(listen = %cfg.listen, upstream = %cfg.upstream, environment = %cfg.environment, routes = cfg.routes.len(), "sidecar starting");
    // The server on its own thread, so that a drained SIGTERM can end the process while
    // pingora still sleeps out its grace period (`drain`).
    let (ended_tx, ended) = std::sync::mpsc::channel::<bool>();
    if let Some(connections) = connections {
        let phases = server.watch_execution_phase();
        let tx = ended_tx.clone();
        std::thread::Builder::new()
            .name("permiso-drain".into())
            .spawn(move || {
                if drain::drained_after_term(phases, connections, egress_idle) {
                    let _ = tx.send(true);
                }
            })?;
    }
    std::thread::Builder::new()
        .name("permiso-sidecar".into())
        .spawn(move || {
            server.run(RunArgs::default());
            let _ = ended_tx.send(false);
        })?;
    if ended.recv().unwrap_or(false) {
        tracing::info!(
            "SIGTERM: every connection has closed; exiting without waiting out shutdown_grace_seconds"
        );
    }
    let _ = stop_tx.send(true);
    for t in side.threads.into_iter().chain([reload_thread]) {
        let _ = t.join();
    }
    Ok(())
}

/// Lets a handle stop an in-process sidecar the way SIGINT stops a standalone one.
struct WatchSignal(watch::Receiver<bool>);

#[async_trait]
impl ShutdownSignalWatch for WatchSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
        ShutdownSignal::FastShutdown
    }
}

/// A sidecar running on background threads.
pub struct SidecarHandle {
    pub addr: SocketAddr,
    /// The egress listener, when configured.
    pub egress_addr: Option<SocketAddr>,
    /// The health listener (`/healthz`, `/readyz`), when configured.
    pub health_addr: Option<SocketAddr>,
    /// Applies a new (validated) config the way SIGHUP does for a standalone sidecar.
    pub reloader: Arc<Reloader>,
    proxy_stop: watch::Sender<bool>,
    sync_stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SidecarHandle {
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for SidecarHandle {
    fn drop(&mut self) {
        let _ = self.sync_stop.send(true);
        let _ = self.proxy_stop.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts the proxy and the sync loop, and returns once the listener accepts connections.
pub fn start(cfg: SidecarConfig, clock: SharedClock) -> anyhow::Result<SidecarHandle> {
    let Parts {
        server,
        reloader,
        egress,
        sync,
        usage,
        health,
    } = build(&cfg, clock)?;
    let (sync_stop, sync_rx) = watch::channel(false);
    let (proxy_stop, proxy_rx) = watch::channel(false);
    let SideJobs {
        egress_addr,
        health_addr,
        mut threads,
    } = spawn_side_jobs(&cfg, egress, sync, usage, health, sync_rx)?;
    threads.push(
        std::thread::Builder::new()
            .name("permiso-sidecar".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(WatchSignal(proxy_rx)),
                });
            })?,
    );
    let handle = SidecarHandle {
        reloader,
        egress_addr,
        health_addr,
        addr: cfg.listen,
        proxy_stop,
        sync_stop,
        threads,
    };
    // pingora retries a busy port for 30 s and never reports failure: check readiness here.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&cfg.listen, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            anyhow::bail!("sidecar did not start listening on {}", cfg.listen);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::key::Secret;

    fn cfg(extra_sidecar: &str, routes: &str) -> SidecarConfig {
        let text = format!(
            "[sidecar]\nupstream = \"127.0.0.1:1\"\n{extra_sidecar}\n[sidecar.sync]\nadmin_url = \"http://127.0.0.1:2\"\n{routes}"
        );
        let f = crate::config::parse_file(&text, std::path::Path::new("t.toml")).unwrap();
        SidecarConfig::from_file(f.sidecar.as_ref().unwrap(), Secret::new("k".into())).unwrap()
    }

    #[test]
    fn reload_names_only_the_settings_that_wait_for_a_restart() {
        let one = "[[sidecar.routes]]\nprefix = \"/\"\npublic = true\n";
        let two = "[[sidecar.routes]]\nprefix = \"/a\"\nscopes = [\"a:b\"]\n";
        let base = cfg("", one);
        assert!(
            needs_restart(&base, &cfg("", two)).is_empty(),
            "routes reload live"
        );
        assert_eq!(
            needs_restart(&base, &cfg("listen = \"127.0.0.1:9\"\nthreads = 2", two)),
            ["listen", "threads"]
        );
    }

    #[test]
    fn egress_credentials_reload_live_its_listener_and_urls_wait_for_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "svc_live_one").unwrap();
        let route = "[[sidecar.routes]]\nprefix = \"/\"\npublic = true\n";
        let egress = |listen: &str, url: &str| {
            format!(
                "[sidecar.egress]\nlisten = \"{listen}\"\n[sidecar.egress.destinations.d]\nurl = \"{url}\"\napi_key_file = \"{}\"\n{route}",
                key.display()
            )
        };
        let base = cfg("", &egress("127.0.0.1:9100", "http://127.0.0.1:9002"));
        std::fs::write(&key, "svc_live_two").unwrap();
        let rotated = cfg("", &egress("127.0.0.1:9100", "http://127.0.0.1:9002"));
        assert!(
            needs_restart(&base, &rotated).is_empty(),
            "a new key file reloads live"
        );
        assert_eq!(
            needs_restart(
                &base,
                &cfg("", &egress("127.0.0.1:9101", "http://127.0.0.1:9003"))
            ),
            [
                "egress.listen",
                "egress.destinations (names, urls and TLS settings)"
            ]
        );
        assert_eq!(needs_restart(&base, &cfg("", route)), ["egress"]);
    }
}
