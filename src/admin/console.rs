//! The web console at `/console`: three static files embedded in the binary (no build step, no
//! toolchain to run it) that call the admin API from the browser with the admin key the
//! operator types in. The page keeps that key in its memory or sessionStorage only; the server
//! side here only hands out the files, under a CSP that allows no inline script or style, no
//! other origin and no framing. Off unless `admin_plane.console = true`.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::admin::AppState;

const INDEX: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// Only this origin's files and API; nothing inline, no plugins, no base or form tricks, no
/// framing (with X-Frame-Options for browsers that predate frame-ancestors).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                       img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 6] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
    ];
    (StatusCode::OK, headers, body).into_response()
}

/// The console's routes, added to the admin router when it is switched on.
pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route(
            "/console",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/console/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the CSP promises holds for the files themselves: no inline script, style or
    /// handler, nothing loaded from elsewhere, no key in storage that outlives the tab.
    #[test]
    fn the_pages_need_nothing_the_csp_forbids() {
        let lower = INDEX.to_ascii_lowercase();
        for script in lower.split("<script").skip(1) {
            let tag = &script[..script.find('>').unwrap()];
            assert!(
                tag.contains("src=\"/console/app.js\""),
                "inline or foreign script: <script{tag}>"
            );
        }
        assert!(!lower.contains("<style"), "inline style element");
        assert!(!lower.contains(" style="), "inline style attribute");
        // No `on…=` event-handler attribute.
        for (i, _) in lower.match_indices(" on") {
            let name: String = lower[i + 3..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase())
                .collect();
            let after = lower[i + 3 + name.len()..].trim_start();
            assert!(
                name.is_empty() || !after.starts_with('='),
                "inline handler on{name}="
            );
        }
        for file in [INDEX, APP_JS, APP_CSS] {
            for foreign in ["http://", "https://", "//cdn", "@import"] {
                assert!(!file.contains(foreign), "{foreign} in a console file");
            }
        }
        assert!(
            [
                "localStorage.setItem",
                "localStorage.getItem",
                "localStorage[",
                "window.localStorage"
            ]
            .iter()
            .all(|use_| !APP_JS.contains(use_)),
            "the key must not outlive the tab"
        );
        assert!(!APP_JS.contains("document.cookie"), "no cookies");
        assert!(!APP_JS.contains("eval("), "no eval");
    }
}
