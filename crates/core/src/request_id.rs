//! Request ids: kept from the caller when well-formed, otherwise minted, sent upstream as
//! `X-Request-Id`, returned to the caller and written in the access line, so one id follows a
//! call through every hop's logs.

use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use rand::TryRngCore;

pub const MAX_LEN: usize = 128;

/// 1 to 128 characters of `[A-Za-z0-9._:-]`: safe in headers and log lines.
pub fn valid(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Mints ids unique within this process (random prefix) without a syscall per request.
pub struct RequestIds {
    prefix: String,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut b = [0u8; 6];
        rand::rngs::OsRng
            .try_fill_bytes(&mut b)
            .expect("OS CSPRNG unavailable");
        RequestIds {
            prefix: b.iter().map(|x| format!("{x:02x}")).collect(),
            counter: AtomicU64::new(0),
        }
    }
}

impl RequestIds {
    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // `{prefix}-{n:x}`, written directly: the formatting machinery cost ~1k instructions a
        // request.
        let mut out = String::with_capacity(self.prefix.len() + 17);
        out.push_str(&self.prefix);
        out.push('-');
        let digits = if n == 0 {
            1
        } else {
            16 - (n.leading_zeros() as usize) / 4
        };
        for i in (0..digits).rev() {
            out.push(char::from(b"0123456789abcdef"[((n >> (i * 4)) & 0xf) as usize]));
        }
        out
    }

    /// The caller's id when it is well-formed (a reference-counted clone: no copy), else a
    /// new one, as the header value it is sent and returned as.
    pub fn keep_or_mint(&self, incoming: Option<&HeaderValue>) -> HeaderValue {
        match incoming {
            Some(id) if valid(id.as_bytes()) => id.clone(),
            // A minted id is hex, '-' and hex: always a valid header value.
            _ => HeaderValue::try_from(self.next()).unwrap_or(HeaderValue::from_static("-")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_are_the_prefix_a_dash_and_the_counter_in_hex() {
        let ids = RequestIds::default();
        for n in [
            0u64,
            1,
            9,
            10,
            15,
            16,
            255,
            4096,
            0xdead_beef,
            u64::MAX - 1,
            u64::MAX,
        ] {
            ids.counter.store(n, Ordering::Relaxed);
            assert_eq!(ids.next(), format!("{}-{n:x}", ids.prefix));
        }
    }

    #[test]
    fn keeps_valid_ids_and_mints_unique_ones() {
        let ids = RequestIds::default();
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(ids.keep_or_mint(Some(&h("abc-123_x.y:z"))), "abc-123_x.y:z");
        let a = ids.keep_or_mint(None);
        let b = ids.keep_or_mint(Some(&h("has space")));
        let c = ids.keep_or_mint(Some(&h(&"x".repeat(129))));
        assert!(valid(a.as_bytes()) && valid(b.as_bytes()) && valid(c.as_bytes()));
        assert!(a != b && b != c && a != c);
        assert!(!valid(b""));
        assert!(!valid("é".as_bytes()));
        assert!(!valid(b"a\r\nb"));
    }
}
