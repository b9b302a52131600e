//! Metrics, batched key-usage reports, the audit log and failed-login throttling, over real
//! HTTP against the real admin plane and sidecar.

use std::time::{Duration, Instant};

use permiso::core::audit::{AuditEntry, Verifier};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{Harness, ADMIN_KEY, ROUTES};

fn sidecar_metrics(h: &Harness) -> String {
    let addr = h.sidecar.as_ref().unwrap().health_addr.unwrap();
    let r = h.http.get(format!("http://{addr}/metrics")).send().unwrap();
    assert_eq!(r.status(), 200);
    r.text().unwrap()
}

/// The value of the sample whose name-and-labels part is exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn sidecar_metrics_count_decisions_by_outcome_and_service() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "metered", "scopes": ["trade:read"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(2));
    let before = sidecar_metrics(&h);
    let allowed_before = sample(
        &before,
        r#"permiso_sidecar_decisions_total{outcome="allowed",reason="allowed"}"#,
    )
    .unwrap();

    for _ in 0..3 {
        assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    }
    assert_eq!(h.get("/api/v1/trades", None).status(), 401);
    assert_eq!(h.get("/api/v1/account", Some(&svc.api_key)).status(), 403);
    // The last character changed (to another one than it was), so the checksum fails.
    let last = if svc.api_key.ends_with('x') { 'y' } else { 'x' };
    let bogus = format!("{}{last}", &svc.api_key[..svc.api_key.len() - 1]);
    assert_eq!(h.get("/api/v1/trades", Some(&bogus)).status(), 401);
    assert_eq!(h.get("/health", None).status(), 200);

    let text = sidecar_metrics(&h);
    let v = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
    assert_eq!(
        v(r#"permiso_sidecar_decisions_total{outcome="allowed",reason="allowed"}"#),
        allowed_before + 3.0
    );
    assert_eq!(
        v(r#"permiso_sidecar_decisions_total{outcome="missing",reason="missing_credential"}"#),
        1.0
    );
    assert_eq!(
        v(r#"permiso_sidecar_decisions_total{outcome="scope",reason="insufficient_scope"}"#),
        1.0
    );
    assert_eq!(
        v(r#"permiso_sidecar_decisions_total{outcome="invalid",reason="bad_checksum"}"#),
        1.0
    );
    assert_eq!(
        v(r#"permiso_sidecar_decisions_total{outcome="public",reason="public"}"#),
        1.0
    );
    // Every reason exists from the start, at zero.
    assert_eq!(
        v(r#"permiso_sidecar_decisions_total{outcome="rate_limited",reason="rate_limited_hour"}"#),
        0.0
    );
    let per_service = format!(
        "permiso_sidecar_service_requests_total{{service_id=\"{}\"}}",
        svc.service_id
    );
    assert_eq!(v(&per_service), allowed_before + 3.0);
    assert!(v(r#"permiso_sidecar_request_duration_seconds_count{decision="denied"}"#) >= 3.0);
    assert!(v("permiso_sidecar_snapshot_version") >= 1.0);
    assert_eq!(v("permiso_sidecar_snapshot_age_seconds"), 0.0);
    assert!(v("permiso_sidecar_syncs_total") >= 1.0);
    assert!(
        !text.contains(&svc.api_key) && !text.contains(&svc.api_key[..20]),
        "no key material in metrics"
    );

    // An upstream that is gone: counted by pingora's error type (after a reload to it).
    let mut dead = h.sidecar_config(ROUTES);
    dead.upstream = crate::common::free_port();
    h.sidecar.as_ref().unwrap().reloader.apply(dead);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 502);
    // pingora counts the failure in its logging hook, after the answer is written: wait for it.
    let started = Instant::now();
    let text = loop {
        let text = sidecar_metrics(&h);
        let counted = sample(
            &text,
            r#"permiso_sidecar_upstream_errors_total{error="ConnectRefused"}"#,
        );
        if counted != Some(0.0) || started.elapsed() > Duration::from_secs(5) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        sample(
            &text,
            r#"permiso_sidecar_upstream_errors_total{error="ConnectRefused"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"permiso_sidecar_upstream_errors_total{error="other"}"#),
        Some(0.0)
    );

    // The admin plane's own metrics: requests by route template, never raw ids.
    let admin = h
        .http
        .get(h.admin_url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        sample(
            &admin,
            r#"permiso_admin_http_requests_total{method="POST",route="/auth/admin/services",status="201"}"#
        )
        .unwrap()
            >= 2.0,
        "{admin}"
    );
    assert!(sample(&admin, "permiso_admin_state_version").unwrap() >= 2.0);
    assert!(!admin.contains(&svc.service_id), "ids never become labels");
}

#[test]
fn sidecar_failures_to_sync_are_counted_and_the_age_grows() {
    let mut h = Harness::start();
    let failures =
        |text: &str| sample(text, r#"permiso_sidecar_sync_failures_total{cause="request"}"#).unwrap_or(0.0);
    let before = failures(&sidecar_metrics(&h));
    h.stop_admin();
    // A stopping admin plane answers its parked long polls: wait for a failure after the stop,
    // so the sidecar's last successful sync is behind it, then let time pass.
    let started = Instant::now();
    loop {
        let text = sidecar_metrics(&h);
        if failures(&text) > before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no sync failure counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    h.clock.advance(Duration::from_secs(30));
    let text = sidecar_metrics(&h);
    assert!(failures(&text) >= 1.0);
    assert_eq!(sample(&text, "permiso_sidecar_snapshot_age_seconds"), Some(30.0));
}

#[test]
fn sidecars_report_key_use_so_admins_see_old_keys_in_grace() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "reporter", "scopes": ["trade:read"]}));
    let (s, rotated) = h.admin_req(
        Method::POST,
        &format!("/auth/admin/services/{}/rotate", svc.service_id),
        Some(json!({"grace_seconds": 3600})),
    );
    assert_eq!(s, 200, "{rotated}");
    h.wait_for_status(
        "/api/v1/trades",
        Some(rotated["api_key"].as_str().unwrap()),
        200,
        Duration::from_secs(2),
    );
    // Only the old key is used, one minute later (by the shared clock).
    h.clock.advance(Duration::from_secs(60));
    let used_at = h.clock_secs();
    for _ in 0..5 {
        assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    }
    let started = Instant::now();
    let keys = loop {
        let (_, v) = h.admin_req(
            Method::GET,
            &format!("/auth/admin/services/{}", svc.service_id),
            None,
        );
        let keys = v["keys"].as_array().unwrap().clone();
        let old = keys.iter().find(|k| k["key_id"] == svc.key_id.as_str()).unwrap();
        if !old["last_used_at"].is_null() {
            break keys;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "usage never reported: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let old = keys.iter().find(|k| k["key_id"] == svc.key_id.as_str()).unwrap();
    let new = keys.iter().find(|k| k["key_id"] == rotated["key_id"]).unwrap();
    assert_eq!(old["status"], "grace");
    let want = permiso::admin::model::rfc3339(used_at as i64);
    assert_eq!(old["last_used_at"].as_str(), Some(want.as_str()), "{old}");
    assert!(
        new["last_used_at"].is_string(),
        "the new key was used while waiting for the sync: {new}"
    );

    // The usage endpoint refuses bad input and writes nothing.
    let r = h
        .http
        .post(h.admin_url("/v1/usage"))
        .bearer_auth(&h.sync_key)
        .json(&json!({"keys": [{"key_id": "not-an-id", "last_used_at": 5}]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"], "invalid_request");
    let r = h
        .http
        .post(h.admin_url("/v1/usage"))
        .bearer_auth(&svc.api_key)
        .json(&json!({"keys": []}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403, "a key without sync:read may not report usage");
    // A time in the future beyond the allowed skew is refused, and the whole report with it.
    let future = h.clock_secs() as i64 + permiso::admin::usage::MAX_CLOCK_SKEW_SECS + 3600;
    let r = h
        .http
        .post(h.admin_url("/v1/usage"))
        .bearer_auth(&h.sync_key)
        .json(&json!({"keys": [
            {"key_id": rotated["key_id"], "last_used_at": h.clock_secs()},
            {"key_id": svc.key_id, "last_used_at": future},
        ]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error_description"]
        .as_str()
        .unwrap()
        .contains("future"));
    let (_, after) = h.admin_req(
        Method::GET,
        &format!("/auth/admin/services/{}", svc.service_id),
        None,
    );
    let old_after = after["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == svc.key_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(old_after["last_used_at"], old["last_used_at"], "nothing written");
}

fn audit_all(h: &Harness, query: &str) -> Vec<AuditEntry> {
    let mut out = Vec::new();
    let mut after = 0u64;
    loop {
        let sep = if query.is_empty() { "" } else { "&" };
        let (s, v) = h.admin_req(
            Method::GET,
            &format!("/auth/admin/audit?limit=2&after={after}{sep}{query}"),
            None,
        );
        assert_eq!(s, 200, "{v}");
        let page: Vec<AuditEntry> = serde_json::from_value(v["entries"].clone()).unwrap();
        out.extend(page);
        match v["next_after"].as_u64() {
            Some(n) => after = n,
            None => return out,
        }
    }
}

#[test]
fn every_admin_action_and_failed_login_is_audited_in_a_verifiable_chain() {
    let h = Harness::start_with(ROUTES);
    let svc = h.create(json!({"service_name": "audited", "scopes": ["trade:read"]}));
    let id = &svc.service_id;
    let (s, _) = h.admin_req(
        Method::PATCH,
        &format!("/auth/admin/services/{id}"),
        Some(json!({"scopes": ["trade:read", "trade:open"]})),
    );
    assert_eq!(s, 200);
    let (s, rotated) = h.admin_req(
        Method::POST,
        &format!("/auth/admin/services/{id}/rotate"),
        Some(json!({"grace_seconds": 60})),
    );
    assert_eq!(s, 200);
    let (s, _) = h.admin_req(
        Method::POST,
        &format!("/auth/admin/services/{id}/keys/{}/revoke", svc.key_id),
        None,
    );
    assert_eq!(s, 200);
    let (s, _) = h.admin_req(
        Method::POST,
        &format!("/auth/admin/services/{id}/secret/rotate"),
        None,
    );
    assert_eq!(s, 200);
    let (s, _) = h.admin_req(Method::POST, "/auth/admin/signing-keys/rotate", None);
    assert_eq!(s, 200);
    let (s, _) = h.admin_req(Method::DELETE, &format!("/auth/admin/services/{id}"), None);
    assert_eq!(s, 200);
    let r = h
        .http
        .get(h.admin_url("/auth/admin/services"))
        .header("X-Admin-Api-Key", "wrong-key-guess")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);

    let all = audit_all(&h, "");
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    // First the signing key made at start and the harness's sync service.
    assert_eq!(
        actions,
        [
            "signing_key.rotate",
            "service.create",
            "service.create",
            "service.patch",
            "key.rotate",
            "key.revoke",
            "secret.rotate",
            "signing_key.rotate",
            "service.disable",
            "auth.failed",
        ]
    );
    assert_eq!(all[0].actor, "system");
    assert_eq!(all[3].actor, "admin-key");
    assert_eq!(all[3].source_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(all[3].change, json!({"scopes": ["trade:read", "trade:open"]}));
    assert_eq!(all[4].change["new_id"], rotated["key_id"]);
    assert_eq!(all[5].change, json!({"key_id": svc.key_id}));
    assert_eq!(all[9].actor, "unauthenticated");
    assert_eq!(all[9].change, json!({"reason": "wrong admin key"}));
    let text = serde_json::to_string(&all).unwrap();
    assert!(
        !text.contains(&svc.api_key)
            && !text.contains(&svc.client_secret)
            && !text.contains("wrong-key-guess")
    );

    let mut v = Verifier::default();
    for e in &all {
        v.push(e).unwrap();
    }
    assert_eq!(v.finish().seq, 10);

    // Filters.
    let mine = audit_all(&h, &format!("target={id}"));
    assert_eq!(
        mine.len(),
        6,
        "create, patch, rotate, revoke, secret rotate, disable"
    );
    let failed = audit_all(&h, "action=auth.failed");
    assert_eq!(failed.len(), 1);
    let (s, v) = h.admin_req(Method::GET, "/auth/admin/audit?limit=0", None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));
    let (s, _) = h.admin_req(Method::GET, "/auth/admin/audit?bogus=1", None);
    assert_eq!(s, 400);

    // Append-only through SQL; a direct edit of the database is caught by the chain.
    let err = h
        .exec_sql("UPDATE audit_log SET actor = 'someone' WHERE seq = 4")
        .unwrap_err();
    assert!(err.contains("append-only"), "{err}");
    assert!(h.exec_sql("DELETE FROM audit_log WHERE seq = 4").is_err());
    let drop_trigger = if crate::common::on_postgres() {
        "DROP TRIGGER audit_log_no_update ON audit_log"
    } else {
        "DROP TRIGGER audit_log_no_update"
    };
    h.exec_sql(&format!(
        "{drop_trigger}; UPDATE audit_log SET change = '{{\"scopes\":[\"admin:*\"]}}' WHERE seq = 4;"
    ))
    .unwrap();
    let tampered = audit_all(&h, "");
    let mut v = Verifier::default();
    let broken = tampered.iter().find_map(|e| v.push(e).err()).unwrap();
    assert_eq!(broken, permiso::core::audit::ChainError::Hash { seq: 4 });
}

#[test]
fn failed_admin_logins_are_throttled_per_address_before_the_key_is_checked() {
    let h = Harness::start_custom(ROUTES, |a| {
        a.auth_failures_per_minute_per_ip = 3;
        a.audited_auth_failures_per_minute = 4;
    });
    let try_key = |key: &str| {
        h.http
            .get(h.admin_url("/auth/admin/services"))
            .header("X-Admin-Api-Key", key)
            .send()
            .unwrap()
    };
    let try_bearer = |key: &str| {
        h.http
            .get(h.admin_url("/v1/sync?wait=0"))
            .bearer_auth(key)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    for _ in 0..3 {
        assert_eq!(try_key("guess").status(), 401);
    }
    // Blocked now, even with the right key: nothing is learned from further guesses.
    let r = try_key(ADMIN_KEY);
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"], "rate_limited");
    assert_eq!(try_key("guess").status(), 429);
    // Service keys are not throttled: a sidecar on the same address keeps syncing, and a
    // wrong service key is still just 401.
    assert_eq!(try_bearer(&h.sync_key), 200);
    assert_eq!(try_bearer("svc_live_guess"), 401);
    assert_eq!(try_bearer("svc_live_guess"), 401);

    h.clock.advance(Duration::from_secs(61));
    assert_eq!(try_key(ADMIN_KEY).status(), 200);
    // Five failures so far, the audit budget is four a minute: the fifth is left out and the
    // next entry written says so.
    assert_eq!(try_key("late-guess").status(), 401);
    let failed = audit_all(&h, "action=auth.failed");
    assert_eq!(failed.len(), 5, "{failed:?}");
    assert_eq!(
        failed[4].change,
        json!({"reason": "wrong admin key", "not_audited_before_this": 1})
    );
    assert_eq!(failed[3].change, json!({"reason": "malformed service key"}));
    let admin = h
        .http
        .get(h.admin_url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(sample(&admin, "permiso_admin_auth_failures_total"), Some(6.0));
    assert_eq!(sample(&admin, "permiso_admin_auth_throttled_total"), Some(2.0));
}

/// `/v1/usage` only moves `last_used_at` forward, and takes at most 1,000 marks a report.
#[test]
fn usage_reports_move_last_used_forward_only_and_are_capped() {
    // The harness keeps bodies small; 1,000 marks need the default 64 KiB.
    let h = Harness::start_custom(ROUTES, |f| f.max_body_bytes = 64 * 1024);
    let svc = h.create(json!({"service_name": "marked", "scopes": ["trade:read"]}));
    let now = h.clock_secs() as i64;
    let report = |marks: Value| {
        h.http
            .post(h.admin_url("/v1/usage"))
            .bearer_auth(&h.sync_key)
            .json(&json!({ "keys": marks }))
            .send()
            .unwrap()
    };
    let last_used = || {
        let (_, v) = h.admin_req(
            Method::GET,
            &format!("/auth/admin/services/{}", svc.service_id),
            None,
        );
        v["keys"][0]["last_used_at"].clone()
    };
    let r = report(json!([{"key_id": svc.key_id, "last_used_at": now - 100}]));
    assert_eq!(r.status(), 200);
    let first = last_used();
    assert_eq!(
        first.as_str(),
        Some(permiso::admin::model::rfc3339(now - 100).as_str())
    );
    // An older mark does not move it back.
    assert_eq!(
        report(json!([{"key_id": svc.key_id, "last_used_at": now - 500}])).status(),
        200
    );
    assert_eq!(last_used(), first);
    // A newer one moves it forward.
    assert_eq!(
        report(json!([{"key_id": svc.key_id, "last_used_at": now - 10}])).status(),
        200
    );
    assert_eq!(
        last_used().as_str(),
        Some(permiso::admin::model::rfc3339(now - 10).as_str())
    );
    // 1,000 marks are taken; 1,001 are refused whole.
    let marks = |n: usize| -> Value {
        (0..n)
            .map(|_| json!({"key_id": svc.key_id, "last_used_at": now}))
            .collect()
    };
    assert_eq!(report(marks(1000)).status(), 200);
    let r = report(marks(1001));
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error_description"]
        .as_str()
        .unwrap()
        .contains("1000"));
}
