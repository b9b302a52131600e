//! `[admin_plane]` validated into `AdminConfig`.

use std::time::Duration;

use super::{database, file, invalid, resolve, server_tls, AdminConfig, ConfigError, MIN_ADMIN_KEY_LEN};
use crate::core::key::Secret;

impl AdminConfig {
    pub fn from_file(f: &file::AdminPlane, admin_api_key: Option<String>) -> Result<Self, ConfigError> {
        let key = admin_api_key.ok_or_else(|| {
            invalid(
                "PERMISO_ADMIN_API_KEY",
                "must be set: the admin plane refuses to run without an admin key",
            )
        })?;
        if key.len() < MIN_ADMIN_KEY_LEN {
            return Err(invalid(
                "PERMISO_ADMIN_API_KEY",
                format!("must be at least {MIN_ADMIN_KEY_LEN} characters"),
            ));
        }
        if f.max_body_bytes < 1024 {
            return Err(invalid("admin_plane.max_body_bytes", "must be at least 1024"));
        }
        if f.sync_max_wait_seconds == 0 || f.sync_max_wait_seconds > 300 {
            return Err(invalid("admin_plane.sync_max_wait_seconds", "must be 1..=300"));
        }
        if f.sidecar_stale_after_seconds <= f.sync_max_wait_seconds || f.sidecar_stale_after_seconds > 86_400
        {
            return Err(invalid(
                "admin_plane.sidecar_stale_after_seconds",
                "must exceed sync_max_wait_seconds and be at most 86400",
            ));
        }
        if f.max_active_keys_per_service == 0 {
            return Err(invalid(
                "admin_plane.max_active_keys_per_service",
                "must be at least 1",
            ));
        }
        let listen = resolve("admin_plane.listen", &f.listen)?;
        let issuer = f.issuer.clone();
        if issuer.as_ref().is_some_and(|i| i.is_empty() || i.ends_with('/')) {
            return Err(invalid(
                "admin_plane.issuer",
                "must be a URL without a trailing '/'",
            ));
        }
        if !(8192..=1024 * 1024).contains(&f.max_header_bytes) {
            return Err(invalid("admin_plane.max_header_bytes", "must be 8192..=1048576"));
        }
        if f.header_read_timeout_ms == 0 || f.body_read_timeout_ms == 0 {
            return Err(invalid(
                "admin_plane.header_read_timeout_ms / body_read_timeout_ms",
                "must be at least 1",
            ));
        }
        if f.max_connections == 0 {
            return Err(invalid("admin_plane.max_connections", "must be at least 1"));
        }
        if f.max_requests_per_connection == 0 {
            return Err(invalid(
                "admin_plane.max_requests_per_connection",
                "must be at least 1",
            ));
        }
        if f.token_audience.is_empty() {
            return Err(invalid("admin_plane.token_audience", "must not be empty"));
        }
        let rate = |field: &str, v: u32| {
            std::num::NonZeroU32::new(v).ok_or_else(|| invalid(field, "must be at least 1"))
        };
        if f.token_requests_per_minute_per_client.is_some() {
            return Err(invalid(
                "admin_plane.token_requests_per_minute_per_client",
                "was removed (it let anyone lock a client out by failing with its id); use client_auth_failures_per_minute and client_auth_failures_per_minute_per_ip, which count failures only",
            ));
        }
        Ok(AdminConfig {
            token_rate_per_ip: rate(
                "admin_plane.token_requests_per_minute_per_ip",
                f.token_requests_per_minute_per_ip,
            )?,
            client_auth_failures_per_minute: rate(
                "admin_plane.client_auth_failures_per_minute",
                f.client_auth_failures_per_minute,
            )?
            .get(),
            client_auth_failures_per_minute_per_ip: rate(
                "admin_plane.client_auth_failures_per_minute_per_ip",
                f.client_auth_failures_per_minute_per_ip,
            )?
            .get(),
            auth_failures_per_minute_per_ip: rate(
                "admin_plane.auth_failures_per_minute_per_ip",
                f.auth_failures_per_minute_per_ip,
            )?
            .get(),
            audited_auth_failures_per_minute: rate(
                "admin_plane.audited_auth_failures_per_minute",
                f.audited_auth_failures_per_minute,
            )?
            .get(),
            issuer,
            token_audience: f.token_audience.clone(),
            signing_key_publish_delay: Duration::from_secs(f.signing_key_publish_delay_seconds),
            signing_kek: None,
            tls: f
                .tls
                .as_ref()
                .map(|t| server_tls("admin_plane.tls", t))
                .transpose()?,
            listen,
            database: database::parse(
                &f.database,
                f.database_password_file.as_deref(),
                f.database_pool_size,
                f.database_ca_file.as_deref(),
            )?,
            database_password: None,
            rotation_grace: Duration::from_secs(f.rotation_grace_seconds),
            max_body_bytes: f.max_body_bytes,
            max_header_bytes: f.max_header_bytes,
            header_read_timeout: Duration::from_millis(f.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(f.body_read_timeout_ms),
            max_requests_per_connection: f.max_requests_per_connection,
            max_connections: f.max_connections,
            sync_max_wait: Duration::from_secs(f.sync_max_wait_seconds),
            sidecar_stale_after: Duration::from_secs(f.sidecar_stale_after_seconds),
            console: f.console,
            sync_max_concurrent_per_credential: match f.sync_max_concurrent_per_credential {
                0 => {
                    return Err(invalid(
                        "admin_plane.sync_max_concurrent_per_credential",
                        "must be at least 1",
                    ))
                }
                n => n,
            },
            max_active_keys_per_service: f.max_active_keys_per_service,
            admin_api_key: Secret::new(key),
        })
    }
}
