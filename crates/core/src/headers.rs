//! Which incoming request headers never reach the upstream, whatever the verdict: the ones the
//! sidecar itself speaks for (identity, request id, forwarding chain), and the ones that make
//! an upstream read another URL or method than the one the sidecar judged. Pure, shared by
//! every front end that forwards.
//!
//! Names are compared after reading every character other than a letter or a digit as `-`
//! and ignoring ASCII case, because CGI, PHP and several WSGI servers map `X_Permiso_Scopes`,
//! `X.Permiso.Scopes` and `X-Permiso-Scopes` to the same variable (`HTTP_X_PERMISO_SCOPES`): a
//! caller must not be able to pass one under another spelling.

/// Prefix of every identity header the sidecar sets.
pub const IDENTITY_PREFIX: &str = "x-permiso-";

/// Prefixes of header families the caller may not send (after normalisation).
const RESERVED_PREFIXES: [&str; 2] = [IDENTITY_PREFIX, "x-forwarded-"];

/// Single headers the caller may not send (after normalisation): the forwarding chain the
/// sidecar sets from the TCP peer, other client-address headers upstream middleware trusts,
/// URL rewrites (IIS, Symfony) and method overrides (Rails, Laravel, Express), which would make
/// the upstream run another route or method than the one judged.
const RESERVED: [&str; 12] = [
    "x-request-id",
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

fn norm(b: u8) -> u8 {
    if b.is_ascii_alphanumeric() {
        b.to_ascii_lowercase()
    } else {
        b'-'
    }
}

fn starts_normalised(name: &[u8], prefix: &[u8]) -> bool {
    name.len() >= prefix.len() && name.iter().zip(prefix).all(|(&x, &y)| norm(x) == y)
}

fn eq_normalised(name: &[u8], other: &[u8]) -> bool {
    name.len() == other.len() && starts_normalised(name, other)
}

/// True for a name the caller may not send to the upstream under any spelling.
/// `x-request-id` in its exact spelling is the caller's to propose (it is kept when
/// well-formed): only its other spellings are dropped here.
pub fn is_reserved(name: &str) -> bool {
    let n = name.as_bytes();
    // Every reserved name starts with one of these (after normalisation): most headers
    // (Host, Accept, Authorization, Content-Type…) are ruled out by their first byte.
    if !matches!(n.first().map(|&b| norm(b)), Some(b'x' | b'f' | b't' | b'c')) {
        return false;
    }
    if RESERVED_PREFIXES
        .iter()
        .any(|p| starts_normalised(n, p.as_bytes()))
    {
        return true;
    }
    RESERVED.iter().any(|r| {
        eq_normalised(n, r.as_bytes()) && !(*r == "x-request-id" && n.eq_ignore_ascii_case(r.as_bytes()))
    })
}

/// The one length a list of `Content-Length` values (several header lines, comma lists) stands
/// for: `Some` only when every value is digits and all are equal (RFC 9110 §8.6); the upstream
/// then gets that single value, never the list, which servers read differently.
pub fn single_content_length<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<u64> {
    let mut n: Option<u64> = None;
    for line in values {
        for v in line.split(|&b| b == b',') {
            let v = v.trim_ascii();
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 19 {
                return None;
            }
            let x: u64 = std::str::from_utf8(v).ok()?.parse().ok()?;
            match n {
                Some(prev) if prev != x => return None,
                _ => n = Some(x),
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_lists_collapse_only_when_identical() {
        let one = |v: &[&str]| single_content_length(v.iter().map(|s| s.as_bytes()));
        assert_eq!(one(&["5"]), Some(5));
        assert_eq!(one(&["5, 5"]), Some(5));
        assert_eq!(one(&["5", "5,5"]), Some(5));
        assert_eq!(one(&["5, 6"]), None);
        assert_eq!(one(&["5", "6"]), None);
        assert_eq!(one(&["+5"]), None);
        assert_eq!(one(&["5,"]), None);
        assert_eq!(one(&["0x5"]), None);
        assert_eq!(one(&["99999999999999999999"]), None);
        // At most 19 digits, even when 20 would still fit a u64.
        assert_eq!(one(&["1000000000000000000"]), Some(1_000_000_000_000_000_000));
        assert_eq!(one(&["10000000000000000000"]), None);
        assert_eq!(one(&[]), None);
    }

    #[test]
    fn the_first_byte_filter_admits_every_reserved_name() {
        for n in RESERVED_PREFIXES.iter().chain(RESERVED.iter()) {
            assert!(matches!(norm(n.as_bytes()[0]), b'x' | b'f' | b't' | b'c'), "{n}");
        }
    }

    #[test]
    fn every_spelling_of_an_identity_header_is_reserved() {
        for n in [
            "x-permiso-service-id",
            "X-Permiso-Scopes",
            "X_Permiso_Service_Id",
            "x-permiso_scopes",
            "X_PERMISO_TRUSTED",
            "x-permiso-",
            "x_forwarded_for",
            "X-Forwarded-For",
            "forwarded",
            "x-real-ip",
            "X_Real_IP",
            "x_request_id",
            "X-Request_Id",
            "X.Permiso.Scopes",
            "x~permiso~service~id",
            "X-Forwarded-Host",
            "X-Forwarded-Prefix",
            "x-forwarded-proto",
            "X-Original-URL",
            "X-Rewrite-Url",
            "True-Client-IP",
            "X-Client-IP",
            "CF-Connecting-IP",
            "X-HTTP-Method-Override",
            "X-Http-Method",
            "x_method_override",
        ] {
            assert!(is_reserved(n), "{n}");
        }
        for n in [
            "x-request-id",
            "X-Request-Id",
            "x-permiso",
            "x-permisos-a",
            "authorization",
            "content-type",
            "x-forwarded",
            "accept",
        ] {
            assert!(!is_reserved(n), "{n}");
        }
    }
}
