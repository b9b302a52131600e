//! Reads a verified client certificate into `core::peer::PeerCert` once per connection (at
//! the end of the handshake, stored in pingora's TLS digest), so the request path only
//! compares strings: its SPIFFE URI SANs and DNS SANs in canonical form, and its RFC 8705
//! `x5t#S256` thumbprint.

use std::any::Any;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::core::peer::{canonical_identity, dns_identity, PeerCert};

/// The identities and thumbprint of a certificate (DER). SANs that are not identities are
/// skipped; a certificate that cannot be parsed (the TLS stack verified it, so this is not
/// expected) yields no identity, only its thumbprint.
pub fn read_peer_cert(der: &[u8]) -> PeerCert {
    let x5t_s256 = URL_SAFE_NO_PAD.encode(Sha256::digest(der));
    let mut identities = Vec::new();
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                let id = match name {
                    x509_parser::extensions::GeneralName::URI(u) => canonical_identity(u).ok(),
                    x509_parser::extensions::GeneralName::DNSName(d) => dns_identity(d).ok(),
                    _ => None,
                };
                if let Some(id) = id.filter(|i| !identities.contains(i)) {
                    identities.push(id);
                }
            }
        }
    }
    PeerCert { identities, x5t_s256 }
}

/// pingora's end-of-handshake hook: attaches the `PeerCert` of the client certificate, if
/// one was presented, to the connection's TLS digest.
pub struct PeerCertCallback;

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for PeerCertCallback {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let der = tls.peer_certificate_der()?;
        Some(Arc::new(read_peer_cert(der)))
    }
}
