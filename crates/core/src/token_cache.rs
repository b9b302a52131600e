//! A bounded cache of verified access tokens, keyed by the blake3 hash of the token, so a
//! repeat of the same token costs a hash and a lookup instead of an Ed25519 verification.
//! An entry carries the token's own `exp`/`nbf` and is re-judged against the clock, the deny
//! list and the published keys on every hit, so it is never used past the token's validity.

use std::collections::HashSet;
use std::sync::Arc;

use crate::scope::ScopeSet;

#[derive(Debug)]
pub struct VerifiedToken {
    pub iss: String,
    /// Re-checked on every cache hit: a reload may change the audience this sidecar expects.
    pub aud: String,
    pub kid: String,
    pub client_id: Arc<str>,
    pub jti: Arc<str>,
    pub exp: i64,
    pub nbf: i64,
    /// Checked against the client's `tokens_not_before` (a disable kills earlier tokens).
    pub iat: i64,
    pub scopes: ScopeSet,
    /// RFC 8705: the thumbprint of the certificate the token is bound to.
    pub cnf_x5t: Option<Arc<str>>,
    /// The token's `is_trusted` claim.
    pub is_trusted: bool,
    /// `X-Permiso-Scopes` and `X-Permiso-Token-Id` values, built once per verified token.
    pub scopes_header: http::HeaderValue,
    pub jti_header: http::HeaderValue,
}

pub struct TokenCache {
    inner: quick_cache::sync::Cache<[u8; 32], Arc<VerifiedToken>>,
}

impl TokenCache {
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            inner: quick_cache::sync::Cache::new(capacity.max(1)),
        }
    }

    pub fn key(token: &str) -> [u8; 32] {
        *blake3::hash(token.as_bytes()).as_bytes()
    }

    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<VerifiedToken>> {
        self.inner.get(key)
    }

    pub fn insert(&self, key: [u8; 32], token: Arc<VerifiedToken>) {
        self.inner.insert(key, token);
    }

    /// Drops every entry whose jti is now revoked.
    pub fn evict_revoked(&self, revoked: &HashSet<String>) {
        if !revoked.is_empty() {
            self.inner.retain(|_, v| !revoked.contains(&*v.jti));
        }
    }

    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(jti: &str) -> Arc<VerifiedToken> {
        Arc::new(VerifiedToken {
            is_trusted: false,
            iss: "i".into(),
            aud: "a".into(),
            kid: "k".into(),
            client_id: Arc::from("srv_a"),
            jti: Arc::from(jti),
            exp: 10,
            nbf: 0,
            iat: 0,
            scopes: ScopeSet::default(),
            cnf_x5t: None,
            scopes_header: http::HeaderValue::from_static(""),
            jti_header: http::HeaderValue::from_static("j"),
        })
    }

    #[test]
    fn bounded_and_evicts_revoked() {
        let c = TokenCache::new(100);
        for i in 0..1000 {
            c.insert(TokenCache::key(&format!("t{i}")), entry(&format!("j{i}")));
        }
        assert!(c.len() <= 100 + 100 / 10, "cache grew to {}", c.len());
        let k = TokenCache::key("keep");
        c.insert(k, entry("keep"));
        let r = TokenCache::key("revoke");
        c.insert(r, entry("revoke-me"));
        c.evict_revoked(&HashSet::from(["revoke-me".to_string()]));
        assert!(c.get(&r).is_none());
        assert!(c.get(&k).is_some());
    }
}
