//! Pure auth logic: key format, scopes, routes, rate limits, snapshots and the allow/deny
//! decision. Nothing here does I/O or knows about pingora or axum, so it is unit-tested and
//! benchmarked directly. The gateway crate re-exports it as `permiso::core`.
#![forbid(unsafe_code)]

pub mod audit;
pub mod clock;
pub mod decision;
pub mod denial;
pub mod egress;
pub mod headers;
pub mod ids;
pub mod jwt;
pub mod key;
pub mod key_id;
pub mod limiter;
pub mod path;
pub mod peer;
pub mod ratelimit;
pub mod request_id;
pub mod routes;
pub mod scope;
pub mod sharded;
pub mod snapshot;
pub mod sync;
pub mod token_cache;
pub mod usage;
