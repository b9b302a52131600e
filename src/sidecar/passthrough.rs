//! `permiso passthrough` (hidden): forwarding without authentication, the load bench's
//! baseline. By default it runs the sidecar's own HTTP/1 path (`h1`) with no policy
//! (`Gate::Bare`) and the sidecar's default connection bounds, so the sidecar measured against
//! it differs only by authentication and identity. `--pingora-proxy` runs pingora's own
//! reverse proxy instead, the path the sidecar used before issue 15, to show what the
//! transport alone costs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::{RunArgs, Server};

use crate::sidecar::h1::{ConnLimits, Gate, H1Sidecar};
use crate::sidecar::metrics::SidecarMetrics;

/// Which proxy forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The sidecar's HTTP/1 path without a policy.
    H1,
    /// pingora-proxy with a shared upstream pool.
    PingoraProxy,
}

struct PingoraPassthrough {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for PingoraPassthrough {
    type CTX = ();

    /// No downstream modules: the default adds a disabled compression module that still
    /// costs a box and two boxed calls per request.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

/// The sidecar's defaults (`[sidecar]` in the config file, `config::file`).
fn default_limits() -> ConnLimits {
    use crate::config::file as d;
    ConnLimits {
        header_read_timeout: Duration::from_millis(d::default_header_read_timeout()),
        idle_timeout: Duration::from_millis(d::default_idle_timeout()),
        body_rate_grace: Duration::from_millis(d::default_body_grace()),
        body_min_rate: d::default_body_rate(),
        max_requests: d::default_requests_per_connection(),
    }
}

/// Runs until SIGTERM/SIGINT, like `permiso sidecar`.
pub fn run(listen: SocketAddr, upstream: SocketAddr, threads: usize, engine: Engine) {
    let mut server = Server::new_with_opt_and_conf(None, super::server_conf(threads, Duration::from_secs(1)));
    server.bootstrap();
    match engine {
        Engine::H1 => {
            let mut service = pingora::services::listening::Service::new(
                "passthrough".to_string(),
                H1Sidecar {
                    gate: Gate::Bare { upstream },
                    metrics: Arc::new(SidecarMetrics::new(0)),
                    table: crate::conn_limit::ConnTable::new(crate::config::file::default_max_connections()),
                    limits: default_limits(),
                },
            );
            service.add_tcp(&listen.to_string());
            server.add_service(service);
        }
        Engine::PingoraProxy => {
            let mut service = pingora::proxy::http_proxy_service_with_name(
                &server.configuration,
                PingoraPassthrough {
                    peer: HttpPeer::new(upstream, false, String::new()),
                },
                "pingora-proxy passthrough",
            );
            service.add_tcp(&listen.to_string());
            server.add_service(service);
        }
    }
    server.run(RunArgs::default());
}
