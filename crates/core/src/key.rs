//! The API key format: `svc_live_` / `svc_test_`, 256 random bits in URL-safe base64, and a
//! six-character checksum, so a mistyped or invented key is refused before any lookup.
//!
//! Only the blake3 hash of a key is ever stored; the key itself exists in the one response that
//! issued it.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::TryRngCore;
use serde::{Deserialize, Serialize};

pub const LIVE_PREFIX: &str = "svc_live_";
pub const TEST_PREFIX: &str = "svc_test_";
/// Every key starts with this, whatever its environment.
pub const KEY_FAMILY_PREFIX: &str = "svc_";
const PREFIX_LEN: usize = 9;
const SECRET_BYTES: usize = 32;
const BODY_LEN: usize = 43; // base64url, no padding, of 32 bytes
const CHECKSUM_LEN: usize = 6;
/// Total length of a well-formed key.
pub const KEY_LEN: usize = PREFIX_LEN + BODY_LEN + CHECKSUM_LEN;
/// How many characters of the random body are kept as the display prefix.
const DISPLAY_BODY_CHARS: usize = 4;
/// Separates the checksum from the storage hash: the checksum is public-ish, the hash is the
/// lookup key.
const CHECKSUM_CONTEXT: &str = "permiso 2026-11 api key checksum v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Test => "test",
        }
    }

    pub fn key_prefix(self) -> &'static str {
        match self {
            Environment::Live => LIVE_PREFIX,
            Environment::Test => TEST_PREFIX,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Environment::Live),
            "test" => Some(Environment::Test),
            _ => None,
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a usable key. Logged, never shown to the caller in detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a Permiso key (wrong prefix, length or alphabet)")]
    Malformed,
    #[error("checksum does not match")]
    BadChecksum,
}

/// blake3 of the whole key string: what the store and the snapshot are keyed by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        KeyHash(*blake3::hash(key.as_bytes()).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(|h| KeyHash(*h.as_bytes()))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..12])
    }
}

/// A secret that must not be printed by accident: `Debug` shows only that it is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }

    /// The one deliberate way to read the secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A freshly minted key: the secret to show once, and what may be stored.
#[derive(Debug)]
pub struct NewKey {
    pub secret: Secret,
    pub hash: KeyHash,
    pub display_prefix: String,
}

/// A string that passed the format and checksum checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub environment: Environment,
    pub text: &'a str,
}

impl ParsedKey<'_> {
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.text)
    }
}

/// The checksum key, derived once from the context string (derive_key per call would cost a
/// second blake3 compression on every request).
fn checksum_digest(prefix_and_body: &str) -> blake3::Hash {
    static KEY: std::sync::LazyLock<[u8; 32]> =
        std::sync::LazyLock::new(|| blake3::derive_key(CHECKSUM_CONTEXT, b"checksum key"));
    blake3::keyed_hash(&KEY, prefix_and_body.as_bytes())
}

fn checksum(prefix_and_body: &str) -> String {
    URL_SAFE_NO_PAD.encode(&checksum_digest(prefix_and_body).as_bytes()[..4])
}

/// Mints a key from the OS CSPRNG.
pub fn generate(environment: Environment) -> NewKey {
    let mut raw = [0u8; SECRET_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut raw)
        .expect("OS CSPRNG unavailable");
    let mut text = String::with_capacity(KEY_LEN);
    text.push_str(environment.key_prefix());
    URL_SAFE_NO_PAD.encode_string(raw, &mut text);
    let sum = checksum(&text);
    text.push_str(&sum);
    debug_assert_eq!(text.len(), KEY_LEN);
    NewKey {
        hash: KeyHash::of(&text),
        display_prefix: display_prefix(&text),
        secret: Secret::new(text),
    }
}

/// Client secrets: `pcs_` and 256 random bits. They are high-entropy, so a fast hash (blake3)
/// is the right storage, as for API keys. No checksum: they only ever go to the token endpoint.
pub const CLIENT_SECRET_PREFIX: &str = "pcs_";

pub fn generate_client_secret() -> NewKey {
    let mut raw = [0u8; SECRET_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut raw)
        .expect("OS CSPRNG unavailable");
    let mut text = String::with_capacity(CLIENT_SECRET_PREFIX.len() + BODY_LEN);
    text.push_str(CLIENT_SECRET_PREFIX);
    URL_SAFE_NO_PAD.encode_string(raw, &mut text);
    NewKey {
        hash: KeyHash::of(&text),
        display_prefix: text
            .chars()
            .take(CLIENT_SECRET_PREFIX.len() + DISPLAY_BODY_CHARS)
            .collect(),
        secret: Secret::new(text),
    }
}

/// `svc_live_AbCd`: enough to recognise a key in a listing, far too little to guess it.
pub fn display_prefix(key: &str) -> String {
    key.chars().take(PREFIX_LEN + DISPLAY_BODY_CHARS).collect()
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Checks format and checksum; no lookup, no allocation.
pub fn parse(text: &str) -> Result<ParsedKey<'_>, KeyError> {
    if text.len() != KEY_LEN {
        return Err(KeyError::Malformed);
    }
    let environment = if text.starts_with(LIVE_PREFIX) {
        Environment::Live
    } else if text.starts_with(TEST_PREFIX) {
        Environment::Test
    } else {
        return Err(KeyError::Malformed);
    };
    let rest = &text.as_bytes()[PREFIX_LEN..];
    if !rest.iter().all(|&b| is_b64url(b)) {
        return Err(KeyError::Malformed);
    }
    let (signed, sum) = text.split_at(PREFIX_LEN + BODY_LEN);
    let digest = checksum_digest(signed);
    let mut expected = [0u8; CHECKSUM_LEN];
    let n = URL_SAFE_NO_PAD
        .encode_slice(&digest.as_bytes()[..4], &mut expected)
        .map_err(|_| KeyError::Malformed)?;
    // The checksum is not a secret (anyone holding the key can compute it), so a plain
    // comparison is fine here; the secret itself is only ever compared through its hash.
    if n != CHECKSUM_LEN || expected != sum.as_bytes() {
        return Err(KeyError::BadChecksum);
    }
    Ok(ParsedKey { environment, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_names_are_the_wire_format() {
        for (e, name) in [(Environment::Live, "live"), (Environment::Test, "test")] {
            assert_eq!(e.as_str(), name);
            assert_eq!(e.to_string(), name);
            assert_eq!(Environment::parse(name), Some(e));
            assert_eq!(serde_json::to_string(&e).unwrap(), format!("\"{name}\""));
        }
        for bad in ["", "LIVE", "Live", "prod", "live "] {
            assert_eq!(Environment::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_hash_prints_only_its_first_characters() {
        let h = KeyHash::of("svc_live_x");
        let hex = h.to_hex();
        assert_eq!(format!("{h:?}"), format!("KeyHash({}…)", &hex[..12]));
    }

    #[test]
    fn client_secrets_show_only_a_short_prefix() {
        let s = generate_client_secret();
        let text = s.secret.expose();
        assert!(text.starts_with(CLIENT_SECRET_PREFIX));
        assert_eq!(
            s.display_prefix,
            text[..CLIENT_SECRET_PREFIX.len() + DISPLAY_BODY_CHARS]
        );
        assert_eq!(s.hash, KeyHash::of(text));
        assert_ne!(generate_client_secret().secret.expose(), text);
    }

    #[test]
    fn generated_keys_parse_and_carry_environment() {
        for env in [Environment::Live, Environment::Test] {
            let k = generate(env);
            let p = parse(k.secret.expose()).unwrap();
            assert_eq!(p.environment, env);
            assert_eq!(p.hash(), k.hash);
            assert!(k.secret.expose().starts_with(env.key_prefix()));
            assert_eq!(k.display_prefix.len(), 13);
            assert!(k.secret.expose().starts_with(&k.display_prefix));
        }
    }

    #[test]
    fn keys_are_unique_and_long_enough_for_256_bits() {
        let a = generate(Environment::Live);
        let b = generate(Environment::Live);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.secret.expose().len(), KEY_LEN);
        const { assert!(BODY_LEN * 6 >= 256) };
    }

    #[test]
    fn any_single_character_typo_is_rejected_without_lookup() {
        let k = generate(Environment::Live);
        let text = k.secret.expose().to_string();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for i in PREFIX_LEN..text.len() {
            let orig = text.as_bytes()[i];
            let repl = alphabet.iter().copied().find(|&c| c != orig).unwrap();
            let mut bytes = text.clone().into_bytes();
            bytes[i] = repl;
            let typo = String::from_utf8(bytes).unwrap();
            assert_eq!(parse(&typo), Err(KeyError::BadChecksum), "position {i}");
        }
    }

    #[test]
    fn malformed_inputs() {
        let k = generate(Environment::Live);
        let text = k.secret.expose();
        assert_eq!(parse(""), Err(KeyError::Malformed));
        assert_eq!(parse(&text[..KEY_LEN - 1]), Err(KeyError::Malformed));
        assert_eq!(parse(&format!("{text}x")), Err(KeyError::Malformed));
        let other = text.replacen("svc_live_", "svc_prod_", 1);
        assert_eq!(parse(&other), Err(KeyError::Malformed));
        let bad_char = format!("{}!{}", &text[..20], &text[21..]);
        assert_eq!(parse(&bad_char), Err(KeyError::Malformed));
        let long = "a".repeat(1_000_000);
        assert_eq!(parse(&long), Err(KeyError::Malformed));
        // A multi-byte character must not cause a slicing panic.
        let utf8 = format!("{}é{}", &text[..20], &text[22..]);
        assert_eq!(utf8.len(), KEY_LEN);
        assert_eq!(parse(&utf8), Err(KeyError::Malformed));
    }

    #[test]
    fn secret_debug_is_redacted() {
        let k = generate(Environment::Test);
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(k.secret.expose()));
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn hash_hex_round_trips() {
        let h = KeyHash::of("abc");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex("zz"), None);
    }
}
