//! A client certificate as a credential: the identities a verified certificate carries, and
//! how they are spelled. One identity is a SPIFFE ID taken from a URI SAN
//! (`spiffe://permiso/mt5-api`) or a DNS SAN written `dns:mt5.internal`; never a subject
//! string. The admin plane stores identities in this canonical form and the sidecar reads
//! certificates into it, so both sides compare the same strings.

/// What the transport read from a verified client certificate (the TLS stack has checked
/// the chain; this only carries what it proved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Canonical identities of the certificate's SANs, in certificate order; SANs that are
    /// not identities (other URI schemes, IP addresses, malformed names) are left out.
    pub identities: Vec<String>,
    /// RFC 8705 `x5t#S256`: base64url (no padding) of the SHA-256 of the certificate's DER.
    pub x5t_s256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("an identity is spiffe://<trust domain>/<path> or dns:<name>")]
    Scheme,
    #[error("the SPIFFE trust domain must be lower-case letters, digits, '.', '-' and '_'")]
    TrustDomain,
    #[error("each SPIFFE path segment must be letters, digits, '.', '-' and '_' (no '.' or '..' segments)")]
    Path,
    #[error("the DNS name must be labels of letters, digits and '-' separated by '.'")]
    DnsName,
    #[error("an identity is at most 2048 characters")]
    TooLong,
}

const MAX_LEN: usize = 2048;

/// The canonical spelling of an identity, or why it is not one. The SPIFFE scheme and
/// trust domain and a DNS name are case-insensitive and written in lower case; a SPIFFE path
/// is case-sensitive and kept as written.
pub fn canonical_identity(s: &str) -> Result<String, IdentityError> {
    if s.len() > MAX_LEN {
        return Err(IdentityError::TooLong);
    }
    // `get`, not indexing: a multi-byte character across the prefix's end is no prefix.
    let lower_prefix = |p: &str| s.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
    if lower_prefix("spiffe://") {
        let rest = &s["spiffe://".len()..];
        let (domain, path) = rest.split_once('/').ok_or(IdentityError::Path)?;
        let domain = domain.to_ascii_lowercase();
        if domain.is_empty()
            || !domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(IdentityError::TrustDomain);
        }
        for seg in path.split('/') {
            let ok = !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !ok {
                return Err(IdentityError::Path);
            }
        }
        return Ok(format!("spiffe://{domain}/{path}"));
    }
    if lower_prefix("dns:") {
        return dns_identity(&s["dns:".len()..]);
    }
    Err(IdentityError::Scheme)
}

/// `dns:<name>` for a DNS SAN.
pub fn dns_identity(name: &str) -> Result<String, IdentityError> {
    let name = name.to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(format!("dns:{name}"))
    } else {
        Err(IdentityError::DnsName)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_have_one_spelling() {
        for (given, canonical) in [
            ("spiffe://permiso/mt5-api", "spiffe://permiso/mt5-api"),
            (
                "SPIFFE://Permiso.Example/ns/prod/sa/MT5",
                "spiffe://permiso.example/ns/prod/sa/MT5",
            ),
            ("dns:mt5.internal", "dns:mt5.internal"),
            ("DNS:MT5.Internal", "dns:mt5.internal"),
        ] {
            assert_eq!(canonical_identity(given).as_deref(), Ok(canonical), "{given}");
            // Canonical forms are fixed points.
            assert_eq!(canonical_identity(canonical).as_deref(), Ok(canonical));
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for (bad, why) in [
            ("CN=mt5", IdentityError::Scheme),
            ("https://permiso/mt5", IdentityError::Scheme),
            ("mt5.internal", IdentityError::Scheme),
            ("spiffe://permiso", IdentityError::Path),
            ("spiffe://permiso/", IdentityError::Path),
            ("spiffe://permiso/a//b", IdentityError::Path),
            ("spiffe://permiso/a/../b", IdentityError::Path),
            ("spiffe://permiso/a?b", IdentityError::Path),
            ("spiffe://permiso/a%2Fb", IdentityError::Path),
            ("spiffe:///mt5", IdentityError::TrustDomain),
            ("spiffe://per miso/mt5", IdentityError::TrustDomain),
            ("spiffe://user@permiso/mt5", IdentityError::TrustDomain),
            ("spiffe://permiso:443/mt5", IdentityError::TrustDomain),
            ("dns:", IdentityError::DnsName),
            ("dns:-mt5.internal", IdentityError::DnsName),
            ("dns:mt5..internal", IdentityError::DnsName),
            ("dns:*.internal", IdentityError::DnsName),
            ("dns:mt5_api.internal", IdentityError::DnsName),
            // Multi-byte characters, also where a prefix would end: refused, never a panic.
            ("spiffe:/é/x", IdentityError::Scheme),
            ("dnsé", IdentityError::Scheme),
            ("spiffe://pérmiso/x", IdentityError::TrustDomain),
            ("spiffe://permiso/é", IdentityError::Path),
            ("dns:mt5.ïnternal", IdentityError::DnsName),
        ] {
            assert_eq!(canonical_identity(bad), Err(why), "{bad}");
        }
        let long = format!("spiffe://permiso/{}", "a".repeat(MAX_LEN));
        assert_eq!(canonical_identity(&long), Err(IdentityError::TooLong));
        assert_eq!(
            dns_identity(&format!("{}.x", "a".repeat(64))),
            Err(IdentityError::DnsName)
        );
    }
}
