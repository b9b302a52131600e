//! Permiso: a service-to-service auth gateway.
//!
//! `core` holds the pure auth logic (no I/O, no pingora types); `admin` is the admin plane
//! (axum + SQLite); `sidecar` is the pingora reverse proxy that enforces a synced snapshot.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod core;
pub mod demo_upstream;
pub mod dev;
pub mod sidecar;
pub mod telemetry;
