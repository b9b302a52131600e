//! The shared limiter's Redis side: one connection (multiplexed, reconnecting by itself), one
//! Lua script (`gcra.lua`, sent by EVALSHA) and a time budget per call. The script does the
//! same two-window GCRA as `core::ratelimit`, atomically, on Redis' clock.

use std::time::Duration;

use crate::config::ratelimit::RedisLimit;
use crate::core::limiter::{Outcome, Refused};
use crate::core::ratelimit::{Exceeded, Limits, RateStatus, Window, WindowStatus};
use crate::core::snapshot::ServiceEntry;

/// The script, shared with the tests that replay the shared vectors against it.
pub const GCRA_LUA: &str = include_str!("gcra.lua");

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("no answer within the time budget")]
    Timeout,
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("unexpected reply from the rate-limit script: {0}")]
    Reply(String),
    #[error("not connected to the Redis Cluster yet")]
    NotConnected,
}

impl SharedError {
    /// Redis (or the way to it) is unavailable: the breaker counts these. A server error on one
    /// key (a Lua error, WRONGTYPE, MOVED, OOM) or a reply we cannot read is this request's
    /// problem, not Redis being down: it falls back alone and leaves the breaker be.
    pub fn is_transport(&self) -> bool {
        match self {
            SharedError::Timeout | SharedError::NotConnected => true,
            SharedError::Redis(e) => {
                e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
            }
            SharedError::Reply(_) => false,
        }
    }
}

/// The script's answer, and on a refusal how long until it would admit (µs).
#[derive(Debug)]
pub struct Verdict {
    pub outcome: Outcome,
    pub wait_us: Option<u64>,
}

/// How the limiter reaches Redis.
enum Conn {
    /// One node. The manager is replaced whole when a trial fails on a connection it would not
    /// rebuild itself (it only reconnects after I/O errors; a failed handshake would otherwise
    /// stay cached).
    Single {
        client: ::redis::Client,
        config: ::redis::aio::ConnectionManagerConfig,
        manager: arc_swap::ArcSwap<::redis::aio::ConnectionManager>,
    },
    /// A Redis Cluster: the client keeps the slot map and follows MOVED/ASK. Empty until the
    /// first connection is made (in the background; calls meanwhile fail fast and fall back).
    Cluster {
        client: ::redis::cluster::ClusterClient,
        conn: arc_swap::ArcSwapOption<::redis::cluster_async::ClusterConnection>,
    },
}

pub struct RedisLimiter {
    /// A one-thread runtime (`permiso-redis`) that makes the connection and loads the script
    /// at start, so the first requests do not pay for connecting inside their budget; the
    /// connection's driver task lives there. (The manager spawns reconnects on whichever
    /// runtime notices the failure; that is fine, pingora's runtimes outlive the limiter.)
    runtime: Option<tokio::runtime::Runtime>,
    conn: std::sync::Arc<Conn>,
    script: ::redis::Script,
    key_prefix: String,
    timeout: Duration,
}

impl RedisLimiter {
    pub fn new(cfg: &RedisLimit, password: Option<String>) -> anyhow::Result<RedisLimiter> {
        let mut info = ::redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())?;
        if let Some(p) = password {
            let settings = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(settings);
        }
        // The budget bounds each call from outside; the clients' own timeouts (longer, so the
        // budget always fires first and is counted as a timeout) only stop a dead connection
        // from being waited on for ever.
        let slack = (cfg.timeout * 2).max(Duration::from_millis(500));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("permiso-redis")
            .enable_all()
            .build()?;
        let conn = if cfg.cluster {
            let client = ::redis::cluster::ClusterClient::builder(vec![info])
                .connection_timeout(slack)
                .response_timeout(slack)
                .build()?;
            Conn::Cluster {
                client,
                conn: arc_swap::ArcSwapOption::empty(),
            }
        } else {
            let client = ::redis::Client::open(info)?;
            // Few quick retries: the breaker, not the manager, paces attempts while Redis is out.
            let config = ::redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(slack))
                .set_response_timeout(Some(slack))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(100));
            let manager = {
                let _in = runtime.enter();
                ::redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?
            };
            Conn::Single {
                client,
                config,
                manager: arc_swap::ArcSwap::from_pointee(manager),
            }
        };
        let limiter = RedisLimiter {
            runtime: Some(runtime),
            conn: std::sync::Arc::new(conn),
            script: ::redis::Script::new(GCRA_LUA),
            key_prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
        };
        limiter.connect(false);
        Ok(limiter)
    }

    /// After a trial failed on a broken connection: a new connection, in the background.
    pub fn reconnect(&self) {
        self.connect(true);
    }

    /// Connects in the background and loads the script: at start (on the connection made in
    /// `new`), and with a new single-node manager when `replace`. A Redis that is down just
    /// leaves requests to fall back.
    fn connect(&self, replace: bool) {
        let Some(rt) = &self.runtime else { return };
        let conn = self.conn.clone();
        let script = self.script.clone();
        rt.spawn(async move {
            let loaded = match &*conn {
                Conn::Single {
                    client,
                    config,
                    manager,
                } => {
                    if replace {
                        match ::redis::aio::ConnectionManager::new_lazy_with_config(
                            client.clone(),
                            config.clone(),
                        ) {
                            Ok(m) => manager.store(std::sync::Arc::new(m)),
                            Err(e) => {
                                return tracing::debug!(error = %e, "shared rate limiter: no new connection")
                            }
                        }
                    }
                    let mut c = (**manager.load()).clone();
                    script.prepare_invoke().load_async(&mut c).await
                }
                Conn::Cluster { client, conn } => match client.get_async_connection().await {
                    Ok(mut c) => {
                        conn.store(Some(std::sync::Arc::new(c.clone())));
                        script.prepare_invoke().load_async(&mut c).await
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = loaded {
                tracing::warn!(error = %e, "shared rate limiter: Redis not reachable (yet)");
            }
        });
    }

    /// One round trip (EVALSHA; the script is loaded once per Redis server).
    pub async fn check(&self, service: &ServiceEntry) -> Result<Verdict, SharedError> {
        self.count(&service.id, service.limits, None).await
    }

    /// Counts one request of `service_id` at `limits`, on Redis' clock, or at `at_us`
    /// (microseconds; only the tests that replay the shared vectors pass one).
    pub async fn count(
        &self,
        service_id: &str,
        limits: Limits,
        at_us: Option<u64>,
    ) -> Result<Verdict, SharedError> {
        let key = state_key(&self.key_prefix, service_id, &limits);
        let mut call = self.script.key(key);
        // A quota of 0 (only a hand-made payload can carry one) counts as 1, as it does locally;
        // 0 on the wire means "no limit".
        call.arg(at_us.map(|t| t.to_string()).unwrap_or_default())
            .arg(limits.per_minute.map_or(0, |q| q.max(1)))
            .arg(limits.per_hour.map_or(0, |q| q.max(1)));
        let reply: Vec<i64> = match &*self.conn {
            Conn::Single { manager, .. } => {
                let mut c = (**manager.load()).clone();
                tokio::time::timeout(self.timeout, call.invoke_async(&mut c)).await
            }
            Conn::Cluster { conn, .. } => {
                let Some(c) = conn.load_full() else {
                    return Err(SharedError::NotConnected);
                };
                let mut c = (*c).clone();
                tokio::time::timeout(self.timeout, call.invoke_async(&mut c)).await
            }
        }
        .map_err(|_| SharedError::Timeout)??;
        verdict_of(&reply, limits)
    }
}

impl Drop for RedisLimiter {
    fn drop(&mut self) {
        // Dropped from inside another runtime when the sidecar stops, where a blocking
        // shutdown would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// One hash per service and limits: new limits start a fresh count, as they do locally. The
/// service id sits in a hash tag so the key's slot is the service's on Redis Cluster.
pub fn state_key(prefix: &str, service_id: &str, limits: &Limits) -> String {
    let q = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
    format!(
        "{prefix}{{{service_id}}}:{}:{}",
        q(limits.per_minute),
        q(limits.per_hour)
    )
}

fn window_of(n: i64) -> Result<Window, SharedError> {
    match n {
        1 => Ok(Window::Minute),
        2 => Ok(Window::Hour),
        _ => Err(SharedError::Reply(format!("window {n}"))),
    }
}

/// The script's reply as the limiter's answer (the format is in `gcra.lua`).
pub fn verdict_of(reply: &[i64], limits: Limits) -> Result<Verdict, SharedError> {
    let n = |v: i64| u64::try_from(v).map_err(|_| SharedError::Reply(format!("{reply:?}")));
    let outcome = |outcome| Verdict {
        outcome,
        wait_us: None,
    };
    match reply {
        [1, 0, _, _] => Ok(outcome(Ok(RateStatus::default()))),
        [1, w, remaining, reset] => Ok(outcome(Ok(RateStatus {
            tightest: Some(WindowStatus {
                window: window_of(*w)?,
                remaining: n(*remaining)?,
                reset_secs: n(*reset)?,
            }),
            applied: None,
        }))),
        [0, w, retry, wait_us] => Ok(Verdict {
            outcome: Err(Refused::Exceeded(Exceeded {
                window: window_of(*w)?,
                retry_after_secs: n(*retry)?,
                limits,
            })),
            wait_us: Some(n(*wait_us)?),
        }),
        _ => Err(SharedError::Reply(format!("{reply:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_service_and_its_limits() {
        let l = Limits {
            per_minute: Some(60),
            per_hour: None,
        };
        assert_eq!(state_key("p:", "srv_1", &l), "p:{srv_1}:60:-");
    }

    #[test]
    fn replies() {
        let l = Limits {
            per_minute: Some(3),
            per_hour: None,
        };
        let ok = verdict_of(&[1, 1, 2, 20], l).unwrap().outcome.unwrap();
        assert_eq!(ok.header().unwrap(), "\"minute\";r=2;t=20");
        let v = verdict_of(&[0, 2, 7, 6_500_000], l).unwrap();
        assert_eq!(v.wait_us, Some(6_500_000));
        match v.outcome {
            Err(Refused::Exceeded(e)) => assert_eq!((e.window, e.retry_after_secs), (Window::Hour, 7)),
            o => panic!("{o:?}"),
        }
        for bad in [
            &[][..],
            &[1, 3, 0, 0],
            &[0, 1],
            &[0, 1, 7],
            &[0, 1, -1, 5],
            &[2, 1, 1, 1],
        ] {
            assert!(verdict_of(bad, l).is_err(), "{bad:?}");
        }
    }
}
