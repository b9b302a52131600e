//! A bare pingora reverse proxy with no authentication, built with the sidecar's own server
//! settings: the baseline `cargo bench --bench load` measures the sidecar against.

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::{RunArgs, Server};

pub struct Passthrough {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    /// As the sidecar: no downstream modules, so the baseline carries the same framework cost.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

/// Runs until SIGTERM/SIGINT, like `permiso sidecar`.
pub fn run(listen: SocketAddr, upstream: SocketAddr, threads: usize) {
    let mut server = Server::new_with_opt_and_conf(
        None,
        super::server_conf(threads, std::time::Duration::from_secs(1)),
    );
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Passthrough {
            peer: HttpPeer::new(upstream, false, String::new()),
        },
        "bare passthrough",
    );
    service.add_tcp(&listen.to_string());
    server.add_service(service);
    server.run(RunArgs::default());
}
