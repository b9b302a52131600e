//! Logging setup: tracing-subscriber, with pingora's `log` records bridged in. `RUST_LOG`
//! overrides the default filter, except that the HTTP libraries underneath never log below
//! INFO: their debug and trace lines print whole request headers (pingora's "Sending header to
//! upstream", hyper's and h2's frame traces), credentials included, and a secret must not
//! reach a log at any level.
//!
//! Failed TLS handshakes are counted, and at most one line per 10 s of them is written:
//! pingora logs each at ERROR ("Downstream handshake error from …"), and port scanners, TCP
//! health checks and clients with the wrong CA would otherwise fill the log with them (Envoy
//! counts these, `ssl.handshake_error`, rather than logging each).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
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

/// Failed TLS handshakes on this process's listeners, for `permiso_tls_handshake_failures_total`.
static TLS_HANDSHAKE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Counts one failed TLS handshake (the admin plane's listener calls this; the sidecar's are
/// counted from pingora's log line).
pub fn tls_handshake_failed() {
    TLS_HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
}

pub fn tls_handshake_failures() -> u64 {
    TLS_HANDSHAKE_FAILURES.load(Ordering::Relaxed)
}

/// Where pingora logs a failed or timed-out downstream handshake.
const PINGORA_LISTENING: &str = "pingora_core::services::listening";
const HANDSHAKE_FAILED: &str = "Downstream handshake";

/// Whether `event` is pingora's line for a failed downstream TLS handshake (its other lines
/// from that module, such as a failed accept(), are not). pingora logs through the `log`
/// crate: the bridged event's own target is "log", the record's is in the `log.target` field.
fn is_handshake_failure(event: &Event<'_>) -> bool {
    #[derive(Default)]
    struct Fields {
        from_pingora_listening: bool,
        handshake_message: bool,
    }
    impl Visit for Fields {
        fn record_str(&mut self, field: &Field, value: &str) {
            match field.name() {
                "log.target" => self.from_pingora_listening = value == PINGORA_LISTENING,
                "message" => self.handshake_message = value.starts_with(HANDSHAKE_FAILED),
                _ => {}
            }
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.handshake_message = format!("{value:?}").starts_with(HANDSHAKE_FAILED);
            }
        }
    }
    let meta = event.metadata();
    if *meta.level() != Level::ERROR || !matches!(meta.target(), "log" | PINGORA_LISTENING) {
        return false;
    }
    let mut f = Fields {
        from_pingora_listening: meta.target() == PINGORA_LISTENING,
        ..Fields::default()
    };
    event.record(&mut f);
    f.from_pingora_listening && f.handshake_message
}

/// Admits one event per window: the first after the window has passed opens the next one.
pub struct LogWindow {
    window_ms: u64,
    /// Milliseconds (of the caller's clock) before which nothing is admitted.
    next_ms: AtomicU64,
}

impl LogWindow {
    pub fn new(window_ms: u64) -> LogWindow {
        LogWindow {
            window_ms,
            next_ms: AtomicU64::new(0),
        }
    }

    pub fn admit(&self, now_ms: u64) -> bool {
        let next = self.next_ms.load(Ordering::Relaxed);
        now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + self.window_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// Milliseconds since the first call: the clock of the process's log windows.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Counts every failed handshake, whatever the log filter lets through.
struct CountHandshakeFailures;

impl<S: Subscriber> Layer<S> for CountHandshakeFailures {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if is_handshake_failure(event) {
            tls_handshake_failed();
        }
    }
}

/// Lets one failed-handshake line per window reach the log.
struct SampleHandshakeFailures(LogWindow);

impl<S> Filter<S> for SampleHandshakeFailures {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    /// Any level (the other filters set the bound; see `init`).
    fn max_level_hint(&self) -> Option<filter::LevelFilter> {
        Some(filter::LevelFilter::TRACE)
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        !is_handshake_failure(event) || self.0.admit(monotonic_ms())
    }
}

/// How often a failed-handshake line may be written.
const HANDSHAKE_LOG_WINDOW_MS: u64 = 10_000;

pub fn init(json: bool) {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Every filter states the most verbose level it can pass: the bridge then sets `log`'s
    // own maximum from them, so pingora's debug and trace calls stop at one atomic load
    // instead of building a record and asking the subscriber on every request (2.4k
    // instructions a request under callgrind). A filter without a hint makes it unbounded.
    let env_max = env.max_level_hint().unwrap_or(filter::LevelFilter::TRACE);
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };
    // try_init: a second call (tests) is harmless. It also bridges `log` records (pingora's).
    // RUST_LOG filters the log lines only: the counting layer sees pingora's handshake lines
    // even when RUST_LOG=off. Its filter is asked with the `log` record's own target (the
    // bridge checks that before dispatching).
    let _ = tracing_subscriber::registry()
        .with(
            CountHandshakeFailures.with_filter(
                filter::filter_fn(|m| m.target() == PINGORA_LISTENING && *m.level() == Level::ERROR)
                    .with_max_level_hint(filter::LevelFilter::ERROR),
            ),
        )
        .with(
            fmt.with_filter(
                env.and(filter::filter_fn(may_log).with_max_level_hint(env_max))
                    .and(SampleHandshakeFailures(LogWindow::new(HANDSHAKE_LOG_WINDOW_MS))),
            ),
        )
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_window() {
        let w = LogWindow::new(10_000);
        assert!(w.admit(0));
        assert!(!w.admit(1));
        assert!(!w.admit(9_999));
        assert!(w.admit(10_000));
        assert!(!w.admit(10_001));
        // After a quiet spell the next line passes at once, and opens a window from then.
        assert!(w.admit(50_000));
        assert!(!w.admit(59_999));
        assert!(w.admit(60_000));
    }

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
