//! Random public identifiers for services and keys. They are not secrets: they appear in
//! listings, logs and `X-Permiso-*` headers.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::TryRngCore;

pub const SERVICE_ID_PREFIX: &str = "srv_";
pub const KEY_ID_PREFIX: &str = "key_";
pub const SECRET_ID_PREFIX: &str = "sec_";

fn random_id(prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .expect("OS CSPRNG unavailable");
    let mut out = String::with_capacity(prefix.len() + bytes * 4 / 3 + 2);
    out.push_str(prefix);
    URL_SAFE_NO_PAD.encode_string(&buf, &mut out);
    out
}

/// `srv_` + 128 random bits.
pub fn new_service_id() -> String {
    random_id(SERVICE_ID_PREFIX, 16)
}

/// `key_` + 96 random bits.
pub fn new_key_id() -> String {
    random_id(KEY_ID_PREFIX, 12)
}

/// `sec_` + 96 random bits: the id of a client secret.
pub fn new_secret_id() -> String {
    random_id(SECRET_ID_PREFIX, 12)
}

/// A token id (`jti`): 128 random bits.
pub fn new_jti() -> String {
    random_id("", 16)
}

/// Whether `s` could be an id we issued with `prefix`; used to answer 404 without a lookup.
pub fn looks_like_id(s: &str, prefix: &str) -> bool {
    s.len() <= 64
        && s.starts_with(prefix)
        && s.len() > prefix.len()
        && s[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_are_distinct() {
        let a = new_service_id();
        let b = new_service_id();
        assert!(looks_like_id(&a, SERVICE_ID_PREFIX));
        assert_eq!(a.len(), 4 + 22);
        assert_ne!(a, b);
        let k = new_key_id();
        assert!(looks_like_id(&k, KEY_ID_PREFIX));
        assert!(!looks_like_id(&k, SERVICE_ID_PREFIX));
        assert!(!looks_like_id("srv_../x", SERVICE_ID_PREFIX));
    }
}
