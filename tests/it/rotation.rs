//! Rotation with a grace window judged by the sidecar's (injected) clock.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::Harness;

fn rotate(h: &Harness, service_id: &str, body: Option<Value>) -> Value {
    let (s, v) = h.admin_req(
        reqwest::Method::POST,
        &format!("/auth/admin/services/{service_id}/rotate"),
        body,
    );
    assert_eq!(s, 200, "{v}");
    v
}

#[test]
fn old_and_new_keys_work_until_the_grace_end_passes() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "rotator", "scopes": ["trade:read"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));

    let v = rotate(&h, &svc.service_id, None);
    let new_key = v["api_key"].as_str().unwrap().to_string();
    assert_ne!(new_key, svc.api_key);
    assert_eq!(v["old_keys"][0]["key_id"], svc.key_id.as_str());
    // Default grace: 7 days from the (manual) clock's now.
    let expected_end = permiso::admin::model::rfc3339((h.clock_secs() + 7 * 24 * 3600) as i64);
    assert_eq!(v["old_keys_expire_at"], expected_end.as_str());

    h.wait_for_status("/api/v1/trades", Some(&new_key), 200, Duration::from_secs(1));
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);

    // The listing shows the old key in grace, without any secret.
    let (_, shown) = h.admin_req(
        reqwest::Method::GET,
        &format!("/auth/admin/services/{}", svc.service_id),
        None,
    );
    let keys = shown["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["status"], "grace");
    assert_eq!(keys[1]["status"], "active");
    assert!(!shown.to_string().contains(&svc.api_key) && !shown.to_string().contains(&new_key));

    // One second before the end: still fine. At the end: refused, by the sidecar's clock alone.
    h.clock.advance(Duration::from_secs(7 * 24 * 3600 - 1));
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 401);
    assert_eq!(h.get("/api/v1/trades", Some(&new_key)).status(), 200);
}

#[test]
fn grace_zero_ends_the_old_key_at_once_and_custom_grace_is_honoured() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "leaked", "scopes": ["trade:read"]}));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(1));
    let v = rotate(&h, &svc.service_id, Some(json!({"grace_seconds": 0})));
    let new_key = v["api_key"].as_str().unwrap().to_string();
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 401, Duration::from_secs(1));
    h.wait_for_status("/api/v1/trades", Some(&new_key), 200, Duration::from_secs(1));

    let v = rotate(&h, &svc.service_id, Some(json!({"grace_seconds": 60})));
    let newest = v["api_key"].as_str().unwrap().to_string();
    h.wait_for_status("/api/v1/trades", Some(&newest), 200, Duration::from_secs(1));
    assert_eq!(h.get("/api/v1/trades", Some(&new_key)).status(), 200);
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(h.get("/api/v1/trades", Some(&new_key)).status(), 401);
    assert_eq!(h.get("/api/v1/trades", Some(&newest)).status(), 200);
}

#[test]
fn rotation_is_capped_by_active_keys() {
    let h = Harness::start();
    let svc = h.create(json!({"service_name": "spinner", "scopes": []}));
    for _ in 0..9 {
        rotate(&h, &svc.service_id, None);
    }
    let (s, v) = h.admin_req(
        reqwest::Method::POST,
        &format!("/auth/admin/services/{}/rotate", svc.service_id),
        None,
    );
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"], "conflict");
    // A rotation that ends the old keys at once (a leak) is always allowed.
    let (s, _) = h.admin_req(
        reqwest::Method::POST,
        &format!("/auth/admin/services/{}/rotate", svc.service_id),
        Some(json!({"grace_seconds": 0})),
    );
    assert_eq!(s, 200);
    let (_, shown) = h.admin_req(
        reqwest::Method::GET,
        &format!("/auth/admin/services/{}", svc.service_id),
        None,
    );
    let keys = shown["keys"].as_array().unwrap();
    let status = |s: &str| keys.iter().filter(|k| k["status"] == s).count();
    assert_eq!(keys.len(), 11, "{shown}");
    assert_eq!(status("active"), 1, "{shown}");
    // Grace 0 ended the ten old keys at once: none is left in grace.
    assert_eq!(status("expired"), 10, "{shown}");
    assert_eq!(status("grace"), 0, "{shown}");
}
