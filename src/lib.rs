//! Permiso: a service-to-service auth gateway.
//!
//! `core` (the `permiso-core` crate in crates/core, re-exported) holds the pure auth logic
//! (no I/O, no pingora types); `admin` is the admin plane
//! (axum + SQLite); `sidecar` is the pingora reverse proxy that enforces a synced snapshot;
//! `http_server` serves the axum apps (admin plane, sidecar health) with bounded connections
//! (`conn_limit`).
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod conn_limit;
pub use permiso_core as core;
pub mod demo_upstream;
pub mod dev;
pub mod http_server;
pub mod sidecar;
pub mod telemetry;
pub mod tls;
