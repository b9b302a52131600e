//! What the sidecar changes in a request it forwards and in the answer it returns, on pingora's
//! header types: the canonical target, body framing, hop-by-hop headers, the forwarding chain,
//! the identity headers, the request id, the RateLimit headers, and the JSON error answers.
//! Pure functions of the header and the verdict; the transport (`h1`) calls them.

use http::header::{self, HeaderName};
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, ErrorType, Result};

use crate::config::ForwardedFor;
use crate::core::decision::{Credential, Verdict};
use crate::core::denial::DenialResponse;
use crate::core::headers;

/// The request id header, exact spelling: the caller's proposal, and what we send both ways.
pub const X_REQUEST_ID: &str = "X-Request-Id";
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Sets the forwarded request-target to `path` (canonical) and the received query.
fn set_target(upstream: &mut RequestHeader, path: &str) -> Result<()> {
    let target = match upstream.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let uri = http::Uri::builder()
        .path_and_query(target)
        .build()
        .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "canonical path", e))?;
    upstream.set_uri(uri);
    Ok(())
}

/// The upstream reads exactly the path that was routed: the canonical one (when it differs
/// from the received one), in origin-form (an absolute-form target is otherwise kept verbatim
/// by pingora's serialiser).
pub fn set_canonical_target(upstream: &mut RequestHeader, rewritten: Option<&str>) -> Result<()> {
    match rewritten {
        Some(p) => set_target(upstream, p),
        None if upstream.raw_path()
            != upstream
                .uri
                .path_and_query()
                .map_or(&b""[..], |p| p.as_str().as_bytes()) =>
        {
            let p = upstream.uri.path().to_string();
            set_target(upstream, &p)
        }
        None => Ok(()),
    }
}

/// Framing: one Content-Length value, never a list (pingora's server already framed the body
/// by the reconciled value and refused conflicting ones), and none beside Transfer-Encoding
/// (RFC 9112 §6.3: a proxy removes it).
pub fn frame_body(upstream: &mut RequestHeader) -> Result<()> {
    if upstream.headers.contains_key(header::TRANSFER_ENCODING) {
        upstream.remove_header(&header::CONTENT_LENGTH);
        return Ok(());
    }
    let mut cl = upstream.headers.get_all(header::CONTENT_LENGTH).iter();
    let listed = match (cl.next(), cl.next()) {
        (Some(first), None) => first.as_bytes().contains(&b','),
        (Some(_), Some(_)) => true,
        (None, _) => false,
    };
    if listed {
        let values = upstream
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .map(|v| v.as_bytes());
        let n = headers::single_content_length(values)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(400), "conflicting Content-Length"))?;
        upstream.insert_header("Content-Length", n.to_string())?;
    }
    Ok(())
}

/// Headers that name this connection only (RFC 9110 §7.6.1), never forwarded: the upstream
/// connection is ours, kept alive on our terms. `Upgrade` (with `Connection: upgrade`) stays
/// on an upgrade request, which is forwarded as one. `Proxy-Authorization` is meant for this
/// proxy, never for the service behind it.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
];

/// Names a caller may list in `Connection` without them being dropped: dropping them would
/// change the message's framing or target, not just its hop-by-hop options.
fn must_stay(name: &[u8]) -> bool {
    [&b"content-length"[..], b"transfer-encoding", b"host"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
}

/// Drops the hop-by-hop headers and every header the caller's `Connection` names (RFC 9110
/// §7.6.1). Called before the sidecar adds its own headers, so a `Connection:
/// X-Permiso-Service-Id` cannot remove what the sidecar sets.
pub fn strip_hop_by_hop(upstream: &mut RequestHeader, upgrade: bool) {
    // One lookup on the usual request, which has none of these.
    if !HOP_BY_HOP.iter().any(|h| upstream.headers.contains_key(h))
        && !upstream.headers.contains_key(header::UPGRADE)
    {
        return;
    }
    let named: Vec<HeaderName> = upstream
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty() && !must_stay(t))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        upstream.remove_header(n);
    }
    if upgrade {
        let _ = upstream.insert_header("Connection", HeaderValue::from_static("upgrade"));
    } else {
        upstream.remove_header(&header::UPGRADE);
    }
}

/// The peer's address as text, without the formatting machinery for the usual IPv4 case.
fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if *o >= 100 {
                    s.push((b'0' + o / 100) as char);
                }
                if *o >= 10 {
                    s.push((b'0' + o / 10 % 10) as char);
                }
                s.push((b'0' + o % 10) as char);
            }
            s
        }
        std::net::IpAddr::V6(v6) => v6.to_string(),
    }
}

/// `for=` value of RFC 7239: IPv6 addresses quoted and bracketed.
fn forwarded_node(ip: std::net::IpAddr, text: &str) -> String {
    match ip {
        std::net::IpAddr::V4(_) => ["for=", text].concat(),
        std::net::IpAddr::V6(_) => ["for=\"[", text, "]\""].concat(),
    }
}

/// Drops every header the caller may not send upstream (identity and forwarding headers, in
/// any spelling), then sets the forwarding chain from the TCP peer.
pub fn set_forwarding(
    upstream: &mut RequestHeader,
    peer: Option<std::net::IpAddr>,
    mode: ForwardedFor,
) -> Result<()> {
    let (mut xff, mut fwd) = (None, None);
    if mode == ForwardedFor::Append {
        let join = |name: &str| {
            let v: Vec<&str> = upstream
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!v.is_empty()).then(|| v.join(", "))
        };
        (xff, fwd) = (join("x-forwarded-for"), join("forwarded"));
    }
    // One scan; allocation only when a caller sent something to drop.
    if upstream.headers.keys().any(|n| headers::is_reserved(n.as_str())) {
        let drop: Vec<HeaderName> = upstream
            .headers
            .keys()
            .filter(|n| headers::is_reserved(n.as_str()))
            .cloned()
            .collect();
        for name in drop {
            upstream.remove_header(&name);
        }
    }
    if let Some(ip) = peer {
        let ip_s = ip_text(ip);
        let node = forwarded_node(ip, &ip_s);
        let xff = match xff {
            Some(chain) => format!("{chain}, {ip_s}"),
            None => ip_s,
        };
        let fwd = match fwd {
            Some(chain) => format!("{chain}, {node}"),
            None => node,
        };
        upstream.insert_header("X-Forwarded-For", xff)?;
        upstream.insert_header("Forwarded", fwd)?;
    }
    Ok(())
}

/// Who called, for the upstream; and no credential the upstream should not see. A credential
/// sent to a public route does not leak upstream unless the route says so.
pub fn set_identity(upstream: &mut RequestHeader, verdict: &Verdict) -> Result<()> {
    match verdict {
        Verdict::Allowed {
            principal,
            cert_identity,
            ..
        } => {
            upstream.remove_header(&header::AUTHORIZATION);
            if let Some(identity) = cert_identity {
                upstream.insert_header("X-Permiso-Client-Cert-Identity", identity.clone())?;
            }
            let s = &principal.service;
            // Prebuilt values: each insert clones a reference count.
            upstream.insert_header("X-Permiso-Service-Id", s.id_header.clone())?;
            upstream.insert_header("X-Permiso-Service-Name", s.name_header.clone())?;
            upstream.insert_header("X-Permiso-Scopes", principal.scopes_header().clone())?;
            match &principal.credential {
                Credential::ApiKey { key_id, .. } => upstream.insert_header("X-Permiso-Key-Id", &**key_id)?,
                Credential::AccessToken(t) => upstream.insert_header("X-Permiso-Token-Id", t.jti_header.clone())?,
                // The identity is in X-Permiso-Client-Cert-Identity.
                Credential::ClientCert { .. } => {}
            }
            let env = HeaderValue::from_static(s.environment.as_str());
            upstream.insert_header("X-Permiso-Environment", env)?;
        }
        Verdict::Public {
            forward_authorization: true,
        } => {}
        Verdict::Public { .. } => {
            upstream.remove_header(&header::AUTHORIZATION);
        }
    }
    Ok(())
}

/// Everything above, in the order that makes it safe: framing and target first, then the
/// caller's hop-by-hop and reserved headers dropped, then the sidecar's own set.
pub fn rewrite_request(
    upstream: &mut RequestHeader,
    rewritten_path: Option<&str>,
    verdict: &Verdict,
    request_id: &HeaderValue,
    peer: Option<std::net::IpAddr>,
    mode: ForwardedFor,
    upgrade: bool,
) -> Result<()> {
    set_canonical_target(upstream, rewritten_path)?;
    frame_body(upstream)?;
    strip_hop_by_hop(upstream, upgrade);
    set_forwarding(upstream, peer, mode)?;
    upstream.insert_header(X_REQUEST_ID, request_id.clone())?;
    set_identity(upstream, verdict)
}

/// The request id, and the caller's RateLimit state when its service has limits.
pub fn decorate_response(response: &mut ResponseHeader, request_id: &HeaderValue, verdict: &Verdict) -> Result<()> {
    response.insert_header(X_REQUEST_ID, request_id.clone())?;
    if let Verdict::Allowed { principal, rate, .. } = verdict {
        if let Some(value) = rate.header() {
            match &rate.applied {
                // A share of the limit, counted here while Redis is out of reach.
                Some(l) => response.insert_header("RateLimit-Policy", l.policy_header())?,
                None => response.insert_header("RateLimit-Policy", principal.service.policy_header.clone())?,
            }
            response.insert_header("RateLimit", value)?;
        }
    }
    Ok(())
}

/// The head of one of core's JSON answers (a denial or a proxy failure); its body is `r.body`.
pub fn json_head(r: &DenialResponse, request_id: &HeaderValue) -> Result<ResponseHeader> {
    let mut h = ResponseHeader::build(r.status, Some(5 + r.headers.len()))?;
    h.insert_header(X_REQUEST_ID, request_id.clone())?;
    h.insert_header("Content-Type", HeaderValue::from_static("application/json"))?;
    h.insert_header("Content-Length", r.body.len())?;
    h.insert_header("Cache-Control", HeaderValue::from_static("no-store"))?;
    for (name, value) in &r.headers {
        h.insert_header(*name, value.as_str())?;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_render_as_the_standard_library_does() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.1.9",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        assert_eq!(forwarded_node(v6, &ip_text(v6)), "for=\"[::1]\"");
    }

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut r = request(&[
            ("Connection", "close, X-Secret-Option, Content-Length"),
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5"),
            ("X-Secret-Option", "1"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Upgrade", "websocket"),
            ("Content-Length", "0"),
            ("Accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut r, false);
        let names: Vec<&str> = r.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-length", "accept"]);
        // The serialised head agrees with the map (pingora keeps a second, case-preserving one).
        let mut wire = bytes::BytesMut::new();
        r.header_to_h1_wire(&mut wire);
        assert_eq!(&wire[..], b"Content-Length: 0\r\nAccept: */*\r\n");
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_says_so_in_connection() {
        let mut r = request(&[("Connection", "Upgrade, X-Other"), ("Upgrade", "websocket"), ("X-Other", "1")]);
        strip_hop_by_hop(&mut r, true);
        assert_eq!(r.headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(r.headers.get("connection").unwrap(), "upgrade");
        assert!(r.headers.get("x-other").is_none());
    }
}
