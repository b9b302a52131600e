//! Keeps the sidecar's snapshot current: long-polls the admin plane, builds each new snapshot
//! off the request path, swaps it in whole, then writes it to disk. On failure it keeps the
//! snapshot it has and retries with capped, jittered backoff.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use rand::Rng;
use tokio::sync::watch;

use crate::core::key::{Environment, Secret};
use crate::core::snapshot::{Snapshot, SnapshotError};
use crate::core::sync::SyncPayload;
use crate::core::token_cache::TokenCache;
use crate::sidecar::snapshot_file;

/// Lets the request path ask for a sync now (a token names a kid we do not know), at most once
/// per interval, without blocking: one atomic compare-exchange and a notify.
pub struct EarlySync {
    notify: tokio::sync::Notify,
    base: Instant,
    last_ms: AtomicU64,
    min_interval_ms: u64,
}

impl EarlySync {
    pub fn new(min_interval: Duration) -> EarlySync {
        EarlySync {
            notify: tokio::sync::Notify::new(),
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            min_interval_ms: min_interval.as_millis().max(1) as u64,
        }
    }

    /// Returns whether this call triggered a sync.
    pub fn request(&self) -> bool {
        // +min so the very first request is never suppressed.
        let now = self.base.elapsed().as_millis() as u64 + self.min_interval_ms;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < self.min_interval_ms {
            return false;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.notify.notify_one();
        true
    }
}

pub struct SyncClient {
    pub admin_url: String,
    /// From `tls::client` (the admin plane's CA, our client certificate).
    /// Presents the current client certificate (a new pool after it changes).
    pub http: Arc<crate::tls::client::RotatingClient>,
    pub credential: Secret,
    pub wait: Duration,
    pub environment: Environment,
    pub snapshot_file: PathBuf,
    pub current: Arc<ArcSwapOption<Snapshot>>,
    pub token_cache: Arc<TokenCache>,
    pub early: Arc<EarlySync>,
    /// Unix seconds of the last successful sync (or of the snapshot file loaded at start).
    pub last_sync: Arc<std::sync::atomic::AtomicI64>,
    pub clock: crate::core::clock::SharedClock,
    pub metrics: Arc<crate::sidecar::metrics::SidecarMetrics>,
    /// Authenticates the snapshot file.
    pub file_key: snapshot_file::FileKey,
    /// See `Health::write_failing_since`.
    pub write_failing_since: Arc<std::sync::atomic::AtomicI64>,
    /// Until the first sync succeeds, ask for a full snapshot: a snapshot loaded from the file
    /// is served meanwhile, but never trusted as the base of a delta.
    pub need_full: std::sync::atomic::AtomicBool,
    /// This sidecar's instance id (kept in the snapshot file).
    pub instance_id: Arc<str>,
    /// The live config, reported on every request (`fleet_report`).
    pub shared: Arc<crate::sidecar::state::Shared>,
    /// Use marks of keys that left the snapshot, for the usage reporter.
    pub departed: Arc<std::sync::Mutex<Vec<(String, i64)>>>,
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The admin plane's certificate did not verify (or ours was refused): named, because
    /// it will not fix itself by retrying.
    #[error("TLS with {url} failed: {reason}")]
    Tls { url: String, reason: String },
    #[error("admin plane answered {0}")]
    Status(reqwest::StatusCode),
    /// The admin plane refused our credential (401/403): retrying will not fix it, so the log
    /// says what the admin plane said and what to do.
    #[error("admin plane refused the sync credential ({status}): {description}; {hint}")]
    Refused {
        status: reqwest::StatusCode,
        description: String,
        hint: &'static str,
    },
    #[error("payload refused: {0}")]
    Invalid(#[from] SnapshotError),
}

impl SyncError {
    /// The `cause` label of the sync failure metric.
    fn cause(&self) -> &'static str {
        match self {
            SyncError::Http(e) if e.is_decode() => "invalid",
            SyncError::Http(_) => "request",
            SyncError::Status(_) | SyncError::Refused { .. } => "status",
            SyncError::Invalid(_) => "invalid",
            SyncError::Tls { .. } => "tls",
        }
    }
}

/// A 401 or 403 from `/v1/sync`, with the admin plane's `error_description` (cut short: the
/// body is the admin plane's, not ours) and the fix for the usual causes.
fn refused(status: reqwest::StatusCode, body: &[u8]) -> SyncError {
    let description = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error_description")?.as_str().map(str::to_owned))
        .map(|d| {
            d.chars()
                .filter(|c| !c.is_control())
                .take(300)
                .collect::<String>()
        })
        .unwrap_or_else(|| "no error description".to_owned());
    let hint = if status == reqwest::StatusCode::FORBIDDEN && description.contains("sync:read") {
        "give the sync key's service the sync:read scope (permiso services patch <service_id> --scopes \"sync:read ...\"), or use a key of a service that has it"
    } else if status == reqwest::StatusCode::FORBIDDEN {
        "check the sync key's allowed_ips and scopes on the admin plane"
    } else {
        "the sync credential is unknown, revoked or expired: create or rotate a key for a service with sync:read and point sync_credential_file at it"
    };
    SyncError::Refused {
        status,
        description,
        hint,
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl SyncClient {
    async fn fetch(&self, http: &reqwest::Client, wait: Duration) -> Result<SyncPayload, SyncError> {
        let full = self.need_full.load(Ordering::Relaxed);
        // A full snapshot comes at once; waiting only makes sense for changes.
        let wait = if full { Duration::ZERO } else { wait };
        let mut url = format!("{}/v1/sync?wait={}", self.admin_url, wait.as_secs());
        if let (false, Some(s)) = (full, self.current.load().as_ref()) {
            url.push_str(&format!("&after={}&epoch={}", s.version, s.epoch));
        }
        let report = crate::sidecar::fleet_report::report(
            &self.instance_id,
            self.environment,
            &self.shared.live.load(),
        );
        let mut req = http.get(url).bearer_auth(self.credential.expose());
        if let Some(h) = crate::sidecar::fleet_report::header(report) {
            req = req.header(crate::core::sync::SIDECAR_HEADER, h);
        }
        let resp = req
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| match crate::tls::client::tls_failure(&e) {
                Some(reason) => SyncError::Tls {
                    url: self.admin_url.clone(),
                    reason,
                },
                None => SyncError::Http(e),
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(refused(status, resp.bytes().await.unwrap_or_default().as_ref()));
        }
        if !status.is_success() {
            return Err(SyncError::Status(status));
        }
        Ok(resp.json::<SyncPayload>().await?)
    }

    /// Builds and swaps in the next snapshot. Returns whether anything changed.
    fn apply(&self, payload: &SyncPayload) -> Result<bool, SnapshotError> {
        let current = self.current.load_full();
        if self.need_full.load(Ordering::Relaxed) && !payload.full {
            return Err(SnapshotError::DeltaWithoutBase);
        }
        let next = match (&current, payload.full) {
            (Some(cur), false) if payload.services.is_empty() && payload.version == cur.version => {
                return Ok(false)
            }
            (Some(cur), false) => cur.apply_delta(payload)?,
            (None, false) => return Err(SnapshotError::DeltaWithoutBase),
            (cur, true) => Snapshot::from_full(payload, self.environment, cur.as_deref())?,
        };
        tracing::info!(
            version = next.version,
            full = payload.full,
            changed_services = payload.services.len(),
            keys = next.key_count(),
            "snapshot applied"
        );
        let revoked_changed = current
            .as_ref()
            .is_none_or(|c| c.tokens.revoked != next.tokens.revoked);
        if revoked_changed {
            self.token_cache.evict_revoked(&next.tokens.revoked);
        }
        let next = Arc::new(next);
        self.current.store(Some(next.clone()));
        // After the swap, so no request marks the old entries for long; a use racing it is
        // marked on an entry nobody reads again, and lost.
        if let Some(cur) = &current {
            let touched: Vec<&str> = payload.services.iter().map(|s| s.service_id.as_str()).collect();
            let marks = cur.departed_marks(&next, (!payload.full).then_some(&touched[..]));
            if !marks.is_empty() {
                tracing::debug!(
                    keys = marks.len(),
                    "use marks of keys that left the snapshot kept for the next report"
                );
                self.departed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(marks);
            }
        }
        Ok(true)
    }

    /// Asks the writer thread to save the current snapshot. Never blocks: a 1M-key file
    /// takes seconds to write, and the next sync must not wait for it. Requests made while a
    /// write is pending coalesce into one write of the newest snapshot.
    fn persist(&self, writer: &std::sync::mpsc::SyncSender<()>) {
        let _ = writer.try_send(());
    }

    fn spawn_writer(&self) -> (std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let (current, path) = (self.current.clone(), self.snapshot_file.clone());
        let (key, failing_since) = (self.file_key.clone(), self.write_failing_since.clone());
        let (metrics, clock) = (self.metrics.clone(), self.clock.clone());
        let instance = self.instance_id.clone();
        let handle = std::thread::Builder::new()
            .name("permiso-snapshot-writer".into())
            .spawn(move || {
                // Ends when the sync client (the only sender) is dropped.
                for () in rx {
                    if let Some(s) = current.load_full() {
                        let started = std::time::Instant::now();
                        match snapshot_file::write_with_instance(&path, &s, &key, clock.now_secs(), Some(&instance)) {
                            Ok(()) => {
                                failing_since.store(0, Ordering::Relaxed);
                                metrics.snapshot_written(true);
                                tracing::debug!(version = s.version, ms = started.elapsed().as_millis() as u64, "snapshot file written")
                            }
                            Err(e) => {
                                let now = clock.now_secs().max(1);
                                let _ = failing_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                                metrics.snapshot_written(false);
                                tracing::error!(path = %path.display(), error = %e, "could not write snapshot file")
                            }
                        }
                    }
                }
            })
            .expect("snapshot writer thread");
        (tx, handle)
    }

    /// Runs until `shutdown` turns true; a snapshot write still pending then is finished first,
    /// so a stopped sidecar restarts from the newest state it had.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let (writer, writer_thread) = self.spawn_writer();
        self.sync_loop(&writer, shutdown).await;
        drop(writer);
        let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    }

    async fn sync_loop(&self, writer: &std::sync::mpsc::SyncSender<()>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = MIN_BACKOFF;
        let mut wait = self.wait;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let http = self.http.get();
            let outcome = tokio::select! {
                r = self.fetch(&http, wait) => r,
                _ = self.early.notify.notified() => {
                    tracing::info!("unknown token signing key: syncing early");
                    wait = Duration::ZERO;
                    continue;
                }
                _ = shutdown.wait_for(|s| *s) => return,
            };
            wait = self.wait;
            let applied = outcome.and_then(|p| {
                let changed = self.apply(&p)?;
                let lag = p
                    .generated_at_ms
                    .filter(|_| changed)
                    .map(|at| crate::core::clock::unix_millis() - at);
                Ok((changed, lag))
            });
            let failed = match applied {
                Ok((changed, lag_ms)) => {
                    self.need_full.store(false, Ordering::Relaxed);
                    self.metrics.sync_succeeded(lag_ms);
                    self.last_sync.store(self.clock.now_secs(), Ordering::Relaxed);
                    backoff = MIN_BACKOFF;
                    if changed {
                        self.persist(writer);
                    }
                    false
                }
                Err(e) => {
                    self.metrics.sync_failed(e.cause());
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "sync failed; serving from the last snapshot");
                    true
                }
            };
            if failed {
                let jitter = rand::rng().random_range(0.5..1.0);
                let pause = backoff.mul_f64(jitter);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.early.notify.notified() => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_sync_says_what_the_admin_plane_said_and_what_to_do() {
        let forbidden = reqwest::StatusCode::FORBIDDEN;
        let scope = refused(
            forbidden,
            br#"{"error":"insufficient_scope","error_description":"this endpoint requires the sync:read scope"}"#,
        )
        .to_string();
        assert!(
            scope.contains("(403 Forbidden): this endpoint requires the sync:read scope"),
            "{scope}"
        );
        assert!(
            scope.contains("give the sync key's service the sync:read scope"),
            "{scope}"
        );
        let addr = refused(
            forbidden,
            br#"{"error":"access_denied","error_description":"not from here"}"#,
        )
        .to_string();
        assert!(addr.contains("allowed_ips"), "{addr}");
        let unknown = refused(reqwest::StatusCode::UNAUTHORIZED, b"<html>").to_string();
        assert!(
            unknown.contains("no error description") && unknown.contains("unknown, revoked or expired"),
            "{unknown}"
        );
        // The admin plane's text is cut and cannot forge log lines.
        let long = format!(r#"{{"error_description":"a\nb{}"}}"#, "x".repeat(1000));
        let cut = refused(forbidden, long.as_bytes()).to_string();
        assert!(
            !cut.contains('\n') && cut.contains("ab") && cut.len() < 700,
            "{cut}"
        );
    }

    #[test]
    fn early_sync_requests_are_rate_limited() {
        let e = EarlySync::new(Duration::from_secs(3600));
        assert!(e.request(), "the first request triggers a sync");
        for _ in 0..1000 {
            assert!(
                !e.request(),
                "a flood of unknown kids must not trigger more syncs"
            );
        }
        let quick = EarlySync::new(Duration::from_millis(1));
        assert!(quick.request());
        std::thread::sleep(Duration::from_millis(3));
        assert!(quick.request());
    }
}
