//! The change listener: one LISTEN connection per replica, outside the pool.

use std::sync::Arc;
use std::time::Duration;

use super::CHANNEL;

/// Holds a LISTEN connection and signals `changes` on each notification; reconnects with
/// backoff when the connection drops (and signals then too: what was sent while it was down
/// is lost). Ends with the runtime.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    timeout: Duration,
    changes: Arc<tokio::sync::Notify>,
) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut cfg = config.clone();
        cfg.connect_timeout(timeout);
        match cfg.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                let driver = tokio::spawn(async move {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(m) = stream.next().await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                                let _ = tx.send(());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "PostgreSQL change listener lost its connection");
                                return;
                            }
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!(error = %e, "LISTEN failed");
                } else {
                    backoff = Duration::from_millis(100);
                    changes.notify_waiters();
                    while rx.recv().await.is_some() {
                        changes.notify_waiters();
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "PostgreSQL change listener cannot connect"),
        }
        changes.notify_waiters();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
