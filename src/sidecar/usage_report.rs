//! Reports which API keys were used, and when, to the admin plane: one batch per interval with
//! only the keys used since the last batch, so an admin sees that a rotated-out key is still in
//! use before its grace window ends, and nobody writes to a database per request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::core::key::Secret;
use crate::core::snapshot::Snapshot;
use crate::sidecar::metrics::SidecarMetrics;

/// Entries per POST: well under the admin plane's default 64 KiB body limit.
const BATCH: usize = 500;

pub struct UsageReporter {
    pub admin_url: String,
    /// The sync's client (same admin plane, same TLS settings); each report has a 10 s timeout.
    pub http: Arc<crate::tls::client::RotatingClient>,
    pub credential: Secret,
    pub current: Arc<ArcSwapOption<Snapshot>>,
    pub interval: Duration,
    pub metrics: Arc<SidecarMetrics>,
    /// Marks of keys that left the snapshot (the sync client fills it).
    pub departed: Arc<std::sync::Mutex<Vec<(String, i64)>>>,
}

#[derive(serde::Serialize)]
struct Entry<'a> {
    key_id: &'a str,
    last_used_at: i64,
}

impl UsageReporter {
    /// Runs until `shutdown`, then sends what is left once.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // Marks taken from the snapshot but not yet accepted by the admin plane; bounded by
        // the number of keys.
        let mut pending: HashMap<Arc<str>, i64> = HashMap::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            self.collect(&mut pending);
            self.send(&self.http.get(), &mut pending).await;
            if stopping {
                return;
            }
        }
    }

    fn collect(&self, pending: &mut HashMap<Arc<str>, i64>) {
        for (key_id, at) in std::mem::take(&mut *self.departed.lock().unwrap_or_else(|p| p.into_inner())) {
            let e = pending.entry(Arc::from(key_id)).or_insert(at);
            *e = (*e).max(at);
        }
        let Some(snapshot) = self.current.load_full() else {
            return;
        };
        let mut marks = Vec::new();
        for service in snapshot.services_iter() {
            marks.clear();
            service.usage.take_unreported(&mut marks);
            for &(slot, at) in &marks {
                // A slot is an index into the service's keys; the key map has its id.
                let Some(entry) = service.keys.get(slot).and_then(|h| snapshot.lookup(h)) else {
                    continue;
                };
                let e = pending.entry(Arc::from(entry.key_id.as_str())).or_insert(at);
                *e = (*e).max(at);
            }
        }
    }

    async fn send(&self, http: &reqwest::Client, pending: &mut HashMap<Arc<str>, i64>) {
        let mut batch: Vec<(Arc<str>, i64)> = pending.iter().map(|(k, v)| (k.clone(), *v)).collect();
        batch.sort_unstable();
        for chunk in batch.chunks(BATCH) {
            let keys: Vec<Entry<'_>> = chunk
                .iter()
                .map(|(k, at)| Entry {
                    key_id: k,
                    last_used_at: *at,
                })
                .collect();
            let sent = http
                .post(format!("{}/v1/usage", self.admin_url))
                .bearer_auth(self.credential.expose())
                .json(&serde_json::json!({ "keys": keys }))
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    self.metrics.usage_report(true);
                    for (k, at) in chunk {
                        // Only drop what was sent: a newer mark may have arrived meanwhile.
                        if pending.get(k) == Some(at) {
                            pending.remove(k);
                        }
                    }
                }
                outcome => {
                    self.metrics.usage_report(false);
                    let why = match outcome {
                        Ok(r) => format!("admin plane answered {}", r.status()),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(error = %why, keys = pending.len(), "usage report failed; kept for the next one");
                    return;
                }
            }
        }
        if !batch.is_empty() {
            tracing::debug!(keys = batch.len(), "key usage reported");
        }
    }
}
