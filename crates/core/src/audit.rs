//! The audit log's hash chain: each entry's hash covers the previous entry's hash and the
//! entry's own fields, so changing, removing or reordering any entry breaks every hash after
//! it. The admin plane writes it; `permiso audit verify` checks it from the API's output alone.
//!
//! What the chain does not stop: someone with write access to the database file can rewrite
//! every entry and recompute every hash. Keep the head (`seq` and `hash`, printed by verify)
//! somewhere else, and a rewrite shows as a head that is no longer in the chain.

use serde::{Deserialize, Serialize};

/// The hash before the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

/// One entry as stored and served. `change` is a JSON object: what the action changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix seconds.
    pub at: i64,
    /// "admin-key", "service:<service_id>/<key_id>", or "unauthenticated" for failed logins.
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub source_ip: Option<String>,
    pub change: serde_json::Value,
    /// Hex of the previous entry's hash (64 zeros for the first).
    pub prev_hash: String,
    pub hash: String,
}

/// The fields the hash covers, in a fixed order. serde_json writes object keys sorted and
/// compact, so the same entry always gives the same bytes on the server and in the CLI.
/// Changes hold strings, integers, booleans and null only: a float might not survive the
/// store-and-parse round trip bit for bit (serde_json without `float_roundtrip`).
#[derive(Serialize)]
struct Covered<'a> {
    seq: u64,
    at: i64,
    actor: &'a str,
    action: &'a str,
    target: Option<&'a str>,
    source_ip: Option<&'a str>,
    change: &'a serde_json::Value,
}

#[allow(clippy::too_many_arguments)]
pub fn entry_hash(
    prev: &[u8; 32],
    seq: u64,
    at: i64,
    actor: &str,
    action: &str,
    target: Option<&str>,
    source_ip: Option<&str>,
    change: &serde_json::Value,
) -> [u8; 32] {
    let covered = Covered {
        seq,
        at,
        actor,
        action,
        target,
        source_ip,
        change,
    };
    let mut h = blake3::Hasher::new_derive_key("permiso audit chain v1");
    h.update(prev);
    // Serializing plain strings, integers and a Value cannot fail.
    h.update(&serde_json::to_vec(&covered).unwrap_or_default());
    *h.finalize().as_bytes()
}

pub fn to_hex(h: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

fn from_hex(s: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("entry {seq}: expected sequence number {expected}")]
    Gap { seq: u64, expected: u64 },
    #[error("entry {seq}: prev_hash does not match the previous entry's hash")]
    Link { seq: u64 },
    #[error("entry {seq}: hash does not match its contents")]
    Hash { seq: u64 },
}

/// Where a verified chain ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
    pub entries: u64,
}

/// Checks a whole chain from its first entry (seq 1), in order, streaming: feed entries with
/// `push`, then `finish`.
pub struct Verifier {
    prev: [u8; 32],
    next_seq: u64,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            prev: GENESIS,
            next_seq: 1,
        }
    }
}

impl Verifier {
    pub fn push(&mut self, e: &AuditEntry) -> Result<(), ChainError> {
        if e.seq != self.next_seq {
            return Err(ChainError::Gap {
                seq: e.seq,
                expected: self.next_seq,
            });
        }
        if from_hex(&e.prev_hash) != Some(self.prev) {
            return Err(ChainError::Link { seq: e.seq });
        }
        let h = entry_hash(
            &self.prev,
            e.seq,
            e.at,
            &e.actor,
            &e.action,
            e.target.as_deref(),
            e.source_ip.as_deref(),
            &e.change,
        );
        if from_hex(&e.hash) != Some(h) {
            return Err(ChainError::Hash { seq: e.seq });
        }
        self.prev = h;
        self.next_seq += 1;
        Ok(())
    }

    pub fn finish(self) -> Head {
        Head {
            seq: self.next_seq - 1,
            hash: to_hex(&self.prev),
            entries: self.next_seq - 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let change = json!({"scopes": ["a:b"], "n": seq});
                let h = entry_hash(
                    &prev,
                    seq,
                    100 + seq as i64,
                    "admin-key",
                    "service.patch",
                    Some("srv_x"),
                    Some("127.0.0.1"),
                    &change,
                );
                let e = AuditEntry {
                    seq,
                    at: 100 + seq as i64,
                    actor: "admin-key".into(),
                    action: "service.patch".into(),
                    target: Some("srv_x".into()),
                    source_ip: Some("127.0.0.1".into()),
                    change,
                    prev_hash: to_hex(&prev),
                    hash: to_hex(&h),
                };
                prev = h;
                e
            })
            .collect()
    }

    fn verify(entries: &[AuditEntry]) -> Result<Head, ChainError> {
        let mut v = Verifier::default();
        for e in entries {
            v.push(e)?;
        }
        Ok(v.finish())
    }

    #[test]
    fn an_intact_chain_verifies_and_names_its_head() {
        let c = chain(5);
        let head = verify(&c).unwrap();
        assert_eq!(head.seq, 5);
        assert_eq!(head.hash, c[4].hash);
        assert_eq!(verify(&[]).unwrap().seq, 0);
    }

    #[test]
    fn any_edit_removal_or_reorder_is_caught() {
        let c = chain(5);
        let mut edited = c.clone();
        edited[2].change = json!({"scopes": ["admin:*"], "n": 3});
        assert_eq!(verify(&edited), Err(ChainError::Hash { seq: 3 }));

        // Every hashed field, one at a time, in the middle of the chain.
        type Tamper = fn(&mut AuditEntry);
        let tampers: [(&str, Tamper); 8] = [
            ("at", |e| e.at += 1),
            ("actor", |e| e.actor = "someone-else".into()),
            ("action", |e| e.action = "service.create".into()),
            ("target", |e| e.target = Some("srv_other".into())),
            ("target removed", |e| e.target = None),
            ("source_ip", |e| e.source_ip = Some("10.9.9.9".into())),
            ("source_ip removed", |e| e.source_ip = None),
            ("change", |e| e.change = json!({"n": 99})),
        ];
        for (field, tamper) in tampers {
            let mut t = c.clone();
            let before = t[1].clone();
            tamper(&mut t[1]);
            assert_ne!(
                serde_json::to_string(&t[1]).unwrap(),
                serde_json::to_string(&before).unwrap(),
                "{field}: the tamper changed nothing"
            );
            assert_eq!(verify(&t), Err(ChainError::Hash { seq: 2 }), "{field}");
        }

        let mut removed = c.clone();
        removed.remove(1);
        assert_eq!(verify(&removed), Err(ChainError::Gap { seq: 3, expected: 2 }));

        // Removing one and renumbering the rest still breaks the link.
        let mut renumbered = removed.clone();
        for (i, e) in renumbered.iter_mut().enumerate() {
            e.seq = i as u64 + 1;
        }
        assert!(matches!(verify(&renumbered), Err(ChainError::Link { seq: 2 })));

        let mut swapped = c.clone();
        swapped.swap(1, 2);
        assert!(verify(&swapped).is_err());
    }
}
