//! A tiny stand-in for the account service (seed 002, port 8002). It reports which caller its
//! sidecar identified, and whether any credential reached it (none should).
//!
//!   account-demo --listen 127.0.0.1:8002

use std::net::SocketAddr;

use axum::extract::Path;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use permiso::demo_upstream::caller;
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("127.0.0.1:8002")
        .parse()?;
    let router = Router::new()
        .route(
            "/health",
            get(|| async { Json(json!({"status": "healthy", "service": "account"})) }),
        )
        .route(
            "/api/v1/accounts/{login}",
            get(|Path(login): Path<u64>, h: HeaderMap| async move {
                Json(json!({"login": login, "currency": "USD", "leverage": 100, "caller": caller(&h)}))
            }),
        )
        .route(
            "/api/v1/balances/{login}",
            get(|Path(login): Path<u64>, h: HeaderMap| async move {
                Json(json!({"login": login, "balance": 10250.75, "equity": 10311.2, "caller": caller(&h)}))
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("account-demo listening on {listen}");
    axum::serve(listener, router).await?;
    Ok(())
}
