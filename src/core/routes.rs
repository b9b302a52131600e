//! The sidecar's route table: method + path prefix → public, or the scopes required. A request
//! that matches no route is denied. Paths that an upstream might normalise differently from us
//! (dot segments, encoded slashes) are refused before matching, so a public prefix can never be
//! used to reach a protected one.

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
            scope_attr,
        }
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && prefix_matches(&self.prefix, path)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let p = prefix.trim_end_matches('/');
    match path.strip_prefix(p) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

/// Routes ordered most specific first.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        // Longest prefix first; among equals, method-restricted before any-method. Stable sort
        // keeps config order for true ties.
        routes.sort_by(|a, b| {
            b.prefix
                .trim_end_matches('/')
                .len()
                .cmp(&a.prefix.trim_end_matches('/').len())
                .then(a.methods.is_empty().cmp(&b.methods.is_empty()))
        });
        RouteTable { routes }
    }

    pub fn find(&self, method: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(method, path))
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// Why a path is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    DotSegment,
    EncodedSeparator,
    Backslash,
}

/// "." or "..", with any dot possibly percent-encoded as %2e. No allocation.
fn is_dot_segment(seg: &str) -> bool {
    let b = seg.as_bytes();
    let (mut i, mut dots) = (0, 0);
    while i < b.len() {
        if b[i] == b'.' {
            i += 1;
        } else if b.len() - i >= 3 && b[i..i + 3].eq_ignore_ascii_case(b"%2e") {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// Accepts only paths whose meaning cannot change under an upstream's normalisation.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    let lower_has = |needle: &str| {
        path.as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    if lower_has("%2f") || lower_has("%5c") {
        return Err(PathError::EncodedSeparator);
    }
    if path.split('/').any(is_dot_segment) {
        return Err(PathError::DotSegment);
    }
    Ok(())
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
    fn risky_paths_refused() {
        assert_eq!(check_path("/health/../admin"), Err(PathError::DotSegment));
        assert_eq!(check_path("/health/%2e%2E/admin"), Err(PathError::DotSegment));
        assert_eq!(check_path("/health/./x"), Err(PathError::DotSegment));
        assert_eq!(check_path("/health/..%2fadmin"), Err(PathError::EncodedSeparator));
        assert_eq!(check_path("/health\\..\\admin"), Err(PathError::Backslash));
        assert_eq!(check_path("health"), Err(PathError::NotAbsolute));
        assert_eq!(check_path("/api/v1/trades/1.5"), Ok(()));
        assert_eq!(check_path("/api/v1/market/EURUSD"), Ok(()));
        assert_eq!(check_path("/files/...hidden"), Ok(()));
        assert_eq!(check_path("/files/..."), Ok(()));
        assert_eq!(check_path("/a/.%2E/b"), Err(PathError::DotSegment));
        assert_eq!(check_path("/a/%2e"), Err(PathError::DotSegment));
        assert_eq!(check_path("/a/%2ex"), Ok(()));
    }
}
