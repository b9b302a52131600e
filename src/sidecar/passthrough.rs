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

/// The experiment for issue 15: the same bare forwarding on pingora-core's HTTP/1 server and
/// client sessions directly, one upstream connection pinned per downstream connection (no
/// shared pool, no idle-watch task per request, no `ProxyHttp` hooks). Only the load bench's
/// traffic is its job: bodies are streamed, but nothing else of the sidecar's request path is
/// here (`permiso passthrough --lean`, a hidden baseline, never serving users).
pub mod lean {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use async_trait::async_trait;
    use pingora::apps::ServerApp;
    use pingora::protocols::http::v1::client::HttpSession as Upstream;
    use pingora::protocols::http::v1::server::HttpSession as Downstream;
    use pingora::protocols::Stream;
    use pingora::server::ShutdownWatch;

    pub struct LeanPassthrough {
        pub upstream: SocketAddr,
    }

    async fn connect(addr: SocketAddr) -> Option<Stream> {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let _ = tcp.set_nodelay(true);
        Some(Box::new(pingora::protocols::l4::stream::Stream::from(tcp)))
    }

    impl LeanPassthrough {
        /// One request; the connections to keep, or None to close both.
        async fn one(&self, down: Stream, up: Option<Stream>) -> Option<(Stream, Option<Stream>)> {
            let mut d = Downstream::new(down);
            d.read_request().await.ok()??;
            // Keep-alive as the client asks (HTTP/1.1 default on), and from the upstream's answer.
            d.respect_keepalive();
            let req = Box::new(d.req_header().clone());
            let up = match up {
                Some(u) => u,
                None => connect(self.upstream).await?,
            };
            let mut u = Upstream::new(up);
            u.write_request_header(req).await.ok()?;
            while let Some(chunk) = d.read_body_bytes().await.ok()? {
                u.write_body(&chunk).await.ok()?;
            }
            u.finish_body().await.ok()?;
            u.read_response().await.ok()?;
            u.respect_keepalive();
            let resp = Box::new(u.resp_header()?.clone());
            d.write_response_header(resp).await.ok()?;
            while let Some(chunk) = u.read_body_ref().await.ok()? {
                d.write_body(chunk).await.ok()?;
            }
            d.finish_body().await.ok()?;
            let up = u.reuse().await;
            let down = d.reuse().await.ok()??.into_parts().0;
            Some((down, up))
        }
    }

    #[async_trait]
    impl ServerApp for LeanPassthrough {
        /// The whole connection in one call: the pinned upstream lives as long as it.
        async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
            let (mut down, mut up) = (stream, None);
            loop {
                (down, up) = self.one(down, up).await?;
                if *shutdown.borrow() {
                    return None;
                }
            }
        }
    }

    /// Runs until SIGTERM/SIGINT, like `permiso passthrough`.
    pub fn run(listen: SocketAddr, upstream: SocketAddr, threads: usize) {
        let mut server = pingora::server::Server::new_with_opt_and_conf(
            None,
            super::super::server_conf(threads, std::time::Duration::from_secs(1)),
        );
        server.bootstrap();
        let mut service = pingora::services::listening::Service::new(
            "lean passthrough".to_string(),
            LeanPassthrough { upstream },
        );
        service.add_tcp(&listen.to_string());
        server.add_service(service);
        server.run(pingora::server::RunArgs::default());
    }
}
