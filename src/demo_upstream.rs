//! A stand-in for the MT5 trading API from the seed documents: a few JSON endpoints that report
//! which caller the sidecar said it was. Used by `permiso dev` and the examples.

use std::net::SocketAddr;

use axum::extract::Path;
use axum::http::HeaderMap;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde_json::{json, Value};

/// The identity the sidecar attached (X-Permiso-*), and whether any credential leaked through.
pub fn caller(h: &HeaderMap) -> Value {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    json!({
        "service_id": get("x-permiso-service-id"),
        "service_name": get("x-permiso-service-name"),
        "scopes": get("x-permiso-scopes"),
        "key_id": get("x-permiso-key-id"),
        "environment": get("x-permiso-environment"),
        "token_id": get("x-permiso-token-id"),
        "client_cert_identity": get("x-permiso-client-cert-identity"),
        "trusted": get("x-permiso-trusted"),
        "credential_reached_service": h.contains_key("authorization"),
    })
}

pub fn router() -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "healthy", "service": "mt5-api"})) }))
        .route(
            "/api/v1/trades",
            get(|h: HeaderMap| async move {
                Json(json!({
                    "trades": [
                        {"ticket": 1001, "symbol": "EURUSD", "type": "buy", "volume": 0.1, "open_price": 1.0842},
                        {"ticket": 1002, "symbol": "XAUUSD", "type": "sell", "volume": 0.05, "open_price": 2381.4}
                    ],
                    "caller": caller(&h)
                }))
            })
            .post(|h: HeaderMap| async move {
                Json(json!({"ticket": 1003, "status": "opened", "caller": caller(&h)}))
            }),
        )
        .route(
            "/api/v1/trades/{ticket}",
            delete(|Path(ticket): Path<u64>, h: HeaderMap| async move {
                Json(json!({"ticket": ticket, "status": "closed", "caller": caller(&h)}))
            }),
        )
        .route(
            "/api/v1/account",
            get(|h: HeaderMap| async move {
                Json(json!({"login": 5012345, "currency": "USD", "leverage": 100, "caller": caller(&h)}))
            }),
        )
        .route(
            "/api/v1/account/balance",
            get(|h: HeaderMap| async move {
                Json(json!({"balance": 10250.75, "equity": 10311.20, "margin": 512.0, "caller": caller(&h)}))
            }),
        )
        // Seed 002's admin endpoint: the sidecar admits trusted service clients only.
        .route(
            "/api/v1/admin/stats",
            get(|h: HeaderMap| async move {
                Json(json!({"open_positions": 2, "accounts": 1, "caller": caller(&h)}))
            }),
        )
        .route(
            "/api/v1/market/{symbol}",
            get(|Path(symbol): Path<String>, h: HeaderMap| async move {
                Json(json!({"symbol": symbol, "bid": 1.08412, "ask": 1.08419, "caller": caller(&h)}))
            }),
        )
}

/// Serves the demo API until the task is dropped.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router()).await?;
    Ok(())
}
