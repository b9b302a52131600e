//! `core::jwt::{looks_like_jwt, verify, verify_with_kid}` on arbitrary token text: errors,
//! never panics, the two verify functions agree, and whatever is accepted carries the header
//! and payload of a seed token (the fuzzer cannot sign: anything else accepted means a check
//! on the signature is missing).
//!
//! The key set holds "k1", a fixed Ed25519 key whose tokens are in the seed corpus (so the
//! fuzzer starts from tokens that verify all the way), and "k2", a fresh key from
//! `generate_ed25519()`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use permiso::core::jwt::{self, Expectations, KeySet};

/// Public half of the fixed seed key (see fuzz/README.md for how the seeds were made).
const SEED_X: &str = "C1Pbu2BidF0M5l2rwiUp6bypEr0IhZcWu9SGepruUxk";
/// The clock the seed tokens were minted for (exp = NOW + 600).
const NOW: i64 = 1_800_000_000;

fn keys() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut ks = KeySet::default();
        assert!(ks.insert("k1", SEED_X));
        let (_der, x) = jwt::generate_ed25519();
        assert!(ks.insert("k2", &x));
        ks
    })
}

/// The seed tokens (the fuzzer cannot sign, so nothing else can ever verify).
const SEEDS: [&str; 5] = [
    include_str!("../corpus/jwt_parse/seed-valid"),
    include_str!("../corpus/jwt_parse/seed-expired"),
    include_str!("../corpus/jwt_parse/seed-other-kid"),
    include_str!("../corpus/jwt_parse/seed-wrong-typ"),
    include_str!("../corpus/jwt_parse/seed-alg-none"),
];

/// `header.payload` of a token.
fn signed_part(token: &str) -> &str {
    token.rsplit_once('.').map_or(token, |(signed, _)| signed)
}

fn check(token: &str) {
    let keys = keys();
    let _ = jwt::looks_like_jwt(token);
    for (want, now) in [
        (
            Expectations {
                issuer: "https://auth",
                audience: "permiso",
                leeway_secs: 30,
            },
            NOW,
        ),
        (
            Expectations {
                issuer: "",
                audience: "",
                leeway_secs: 0,
            },
            0,
        ),
    ] {
        let a = jwt::verify(token, keys, &want, now);
        let b = jwt::verify_with_kid(token, keys, &want, now);
        match (&a, &b) {
            (Ok(c), Ok((c2, kid))) => {
                assert_eq!(c, c2);
                // Accepted: its header and payload are those of a seed token accepted under
                // the same expectations (checking the signature is what makes this hold).
                assert!(
                    SEEDS.iter().any(|seed| {
                        let seed = seed.trim();
                        jwt::verify(seed, keys, &want, now).is_ok() && signed_part(seed) == signed_part(token)
                    }),
                    "accepted a token that is no seed's: {token:?}"
                );
                assert!(keys.contains(kid), "verified with a kid not in the set");
                assert_eq!(c.iss, want.issuer);
                assert_eq!(c.aud, want.audience);
                assert!(jwt::check_time(c.exp, c.nbf, want.leeway_secs, now).is_ok());
            }
            (Err(e), Err(e2)) => assert_eq!(e, e2),
            _ => panic!("verify and verify_with_kid disagree: {a:?} vs {b:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        check(token);
    } else {
        check(&String::from_utf8_lossy(data));
    }
});
