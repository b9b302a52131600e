//! Access-token signing keys. Generated here; the private half is sealed with a key-encryption
//! key (KEK) that never enters the database; a new key is published (JWKS and sidecar sync)
//! before it signs anything, and an old one stays published until the last token it signed
//! has expired.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::TryRngCore;

use crate::admin::storage::{SigningKeyRow, Storage, StoreError};
use crate::core::jwt::{self, KeySet, Signer};
use crate::core::sync::SyncSigningKey;

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("key-encryption key: {0}")]
    Kek(String),
    #[error("signing key {0} cannot be unsealed with this key-encryption key")]
    Unseal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Seals signing keys at rest (XChaCha20-Poly1305).
pub struct Kek(XChaCha20Poly1305);

impl Kek {
    /// From `PERMISO_SIGNING_KEK` (base64url of 32 bytes) when given, else from the file beside
    /// the database (`<database>.kek`, created with mode 0600 on first start). Either way the
    /// KEK is not in the database, so a copy of the database alone cannot mint tokens.
    /// With PostgreSQL (`database` None) there is no file beside the database and every
    /// replica must hold the same KEK: the variable is required.
    pub fn load(database: Option<&Path>, from_env: Option<&str>) -> Result<Kek, SigningError> {
        let bytes = match (from_env, database) {
            (Some(v), _) => URL_SAFE_NO_PAD
                .decode(v.trim())
                .map_err(|_| SigningError::Kek("PERMISO_SIGNING_KEK is not base64url".into()))?,
            (None, Some(db)) => read_or_create(&kek_path(db))?,
            (None, None) => {
                return Err(SigningError::Kek(
                    "PERMISO_SIGNING_KEK is required with a PostgreSQL database: every replica needs the same key-encryption key (base64url of 32 bytes)".into(),
                ))
            }
        };
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SigningError::Kek("the key-encryption key must be 32 bytes".into()))?;
        Ok(Kek(XChaCha20Poly1305::new(&key.into())))
    }

    fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng
            .try_fill_bytes(&mut nonce)
            .expect("OS CSPRNG unavailable");
        let ct = self
            .0
            .encrypt(XNonce::from_slice(&nonce), plaintext)
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory input");
        [nonce.as_slice(), &ct].concat()
    }

    fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 24 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(24);
        self.0.decrypt(XNonce::from_slice(nonce), ct).ok()
    }
}

fn kek_path(database: &Path) -> PathBuf {
    let mut p = database.as_os_str().to_owned();
    p.push(".kek");
    PathBuf::from(p)
}

fn read_or_create(path: &Path) -> Result<Vec<u8>, SigningError> {
    match std::fs::read_to_string(path) {
        Ok(text) => URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| SigningError::Kek(format!("{} is not base64url", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::rngs::OsRng
                .try_fill_bytes(&mut key)
                .expect("OS CSPRNG unavailable");
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts
                .open(path)
                .map_err(|e| SigningError::Kek(format!("creating {}: {e}", path.display())))?;
            f.write_all(URL_SAFE_NO_PAD.encode(key).as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| SigningError::Kek(format!("writing {}: {e}", path.display())))?;
            tracing::warn!(path = %path.display(), "created a new signing key-encryption key; back it up with the database");
            Ok(key.to_vec())
        }
        Err(e) => Err(SigningError::Kek(format!("reading {}: {e}", path.display()))),
    }
}

/// When each key stops being published: `max_lifetime` after its successor started signing.
/// A key whose successor is not active yet is still the signer and stays published.
pub fn published(rows: &[SigningKeyRow], now: i64, max_lifetime: i64) -> Vec<SyncSigningKey> {
    rows.iter()
        .enumerate()
        .filter(|(i, _)| match rows.get(i + 1) {
            Some(next) if next.activates_at <= now => now < next.activates_at + max_lifetime,
            _ => true,
        })
        .map(|(_, r)| SyncSigningKey {
            kid: r.kid.clone(),
            x: r.public_x.clone(),
        })
        .collect()
}

/// The keys in memory: every stored key's signer, and the rows for scheduling.
pub struct KeyRing {
    rows: Vec<SigningKeyRow>,
    signers: HashMap<String, Signer>,
}

impl KeyRing {
    pub async fn load(store: &dyn Storage, kek: &Kek) -> Result<KeyRing, SigningError> {
        let rows = store.signing_keys().await?;
        let mut signers = HashMap::new();
        for r in &rows {
            let der = kek
                .open(&r.private_sealed)
                .ok_or_else(|| SigningError::Unseal(r.kid.clone()))?;
            signers.insert(r.kid.clone(), Signer::new(r.kid.clone(), &der));
        }
        Ok(KeyRing { rows, signers })
    }

    /// The key that signs at `now`: the latest one already active.
    pub fn signer_at(&self, now: i64) -> Option<&Signer> {
        self.rows
            .iter()
            .rev()
            .find(|r| r.activates_at <= now)
            .and_then(|r| self.signers.get(&r.kid))
    }

    pub fn published(&self, now: i64, max_lifetime: i64) -> Vec<SyncSigningKey> {
        published(&self.rows, now, max_lifetime)
    }

    /// The published keys as a verification key set (for introspection and revocation).
    pub fn verifier(&self, now: i64, max_lifetime: i64) -> KeySet {
        let mut ks = KeySet::default();
        for k in self.published(now, max_lifetime) {
            ks.insert(&k.kid, &k.x);
        }
        ks
    }

    pub fn rows(&self) -> &[SigningKeyRow] {
        &self.rows
    }
}

/// Creates a key that signs from `activates_at`. Returns its kid and the new sync version.
pub async fn add_key(
    store: &dyn Storage,
    kek: &Kek,
    now: i64,
    activates_at: i64,
    who: &crate::admin::storage::Audit,
) -> Result<(String, u64), SigningError> {
    let (der, x) = jwt::generate_ed25519();
    let kid = format!("k{}", &crate::core::ids::new_jti()[..16]);
    let row = SigningKeyRow {
        kid: kid.clone(),
        public_x: x,
        private_sealed: kek.seal(&der),
        created_at: now,
        activates_at,
    };
    let v = store.add_signing_key(&row, who).await?;
    Ok((kid, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kid: &str, activates_at: i64) -> SigningKeyRow {
        SigningKeyRow {
            kid: kid.into(),
            public_x: "x".into(),
            private_sealed: vec![],
            created_at: 0,
            activates_at,
        }
    }

    #[test]
    fn publication_window() {
        let rows = vec![row("a", 0), row("b", 1000)];
        let kids = |now| {
            published(&rows, now, 3600)
                .into_iter()
                .map(|k| k.kid)
                .collect::<Vec<_>>()
        };
        // b is published before it signs; a keeps signing until then.
        assert_eq!(kids(500), vec!["a", "b"]);
        // a stays published for the longest token lifetime after b took over.
        assert_eq!(kids(1000 + 3599), vec!["a", "b"]);
        assert_eq!(kids(1000 + 3600), vec!["b"]);
    }

    #[test]
    fn seal_round_trip_and_wrong_kek() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("p.db");
        let kek = Kek::load(Some(&db), None).unwrap();
        let again = Kek::load(Some(&db), None).unwrap();
        let sealed = kek.seal(b"private");
        assert_ne!(&sealed[24..], b"private");
        assert_eq!(again.open(&sealed).unwrap(), b"private");
        let other = Kek::load(Some(&db), Some(&URL_SAFE_NO_PAD.encode([7u8; 32]))).unwrap();
        assert!(other.open(&sealed).is_none());
        assert!(Kek::load(Some(&db), Some("short")).is_err());
        // No file beside a PostgreSQL database: the variable is required.
        let e = Kek::load(None, None).err().unwrap().to_string();
        assert!(e.contains("PERMISO_SIGNING_KEK is required"), "{e}");
        assert!(Kek::load(None, Some(&URL_SAFE_NO_PAD.encode([7u8; 32]))).is_ok());
    }
}
