//! What this sidecar tells the admin plane about itself on every sync request (issue 16):
//! its instance id, build, environment, upstream, mode and the protected routes' scopes. Built
//! from the live config at each poll, so a reload is reported on the next one.

use http::HeaderValue;

use crate::core::key::Environment;
use crate::core::routes::Access;
use crate::core::sync::{RouteReport, SidecarReport, MAX_REPORTED_ROUTES};
use crate::sidecar::state::Live;

/// The header stays well under the admin plane's smallest head limit (8 KiB).
const MAX_HEADER_BYTES: usize = 6 * 1024;

/// A new instance id: kept in the snapshot file, so a restarted sidecar is the same instance.
pub fn new_instance_id() -> String {
    format!("sc_{:016x}", rand::random::<u64>())
}

pub fn report(instance_id: &str, environment: Environment, live: &Live) -> SidecarReport {
    let routes: Vec<RouteReport> = live
        .routes
        .routes()
        .iter()
        .filter_map(|r| match &r.access {
            Access::Public => None,
            Access::Scopes(s) => Some(RouteReport {
                prefix: r.prefix.clone(),
                methods: r.methods.clone(),
                scopes: s.iter().map(|s| s.to_string()).collect(),
                trusted: r.trusted,
                shadow: r.shadow,
            }),
        })
        .collect();
    SidecarReport {
        instance_id: instance_id.to_string(),
        build: env!("CARGO_PKG_VERSION").to_string(),
        environment,
        upstream: live.upstream.to_string(),
        mode: if live.routes.shadow() { "shadow" } else { "enforce" }.to_string(),
        routes,
        routes_truncated: false,
    }
}

/// The report as a header value: compact JSON (ASCII: prefixes are canonical paths, scopes
/// and the rest are tokens), routes dropped from the end when it would grow too large.
pub fn header(mut r: SidecarReport) -> Option<HeaderValue> {
    // A route the admin plane would refuse is left out (and the report says routes are
    // missing): the sync must never fail over what the sidecar says about itself.
    let before = r.routes.len();
    r.routes.retain(|route| route.validate().is_ok());
    r.routes.truncate(MAX_REPORTED_ROUTES);
    r.routes_truncated |= r.routes.len() < before;
    if r.validate().is_err() {
        tracing::warn!("this sidecar's report would be refused; syncing without one");
        return None;
    }
    loop {
        let json = serde_json::to_string(&r).ok()?;
        if json.len() <= MAX_HEADER_BYTES || r.routes.is_empty() {
            return HeaderValue::from_str(&json).ok();
        }
        let keep = r.routes.len() * MAX_HEADER_BYTES / json.len();
        r.routes.truncate(keep.min(r.routes.len() - 1));
        r.routes_truncated = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::routes::{Route, RouteTable};
    use crate::core::scope::Scope;

    fn live(n: usize) -> Live {
        let mut routes = vec![Route::new(vec![], "/health".into(), Access::Public)];
        for i in 0..n {
            routes.push(Route::new(
                vec!["GET".into()],
                format!("/api/v1/resource-number-{i}"),
                Access::Scopes(vec![Scope::parse("trade:read").unwrap()]),
            ));
        }
        Live {
            routes: RouteTable::new(routes),
            forwarded_for: crate::config::ForwardedFor::Overwrite,
            upstream: "127.0.0.1:8001".parse().unwrap(),
            tokens: crate::config::TokenSettings {
                audience: "permiso".into(),
                leeway_secs: 30,
                cache_entries: 10,
                early_sync_min_interval: std::time::Duration::from_secs(1),
            },
        }
    }

    #[test]
    fn the_report_lists_protected_routes_and_fits_a_header() {
        let r = report("sc_1", Environment::Live, &live(2));
        assert_eq!(r.routes.len(), 2, "the public route is left out");
        r.validate().unwrap();
        let h = header(r).unwrap();
        let back: SidecarReport = serde_json::from_slice(h.as_bytes()).unwrap();
        assert!(!back.routes_truncated);
        // Many routes: cut to fit, and said so; what is left still validates.
        let h = header(report("sc_1", Environment::Live, &live(400))).unwrap();
        assert!(h.len() <= MAX_HEADER_BYTES);
        let back: SidecarReport = serde_json::from_slice(h.as_bytes()).unwrap();
        assert!(back.routes_truncated && !back.routes.is_empty());
        back.validate().unwrap();
    }
}
