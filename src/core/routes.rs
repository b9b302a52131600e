//! The sidecar's route table: method + path prefix → public, or the scopes required. A request
//! that matches no route is denied. Routes match canonical paths only (`core::path`), and by
//! default without regard to ASCII case, so an upstream that ignores case cannot be reached
//! under a less protected spelling of a protected prefix.

use crate::core::scope::Scope;

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
}

impl Route {
    pub fn new(methods: Vec<String>, prefix: String, access: Access) -> Route {
        let scope_attr = match &access {
            Access::Public => String::new(),
            Access::Scopes(s) => crate::core::scope::join(s),
        };
        Route {
            methods,
            prefix,
            access,
            forward_authorization: false,
            scope_attr,
        }
    }

    fn matches(&self, method: &str, path: &str, case_sensitive: bool) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && prefix_matches(&self.prefix, path, case_sensitive)
    }
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

/// Routes ordered most specific first.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    case_sensitive: bool,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable::new(Vec::new())
    }
}

impl RouteTable {
    /// Case-insensitive matching (the default): see [`RouteTable::case_sensitive`].
    pub fn new(routes: Vec<Route>) -> RouteTable {
        RouteTable::with_case(routes, false)
    }

    /// `case_sensitive = false` matches prefixes without regard to ASCII case. Paths are
    /// forwarded as sent either way; only which route judges them changes.
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
        RouteTable { routes, case_sensitive }
    }

    /// `path` must be canonical (`core::path::canonicalize`).
    pub fn find(&self, method: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(method, path, self.case_sensitive))
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

    #[test]
    fn case_insensitive_by_default_with_a_switch() {
        let t = table();
        assert_eq!(
            t.find("GET", "/API/v1/Account/BALANCE").unwrap().scope_attr,
            "account:balance account:read"
        );
        assert_eq!(t.find("GET", "/HEALTH").unwrap().access, Access::Public);
        let strict = RouteTable::with_case(table().routes, true);
        assert!(strict.case_sensitive());
        assert_eq!(strict.find("GET", "/API/v1/account/balance"), None);
        assert_eq!(
            strict.find("GET", "/api/v1/account/BALANCE").unwrap().scope_attr,
            "account:read"
        );
    }

}
