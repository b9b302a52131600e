//! The sidecar's route table: method + path prefix → public, or the scopes required. A request
//! that matches no route is denied. Routes match canonical paths only (`core::path`).
//!
//! Case: an upstream may read paths with case significant (Flask, axum) or not (IIS, a
//! lower-casing layer), and the sidecar cannot know which. So by default a path is judged by
//! the route that matches it as written *and*, when a different route matches it without
//! regard to ASCII case, by that one too: `/api/v1/account/BALANCE` needs what
//! `/api/v1/account` needs (a case-sensitive upstream runs that handler) and what
//! `/api/v1/account/balance` needs (a case-insensitive one runs this). A path that matches a
//! route only when case is ignored matches none. `case_sensitive_routes = true` drops the
//! second reading, for upstreams known to be case-sensitive.

use crate::scope::Scope;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Public,
    /// Every listed scope is required.
    Scopes(Vec<Scope>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Upper-case method names; empty means any method.
    pub methods: Vec<String>,
    /// Starts with '/'; matches itself and anything below it on a segment boundary.
    pub prefix: String,
    pub access: Access,
    /// A public route forwards the caller's `Authorization` only when this is set.
    pub forward_authorization: bool,
    /// `scope` attribute for `insufficient_scope`, precomputed once.
    pub scope_attr: String,
    /// Only a trusted service may call (seed 002's admin endpoints).
    pub trusted: bool,
    /// Shadow mode: what this route would deny is forwarded, flagged and counted instead.
    pub shadow: bool,
}

impl Route {
    pub fn new(methods: Vec<String>, prefix: String, access: Access) -> Route {
        let scope_attr = match &access {
            Access::Public => String::new(),
            Access::Scopes(s) => crate::scope::join(s),
        };
        Route {
            methods,
            prefix,
            access,
            forward_authorization: false,
            scope_attr,
            trusted: false,
            shadow: false,
        }
    }

    /// HEAD is judged as GET too: every mainstream framework serves HEAD from the GET handler
    /// (running it, and sending its headers), so a GET-only route guards HEAD as well.
    fn method_matches(&self, method: &str) -> bool {
        self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m == method || (method == "HEAD" && m == "GET"))
    }

    fn matches(&self, method: &str, path: &str, case_sensitive: bool) -> bool {
        self.method_matches(method) && prefix_matches(&self.prefix, path, case_sensitive)
    }
}

/// The path without the `.suffix` of its last segment (`/a/balance.json` → `/a/balance`), if
/// it has one after at least one character.
fn suffix_stem(path: &str) -> Option<&str> {
    let last = path.rfind('/')? + 1;
    let dot = path[last..].find('.')?;
    (dot > 0).then(|| &path[..last + dot])
}

fn prefix_matches(prefix: &str, path: &str, case_sensitive: bool) -> bool {
    if prefix == "/" {
        return true;
    }
    let (p, path) = (prefix.trim_end_matches('/').as_bytes(), path.as_bytes());
    if path.len() < p.len() {
        return false;
    }
    let (head, rest) = path.split_at(p.len());
    let same = if case_sensitive {
        head == p
    } else {
        head.eq_ignore_ascii_case(p)
    };
    same && (rest.is_empty() || rest[0] == b'/')
}

/// How one request is judged: the protected routes covering its path.
///
/// Every covering route, not only the longest: an upstream may serve a path from the handler
/// of any ancestor prefix (a catch-all at `/api/v1/account` serves `/api/v1/account/balance/`
/// in Flask and axum, whose `/api/v1/account/balance` rule has no trailing slash), so the
/// caller must be allowed whichever one runs. The most specific public route matching the
/// path as written cuts off the protected routes above it for its own path only: anything
/// strictly below a public route (`/health/x`, `/health/`) may be served by a protected
/// ancestor's catch-all, so it needs what those ancestors need. A public route with no
/// protected route above it covers its whole subtree.
pub struct Judgement<'a> {
    table: &'a RouteTable,
    /// The public route the path falls under, if any.
    pub public: Option<&'a Route>,
    /// Its index in the table (`usize::MAX` when none): routes before it are more specific.
    floor: usize,
    /// The path is strictly below the public route's prefix.
    below_public: bool,
}

impl<'a> Judgement<'a> {
    /// The protected routes whose requirements all hold for the request, longest first;
    /// covering ones found without regard to case count too unless the table is
    /// case-sensitive.
    pub fn required<'p>(&self, method: &'p str, path: &'p str) -> impl Iterator<Item = &'a Route> + 'p
    where
        'a: 'p,
    {
        let (floor, below) = (self.floor, self.below_public);
        let fold = !self.table.case_sensitive;
        let stem = suffix_stem(path);
        self.table.routes.iter().enumerate().filter_map(move |(i, r)| {
            let covers = (i < floor || (below && i > floor)) && r.matches(method, path, !fold);
            // Rails' `(.:format)` and Spring's suffix patterns serve `/x/balance.json` from the
            // `/x/balance` handler: that reading counts too.
            let by_stem = stem.is_some_and(|s| r.matches(method, s, !fold));
            (r.access != Access::Public && (covers || by_stem)).then_some(r)
        })
    }
}

/// Routes ordered most specific first.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    case_sensitive: bool,
    /// The sidecar as a whole is in shadow mode: a request no route matches is forwarded
    /// (flagged `no_route`) instead of denied.
    shadow: bool,
    /// Some route is in shadow mode; when none is, every request is enforced without looking
    /// at its routes again.
    any_shadow: bool,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable::new(Vec::new())
    }
}

impl RouteTable {
    /// Both readings of case (the default): see the module documentation.
    pub fn new(routes: Vec<Route>) -> RouteTable {
        RouteTable::with_case(routes, false)
    }

    /// `case_sensitive = true` judges a path by the route matching it as written only.
    pub fn with_case(mut routes: Vec<Route>, case_sensitive: bool) -> RouteTable {
        // Longest prefix first; among equals, method-restricted before any-method. Stable sort
        // keeps config order for true ties.
        routes.sort_by(|a, b| {
            b.prefix
                .trim_end_matches('/')
                .len()
                .cmp(&a.prefix.trim_end_matches('/').len())
                .then(a.methods.is_empty().cmp(&b.methods.is_empty()))
        });
        RouteTable {
            any_shadow: routes.iter().any(|r| r.shadow),
            routes,
            case_sensitive,
            shadow: false,
        }
    }

    /// The sidecar-wide shadow mode (`[sidecar] mode = "shadow"`).
    pub fn shadowing_unmatched(mut self, shadow: bool) -> RouteTable {
        self.shadow = shadow;
        self
    }

    pub fn shadow(&self) -> bool {
        self.shadow
    }

    /// Whether any route is in shadow mode.
    pub fn any_shadow(&self) -> bool {
        self.any_shadow
    }

    /// Every route, most specific first (the fleet report lists them).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route matching `path` (canonical, `core::path::canonicalize`) as written.
    pub fn find(&self, method: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(method, path, true))
    }

    /// How `path` (canonical) is judged, or None when no route matches it as written.
    /// One pass over the table, no allocation.
    pub fn judge<'a>(&'a self, method: &str, path: &str) -> Option<Judgement<'a>> {
        let mut primary = false;
        for (i, r) in self.routes.iter().enumerate() {
            if !r.matches(method, path, true) {
                continue;
            }
            primary = true;
            // The most specific public route matching as written.
            if r.access == Access::Public {
                let exact = path == r.prefix.trim_end_matches('/') || (r.prefix == "/" && path == "/");
                return Some(Judgement {
                    table: self,
                    public: Some(r),
                    floor: i,
                    below_public: !exact,
                });
            }
        }
        primary.then_some(Judgement {
            table: self,
            public: None,
            floor: usize::MAX,
            below_public: false,
        })
    }

    pub fn case_sensitive(&self) -> bool {
        self.case_sensitive
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(s: &[&str]) -> Access {
        Access::Scopes(s.iter().map(|x| Scope::parse(x).unwrap()).collect())
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            Route::new(vec![], "/health".into(), Access::Public),
            Route::new(
                vec!["GET".into()],
                "/api/v1/trades".into(),
                scopes(&["trade:read"]),
            ),
            Route::new(
                vec!["POST".into()],
                "/api/v1/trades".into(),
                scopes(&["trade:open"]),
            ),
            Route::new(vec![], "/api/v1/account".into(), scopes(&["account:read"])),
            Route::new(
                vec!["GET".into()],
                "/api/v1/account/balance".into(),
                scopes(&["account:balance", "account:read"]),
            ),
        ])
    }

    fn required_scopes(t: &RouteTable, method: &str, path: &str) -> Vec<String> {
        let j = t.judge(method, path).expect("a route matches");
        j.required(method, path)
            .map(|r| r.scope_attr.to_string())
            .collect()
    }

    #[test]
    fn a_format_suffix_is_read_off_the_last_segment_only() {
        assert_eq!(suffix_stem("/a/balance.json"), Some("/a/balance"));
        assert_eq!(suffix_stem("/a.b/c"), None, "the dot is not in the last segment");
        assert_eq!(suffix_stem("/a/.json"), None, "nothing before the dot");
        assert_eq!(suffix_stem("/.json"), None);
        assert_eq!(suffix_stem("/a/b"), None);
    }

    #[test]
    fn the_suffix_reading_follows_the_case_setting() {
        let routes = || {
            vec![
                Route::new(vec![], "/x".into(), scopes(&["x:read"])),
                Route::new(vec![], "/x/balance".into(), scopes(&["x:balance"])),
            ]
        };
        let folded = RouteTable::new(routes());
        assert!(!folded.case_sensitive());
        assert_eq!(
            required_scopes(&folded, "GET", "/x/BALANCE.json"),
            ["x:balance", "x:read"]
        );
        let exact = RouteTable::with_case(routes(), true);
        assert!(exact.case_sensitive());
        assert_eq!(required_scopes(&exact, "GET", "/x/BALANCE.json"), ["x:read"]);
        assert_eq!((folded.len(), folded.is_empty()), (2, false));
        assert!(RouteTable::default().is_empty());
        assert_eq!(RouteTable::default().len(), 0);
    }

    #[test]
    fn a_public_root_covers_only_itself_under_a_protected_catch_all() {
        let t = RouteTable::new(vec![
            Route::new(vec![], "/".into(), scopes(&["site:read"])),
            Route::new(vec!["GET".into()], "/".into(), Access::Public),
        ]);
        let j = t.judge("GET", "/").unwrap();
        assert!(j.public.is_some());
        assert!(j.required("GET", "/").next().is_none(), "GET / is public");
        assert_eq!(
            required_scopes(&t, "GET", "/x"),
            ["site:read"],
            "below it, the catch-all applies"
        );
        assert_eq!(required_scopes(&t, "POST", "/"), ["site:read"]);
    }

    #[test]
    fn longest_prefix_and_method() {
        let t = table();
        assert_eq!(t.find("GET", "/health").unwrap().access, Access::Public);
        assert_eq!(
            t.find("GET", "/api/v1/trades/42").unwrap().scope_attr,
            "trade:read"
        );
        assert_eq!(t.find("POST", "/api/v1/trades").unwrap().scope_attr, "trade:open");
        assert!(t.find("DELETE", "/api/v1/trades/1").is_none());
        assert_eq!(
            t.find("GET", "/api/v1/account/balance").unwrap().scope_attr,
            "account:balance account:read"
        );
        assert_eq!(
            t.find("POST", "/api/v1/account/balance").unwrap().scope_attr,
            "account:read"
        );
    }

    #[test]
    fn prefix_matches_only_on_segment_boundary_and_default_denies() {
        let t = table();
        assert!(t.find("GET", "/healthz").is_none());
        assert!(t.find("GET", "/api/v1/tradesX").is_none());
        assert!(t.find("GET", "/").is_none());
        assert!(t.find("GET", "/admin").is_none());
    }

    /// (public?, the scope attributes required, longest first), or None for no route.
    fn judged(t: &RouteTable, method: &str, path: &str) -> Option<(bool, Vec<String>)> {
        let j = t.judge(method, path)?;
        let req: Vec<String> = j.required(method, path).map(|r| r.scope_attr.clone()).collect();
        Some((j.public.is_some(), req))
    }

    fn v(x: &[&str]) -> Vec<String> {
        x.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_covering_protected_route_is_required() {
        let t = table();
        let both = v(&["account:balance account:read", "account:read"]);
        assert_eq!(
            judged(&t, "GET", "/api/v1/account/balance"),
            Some((false, both.clone()))
        );
        assert_eq!(
            judged(&t, "GET", "/api/v1/account/balance/"),
            Some((false, both.clone()))
        );
        assert_eq!(
            judged(&t, "POST", "/api/v1/account/balance"),
            Some((false, v(&["account:read"])))
        );
        // A format suffix is read as the stem too (Rails, Spring): balance.json is balance.
        assert_eq!(
            judged(&t, "GET", "/api/v1/account/balance.json"),
            Some((false, both.clone()))
        );
        assert_eq!(
            judged(&t, "GET", "/api/v1/account/balance.tar.gz"),
            Some((false, both.clone()))
        );
        assert_eq!(
            judged(&t, "GET", "/api/v1/account/.hidden"),
            Some((false, v(&["account:read"])))
        );
        assert_eq!(suffix_stem("/a/b.c/d.e"), Some("/a/b.c/d"));
        assert_eq!(suffix_stem("/a/b"), None);
        assert_eq!(suffix_stem("/a/"), None);
        // HEAD is judged as GET too (frameworks serve it from the GET handler).
        assert_eq!(judged(&t, "HEAD", "/api/v1/account/balance"), Some((false, both)));
        assert_eq!(
            judged(&t, "GET", "/health/x"),
            Some((true, vec![])),
            "no protected route above"
        );
        // A public route under a protected prefix is public for its own path only: below it a
        // protected ancestor's catch-all may answer.
        let t = RouteTable::new(vec![
            Route::new(vec![], "/".into(), scopes(&["svc:call"])),
            Route::new(vec![], "/health".into(), Access::Public),
            Route::new(vec![], "/health/deep".into(), scopes(&["ops:read"])),
            Route::new(vec!["POST".into()], "/pub".into(), scopes(&["pub:write"])),
            Route::new(vec![], "/pub".into(), Access::Public),
        ]);
        assert_eq!(judged(&t, "GET", "/health"), Some((true, vec![])));
        assert_eq!(judged(&t, "GET", "/health/x"), Some((true, v(&["svc:call"]))));
        assert_eq!(judged(&t, "GET", "/health/"), Some((true, v(&["svc:call"]))));
        assert_eq!(
            judged(&t, "GET", "/health/deep/x"),
            Some((true, v(&["ops:read", "svc:call"])))
        );
        assert_eq!(judged(&t, "GET", "/other"), Some((false, v(&["svc:call"]))));
        // A method-restricted protected route beside a public one of the same prefix.
        assert_eq!(judged(&t, "POST", "/pub"), Some((true, v(&["pub:write"]))));
        assert_eq!(judged(&t, "GET", "/pub"), Some((true, vec![])));
    }

    #[test]
    fn both_readings_of_case_judge_by_default_with_a_switch() {
        let t = table();
        assert_eq!(
            judged(&t, "GET", "/api/v1/account/BALANCE"),
            Some((false, v(&["account:balance account:read", "account:read"])))
        );
        // Only matches without case: no route (a case-sensitive upstream would not serve it
        // under the route that matched).
        assert_eq!(judged(&t, "GET", "/API/v1/account/balance"), None);
        assert_eq!(judged(&t, "GET", "/HEALTH"), None);
        // Under a public prefix, a protected route matching without case still counts.
        let t = RouteTable::new(vec![
            Route::new(vec![], "/pub".into(), Access::Public),
            Route::new(vec![], "/pub/secret".into(), scopes(&["a:b"])),
        ]);
        assert_eq!(judged(&t, "GET", "/pub/SECRET"), Some((true, v(&["a:b"]))));
        let strict = RouteTable::with_case(table().routes, true);
        assert!(strict.case_sensitive());
        assert_eq!(
            judged(&strict, "GET", "/api/v1/account/BALANCE"),
            Some((false, v(&["account:read"])))
        );
        let strict = RouteTable::with_case(t.routes, true);
        assert_eq!(judged(&strict, "GET", "/pub/SECRET"), Some((true, vec![])));
    }
}
