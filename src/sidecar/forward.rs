//! What the sidecar changes in a request it forwards and in the answer it returns: the
//! canonical target, body framing, hop-by-hop headers, the forwarding chain, the identity
//! headers, the request id, the RateLimit headers, and the JSON error answers. Pure functions
//! of the head and the verdict; the transport (`h1`) calls them.
//!
//! They work on `http`'s request and response parts with prebuilt header names: pingora's
//! `insert_header` parses the name again on every call and keeps a second, case-preserving
//! map beside the values (an allocation and two map inserts per header). The heads sent on are
//! built without that map, so header names go out in their canonical spelling (standard names
//! title-cased, the others lower-case), as Envoy's HTTP/1 codec does; names are
//! case-insensitive (RFC 9110 §5.1).

use http::header::{self, HeaderName};
use http::request::Parts as ReqParts;
use http::response::Parts as RespParts;
use http::HeaderValue;
use pingora::{Error, ErrorType, Result};

use crate::config::ForwardedFor;
use crate::core::decision::{Credential, Pass, Verdict};
use crate::core::denial::DenialResponse;
use crate::core::headers;

/// The request id: the caller's proposal, and what we send both ways.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const SERVICE_ID: HeaderName = HeaderName::from_static("x-permiso-service-id");
const SERVICE_NAME: HeaderName = HeaderName::from_static("x-permiso-service-name");
const SCOPES: HeaderName = HeaderName::from_static("x-permiso-scopes");
const KEY_ID: HeaderName = HeaderName::from_static("x-permiso-key-id");
const TOKEN_ID: HeaderName = HeaderName::from_static("x-permiso-token-id");
const CERT_IDENTITY: HeaderName = HeaderName::from_static("x-permiso-client-cert-identity");
const ENVIRONMENT: HeaderName = HeaderName::from_static("x-permiso-environment");
const TRUSTED: HeaderName = HeaderName::from_static("x-permiso-trusted");
const SHADOW_DENIAL: HeaderName = HeaderName::from_static("x-permiso-shadow-denial");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

fn value(s: String) -> Result<HeaderValue> {
    HeaderValue::try_from(s).map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "header value", e))
}

/// The upstream reads exactly the path that was routed: the canonical one when it differs
/// from the received one, and the received query, in origin-form (also for a request that
/// came in absolute-form). The head is serialised from this URI.
pub fn set_canonical_target(upstream: &mut ReqParts, rewritten: Option<&str>) -> Result<()> {
    // An absolute-form target ("http://host", with or without a path) goes on as its path.
    let absolute = upstream.uri.scheme().is_some() || upstream.uri.authority().is_some();
    let path = match rewritten {
        Some(p) => p,
        None if absolute => upstream.uri.path(),
        None => return Ok(()),
    };
    let target = match upstream.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    upstream.uri = http::Uri::builder()
        .path_and_query(target)
        .build()
        .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "canonical path", e))?;
    Ok(())
}

/// Framing: one Content-Length value, never a list (pingora's server already framed the body
/// by the reconciled value and refused conflicting ones), and none beside Transfer-Encoding
/// (RFC 9112 §6.3: a proxy removes it).
pub fn frame_body(upstream: &mut ReqParts) -> Result<()> {
    if upstream.headers.contains_key(header::TRANSFER_ENCODING) {
        upstream.headers.remove(header::CONTENT_LENGTH);
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
        upstream
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
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
pub fn strip_hop_by_hop(upstream: &mut ReqParts, upgrade: bool) {
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
        upstream.headers.remove(n);
    }
    if upgrade {
        upstream
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        upstream.headers.remove(header::UPGRADE);
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
    upstream: &mut ReqParts,
    peer: Option<std::net::IpAddr>,
    mode: ForwardedFor,
) -> Result<()> {
    let (mut xff, mut fwd) = (None, None);
    if mode == ForwardedFor::Append {
        let join = |name: &HeaderName| {
            let v: Vec<&str> = upstream
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!v.is_empty()).then(|| v.join(", "))
        };
        (xff, fwd) = (join(&X_FORWARDED_FOR), join(&FORWARDED));
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
            upstream.headers.remove(&name);
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
        upstream.headers.insert(X_FORWARDED_FOR, value(xff)?);
        upstream.headers.insert(FORWARDED, value(fwd)?);
    }
    Ok(())
}

/// Who called, for the upstream; and no credential the upstream should not see. A credential
/// sent to a public route does not leak upstream unless the route says so.
pub fn set_identity(upstream: &mut ReqParts, verdict: &Verdict) -> Result<()> {
    let h = &mut upstream.headers;
    match verdict {
        Verdict::Allowed {
            principal,
            cert_identity,
            ..
        } => {
            h.remove(header::AUTHORIZATION);
            if let Some(identity) = cert_identity {
                h.insert(CERT_IDENTITY, identity.clone());
            }
            let s = &principal.service;
            // Prebuilt values: each insert clones a reference count.
            h.insert(SERVICE_ID, s.id_header.clone());
            h.insert(SERVICE_NAME, s.name_header.clone());
            h.insert(SCOPES, principal.scopes_header().into_owned());
            match &principal.credential {
                Credential::ApiKey { key_id, .. } => {
                    let v = HeaderValue::from_str(key_id)
                        .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "key id", e))?;
                    h.insert(KEY_ID, v);
                }
                Credential::AccessToken(t) => {
                    h.insert(TOKEN_ID, t.jti_header.clone());
                }
                // The identity is in X-Permiso-Client-Cert-Identity.
                Credential::ClientCert { .. } => {}
            }
            h.insert(ENVIRONMENT, HeaderValue::from_static(s.environment.as_str()));
            h.insert(
                TRUSTED,
                HeaderValue::from_static(if principal.trusted() { "true" } else { "false" }),
            );
        }
        Verdict::Public {
            forward_authorization: true,
        } => {}
        Verdict::Public { .. } => {
            h.remove(header::AUTHORIZATION);
        }
    }
    Ok(())
}

/// Everything above, in the order that makes it safe: framing and target first, then the
/// caller's hop-by-hop and reserved headers dropped, then the sidecar's own set.
pub fn rewrite_request(
    upstream: &mut ReqParts,
    pass: &Pass,
    request_id: &HeaderValue,
    peer: Option<std::net::IpAddr>,
    mode: ForwardedFor,
    upgrade: bool,
) -> Result<()> {
    set_canonical_target(upstream, pass.rewritten_path.as_deref())?;
    frame_body(upstream)?;
    strip_hop_by_hop(upstream, upgrade);
    set_forwarding(upstream, peer, mode)?;
    upstream.headers.insert(REQUEST_ID, request_id.clone());
    if let Some(d) = &pass.shadow {
        // A reason is a static lower-case token, always a valid header value.
        upstream
            .headers
            .insert(SHADOW_DENIAL, HeaderValue::from_static(d.reason()));
    }
    set_identity(upstream, &pass.verdict)
}

/// The request id, and the caller's RateLimit state when its service has limits.
pub fn decorate_response(
    response: &mut RespParts,
    request_id: &HeaderValue,
    verdict: &Verdict,
) -> Result<()> {
    let h = &mut response.headers;
    h.insert(REQUEST_ID, request_id.clone());
    if let Verdict::Allowed { principal, rate, .. } = verdict {
        if let Some(v) = rate.header() {
            let policy = match &rate.applied {
                // A share of the limit, counted here while Redis is out of reach.
                Some(l) => value(l.policy_header())?,
                None => principal.service.policy_header.clone(),
            };
            h.insert(RATELIMIT_POLICY, policy);
            h.insert(RATELIMIT, value(v)?);
        }
    }
    Ok(())
}

/// The head of one of core's JSON answers (a denial or a proxy failure); its body is `r.body`.
pub fn json_head(r: &DenialResponse, request_id: &HeaderValue) -> Result<RespParts> {
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = http::StatusCode::from_u16(r.status)
        .map_err(|e| Error::because(ErrorType::InternalError, "status", e))?;
    let h = &mut parts.headers;
    h.reserve(5 + r.headers.len());
    // None from the bare passthrough.
    if !request_id.is_empty() {
        h.insert(REQUEST_ID, request_id.clone());
    }
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.body.len()));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for (name, v) in &r.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| Error::because(ErrorType::InternalError, "header name", e))?;
        h.insert(name, value(v.clone())?);
    }
    Ok(parts)
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

    fn request(headers: &[(&str, &str)]) -> ReqParts {
        let mut r = http::Request::get("/x").body(()).unwrap().into_parts().0;
        for (n, v) in headers {
            r.headers
                .append(HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
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
        let mut names: Vec<&str> = r.headers.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["accept", "content-length"]);
        // What goes on the wire (a removal may reorder fields of different names; standard
        // names are title-cased, the others lower-case).
        let mut wire = bytes::BytesMut::new();
        pingora::http::RequestHeader::from(r).header_to_h1_wire(&mut wire);
        assert_eq!(wire.len(), "Content-Length: 0\r\nAccept: */*\r\n".len());
        let wire = String::from_utf8(wire.to_vec()).unwrap();
        assert!(
            wire.contains("accept: */*\r\n") && wire.contains("Content-Length: 0\r\n"),
            "{wire}"
        );
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_says_so_in_connection() {
        let mut r = request(&[
            ("Connection", "Upgrade, X-Other"),
            ("Upgrade", "websocket"),
            ("X-Other", "1"),
        ]);
        strip_hop_by_hop(&mut r, true);
        assert_eq!(r.headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(r.headers.get("connection").unwrap(), "upgrade");
        assert!(r.headers.get("x-other").is_none());
    }

    #[test]
    fn targets_go_on_in_origin_form_with_the_canonical_path() {
        let target = |uri: &str, rewritten: Option<&str>| {
            let mut r = http::Request::get(uri).body(()).unwrap().into_parts().0;
            set_canonical_target(&mut r, rewritten).unwrap();
            let h = pingora::http::RequestHeader::from(r);
            String::from_utf8(h.raw_path().to_vec()).unwrap()
        };
        assert_eq!(target("/a/b?x=1", None), "/a/b?x=1");
        assert_eq!(target("/a/./b?x=1", Some("/a/b")), "/a/b?x=1");
        assert_eq!(target("http://evil.example/a?q", None), "/a?q");
        assert_eq!(target("http://evil.example", None), "/");
        assert_eq!(target("http://evil.example/a/../b", Some("/b")), "/b");
    }
}
