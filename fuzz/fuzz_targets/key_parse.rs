//! `core::key::parse` and `display_prefix` on arbitrary text: never a panic, whatever parses
//! really has the key's shape, and one changed character of a key never parses (the checksum).
#![no_main]

use libfuzzer_sys::fuzz_target;
use permiso::core::key::{self, Environment, KEY_LEN};

fn check(text: &str) {
    let shown = key::display_prefix(text);
    assert!(
        text.starts_with(&shown),
        "display prefix {shown:?} is not a prefix"
    );
    assert!(shown.chars().count() <= 13);

    if let Ok(parsed) = key::parse(text) {
        assert_eq!(parsed.text, text);
        assert_eq!(text.len(), KEY_LEN);
        assert!(text.starts_with(parsed.environment.key_prefix()));
        assert!(text.is_ascii());
        assert_eq!(parsed.hash(), key::KeyHash::of(text));
        // A parsed key's display prefix is its prefix plus four body characters.
        assert_eq!(shown.len(), 13);
        assert_eq!(
            Environment::parse(parsed.environment.as_str()),
            Some(parsed.environment)
        );
        // The checksum covers every character: changing any one of them (to another
        // character of the key alphabet) never yields another key that parses.
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            for alt in [b'A', b'b', b'0', b'-', b'_'] {
                if bytes[i] == alt {
                    continue;
                }
                let mut changed = bytes.to_vec();
                changed[i] = alt;
                let changed = String::from_utf8(changed).unwrap();
                assert!(key::parse(&changed).is_err(), "{changed:?} parses after changing byte {i}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
    }
    check(&String::from_utf8_lossy(data));
});
