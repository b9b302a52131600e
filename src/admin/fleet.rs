//! The sidecars this admin plane serves, and whether a change has reached them.
//!
//! Every sync request carries the sidecar's `SidecarReport` (`Permiso-Sidecar` header). The
//! admin plane records it in the store (throttled: when the applied version changes, else at
//! most every `WRITE_EVERY` seconds) so every replica lists the whole fleet, and counts open
//! long polls in memory: a sidecar parked in a poll on this replica is live whatever the
//! store says. The version a sidecar holds is the `after` it asks from: it asks for the next
//! delta only once the last one is applied.
//!
//! Records are written by one background task (`writer`), never on the sync path: a change
//! wakes the whole fleet at once, and a database write per woken sidecar before its answer
//! would slow every change's fan-out. The task writes the newest record of each instance, in
//! the order they were made; until it has, this replica reads its own pending records over
//! the store's.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;

use crate::admin::auth::{Actor, Admin};
use crate::admin::error::ApiError;
use crate::admin::extract::PathParams;
use crate::admin::model::rfc3339;
use crate::admin::storage::SidecarRecord;
use crate::admin::AppState;
use crate::core::scope::{Scope, ScopeSet};
use crate::core::sync::{SidecarReport, SIDECAR_HEADER};

/// A live sidecar's row is refreshed at least this often (seconds) while it polls.
const WRITE_EVERY: i64 = 5;
/// Records written per transaction.
const WRITE_BATCH: usize = 500;
/// Sidecars unseen for this long are forgotten (the row is deleted on the next listing).
const FORGET_AFTER: i64 = 7 * 24 * 3600;
/// Instances one replica records at most: a leaked sync key inventing a new instance id per
/// request cannot grow the table (or this map) without bound. Far above real fleets; past
/// it, new instances are logged and not recorded until the replica restarts.
const MAX_TRACKED: usize = 10_000;

/// What this replica knows beyond the store: open polls, and what it last wrote.
#[derive(Default)]
pub struct Fleet {
    open: Mutex<HashMap<String, usize>>,
    written: Mutex<HashMap<String, (i64, Option<u64>)>>,
    /// Records made and not yet written, newest per instance.
    pending: Mutex<HashMap<String, SidecarRecord>>,
    wake: tokio::sync::Notify,
    /// The scopes live sidecars' routes require and how many sidecars that is, for the
    /// warnings of creates and patches: read and parsed from every report at most every
    /// `CATALOG_FOR`, not on each write (1,000 reports cost ~6 ms).
    catalog: Mutex<Option<(std::time::Instant, usize, Vec<Scope>)>>,
}

const CATALOG_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Held for the length of one sync request of an identified sidecar.
pub struct Polling<'a> {
    fleet: &'a Fleet,
    instance: String,
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        let mut open = self.fleet.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.instance) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.instance);
            }
        }
    }
}

impl Fleet {
    fn polling(&self, instance: &str) -> Polling<'_> {
        *self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(instance.to_string())
            .or_insert(0) += 1;
        Polling {
            fleet: self,
            instance: instance.to_string(),
        }
    }

    fn is_polling(&self, instance: &str) -> bool {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(instance)
    }

    /// Whether this observation needs a write: a new applied version, or a stale row.
    fn due(&self, instance: &str, now: i64, applied: Option<u64>) -> bool {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let due = match written.get(instance) {
            Some((at, v)) => *v != applied || now - at >= WRITE_EVERY,
            None if written.len() >= MAX_TRACKED => {
                tracing::warn!(instance, "too many sidecar instances recorded; this one is not");
                return false;
            }
            None => true,
        };
        if due {
            written.insert(instance.to_string(), (now, applied));
        }
        due
    }
}

/// The report on a sync request, if the sidecar sent one. A malformed one is refused (400):
/// a sidecar that says who it is must say it properly; one that says nothing (an older
/// build) syncs as before and is not listed.
pub fn report_of(headers: &HeaderMap) -> Result<Option<SidecarReport>, ApiError> {
    let mut values = headers.get_all(SIDECAR_HEADER).iter();
    let Some(v) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::bad_request("Permiso-Sidecar appears twice"));
    }
    let report: SidecarReport = serde_json::from_slice(v.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("Permiso-Sidecar: {e}")))?;
    report
        .validate()
        .map_err(|e| ApiError::bad_request(format!("Permiso-Sidecar: {e}")))?;
    Ok(Some(report))
}

/// Records one sync request of a sidecar (at its start and again at its end) and returns the
/// guard that marks it polling meanwhile. Never waits for the store.
pub fn seen<'a>(
    st: &'a AppState,
    report: &SidecarReport,
    actor: &Actor,
    epoch: Option<&str>,
    after: Option<u64>,
) -> Polling<'a> {
    let guard = st.fleet.polling(&report.instance_id);
    record(st, report, actor, epoch, after);
    guard
}

/// Queues a record of this request for the writer, when one is due.
pub fn record(st: &AppState, report: &SidecarReport, actor: &Actor, epoch: Option<&str>, after: Option<u64>) {
    let now = st.clock.now_secs();
    let ours = st.store.epoch();
    let applied = after.filter(|_| epoch == Some(ours));
    if !st.fleet.due(&report.instance_id, now, applied) {
        return;
    }
    let (credential, service_id) = match actor {
        Actor::AdminKey => ("admin-key".to_string(), None),
        Actor::Service { service_id, key_id } => (key_id.clone(), Some(service_id.clone())),
    };
    let rec = SidecarRecord {
        instance_id: report.instance_id.clone(),
        credential,
        service_id,
        epoch: ours.to_string(),
        applied_version: applied,
        first_seen: now,
        last_seen: now,
        report: serde_json::to_string(report).unwrap_or_default(),
    };
    st.fleet
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(rec.instance_id.clone(), rec);
    st.fleet.wake.notify_one();
}

/// Writes queued records until shutdown, then what is left once. Failures are logged and the
/// record dropped: the sidecar's next poll makes a new one.
pub async fn writer(st: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let stopping = tokio::select! {
            _ = st.fleet.wake.notified() => false,
            _ = shutdown.wait_for(|s| *s) => true,
        };
        let batch: Vec<SidecarRecord> = {
            let pending = st.fleet.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.values().cloned().collect()
        };
        for chunk in batch.chunks(WRITE_BATCH) {
            if let Err(e) = st.store.record_sidecars(chunk).await {
                tracing::warn!(sidecars = chunk.len(), error = %e, "could not record sidecar reports");
            }
            // Written: drop them from the queue unless a newer one came meanwhile.
            let mut pending = st.fleet.pending.lock().unwrap_or_else(|p| p.into_inner());
            for rec in chunk {
                if pending.get(&rec.instance_id) == Some(rec) {
                    pending.remove(&rec.instance_id);
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// One sidecar as listed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SidecarView {
    pub instance_id: String,
    /// The key id it syncs with ("admin-key" for the admin key).
    pub sync_key_id: String,
    pub service_id: Option<String>,
    pub environment: String,
    pub upstream: String,
    pub build: String,
    pub mode: String,
    /// "live", or "stale" when it has not polled for `sidecar_stale_after_seconds`.
    #[schema(value_type = String, pattern = "^(live|stale)$")]
    pub status: &'static str,
    #[schema(format = DateTime)]
    pub first_seen: String,
    #[schema(format = DateTime)]
    pub last_seen: String,
    pub seconds_since_seen: i64,
    /// The version it holds; null before its first delta of this database.
    pub version_applied: Option<u64>,
    /// How many versions it is behind the admin plane's current one.
    pub lag_versions: Option<u64>,
    pub routes: Vec<crate::core::sync::RouteReport>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub routes_truncated: bool,
}

struct Known {
    view: SidecarView,
    live: bool,
}

/// Every sidecar the store and this replica know, with its liveness; `reports` false leaves
/// the reports unread (the propagation check needs only versions).
async fn known(st: &AppState, reports: bool) -> Result<(u64, Vec<Known>), ApiError> {
    let now = st.clock.now_secs();
    let current = *st.versions.borrow();
    let stale_after = st.cfg.sidecar_stale_after.as_secs() as i64;
    let mut rows = st.db(st.store.sidecars(now - FORGET_AFTER)).await?;
    // This replica's records not written yet are newer than what the store has.
    {
        let pending = st.fleet.pending.lock().unwrap_or_else(|p| p.into_inner());
        for r in rows.iter_mut() {
            if let Some(p) = pending.get(&r.instance_id) {
                if p.last_seen >= r.last_seen && p.service_id == r.service_id {
                    *r = SidecarRecord {
                        first_seen: r.first_seen,
                        ..p.clone()
                    };
                }
            }
        }
        for (id, p) in pending.iter() {
            if !rows.iter().any(|r| &r.instance_id == id) {
                rows.push(p.clone());
            }
        }
    }
    let ours = st.store.epoch();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let report = if reports {
            match serde_json::from_str::<SidecarReport>(&r.report) {
                Ok(report) => report,
                Err(_) => {
                    tracing::warn!(instance = %r.instance_id, "stored sidecar report does not parse; left out");
                    continue;
                }
            }
        } else {
            SidecarReport {
                instance_id: r.instance_id.clone(),
                build: String::new(),
                environment: crate::core::key::Environment::Live,
                upstream: String::new(),
                mode: String::new(),
                routes: vec![],
                routes_truncated: false,
            }
        };
        let polling = st.fleet.is_polling(&r.instance_id);
        let last_seen = if polling { now } else { r.last_seen };
        let live = polling || now - r.last_seen <= stale_after;
        let applied = r.applied_version.filter(|_| r.epoch == ours);
        out.push(Known {
            live,
            view: SidecarView {
                instance_id: r.instance_id,
                sync_key_id: r.credential,
                service_id: r.service_id,
                environment: report.environment.as_str().to_string(),
                upstream: report.upstream,
                build: report.build,
                mode: report.mode,
                status: if live { "live" } else { "stale" },
                first_seen: rfc3339(r.first_seen),
                last_seen: rfc3339(last_seen),
                seconds_since_seen: now - last_seen,
                version_applied: applied,
                lag_versions: applied.map(|a| current.saturating_sub(a)),
                routes: report.routes,
                routes_truncated: report.routes_truncated,
            },
        });
    }
    Ok((current, out))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SidecarList {
    pub current_version: u64,
    pub live: usize,
    pub stale: usize,
    pub sidecars: Vec<SidecarView>,
}

/// `GET /auth/admin/sidecars`.
#[utoipa::path(
    get, path = "/auth/admin/sidecars", tag = "fleet",
    responses((status = 200, description = "Every sidecar seen, live or stale", body = SidecarList), crate::admin::openapi::ReadErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn list(State(st): State<AppState>, Admin(_): Admin) -> Result<Json<SidecarList>, ApiError> {
    let (current, known) = known(&st, true).await?;
    let live = known.iter().filter(|k| k.live).count();
    Ok(Json(SidecarList {
        current_version: current,
        live,
        stale: known.len() - live,
        sidecars: known.into_iter().map(|k| k.view).collect(),
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Propagation {
    pub version: u64,
    pub current_version: u64,
    /// Every live sidecar holds the version (or a later one).
    pub complete: bool,
    /// Live sidecars holding it.
    pub applied: Vec<String>,
    /// Live sidecars that do not hold it yet: the stragglers.
    pub pending: Vec<String>,
    /// Sidecars not counted: they have not polled for `sidecar_stale_after_seconds`.
    pub stale: Vec<String>,
    /// "applied by 12 of 12 live sidecars".
    pub summary: String,
}

/// `GET /auth/admin/changes/{version}`: which sidecars have applied that version.
#[utoipa::path(
    get, path = "/auth/admin/changes/{version}", tag = "fleet",
    params(("version" = u64, Path, description = "A write's `version`")),
    responses((status = 200, body = Propagation), crate::admin::openapi::ReadErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn change(
    State(st): State<AppState>,
    Admin(_): Admin,
    PathParams(version): PathParams<String>,
) -> Result<Json<Propagation>, ApiError> {
    let version: u64 = version
        .parse()
        .map_err(|_| ApiError::bad_request("version must be a non-negative integer"))?;
    let (mut current, known) = known(&st, false).await?;
    if version > current {
        // Written on another replica whose notification has not arrived here yet: the
        // database has the last word.
        current = current.max(st.db(st.store.version()).await?);
    }
    if version > current {
        return Err(ApiError::not_found("version"));
    }
    let (mut applied, mut pending, mut stale) = (vec![], vec![], vec![]);
    for k in known {
        let id = k.view.instance_id;
        match (k.live, k.view.version_applied) {
            (false, _) => stale.push(id),
            (true, Some(v)) if v >= version => applied.push(id),
            (true, _) => pending.push(id),
        }
    }
    let live = applied.len() + pending.len();
    Ok(Json(Propagation {
        version,
        current_version: current,
        complete: pending.is_empty(),
        summary: format!("applied by {} of {live} live sidecars", applied.len()),
        applied,
        pending,
        stale,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScopeUse {
    pub scope: String,
    pub routes: Vec<ScopeRoute>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScopeRoute {
    pub instance_id: String,
    pub upstream: String,
    pub prefix: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// Every scope the live sidecars' routes require, with the routes.
fn catalog(known: &[Known]) -> Vec<ScopeUse> {
    let mut by_scope: std::collections::BTreeMap<String, Vec<ScopeRoute>> = Default::default();
    for k in known.iter().filter(|k| k.live) {
        for r in &k.view.routes {
            for s in &r.scopes {
                by_scope.entry(s.clone()).or_default().push(ScopeRoute {
                    instance_id: k.view.instance_id.clone(),
                    upstream: k.view.upstream.clone(),
                    prefix: r.prefix.clone(),
                    methods: r.methods.clone(),
                });
            }
        }
    }
    by_scope
        .into_iter()
        .map(|(scope, routes)| ScopeUse { scope, routes })
        .collect()
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScopeCatalog {
    /// Live sidecars the catalog is built from.
    pub sidecars: usize,
    pub scopes: Vec<ScopeUse>,
}

/// `GET /auth/admin/scopes`.
#[utoipa::path(
    get, path = "/auth/admin/scopes", tag = "fleet",
    responses((status = 200, description = "Every scope the live sidecars' routes require", body = ScopeCatalog), crate::admin::openapi::ReadErrors),
    security(("admin_key" = []), ("service_key" = []))
)]
pub async fn scopes(State(st): State<AppState>, Admin(_): Admin) -> Result<Json<ScopeCatalog>, ApiError> {
    let (_, known) = known(&st, true).await?;
    Ok(Json(ScopeCatalog {
        sidecars: known.iter().filter(|k| k.live).count(),
        scopes: catalog(&known),
    }))
}

/// Warnings for a service's scopes that no live sidecar's route requires (`trade:raed`).
/// None while no sidecar has reported: nothing is known to compare with. A failure to read
/// the fleet is logged and gives no warnings: the write it decorates has already happened.
pub async fn unknown_scopes(st: &AppState, scopes: &[String]) -> Vec<String> {
    let cached = st
        .fleet
        .catalog
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .filter(|(at, _, _)| at.elapsed() < CATALOG_FOR)
        .map(|(_, live, required)| (*live, required.clone()));
    let (live, required) = match cached {
        Some(c) => c,
        None => {
            let known = match known(st, true).await {
                Ok((_, k)) => k,
                Err(e) => {
                    tracing::warn!(error = %e.description, "scope catalog unavailable; no warnings");
                    return vec![];
                }
            };
            let live = known.iter().filter(|k| k.live).count();
            let required: Vec<Scope> = catalog(&known)
                .iter()
                .filter_map(|u| Scope::parse(&u.scope).ok())
                .collect();
            // An empty fleet is not kept: the first sidecar to report counts at once.
            if live > 0 {
                *st.fleet.catalog.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((std::time::Instant::now(), live, required.clone()));
            }
            (live, required)
        }
    };
    if live == 0 {
        return vec![];
    }
    unused(scopes, &required)
        .into_iter()
        .map(|s| {
            format!(
                "scope {s:?} is not required by any route of the {live} live sidecar(s); see GET /auth/admin/scopes"
            )
        })
        .collect()
}

/// The scopes of `held` that allow none of `required` (a wildcard counts when it covers one).
fn unused<'a>(held: &'a [String], required: &[Scope]) -> Vec<&'a str> {
    held.iter()
        .filter(|s| {
            ScopeSet::parse(std::slice::from_ref(*s))
                .map(|set| !required.iter().any(|r| set.allows_all(std::slice::from_ref(r))))
                .unwrap_or(true)
        })
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_scopes_are_the_ones_no_route_needs() {
        let required: Vec<Scope> = ["trade:read", "account:read"]
            .iter()
            .map(|s| Scope::parse(s).unwrap())
            .collect();
        let held: Vec<String> = ["trade:raed", "trade:read", "account:*", "market:*"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(unused(&held, &required), ["trade:raed", "market:*"]);
    }

    #[test]
    fn reports_are_read_strictly() {
        let mut h = HeaderMap::new();
        assert!(report_of(&h).unwrap().is_none());
        let ok = r#"{"instance_id":"sc_1","build":"0.1.0","environment":"live","upstream":"127.0.0.1:8001","mode":"enforce","routes":[{"prefix":"/a","scopes":["a:read"]}]}"#;
        h.insert(SIDECAR_HEADER, ok.parse().unwrap());
        assert_eq!(report_of(&h).unwrap().unwrap().instance_id, "sc_1");
        for bad in [
            r#"{"instance_id":"sc 1","build":"0.1.0","environment":"live","upstream":"u","mode":"enforce","routes":[]}"#,
            r#"{"instance_id":"sc_1","build":"0.1.0","environment":"live","upstream":"u","mode":"loud","routes":[]}"#,
            r#"{"instance_id":"sc_1","build":"0.1.0","environment":"live","upstream":"u","mode":"enforce","routes":[{"prefix":"/a","scopes":["a::b"]}]}"#,
            r#"{"instance_id":"sc_1","build":"0.1.0","environment":"live","upstream":"u","mode":"enforce","routes":[],"extra":1}"#,
            "not json",
        ] {
            h.insert(SIDECAR_HEADER, bad.parse().unwrap());
            assert!(report_of(&h).is_err(), "{bad}");
        }
        h.insert(SIDECAR_HEADER, ok.parse().unwrap());
        h.append(SIDECAR_HEADER, ok.parse().unwrap());
        assert!(report_of(&h).is_err(), "twice");
    }
}
