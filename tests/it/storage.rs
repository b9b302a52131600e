//! One conformance suite for both storage backends (SQLite file, PostgreSQL database), run
//! through the storage traits the admin plane uses; then what only several writers on
//! PostgreSQL can show: versions that commit in order when a second writer commits late, and
//! one audit chain under concurrent writers.

use permiso::admin::storage::{
    self, Audit, AuditQuery, CredentialKind, NewService, ServicePatch, SharedStorage, SigningKeyRow,
    StoreError, StoredKey,
};
use permiso::core::key::{self, Environment};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn verify(entries: &[permiso::core::audit::AuditEntry]) {
    let mut v = permiso::core::audit::Verifier::default();
    for e in entries {
        v.push(e)
            .unwrap_or_else(|err| panic!("audit chain broken at {}: {err:?}", e.seq));
    }
    assert_eq!(v.finish().entries, entries.len() as u64);
}

fn who() -> Audit {
    Audit {
        actor: "admin-key".into(),
        source_ip: Some("127.0.0.1".into()),
    }
}

/// A service with its first key and secret; returns (id, key id, key secret).
async fn create(
    s: &SharedStorage,
    name: &str,
    identities: &[&str],
) -> Result<(String, String, String), StoreError> {
    let id = permiso::core::ids::new_service_id();
    let k = key::generate(Environment::Live);
    let c = key::generate_client_secret();
    let kid = permiso::core::ids::new_key_id();
    let mut svc = NewService::named(name, &["trade:read"]);
    svc.tls_identities = identities.iter().map(|s| s.to_string()).collect();
    s.create_service(
        &id,
        &svc,
        (&kid, &StoredKey::of(&k)),
        (&permiso::core::ids::new_secret_id(), &StoredKey::of(&c)),
        1_000,
        &who(),
    )
    .await?;
    Ok((id, kid, k.secret.expose().to_string()))
}

async fn open_sqlite(dir: &std::path::Path) -> SharedStorage {
    let db =
        permiso::config::database::parse(&dir.join("c.db").display().to_string(), None, 4, None).unwrap();
    storage::open(&db, None).await.unwrap()
}

async fn open_postgres(url: &str) -> SharedStorage {
    let db = permiso::config::database::parse(url, None, 4, None).unwrap();
    storage::open(&db, None).await.unwrap()
}

/// What every backend must do, walked in one sequence (each step depends on the last).
async fn conformance(s: SharedStorage) {
    let v0 = s.version().await.unwrap();
    let (a, a_kid, a_key) = create(&s, "alpha", &["spiffe://permiso/alpha"]).await.unwrap();
    assert_eq!(s.version().await.unwrap(), v0 + 1, "one change, one version");

    // Names are unique regardless of case; identities belong to one service.
    let dup = create(&s, "ALPHA", &[]).await.unwrap_err();
    assert!(
        matches!(dup, StoreError::Conflict(ref m) if m.contains("already exists")),
        "{dup}"
    );
    let taken = create(&s, "beta", &["spiffe://permiso/alpha"]).await.unwrap_err();
    assert!(
        matches!(taken, StoreError::Conflict(ref m) if m.contains("another service")),
        "{taken}"
    );
    assert_eq!(
        s.version().await.unwrap(),
        v0 + 1,
        "refused writes change nothing"
    );
    let (b, _, _) = create(&s, "beta", &[]).await.unwrap();

    let rec = s.get_service(&a).await.unwrap();
    assert_eq!(
        (rec.name.as_str(), rec.keys.len(), rec.secrets.len()),
        ("alpha", 1, 1)
    );
    assert_eq!(rec.tls_identities, vec!["spiffe://permiso/alpha".to_string()]);
    assert!(matches!(
        s.get_service("svc_nope").await,
        Err(StoreError::NotFound)
    ));

    // Pages in creation order, with a cursor.
    let (page, more) = s.list_services(1, None, None).await.unwrap();
    assert_eq!((page[0].id.as_str(), more), (a.as_str(), true));
    let (page, more) = s.list_services(5, Some(&a), None).await.unwrap();
    assert_eq!((page.len(), page[0].id.as_str(), more), (1, b.as_str(), false));
    assert!(matches!(
        s.list_services(5, Some("svc_nope"), None).await,
        Err(StoreError::NotFound)
    ));
    // Search: a part of the name without regard to ASCII case, or the exact id; paged alike.
    let names =
        |r: permiso::admin::storage::StoreResult<(Vec<permiso::admin::storage::ServiceRecord>, bool)>| {
            let (page, more) = r.unwrap();
            (page.into_iter().map(|s| s.name).collect::<Vec<_>>(), more)
        };
    assert_eq!(
        names(s.list_services(5, None, Some("LPH")).await),
        (vec!["alpha".to_string()], false)
    );
    assert_eq!(
        names(s.list_services(5, None, Some(&b)).await),
        (vec!["beta".to_string()], false)
    );
    assert_eq!(
        names(s.list_services(5, None, Some("a")).await),
        (vec!["alpha".to_string(), "beta".to_string()], false)
    );
    assert_eq!(
        names(s.list_services(1, None, Some("a")).await),
        (vec!["alpha".to_string()], true)
    );
    assert_eq!(
        names(s.list_services(5, Some(&a), Some("a")).await),
        (vec!["beta".to_string()], false)
    );
    assert_eq!(
        names(s.list_services(5, None, Some("%")).await),
        (vec![], false),
        "no pattern characters"
    );
    assert_eq!(
        names(s.list_services(5, None, Some(&b[..b.len() - 1])).await),
        (vec![], false),
        "ids match whole"
    );

    // Key lookups, usage marks only forward.
    let hash = key::parse(&a_key).unwrap().hash();
    let owner = s.key_owner(&hash, 2_000).await.unwrap().unwrap();
    assert_eq!(
        (owner.service_id.as_str(), owner.key_id.as_str()),
        (a.as_str(), a_kid.as_str())
    );
    assert_eq!(s.key_info(&hash, 2_000).await.unwrap().unwrap().service_id, a);
    assert_eq!(s.record_usage(&[(a_kid.clone(), 5_000)]).await.unwrap(), 1);
    assert_eq!(
        s.record_usage(&[(a_kid.clone(), 4_000), ("k_nope".into(), 9)])
            .await
            .unwrap(),
        0
    );
    let rec = s.get_service(&a).await.unwrap();
    assert_eq!(rec.keys[0].last_used_at, Some(5_000));

    // Patch: fields change, the version moves, disabling sets the token floor.
    let before = s.version().await.unwrap();
    let patch = ServicePatch {
        scopes: Some(vec!["trade:read".into(), "trade:open".into()]),
        rate_limit_per_minute: Some(Some(600)),
        rate_limit_scope: Some(permiso::core::ratelimit::LimitScope::Cluster),
        ..Default::default()
    };
    assert_eq!(
        s.get_service(&a).await.unwrap().rate_limit_scope,
        permiso::core::ratelimit::LimitScope::Sidecar,
        "a new service is counted by each sidecar"
    );
    let (rec, v) = s
        .patch_service(&a, &patch, 3_000, &who(), "service.patch")
        .await
        .unwrap();
    assert_eq!(v, before + 1);
    assert_eq!(rec.scopes, vec!["trade:read", "trade:open"]);
    assert_eq!(rec.rate_limit_per_minute, Some(600));
    assert_eq!(
        rec.rate_limit_scope,
        permiso::core::ratelimit::LimitScope::Cluster
    );
    let (synced, _) = s.sync_payload(None, None, 3_000).await.unwrap();
    let mine = synced.services.iter().find(|x| x.service_id == a).unwrap();
    assert_eq!(
        mine.rate_limit_scope,
        permiso::core::ratelimit::LimitScope::Cluster,
        "sidecars get the scope"
    );
    // A token's client as it is now: its scopes and trust in the same read.
    let now = s.token_client(&a, 2_999).await.unwrap().expect("enabled client");
    assert_eq!((now.scopes, now.is_trusted), (rec.scopes.clone(), rec.is_trusted));
    assert!(s.token_client("srv_unknown", 2_999).await.unwrap().is_none());

    // Rotation ends the old key after the grace; the limit is enforced unless grace is 0.
    let k2 = key::generate(Environment::Live);
    let (rot, _) = s
        .rotate(
            &a,
            CredentialKind::ApiKey,
            "k_second",
            &StoredKey::of(&k2),
            100,
            2,
            4_000,
            &who(),
        )
        .await
        .unwrap();
    assert_eq!(rot.ended, vec![(a_kid.clone(), 4_100)]);
    assert_eq!(rot.service.keys.len(), 2);
    let k3 = key::generate(Environment::Live);
    let over = s
        .rotate(
            &a,
            CredentialKind::ApiKey,
            "k_third",
            &StoredKey::of(&k3),
            100,
            2,
            4_000,
            &who(),
        )
        .await
        .unwrap_err();
    assert!(matches!(over, StoreError::Conflict(_)), "{over}");
    assert!(s.key_owner(&hash, 4_099).await.unwrap().is_some());
    assert!(s.key_owner(&hash, 4_100).await.unwrap().is_none(), "grace over");

    // Revocation by id, and by hash only for its owner.
    let (k, _) = s.revoke_key(&a, "k_second", 4_200, &who()).await.unwrap();
    assert_eq!(k.revoked_at, Some(4_200));
    assert!(matches!(
        s.revoke_key(&a, "k_nope", 4_200, &who()).await,
        Err(StoreError::NotFound)
    ));
    let (_, _, b_key) = create(&s, "gamma", &[]).await.unwrap();
    let b_hash = key::parse(&b_key).unwrap().hash();
    assert_eq!(
        s.revoke_key_by_hash(&b_hash, Some(&a), 4_300, &who())
            .await
            .unwrap(),
        None
    );
    assert!(s
        .revoke_key_by_hash(&b_hash, None, 4_300, &who())
        .await
        .unwrap()
        .is_some());
    assert!(s.key_owner(&b_hash, 4_301).await.unwrap().is_none());

    // Client secrets.
    let c = key::generate_client_secret();
    s.rotate(
        &b,
        CredentialKind::ClientSecret,
        "cs_two",
        &StoredKey::of(&c),
        0,
        2,
        5_000,
        &who(),
    )
    .await
    .unwrap();
    let cli = s.authenticate_client(&b, &c.hash, 5_001).await.unwrap().unwrap();
    assert_eq!(cli.service_id, b);
    assert!(s.authenticate_client(&a, &c.hash, 5_001).await.unwrap().is_none());

    // The deny list: once, then already there.
    assert!(s
        .revoke_token("jti-1", &a, 9_000, 5_000, &who())
        .await
        .unwrap()
        .is_some());
    assert!(s
        .revoke_token("jti-1", &a, 9_000, 5_000, &who())
        .await
        .unwrap()
        .is_none());
    assert!(s.token_revoked("jti-1").await.unwrap());
    assert!(!s.token_revoked("jti-2").await.unwrap());

    // Signing keys, sealed part kept.
    let row = SigningKeyRow {
        kid: "k-conf".into(),
        public_x: "x".into(),
        private_sealed: vec![1, 2, 3],
        created_at: 5_000,
        activates_at: 5_100,
    };
    s.add_signing_key(&row, &who()).await.unwrap();
    let keys = s.signing_keys().await.unwrap();
    assert_eq!(keys.last().unwrap().private_sealed, vec![1, 2, 3]);

    // Disabling: the token floor moves past now.
    let off = ServicePatch {
        disabled: Some(true),
        ..Default::default()
    };
    let (rec, _) = s
        .patch_service(&a, &off, 6_000, &who(), "service.disable")
        .await
        .unwrap();
    assert_eq!(rec.tokens_not_before, 6_001);
    assert!(s.token_client(&a, 6_000).await.unwrap().is_none());

    // Sync: everything, then only what changed since, and a full one for another epoch.
    let (full, signing) = s.sync_payload(None, None, 6_000).await.unwrap();
    assert!(full.full);
    assert_eq!(full.services.len(), 3);
    assert!(
        signing.iter().all(|r| r.private_sealed.is_empty()),
        "no private part leaves"
    );
    assert_eq!(full.revoked_tokens.len(), 1);
    let seen = full.version;
    s.patch_service(&b, &patch, 6_100, &who(), "service.patch")
        .await
        .unwrap();
    let (delta, _) = s.sync_payload(Some(s.epoch()), Some(seen), 6_100).await.unwrap();
    assert!(!delta.full);
    assert_eq!(
        delta
            .services
            .iter()
            .map(|x| x.service_id.as_str())
            .collect::<Vec<_>>(),
        vec![b.as_str()]
    );
    let (other, _) = s
        .sync_payload(Some("another-epoch"), Some(seen), 6_100)
        .await
        .unwrap();
    assert!(other.full);

    // The audit log: every change above and the failed login, one verified chain.
    s.audit_failed_auth(7_000, &who(), "unknown admin key", None, 3)
        .await
        .unwrap();
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let (page, more) = s
            .audit_page(&AuditQuery {
                after,
                limit: 4,
                ..Default::default()
            })
            .await
            .unwrap();
        after = page.last().map_or(after, |e| e.seq);
        entries.extend(page);
        if !more {
            break;
        }
    }
    assert_eq!(entries.first().unwrap().seq, 1);
    assert_eq!(entries.last().unwrap().action, "auth.failed");
    assert_eq!(entries.last().unwrap().change["not_audited_before_this"], 3);
    verify(&entries);
    let only = s
        .audit_page(&AuditQuery {
            action: Some("key.revoke".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .0;
    assert_eq!(only.len(), 2);
    lifecycle(&s).await;
    s.check_writable().await.unwrap();
}

/// Issue 16: a credential's own expiry beside its grace end, keys in grace across services,
/// and sidecar reports that never go back in time.
async fn lifecycle(s: &SharedStorage) {
    let (id, kid, _) = create(s, "lifecycle", &[]).await.unwrap();
    // Its own expiry: the end, and what sidecars get; status stays active (not grace).
    let (k, v1) = s
        .set_expiry(&id, CredentialKind::ApiKey, &kid, Some(20_000), 10_000, &who())
        .await
        .unwrap();
    assert_eq!(
        (k.expires_at, k.grace_ends_at, k.own_expires_at),
        (Some(20_000), None, Some(20_000))
    );
    let (p, _) = s.sync_payload(None, None, 10_000).await.unwrap();
    let sk = p.services.iter().find(|x| x.service_id == id).unwrap().keys[0].clone();
    assert_eq!((sk.expires_at, sk.grace_ends_at), (Some(20_000), None));
    // Rotated with a grace end before it: the grace end applies and is named.
    let nk = key::generate(Environment::Live);
    let new_id = permiso::core::ids::new_key_id();
    let (rot, v2) = s
        .rotate(
            &id,
            CredentialKind::ApiKey,
            &new_id,
            &StoredKey::of(&nk).expiring(Some(90_000)),
            500,
            10,
            10_000,
            &who(),
        )
        .await
        .unwrap();
    assert!(v2 > v1);
    let old = rot.service.keys.iter().find(|k| k.id == kid).unwrap();
    assert_eq!((old.expires_at, old.grace_ends_at), (Some(10_500), Some(10_500)));
    let new = rot.service.keys.iter().find(|k| k.id == new_id).unwrap();
    assert_eq!((new.expires_at, new.own_expires_at), (Some(90_000), Some(90_000)));
    // Its own expiry removed: the grace end still holds.
    let (k, _) = s
        .set_expiry(&id, CredentialKind::ApiKey, &kid, None, 10_001, &who())
        .await
        .unwrap();
    assert_eq!((k.expires_at, k.own_expires_at), (Some(10_500), None));
    // Keys in grace across services, filtered by use.
    let grace = s.grace_keys(10_100, None).await.unwrap();
    assert!(
        grace.iter().any(|g| g.key_id == kid && g.grace_ends_at == 10_500),
        "{grace:?}"
    );
    assert!(
        s.grace_keys(10_600, None)
            .await
            .unwrap()
            .iter()
            .all(|g| g.key_id != kid),
        "ended"
    );
    s.record_usage(&[(kid.clone(), 10_200)]).await.unwrap();
    let used = s.grace_keys(10_300, Some(10_200)).await.unwrap();
    assert!(used
        .iter()
        .any(|g| g.key_id == kid && g.last_used_at == Some(10_200)));
    assert!(s
        .grace_keys(10_300, Some(10_201))
        .await
        .unwrap()
        .iter()
        .all(|g| g.key_id != kid));
    // An ended or unknown credential cannot be changed.
    assert!(matches!(
        s.set_expiry(&id, CredentialKind::ApiKey, &kid, Some(99_999), 10_600, &who())
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.set_expiry(&id, CredentialKind::ClientSecret, &kid, None, 10_000, &who())
            .await,
        Err(StoreError::NotFound)
    ));
    // Revoking a revoked key writes nothing: same version, one audit entry (issue 17).
    let (rid, rkid, _) = create(s, "revoke-twice", &[]).await.unwrap();
    let (k1, v1) = s.revoke_key(&rid, &rkid, 11_000, &who()).await.unwrap();
    let (k2, v2) = s.revoke_key(&rid, &rkid, 11_500, &who()).await.unwrap();
    assert_eq!((k1.revoked_at, v1), (k2.revoked_at, v2));
    assert_eq!(s.version().await.unwrap(), v1);
    let revokes = s
        .audit_page(&AuditQuery {
            action: Some("key.revoke".into()),
            target: Some(rid.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .0;
    assert_eq!(revokes.len(), 1);
    // Sidecar reports: upserted, never overwritten by an older one, forgotten when old.
    let rec = |seen: i64, applied: u64| storage::SidecarRecord {
        instance_id: "sc_conformance".into(),
        credential: "key_x".into(),
        service_id: Some(id.clone()),
        epoch: s.epoch().to_string(),
        applied_version: Some(applied),
        first_seen: seen,
        last_seen: seen,
        report: "{}".into(),
    };
    s.record_sidecars(&[rec(100, 3)]).await.unwrap();
    // In one batch, in order: the older one after the newer one changes nothing.
    s.record_sidecars(&[rec(200, 5), rec(150, 4)]).await.unwrap();
    // Another service's sync key cannot speak for this sidecar.
    let mut spoof = rec(300, 99);
    spoof.service_id = Some("srv_someone_else".into());
    s.record_sidecars(&[spoof]).await.unwrap();
    let all = s.sidecars(0).await.unwrap();
    let got = all.iter().find(|r| r.instance_id == "sc_conformance").unwrap();
    assert_eq!(
        (got.first_seen, got.last_seen, got.applied_version),
        (100, 200, Some(5))
    );
    assert!(s
        .sidecars(201)
        .await
        .unwrap()
        .iter()
        .all(|r| r.instance_id != "sc_conformance"));
    assert!(
        s.sidecars(0)
            .await
            .unwrap()
            .iter()
            .all(|r| r.instance_id != "sc_conformance"),
        "deleted"
    );
}

#[test]
fn conformance_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async { conformance(open_sqlite(dir.path()).await).await });
}

#[test]
fn conformance_on_postgres() {
    let url = crate::common::pg_database(&format!("permiso_conf_{}", std::process::id()));
    rt().block_on(async { conformance(open_postgres(&url).await).await });
}

/// A second writer that took the next version but commits late: nobody may commit a later
/// version meanwhile (else a sidecar that read past it would miss its change forever). Replica
/// B's write waits for the lock (seen in pg_stat_activity, no sleeping), a reader meanwhile
/// still sees the old version, and after the late commit B's version follows it and a delta
/// from what the reader saw holds both changes.
#[test]
fn a_late_commit_cannot_be_overtaken() {
    let name = format!("permiso_late_{}", std::process::id());
    let url = crate::common::pg_database(&name);
    rt().block_on(async {
        let b = open_postgres(&url).await;
        let (first, _, _) = create(&b, "first", &[]).await.unwrap();
        let seen = b.version().await.unwrap();

        // Writer A, by hand: takes the next version for a change and holds its commit.
        let (mut a, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let tx = a.transaction().await.unwrap();
        let late: i64 = tx
            .query_one(
                "UPDATE meta SET value = (value::bigint + 1)::text WHERE name = 'version' RETURNING value::bigint",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        tx.execute(
            "UPDATE services SET version = $1, description = 'late' WHERE id = $2",
            &[&late, &first],
        )
        .await
        .unwrap();

        // Replica B writes meanwhile: it must wait for A.
        let b2 = b.clone();
        let write = tokio::spawn(async move { create(&b2, "second", &[]).await.unwrap() });
        let (probe, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let started = std::time::Instant::now();
        loop {
            let waiting: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            if waiting == 1 {
                break;
            }
            assert!(!write.is_finished(), "replica B committed while A held the next version");
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "B never waited");
            tokio::task::yield_now().await;
        }
        assert_eq!(b.version().await.unwrap(), seen, "nothing committed yet");
        let (during, _) = b.sync_payload(Some(b.epoch()), Some(seen), 2_000).await.unwrap();
        assert!(during.services.is_empty());

        tx.commit().await.unwrap();
        let (second, _, _) = write.await.unwrap();
        let now = b.version().await.unwrap();
        assert_eq!(now, late as u64 + 1, "B's version follows the late commit");
        let (delta, _) = b.sync_payload(Some(b.epoch()), Some(seen), 2_000).await.unwrap();
        let ids: Vec<&str> = delta.services.iter().map(|s| s.service_id.as_str()).collect();
        assert_eq!(ids, vec![first.as_str(), second.as_str()], "the late change is not lost");
    });
}

/// Two replicas writing at once keep one audit chain and distinct, gap-free versions.
#[test]
fn concurrent_writers_on_two_replicas_keep_one_chain() {
    let url = crate::common::pg_database(&format!("permiso_chain_{}", std::process::id()));
    rt().block_on(async {
        let (r1, r2) = (open_postgres(&url).await, open_postgres(&url).await);
        let v0 = r1.version().await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let r = if i % 2 == 0 { r1.clone() } else { r2.clone() };
            tasks.push(tokio::spawn(async move {
                let (id, _, _) = create(&r, &format!("svc-{i}"), &[]).await.unwrap();
                let p = ServicePatch {
                    description: Some(Some(format!("n{i}"))),
                    ..Default::default()
                };
                let (_, v) = r
                    .patch_service(&id, &p, 1_001, &who(), "service.patch")
                    .await
                    .unwrap();
                r.audit_failed_auth(1_002, &who(), "bad key", None, 0)
                    .await
                    .unwrap();
                v
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap());
        }
        assert_eq!(r2.version().await.unwrap(), v0 + 80, "40 creates + 40 patches");
        versions.sort();
        versions.dedup();
        assert_eq!(versions.len(), 40, "every patch its own version");
        let (entries, more) = r2
            .audit_page(&AuditQuery {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!more);
        assert_eq!(entries.len(), 120);
        verify(&entries);
    });
}

/// A commit through one replica wakes the other through NOTIFY, not only through the 1 s
/// poll: `changed_elsewhere` resolves on a notification alone. (The listener also wakes once
/// when it connects; the first phase waits that out.)
#[test]
fn a_commit_on_one_replica_notifies_the_other() {
    let url = crate::common::pg_database(&format!("permiso_notify_{}", std::process::id()));
    rt().block_on(async {
        let (r1, r2) = (open_postgres(&url).await, open_postgres(&url).await);
        let mut n = 0;
        for phase in ["listener up", "a commit notified"] {
            let listener = r2.clone();
            let mut woken = tokio::spawn(async move { listener.changed_elsewhere().await });
            // Each write notifies; the waiter registers when its task first runs, so write
            // until it is woken (a deadline per write, no sleeping).
            let mut done = false;
            for _ in 0..25 {
                create(&r1, &format!("notify-{n}"), &[]).await.unwrap();
                n += 1;
                if tokio::time::timeout(std::time::Duration::from_millis(200), &mut woken)
                    .await
                    .is_ok()
                {
                    done = true;
                    break;
                }
            }
            assert!(done, "{phase}: 25 commits on replica 1, replica 2 never woke");
        }
    });
}
