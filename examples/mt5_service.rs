//! A tiny stand-in for the MT5 trading API (seed 002). It trusts the identity its sidecar adds
//! (X-Permiso-*) and calls the account service through its own sidecar's egress listener,
//! holding no credential itself.
//!
//!   mt5-demo --listen 127.0.0.1:8001 --egress http://127.0.0.1:9100

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use permiso::demo_upstream::caller;
use serde_json::{json, Value};

#[derive(Clone)]
struct App {
    egress: String,
    http: reqwest::Client,
}

/// Calls the account service through the egress listener and relays what it said.
async fn via_account(app: &App, path: &str, h: &HeaderMap) -> (StatusCode, Json<Value>) {
    let url = format!("{}/account{}", app.egress, path);
    match app.http.get(&url).send().await {
        Ok(r) if r.status().is_success() => {
            let account: Value = r.json().await.unwrap_or(Value::Null);
            (
                StatusCode::OK,
                Json(json!({"caller": caller(h), "account": account})),
            )
        }
        Ok(r) => {
            let status = r.status().as_u16();
            let detail: Value = r.json().await.unwrap_or(Value::Null);
            (
                StatusCode::BAD_GATEWAY,
                Json(json!({"error": "account_service_failed", "account_status": status, "detail": detail})),
            )
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({"error": "account_service_unreachable", "detail": e.to_string()})),
        ),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let listen: SocketAddr = arg("--listen", "127.0.0.1:8001").parse()?;
    let app = App {
        egress: arg("--egress", "http://127.0.0.1:9100"),
        http: reqwest::Client::new(),
    };
    let router = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "healthy", "service": "mt5-api"})) }))
        .route(
            "/api/v1/trades",
            get(|h: HeaderMap| async move {
                Json(json!({"trades": [{"ticket": 1001, "symbol": "EURUSD", "type": "buy", "volume": 0.1}], "caller": caller(&h)}))
            })
            .post(|h: HeaderMap| async move { Json(json!({"ticket": 1003, "status": "opened", "caller": caller(&h)})) }),
        )
        .route(
            "/api/v1/account",
            get(|State(app): State<App>, h: HeaderMap| async move { via_account(&app, "/api/v1/accounts/5012345", &h).await }),
        )
        .route(
            "/api/v1/account/balance",
            get(|State(app): State<App>, h: HeaderMap| async move {
                via_account(&app, "/api/v1/balances/5012345", &h).await
            }),
        )
        .route(
            "/api/v1/market/{symbol}",
            get(|Path(symbol): Path<String>, h: HeaderMap| async move {
                Json(json!({"symbol": symbol, "bid": 1.08412, "ask": 1.08419, "caller": caller(&h)}))
            }),
        )
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("mt5-demo listening on {listen}");
    axum::serve(listener, router).await?;
    Ok(())
}
