//! The sidecar's immutable view of every key and service policy. A new snapshot is built off
//! the request path from a sync payload and swapped in whole; requests only ever read one.

use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderValue;
use ipnet::IpNet;

use crate::jwt::KeySet;
use crate::key::{Environment, KeyHash};
use crate::key_id::KeyId;
use crate::ratelimit::{LimitScope, LimiterState, Limits, RefusedUntil};
use crate::scope::{ScopeError, ScopeSet};
use crate::sharded::{Shard, ShardedMap};
use crate::sync::{SyncKey, SyncPayload, SyncRevokedToken, SyncService, SyncSigningKey};
use crate::usage::ServiceUsage;

/// Why a payload was refused; the previous snapshot stays in force.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("service {service}: {source}")]
    Scope {
        service: String,
        #[source]
        source: ScopeError,
    },
    #[error("service {service}: invalid CIDR {cidr:?}")]
    Cidr { service: String, cidr: String },
    #[error("service {service}: key {key_id} has an invalid hash")]
    Hash { service: String, key_id: String },
    #[error("key hash appears twice (key {key_id})")]
    DuplicateKey { key_id: String },
    #[error("service id {0} appears twice")]
    DuplicateService(String),
    #[error("service {service}: {identity:?} is not a canonical client-certificate identity")]
    Identity { service: String, identity: String },
    #[error("client-certificate identity {0} belongs to two services")]
    DuplicateIdentity(String),
    #[error("delta for epoch {got} cannot apply to a snapshot of epoch {have}")]
    EpochMismatch { have: String, got: String },
    #[error("delta to version {got} does not advance version {have}")]
    Stale { have: u64, got: u64 },
    #[error("a delta needs a snapshot to apply to")]
    DeltaWithoutBase,
    #[error("service {service}: a header value must be visible ASCII")]
    HeaderUnsafe { service: String },
    #[error("signing key {0} is not a valid Ed25519 public key")]
    SigningKey(String),
}

/// What the snapshot knows about access tokens: who issues them, with which keys, and which
/// were revoked.
#[derive(Debug, Clone, Default)]
pub struct TokenState {
    pub issuer: String,
    pub keys: KeySet,
    pub revoked: std::collections::HashSet<String>,
    /// Kept for writing the snapshot back out.
    signing_keys: Vec<SyncSigningKey>,
    revoked_list: Vec<SyncRevokedToken>,
}

impl TokenState {
    fn from_payload(p: &SyncPayload) -> Result<TokenState, SnapshotError> {
        let mut keys = KeySet::default();
        for k in &p.signing_keys {
            if !keys.insert(&k.kid, &k.x) {
                return Err(SnapshotError::SigningKey(k.kid.clone()));
            }
        }
        Ok(TokenState {
            issuer: p.issuer.clone(),
            keys,
            revoked: p.revoked_tokens.iter().map(|r| r.jti.clone()).collect(),
            signing_keys: p.signing_keys.clone(),
            revoked_list: p.revoked_tokens.clone(),
        })
    }
}

/// A service's policy, shared by all its keys.
#[derive(Debug)]
pub struct ServiceEntry {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub environment: Environment,
    pub scopes: ScopeSet,
    /// Identity header values, validated and built once per snapshot so forwarding a request
    /// clones them (a reference count) instead of copying and re-validating strings.
    pub id_header: HeaderValue,
    pub name_header: HeaderValue,
    /// `X-Permiso-Scopes` value.
    pub scopes_header: HeaderValue,
    /// `RateLimit-Policy` value, built once (empty when unlimited).
    pub policy_header: HeaderValue,
    pub disabled: bool,
    /// Access tokens issued (`iat`) before this are refused.
    pub tokens_not_before: i64,
    pub allowed_ips: Vec<IpNet>,
    pub limits: Limits,
    /// Where the limits are counted: by each sidecar, or across the cluster.
    pub rate_limit_scope: LimitScope,
    /// This sidecar's count at the full limits (`scope = sidecar`).
    pub limiter: Arc<LimiterState>,
    /// This sidecar's count of its share of a cluster limit, used while the shared limiter is
    /// out of reach (`limiter::local_share`).
    pub share_limiter: Arc<LimiterState>,
    /// The shared limiter's last refusal of this service, repeated locally until it ends.
    pub shared_refusal: Arc<RefusedUntil>,
    /// The hashes of this service's keys (details in the key map), so a delta can drop them
    /// and the snapshot can be written back out.
    pub keys: Vec<KeyHash>,
    /// Request count and key last-used marks, carried across rebuilds.
    pub usage: ServiceUsage,
    /// Client-certificate identities of this service (canonical), so a delta can drop them.
    pub tls_identities: Vec<Arc<str>>,
    /// `X-Permiso-Client-Cert-Identity` values, one per identity, built once.
    pub identity_headers: Vec<HeaderValue>,
    /// Admitted by routes that require a trusted caller.
    pub trusted: bool,
    /// This sidecar's count of shadow-mode requests at the full limits: a would-be limit
    /// denial in shadow mode is counted here, never in `limiter` (enforced quota).
    pub shadow_limiter: Arc<LimiterState>,
}

impl ServiceEntry {
    pub fn ip_allowed(&self, ip: Option<IpAddr>) -> bool {
        ip_allowed(&self.allowed_ips, ip)
    }
}

#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub key_id: KeyId,
    pub service: Arc<ServiceEntry>,
    /// End of a rotated key's grace (Unix seconds), `NEVER` for a key without one: a plain
    /// integer rather than an `Option`, which would take 16 bytes a key.
    expires: i64,
    /// This key's slot in `service.usage`.
    pub slot: u32,
    /// Rotated out and in its grace window (fits the padding after `slot`).
    pub grace: bool,
    /// `expires` is the grace end (reason `grace_ended`), not the key's own expiry (`expired`).
    ends_by_grace: bool,
}

/// `KeyEntry::expires` of a key that does not expire.
const NEVER: i64 = i64::MAX;

impl KeyEntry {
    pub fn new(key_id: KeyId, service: Arc<ServiceEntry>, expires_at: Option<i64>, slot: u32) -> KeyEntry {
        KeyEntry {
            key_id,
            service,
            expires: expires_at.unwrap_or(NEVER),
            slot,
            grace: false,
            ends_by_grace: false,
        }
    }

    /// A key rotated out whose grace window ends at `grace_ends_at`.
    pub fn in_grace(mut self, grace_ends_at: i64) -> KeyEntry {
        self.grace = true;
        self.ends_by_grace = self.expires >= grace_ends_at;
        self.expires = self.expires.min(grace_ends_at);
        self
    }

    /// When the key stops working (Unix seconds): its grace end or its own expiry, whichever
    /// comes first; `None` for a key without an end.
    pub fn expires_at(&self) -> Option<i64> {
        (self.expires != NEVER).then_some(self.expires)
    }

    /// Whether what ends the key is its grace window (else its own expiry).
    pub fn ends_by_grace(&self) -> bool {
        self.ends_by_grace
    }

    /// The grace end, for writing the snapshot back out.
    fn grace_ends_at(&self) -> Option<i64> {
        // Only the end that applies is kept: a grace end later than the key's own expiry
        // never matters here, so it is written as "never" (the key still reads as in grace).
        match (self.grace, self.ends_by_grace) {
            (false, _) => None,
            (true, true) => Some(self.expires),
            (true, false) => Some(NEVER),
        }
    }
}

/// blake3 output is already uniformly random, so its first eight bytes are a perfect hash;
/// SipHash over it again would only cost time. Lookups use attacker-chosen keys but their
/// hashes are unpredictable, and only admins insert.
#[derive(Default)]
pub struct KeyHashHasher(u64);

impl Hasher for KeyHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A KeyHash arrives as a length prefix and then its 32 bytes; every byte is folded in,
        // so the result stays a good hash whatever the std Hash impl writes.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
}

impl Shard for KeyHash {
    fn shard(&self) -> usize {
        // The hasher folds in every byte; the last two alone pick the shard.
        u16::from_le_bytes([self.0[30], self.0[31]]) as usize % crate::sharded::SHARDS
    }
}

/// Sharded copy-on-write maps: a delta copies only the shards it touches.
type KeyMap = ShardedMap<KeyHash, KeyEntry, BuildHasherDefault<KeyHashHasher>>;
type ServiceMap = ShardedMap<Arc<str>, Arc<ServiceEntry>, std::collections::hash_map::RandomState>;
/// Client-certificate identity → the service it authenticates as.
type IdentityMap = ShardedMap<Arc<str>, Arc<ServiceEntry>, std::collections::hash_map::RandomState>;

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub epoch: String,
    pub version: u64,
    pub environment: Environment,
    services: ServiceMap,
    keys: KeyMap,
    identities: IdentityMap,
    pub tokens: TokenState,
}

fn header_safe(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn build_service(
    s: &SyncService,
    previous: Option<&Arc<ServiceEntry>>,
) -> Result<Arc<ServiceEntry>, SnapshotError> {
    let scopes = ScopeSet::parse(&s.scopes).map_err(|source| SnapshotError::Scope {
        service: s.service_id.clone(),
        source,
    })?;
    let mut allowed_ips = Vec::with_capacity(s.allowed_ips.len());
    for c in &s.allowed_ips {
        let net = parse_cidr(c).ok_or_else(|| SnapshotError::Cidr {
            service: s.service_id.clone(),
            cidr: c.clone(),
        })?;
        allowed_ips.push(net);
    }
    if !header_safe(&s.service_id) || !header_safe(&s.service_name) {
        return Err(SnapshotError::HeaderUnsafe {
            service: s.service_id.clone(),
        });
    }
    let mut keys = Vec::with_capacity(s.keys.len());
    for k in &s.keys {
        match KeyHash::from_hex(&k.hash) {
            Some(h) if header_safe(&k.key_id) => keys.push(h),
            _ => {
                return Err(SnapshotError::Hash {
                    service: s.service_id.clone(),
                    key_id: k.key_id.clone(),
                })
            }
        }
    }
    let limits = Limits {
        per_minute: s.rate_limit_per_minute,
        per_hour: s.rate_limit_per_hour,
    };
    // Rate-limit state survives syncs while the limits stay the same; new limits start fresh.
    let (limiter, share_limiter, shared_refusal) = match previous {
        Some(p) if p.limits == limits => (
            p.limiter.clone(),
            p.share_limiter.clone(),
            p.shared_refusal.clone(),
        ),
        _ => Default::default(),
    };
    let header = |v: &str| {
        HeaderValue::from_str(v).map_err(|_| SnapshotError::HeaderUnsafe {
            service: s.service_id.clone(),
        })
    };
    let mut tls_identities = Vec::with_capacity(s.tls_identities.len());
    let mut identity_headers = Vec::with_capacity(s.tls_identities.len());
    for i in &s.tls_identities {
        // Only canonical spellings: the sidecar compares certificates' identities verbatim.
        if crate::peer::canonical_identity(i).ok().as_deref() != Some(i.as_str()) {
            return Err(SnapshotError::Identity {
                service: s.service_id.clone(),
                identity: i.clone(),
            });
        }
        identity_headers.push(header(i)?);
        tls_identities.push(Arc::from(i.as_str()));
    }
    Ok(Arc::new(ServiceEntry {
        tls_identities,
        identity_headers,
        trusted: s.is_trusted,
        shadow_limiter: match previous {
            Some(p) if p.limits == limits => p.shadow_limiter.clone(),
            _ => Default::default(),
        },
        id: Arc::from(s.service_id.as_str()),
        name: Arc::from(s.service_name.as_str()),
        environment: s.environment,
        id_header: header(&s.service_id)?,
        name_header: header(&s.service_name)?,
        scopes_header: header(&scopes.joined())?,
        policy_header: header(&limits.policy_header())?,
        scopes,
        disabled: s.disabled,
        tokens_not_before: s.tokens_not_before,
        allowed_ips,
        limits,
        rate_limit_scope: s.rate_limit_scope,
        limiter,
        share_limiter,
        shared_refusal,
        usage: ServiceUsage::new(&keys, previous.map(|p| (&p.keys[..], &p.usage))),
        keys,
    }))
}

/// Accepts `10.0.0.0/8` and a bare address (`10.1.2.3`, meaning /32 or /128).
/// Whether a caller at `ip` may use a service restricted to `allowed` (empty: anywhere). The
/// one check for the sidecar, the token endpoint and the admin plane's own service-key
/// authentication. Fails closed: a restricted service with no known peer address is refused.
pub fn ip_allowed(allowed: &[IpNet], ip: Option<IpAddr>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(ip) = ip else { return false };
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    allowed.iter().any(|net| net.contains(&ip))
}

/// CIDRs as stored; entries that do not parse are skipped (the admin API validates them on the
/// way in, so none should exist).
pub fn parse_cidrs(list: &[String]) -> Vec<IpNet> {
    list.iter().filter_map(|c| parse_cidr(c)).collect()
}

pub fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

impl Snapshot {
    pub fn empty(environment: Environment, epoch: String, version: u64) -> Snapshot {
        Snapshot {
            epoch,
            version,
            environment,
            services: ServiceMap::default(),
            keys: KeyMap::default(),
            identities: IdentityMap::default(),
            tokens: TokenState::default(),
        }
    }

    /// Builds the whole snapshot from a full payload, keeping only this sidecar's environment.
    /// `previous` only lends rate-limit state.
    pub fn from_full(
        payload: &SyncPayload,
        environment: Environment,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, SnapshotError> {
        let mut snap = Snapshot::empty(environment, payload.epoch.clone(), payload.version);
        snap.tokens = TokenState::from_payload(payload)?;
        snap.upsert_all(&payload.services, previous)?;
        Ok(snap)
    }

    /// A new snapshot with the delta's services replaced. `self` is untouched.
    pub fn apply_delta(&self, payload: &SyncPayload) -> Result<Snapshot, SnapshotError> {
        if payload.epoch != self.epoch {
            return Err(SnapshotError::EpochMismatch {
                have: self.epoch.clone(),
                got: payload.epoch.clone(),
            });
        }
        if payload.version < self.version {
            return Err(SnapshotError::Stale {
                have: self.version,
                got: payload.version,
            });
        }
        let mut next = Snapshot {
            epoch: self.epoch.clone(),
            version: payload.version,
            environment: self.environment,
            services: self.services.clone(),
            keys: self.keys.clone(),
            identities: self.identities.clone(),
            tokens: TokenState::from_payload(payload)?,
        };
        next.upsert_all(&payload.services, Some(self))?;
        Ok(next)
    }

    fn upsert_all(
        &mut self,
        services: &[SyncService],
        previous: Option<&Snapshot>,
    ) -> Result<(), SnapshotError> {
        let mut seen = std::collections::HashSet::new();
        for s in services {
            if !seen.insert(s.service_id.as_str()) {
                return Err(SnapshotError::DuplicateService(s.service_id.clone()));
            }
            // Drop whatever this service had before; its new key list is complete.
            if let Some(old) = self.services.remove(s.service_id.as_str()) {
                for h in &old.keys {
                    self.keys.remove(h);
                }
                for i in &old.tls_identities {
                    self.identities.remove(i);
                }
            }
            if s.environment != self.environment {
                continue;
            }
            let prev = previous.and_then(|p| p.services.get(s.service_id.as_str()));
            let entry = build_service(s, prev)?;
            for (slot, (k, hash)) in s.keys.iter().zip(entry.keys.iter().copied()).enumerate() {
                let mut ke = KeyEntry::new(KeyId::new(&k.key_id), entry.clone(), k.expires_at, slot as u32);
                if let Some(end) = k.grace_ends_at {
                    ke = ke.in_grace(end);
                }
                if self.keys.insert(hash, ke).is_some() {
                    return Err(SnapshotError::DuplicateKey {
                        key_id: k.key_id.clone(),
                    });
                }
            }
            for i in &entry.tls_identities {
                if self.identities.insert(i.clone(), entry.clone()).is_some() {
                    return Err(SnapshotError::DuplicateIdentity(i.to_string()));
                }
            }
            self.services.insert(entry.id.clone(), entry);
        }
        Ok(())
    }

    /// Unreported use marks of keys this snapshot has and `next` does not (revoked, grace
    /// ended, expired, rotated away), as `(key id, last used)`: their last uses are the ones
    /// an admin most needs to see, and `next` has no slot to carry them. Only `services`
    /// (the ones a delta replaced) are looked at; `None` looks at every service.
    pub fn departed_marks(&self, next: &Snapshot, services: Option<&[&str]>) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        let mut visit = |s: &ServiceEntry| {
            for (slot, h) in s.keys.iter().enumerate() {
                // A hash names one key: present in `next` means still there.
                if next.lookup(h).is_some() {
                    continue;
                }
                if let (Some(at), Some(k)) = (s.usage.take_unreported_slot(slot), self.keys.get(h)) {
                    out.push((k.key_id.to_string(), at));
                }
            }
        };
        match services {
            Some(ids) => ids
                .iter()
                .filter_map(|id| self.services.get(*id))
                .for_each(|s| visit(s)),
            None => self.services.values().for_each(|s| visit(s)),
        }
        out
    }

    pub fn lookup(&self, hash: &KeyHash) -> Option<&KeyEntry> {
        self.keys.get(hash)
    }

    pub fn service(&self, id: &str) -> Option<&Arc<ServiceEntry>> {
        self.services.get(id)
    }

    /// The service a client-certificate identity (canonical) authenticates as.
    pub fn service_by_identity(&self, identity: &str) -> Option<&Arc<ServiceEntry>> {
        self.identities.get(identity)
    }

    pub fn services_iter(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The full payload this snapshot was built from (this environment's part), for the
    /// snapshot file.
    pub fn to_payload(&self) -> SyncPayload {
        let mut services: Vec<SyncService> = self
            .services
            .values()
            .map(|s| SyncService {
                service_id: s.id.to_string(),
                service_name: s.name.to_string(),
                environment: s.environment,
                scopes: s.scopes.to_strings(),
                disabled: s.disabled,
                tokens_not_before: s.tokens_not_before,
                rate_limit_per_minute: s.limits.per_minute,
                rate_limit_per_hour: s.limits.per_hour,
                rate_limit_scope: s.rate_limit_scope,
                allowed_ips: s.allowed_ips.iter().map(|n| n.to_string()).collect(),
                tls_identities: s.tls_identities.iter().map(|i| i.to_string()).collect(),
                is_trusted: s.trusted,
                keys: s
                    .keys
                    .iter()
                    .filter_map(|h| {
                        self.keys.get(h).map(|k| SyncKey {
                            key_id: k.key_id.to_string(),
                            hash: h.to_hex(),
                            expires_at: k.expires_at(),
                            grace_ends_at: k.grace_ends_at(),
                        })
                    })
                    .collect(),
            })
            .collect();
        services.sort_by(|a, b| a.service_id.cmp(&b.service_id));
        SyncPayload {
            epoch: self.epoch.clone(),
            version: self.version,
            full: true,
            services,
            issuer: self.tokens.issuer.clone(),
            signing_keys: self.tokens.signing_keys.clone(),
            revoked_tokens: self.tokens.revoked_list.clone(),
            generated_at_ms: None,
            instance_id: None,
        }
    }
}

/// Building blocks for tests here and in the crates above (payload entries without a
/// database); not used by the product itself.
pub mod fixtures {
    use super::*;
    use crate::key;

    pub fn service(id: &str, scopes: &[&str], keys: Vec<SyncKey>) -> SyncService {
        SyncService {
            tls_identities: vec![],
            service_id: id.into(),
            service_name: format!("name-{id}"),
            environment: Environment::Live,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            disabled: false,
            rate_limit_per_minute: None,
            rate_limit_per_hour: None,
            rate_limit_scope: Default::default(),
            allowed_ips: vec![],
            tokens_not_before: 0,
            is_trusted: false,
            keys,
        }
    }

    pub fn sync_key(id: &str, k: &key::NewKey) -> SyncKey {
        SyncKey {
            key_id: id.into(),
            hash: k.hash.to_hex(),
            expires_at: None,
            grace_ends_at: None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::fixtures::{service, sync_key};
    use super::*;
    use crate::key;

    fn payload(version: u64, full: bool, services: Vec<SyncService>) -> SyncPayload {
        SyncPayload {
            epoch: "e1".into(),
            version,
            full,
            services,
            ..Default::default()
        }
    }

    #[test]
    fn full_then_delta_replaces_service_keys_and_keeps_others() {
        let k1 = key::generate(Environment::Live);
        let k2 = key::generate(Environment::Live);
        let k3 = key::generate(Environment::Live);
        let full = payload(
            3,
            true,
            vec![
                service("srv_a", &["a:read"], vec![sync_key("key_1", &k1)]),
                service("srv_b", &["b:read"], vec![sync_key("key_2", &k2)]),
            ],
        );
        let s1 = Snapshot::from_full(&full, Environment::Live, None).unwrap();
        assert_eq!(s1.key_count(), 2);
        assert_eq!(&*s1.lookup(&k1.hash).unwrap().key_id, "key_1");

        // srv_a rotated: key_1 gone (revoked), key_3 new, scopes changed.
        let delta = payload(
            4,
            false,
            vec![service("srv_a", &["a:*"], vec![sync_key("key_3", &k3)])],
        );
        let s2 = s1.apply_delta(&delta).unwrap();
        assert!(s2.lookup(&k1.hash).is_none());
        assert!(s2.lookup(&k2.hash).is_some());
        let e3 = s2.lookup(&k3.hash).unwrap();
        assert!(e3.service.scopes.allows("a:write"));
        assert_eq!(s2.version, 4);
        // The old snapshot is untouched.
        assert!(s1.lookup(&k1.hash).is_some());
        // Round trip through the file format.
        let again = Snapshot::from_full(&s2.to_payload(), Environment::Live, None).unwrap();
        assert_eq!(again.key_count(), 2);
        assert_eq!(again.to_payload(), s2.to_payload());
    }

    #[test]
    fn invalid_payloads_are_refused_whole() {
        let k1 = key::generate(Environment::Live);
        let mut bad = service("srv_b", &["b:read"], vec![]);
        bad.allowed_ips = vec!["10.0.0.0/33".into()];
        let p = payload(
            1,
            true,
            vec![service("srv_a", &["a:r"], vec![sync_key("key_1", &k1)]), bad],
        );
        assert!(matches!(
            Snapshot::from_full(&p, Environment::Live, None),
            Err(SnapshotError::Cidr { .. })
        ));
        let mut badhash = service("srv_c", &[], vec![sync_key("key_x", &k1)]);
        badhash.keys[0].hash = "nothex".into();
        assert!(Snapshot::from_full(&payload(1, true, vec![badhash]), Environment::Live, None).is_err());
        let dup = payload(
            1,
            true,
            vec![
                service("srv_a", &[], vec![sync_key("key_1", &k1)]),
                service("srv_b", &[], vec![sync_key("key_2", &k1)]),
            ],
        );
        assert!(matches!(
            Snapshot::from_full(&dup, Environment::Live, None),
            Err(SnapshotError::DuplicateKey { .. })
        ));
        let base = Snapshot::from_full(&payload(5, true, vec![]), Environment::Live, None).unwrap();
        let mut other_epoch = payload(6, false, vec![]);
        other_epoch.epoch = "e2".into();
        assert!(base.apply_delta(&other_epoch).is_err());
        assert!(base.apply_delta(&payload(4, false, vec![])).is_err());
    }

    #[test]
    fn other_environment_is_dropped() {
        let k = key::generate(Environment::Test);
        let mut s = service("srv_t", &[], vec![sync_key("key_t", &k)]);
        s.environment = Environment::Test;
        let snap = Snapshot::from_full(&payload(1, true, vec![s]), Environment::Live, None).unwrap();
        assert_eq!(snap.key_count(), 0);
    }

    #[test]
    fn limiter_state_survives_unchanged_limits_only() {
        let mut s = service("srv_a", &[], vec![]);
        s.rate_limit_per_minute = Some(10);
        let a = Snapshot::from_full(&payload(1, true, vec![s.clone()]), Environment::Live, None).unwrap();
        let b = a.apply_delta(&payload(2, false, vec![s.clone()])).unwrap();
        assert!(Arc::ptr_eq(
            &a.service("srv_a").unwrap().limiter,
            &b.service("srv_a").unwrap().limiter
        ));
        s.rate_limit_per_minute = Some(20);
        let c = b.apply_delta(&payload(3, false, vec![s])).unwrap();
        assert!(!Arc::ptr_eq(
            &b.service("srv_a").unwrap().limiter,
            &c.service("srv_a").unwrap().limiter
        ));
    }

    #[test]
    fn ip_rules() {
        let mut s = service("srv_a", &[], vec![]);
        s.allowed_ips = vec!["10.0.0.0/8".into(), "192.168.1.7".into()];
        let snap = Snapshot::from_full(&payload(1, true, vec![s]), Environment::Live, None).unwrap();
        let e = snap.service("srv_a").unwrap();
        assert!(e.ip_allowed(Some("10.2.3.4".parse().unwrap())));
        assert!(e.ip_allowed(Some("::ffff:10.2.3.4".parse().unwrap())));
        assert!(e.ip_allowed(Some("192.168.1.7".parse().unwrap())));
        assert!(!e.ip_allowed(Some("192.168.1.8".parse().unwrap())));
        assert!(!e.ip_allowed(Some("127.0.0.1".parse().unwrap())));
        assert!(!e.ip_allowed(None));
    }
}
