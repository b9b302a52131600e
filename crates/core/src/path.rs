//! The one canonical form of a request path, decided once before routing (RFC 3986 §6, made
//! stricter for a gateway). The sidecar routes on the canonical path and forwards exactly that
//! path, so an upstream can never read a different one than the one that was authorised.
//!
//! Canonical form, byte by byte of the *decoded* path:
//! - every byte that may stand unescaped in a path segment (RFC 3986 `pchar`: unreserved,
//!   sub-delims except `;`, `:` and `@`) is written raw, even when the caller escaped it
//!   (`%62` → `b`, `%3A` → `:`). RFC 3986 §6.2.2.2 only decodes unreserved characters, but
//!   every mainstream framework (Flask, Starlette, Spring, Rails) decodes *all* escapes before
//!   routing, so leaving `%3A` escaped would let `/items%3Abatch` slip past a `/items:batch`
//!   route while the upstream runs its handler;
//! - every other byte (space, `"`, `%`, `?`, `#`, `{`, bytes ≥ 0x80, …) is `%XX` with
//!   upper-case hex (§6.2.2.1), whether it arrived raw or escaped;
//! - repeated slashes are merged (Envoy's `merge_slashes`): `//a///b` is `/a/b`.
//!
//! So two raw paths get the same canonical form exactly when they decode to the same bytes
//! (modulo merged slashes), and an upstream that decodes once reads the canonical path's
//! meaning and no other.
//!
//! Refused (400), because some upstream reads them another way than others:
//! encoded `/` and `\`, raw `\`; NUL and other control characters; `;` raw or encoded (Tomcat,
//! Jetty and Spring cut matrix parameters, so `..;` is `..` to them); dot segments in any
//! spelling (`..`, `%2e%2E`, `.%2e`); segments ending in a dot or a blank (Windows and IIS trim
//! them); `%25` followed by two hex digits (a double encoding that a decode-twice upstream
//! would read as another character); malformed escapes; decoded bytes that are not UTF-8
//! (overlong forms such as `%C0%AF`); raw non-ASCII.
//!
//! No allocation when the path is already canonical, which is every well-behaved client.

use std::borrow::Cow;

/// Why a path is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    DotSegment,
    /// `%2F` or `%5C`.
    EncodedSeparator,
    Backslash,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%25` followed by two hex digits.
    DoubleEncoded,
    /// NUL or another control character, encoded (raw ones never pass the HTTP parser).
    ControlCharacter,
    /// `;` raw or encoded: matrix parameters are read differently by different servers.
    Semicolon,
    /// A segment ending in `.` or a blank.
    TrailingDotOrBlank,
    /// Decoded bytes that are not UTF-8, or a raw byte outside ASCII.
    NotUtf8,
}

impl PathError {
    pub fn describe(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the path must start with '/'",
            PathError::DotSegment => "the path must not contain '.' or '..' segments",
            PathError::EncodedSeparator => "the path must not contain encoded '/' or '\\'",
            PathError::Backslash => "the path must not contain '\\'",
            PathError::BadEscape => "the path contains a malformed percent-escape",
            PathError::DoubleEncoded => "the path must not contain double percent-encoding",
            PathError::ControlCharacter => "the path must not contain control characters",
            PathError::Semicolon => "the path must not contain ';' (matrix parameters)",
            PathError::TrailingDotOrBlank => "a path segment must not end in '.' or a blank",
            PathError::NotUtf8 => "the decoded path must be UTF-8",
        }
    }
}

/// How a decoded byte is written in the canonical form.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Written as itself.
    Raw,
    /// Written as `%XX`.
    Escaped,
    Refused(PathError),
}

fn class(b: u8) -> Class {
    match b {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => Class::Raw,
        b'-' | b'.' | b'_' | b'~' => Class::Raw,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@' => Class::Raw,
        b'/' => Class::Refused(PathError::EncodedSeparator),
        b'\\' => Class::Refused(PathError::EncodedSeparator),
        b';' => Class::Refused(PathError::Semicolon),
        0x00..=0x1f | 0x7f => Class::Refused(PathError::ControlCharacter),
        _ => Class::Escaped,
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A finished segment of the canonical output (without its slashes).
fn check_segment(seg: &[u8]) -> Result<(), PathError> {
    if seg == b"." || seg == b".." {
        return Err(PathError::DotSegment);
    }
    if seg.ends_with(b".") || seg.ends_with(b"%20") {
        return Err(PathError::TrailingDotOrBlank);
    }
    Ok(())
}

/// The canonical form of `raw` (the path part of the request target, no query), borrowed when
/// `raw` already is canonical.
pub fn canonicalize(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // `out` stays None while the output equals the input read so far (then `n == i`).
    let mut out: Option<Vec<u8>> = None;
    let mut n = 0usize;
    let mut i = 0usize;
    // Start (in the output) of the current segment, just after its '/'.
    let mut seg_start = 0usize;
    // Decoded bytes >= 0x80 of the current character, to check they form UTF-8.
    let mut high = [0u8; 4];
    let mut high_len = 0usize;

    while i < b.len() {
        let c = b[i];
        // The common case: a plain path character while the output still is the input.
        // ('%' and '/' are never `Raw`.)
        if out.is_none() && class(c) == Class::Raw {
            utf8_char(&high[..high_len])?;
            high_len = 0;
            i += 1;
            n += 1;
            continue;
        }
        if c == b'/' {
            utf8_char(&high[..high_len])?;
            high_len = 0;
            let prev_slash = n > 0 && last(&out, b, n) == b'/';
            if prev_slash {
                // Merge: drop this slash, and the output leaves the input.
                out.get_or_insert_with(|| b[..n].to_vec());
                i += 1;
                continue;
            }
            // (Before the first '/', the segment is empty and passes.)
            check_segment(output(&out, b, seg_start, n))?;
            push(&mut out, b, &mut n, &mut i, b"/", 1);
            seg_start = n;
            continue;
        }
        // Decode one byte: an escape, or a raw byte.
        let (byte, consumed) = if c == b'%' {
            (escape(b, i + 1).ok_or(PathError::BadEscape)?, 3)
        } else {
            match c {
                b'\\' => return Err(PathError::Backslash),
                0x80..=0xff => return Err(PathError::NotUtf8),
                _ => (c, 1),
            }
        };
        // A multi-byte character is a run of escaped bytes >= 0x80; check each one whole.
        if !(0x80..0xc0).contains(&byte) || high_len == high.len() {
            utf8_char(&high[..high_len])?;
            high_len = 0;
        }
        if byte >= 0x80 {
            high[high_len] = byte;
            high_len += 1;
        }
        match class(byte) {
            Class::Refused(e) => return Err(e),
            Class::Raw => push(&mut out, b, &mut n, &mut i, &[byte], consumed),
            Class::Escaped => {
                let e = [b'%', HEX[(byte >> 4) as usize], HEX[(byte & 15) as usize]];
                push(&mut out, b, &mut n, &mut i, &e, consumed)
            }
        }
    }
    utf8_char(&high[..high_len])?;
    check_segment(output(&out, b, seg_start, n))?;
    // A decoded '%' followed by two hex digits or by `u` (IIS's `%uXXXX`), however each was
    // spelled: an upstream that decodes twice would read another byte. Those characters are
    // always written raw, so this shows in the output as `%25` and them.
    let o = output(&out, b, 0, n);
    let double = |w: &[u8]| {
        w.starts_with(b"%25")
            && (w.get(3).is_some_and(|c| *c == b'u' || *c == b'U')
                || (w.len() == 5 && hex(w[3]).is_some() && hex(w[4]).is_some()))
    };
    if (0..o.len())
        .filter(|&i| o[i] == b'%')
        .any(|i| double(&o[i..(i + 5).min(o.len())]))
    {
        return Err(PathError::DoubleEncoded);
    }
    Ok(match out {
        None => Cow::Borrowed(raw),
        // Only ASCII is ever written.
        Some(o) => Cow::Owned(String::from_utf8(o).expect("canonical paths are ASCII")),
    })
}

/// The byte an escape at `b[at..at + 2]` stands for.
fn escape(b: &[u8], at: usize) -> Option<u8> {
    let h = hex(*b.get(at)?)?;
    let l = hex(*b.get(at + 1)?)?;
    Some(h << 4 | l)
}

fn utf8_char(bytes: &[u8]) -> Result<(), PathError> {
    if bytes.is_empty() || std::str::from_utf8(bytes).is_ok() {
        Ok(())
    } else {
        Err(PathError::NotUtf8)
    }
}

fn last(out: &Option<Vec<u8>>, b: &[u8], n: usize) -> u8 {
    match out {
        Some(o) => o[n - 1],
        None => b[n - 1],
    }
}

fn output<'a>(out: &'a Option<Vec<u8>>, b: &'a [u8], from: usize, to: usize) -> &'a [u8] {
    match out {
        Some(o) => &o[from..to],
        None => &b[from..to],
    }
}

/// Appends `bytes`, standing for `consumed` input bytes. The output stays borrowed while it
/// repeats the input.
fn push(out: &mut Option<Vec<u8>>, b: &[u8], n: &mut usize, i: &mut usize, bytes: &[u8], consumed: usize) {
    match out {
        Some(o) => o.extend_from_slice(bytes),
        None if &b[*i..*i + consumed] == bytes => {}
        None => {
            let mut o = Vec::with_capacity(b.len() + 8);
            o.extend_from_slice(&b[..*n]);
            o.extend_from_slice(bytes);
            *out = Some(o);
        }
    }
    *n += bytes.len();
    *i += consumed;
}

/// Percent-decodes a canonical path (for tests and fuzzing: what an upstream that decodes once
/// would read).
pub fn decode(path: &str) -> Vec<u8> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(d) = escape(b, i + 1) {
                out.push(d);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        canonicalize(raw)
            .unwrap_or_else(|e| panic!("{raw:?}: {e:?}"))
            .into_owned()
    }

    #[test]
    fn every_refusal_has_its_own_description() {
        let all = [
            PathError::NotAbsolute,
            PathError::DotSegment,
            PathError::EncodedSeparator,
            PathError::Backslash,
            PathError::BadEscape,
            PathError::DoubleEncoded,
            PathError::ControlCharacter,
            PathError::Semicolon,
            PathError::TrailingDotOrBlank,
            PathError::NotUtf8,
        ];
        let texts: std::collections::HashSet<&str> = all.iter().map(|e| e.describe()).collect();
        assert_eq!(
            texts.len(),
            all.len(),
            "descriptions must tell the refusals apart"
        );
        assert!(texts.iter().all(|t| t.contains("path")), "{texts:?}");
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for p in [
            "/",
            "/api/v1/account",
            "/api/v1/account/",
            "/a/b:c@d/e~f",
            "/files/%20x",
            "/x/%C3%A9t%C3%A9",
        ] {
            assert!(matches!(canonicalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn escapes_of_path_characters_are_decoded_others_uppercased() {
        assert_eq!(ok("/api/v1/account/%62alance"), "/api/v1/account/balance");
        assert_eq!(
            ok("/api/v1/account/%62%61%6C%61%6e%63%65"),
            "/api/v1/account/balance"
        );
        assert_eq!(ok("/items%3Abatch"), "/items:batch");
        assert_eq!(ok("/a%7e%2D%5f"), "/a~-_");
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/a%3fb%23c"), "/a%3Fb%23c");
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
        // Raw characters that may not stand in a path are escaped.
        assert_eq!(ok("/a\"b{c}|d"), "/a%22b%7Bc%7D%7Cd");
        assert_eq!(ok("/100%25"), "/100%25");
    }

    #[test]
    fn repeated_slashes_are_merged() {
        assert_eq!(ok("//api///v1//account"), "/api/v1/account");
        assert_eq!(ok("/api/v1/account//"), "/api/v1/account/");
        assert_eq!(ok("//"), "/");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases: &[(&str, PathError)] = &[
            ("api", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("/health/../admin", PathError::DotSegment),
            ("/health/%2e%2E/admin", PathError::DotSegment),
            ("/health/./x", PathError::DotSegment),
            ("/a/.%2E/b", PathError::DotSegment),
            ("/a/%2e", PathError::DotSegment),
            ("/a/..", PathError::DotSegment),
            ("/health/..;/api/v1/trades", PathError::Semicolon),
            ("/health/%2e%2e;/api", PathError::Semicolon),
            ("/health/..%3b/api", PathError::Semicolon),
            ("/api;jsessionid=1", PathError::Semicolon),
            ("/health/..%2fadmin", PathError::EncodedSeparator),
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/health\\..\\admin", PathError::Backslash),
            ("/a%00b", PathError::ControlCharacter),
            ("/a%0d%0aX: y", PathError::ControlCharacter),
            ("/a%7f", PathError::ControlCharacter),
            ("/a%", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/a%u0062", PathError::BadEscape),
            ("/a%2562alance", PathError::DoubleEncoded),
            ("/help%25u002f..%25u002fbalance", PathError::DoubleEncoded),
            ("/a%25U0062", PathError::DoubleEncoded),
            ("/a%25%36%32alance", PathError::DoubleEncoded),
            ("/a%%36%32", PathError::BadEscape),
            ("/api/v1/account/balance.", PathError::TrailingDotOrBlank),
            ("/api/v1/account/balance%2e", PathError::TrailingDotOrBlank),
            ("/api/v1/account/balance%20", PathError::TrailingDotOrBlank),
            ("/api/v1/account/balance%20/x", PathError::TrailingDotOrBlank),
            ("/files/...", PathError::TrailingDotOrBlank),
            ("/a/%C0%AF", PathError::NotUtf8),
            ("/a/%e9", PathError::NotUtf8),
            ("/a/%C3", PathError::NotUtf8),
            ("/a/%C3x", PathError::NotUtf8),
            ("/a/%C3%A9%A9", PathError::NotUtf8),
            ("/a/é", PathError::NotUtf8),
        ];
        for (raw, want) in cases {
            assert_eq!(canonicalize(raw), Err(*want), "{raw:?}");
        }
        // Dots inside a segment are fine.
        assert_eq!(ok("/api/v1/trades/1.5"), "/api/v1/trades/1.5");
        assert_eq!(ok("/files/...hidden"), "/files/...hidden");
        assert_eq!(ok("/.well-known/jwks.json"), "/.well-known/jwks.json");
        assert_eq!(ok("/a/%F0%9F%98%80/b"), "/a/%F0%9F%98%80/b");
    }

    /// Every path that passes is a fixed point, decodes to what the raw path decodes to (modulo
    /// merged slashes), and any spelling of the same bytes canonicalises the same way.
    #[test]
    fn canonical_form_is_a_function_of_the_decoded_bytes() {
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let alphabet: &[&str] = &[
            "/", "//", "a", "B", "%62", "%42", "%2e", ".", "%3a", ":", "%20", "%25", "%c3%a9", "%C3", "%a9",
            "~", "%7E", "\"", "%22", "-", "@", "%40", "+", "%2B", "%3F", "%23", "x.y",
        ];
        for _ in 0..20_000 {
            let len = 1 + (next() % 8) as usize;
            let mut p = String::from("/");
            for _ in 0..len {
                p.push_str(alphabet[(next() % alphabet.len() as u64) as usize]);
            }
            let Ok(c) = canonicalize(&p) else { continue };
            assert_eq!(canonicalize(&c).unwrap(), c, "not a fixed point: {p:?} -> {c:?}");
            let merge = |v: Vec<u8>| {
                let mut o: Vec<u8> = Vec::new();
                for x in v {
                    if !(x == b'/' && o.last() == Some(&b'/')) {
                        o.push(x);
                    }
                }
                o
            };
            // The raw path's '/' are all raw (encoded ones are refused), so decoding commutes
            // with merging.
            assert_eq!(merge(decode(&p)), decode(&c), "{p:?} -> {c:?}");
            // Re-spell every byte as an escape: same canonical form.
            let respelled: String = decode(&c)
                .iter()
                .map(|&x| {
                    if x == b'/' {
                        "/".to_string()
                    } else {
                        format!("%{x:02x}")
                    }
                })
                .collect();
            assert_eq!(canonicalize(&respelled).unwrap(), c, "{respelled:?}");
        }
    }
}
