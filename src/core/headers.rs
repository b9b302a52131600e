//! Which incoming request headers never reach the upstream, whatever the verdict: the ones the
//! sidecar itself speaks for (identity, request id, forwarding chain). Pure, shared by every
//! front end that forwards.
//!
//! Names are compared after reading `_` as `-` and ignoring ASCII case, because CGI, PHP and
//! several WSGI servers map `X_Permiso_Scopes` and `X-Permiso-Scopes` to the same variable
//! (`HTTP_X_PERMISO_SCOPES`): a caller must not be able to pass an identity under the other
//! spelling.

/// Prefix of every identity header the sidecar sets.
pub const IDENTITY_PREFIX: &str = "x-permiso-";

/// Headers, other than `x-permiso-*`, whose value the sidecar sets itself.
const OWN: [&str; 4] = ["x-request-id", "x-forwarded-for", "forwarded", "x-real-ip"];

fn eq_dashed(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(&x, &y)| {
            let x = if x == b'_' { b'-' } else { x.to_ascii_lowercase() };
            x == y
        })
}

/// True for a name that, read as a CGI server reads it, is an `X-Permiso-*` header.
pub fn is_identity(name: &str) -> bool {
    let n = name.as_bytes();
    n.len() >= IDENTITY_PREFIX.len() && eq_dashed(&n[..IDENTITY_PREFIX.len()], IDENTITY_PREFIX.as_bytes())
}

/// True for a name the caller may not send to the upstream under any spelling: identity
/// headers, and the forwarding headers the sidecar sets from the TCP peer. `x-request-id` in
/// its exact spelling is the caller's to propose (it is kept when well-formed): only its
/// underscore spellings are dropped here.
pub fn is_reserved(name: &str) -> bool {
    if is_identity(name) {
        return true;
    }
    let n = name.as_bytes();
    OWN.iter().any(|own| {
        eq_dashed(n, own.as_bytes()) && !(*own == "x-request-id" && n.eq_ignore_ascii_case(own.as_bytes()))
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
        assert_eq!(one(&[]), None);
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
        ] {
            assert!(is_reserved(n), "{n}");
        }
        for n in [
            "x-request-id",
            "X-Request-Id",
            "x-permiso",
            "x-permisos-a",
            "authorization",
            "x-forwarded-proto",
            "content-type",
        ] {
            assert!(!is_reserved(n), "{n}");
        }
    }
}
