//! The egress listener: the local service calls `http://127.0.0.1:9100/<destination>/...` and
//! the sidecar forwards to that destination with the service's credential, so no business
//! service holds a secret. It fetches and refreshes client-credentials tokens (one fetch at a
//! time), refreshes once on a 401, retries failed connections with backoff and jitter within a
//! deadline, and cuts off a destination that keeps failing. A destination's credential is
//! replaced on a config reload (SIGHUP), so a rotated key or secret file is taken up without a
//! restart.
//!
//! Built on axum + reqwest rather than pingora: retrying a request after a 401 or a failed
//! attempt needs the whole request in hand, and egress volume is one service's own calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::json;

use crate::config::{EgressConfig, EgressCredential};
use crate::core::egress::{backoff, idempotent, refresh_after, split_destination, Admission, Breaker};
use crate::core::key::Secret;
use crate::sidecar::metrics::{EgressCounters, SidecarMetrics};

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("token endpoint refused the client credentials ({0})")]
    TokenRefused(u16),
    #[error("token endpoint unreachable: {0}")]
    TokenUnreachable(String),
    #[error("token response malformed")]
    TokenMalformed,
}

struct CachedToken {
    token: Arc<str>,
    refresh_at: Instant,
}

/// Client-credentials tokens for one destination: cached, refreshed before expiry, fetched by
/// one task at a time while the others wait for its result.
pub struct TokenSource {
    client_id: String,
    secret: Secret,
    scopes: Vec<String>,
    token_url: String,
    cached: Mutex<Option<CachedToken>>,
    flight: tokio::sync::Mutex<()>,
}

impl TokenSource {
    fn fresh(&self, not: Option<&str>) -> Option<Arc<str>> {
        let guard = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at && not.is_none_or(|n| n != &*c.token))
            .map(|c| c.token.clone())
    }

    /// A usable token. `rejected`: a token the destination just refused, never returned again.
    pub async fn token(
        &self,
        http: &reqwest::Client,
        deadline: Duration,
        rejected: Option<&str>,
    ) -> Result<Arc<str>, EgressError> {
        if let Some(t) = self.fresh(rejected) {
            return Ok(t);
        }
        let _flight = self.flight.lock().await;
        // Whoever held the lock before us may have fetched one already.
        if let Some(t) = self.fresh(rejected) {
            return Ok(t);
        }
        let (token, lifetime) = self.fetch(http, deadline).await?;
        let token: Arc<str> = Arc::from(token.as_str());
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(CachedToken {
            token: token.clone(),
            refresh_at: Instant::now() + refresh_after(lifetime),
        });
        tracing::info!(client_id = %self.client_id, lifetime_s = lifetime.as_secs(), "egress: fetched an access token");
        Ok(token)
    }

    async fn fetch(
        &self,
        http: &reqwest::Client,
        deadline: Duration,
    ) -> Result<(String, Duration), EgressError> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let mut form = vec![("grant_type", "client_credentials".to_string())];
            if !self.scopes.is_empty() {
                form.push(("scope", self.scopes.join(" ")));
            }
            let sent = http
                .post(&self.token_url)
                .basic_auth(
                    form_encode(&self.client_id),
                    Some(form_encode(self.secret.expose())),
                )
                .form(&form)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    let v: serde_json::Value = r.json().await.map_err(|_| EgressError::TokenMalformed)?;
                    let token = v["access_token"]
                        .as_str()
                        .ok_or(EgressError::TokenMalformed)?
                        .to_string();
                    let lifetime = Duration::from_secs(v["expires_in"].as_u64().unwrap_or(60));
                    return Ok((token, lifetime));
                }
                Ok(r) if r.status().is_server_error() || r.status() == 429 => {
                    tracing::warn!(
                        status = r.status().as_u16(),
                        "egress: token endpoint busy or failing"
                    );
                }
                Ok(r) => return Err(EgressError::TokenRefused(r.status().as_u16())),
                Err(e) => tracing::warn!(error = %e, "egress: token endpoint unreachable"),
            }
            let pause = backoff(
                attempt,
                Duration::from_millis(50),
                Duration::from_secs(1),
                rand::rng().random(),
            );
            if started.elapsed() + pause > deadline {
                return Err(EgressError::TokenUnreachable("retry deadline passed".into()));
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }
}

/// RFC 6749 §2.3.1: client id and secret are form-encoded before Basic.
fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

enum Credential {
    ApiKey(Secret),
    /// Shared by every destination using the same client and scopes: one client, one token.
    Tokens(Arc<TokenSource>),
}

impl Credential {
    /// Whether `c` is the credential this already is (a reload that changes nothing keeps
    /// the cached token).
    fn same_as(&self, c: &EgressCredential) -> bool {
        match (self, c) {
            (Credential::ApiKey(k), EgressCredential::ApiKey(n)) => k.expose() == n.expose(),
            (
                Credential::Tokens(ts),
                EgressCredential::ClientCredentials {
                    client_id,
                    secret,
                    scopes,
                    token_url,
                },
            ) => {
                ts.client_id == *client_id
                    && ts.secret.expose() == secret.expose()
                    && ts.scopes == *scopes
                    && ts.token_url == *token_url
            }
            _ => false,
        }
    }
}

/// Builds each destination's credential; destinations naming the same client, token URL and
/// scopes share one token source. `keep` offers the credentials in use, reused when unchanged.
fn build_credentials(
    destinations: &[crate::config::EgressDestination],
    keep: &dyn Fn(&str) -> Option<Arc<Credential>>,
) -> HashMap<String, Arc<Credential>> {
    let mut sources: HashMap<(String, String, Vec<String>), Arc<TokenSource>> = HashMap::new();
    let mut out = HashMap::new();
    for d in destinations {
        if let Some(current) = keep(&d.name).filter(|c| c.same_as(&d.credential)) {
            if let Credential::Tokens(ts) = &*current {
                let key = (ts.client_id.clone(), ts.token_url.clone(), ts.scopes.clone());
                sources.entry(key).or_insert_with(|| ts.clone());
            }
            out.insert(d.name.clone(), current);
            continue;
        }
        let credential = match &d.credential {
            EgressCredential::ApiKey(k) => Credential::ApiKey(k.clone()),
            EgressCredential::ClientCredentials {
                client_id,
                secret,
                scopes,
                token_url,
            } => {
                let key = (client_id.clone(), token_url.clone(), scopes.clone());
                let source = sources.entry(key).or_insert_with(|| {
                    Arc::new(TokenSource {
                        client_id: client_id.clone(),
                        secret: secret.clone(),
                        scopes: scopes.clone(),
                        token_url: token_url.clone(),
                        cached: Mutex::new(None),
                        flight: tokio::sync::Mutex::new(()),
                    })
                });
                Credential::Tokens(source.clone())
            }
        };
        out.insert(d.name.clone(), Arc::new(credential));
    }
    out
}

struct Destination {
    /// For this destination's TLS settings (CA, client certificate).
    http: crate::tls::client::RotatingClient,
    name: String,
    url: String,
    /// Replaced whole by a reload; a request keeps the one it loaded.
    credential: arc_swap::ArcSwap<Credential>,
    breaker: Mutex<Breaker>,
    counters: EgressCounters,
}

pub struct Egress {
    destinations: HashMap<String, Destination>,
    /// The client certificates the destinations (and token fetches) present, re-read by the
    /// sidecar's certificate watch and on SIGHUP like its listener's.
    client_certs: Vec<Arc<crate::tls::ReloadingCert>>,
    /// Token fetches from the admin plane.
    http: crate::tls::client::RotatingClient,
    retry_deadline: Duration,
    max_body_bytes: usize,
    /// Calls being relayed, and when the last one ended (`telemetry::monotonic_ms`): a
    /// SIGTERM ends the process early only once the local service has stopped calling out
    /// (`drain`).
    in_flight: std::sync::atomic::AtomicUsize,
    last_done_ms: std::sync::atomic::AtomicU64,
}

/// Counts one relayed call for as long as it lasts.
struct Relaying<'a>(&'a Egress);

impl Drop for Relaying<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.0
            .last_done_ms
            .store(crate::telemetry::monotonic_ms(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": code, "error_description": description})),
    )
        .into_response()
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn forwardable(name: &HeaderName) -> bool {
    let n = name.as_str();
    !HOP_BY_HOP.contains(&n)
        && n != "host"
        && n != "authorization"
        && n != "content-length"
        && !n.starts_with("x-permiso-")
}

impl Egress {
    /// `admin_tls`: how token fetches reach the admin plane (the sync's settings). Each
    /// destination gets its own client for its own TLS settings.
    pub fn new(
        cfg: &EgressConfig,
        admin_tls: &crate::tls::ClientTls,
        metrics: &SidecarMetrics,
    ) -> Result<Egress, crate::tls::TlsError> {
        let mut client_certs = Vec::new();
        let timeout = cfg.request_timeout;
        let mut client = |tls: &crate::tls::ClientTls, label: String| {
            let c = crate::tls::client::RotatingClient::new(tls, &label, move || {
                reqwest::Client::builder()
                    .timeout(timeout)
                    .connect_timeout(Duration::from_secs(2))
                    .redirect(reqwest::redirect::Policy::none())
            })?;
            client_certs.extend(c.cert().cloned());
            Ok::<_, crate::tls::TlsError>(c)
        };
        // Token fetches go where the sync goes, with its certificate (same files, same label).
        let http = client(admin_tls, "client:sync".into())?;
        let mut credentials = build_credentials(&cfg.destinations, &|_| None);
        let destinations = cfg
            .destinations
            .iter()
            .map(|d| {
                let credential = credentials.remove(&d.name).expect("built for every destination");
                crate::tls::client::warn_if_clear(&format!("sidecar.egress.destinations.{}", d.name), &d.url);
                let dest = Destination {
                    http: client(&d.tls, format!("client:egress:{}", d.name))?,
                    name: d.name.clone(),
                    url: d.url.clone(),
                    credential: arc_swap::ArcSwap::new(credential),
                    breaker: Mutex::new(Breaker::new(cfg.breaker_failures, cfg.breaker_cooldown)),
                    counters: metrics.egress(&d.name),
                };
                Ok((d.name.clone(), dest))
            })
            .collect::<Result<_, crate::tls::TlsError>>()?;
        Ok(Egress {
            destinations,
            client_certs,
            http,
            retry_deadline: cfg.retry_deadline,
            max_body_bytes: cfg.max_body_bytes,
            in_flight: Default::default(),
            last_done_ms: Default::default(),
        })
    }

    /// Nothing relayed now, and nothing ended within `quiet`.
    pub fn idle_for(&self, quiet: Duration) -> bool {
        use std::sync::atomic::Ordering;
        self.in_flight.load(Ordering::SeqCst) == 0
            && crate::telemetry::monotonic_ms().saturating_sub(self.last_done_ms.load(Ordering::SeqCst))
                >= quiet.as_millis() as u64
    }

    pub fn client_certs(&self) -> &[Arc<crate::tls::ReloadingCert>] {
        &self.client_certs
    }

    /// Takes up the credentials of a reloaded config: each destination still at the same URL
    /// gets its new credential (a token source is kept when its client, secret, scopes and
    /// token URL are unchanged). A destination whose URL changed keeps its old credential: the
    /// new one is meant for another host, and the URL itself only changes on restart. Returns
    /// the names of the destinations whose credential was replaced.
    pub fn reload_credentials(&self, cfg: &EgressConfig) -> Vec<String> {
        let same_place: Vec<_> = cfg
            .destinations
            .iter()
            .filter(|n| self.destinations.get(&n.name).is_some_and(|d| d.url == n.url))
            .cloned()
            .collect();
        let fresh = build_credentials(&same_place, &|name| {
            self.destinations.get(name).map(|d| d.credential.load_full())
        });
        let mut replaced = Vec::new();
        for (name, credential) in fresh {
            let d = &self.destinations[&name];
            if !Arc::ptr_eq(&d.credential.load(), &credential) {
                d.credential.store(credential);
                replaced.push(name);
            }
        }
        replaced.sort();
        replaced
    }

    async fn credential(&self, c: &Credential, rejected: Option<&str>) -> Result<Arc<str>, EgressError> {
        match c {
            Credential::ApiKey(k) => Ok(Arc::from(k.expose())),
            Credential::Tokens(ts) => ts.token(&self.http.get(), self.retry_deadline, rejected).await,
        }
    }

    /// One request with retries: connection failures are always retried (nothing was sent);
    /// other failures only for idempotent methods. All within the retry deadline.
    async fn send(
        &self,
        d: &Destination,
        method: &reqwest::Method,
        url: &str,
        headers: &HeaderMap,
        body: &bytes::Bytes,
        credential: &str,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let mut rb = d
                .http
                .get()
                .request(method.clone(), url)
                .body(body.clone())
                .bearer_auth(credential);
            for (name, value) in headers.iter().filter(|(n, _)| forwardable(n)) {
                rb = rb.header(name, value);
            }
            match rb.send().await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let retriable = e.is_connect() || idempotent(method.as_str());
                    let pause = backoff(
                        attempt,
                        Duration::from_millis(25),
                        Duration::from_millis(500),
                        rand::rng().random(),
                    );
                    if !retriable || started.elapsed() + pause > self.retry_deadline {
                        return Err(e);
                    }
                    tracing::debug!(destination = %d.name, attempt, error = %e, "egress: retrying");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn forward(&self, req: Request) -> Response {
        let started = Instant::now();
        let method = req.method().clone();
        let path_and_query = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path_and_query.clone(), None),
        };
        let Some((name, rest)) = split_destination(&path) else {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_destination",
                "call /<destination>/<path>",
            );
        };
        let Some(d) = self.destinations.get(name) else {
            tracing::warn!(destination = name, "egress: destination not configured");
            return error(
                StatusCode::NOT_FOUND,
                "unknown_destination",
                "this destination is not configured",
            );
        };
        let url = match &query {
            Some(q) => format!("{}{}?{}", d.url, rest, q),
            None => format!("{}{}", d.url, rest),
        };
        let headers = req.headers().clone();
        let body = match axum::body::to_bytes(req.into_body(), self.max_body_bytes).await {
            Ok(b) => b,
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body too large for egress",
                )
            }
        };
        let admission = d
            .breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        if admission == Admission::Rejected {
            d.counters.circuit_open.inc();
            tracing::warn!(destination = %d.name, "egress: circuit open");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "destination_unavailable",
                "the destination keeps failing; try again shortly",
            );
        }
        let trial = TrialGuard {
            breaker: &d.breaker,
            armed: admission == Admission::Trial,
        };
        let rmethod = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap_or(reqwest::Method::GET);
        let outcome = async {
            let credential = d.credential.load_full();
            let cred = self
                .credential(&credential, None)
                .await
                .map_err(Failure::Credential)?;
            let mut resp = self
                .send(d, &rmethod, &url, &headers, &body, &cred)
                .await
                .map_err(Failure::Network)?;
            let mut attempts = 1;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED
                && matches!(*credential, Credential::Tokens(_))
            {
                // The token may have been revoked or the signing key rotated: refresh once.
                let fresh = self
                    .credential(&credential, Some(&cred))
                    .await
                    .map_err(Failure::Credential)?;
                if idempotent(method.as_str()) {
                    resp = self
                        .send(d, &rmethod, &url, &headers, &body, &fresh)
                        .await
                        .map_err(Failure::Network)?;
                    attempts += 1;
                }
            }
            Ok::<_, Failure>((resp, attempts))
        }
        .await;
        // Success or failure below settles the breaker, trial included.
        trial.settled();
        let now = Instant::now();
        let response = match outcome {
            Ok((resp, attempts)) => {
                let status = resp.status().as_u16();
                {
                    let mut br = d.breaker.lock().unwrap_or_else(|p| p.into_inner());
                    if matches!(status, 502..=504) {
                        br.failure(now);
                    } else {
                        br.success();
                    }
                }
                d.counters.relayed.inc();
                d.counters.latency.observe(started.elapsed().as_secs_f64());
                tracing::info!(target: "permiso::egress", destination = %d.name, method = %method, path = rest, status, attempts, latency_us = started.elapsed().as_micros() as u64);
                relay(resp).await
            }
            Err(f) => {
                d.breaker.lock().unwrap_or_else(|p| p.into_inner()).failure(now);
                match &f {
                    Failure::Credential(_) => d.counters.credential_unavailable.inc(),
                    Failure::Network(_) => d.counters.destination_unreachable.inc(),
                }
                d.counters.latency.observe(started.elapsed().as_secs_f64());
                let (status, code, text) = match &f {
                    Failure::Credential(_) => (
                        StatusCode::BAD_GATEWAY,
                        "credential_unavailable",
                        "could not obtain a credential for the destination",
                    ),
                    Failure::Network(_) => (
                        StatusCode::BAD_GATEWAY,
                        "destination_unreachable",
                        "the destination could not be reached",
                    ),
                };
                tracing::warn!(target: "permiso::egress", destination = %d.name, method = %method, path = rest, status = status.as_u16(), error = %f, latency_us = started.elapsed().as_micros() as u64);
                error(status, code, text)
            }
        };
        response
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("credential: {0}")]
    Credential(EgressError),
    #[error("network: {0}")]
    Network(reqwest::Error),
}

async fn relay(resp: reqwest::Response) -> Response {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    for (name, value) in resp.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) && name.as_str() != "content-length" {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_str().as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) {
                headers.append(n, v);
            }
        }
    }
    match resp.bytes().await {
        Ok(body) => {
            let mut r = Response::new(Body::from(body));
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            r
        }
        Err(_) => error(
            StatusCode::BAD_GATEWAY,
            "destination_unreachable",
            "the destination's response was cut short",
        ),
    }
}

/// Releases a half-open trial whose request future is dropped before it settles (the caller
/// went away, a shutdown): otherwise the breaker would wait for that trial for ever.
struct TrialGuard<'a> {
    breaker: &'a Mutex<Breaker>,
    armed: bool,
}

impl TrialGuard<'_> {
    fn settled(mut self) {
        self.armed = false;
    }
}

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .abandon_trial();
        }
    }
}

async fn handle(State(eg): State<Arc<Egress>>, req: Request) -> Response {
    eg.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let _relaying = Relaying(&eg);
    eg.forward(req).await
}

/// Serves the egress listener until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    egress: Arc<Egress>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let app = axum::Router::new().fallback(handle).with_state(egress);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
}

/// Binds and runs the egress listener on its own thread.
pub fn spawn(
    cfg: &EgressConfig,
    egress: Arc<Egress>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let listener = std::net::TcpListener::bind(cfg.listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let thread = std::thread::Builder::new().name("permiso-egress".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).expect("listener");
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "egress listening");
            serve(l, egress, shutdown).await;
        });
    })?;
    Ok((addr, thread))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A half-open trial whose request is cancelled mid-call releases the breaker: the next
    /// request is tried instead of refused for good.
    #[tokio::test]
    async fn a_cancelled_trial_does_not_keep_the_circuit_open() {
        let app = axum::Router::new()
            .route(
                "/fail",
                axum::routing::get(|| async { StatusCode::SERVICE_UNAVAILABLE }),
            )
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route(
                "/hang",
                axum::routing::get(|| async {
                    std::future::pending::<()>().await;
                    "never"
                }),
            );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let cfg = EgressConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            retry_deadline: Duration::from_millis(100),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1024,
            breaker_failures: 1,
            // Half-open at once after a failure: no sleeping in the test.
            breaker_cooldown: Duration::ZERO,
            destinations: vec![crate::config::EgressDestination {
                tls: Default::default(),
                name: "d".into(),
                url: format!("http://{addr}"),
                credential: EgressCredential::ApiKey(Secret::new("svc_live_x".into())),
            }],
        };
        let eg = Egress::new(&cfg, &Default::default(), &SidecarMetrics::new(10)).unwrap();
        let req = |path: &str| {
            Request::builder()
                .uri(format!("/d{path}"))
                .body(Body::empty())
                .unwrap()
        };
        assert_eq!(
            eg.forward(req("/fail")).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // The trial hangs; its caller gives up and the future is dropped mid-call.
        let cancelled = tokio::time::timeout(Duration::from_millis(200), eg.forward(req("/hang"))).await;
        assert!(cancelled.is_err(), "the trial should still be waiting");
        // Without the guard this is 503 destination_unavailable for ever.
        let r = eg.forward(req("/ok")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(!d_open(&eg));
    }

    fn d_open(eg: &Egress) -> bool {
        eg.destinations["d"]
            .breaker
            .lock()
            .unwrap()
            .is_open(Instant::now())
    }

    /// A reload replaces a destination's key when the destination is where it was, keeps a
    /// token source whose client is unchanged, and never hands a new credential to an old URL.
    #[tokio::test]
    async fn a_reload_replaces_credentials_only_where_the_destination_stayed() {
        let app = axum::Router::new().fallback(|h: HeaderMap| async move {
            h.get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let dest = |name: &str, url: String, credential: EgressCredential| crate::config::EgressDestination {
            tls: Default::default(),
            name: name.into(),
            url,
            credential,
        };
        let key = |k: &str| EgressCredential::ApiKey(Secret::new(k.into()));
        let client = |secret: &str| EgressCredential::ClientCredentials {
            client_id: "srv_a".into(),
            secret: Secret::new(secret.into()),
            scopes: vec!["a:b".into()],
            token_url: "http://127.0.0.1:1/oauth/token".into(),
        };
        let cfg = |d: Vec<crate::config::EgressDestination>| EgressConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            retry_deadline: Duration::from_millis(100),
            request_timeout: Duration::from_secs(5),
            max_body_bytes: 1024,
            breaker_failures: 5,
            breaker_cooldown: Duration::ZERO,
            destinations: d,
        };
        let here = format!("http://{addr}");
        let eg = Egress::new(
            &cfg(vec![
                dest("d", here.clone(), key("svc_live_old")),
                dest("moved", "http://127.0.0.1:2".into(), key("svc_live_m")),
                dest("t", "http://127.0.0.1:3".into(), client("s1")),
            ]),
            &Default::default(),
            &SidecarMetrics::new(10),
        )
        .unwrap();
        async fn sent(eg: &Egress) -> String {
            let r = Request::builder().uri("/d/x").body(Body::empty()).unwrap();
            let body = axum::body::to_bytes(eg.forward(r).await.into_body(), 1024)
                .await
                .unwrap();
            String::from_utf8(body.to_vec()).unwrap()
        }
        assert_eq!(sent(&eg).await, "Bearer svc_live_old");
        let source = |eg: &Egress| match &*eg.destinations["t"].credential.load_full() {
            Credential::Tokens(ts) => ts.clone(),
            Credential::ApiKey(_) => panic!("t uses client credentials"),
        };
        let before = source(&eg);
        let replaced = eg.reload_credentials(&cfg(vec![
            dest("d", here.clone(), key("svc_live_new")),
            dest("moved", "http://127.0.0.1:4".into(), key("svc_live_other")),
            dest("t", "http://127.0.0.1:3".into(), client("s1")),
            dest("added", "http://127.0.0.1:5".into(), key("svc_live_a")),
        ]));
        assert_eq!(replaced, ["d"], "only d stayed put with a new credential");
        assert_eq!(sent(&eg).await, "Bearer svc_live_new");
        assert!(
            matches!(&*eg.destinations["moved"].credential.load_full(),
            Credential::ApiKey(k) if k.expose() == "svc_live_m"),
            "a moved destination keeps its credential"
        );
        assert!(
            Arc::ptr_eq(&before, &source(&eg)),
            "an unchanged client keeps its cached token"
        );
        assert_eq!(
            eg.reload_credentials(&cfg(vec![dest("t", "http://127.0.0.1:3".into(), client("s2"))])),
            ["t"]
        );
        assert!(
            !Arc::ptr_eq(&before, &source(&eg)),
            "a new secret gets a new token source"
        );
    }

    /// Many concurrent callers on a cold source cause one token fetch (single flight).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_token_fetch() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h2 = hits.clone();
        let app = axum::Router::new().route(
            "/oauth/token",
            axum::routing::post(move || {
                let h = h2.clone();
                async move {
                    let n = h.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    axum::Json(json!({"access_token": format!("tok{n}"), "token_type": "Bearer", "expires_in": 3600}))
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let ts = Arc::new(TokenSource {
            client_id: "srv_a".into(),
            secret: Secret::new("s".into()),
            scopes: vec![],
            token_url: format!("http://{addr}/oauth/token"),
            cached: Mutex::new(None),
            flight: tokio::sync::Mutex::new(()),
        });
        let http = reqwest::Client::new();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (ts, http) = (ts.clone(), http.clone());
                tokio::spawn(async move { ts.token(&http, Duration::from_secs(2), None).await.unwrap() })
            })
            .collect();
        for t in tasks {
            assert_eq!(&*t.await.unwrap(), "tok0");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // A token the destination refused is replaced, once, however many callers saw the 401.
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (ts, http) = (ts.clone(), http.clone());
                tokio::spawn(async move {
                    ts.token(&http, Duration::from_secs(2), Some("tok0"))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(&*t.await.unwrap(), "tok1");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }
}
