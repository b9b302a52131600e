//! The canonical request path (`core::path`) and the routing decided on it.
//!
//! Properties, for any path:
//! - a path that passes canonicalises to a fixed point: the forwarded path, judged again,
//!   passes unchanged;
//! - the decision on the received path equals the decision on the forwarded one (same verdict,
//!   same routes required), in both case modes: the route chosen is the route of the path the
//!   upstream reads;
//! - the canonical path decodes to the bytes the received path decodes to (slashes merged), is
//!   ASCII, and any other spelling of those bytes canonicalises to it.
#![no_main]

use std::borrow::Cow;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use permiso::core::decision::{self, Authorization, RequestFacts, TokenPolicy};
use permiso::core::key::Environment;
use permiso::core::path::{canonicalize, decode};
use permiso::core::routes::{Access, Route, RouteTable};
use permiso::core::scope::Scope;

fn tables() -> &'static [RouteTable; 2] {
    static T: OnceLock<[RouteTable; 2]> = OnceLock::new();
    T.get_or_init(|| {
        let s = |x: &str| Access::Scopes(vec![Scope::parse(x).unwrap()]);
        let routes = vec![
            Route::new(vec![], "/health".into(), Access::Public),
            Route::new(vec![], "/api/v1/account".into(), s("account:read")),
            Route::new(vec!["GET".into()], "/api/v1/account/balance".into(), s("account:balance")),
            Route::new(vec![], "/api/v1/trades".into(), s("trade:read")),
            Route::new(vec![], "/pub".into(), Access::Public),
            Route::new(vec![], "/pub/Secret".into(), s("admin:system")),
            Route::new(vec![], "/caf%C3%A9".into(), s("cafe:read")),
        ];
        [RouteTable::with_case(routes.clone(), false), RouteTable::with_case(routes, true)]
    })
}

fn judged(t: &RouteTable, method: &str, path: &str) -> Option<(bool, Vec<String>)> {
    let j = t.judge(method, path)?;
    Some((j.public.is_some(), j.required(method, path).map(|r| r.prefix.clone()).collect()))
}

fn merge_slashes(v: Vec<u8>) -> Vec<u8> {
    let mut o: Vec<u8> = Vec::with_capacity(v.len());
    for x in v {
        if !(x == b'/' && o.last() == Some(&b'/')) {
            o.push(x);
        }
    }
    o
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok(raw) = std::str::from_utf8(rest) else { return };
    let method = ["GET", "POST"][(flags & 1) as usize];
    let Ok(c) = canonicalize(raw) else {
        return;
    };
    let forwarded: &str = &c;
    assert!(forwarded.is_ascii());
    assert!(matches!(canonicalize(forwarded), Ok(Cow::Borrowed(_))), "{raw:?} -> {forwarded:?} is not a fixed point");
    assert_eq!(merge_slashes(decode(raw)), decode(forwarded), "{raw:?} -> {forwarded:?}");
    // Every escape in the canonical form is upper-case.
    let b = forwarded.as_bytes();
    for (i, _) in b.iter().enumerate().filter(|(_, &x)| x == b'%') {
        assert!(b[i + 1..i + 3].iter().all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)));
    }
    // Any spelling of the same bytes has the same canonical form.
    let respelled: String = decode(forwarded)
        .iter()
        .map(|&x| if x == b'/' { "/".to_string() } else { format!("%{x:02x}") })
        .collect();
    assert_eq!(canonicalize(&respelled).as_deref(), Ok(forwarded), "{respelled:?}");

    let policy = TokenPolicy { audience: "permiso", leeway_secs: 30, cache: None };
    for t in tables() {
        assert_eq!(judged(t, method, forwarded), judged(t, method, &canonicalize(forwarded).unwrap()));
        let decide = |path: &str| {
            let facts = RequestFacts { method, path, authorization: Authorization::Absent, client_ip: None , peer: None };
            match decision::decide(t, None, Environment::Live, &facts, 0, &policy) {
                Ok(p) => format!("{:?}", p.verdict),
                Err(d) => format!("{d:?}"),
            }
        };
        assert_eq!(decide(raw), decide(forwarded), "{raw:?} vs forwarded {forwarded:?}");
    }
});
