//! OAuth2: real client libraries get tokens; the sidecar checks them locally; introspection,
//! revocation, secret and signing-key rotation; every token endpoint error.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{free_port, header, scrape, Created, Harness, Relay, ADMIN_KEY, ROUTES};

fn trader(h: &Harness) -> Created {
    h.create(json!({"service_name": "trader", "scopes": ["trade:read", "account:read"]}))
}

#[test]
fn the_oauth2_crate_gets_tokens_with_basic_and_post_auth_and_calls_through_the_sidecar() {
    use oauth2::basic::BasicClient;
    use oauth2::{AuthType, ClientId, ClientSecret, Scope, TokenResponse, TokenUrl};

    let h = Harness::start();
    let svc = trader(&h);
    let http = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (auth, token_path) in [
        (AuthType::BasicAuth, "/oauth/token"),
        (AuthType::RequestBody, "/oauth/token"),
        (AuthType::RequestBody, "/auth/service-token"),
    ] {
        let client = BasicClient::new(ClientId::new(svc.service_id.clone()))
            .set_client_secret(ClientSecret::new(svc.client_secret.clone()))
            .set_token_uri(TokenUrl::new(h.admin_url(token_path)).unwrap())
            .set_auth_type(auth.clone());
        let tok = client
            .exchange_client_credentials()
            .add_scope(Scope::new("trade:read".into()))
            .request(&http)
            .unwrap_or_else(|e| panic!("{auth:?} {token_path}: {e:?}"));
        assert_eq!(tok.token_type(), &oauth2::basic::BasicTokenType::Bearer);
        assert_eq!(tok.expires_in(), Some(Duration::from_secs(3600)));
        assert_eq!(tok.scopes().unwrap()[0].as_str(), "trade:read");
        let jwt = tok.access_token().secret().to_string();

        let r = h.get("/api/v1/trades", Some(&jwt));
        assert_eq!(r.status(), 200, "{auth:?}");
        let echo: Value = r.json().unwrap();
        let hd = &echo["headers"];
        assert_eq!(hd["x-permiso-service-id"], svc.service_id.as_str());
        assert_eq!(hd["x-permiso-scopes"], "trade:read");
        // The token id sent upstream is the token's own jti.
        let payload = jwt.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).unwrap(),
        )
        .unwrap();
        assert_eq!(hd["x-permiso-token-id"], claims["jti"], "{auth:?}");
        assert!(hd.get("authorization").is_none());
        // The token carries only the scope asked for.
        assert_eq!(h.get("/api/v1/account", Some(&jwt)).status(), 403);
    }
}

#[test]
fn token_response_and_jwt_follow_rfc_6749_and_9068() {
    let h = Harness::start();
    let svc = trader(&h);
    let r = h
        .http
        .post(h.admin_url("/oauth/token"))
        .basic_auth(&svc.service_id, Some(&svc.client_secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "cache-control"), Some("no-store"));
    let body: Value = r.json().unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "trade:read account:read");
    assert!(body.get("refresh_token").is_none());
    let jwt = body["access_token"].as_str().unwrap();
    let part = |i: usize| -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(jwt.split('.').nth(i).unwrap()).unwrap()).unwrap()
    };
    let (hdr, claims) = (part(0), part(1));
    assert_eq!(hdr["typ"], "at+jwt");
    assert_eq!(hdr["alg"], "EdDSA");
    let meta: Value = h
        .http
        .get(h.admin_url("/.well-known/oauth-authorization-server"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(claims["iss"], meta["issuer"]);
    assert_eq!(meta["issuer"], format!("http://{}", h.admin_addr));
    assert_eq!(meta["token_endpoint"], h.admin_url("/oauth/token"));
    assert_eq!(meta["grant_types_supported"], json!(["client_credentials"]));
    assert_eq!(claims["aud"], "permiso");
    assert_eq!(claims["sub"], svc.service_id.as_str());
    assert_eq!(claims["client_id"], svc.service_id.as_str());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );
    assert_eq!(claims["nbf"], claims["iat"]);
    assert!(claims["jti"].is_string());
    let jwks: Value = h
        .http
        .get(h.admin_url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(
        (key["kty"].as_str(), key["crv"].as_str(), key["alg"].as_str()),
        (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
    );
    assert_eq!(key["kid"], hdr["kid"]);
    assert!(key.get("d").is_none(), "private key material in the JWKS");
}

fn forge(jwt: &str, header: Value, signature: &str) -> String {
    let payload = jwt.split('.').nth(1).unwrap();
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        payload,
        signature
    )
}

fn assert_invalid_token(h: &Harness, token: &str, what: &str) {
    let r = h.get("/api/v1/trades", Some(token));
    assert_eq!(r.status(), 401, "{what}");
    assert!(
        header(&r, "www-authenticate")
            .unwrap()
            .contains("error=\"invalid_token\""),
        "{what}"
    );
    assert_eq!(r.json::<Value>().unwrap()["error"], "invalid_token", "{what}");
}

#[test]
fn every_bad_token_is_refused_with_invalid_token() {
    let h = Harness::start();
    let svc = trader(&h);
    let jwt = h.token(&svc, None);
    assert_eq!(h.get("/api/v1/trades", Some(&jwt)).status(), 200);
    let parts: Vec<&str> = jwt.split('.').collect();
    let kid =
        serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap()["kid"].clone();

    // Tampered: payload with a wider scope under the original signature; and a flipped bit.
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["scope"] = json!("admin:*");
    let escalated = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    assert_invalid_token(&h, &escalated, "tampered payload");
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 0x40;
    assert_invalid_token(
        &h,
        &format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig)),
        "tampered signature",
    );
    // alg none.
    assert_invalid_token(
        &h,
        &forge(&jwt, json!({"alg": "none", "typ": "at+jwt", "kid": kid}), ""),
        "alg none",
    );
    // HS256 keyed with the published public key.
    let jwks: Value = h
        .http
        .get(h.admin_url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let x = jwks["keys"][0]["x"].as_str().unwrap().to_string();
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.typ = Some("at+jwt".into());
    hs.kid = kid.as_str().map(str::to_string);
    for secret in [x.as_bytes().to_vec(), URL_SAFE_NO_PAD.decode(&x).unwrap()] {
        let t = jsonwebtoken::encode(&hs, &claims, &jsonwebtoken::EncodingKey::from_secret(&secret)).unwrap();
        assert_invalid_token(&h, &t, "HS256 with the public key");
    }
    // Unknown kid, and a wrong typ.
    assert_invalid_token(
        &h,
        &forge(
            &jwt,
            json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "nope"}),
            parts[2],
        ),
        "unknown kid",
    );
    assert_invalid_token(
        &h,
        &forge(&jwt, json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}), parts[2]),
        "typ JWT",
    );

    // Expired: past exp + leeway by the sidecar's clock.
    h.clock.advance(Duration::from_secs(3600 + 30));
    assert_invalid_token(&h, &jwt, "expired");
    // Not yet valid: minted by an admin clock running ahead of the sidecar's.
    h.clock.advance(Duration::from_secs(600));
    let future = h.token(&svc, None);
    h.clock.rewind(Duration::from_secs(600));
    assert_invalid_token(&h, &future, "not yet valid");
    h.clock.advance(Duration::from_secs(600));
    assert_eq!(h.get("/api/v1/trades", Some(&future)).status(), 200);

    // Revoked jti: the sidecar refuses it within a second.
    let r = h
        .http
        .post(h.admin_url("/oauth/revoke"))
        .basic_auth(&svc.service_id, Some(&svc.client_secret))
        .form(&[("token", future.as_str())])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let took = h.wait_for_status("/api/v1/trades", Some(&future), 401, Duration::from_secs(1));
    eprintln!("JWT revocation reached the sidecar in {took:?}");
    assert_invalid_token(&h, &future, "revoked");

    // Missing scope: 403, not 401.
    let narrow = h.token(&svc, Some("account:read"));
    let r = h.get("/api/v1/trades", Some(&narrow));
    assert_eq!(r.status(), 403);
    assert!(header(&r, "www-authenticate")
        .unwrap()
        .contains("scope=\"trade:read\""));
}

#[test]
fn wrong_audience_and_wrong_issuer_are_refused() {
    let mut h = Harness::start();
    let svc = trader(&h);
    let jwt = h.token(&svc, None);
    // A sidecar that expects another audience.
    h.stop_sidecar();
    h.start_sidecar(&format!("[sidecar.tokens]\naudience = \"ledger\"\n{ROUTES}"));
    h.wait_for_status("/api/v1/trades", Some(&svc.api_key), 200, Duration::from_secs(2));
    assert_invalid_token(&h, &jwt, "wrong audience");
    h.stop_sidecar();
    h.start_sidecar(ROUTES);
    h.wait_for_status("/api/v1/trades", Some(&jwt), 200, Duration::from_secs(2));

    // A second admin plane on the same database and keys, but announcing another issuer: its
    // tokens are validly signed yet not from the issuer the sidecar syncs with.
    let rogue =
        crate::common::start_admin_with(&h.db_path(), "127.0.0.1:0".parse().unwrap(), &h.clock, |f| {
            f.issuer = Some("https://rogue.example".into())
        });
    let r = h
        .http
        .post(format!("http://{}/oauth/token", rogue.addr))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &svc.service_id),
            ("client_secret", &svc.client_secret),
        ])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let rogue_jwt = r.json::<Value>().unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_invalid_token(&h, &rogue_jwt, "wrong issuer");
    rogue.stop();
}

fn introspect(h: &Harness, auth: Option<(&str, &str)>, token: &str) -> (u16, Value) {
    let mut rb = h
        .http
        .post(h.admin_url("/oauth/introspect"))
        .form(&[("token", token)]);
    if let Some((id, secret)) = auth {
        rb = rb.basic_auth(id, Some(secret));
    }
    let r = rb.send().unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

#[test]
fn introspection_reports_jwts_and_api_keys() {
    let h = Harness::start();
    let svc = trader(&h);
    let rs = h.create(json!({"service_name": "resource-server", "scopes": ["token:introspect"]}));
    let me = Some((rs.service_id.as_str(), rs.client_secret.as_str()));
    let jwt = h.token(&svc, Some("trade:read"));

    let (s, v) = introspect(&h, me, &jwt);
    assert_eq!(s, 200);
    assert_eq!(v["active"], true);
    assert_eq!(v["scope"], "trade:read");
    assert_eq!(v["client_id"], svc.service_id.as_str());
    assert_eq!(v["token_type"], "Bearer");
    for f in ["exp", "iat", "nbf", "sub", "aud", "iss", "jti"] {
        assert!(!v[f].is_null(), "{f} missing: {v}");
    }
    let (_, v) = introspect(&h, me, &svc.api_key);
    assert_eq!(v["active"], true);
    assert_eq!(v["client_id"], svc.service_id.as_str());
    assert_eq!(v["scope"], "trade:read account:read");
    // A service key holding token:introspect may call it with Bearer.
    let r = h
        .http
        .post(h.admin_url("/oauth/introspect"))
        .bearer_auth(&rs.api_key)
        .form(&[("token", &jwt)])
        .send()
        .unwrap();
    assert_eq!(r.json::<Value>().unwrap()["active"], true);
    // One without the scope may not.
    let r = h
        .http
        .post(h.admin_url("/oauth/introspect"))
        .bearer_auth(&svc.api_key)
        .form(&[("token", &jwt)])
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);

    let inactive = json!({"active": false});
    // A client without token:introspect, authenticated by its secret, learns about its own
    // tokens and keys only: another service's are exactly {"active": false}.
    let other = h.create(json!({"service_name": "nosy", "scopes": ["trade:read"]}));
    let nosy = Some((other.service_id.as_str(), other.client_secret.as_str()));
    assert_eq!(introspect(&h, nosy, &jwt), (200, inactive.clone()));
    assert_eq!(introspect(&h, nosy, &svc.api_key), (200, inactive.clone()));
    let own_jwt = h.token(&other, None);
    assert_eq!(introspect(&h, nosy, &own_jwt).1["active"], true);
    assert_eq!(introspect(&h, nosy, &other.api_key).1["active"], true);
    for garbage in ["garbage", "svc_live_nope", "eyJ.eyJ.sig", &"x".repeat(3000)] {
        assert_eq!(
            introspect(&h, me, garbage),
            (200, inactive.clone()),
            "{garbage:.20}"
        );
    }
    // Revoked.
    let revoked = h.token(&svc, None);
    let r = h
        .http
        .post(h.admin_url("/oauth/revoke"))
        .header("X-Admin-Api-Key", ADMIN_KEY)
        .form(&[("token", &revoked)])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(introspect(&h, me, &revoked), (200, inactive.clone()));
    // API key revoked through /oauth/revoke by its own client.
    let r = h
        .http
        .post(h.admin_url("/oauth/revoke"))
        .basic_auth(&svc.service_id, Some(&svc.client_secret))
        .form(&[("token", &svc.api_key)])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(introspect(&h, me, &svc.api_key), (200, inactive.clone()));
    // Both revocations are in the audit log, with who asked.
    let (_, v) = h.admin_req(
        reqwest::Method::GET,
        &format!("/auth/admin/audit?target={}", svc.service_id),
        None,
    );
    let revocations: Vec<(&str, &str)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().ends_with(".revoke"))
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    let client = format!("client:{}", svc.service_id);
    assert_eq!(
        revocations,
        [("token.revoke", "admin-key"), ("key.revoke", client.as_str())]
    );
    // Expired.
    h.clock.advance(Duration::from_secs(3601));
    assert_eq!(introspect(&h, me, &jwt), (200, inactive.clone()));
    // Unauthenticated, or a wrong secret: 401.
    assert_eq!(introspect(&h, None, &jwt).0, 401);
    assert_eq!(introspect(&h, Some((&rs.service_id, "pcs_wrong")), &jwt).0, 401);
}

#[test]
fn revocation_is_200_for_unknown_and_foreign_tokens_and_revokes_nothing_else() {
    let h = Harness::start();
    let a = trader(&h);
    let b = h.create(json!({"service_name": "other", "scopes": ["trade:read"]}));
    let a_jwt = h.token(&a, None);
    // B may not revoke A's token: 200 (nothing learned), but the token stays valid.
    for token in [a_jwt.as_str(), "unknown-token", a.api_key.as_str()] {
        let r = h
            .http
            .post(h.admin_url("/oauth/revoke"))
            .basic_auth(&b.service_id, Some(&b.client_secret))
            .form(&[("token", token)])
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Had anything been revoked, the sidecar would learn it: wait until it holds the admin
    // plane's current version, then ask. Nothing was written either.
    h.wait_sidecar_caught_up();
    assert_eq!(h.get("/api/v1/trades", Some(&a_jwt)).status(), 200);
    assert_eq!(h.get("/api/v1/trades", Some(&a.api_key)).status(), 200);
    let (_, audit) = h.admin_req(Method::GET, "/auth/admin/audit?limit=1000", None);
    let revokes: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().ends_with(".revoke"))
        .collect();
    assert!(
        revokes.is_empty(),
        "a foreign revocation was written: {revokes:?}"
    );
    // No token parameter: invalid_request.
    let r = h
        .http
        .post(h.admin_url("/oauth/revoke"))
        .basic_auth(&b.service_id, Some(&b.client_secret))
        .form(&[("x", "y")])
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().unwrap()["error"], "invalid_request");
}

/// The sync evicts a revoked token from the sidecar's cache (the per-hit deny check would
/// refuse it anyway, so only the cache's size shows the eviction), and presenting the revoked
/// token again does not put it back.
#[test]
fn a_revoked_token_leaves_the_sidecar_cache() {
    let h = Harness::start();
    let a = trader(&h);
    let (keep, drop) = (h.token(&a, None), h.token(&a, None));
    for t in [&keep, &drop] {
        assert_eq!(h.get("/api/v1/trades", Some(t)).status(), 200);
    }
    let health = h.sidecar.as_ref().unwrap().health_addr.unwrap();
    let entries = || {
        scrape(
            &h.http,
            &format!("http://{health}/metrics"),
            "permiso_sidecar_token_cache_entries",
        )
    };
    assert_eq!(entries(), Some(2));
    let r = h
        .http
        .post(h.admin_url("/oauth/revoke"))
        .header("X-Admin-Api-Key", ADMIN_KEY)
        .form(&[("token", &drop)])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    h.wait_sidecar_caught_up();
    assert_eq!(entries(), Some(1), "the revoked token is still cached");
    assert_eq!(h.get("/api/v1/trades", Some(&drop)).status(), 401);
    assert_eq!(entries(), Some(1), "a replay put the revoked token back");
    assert_eq!(h.get("/api/v1/trades", Some(&keep)).status(), 200);
}

/// A token signed by a key the sidecar has not heard of makes it sync at once instead of
/// waiting for its long poll. The relay loses the admin plane's answer to the parked long
/// poll (wait 30 s), so within the 5 s allowed only the early sync can bring the new key.
#[test]
fn a_token_with_an_unknown_key_id_triggers_an_early_sync() {
    let h = Harness::start();
    let svc = trader(&h);
    let relay = Relay::start(h.admin_addr);
    let dir = tempfile::tempdir().unwrap();
    let cfg = h.sidecar_config_at(free_port(), relay.addr, &dir.path().join("snap.json"), 30, ROUTES);
    let listen = cfg.listen;
    let side = permiso::sidecar::start(cfg, std::sync::Arc::new(h.clock.clone())).unwrap();
    let call = |token: &str| {
        h.http
            .get(format!("http://{listen}/api/v1/trades"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    let wait_for = |token: &str, what: &str| {
        let started = std::time::Instant::now();
        while call(token) != 200 {
            assert!(started.elapsed() < Duration::from_secs(5), "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(&h.token(&svc, None), "the relayed sidecar never synced");
    // Its long poll is on a relayed connection now; the answer to it will be lost.
    relay.mute();
    let (s, v) = h.admin_req(Method::POST, "/auth/admin/signing-keys/rotate", None);
    assert_eq!(s, 200, "{v}");
    let new_kid = v["new_kid"].as_str().unwrap().to_string();
    h.clock.advance(Duration::from_secs(300));
    let token = h.token(&svc, None);
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(
        header["kid"],
        new_kid.as_str(),
        "the new key signs after the publish delay"
    );
    assert_eq!(call(&token), 401, "the sidecar cannot know the new key yet");
    wait_for(&token, "no early sync brought the new signing key");
    drop(side);
}

fn token_request(
    h: &Harness,
    basic: Option<(&str, &str)>,
    form: &[(&str, &str)],
) -> reqwest::blocking::Response {
    let mut rb = h.http.post(h.admin_url("/oauth/token")).form(form);
    if let Some((id, s)) = basic {
        rb = rb.basic_auth(id, Some(s));
    }
    rb.send().unwrap()
}

fn expect_error(r: reqwest::blocking::Response, status: u16, code: &str, what: &str) {
    assert_eq!(r.status().as_u16(), status, "{what}");
    assert_eq!(header(&r, "cache-control"), Some("no-store"), "{what}");
    if status == 401 {
        assert_eq!(
            header(&r, "www-authenticate"),
            Some("Basic realm=\"permiso\""),
            "{what}"
        );
    }
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"], code, "{what}: {v}");
    assert!(v["error_description"].is_string(), "{what}");
}

#[test]
fn every_token_endpoint_error() {
    let h = Harness::start();
    let svc = trader(&h);
    let (id, secret) = (svc.service_id.as_str(), svc.client_secret.as_str());
    let cc = ("grant_type", "client_credentials");

    expect_error(
        token_request(&h, Some((id, secret)), &[]),
        400,
        "invalid_request",
        "no grant_type",
    );
    expect_error(
        token_request(
            &h,
            Some((id, secret)),
            &[cc, ("client_id", id), ("client_secret", secret)],
        ),
        400,
        "invalid_request",
        "two auth methods",
    );
    let r = h
        .http
        .post(h.admin_url("/oauth/token"))
        .basic_auth(id, Some(secret))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials&scope=a&scope=b")
        .send()
        .unwrap();
    expect_error(r, 400, "invalid_request", "repeated parameter");
    let r = h
        .http
        .post(h.admin_url("/oauth/token"))
        .basic_auth(id, Some(secret))
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .unwrap();
    expect_error(r, 400, "invalid_request", "JSON body");
    expect_error(
        token_request(&h, Some((id, secret)), &[("grant_type", "password")]),
        400,
        "unsupported_grant_type",
        "password grant",
    );
    expect_error(
        token_request(&h, None, &[cc]),
        401,
        "invalid_client",
        "no client authentication",
    );
    expect_error(
        token_request(&h, Some((id, "pcs_wrong")), &[cc]),
        401,
        "invalid_client",
        "wrong secret (basic)",
    );
    expect_error(
        token_request(&h, None, &[cc, ("client_id", id), ("client_secret", "pcs_wrong")]),
        401,
        "invalid_client",
        "wrong secret (post)",
    );
    expect_error(
        token_request(&h, Some(("srv_unknown", secret)), &[cc]),
        401,
        "invalid_client",
        "unknown client",
    );
    expect_error(
        token_request(&h, Some((id, secret)), &[cc, ("scope", "admin:*")]),
        400,
        "invalid_scope",
        "scope beyond the client's",
    );
    expect_error(
        token_request(&h, Some((id, secret)), &[cc, ("scope", "trade::read")]),
        400,
        "invalid_scope",
        "malformed scope",
    );
    // The descriptions say what to do: the scopes the client holds, and the separator.
    let v: Value = token_request(&h, Some((id, secret)), &[cc, ("scope", "admin:*")])
        .json()
        .unwrap();
    let held = h
        .admin_req(Method::GET, &format!("/auth/admin/services/{id}"), None)
        .1["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .ends_with(&format!("it may request: {held}")),
        "{v}"
    );
    let v: Value = token_request(
        &h,
        Some((id, secret)),
        &[cc, ("scope", "trade:read,account:read")],
    )
    .json()
    .unwrap();
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("space-separated"),
        "{v}"
    );

    // Disabled client, and a client calling from outside its allowed_ips.
    let (s, _) = h.admin_req(
        Method::PATCH,
        &format!("/auth/admin/services/{id}"),
        Some(json!({"disabled": true})),
    );
    assert_eq!(s, 200);
    expect_error(
        token_request(&h, Some((id, secret)), &[cc]),
        400,
        "unauthorized_client",
        "disabled client",
    );
    let remote = h.create(json!({"service_name": "remote", "scopes": [], "allowed_ips": ["10.0.0.0/8"]}));
    expect_error(
        token_request(&h, Some((&remote.service_id, &remote.client_secret)), &[cc]),
        400,
        "unauthorized_client",
        "outside allowed_ips",
    );
    // /auth/service-token without grant_type works for seed-style clients.
    let ok = h.create(json!({"service_name": "seed-client", "scopes": ["trade:read"]}));
    let r = h
        .http
        .post(h.admin_url("/auth/service-token"))
        .form(&[
            ("client_id", ok.service_id.as_str()),
            ("client_secret", ok.client_secret.as_str()),
            ("scope", "trade:read"),
        ])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A token request from a given loopback source address (127.0.0.2+ stand for other hosts).
fn token_request_from(h: &Harness, from: &str, id: &str, secret: &str) -> reqwest::blocking::Response {
    let client = reqwest::blocking::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    client
        .post(h.admin_url("/oauth/token"))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .unwrap()
}

#[test]
fn the_token_endpoint_throttles_failures_and_never_a_client_that_has_not_failed() {
    let h = Harness::start_custom(crate::common::ROUTES, |f| {
        f.client_auth_failures_per_minute = 3;
        f.client_auth_failures_per_minute_per_ip = 6;
    });
    let svc = trader(&h);
    let id = svc.service_id.as_str();
    // Someone else, at another address, fails with this client's id (ids are not secret).
    for _ in 0..3 {
        let r = token_request_from(&h, "127.0.0.2", id, "pcs_guess");
        expect_error(r, 401, "invalid_client", "guess");
    }
    // That pair is now refused before the secret is checked, even with the right one...
    let r = token_request_from(&h, "127.0.0.2", id, &svc.client_secret);
    assert_eq!(r.status(), 429);
    assert!(header(&r, "retry-after").is_some_and(|v| v.parse::<u64>().unwrap() > 0));
    assert_eq!(r.json::<Value>().unwrap()["error"], "rate_limited");
    // ...and the real client, from its own address, is not locked out: 200 every time.
    for _ in 0..20 {
        assert_eq!(
            token_request_from(&h, "127.0.0.1", id, &svc.client_secret).status(),
            200
        );
    }
    // An address spraying failures over many ids is refused as a whole.
    for i in 0..6 {
        let other = format!("srv_{:0>22}", i);
        let r = token_request_from(&h, "127.0.0.3", &other, "pcs_guess");
        assert_eq!(r.status(), 401, "attempt {i}");
    }
    assert_eq!(
        token_request_from(&h, "127.0.0.3", id, &svc.client_secret).status(),
        429
    );
    assert_eq!(
        token_request_from(&h, "127.0.0.1", id, &svc.client_secret).status(),
        200
    );
    // The window ends: the pair may try again.
    h.clock.advance(Duration::from_secs(61));
    assert_eq!(
        token_request_from(&h, "127.0.0.2", id, &svc.client_secret).status(),
        200
    );
    // Failed client authentications are audited, naming the client tried.
    let (s, v) = h.admin_req(
        Method::GET,
        "/auth/admin/audit?action=auth.failed&limit=1000",
        None,
    );
    assert_eq!(s, 200);
    let entries = v["entries"].as_array().unwrap();
    let for_client = entries
        .iter()
        .filter(|e| e["target"] == id && e["change"]["reason"] == "wrong client secret")
        .count();
    assert_eq!(for_client, 3, "{v}");
    assert!(
        entries.iter().all(|e| e["source_ip"] != "127.0.0.1"),
        "the real client never failed"
    );
    assert!(
        !v.to_string().contains("pcs_guess"),
        "secrets never reach the audit log"
    );
}

#[test]
fn client_secret_rotation_has_a_grace_window() {
    let h = Harness::start();
    let svc = trader(&h);
    let (s, v) = h.admin_req(
        Method::POST,
        &format!("/auth/admin/services/{}/secret/rotate", svc.service_id),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let new_secret = v["client_secret"].as_str().unwrap().to_string();
    assert!(new_secret.starts_with("pcs_"));
    let cc = ("grant_type", "client_credentials");
    assert_eq!(
        token_request(&h, Some((&svc.service_id, &svc.client_secret)), &[cc]).status(),
        200
    );
    assert_eq!(
        token_request(&h, Some((&svc.service_id, &new_secret)), &[cc]).status(),
        200
    );
    h.clock.advance(Duration::from_secs(7 * 24 * 3600));
    assert_eq!(
        token_request(&h, Some((&svc.service_id, &svc.client_secret)), &[cc]).status(),
        401
    );
    assert_eq!(
        token_request(&h, Some((&svc.service_id, &new_secret)), &[cc]).status(),
        200
    );
    let (s, shown) = h.admin_req(
        Method::GET,
        &format!("/auth/admin/services/{}", svc.service_id),
        None,
    );
    assert_eq!(s, 200);
    assert!(!shown.to_string().contains(&new_secret));
    assert_eq!(shown["client_secrets"].as_array().unwrap().len(), 2);
}

#[test]
fn signing_key_rotation_under_traffic_fails_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    let h = Harness::start();
    let svc = trader(&h);
    let old = h.token(&svc, None);
    let kid_of = |t: &str| -> String {
        serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(t.split('.').next().unwrap()).unwrap())
            .unwrap()["kid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let old_kid = kid_of(&old);
    // Traffic with fresh tokens all along: each minted by the token endpoint (so whichever
    // key signs at that moment), used three times, never from a cache of the test's.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU32::new(0));
    let ok_by_kid: Arc<Mutex<std::collections::HashMap<String, u32>>> = Default::default();
    let traffic = {
        let (client, admin, url) = (
            h.http.clone(),
            h.admin_url("/oauth/token"),
            h.sidecar_url("/api/v1/trades"),
        );
        let (id, secret) = (svc.service_id.clone(), svc.client_secret.clone());
        let (stop, failed, ok_by_kid) = (stop.clone(), failed.clone(), ok_by_kid.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let minted: Value = client
                    .post(&admin)
                    .basic_auth(&id, Some(&secret))
                    .form(&[("grant_type", "client_credentials")])
                    .send()
                    .unwrap()
                    .json()
                    .unwrap();
                let token = minted["access_token"].as_str().unwrap().to_string();
                let header = token.split('.').next().unwrap();
                let kid = serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap()
                    ["kid"]
                    .as_str()
                    .unwrap()
                    .to_string();
                for _ in 0..3 {
                    match client.get(&url).bearer_auth(&token).send() {
                        Ok(r) if r.status() == 200 => {
                            *ok_by_kid.lock().unwrap().entry(kid.clone()).or_default() += 1
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        })
    };
    let served_with = |kid: &str| ok_by_kid.lock().unwrap().get(kid).copied().unwrap_or(0);
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        let started = std::time::Instant::now();
        while !f() {
            assert!(started.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for("traffic with the first key", &|| served_with(&old_kid) >= 6);

    let (s, v) = h.admin_req(Method::POST, "/auth/admin/signing-keys/rotate", None);
    assert_eq!(s, 200, "{v}");
    let new_kid = v["new_kid"].as_str().unwrap().to_string();
    // Published at once, not yet signing: a token minted now still carries the old kid.
    assert!(v["published_kids"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k == new_kid.as_str()));
    assert_ne!(v["signing_kid"], new_kid.as_str());
    assert_eq!(kid_of(&h.token(&svc, None)), old_kid);
    let jwks: Value = h
        .http
        .get(h.admin_url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    // Sidecars learn the new key before it signs.
    h.wait_sidecar_caught_up();

    // After the publish delay the new key signs: the traffic moves onto it without a failure.
    h.clock.advance(Duration::from_secs(300));
    let new = h.token(&svc, None);
    assert_eq!(kid_of(&new), new_kid);
    wait_for("traffic with the new key", &|| served_with(&new_kid) >= 6);
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let (old_ok, new_ok) = (served_with(&old_kid), served_with(&new_kid));
    eprintln!(
        "requests during signing-key rotation: {old_ok} with the old key, {new_ok} with the new, {} failed",
        failed.load(Ordering::Relaxed)
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);

    // The old token keeps working until it expires; then it is refused as expired.
    assert_eq!(h.get("/api/v1/trades", Some(&old)).status(), 200);
    h.clock.advance(Duration::from_secs(3600));
    assert_eq!(h.get("/api/v1/trades", Some(&old)).status(), 401);
    assert_eq!(h.get("/api/v1/trades", Some(&new)).status(), 200);
}

/// Review finding: JWTs issued before a service was disabled worked again once it was
/// re-enabled. A disable now kills every token issued so far, at the sidecar and at
/// introspection, for good.
#[test]
fn tokens_issued_before_a_disable_stay_dead_after_re_enabling() {
    let h = Harness::start();
    let svc = trader(&h);
    let rs = h.create(json!({"service_name": "rs-disable", "scopes": ["token:introspect"]}));
    let me = Some((rs.service_id.as_str(), rs.client_secret.as_str()));
    let old = h.token(&svc, Some("trade:read"));
    assert_eq!(h.get("/api/v1/trades", Some(&old)).status(), 200);
    let patch = |disabled: bool| {
        let (s, v) = h.admin_req(
            Method::PATCH,
            &format!("/auth/admin/services/{}", svc.service_id),
            Some(json!({"disabled": disabled})),
        );
        assert_eq!(s, 200, "{v}");
        h.wait_sidecar_caught_up();
    };
    patch(true);
    assert_eq!(h.get("/api/v1/trades", Some(&old)).status(), 401);
    // The next second, the service is enabled again: the old token stays dead, a new one works,
    // and so does the API key (keys are not tokens).
    h.clock.advance(Duration::from_secs(1));
    patch(false);
    assert_eq!(h.get("/api/v1/trades", Some(&old)).status(), 401);
    assert_eq!(introspect(&h, me, &old), (200, json!({"active": false})));
    let new = h.token(&svc, Some("trade:read"));
    assert_eq!(h.get("/api/v1/trades", Some(&new)).status(), 200);
    assert_eq!(introspect(&h, me, &new).1["active"], true);
    assert_eq!(h.get("/api/v1/trades", Some(&svc.api_key)).status(), 200);
}

/// Each client's `access_token_lifetime` sets its tokens' `expires_in` and `exp`, and the
/// sidecar refuses them after it (plus its leeway).
#[test]
fn a_clients_token_lifetime_is_its_own() {
    let h = Harness::start();
    let short = h.create(
        json!({"service_name": "short-lived", "scopes": ["trade:read"], "access_token_lifetime": 120}),
    );
    let default = trader(&h);
    let token_of = |svc: &crate::common::Created| -> Value {
        h.http
            .post(h.admin_url("/oauth/token"))
            .basic_auth(&svc.service_id, Some(&svc.client_secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let claims = |jwt: &str| -> Value {
        let payload = jwt.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).unwrap(),
        )
        .unwrap()
    };
    let s = token_of(&short);
    assert_eq!(s["expires_in"], 120);
    let sj = s["access_token"].as_str().unwrap().to_string();
    let c = claims(&sj);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 120);
    let d = token_of(&default);
    assert_eq!(d["expires_in"], 3600);
    let dj = d["access_token"].as_str().unwrap().to_string();
    // Past 120 s and the sidecar's 30 s leeway: the short one is refused, the other is not.
    assert_eq!(h.get("/api/v1/trades", Some(&sj)).status(), 200);
    h.clock.advance(Duration::from_secs(151));
    assert_eq!(h.get("/api/v1/trades", Some(&sj)).status(), 401);
    assert_eq!(h.get("/api/v1/trades", Some(&dj)).status(), 200);
    // Changed later by PATCH, within 60..=86400.
    let path = format!("/auth/admin/services/{}", default.service_id);
    let (st, _) = h.admin_req(Method::PATCH, &path, Some(json!({"access_token_lifetime": 59})));
    assert_eq!(st, 400);
    let (st, _) = h.admin_req(Method::PATCH, &path, Some(json!({"access_token_lifetime": 600})));
    assert_eq!(st, 200);
    assert_eq!(token_of(&default)["expires_in"], 600);
}

/// The signing-key publication window: a rotated-in key is published at once and signs only
/// after the publish delay (300 s); the old key stays published for 24 h (the longest token
/// lifetime) after it stopped signing, then is dropped.
#[test]
fn signing_keys_are_published_before_they_sign_and_after_they_stop() {
    let h = Harness::start();
    let svc = trader(&h);
    let kid_of = |jwt: &str| -> String {
        let header = jwt.split('.').next().unwrap();
        let v: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap(),
        )
        .unwrap();
        v["kid"].as_str().unwrap().to_string()
    };
    let published = || -> Vec<String> {
        let v: Value = h
            .http
            .get(h.admin_url("/.well-known/jwks.json"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    };
    let old = kid_of(&h.token(&svc, None));
    assert_eq!(published(), [old.as_str()]);
    let (s, v) = h.admin_req(Method::POST, "/auth/admin/signing-keys/rotate", None);
    assert_eq!(s, 200, "{v}");
    let new = v["new_kid"].as_str().unwrap().to_string();
    // Published at once, not signing yet.
    assert_eq!(published(), [old.clone(), new.clone()]);
    assert_eq!(kid_of(&h.token(&svc, None)), old);
    h.clock.advance(Duration::from_secs(299));
    assert_eq!(kid_of(&h.token(&svc, None)), old);
    // After the delay the new key signs; the old one is still published for its tokens.
    h.clock.advance(Duration::from_secs(1));
    let fresh = h.token(&svc, None);
    assert_eq!(kid_of(&fresh), new);
    assert_eq!(published(), [old.clone(), new.clone()]);
    h.wait_sidecar_caught_up();
    assert_eq!(h.get("/api/v1/trades", Some(&fresh)).status(), 200);
    // 24 h after it stopped signing, the old key is dropped; the new one stays.
    h.clock.advance(Duration::from_secs(24 * 3600 - 1));
    assert_eq!(published(), [old.clone(), new.clone()]);
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(published(), [new.as_str()]);
}

/// Found while building the Python client (issue 18): behind the sidecar, `X-Permiso-Scopes`
/// of a token carried every scope the token was granted, including one the admin removed from
/// the service since; the sidecar's own route checks no longer honoured it, but an upstream
/// checking scopes itself would have. Now the header holds what the service still holds.
#[test]
fn a_token_passes_on_only_the_scopes_its_service_still_holds() {
    let h = Harness::start();
    let scopes_upstream = |jwt: &str| -> String {
        let r = h.get("/api/v1/trades", Some(jwt));
        assert_eq!(r.status(), 200);
        let echo: Value = r.json().unwrap();
        echo["headers"]["x-permiso-scopes"].as_str().unwrap().to_string()
    };
    let narrowed = |svc: &crate::common::Created, scopes: Value| {
        let (s, v) = h.admin_req(
            reqwest::Method::PATCH,
            &format!("/auth/admin/services/{}", svc.service_id),
            Some(json!({ "scopes": scopes })),
        );
        assert_eq!(s, 200, "{v}");
    };
    let both = h.create(json!({"service_name": "narrowed", "scopes": ["trade:read", "account:read"]}));
    h.wait_synced();
    let jwt = h.token(&both, Some("trade:read account:read"));
    assert_eq!(scopes_upstream(&jwt), "trade:read account:read");
    narrowed(&both, json!(["trade:read"]));
    h.wait_for_status("/api/v1/account", Some(&jwt), 403, Duration::from_secs(2));
    assert_eq!(scopes_upstream(&jwt), "trade:read");

    // A granted wildcard narrows to what is held under it.
    let wide = h.create(json!({"service_name": "wildcard", "scopes": ["trade:*"]}));
    h.wait_synced();
    let jwt = h.token(&wide, Some("trade:*"));
    assert_eq!(scopes_upstream(&jwt), "trade:*");
    narrowed(&wide, json!(["trade:read", "market:data"]));
    let started = std::time::Instant::now();
    while scopes_upstream(&jwt) != "trade:read" {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{}",
            scopes_upstream(&jwt)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Introspection answers what the sidecar forwards: the scopes still held, and trust only
    // while the service has it (a standalone resource server must not accept more).
    let (_, v) = introspect(
        &h,
        Some((wide.service_id.as_str(), wide.client_secret.as_str())),
        &jwt,
    );
    assert_eq!(
        (v["active"].clone(), v["scope"].clone()),
        (json!(true), json!("trade:read")),
        "{v}"
    );
    let ops = h.create(json!({"service_name": "ops", "scopes": ["admin:system"], "is_trusted": true}));
    let me = Some((ops.service_id.as_str(), ops.client_secret.as_str()));
    let jwt = h.token(&ops, Some("admin:system"));
    let (_, v) = introspect(&h, me, &jwt);
    assert_eq!(
        (v["scope"].clone(), v["is_trusted"].clone()),
        (json!("admin:system"), json!(true)),
        "{v}"
    );
    let (s, v) = h.admin_req(
        reqwest::Method::PATCH,
        &format!("/auth/admin/services/{}", ops.service_id),
        Some(json!({ "is_trusted": false, "scopes": ["account:read"] })),
    );
    assert_eq!(s, 200, "{v}");
    let (_, v) = introspect(&h, me, &jwt);
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(
        (v["scope"].clone(), v["is_trusted"].clone()),
        (json!(""), json!(false)),
        "{v}"
    );
    // A key answers its service's trust as the sidecar applies it.
    let (_, v) = introspect(&h, me, &ops.api_key);
    assert_eq!(
        (v["scope"].clone(), v["is_trusted"].clone()),
        (json!("account:read"), json!(false)),
        "{v}"
    );
    let trusted = h.create(json!({"service_name": "ops2", "scopes": ["admin:system"], "is_trusted": true}));
    let (_, v) = introspect(
        &h,
        Some((trusted.service_id.as_str(), trusted.client_secret.as_str())),
        &trusted.api_key,
    );
    assert_eq!(v["is_trusted"], true, "{v}");
}
