//! Integration tests: real HTTP over loopback against a real admin plane (SQLite file), a
//! pingora sidecar and an upstream. One test binary, one module per area.

mod admin_api;
mod certs;
mod cli;
mod common;
mod console;
mod contract;
mod e2e;
mod egress;
mod fleet;
mod h1;
mod hardening;
mod lifecycle;
mod oauth;
mod observability;
mod operations;
mod paths;
mod replicas;
mod resilience;
mod rotation;
mod shared_limits;
mod sidecar_auth;
mod storage;
mod tls;
