//! The sidecar's shared state: what every request reads (the snapshot, the live config, the
//! token cache, the limiter, the metrics), each replaced whole and read with one `load()`.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::{ForwardedFor, TokenSettings};
use crate::core::clock::SharedClock;
use crate::core::key::Environment;
use crate::core::routes::RouteTable;
use crate::core::snapshot::Snapshot;
use crate::core::token_cache::TokenCache;
use crate::sidecar::metrics::SidecarMetrics;
use crate::sidecar::sync_client::EarlySync;

/// The part of the config a reload (SIGHUP) replaces whole; each request works with the one it
/// started with.
pub struct Live {
    pub routes: RouteTable,
    pub forwarded_for: ForwardedFor,
    /// The upstream service.
    pub upstream: std::net::SocketAddr,
    pub tokens: TokenSettings,
}

pub struct Shared {
    pub snapshot: Arc<ArcSwapOption<Snapshot>>,
    pub live: ArcSwap<Live>,
    pub environment: Environment,
    pub clock: SharedClock,
    pub token_cache: Arc<TokenCache>,
    pub early_sync: Arc<EarlySync>,
    pub request_ids: crate::core::request_id::RequestIds,
    pub metrics: Arc<SidecarMetrics>,
    pub limiter: crate::sidecar::ratelimit::SidecarLimiter,
}
