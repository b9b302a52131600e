//! `[sidecar.rate_limit]` validated into `RateLimitConfig`: which limiter counts cluster-scope
//! services, and what they get while it cannot answer. No I/O here: the Redis URL is parsed,
//! not dialled, and the password is read from PERMISO_REDIS_PASSWORD when the sidecar starts.

use std::time::Duration;

use super::file::{self, OnRedisError, RateLimitBackend};
use super::{invalid, ConfigError};

const KEY: &str = "sidecar.rate_limit";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Sidecars in front of this upstream: each enforces 1/replicas of a cluster limit when it
    /// counts alone.
    pub replicas: u32,
    /// None: the local backend.
    pub redis: Option<RedisLimit>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisLimit {
    /// Without a password.
    pub url: String,
    /// `url` is a node of a Redis Cluster.
    pub cluster: bool,
    pub key_prefix: String,
    pub timeout: Duration,
    pub on_error: OnRedisError,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            replicas: 1,
            redis: None,
        }
    }
}

fn field(name: &str) -> String {
    format!("{KEY}.{name}")
}

impl RateLimitConfig {
    pub fn from_file(r: &file::RateLimit) -> Result<Self, ConfigError> {
        if r.replicas == Some(0) {
            return Err(invalid(field("replicas"), "must be at least 1"));
        }
        if r.backend == RateLimitBackend::Local {
            // Every Redis setting would do nothing without Redis: refuse rather than ignore.
            let redis_only = [
                ("redis_url", r.redis_url.is_some()),
                ("redis_cluster", r.redis_cluster.is_some()),
                ("key_prefix", r.key_prefix.is_some()),
                ("timeout_ms", r.timeout_ms.is_some()),
                ("on_redis_error", r.on_redis_error.is_some()),
                ("breaker_failures", r.breaker_failures.is_some()),
                ("breaker_cooldown_ms", r.breaker_cooldown_ms.is_some()),
            ];
            if let Some((name, _)) = redis_only.iter().find(|(_, set)| *set) {
                return Err(invalid(field(name), "only read with backend = \"redis\""));
            }
            return Ok(RateLimitConfig {
                replicas: r.replicas.unwrap_or(1),
                redis: None,
            });
        }
        let url = r
            .redis_url
            .as_deref()
            .ok_or_else(|| invalid(field("redis_url"), "required with backend = \"redis\""))?;
        let info = redis_url(url)?;
        let on_error = r.on_redis_error.unwrap_or(OnRedisError::Local);
        let replicas = match (on_error, r.replicas) {
            (OnRedisError::Local, None) => {
                return Err(invalid(
                    field("replicas"),
                    "required with on_redis_error = \"local\": the number of sidecars in front of this upstream, each enforcing 1/replicas of a cluster limit while Redis is unreachable",
                ))
            }
            (OnRedisError::Local, Some(n)) => n,
            (_, Some(_)) => {
                return Err(invalid(
                    field("replicas"),
                    "only read with on_redis_error = \"local\" (or backend = \"local\")",
                ))
            }
            (_, None) => 1,
        };
        let breaker_failures = r.breaker_failures.unwrap_or(3);
        if breaker_failures == 0 {
            return Err(invalid(field("breaker_failures"), "must be at least 1"));
        }
        let cooldown_ms = r.breaker_cooldown_ms.unwrap_or(1000);
        if !(1..=3_600_000).contains(&cooldown_ms) {
            return Err(invalid(field("breaker_cooldown_ms"), "must be 1..=3600000"));
        }
        let timeout_ms = r.timeout_ms.unwrap_or(5);
        if !(1..=1000).contains(&timeout_ms) {
            return Err(invalid(field("timeout_ms"), "must be 1..=1000"));
        }
        let key_prefix = r.key_prefix.clone().unwrap_or_else(|| "permiso:rl:".into());
        // Braces would open a Redis Cluster hash tag of their own before the service's.
        if key_prefix.is_empty()
            || key_prefix
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'{' || b == b'}')
        {
            return Err(invalid(
                field("key_prefix"),
                "must be non-empty, without spaces, control characters or braces",
            ));
        }
        Ok(RateLimitConfig {
            replicas,
            redis: Some(RedisLimit {
                url: info,
                cluster: r.redis_cluster.unwrap_or(false),
                key_prefix,
                timeout: Duration::from_millis(timeout_ms),
                on_error,
                breaker_failures,
                breaker_cooldown: Duration::from_millis(cooldown_ms),
            }),
        })
    }
}

/// Accepts `redis://host[:port][/db]` without a password.
fn redis_url(url: &str) -> Result<String, ConfigError> {
    let name = field("redis_url");
    if url.starts_with("rediss://") {
        return Err(invalid(
            name,
            "TLS to Redis (rediss://) is not built in yet: reach Redis over a private network or a local TLS tunnel",
        ));
    }
    if !url.starts_with("redis://") {
        return Err(invalid(name, "must be a redis:// URL"));
    }
    let info =
        redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| invalid(&name, e.to_string()))?;
    if info.redis_settings().password().is_some() {
        return Err(invalid(
            name,
            "the URL carries a password: put it in PERMISO_REDIS_PASSWORD, never in the config file",
        ));
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<RateLimitConfig, ConfigError> {
        let r: file::RateLimit = toml::from_str(toml_text).expect("toml");
        RateLimitConfig::from_file(&r)
    }

    fn refused(toml_text: &str, needle: &str) {
        let e = parse(toml_text).unwrap_err().to_string();
        assert!(e.contains(needle), "{toml_text:?}: {e}");
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.replicas, 1);
        assert!(c.redis.is_none());
        let c = parse("backend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\nreplicas = 3").unwrap();
        let r = c.redis.unwrap();
        assert_eq!(c.replicas, 3);
        assert_eq!(r.timeout, Duration::from_millis(5));
        assert_eq!(r.on_error, OnRedisError::Local);
        assert_eq!(r.key_prefix, "permiso:rl:");
        assert_eq!(r.breaker_failures, 3);
        assert_eq!(r.breaker_cooldown, Duration::from_millis(1000));
        assert!(!r.cluster, "a standalone Redis unless said otherwise");
        let c =
            parse("backend = \"redis\"\nredis_url = \"redis://r:7000\"\nreplicas = 3\nredis_cluster = true")
                .unwrap();
        assert!(c.redis.unwrap().cluster);
        let c = parse("backend = \"redis\"\nredis_url = \"redis://r:6379/2\"\non_redis_error = \"closed\"\ntimeout_ms = 20").unwrap();
        assert_eq!(c.redis.unwrap().on_error, OnRedisError::Closed);
    }

    #[test]
    fn what_would_do_nothing_or_leak_is_refused() {
        refused(
            "redis_url = \"redis://127.0.0.1\"",
            "only read with backend = \"redis\"",
        );
        refused("on_redis_error = \"open\"", "only read with backend");
        refused("timeout_ms = 3", "only read with backend");
        refused("redis_cluster = true", "only read with backend");
        refused("backend = \"redis\"", "required with backend");
        refused(
            "backend = \"redis\"\nredis_url = \"redis://127.0.0.1\"",
            "required with on_redis_error = \"local\"",
        );
        refused(
            "backend = \"redis\"\nredis_url = \"redis://:hunter2@127.0.0.1\"\nreplicas = 2",
            "PERMISO_REDIS_PASSWORD",
        );
        refused(
            "backend = \"redis\"\nredis_url = \"rediss://127.0.0.1\"\nreplicas = 2",
            "not built in",
        );
        refused(
            "backend = \"redis\"\nredis_url = \"http://127.0.0.1\"\nreplicas = 2",
            "must be a redis://",
        );
        refused(
            "backend = \"redis\"\nredis_url = \"redis://127.0.0.1\"\nreplicas = 2\ntimeout_ms = 0",
            "1..=1000",
        );
        refused(
            "backend = \"redis\"\nredis_url = \"redis://127.0.0.1\"\nreplicas = 2\nkey_prefix = \"a b\"",
            "key_prefix",
        );
        refused("replicas = 0", "at least 1");
        let redis = "backend = \"redis\"\nredis_url = \"redis://127.0.0.1\"\n";
        refused(
            &format!("{redis}on_redis_error = \"open\"\nreplicas = 3"),
            "only read with on_redis_error",
        );
        refused(
            &format!("{redis}replicas = 3\nbreaker_failures = 0"),
            "at least 1",
        );
        refused(
            &format!("{redis}replicas = 3\nbreaker_cooldown_ms = 0"),
            "1..=3600000",
        );
        refused(
            &format!("{redis}replicas = 3\nbreaker_cooldown_ms = 3600001"),
            "1..=3600000",
        );
        refused(
            &format!("{redis}replicas = 3\nkey_prefix = \"a{{b}}:\""),
            "braces",
        );
        let e = toml::from_str::<file::RateLimit>("backend = \"memcached\"").unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
        let e = toml::from_str::<file::RateLimit>("on_redis_error = \"maybe\"").unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }
}
