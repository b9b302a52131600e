//! Scope syntax and matching. A scope is `segment(:segment)*`; the last segment may be `*`,
//! which grants every scope below it (`trade:*` grants `trade:open` and `trade:x:y`). Matching
//! is otherwise exact and case-sensitive. `admin:*` is a scope like any other `x:*`.

use std::fmt;
use std::sync::Arc;

pub const MAX_SCOPE_LEN: usize = 128;
pub const MAX_SCOPES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope must be 1 to {MAX_SCOPE_LEN} characters")]
    Length,
    #[error("scope {0:?} must be segments of [A-Za-z0-9_.-] separated by ':', with '*' only as the whole last segment")]
    Syntax(String),
    #[error("at most {MAX_SCOPES} scopes")]
    TooMany,
    #[error("duplicate scope {0:?}")]
    Duplicate(String),
}

/// A validated scope string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(Arc<str>);

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        if s.is_empty() || s.len() > MAX_SCOPE_LEN {
            return Err(ScopeError::Length);
        }
        let segments: Vec<&str> = s.split(':').collect();
        let last = segments.len() - 1;
        for (i, seg) in segments.iter().enumerate() {
            let ok = if *seg == "*" {
                i == last && i > 0
            } else {
                !seg.is_empty()
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            };
            if !ok {
                return Err(ScopeError::Syntax(s.to_string()));
            }
        }
        Ok(Scope(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether holding `self` grants `needed`.
    pub fn grants(&self, needed: &str) -> bool {
        let g = self.as_str();
        if g == needed {
            return true;
        }
        match g.strip_suffix('*') {
            // `g` ends with ":*", so `stem` ends with ':'; `needed` must go strictly below it.
            Some(stem) => needed.len() > stem.len() && needed.starts_with(stem),
            None => false,
        }
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scopes a service holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    /// Validates every entry; rejects duplicates and oversized lists.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<ScopeSet, ScopeError> {
        if items.len() > MAX_SCOPES {
            return Err(ScopeError::TooMany);
        }
        let mut out: Vec<Scope> = Vec::with_capacity(items.len());
        for item in items {
            let s = Scope::parse(item.as_ref())?;
            if out.contains(&s) {
                return Err(ScopeError::Duplicate(s.as_str().to_string()));
            }
            out.push(s);
        }
        Ok(ScopeSet(out))
    }

    pub fn allows(&self, needed: &str) -> bool {
        self.0.iter().any(|g| g.grants(needed))
    }

    /// True when every one of `needed` is granted.
    pub fn allows_all(&self, needed: &[Scope]) -> bool {
        needed.iter().all(|n| self.allows(n.as_str()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.as_str().to_string()).collect()
    }

    /// Space-separated, as in OAuth2 `scope` values and the `X-Permiso-Scopes` header.
    pub fn joined(&self) -> String {
        join(&self.0)
    }

    /// Of the scopes `granted` to a token, what this (the service's current) set still
    /// holds: each granted scope it allows, or, under a granted wildcard it no longer holds
    /// whole, the narrower scopes it does (`trade:*` granted, `trade:read` held). In order,
    /// without repeats. A token never carries more than its service holds now, whether the
    /// sidecar or introspection reads it.
    pub fn still_held<'a>(&'a self, granted: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        let mut kept: Vec<&str> = Vec::new();
        for g in granted {
            if self.allows(g) {
                kept.push(g);
            } else if let Ok(g) = Scope::parse(g) {
                // Only a wildcard grants anything it is not; what it grants is `grants`'s
                // to say. (Reached only when a scope was taken away: the parse is no cost on
                // the common path.)
                kept.extend(self.0.iter().map(Scope::as_str).filter(|h| g.grants(h)));
            }
        }
        let mut seen = std::collections::HashSet::new();
        kept.retain(|s| seen.insert(*s));
        kept
    }
}

pub fn join(scopes: &[Scope]) -> String {
    let mut out = String::new();
    for (i, s) in scopes.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(s.as_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_inclusive() {
        let longest = format!("a:{}", "b".repeat(MAX_SCOPE_LEN - 2));
        assert!(Scope::parse(&longest).is_ok());
        assert_eq!(Scope::parse(&format!("{longest}c")), Err(ScopeError::Length));
        let many: Vec<String> = (0..MAX_SCOPES).map(|i| format!("s:{i}")).collect();
        assert_eq!(ScopeSet::parse(&many).unwrap().iter().count(), MAX_SCOPES);
        let too_many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s:{i}")).collect();
        assert_eq!(ScopeSet::parse(&too_many), Err(ScopeError::TooMany));
    }

    #[test]
    fn a_token_keeps_only_what_its_service_still_holds() {
        let held = set(&["trade:read", "trade:open", "account:read", "admin:*"]);
        let granted = [
            "trade:*",
            "account:read",
            "account:balance",
            "admin:system",
            "trade:read",
            "x:*",
        ];
        assert_eq!(
            held.still_held(granted),
            ["trade:read", "trade:open", "account:read", "admin:system"]
        );
        assert!(held.still_held(["trade", "trade:", "account:*:x"]).is_empty());
        // Every kept scope is allowed by the service, and was granted (or is under a grant).
        for g in ["a:*", "a:b", "a:b:*", "*", "a:b:c"] {
            for h in [&["a:b:c"][..], &["a:*"], &["a:b", "a:b:d"], &[]] {
                let held = set(h);
                for k in held.still_held([g]) {
                    assert!(held.allows(k), "{g} / {h:?}: {k}");
                    assert!(
                        g == k || Scope::parse(g).is_ok_and(|g| g.grants(k)),
                        "{g} / {h:?}: {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_wildcard_grants_only_strictly_below_its_stem() {
        let g = Scope::parse("trade:*").unwrap();
        assert!(g.grants("trade:open"));
        assert!(!g.grants("trade:"), "the stem itself is not below it");
        assert!(!g.grants("trade"));
    }

    #[test]
    fn scopes_print_as_written_and_iterate_in_order() {
        let s = Scope::parse("account:read").unwrap();
        assert_eq!(s.to_string(), "account:read");
        assert_eq!(format!("{s:?}"), "\"account:read\"");
        let names: Vec<String> = set(&["b:x", "a:y"]).iter().map(|s| s.to_string()).collect();
        assert_eq!(names, ["b:x", "a:y"]);
    }

    fn set(items: &[&str]) -> ScopeSet {
        ScopeSet::parse(items).unwrap()
    }

    #[test]
    fn syntax() {
        for ok in [
            "read",
            "trade:open",
            "admin:*",
            "a.b-c_d:E1",
            "trade:x:*",
            "x:y:z",
        ] {
            Scope::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "*",
            "trade:",
            ":open",
            "a::b",
            "trade:*:x",
            "tra de",
            "trade:o*",
            "ü:x",
            "a:**",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Scope::parse(&"a".repeat(129)).is_err());
    }

    #[test]
    fn exact_and_wildcard_matching() {
        let s = set(&["trade:*", "account:read"]);
        assert!(s.allows("trade:open"));
        assert!(s.allows("trade:close:all"));
        assert!(s.allows("trade:*"));
        assert!(!s.allows("trade"));
        assert!(!s.allows("trades:open"));
        assert!(s.allows("account:read"));
        assert!(!s.allows("account:balance"));
        assert!(!s.allows("Account:read"));
    }

    #[test]
    fn admin_star_is_an_ordinary_wildcard() {
        let s = set(&["admin:*"]);
        assert!(s.allows("admin:*"));
        assert!(s.allows("admin:system"));
        assert!(!s.allows("sync:read"));
        assert!(!set(&["admin:system"]).allows("admin:*"));
    }

    #[test]
    fn duplicates_and_limits() {
        assert_eq!(
            ScopeSet::parse(&["a:b", "a:b"]),
            Err(ScopeError::Duplicate("a:b".into()))
        );
        let many: Vec<String> = (0..65).map(|i| format!("s:{i}")).collect();
        assert_eq!(ScopeSet::parse(&many), Err(ScopeError::TooMany));
    }

    #[test]
    fn allows_all_and_join() {
        let s = set(&["a:x", "b:*"]);
        let need = vec![Scope::parse("a:x").unwrap(), Scope::parse("b:y").unwrap()];
        assert!(s.allows_all(&need));
        let need2 = vec![Scope::parse("a:x").unwrap(), Scope::parse("c:y").unwrap()];
        assert!(!s.allows_all(&need2));
        assert_eq!(join(&need2), "a:x c:y");
        assert_eq!(s.joined(), "a:x b:*");
    }
}
