//! Logging setup: tracing-subscriber, with pingora's `log` records bridged in. `RUST_LOG`
//! overrides the default filter, except that the HTTP libraries underneath never log below
//! INFO: their debug and trace lines print whole request headers (pingora's "Sending header to
//! upstream", hyper's and h2's frame traces), credentials included, and a secret must not
//! reach a log at any level.

use tracing::{Level, Metadata};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter, EnvFilter, Layer};

/// Crates whose verbose output may hold header values.
const HEADER_PRINTING: [&str; 8] = [
    "pingora",
    "hyper",
    "h2",
    "reqwest",
    "tower_http",
    "axum",
    "tokio_postgres",
    "redis",
];

/// Whether a log line may be written at all (whatever `RUST_LOG` asks for).
pub fn may_log(meta: &Metadata<'_>) -> bool {
    if *meta.level() <= Level::INFO {
        return true;
    }
    let t = meta.target();
    !HEADER_PRINTING
        .iter()
        .any(|c| t.starts_with(c) && t[c.len()..].chars().next().is_none_or(|n| n == ':' || n == '_'))
}

pub fn init(json: bool) {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };
    // try_init: a second call (tests) is harmless. It also bridges `log` records (pingora's).
    let _ = tracing_subscriber::registry()
        .with(env)
        .with(fmt.with_filter(filter::filter_fn(may_log)))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_lines_of_header_printing_crates_are_dropped() {
        use tracing::callsite::Identifier;
        use tracing::field::FieldSet;
        use tracing::metadata::Kind;
        struct Cs;
        impl tracing::callsite::Callsite for Cs {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unimplemented!()
            }
        }
        static CS: Cs = Cs;
        let meta = |target: &'static str, level: Level| {
            Metadata::new(
                "e",
                target,
                level,
                None,
                None,
                None,
                FieldSet::new(&[], Identifier(&CS)),
                Kind::EVENT,
            )
        };
        for t in [
            "pingora_proxy::proxy_h1",
            "pingora_core::protocols",
            "hyper::proto::h1",
            "hyper_util::client",
            "h2::codec",
            "reqwest::connect",
        ] {
            assert!(!may_log(&meta(t, Level::DEBUG)), "{t}");
            assert!(!may_log(&meta(t, Level::TRACE)), "{t}");
            assert!(may_log(&meta(t, Level::INFO)), "{t}");
            assert!(may_log(&meta(t, Level::ERROR)), "{t}");
        }
        for t in ["permiso::sidecar", "permiso::access", "h2o", "hyperion"] {
            assert!(may_log(&meta(t, Level::TRACE)), "{t}");
        }
    }
}
